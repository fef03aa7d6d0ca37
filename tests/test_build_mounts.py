"""``RUN --mount=type=cache|bind|tmpfs`` in ``vmrt build``, in both isolations.

Cache mounts live under ``<root>/builder/mounts`` (root's, never in a layer, gone with
``vmrt builder prune``); a bind's source is resolved inside the context (``.dockerignore``
applied, a link never leads out of it) or an earlier stage, read-only unless ``rw``, whose
writes are dropped; the mount points a step made are not left in its layer. The option parser
is played by an attacker without root.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt, one_line_error

from vmrt.errors import UsageError
from vmrt.images import dockerfile as df
from vmrt.images.store import Store

MADE = ("mnt:1", "mnt:vm")


@pytest.fixture
def _forget(vmrt: Vmrt) -> Iterator[None]:
    yield
    tags = set(vmrt("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.decode().split())
    mine = [t for t in MADE if t in tags]
    if mine:
        vmrt("rmi", "-f", *mine)
    vmrt("builder", "prune", "-a", "-f")


def _layer_names(v: Vmrt, ref: str) -> list[set[str]]:
    store = Store(v.root)
    try:
        img = store.get(ref)
        out = []
        for d in img.layers:
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(store.read_blob(d["digest"])))) as tf:
                out.append({m.name for m in tf.getmembers()})
        return out
    finally:
        store.close()


# --- the options, no root ----------------------------------------------------------------------------
def test_mount_options_parse_as_buildkits_and_refuse_the_rest() -> None:
    ms = df.run_mounts(("--mount=type=cache,target=.cache,id=pip,sharing=locked,mode=0700,uid=5,gid=6",
                        "--mount=target=/src,from=first,source=app,rw", "--network=none",
                        "--mount=type=tmpfs,dst=/t,size=4m", "--mount=type=bind,src=$D,dst=/d,ro"),
                       {"D": "sub"}, "/work")
    assert [m.type for m in ms] == ["cache", "bind", "tmpfs", "bind"]
    cache, bind, tmpfs, ro = ms
    assert (cache.target, cache.id, cache.sharing, cache.mode, cache.uid, cache.gid, cache.readonly) == \
        ("/work/.cache", "pip", "locked", 0o700, 5, 6, False)
    assert (bind.source, bind.from_, bind.readonly) == ("app", "first", False)
    assert tmpfs.size == 4 << 20 and (ro.source, ro.readonly) == ("sub", True)
    assert df.run_mounts(("--mount=type=cache,target=/x",), {}, "/")[0].id == "/x"
    for spec, why in [("type=secret,target=/x", "unsupported mount type 'secret'"),
                      ("type=ssh", "unsupported mount type 'ssh'"),
                      ("type=cache,target=/x,bogus=1", "unknown option 'bogus' for type=cache"),
                      ("type=tmpfs,target=/x,source=a", "unknown option 'source' for type=tmpfs"),
                      ("type=cache", "needs a target"), ("target=/", "cannot be /"),
                      ("type=cache,target=/x,sharing=sometimes", "sharing="),
                      ("type=cache,target=/x,mode=999", "not an octal mode"),
                      ("type=cache,target=/x,uid=-1", "uid='-1' is not a number"),
                      ("type=cache,target=/x,uid=4294967295", "is not a number"),
                      ("target=/x,rw=maybe", "not a boolean"), ("target=/x,,", "an empty field"),
                      ("target=/x,target=/y", "target given twice"), ("type=tmpfs,target=/x,size=lots", "size="),
                      ("target=/x" + ",ro" * 5000, "longer than 8192")]:
        with pytest.raises(UsageError) as e:
            df.run_mounts((f"--mount={spec}",), {}, "/")
        assert why in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300, (spec, str(e.value))
    with pytest.raises(UsageError, match="the target of two mounts"):
        df.run_mounts(("--mount=type=tmpfs,target=/x", "--mount=type=cache,target=/x/"), {}, "/")


# --- process isolation --------------------------------------------------------------------------------------
@pytest.mark.usefixtures("_forget")
def test_cache_bind_and_tmpfs_mounts_in_process_steps(vmrt: Vmrt, tmp_path: Path) -> None:
    """A cache mount kept across steps and builds (mode and owner as asked, in no layer); a bind of
    the context read-only, with .dockerignore'd files absent and a link out of the context
    resolved inside it; a rw bind from an earlier stage whose writes never reach the stage or the
    layer; a tmpfs; the mount points left out of the layers; the cache gone after a prune."""
    secret = tmp_path / "host-secret"
    secret.write_text("HOST-ONLY\n")
    ctx = tmp_path / "ctx"
    (ctx / "sub").mkdir(parents=True)
    (ctx / "sub" / "f").write_text("sub file\n")
    (ctx / "sub" / "ignored.txt").write_text("IGNORED\n")
    (ctx / "sub" / "out").symlink_to(secret)
    (ctx / "etc").mkdir()
    (ctx / "etc" / "marker").write_text("in the context\n")
    (ctx / "etclink").symlink_to("/etc")  # resolved in the context, never the host's /etc
    (ctx / ".dockerignore").write_text("sub/ignored.txt\n")
    (ctx / "Dockerfile").write_text(
        "FROM busybox AS first\nRUN mkdir /app && echo from-first > /app/f\n"
        "FROM busybox\n"
        "RUN --mount=type=cache,target=/var/cache/x,id=c1,mode=0750,uid=7,gid=8 "
        "stat -c '%a %u %g' /var/cache/x > /cache-stat; echo run1 >> /var/cache/x/log\n"
        "RUN --mount=type=cache,target=/var/cache/x,id=c1,sharing=locked cat /var/cache/x/log > /cache-log\n"
        "RUN --mount=target=/ctx --mount=target=/e,source=etclink ls /ctx/sub > /ctx-ls; cat /ctx/sub/out > /out 2>&1; "
        "(touch /ctx/new 2>/dev/null && echo writable || echo read-only) > /ctx-ro; ls /e > /esc\n"
        "RUN --mount=target=/st,from=first,source=/app,rw echo changed > /st/f && echo new > /st/g && "
        "cat /st/f /st/g > /st-seen && grep ' /st ' /proc/self/mountinfo | grep -o 'upperdir=[^,]*' > /st-upper\n"
        "RUN --mount=type=tmpfs,target=/scratch/t,size=1m echo hi > /scratch/t/x && "
        "grep ' /scratch/t ' /proc/mounts | cut -d' ' -f3 > /tmpfs-type\n")
    r = vmrt("build", "-t", "mnt:1", str(ctx), timeout=600)
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    script = ("cat /cache-stat /cache-log /ctx-ls /ctx-ro /st-seen /tmpfs-type /out /esc; "
              "ls /var/cache/x /ctx /st /scratch /e 2>&1 | grep -c 'No such file'")
    out = vmrt("run", "--rm", "mnt:1", "sh", "-c", script, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().split("\n")
    assert lines[:10] == ["750 7 8", "run1", "f", "out", "read-only", "changed", "new", "tmpfs",
                          "cat: can't open '/ctx/sub/out': No such file or directory", "marker"], lines
    assert "HOST-ONLY" not in out.stdout.decode()
    assert lines[-2] == "5", lines  # no mount point stayed in the image
    names = set().union(*_layer_names(vmrt, "mnt:1")[1:])  # the steps' layers
    stubs = [n for n in names if n.split("/")[0] in ("ctx", "st", "e", "scratch") or n.startswith("var/cache/x")]
    assert not stubs, stubs
    caches = list((vmrt.root / "builder" / "mounts").iterdir())
    cache_dir = next(p for p in caches if p.is_dir())
    assert stat.S_IMODE((vmrt.root / "builder" / "mounts").stat().st_mode) == 0o700
    assert (cache_dir / "log").read_text() == "run1\n"
    # the cache lives on: a --no-cache rebuild of the first step appends to it
    r = vmrt("build", "--no-cache", "-q", "-t", "mnt:1", str(ctx), timeout=600)
    assert r.returncode == 0, r.stderr
    assert (cache_dir / "log").read_text() == "run1\nrun1\n"
    # first stage's files untouched by the rw bind
    out = vmrt("run", "--rm", "mnt:1", "cat", "/st-seen", "/st-upper", timeout=120)
    staging = vmrt.root / "builder" / "staging"
    assert out.stdout.decode().startswith(f"changed\nnew\nupperdir={staging}/mnt-"), out.stdout  # disk, not RAM
    assert not list((vmrt.run_root / "builds").iterdir()) and not list(staging.iterdir())
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700 and staging.stat().st_uid == 0
    lock = cache_dir.with_suffix(".lock")
    lock_ino = lock.stat().st_ino
    df_rows = vmrt("system", "df", "-v").stdout.decode().splitlines()
    assert any(row.split()[:2] == [cache_dir.name[:12], "exec.cachemount"] for row in df_rows), df_rows
    r = vmrt("builder", "prune", "-a", "-f")
    assert r.returncode == 0 and b"cache-mount:" in r.stdout, r.stdout
    assert not cache_dir.exists()
    assert lock.stat().st_ino == lock_ino  # never unlinked: a build waiting on it locks the same file as the next
    assert "exec.cachemount" not in vmrt("system", "df", "-v").stdout.decode()
    vmrt.assert_clean()


@pytest.mark.usefixtures("_forget")
def test_cache_sharing_modes_follow_the_lock(vmrt: Vmrt, tmp_path: Path) -> None:
    """While something holds the cache's lock exclusively (as a ``locked`` step would): a
    ``private`` step gets a fresh directory of its own at once, a ``locked`` one waits for it and
    then sees the shared content."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()

    def dockerfile(sharing: str, cmd: str) -> Path:
        (ctx / "Dockerfile").write_text(f"FROM busybox\nRUN --mount=type=cache,target=/c,id=shr,sharing={sharing} "
                                        f"{cmd}\n")
        return ctx
    r = vmrt("build", "-q", str(dockerfile("shared", "echo > /c/mark")), timeout=300)
    assert r.returncode == 0, r.stderr
    made = [r.stdout.decode().split()[-1]]
    mounts = vmrt.root / "builder" / "mounts"
    name = hashlib.sha256(b"shr").hexdigest()[:32]
    try:
        with open(mounts / f"{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            r = vmrt("build", "-q", str(dockerfile("private", "ls /c > /seen; touch /c/p")), timeout=300)
            assert r.returncode == 0, r.stderr
            made.append(r.stdout.decode().split()[-1])
            assert not (mounts / name / "p").exists()  # it wrote elsewhere
            waiting = vmrt.popen("build", "-q", str(dockerfile("locked", "ls /c > /seen")))
            time.sleep(3)
            assert waiting.poll() is None, waiting.communicate()
        out, err = waiting.communicate(timeout=300)
        assert waiting.returncode == 0, err
        made.append(out.decode().split()[-1])
        assert vmrt("run", "--rm", made[1], "cat", "/seen").stdout == b""
        assert vmrt("run", "--rm", made[2], "cat", "/seen").stdout == b"mark\n"
        assert not list((vmrt.root / "builder" / "staging").iterdir())  # the private dir went with its step
    finally:
        vmrt("rmi", *made)
    vmrt.assert_clean()


@pytest.mark.parametrize(("line", "why"), [
    ("RUN --mount=type=secret,id=x true", "Dockerfile:2: RUN: --mount: unsupported mount type 'secret'"),
    ("RUN --mount=type=cache,target=/x,sharing=no true", "Dockerfile:2: RUN: --mount: sharing='no'"),
    ("RUN --mount=target=/x,source=missing true", "Dockerfile:2: RUN: --mount: source /missing: No such file"),
    ("RUN --mount=target=/x,source=secret.txt true", "excluded by .dockerignore"),
    ("RUN --mount=target=/x,source=../../../../etc true", "--mount: source /etc: No such file"),  # in the context
    ("RUN --mount=target=/x,from=127.0.0.1:9/nostage,source=/ true", "Dockerfile:2: RUN:"),  # loopback only
    ("RUN --mount=target=/x,from=5 true", "invalid from flag value 5"),
    ("RUN --bogus=1 true", "Dockerfile:2: unknown flag: --bogus for RUN"),
])
def test_bad_mounts_are_one_line_naming_the_dockerfile_line(vmrt: Vmrt, tmp_path: Path, line: str, why: str) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "secret.txt").write_text("x\n")
    (ctx / ".dockerignore").write_text("secret.txt\n")
    (ctx / "Dockerfile").write_text(f"FROM busybox\n{line}\n")
    before = vmrt("images", "-q").stdout
    r = vmrt("build", str(ctx), timeout=300)
    assert r.returncode == 1, r.stderr
    assert why in one_line_error(r.stderr)
    assert vmrt("images", "-q").stdout == before
    assert not list((vmrt.run_root / "builds").iterdir()) if (vmrt.run_root / "builds").is_dir() else True
    staging = vmrt.root / "builder" / "staging"
    assert not list(staging.iterdir()) if staging.is_dir() else True
    vmrt.assert_clean()


