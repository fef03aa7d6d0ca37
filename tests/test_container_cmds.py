"""exec, inspect, rename, top, stats, cp and container prune, both modes (cp of stopped ones too)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from support import Vmrt

MODES = ["process", pytest.param("vm", marks=pytest.mark.vm)]


@pytest.fixture
def running(vmrt: Vmrt, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    mode = request.param
    r = vmrt("run", "-d", f"--isolation={mode}", "-e", "FOO=bar", "-w", "/tmp", "busybox",
             "sh", "-c", "mkdir -p /data; echo hi > /data/f; echo $$ > /tmp/main.pid; sleep 120")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    yield vmrt, cid, mode
    assert vmrt("rm", "-f", cid).returncode == 0
    vmrt.assert_clean()


def out(r: subprocess.CompletedProcess[bytes]) -> str:
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


@pytest.mark.parametrize("running", MODES, indirect=True)
def test_exec_runs_inside_the_container(running) -> None:  # type: ignore[no-untyped-def]
    v, cid, mode = running
    # the container's own files and process, its env and working directory
    assert out(v("exec", cid, "sh", "-c", "cat /tmp/main.pid")).strip() == "1"
    assert out(v("exec", cid, "sh", "-c", "echo $FOO $(pwd)")) == "bar /tmp\n"
    kernel = out(v("exec", cid, "uname", "-r")).strip()
    assert (kernel == os.uname().release) == (mode == "process")  # a VM's exec runs on the guest kernel
    assert out(v("exec", "-e", "FOO=baz", "-w", "/", "-u", "1000:1000", cid, "sh", "-c",
                 "echo $FOO $(pwd) $(id -u):$(id -g)")) == "baz / 1000:1000\n"
    assert v("exec", cid, "sh", "-c", "exit 3").returncode == 3
    r = v("exec", cid, "no-such-command")
    assert r.returncode == 127 and len(r.stderr.decode().strip().splitlines()) == 1
    assert v("exec", cid, "/etc/passwd").returncode == 126
    r = v("exec", "-i", cid, "cat", input=b"through stdin\n")
    assert r.returncode == 0 and r.stdout == b"through stdin\n"
    r = v("exec", cid, "sh", "-c", "echo out; echo err >&2")
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")
    assert v("exec", "-d", cid, "sleep", "30").returncode == 0
    assert "sleep 30" in out(v("exec", cid, "ps"))


def test_exec_into_a_stopped_container_is_refused(vmrt: Vmrt) -> None:
    r = vmrt("run", "--isolation=process", "--name", "stopped-one", "busybox", "true")
    assert r.returncode == 0
    r = vmrt("exec", "stopped-one", "true")
    assert r.returncode == 125 and b"is not running" in r.stderr
    assert vmrt("rm", "stopped-one").returncode == 0


@pytest.mark.parametrize("running", MODES, indirect=True)
def test_inspect_rename_top_stats(running) -> None:  # type: ignore[no-untyped-def]
    v, cid, mode = running
    doc = json.loads(out(v("inspect", cid)))[0]
    assert doc["Id"] == cid and doc["State"]["Running"] and doc["State"]["Status"] == "running"
    assert doc["Isolation"] == mode and doc["HostConfig"]["Isolation"] == mode
    assert "FOO=bar" in doc["Config"]["Env"] and doc["Config"]["WorkingDir"] == "/tmp"
    assert out(v("inspect", "--format", "{{.State.Status}} {{.RestartCount}}", cid)) == "running 0\n"
    assert out(v("rename", cid, f"renamed-{mode}")) == ""
    assert out(v("ps", "--format", "{{.Names}}", "--filter", f"id={cid}")).strip() == f"renamed-{mode}"
    assert "sleep 120" in out(v("top", f"renamed-{mode}"))
    row = json.loads(out(v("stats", "--no-stream", "--format", "json", cid)))
    assert row["Isolation"] == mode and row["Name"] == f"renamed-{mode}"
    used = row["MemUsage"].split(" / ")[0]
    assert used != "0B" and used != "--"
    if mode == "vm":  # the host's real cost (QEMU + virtiofsd + monitor) beside the guest's view
        assert row["PIDs"] == 3 and row["GuestMem"] != "--"
    r = v("inspect", "no-such-thing")
    assert r.returncode == 1 and b"No such object" in r.stderr


@pytest.mark.parametrize("running", MODES, indirect=True)
def test_cp_both_ways(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    v, cid, mode = running
    assert out(v("cp", f"{cid}:/data", str(tmp_path))) == ""
    assert (tmp_path / "data" / "f").read_text() == "hi\n"
    assert out(v("cp", f"{cid}:/data/f", str(tmp_path / "g"))) == ""
    assert (tmp_path / "g").read_text() == "hi\n"
    (tmp_path / "up").write_text("up\n")
    assert out(v("cp", str(tmp_path / "up"), f"{cid}:/data/")) == ""
    assert out(v("cp", str(tmp_path / "up"), f"{cid}:/data/renamed")) == ""
    assert out(v("exec", cid, "cat", "/data/up", "/data/renamed")) == "up\nup\n"
    r = v("cp", f"{cid}:/nope", str(tmp_path))
    assert r.returncode == 125 and len(r.stderr.decode().strip().splitlines()) == 1


def _tar(*entries: tuple[str, bytes, str]) -> bytes:
    """(name, kind, data or link target): kind b"d" dir, b"l" symlink, b"h" hard link, b"f" file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mode = 0o755
            if kind in (b"l", b"h"):
                ti.type, ti.linkname = tarfile.SYMTYPE if kind == b"l" else tarfile.LNKTYPE, data
                tf.addfile(ti)
            elif kind == b"d":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data.encode())
                tf.addfile(ti, io.BytesIO(data.encode()))
    return buf.getvalue()


