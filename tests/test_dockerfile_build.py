"""``vmrt build``: Dockerfile builds (RUN steps in process isolation), real runs of what they make.

The lexer and ``.dockerignore`` tests need nothing; the others build in the session's private
vmrt (root, runc) and run the result in both isolations.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Vmrt, one_line_error
from test_api import DOCKER
from test_api import api as api_for_build  # the service fixture, registered here under this name

from vmrt.images import dockerfile as df
from vmrt.images.store import Store

assert api_for_build  # imported for pytest to find

MADE = ("url:1", "built:1", "cached:1", "cached:2", "cached:3", "ignored:1", "hostile:1", "wh:1", "onbase:1", "child:1",
        "stdin:1", "nonet:1", "links:1", "slow:1", "quick:1", "pruned:1", "viaapi:1")


@pytest.fixture(scope="module", autouse=True)
def _forget_what_the_module_built(vmrt_session: Vmrt) -> Iterator[None]:
    """The session's store shared with later modules: the images built here and the build cache go."""
    yield
    tags = set(vmrt_session("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.decode().split())
    mine = [t for t in MADE if t in tags]
    if mine:
        vmrt_session("rmi", "-f", *mine)
    vmrt_session("builder", "prune", "-a", "-f")


DOCKERFILE = """\
ARG BASE=busybox
FROM ${BASE} AS first
ARG V=dflt
ENV A=1 B="two words"
WORKDIR /work
RUN echo "first $V $B" > first.txt && mkdir -p /gone && echo x > /gone/y
RUN ["sh", "-c", "echo exec-form $A > /work/exec.txt"]
RUN <<EOF
echo heredoc > /work/heredoc.txt
EOF
RUN rm -rf /gone

FROM busybox
ENV GREETING=hello
COPY --chown=vmrt:vmrt --chmod=640 a*.txt /dst/
COPY --chown=1234 sub /subdir
COPY --from=first /work/first.txt /work/exec.txt /work/heredoc.txt /copied/
WORKDIR /app
USER vmrt
LABEL org.example.name="the app" version=1
EXPOSE 8080 53/udp
HEALTHCHECK --interval=5s --retries=2 CMD true
ENTRYPOINT ["sh", "-c", "echo \\"$GREETING $0 $@\\"; id -u; pwd"]
CMD ["from-cmd"]
"""


def _context(tmp: Path, dockerfile: str = DOCKERFILE) -> Path:
    ctx = tmp / "ctx"
    (ctx / "sub").mkdir(parents=True)
    (ctx / "a.txt").write_text("alpha\n")
    (ctx / "ab.txt").write_text("alpha-b\n")
    (ctx / "b.txt").write_text("not copied\n")
    (ctx / "sub" / "f").write_text("sub file\n")
    (ctx / "Dockerfile").write_text(dockerfile)
    return ctx


def _build(v: Vmrt, *args: str, ok: bool = True) -> str:
    r = v("build", *args, timeout=300)
    out = r.stdout.decode() + r.stderr.decode()
    if ok:
        assert r.returncode == 0, out
    return out


def _layer_entries(v: Vmrt, ref: str, index: int) -> dict[str, tarfile.TarInfo]:
    store = Store(v.root)
    try:
        img = store.get(ref)
        data = gzip.decompress(store.read_blob(img.layers[index]["digest"]))
    finally:
        store.close()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


# --- no root ---------------------------------------------------------------------------------------
def test_word_lexer_as_buildkit() -> None:
    env = {"A": "1", "E": "", "SP": "a b"}
    assert df.word('"two words"', env) == "two words"
    assert df.word("'$A'", env) == "$A"
    assert df.word('"$A-${A}"', env) == "1-1"
    assert df.word("\\$A", env) == "$A"
    assert df.word("${X:-dflt}/${E:-e}/${E-e}/${A:+set}/${X:+set}", env) == "dflt/e//set/"
    assert df.word("$SP", env) == "a b"
    assert df.words('a "b c" d\\ e', env) == ["a", "b c", "d e"]
    with pytest.raises(df.UsageError):
        df.word('"open', env)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab $\\'\"{}:-+_?*[]!/\n\t", max_size=40))
def test_lexer_and_ignore_take_any_text(text: str) -> None:
    """Words and patterns from a Dockerfile, .dockerignore or an image's ONBUILD: a UsageError
    at worst, never another exception."""
    try:
        assert isinstance(df.word(text, {"a": "x"}), str)
        assert all(isinstance(w, str) for w in df.words(text, {}))
    except df.UsageError:
        pass
    ig = df.Ignore(text)
    ig.excluded("a/b c")


def test_dockerignore_patterns_and_exceptions() -> None:
    ig = df.Ignore("# comment\n*.log\n!keep.log\n/build\n**/*.tmp\ndocs/*.md\n")
    assert ig.excluded("x.log") and not ig.excluded("keep.log")
    assert ig.excluded("build/out/bin") and not ig.excluded("src/build")
    assert ig.excluded("a/b/c.tmp") and ig.excluded("c.tmp")
    assert ig.excluded("docs/a.md") and not ig.excluded("docs/sub/a.md")
    assert not ig.excluded("src/main.c")


def test_parse_names_the_line_of_a_syntax_error() -> None:
    with pytest.raises(df.DockerfileError, match="heredoc"):
        df.parse("FROM busybox\nRUN <<EOF\necho\n")
    assert [i.line for i in df.parse("FROM a\n\nRUN x \\\n  y\nCMD z\n")] == [1, 3, 5]


# --- builds -----------------------------------------------------------------------------------------
def test_multistage_build_runs_as_docker_would(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    before = set(vmrt("images", "-aq").stdout.decode().split())  # other tests' untagged builds stay
    out = _build(vmrt, "-t", "built:1", "--build-arg", "V=given", str(ctx))
    assert "Step 1/21 : ARG BASE=busybox" in out and " ---> Running in " in out
    assert "Successfully built " in out and "Successfully tagged built:1" in out
    new = set(vmrt("images", "-aq").stdout.decode().split()) - before  # the step images are gone
    assert new == {vmrt("images", "-q", "built:1").stdout.decode().strip()}, new
    cfg = json.loads(vmrt("image", "inspect", "-f", "{{json .Config}}", "built:1").stdout)
    assert cfg["User"] == "vmrt" and cfg["WorkingDir"] == "/app"
    assert cfg["Labels"] == {"org.example.name": "the app", "version": "1"}
    assert cfg["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert cfg["Healthcheck"] == {"Test": ["CMD-SHELL", "true"], "Interval": 5_000_000_000, "Retries": 2}
    assert cfg["Cmd"] == ["from-cmd"] and cfg["Entrypoint"][:2] == ["sh", "-c"]
    assert "GREETING=hello" in cfg["Env"] and not any(e.startswith("V=") for e in cfg["Env"])
    hist = json.loads(vmrt("image", "inspect", "-f", "{{json .}}", "built:1").stdout)
    assert hist["RootFS"]["Layers"]

    r = vmrt("run", "--rm", "--isolation", "process", "built:1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().split()
    assert lines[:2] == ["hello", "from-cmd"] and lines[-2:] == ["1000", "/app"]
    script = ("stat -c '%n %u:%g %a' /dst/a.txt /dst/ab.txt /subdir/f; ls /dst; cat /copied/first.txt "
              "/copied/exec.txt /copied/heredoc.txt; test -e /gone && echo gone-is-here; echo end")
    want = ["/dst/a.txt 1000:1000 640", "/dst/ab.txt 1000:1000 640", "/subdir/f 1234:1234 644",
            "a.txt", "ab.txt", "first given two words", "exec-form 1", "heredoc", "end"]
    for iso in ("process", "vm"):
        r = vmrt("run", "--rm", "--isolation", iso, "--entrypoint", "sh", "built:1", "-c", script, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().splitlines() == want, (iso, r.stdout.decode())
    vmrt.assert_clean()


def test_rebuild_uses_the_cache_until_a_source_changes(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _context(tmp_path, "FROM busybox\nRUN echo one > /one\nCOPY a.txt /a\nRUN cat /a /one > /both\n")
    first = _build(vmrt, "-t", "cached:1", str(ctx))
    assert "Using cache" not in first
    image_id = json.loads(vmrt("image", "inspect", "-f", "{{json .Id}}", "cached:1").stdout)
    again = _build(vmrt, "-t", "cached:1", str(ctx))
    assert again.count(" ---> Using cache") == 3 and " ---> Running in " not in again
    assert json.loads(vmrt("image", "inspect", "-f", "{{json .Id}}", "cached:1").stdout) == image_id
    nocache = _build(vmrt, "--no-cache", "-t", "cached:2", str(ctx))
    assert "Using cache" not in nocache and nocache.count(" ---> Running in ") == 2
    (ctx / "a.txt").write_text("changed\n")
    changed = _build(vmrt, "-t", "cached:3", str(ctx))
    assert changed.count(" ---> Using cache") == 1  # the RUN before the COPY; from the COPY on, built again
    r = vmrt("run", "--rm", "--isolation", "process", "cached:3", "cat", "/both")
    assert r.stdout.decode() == "changed\none\n", r.stderr
    vmrt.assert_clean()


def test_failing_run_names_the_line_and_leaves_nothing(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _context(tmp_path, "FROM busybox\nRUN echo ok > /ok\n\nRUN echo failing; exit 3\n")
    before = vmrt("images", "-q").stdout.decode().split()
    r = vmrt("build", "-t", "broken:1", str(ctx), timeout=300)
    assert r.returncode == 1
    assert one_line_error(r.stderr) == ("vmrt: Dockerfile:4: The command '/bin/sh -c echo failing; exit 3' "
                                        "returned a non-zero code: 3")
    assert vmrt("images", "-q").stdout.decode().split() == before
    assert vmrt("ps", "-aq").stdout.decode().split() == []
    assert not any((vmrt.root / "rw").iterdir()) if (vmrt.root / "rw").is_dir() else True
    r = vmrt("build", str(_context(tmp_path / "2", "FROM busybox\nFROB x\n")), timeout=60)
    assert r.returncode != 0 and b"Dockerfile:2:" in r.stderr
    vmrt.assert_clean()


MALFORMED: list[tuple[str, bytes, str]] = [
    ("unknown instruction", b"FROM busybox\nFROBNICATE x\n",
     "Dockerfile:2: FROBNICATE: unknown instruction: FROBNICATE"),
    ("no FROM", b"RUN true\n", "Dockerfile:1: the first instruction must be FROM"),
    ("instruction before FROM", b"ARG A=1\nENV B=2\nFROM busybox\n", "Dockerfile:2: ENV before the first FROM"),
    ("FROM without an image", b"FROM\n", "Dockerfile:1: FROM: FROM requires either one or three arguments"),
    ("bad stage name", b"FROM busybox AS 1st\n", "Dockerfile:1: FROM: invalid name for build stage: '1st'"),
    ("bad ARG name", b"ARG 1x=2\nFROM busybox\n", "Dockerfile:1: ARG: invalid ARG name '1x'"),
    ("bad ARG in a stage", b"FROM busybox\nARG a-b\n", "Dockerfile:2: ARG: invalid ARG name 'a-b'"),
    ("bad substitution", b"FROM busybox\nENV A=${B\n", "Dockerfile:2: ENV: missing '}' in substitution"),
    ("unterminated heredoc", b"FROM busybox\nRUN true\nRUN <<EOF\necho\n", "Dockerfile:3: unterminated heredoc"),
    ("bad escape directive", b"# escape=x\nFROM busybox\n", "Dockerfile:1: invalid escape token 'x'"),
    ("SHELL's JSON form broken", b'FROM busybox\nSHELL ["/bin/sh", \n',
     "Dockerfile:2: SHELL: SHELL requires the arguments to be in JSON form"),
    ("COPY --from an unknown stage", b"FROM busybox\nCOPY --from=127.0.0.1:9/nostage /a /b\n",  # loopback only
     "Dockerfile:2: COPY: Unable to find image '127.0.0.1:9/nostage"),
    ("COPY --from a later stage index", b"FROM busybox\nCOPY --from=1 /a /b\nFROM busybox\n",
     "Dockerfile:2: COPY: invalid from flag value 1"),
    ("unknown flag", b"FROM busybox\nCOPY --bogus=1 a /b\n", "Dockerfile:2: unknown flag: --bogus for COPY"),
    ("ONBUILD ONBUILD", b"FROM busybox\nONBUILD ONBUILD RUN true\n", "Dockerfile:2: ONBUILD: ONBUILD isn't allowed"),
    ("empty file", b"", "Dockerfile:1: the file has no instructions"),
    ("only comments", b"# nothing\n\n   \n# here\n", "Dockerfile:1: the file has no instructions"),
    ("a line continuation alone", b"\\\n", "Dockerfile:1: an instruction without a name"),
    ("binary junk with NUL", b"FROM busybox\n\x7fELF\x02\x01\x01\x00\x00\xff", "Dockerfile:2: a NUL byte"),
    ("binary junk, not UTF-8", b"FROM busybox\nRUN \xff\xfe\xfd\n", "Dockerfile:2: not UTF-8 text (byte 0xff)"),
    ("a 10 MB line", b"FROM busybox\nRUN " + b"x" * (10 << 20) + b"\n",
     "Dockerfile:2: dockerfile line greater than max allowed size of 65535"),
    ("over 16 MiB", b"FROM busybox\n" + b"# c\n" * (4 << 20) + b"RUN true\n", "Dockerfile: larger than 16 MiB"),
    ("a deep continuation", b"FROM busybox\nFROBNICATE \\\n" + b"a \\\n" * 100_000 + b"b\n",
     "Dockerfile:2: FROBNICATE: unknown instruction: FROBNICATE"),
]


@pytest.mark.parametrize(("dockerfile", "error"), [(d, e) for _, d, e in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_dockerfiles_fail_in_one_line_naming_it(vmrt: Vmrt, tmp_path: Path, dockerfile: bytes,
                                                          error: str) -> None:
    """Each malformed Dockerfile: exit 1 (docker build's), one line naming the line (no
    traceback, no echo of a huge line), nothing left behind; the same from ``-f -``."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_bytes(dockerfile)
    before = vmrt("images", "-q").stdout
    for args, stdin in (([str(ctx)], None), (["-f", "-", str(ctx)], dockerfile)):
        r = vmrt("build", "-t", "malformed:1", *args, input=stdin, timeout=120)
        assert r.returncode == 1, (args, r.stderr[:2000])
        line = one_line_error(r.stderr)
        assert line.startswith(f"vmrt: {error}"), line[:2000]
        assert len(line) < 1200, len(line)
    assert vmrt("images", "-q").stdout == before
    assert vmrt("ps", "-aq").stdout == b""
    assert not list((vmrt.run_root / "builds").iterdir()) if (vmrt.run_root / "builds").is_dir() else True
    vmrt.assert_clean()


RSS_BOUND_KIB = 300 << 10  # a build's peak resident memory, whatever the context's size
PEAK = ("import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:])\n"
        "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(r.returncode)\n")


def _build_peak(v: Vmrt, *args: str, stdin: int | None = None, env: dict[str, str] | None = None
                ) -> tuple[subprocess.CompletedProcess[bytes], int]:
    """``vmrt build ARGS`` and the largest resident set of it and the processes it waited for (KiB)."""
    r = subprocess.run([sys.executable, "-c", PEAK, *v.cmd("build", *args)], stdin=stdin, capture_output=True,
                       env={**v.env, **(env or {})}, timeout=600)
    *rest, last = r.stderr.decode().rstrip("\n").split("\n")
    assert last.startswith("peak-rss-kib "), r.stderr
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, "\n".join(rest).encode()), int(last.split()[1])


def _tar_to(v: Vmrt, ctx: Path, *args: str, sparse: bool = False,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[bytes], int]:
    """``tar -c CTX | vmrt build ARGS -``: the context streamed on stdin."""
    tar = subprocess.Popen(["tar", *(["--sparse"] if sparse else []), "-C", str(ctx), "-c", "."],
                           stdout=subprocess.PIPE)
    try:
        assert tar.stdout is not None
        out = _build_peak(v, *args, "-", stdin=tar.stdout.fileno(), env=env)
    finally:
        if tar.stdout is not None:
            tar.stdout.close()
        tar.wait(timeout=60)
    return out


def test_a_stdin_context_whose_first_member_is_a_file(vmrt: Vmrt, tmp_path: Path) -> None:
    """``tar -c Dockerfile a.txt | vmrt build -``: the first member (a file with a size) is read
    when the stream opens, and counts against build_context_max as the others (it once met a
    limit of 0); over the limit, one line."""
    ctx = _context(tmp_path, "FROM busybox\nCOPY a.txt /a\n")
    tar = subprocess.run(["tar", "-C", str(ctx), "-c", "Dockerfile", "a.txt"], capture_output=True, check=True).stdout
    r = vmrt("build", "-q", "-", input=tar, timeout=120)
    assert r.returncode == 0, r.stderr
    image = r.stdout.decode().split()[-1]
    try:
        assert vmrt("run", "--rm", image, "cat", "/a").stdout == b"alpha\n"
    finally:
        vmrt("rmi", image)
    r = vmrt("build", "-q", "-", input=tar, env={"VMRT_BUILD_CONTEXT_MAX": "10"}, timeout=120)
    assert r.returncode == 1 and "larger than build_context_max" in one_line_error(r.stderr)
    vmrt.assert_clean()


def _tar_of(entries: list[tuple[str, bytes, str]]) -> bytes:
    """A tar of (name, data, symlink target) entries: a link where a target is given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, target in entries:
            ti = tarfile.TarInfo(name)
            if target:
                ti.type, ti.linkname = tarfile.SYMTYPE, target
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_a_stdin_context_keeps_links_as_links_and_writes_through_none(vmrt: Vmrt, tmp_path: Path) -> None:
    """``build -``: links in the context tar stay links wherever they point (as a directory
    context's, as docker sends them), COPY never follows one out of the context, and an entry
    that would be written through a link is refused in one line, with nothing written outside."""
    tar = _tar_of([("Dockerfile", b"FROM busybox\nCOPY . /ctx\n", ""), ("a.txt", b"alpha\n", ""),
                   ("rel", b"", "a.txt"), ("hostlink", b"", "/etc/shadow")])
    r = vmrt("build", "-q", "-", input=tar, timeout=120)
    assert r.returncode == 0, r.stderr
    image = r.stdout.decode().split()[-1]
    try:
        r = vmrt("run", "--rm", image, "sh", "-c", "readlink /ctx/hostlink; readlink /ctx/rel; cat /ctx/rel")
        assert r.stdout == b"/etc/shadow\na.txt\nalpha\n", r.stderr
    finally:
        vmrt("rmi", image)
    outside = tmp_path / "outside"
    outside.mkdir()
    tar = _tar_of([("Dockerfile", b"FROM busybox\n", ""), ("out", b"", str(outside)), ("out/planted", b"x", "")])
    r = vmrt("build", "-q", "-", input=tar, timeout=120)
    assert r.returncode != 0 and "unsafe entry" in one_line_error(r.stderr)
    assert list(outside.iterdir()) == []
    vmrt.assert_clean()


def test_an_oversized_dockerignore_is_one_line(vmrt: Vmrt, tmp_path: Path) -> None:
    """.dockerignore is read bounded, as the Dockerfile (16 MiB): a 20 MiB one is one line, exit 1."""
    ctx = _context(tmp_path, "FROM busybox\n")
    with open(ctx / ".dockerignore", "wb") as f:
        f.truncate(20 << 20)
    r = vmrt("build", str(ctx), timeout=120)
    assert r.returncode == 1 and one_line_error(r.stderr) == "vmrt: .dockerignore: larger than 16 MiB"
    vmrt.assert_clean()


def test_huge_contexts_stream_in_bounded_memory(request: pytest.FixtureRequest, vmrt: Vmrt, tmp_path: Path) -> None:
    """20,000 small files and a 4 GiB sparse file, as a directory, as a tar on stdin and through
    POST /build: each build succeeds with its peak resident memory under 300 MiB (the context is
    streamed, never held whole); the big file is .dockerignore'd by the directory build and
    streamed through by the tar ones (its zeros written as holes); over build_context_max the
    build is refused in one line."""
    many = tmp_path / "many"
    (many / "files").mkdir(parents=True)
    for i in range(20_000):
        (many / "files" / f"f{i:05d}").write_text(f"{i}\n")
    (many / "Dockerfile").write_text("FROM busybox\nCOPY files /many\nRUN ls /many | wc -l > /count\n")
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    with open(sparse / "big.img", "wb") as f:
        f.truncate(4 << 30)
    (sparse / "small.txt").write_text("small\n")
    (sparse / ".dockerignore").write_text("big.img\n")
    (sparse / "Dockerfile").write_text("FROM busybox\nCOPY small.txt /\n")
    made = []
    try:
        for what, (r, peak) in [("many files, a directory", _build_peak(vmrt, "-q", str(many))),
                                ("many files, stdin", _tar_to(vmrt, many, "-q")),
                                ("a sparse file, a directory", _build_peak(vmrt, "-q", str(sparse))),
                                ("a sparse file, stdin as zeros", _tar_to(vmrt, sparse, "-q")),
                                ("a sparse file, stdin as a sparse tar", _tar_to(vmrt, sparse, "-q", sparse=True))]:
            assert r.returncode == 0, (what, r.stderr)
            assert peak < RSS_BOUND_KIB, (what, peak)
            made.append(r.stdout.decode().split()[-1])
        assert made[0] == made[1] and made[2] == made[3] == made[4]
        r = vmrt("run", "--rm", made[0], "sh", "-c", "cat /count; stat -c %a /many")
        assert r.stdout == b"20000\n755\n", r.stderr  # (a stdin context's dirs once became 0700)
        r, peak = _tar_to(vmrt, sparse, "-q", sparse=True, env={"VMRT_BUILD_CONTEXT_MAX": str(1 << 30)})
        assert r.returncode == 1 and one_line_error(r.stderr) == \
            "vmrt: the build context is larger than build_context_max (1.0 GiB, 1073741824 bytes)"
        api = request.getfixturevalue("api_for_build")
        for ctx in (many, sparse):
            body = subprocess.run(["tar", "--sparse", "-C", str(ctx), "-c", "."], capture_output=True,
                                  check=True).stdout
            status, _, out = api.request("POST", "/build?q=1", body, {"Content-Type": "application/x-tar"})
            assert status == 200, out
            msgs = [json.loads(ln) for ln in out.decode().splitlines() if ln.strip()]
            assert not [m for m in msgs if "error" in m], msgs
            assert [m["aux"]["ID"] for m in msgs if "aux" in m] == [made[0] if ctx == many else made[2]]
        hwm = next(ln for ln in Path(f"/proc/{api.proc.pid}/status").read_text().splitlines()
                   if ln.startswith("VmHWM:"))
        assert int(hwm.split()[1]) < RSS_BOUND_KIB, hwm
    finally:
        for image in set(made):
            vmrt("rmi", image)
    vmrt.assert_clean()


def test_the_syntax_directive_is_ignored_with_a_notice(vmrt: Vmrt, tmp_path: Path) -> None:
    """``# syntax=`` names a frontend image: never pulled or run, a notice says so; the other
    directive beside it (escape) still applies."""
    ctx = _context(tmp_path, "# syntax=docker/dockerfile:1.7\n# escape=`\nFROM busybox\nRUN echo one `\n two > /x\n")
    out = _build(vmrt, str(ctx))
    assert out.splitlines()[0] == ("[Warning] Dockerfile:1: the syntax directive (docker/dockerfile:1.7) is ignored: "
                                   "vmrt builds with its own Dockerfile parser"), out
    image = out.split("Successfully built ")[1].split()[0]
    try:
        assert vmrt("run", "--rm", image, "cat", "/x").stdout == b"one two\n"
    finally:
        vmrt("rmi", image)
    vmrt.assert_clean()


def test_a_layer_the_stage_already_has_is_stacked_again(vmrt: Vmrt, tmp_path: Path) -> None:
    """COPY a; RUN rm a; COPY a makes the very bytes of the first COPY's layer (and two steps
    that change nothing within a second, the same empty layer): overlayfs refuses one lower dir
    twice (the build once failed at the next RUN: 'conflicting lowerdir'), and dropping the layer
    would leave /a deleted. It is stored again with a PAX global header in front: the same files,
    another diff ID, so /a is back."""
    ctx = _context(tmp_path, "FROM busybox\nCOPY a.txt /a\nRUN rm /a\nCOPY a.txt /a\nRUN true\nRUN true\n"
                             "RUN cat /a > /seen\n")
    out = _build(vmrt, "--no-cache", str(ctx))
    image = out.split("Successfully built ")[1].split()[0]
    try:
        store = Store(vmrt.root)
        try:
            diff_ids = store.get(image).diff_ids
        finally:
            store.close()
        assert len(diff_ids) == len(set(diff_ids)) == 7, diff_ids  # busybox + six steps' layers
        r = vmrt("run", "--rm", image, "sh", "-c", "cat /a /seen")
        assert r.stdout == b"alpha\nalpha\n", r.stderr
    finally:
        vmrt("rmi", image)
    vmrt.assert_clean()


def test_dockerignore_keeps_files_out(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _context(tmp_path, "FROM busybox\nCOPY . /ctx/\n")
    (ctx / "secret.log").write_text("s\n")
    (ctx / "keep.log").write_text("k\n")
    (ctx / ".dockerignore").write_text("*.log\n!keep.log\nsub\n")
    _build(vmrt, "-t", "ignored:1", str(ctx))
    r = vmrt("run", "--rm", "--isolation", "process", "ignored:1", "ls", "-A", "/ctx")
    assert r.stdout.decode().split() == [".dockerignore", "Dockerfile", "a.txt", "ab.txt", "b.txt", "keep.log"]
    r = vmrt("build", str(_context(tmp_path / "2", "FROM busybox\nCOPY nothere /x\n")), timeout=60)
    assert r.returncode != 0 and b"not found" in r.stderr


def test_hostile_step_layer_is_stored_not_followed(vmrt: Vmrt, tmp_path: Path) -> None:
    """A RUN that leaves a symlink to /etc/shadow, a FIFO and (where allowed) a device node: the
    layer holds the link as a link and the FIFO as a FIFO (the host never opened either: it would
    have blocked on the FIFO), and no device."""
    ctx = _context(tmp_path, "FROM busybox\nRUN ln -s /etc/shadow /evil && ln -s / /rootlink && mkfifo /fifo"
                             " && (mknod /dev-node c 1 3 || true) && echo data > /file && ln /file /hard\n")
    out = _build(vmrt, "-t", "hostile:1", str(ctx))
    entries = _layer_entries(vmrt, "hostile:1", -1)
    assert entries["evil"].issym() and entries["evil"].linkname == "/etc/shadow"
    assert entries["rootlink"].issym() and entries["fifo"].isfifo()
    assert "dev-node" not in entries
    assert entries["file"].isfile() and entries["file"].size == 5
    assert entries["hard"].islnk() and entries["hard"].linkname == "file"
    assert os.path.exists("/etc/shadow")
    if "device node /dev-node" not in out:
        pytest.skip("mknod was not allowed in the step (the rest was checked)")


def test_whiteout_and_opaque_dir(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _context(tmp_path, "FROM busybox\nRUN mkdir -p /d/x && echo 1 > /d/x/f && echo 2 > /del\n"
                             "RUN rm /del && rm -rf /d && mkdir -p /d && echo new > /d/n\n")
    _build(vmrt, "-t", "wh:1", str(ctx))
    entries = _layer_entries(vmrt, "wh:1", -1)
    assert ".wh.del" in entries and "d/.wh..wh..opq" in entries
    r = vmrt("run", "--rm", "--isolation", "process", "wh:1", "sh", "-c", "ls /d; test -e /del || echo gone")
    assert r.stdout.decode().split() == ["n", "gone"], r.stderr


def test_onbuild_add_archive_target_and_stdin_context(vmrt: Vmrt, tmp_path: Path) -> None:
    """ONBUILD triggers run when the image is a base; ADD unpacks a local tar; ARG scoping; SHELL,
    STOPSIGNAL, VOLUME; --target; a context as a tar on stdin; -q and --iidfile."""
    base = _context(tmp_path / "base", "FROM busybox\nONBUILD COPY a.txt /from-trigger\nSTOPSIGNAL SIGINT\n"
                                       "VOLUME /data\n")
    _build(vmrt, "-t", "onbase:1", str(base))
    ctx = tmp_path / "child"
    ctx.mkdir()
    (ctx / "a.txt").write_text("triggered\n")
    with tarfile.open(ctx / "payload.tar.gz", "w:gz") as tf:
        data = b"inside the archive\n"
        ti = tarfile.TarInfo("pkg/file")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
        evil = tarfile.TarInfo("../../escape")
        evil.size = 1
        tf.addfile(evil, io.BytesIO(b"x"))
    (ctx / "Dockerfile").write_text(
        "ARG GLOBAL=g\nFROM onbase:1 AS one\nARG GLOBAL\nADD --chown=7:8 payload.tar.gz /opt/\n"
        "SHELL [\"/bin/sh\", \"-e\", \"-c\"]\nRUN echo \"$GLOBAL\" > /global\n"
        "FROM busybox AS two\nRUN echo \"[$GLOBAL]\" > /global\n")
    iid = tmp_path / "iid"
    r = vmrt("build", "-q", "--target", "one", "--iidfile", str(iid), "-t", "child:1", str(ctx), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == iid.read_text() and iid.read_text().startswith("sha256:")
    r = vmrt("run", "--rm", "--isolation", "process", "child:1", "sh", "-c",
             "cat /from-trigger /opt/pkg/file /global; ls /opt")
    assert r.stdout.decode().split("\n")[:4] == ["triggered", "inside the archive", "g", "escape"], r.stderr
    r = vmrt("run", "--rm", "--isolation", "process", "child:1", "stat", "-c", "%u:%g", "/opt/pkg/file")
    assert r.stdout.decode() == "7:8\n", r.stderr
    cfg = json.loads(vmrt("image", "inspect", "-f", "{{json .Config}}", "child:1").stdout)
    assert cfg["StopSignal"] == "SIGINT" and cfg["Volumes"] == {"/data": {}} and not cfg.get("OnBuild")
    assert cfg["Shell"] == ["/bin/sh", "-e", "-c"]
    base_cfg = json.loads(vmrt("image", "inspect", "-f", "{{json .Config}}", "onbase:1").stdout)
    assert base_cfg["OnBuild"] == ["COPY a.txt /from-trigger"]

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("Dockerfile", "a.txt", "payload.tar.gz"):
            tf.add(ctx / name, name)
    r = vmrt("build", "-t", "stdin:1", "-", input=buf.getvalue(), timeout=300)
    assert r.returncode == 0, r.stderr
    r = vmrt("run", "--rm", "--isolation", "process", "stdin:1", "cat", "/global")
    assert r.stdout.decode() == "[]\n"  # a global ARG is not seen in a stage that does not declare it


def test_run_network_none(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _context(tmp_path, "FROM busybox\nRUN ls /sys/class/net > /nets\n")
    _build(vmrt, "--network", "none", "-t", "nonet:1", str(ctx))
    r = vmrt("run", "--rm", "--isolation", "process", "nonet:1", "cat", "/nets")
    assert r.stdout.decode().split() == ["lo"], r.stderr


def test_copy_follows_a_source_link_only_inside_its_root(vmrt: Vmrt, tmp_path: Path) -> None:
    """A link as COPY's source resolves inside the context or the stage (RESOLVE_IN_ROOT), as
    buildkit follows it: never to the host's file of that name."""
    ctx = _context(tmp_path, "FROM busybox AS one\nRUN echo inner > /inner && ln -s /inner /link"
                             " && ln -s /etc/shadow /leak\nFROM busybox\nCOPY --from=one /link /copied\n")
    _build(vmrt, "-t", "links:1", str(ctx))
    r = vmrt("run", "--rm", "--isolation", "process", "links:1", "cat", "/copied")
    assert r.stdout.decode() == "inner\n", r.stderr
    (ctx / "Dockerfile").write_text("FROM busybox AS one\nRUN ln -s /etc/shadow /leak\n"
                                    "FROM busybox\nCOPY --from=one /leak /x\n")
    r = vmrt("build", str(ctx), timeout=300)
    assert r.returncode == 1 and b"not found" in r.stderr  # the image has no /etc/shadow; the host's stays out
    os.symlink("/etc/shadow", ctx / "hostlink")
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY hostlink /x\n")
    r = vmrt("build", str(ctx), timeout=300)
    assert r.returncode == 1 and b"not found" in r.stderr
    vmrt.assert_clean()


def test_a_too_deep_step_layer_fails_cleanly(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _context(tmp_path, "FROM busybox\nRUN i=0; while [ $i -lt 300 ]; do mkdir d; cd d; i=$((i+1)); done\n")
    r = vmrt("build", str(ctx), timeout=300)
    assert r.returncode == 1 and b"deeper than 256 levels" in r.stderr and b"Traceback" not in r.stderr
    vmrt.assert_clean()


@pytest.mark.vm
def test_docker_build_through_the_api(request: pytest.FixtureRequest, vmrt: Vmrt, tmp_path: Path) -> None:
    """Plain `docker build` against the service (POST /build), DOCKER_BUILDKIT unset: the service's
    /_ping names no BuildKit builder, so Debian's CLI takes the classic builder unasked: the classic
    output, the tag, build args; a failing RUN is the CLI's error and leaves nothing."""
    api = request.getfixturevalue("api_for_build")
    ctx = _context(tmp_path, "FROM busybox\nARG WHO=nobody\nCOPY a.txt /a.txt\nRUN echo \"hi $WHO\" > /who\n"
                             "CMD [\"cat\", \"/who\", \"/a.txt\"]\n")
    env = {k: v for k, v in api.env().items() if k != "DOCKER_BUILDKIT"}
    r = subprocess.run([DOCKER, "-H", f"unix://{api.sock}", "build", "-t", "viaapi:1", "--build-arg", "WHO=api",
                        str(ctx)], capture_output=True, env=env, timeout=300)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode() + out
    assert "Step 4/5 : RUN" in out and "Successfully tagged viaapi:1" in out
    r = vmrt("run", "--rm", "--isolation", "process", "viaapi:1")
    assert r.stdout.decode() == "hi api\nalpha\n", r.stderr
    (ctx / "Dockerfile").write_text("FROM busybox\nRUN exit 7\n")
    r = subprocess.run([DOCKER, "-H", f"unix://{api.sock}", "build", str(ctx)], capture_output=True, env=env,
                       timeout=300)
    assert r.returncode != 0 and b"returned a non-zero code: 7" in r.stderr, r.stderr
    assert vmrt("ps", "-aq").stdout.decode().split() == []
    r = api.docker("system", "df")
    cache_row = next(ln for ln in r.stdout.decode().splitlines() if ln.startswith("Build Cache"))
    assert cache_row.split()[2] != "0", r.stdout.decode()  # TOTAL: the steps' layers
    r = subprocess.run([DOCKER, "-H", f"unix://{api.sock}", "builder", "prune", "-f"], capture_output=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and b"Total reclaimed space" in r.stdout, r.stderr


def test_compose_build_through_the_api(request: pytest.FixtureRequest, vmrt: Vmrt, tmp_path: Path) -> None:
    """Debian's docker-compose `build:` against the service (the Docker SDK's POST /build): the
    service's image is built, tagged as its `image:` and run by `up`; `down` leaves nothing."""
    api = request.getfixturevalue("api_for_build")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "Dockerfile").write_text("FROM busybox\nRUN echo built-by-compose > /msg\nCMD [\"cat\", \"/msg\"]\n")
    (proj / "docker-compose.yml").write_text('version: "2.4"\nservices:\n  app:\n    build: .\n'
                                             '    image: composebuilt:1\n    isolation: process\n'
                                             '    network_mode: none\n')
    r = api.compose(proj, "build")
    assert r.returncode == 0 and b"Successfully tagged composebuilt:1" in r.stdout, r.stdout + r.stderr
    r = api.compose(proj, "up", "--abort-on-container-exit")
    assert r.returncode == 0 and b"built-by-compose" in r.stdout, r.stdout + r.stderr
    assert api.compose(proj, "down").returncode == 0
    assert vmrt("ps", "-aq").stdout.decode().split() == []
    assert vmrt("rmi", "composebuilt:1").returncode == 0


def test_concurrent_builds_do_not_wait_for_each_other(vmrt: Vmrt, tmp_path: Path) -> None:
    slow = _context(tmp_path / "slow", "FROM busybox\nRUN echo started && sleep 8\n")
    quick = _context(tmp_path / "quick", "FROM busybox\nENV Q=1\nRUN echo quick > /q\n")
    p = vmrt.popen("build", "--no-cache", "-t", "slow:1", str(slow))
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith(b"started"):
            break
    t0 = time.monotonic()
    _build(vmrt, "--no-cache", "-t", "quick:1", str(quick))
    assert time.monotonic() - t0 < 6  # not held up until the slow build ends
    assert p.wait(60) == 0
    assert vmrt("run", "--rm", "--isolation", "process", "quick:1", "cat", "/q").stdout == b"quick\n"
    vmrt("image", "prune", "-f")  # the quick build's step images, left while the slow one held the store
    assert "<none>" not in vmrt("images").stdout.decode()
    vmrt.assert_clean()


def test_builder_prune_drops_the_cache_of_removed_images(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _context(tmp_path, "FROM busybox\nRUN head -c 300000 /dev/urandom > /blob\n")
    _build(vmrt, "-t", "pruned:1", str(ctx))
    assert vmrt("rmi", "pruned:1").returncode == 0
    r = vmrt("builder", "prune", "-f")
    assert r.returncode == 0 and "Deleted build cache objects:" in r.stdout.decode(), r.stderr
    assert "Total reclaimed space: " in r.stdout.decode()
    assert "Using cache" not in _build(vmrt, "-t", "pruned:1", str(ctx))
    assert "Using cache" in _build(vmrt, "-t", "pruned:1", str(ctx))
    r = vmrt("builder", "prune", "-f", "--all")
    assert "Using cache" not in _build(vmrt, "-t", "pruned:1", str(ctx))


def test_add_of_a_url_with_and_without_checksum(vmrt: Vmrt, tmp_path: Path) -> None:
    import hashlib
    import http.server
    import threading

    served = tmp_path / "www"
    served.mkdir()
    (served / "data.txt").write_bytes(b"downloaded\n")
    digest = "sha256:" + hashlib.sha256(b"downloaded\n").hexdigest()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(served), **kw)  # type: ignore[arg-type]

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/data.txt"
        ctx = _context(tmp_path, f"FROM busybox\nADD --checksum={digest} {url} /dl/\nADD {url} /named\n")
        _build(vmrt, "-t", "url:1", str(ctx))
        r = vmrt("run", "--rm", "--isolation", "process", "url:1", "sh", "-c",
                 "cat /dl/data.txt /named; stat -c %a /named")
        assert r.stdout.decode() == "downloaded\ndownloaded\n600\n", r.stderr
        bad = "sha256:" + "0" * 64
        (ctx / "Dockerfile").write_text(f"FROM busybox\nADD --checksum={bad} {url} /x\n")
        r = vmrt("build", str(ctx), timeout=120)
        assert r.returncode == 1 and b"Dockerfile:2: ADD: digest mismatch" in r.stderr, r.stderr
        (ctx / "Dockerfile").write_text(f"FROM busybox\nCOPY {url} /x\n")
        assert vmrt("build", str(ctx), timeout=120).returncode == 1
    finally:
        srv.shutdown()
        srv.server_close()
    vmrt.assert_clean()


def test_copy_keeps_the_images_parent_directories(vmrt: Vmrt, tmp_path: Path) -> None:
    """COPY under directories the image has (/tmp 1777, /home/vmrt vmrt's, a RUN-made 0750 one):
    the layer carries each parent as the image has it (a parent left out would be unpacked 0700
    root's over the image's, and a non-root user could not enter it: examples/tomcat's USER)."""
    ctx = _context(tmp_path, "FROM busybox\nRUN mkdir -p /srv/www && chown vmrt:vmrt /srv/www && chmod 750 /srv/www\n"
                             "COPY a.txt /tmp/deep/\nCOPY a.txt /home/vmrt/x/\nCOPY a.txt /srv/www/site/\n")
    _build(vmrt, "-t", "parents:1", str(ctx))
    try:
        entries = _layer_entries(vmrt, "parents:1", -1)
        assert (entries["srv/www"].mode, entries["srv/www"].uid, entries["srv/www"].gid) == (0o750, 1000, 1000)
        assert (entries["srv"].mode, entries["srv"].uid) == (0o755, 0)
        r = vmrt("run", "--rm", "--isolation", "process", "-u", "vmrt", "parents:1", "sh", "-c",
                 "stat -c '%a %U %n' /tmp /home/vmrt /srv/www; cat /srv/www/site/a.txt /home/vmrt/x/a.txt; "
                 "touch /tmp/ok && echo writable")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().splitlines() == ["1777 root /tmp", "755 vmrt /home/vmrt", "750 vmrt /srv/www",
                                                  "alpha", "alpha", "writable"], r.stdout
    finally:
        vmrt("rmi", "-f", "parents:1")