# --- VM isolation ---------------------------------------------------------------------------------------------
@pytest.mark.vm
@pytest.mark.usefixtures("_forget")
def test_mounts_in_a_vm_step(vmrt: Vmrt, tmp_path: Path) -> None:
    """The same mounts reach a VM step as virtio-fs shares and a guest tmpfs: the cache's file is
    on the host after the step, the context is read-only and filtered, the tmpfs is the guest's;
    no mount point and no cache content is in the layer."""
    _vm_mounts(vmrt, tmp_path, [])


@pytest.mark.vm
@pytest.mark.usefixtures("_forget")
def test_mounts_in_a_vm_step_restored_from_a_snapshot(vmrt: Vmrt, snap: Path, tmp_path: Path) -> None:
    """As above, the step's VM restored from the default shape's snapshot (the default path of a
    VM build, where a snapshot of the step's shape exists; the clone's share is 9p): the cache's
    write reaches the host through the clone's volume share too."""
    _vm_mounts(vmrt, tmp_path, [], env={"VMRT_SNAPSHOT": "manual"})


def _vm_mounts(vmrt: Vmrt, tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "sub").mkdir(parents=True)
    (ctx / "sub" / "f").write_text("sub file\n")
    (ctx / "sub" / "ignored.txt").write_text("IGNORED\n")
    (ctx / ".dockerignore").write_text("sub/ignored.txt\n")
    (ctx / "Dockerfile").write_text(
        "FROM busybox\n"
        "RUN --mount=type=cache,target=/c,id=vmc --mount=target=/ctx,source=sub --mount=type=tmpfs,target=/t "
        "uname -r > /c/kernel; cat /c/kernel > /kernel; ls /ctx > /ctx-ls; "
        "(touch /ctx/new 2>/dev/null && echo writable || echo read-only) > /ctx-ro; "
        "grep ' /t ' /proc/mounts | cut -d' ' -f3 > /t-type\n")
    r = vmrt("build", "--isolation", "vm", *args, "-t", "mnt:vm", str(ctx), env=env, timeout=900)
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    out = vmrt("run", "--rm", "--isolation", "process", "mnt:vm", "sh", "-c",
               "cat /ctx-ls /ctx-ro /t-type; ls /c /ctx /t 2>&1 | grep -c 'No such file'", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == ["f", "read-only", "tmpfs", "3"]
    cache_dir = next(p for p in (vmrt.root / "builder" / "mounts").iterdir() if p.is_dir())
    kernel = (cache_dir / "kernel").read_text()
    assert kernel.strip() and kernel == vmrt("run", "--rm", "mnt:vm", "cat", "/kernel").stdout.decode()
    assert kernel.strip() != os.uname().release  # the step ran under the guest's kernel
    names = set().union(*_layer_names(vmrt, "mnt:vm")[1:])
    assert not any(n in ("c", "ctx", "t") or n.startswith(("c/", "ctx/", "t/")) for n in names), names
    vmrt.assert_clean()