def test_cp_out_keeps_links_and_writes_through_none(vmrt: Vmrt, tmp_path: Path) -> None:
    """`cp C:DIR HOST` copies links as links (absolute ones too, as Debian's /etc/localtime), as
    docker cp does; a lying tar in the container that writes through a link, sets a mode through
    one, or hard-links through one is refused in one line, nothing lands outside, and the copy
    ends at once though the tar still writes (it once waited forever on the full pipe)."""
    cid = out(vmrt("run", "-d", "--isolation=process", "busybox", "sh", "-c",
                   "mkdir /data && echo hi > /data/f && ln -s /usr/share/zoneinfo/UTC /data/localtime && "
                   "ln -s f /data/rel && sleep 300")).strip()
    dest = tmp_path / "dest"
    dest.mkdir()
    assert out(vmrt("cp", f"{cid}:/data", str(dest))) == ""
    assert os.readlink(dest / "data" / "localtime") == "/usr/share/zoneinfo/UTC"
    assert (dest / "data" / "rel").read_text() == "hi\n"
    outside = tmp_path / "outside"
    outside.mkdir()
    filler = "x" * (1 << 20)  # after the refused entry: more than a pipe holds
    lies = {
        "write": _tar(("data", b"d", ""), ("data/l", b"l", str(outside)), ("data/l/pwned", b"f", "gotcha"),
                      ("data/big", b"f", filler)),
        "mode": _tar(("data", b"d", ""), ("data/l", b"l", str(outside)), ("data/l", b"d", ""),
                     ("data/big", b"f", filler)),
        "link": _tar(("data", b"d", ""), ("data/l", b"l", str(outside)), ("data/h", b"h", "data/l/x"),
                     ("data/big", b"f", filler)),
    }
    (outside / "x").write_text("secret")
    for kind, lie in lies.items():
        assert vmrt("exec", "-i", cid, "sh", "-c", "cat > /lie.tar", input=lie).returncode == 0
        assert vmrt("exec", cid, "sh", "-c", "mkdir -p /usr/local/bin && printf '#!/bin/sh\\nexec cat /lie.tar\\n' "
                    "> /usr/local/bin/tar && chmod 755 /usr/local/bin/tar").returncode == 0
        got = tmp_path / f"got-{kind}"
        got.mkdir()
        r = vmrt("cp", f"{cid}:/data", str(got), timeout=60)
        assert r.returncode != 0 and len(r.stderr.decode().strip().splitlines()) == 1, (kind, r.stderr)
        assert b"Traceback" not in r.stderr and sorted(os.listdir(outside)) == ["x"], kind
        assert os.listdir(got) == [], kind
    assert vmrt("rm", "-f", cid).returncode == 0
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_cp_to_a_created_and_from_a_stopped_container(vmrt: Vmrt, tmp_path: Path, mode: str) -> None:
    """`vmrt cp` works whether the container runs or not (a tool run over its files, in its
    isolation); the container's record stays as it was."""
    cid = out(vmrt("create", f"--isolation={mode}", "busybox", "sh", "-c", "cat /tmp/in; echo out > /tmp/out")).strip()
    (tmp_path / "in").write_text("in\n")
    assert out(vmrt("cp", str(tmp_path / "in"), f"{cid}:/tmp/in")) == ""
    assert out(vmrt("inspect", "--format", "{{.State.Status}}", cid)) == "created\n"
    r = vmrt("start", "-a", cid)
    assert (r.returncode, r.stdout) == (0, b"in\n"), r.stderr
    assert out(vmrt("cp", f"{cid}:/tmp/out", str(tmp_path / "got"))) == ""
    assert (tmp_path / "got").read_text() == "out\n"
    assert out(vmrt("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", cid)) == "exited 0\n"
    assert vmrt("rm", cid).returncode == 0
    vmrt.assert_clean()


def test_a_container_being_copied_is_neither_removed_nor_started(vmrt: Vmrt, tmp_path: Path) -> None:
    """While a copy's tool run holds a stopped container (here: its tar still reads the upload),
    `rm` and `start` refuse it in one line; once the copy ended both work."""
    cid = out(vmrt("create", "--isolation=process", "busybox", "cat", "/tmp/up")).strip()
    r, w = os.pipe()
    code = ("import sys; from vmrt import config, execs; sys.exit(execs.run_tool(config.load(), sys.argv[1], "
            "['tar', 'xf', '-', '-C', '/tmp'], (0, 1, 2), stdin=True))")
    copy = subprocess.Popen([sys.executable, "-c", code, cid], stdin=r, env=vmrt.env)
    os.close(r)
    try:
        marker = vmrt.run_root / "containers" / cid / "tool.pid"
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
        r1 = vmrt("rm", "-f", cid)
        assert r1.returncode != 0 and b"in use by a copy" in r1.stderr and len(r1.stderr.splitlines()) == 1, r1
        r2 = vmrt("start", "-a", cid)
        assert r2.returncode != 0 and b"already running or being started" in r2.stderr, r2
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tf:
            info = tarfile.TarInfo("up")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"up\n"))
        os.write(w, data.getvalue())
    finally:
        os.close(w)
        assert copy.wait(60) == 0
    r3 = vmrt("start", "-a", cid)
    assert (r3.returncode, r3.stdout) == (0, b"up\n"), r3
    assert vmrt("rm", cid).returncode == 0
    vmrt.assert_clean()


def test_container_prune_removes_only_stopped(vmrt: Vmrt) -> None:
    assert vmrt("run", "--isolation=process", "--name", "to-prune", "busybox", "true").returncode == 0
    r = vmrt("run", "-d", "--isolation=process", "--name", "kept-running", "busybox", "sleep", "60")
    assert r.returncode == 0
    pruned = out(vmrt("container", "prune", "-f"))
    assert "Total reclaimed containers:" in pruned
    names = out(vmrt("ps", "-a", "--format", "{{.Names}}")).split()
    assert "to-prune" not in names and "kept-running" in names
    assert vmrt("rm", "-f", "kept-running").returncode == 0
    vmrt.assert_clean()
