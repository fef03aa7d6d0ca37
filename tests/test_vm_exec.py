"""exec_in_vm: extra processes inside a running VM container, through the guest agent's exec ports.

One container runs for the whole module (its main process waits for /tmp/stop,
then exits 7); each test execs into it. The last test stops it and checks that
nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt, audit, track

from vmrt.agent.exec_client import exec_in_vm
from vmrt.errors import ContainerExecError, VmrtError
from vmrt.vm.qemu import EXEC_PORTS

pytestmark = pytest.mark.vm

ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]
MAIN = "echo $$ > /tmp/main.pid; while [ ! -e /tmp/stop ]; do sleep 1; done; exit 7"


class Box:
    def __init__(self, vmrt: Vmrt, proc: subprocess.Popen[bytes], run_dir: Path) -> None:
        self.vmrt, self.proc, self.run_dir = vmrt, proc, run_dir

    def ex(self, *args: str, input: bytes | None = None, env: list[str] | None = None,
           cwd: str | None = None, uid: int = 0, gid: int = 0, tty: tuple[int, int] | None = None,
           detach: bool = False) -> tuple[int, bytes, bytes]:
        with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as out, \
                tempfile.TemporaryFile() as err:
            inp.write(input or b"")
            inp.seek(0)
            rc = exec_in_vm(self.run_dir, list(args), env=ENV if env is None else env, cwd=cwd, uid=uid,
                            gid=gid, groups=[], tty=tty, interactive=input is not None,
                            stdin_fd=inp.fileno(), stdout_fd=out.fileno(), stderr_fd=err.fileno(),
                            detach=detach)
            out.seek(0)
            err.seek(0)
            return rc, out.read(), err.read()

    def client(self, *args: str) -> subprocess.Popen[bytes]:
        """exec_in_vm in a process of its own (for signals and kills)."""
        code = ("import sys; from pathlib import Path; from vmrt.agent.exec_client import exec_in_vm; "
                f"sys.exit(exec_in_vm(Path({str(self.run_dir)!r}), {list(args)!r}, env={ENV!r}, cwd=None, "
                "uid=0, gid=0, groups=[], tty=None, interactive=False))")
        return track(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, cwd=str(Path(__file__).parent.parent)))

    def ps(self) -> str:
        rc, out, _ = self.ex("ps", "-o", "pid,args")
        assert rc == 0
        return out.decode()

    def wait_for(self, what: str, present: bool, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            listing = self.ps()
            if (what in listing) == present or time.monotonic() > deadline:
                return listing
            time.sleep(0.3)


@pytest.fixture(scope="module")
def box(vmrt_session: Vmrt) -> Iterator[Box]:
    vmrt = vmrt_session
    vmrt.assert_clean()
    proc = vmrt.popen("run", "--rm", "--isolation=vm", "busybox", "sh", "-c", MAIN)
    try:
        deadline = time.monotonic() + 120
        socks: list[Path] = []
        while not socks:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no exec socket appeared"
            socks = list((vmrt.run_root / "containers").glob("*/exec-0.sock"))
            time.sleep(0.1)
        b = Box(vmrt, proc, socks[0].parent)
        while b.ex("cat", "/tmp/main.pid")[0] != 0:  # the main process has started
            assert time.monotonic() < deadline, "the container never wrote /tmp/main.pid"
            time.sleep(0.2)
        yield b
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        audit(vmrt, failed=False, timeout=15)  # a leftover is swept away, then fails the test


def test_exec_runs_inside_the_container_vm(box: Box) -> None:
    rc, out, _ = box.ex("cat", "/tmp/main.pid")
    assert (rc, out) == (0, b"1\n")  # the container's file; its main process is PID 1 there
    rc, out, _ = box.ex("uname", "-r")
    assert rc == 0 and out.strip() and out.strip().decode() != os.uname().release
    # same PID namespace: the main process is visible, as PID 1
    assert "while [ ! -e /tmp/stop ]" in box.ps()
    # same cgroup as the container
    rc, out, _ = box.ex("cat", "/proc/self/cgroup")
    assert rc == 0 and out.strip().endswith(b"/vmrt"), out


def test_exit_codes(box: Box) -> None:
    assert box.ex("true")[0] == 0
    assert box.ex("sh", "-c", "exit 3")[0] == 3
    with pytest.raises(ContainerExecError, match="executable file not found") as e:
        box.ex("no-such-command")
    assert e.value.exit_code == 127
    with pytest.raises(ContainerExecError, match="permission denied") as e:
        box.ex("/etc/passwd")
    assert e.value.exit_code == 126
    with pytest.raises(ContainerExecError, match="no such file") as e:
        box.ex("/no/such/binary")
    assert e.value.exit_code == 127


def test_stdin_stdout_stderr(box: Box) -> None:
    data = b"hello\n" + bytes(range(256)) * 800  # more than one frame
    rc, out, err = box.ex("cat", input=data)
    assert (rc, out, err) == (0, data, b"")
    rc, out, err = box.ex("sh", "-c", "echo out; echo err >&2; exit 5")
    assert (rc, out, err) == (5, b"out\n", b"err\n")
    rc, out, _ = box.ex("cat")  # not interactive: stdin is /dev/null
    assert (rc, out) == (0, b"")


def test_env_cwd_and_user(box: Box) -> None:
    rc, out, _ = box.ex("sh", "-c", "echo $FOO; pwd; id -u; id -g",
                        env=["PATH=/bin:/usr/bin", "FOO=bar baz"], cwd="/etc", uid=1000, gid=1001)
    assert (rc, out) == (0, b"bar baz\n/etc\n1000\n1001\n")
    rc, out, _ = box.ex("env", env=["A=1"])
    assert set(out.decode().split()) >= {"A=1"} and "HOME" not in out.decode()
    with pytest.raises(ContainerExecError, match="/no/dir"):
        box.ex("pwd", cwd="/no/dir")


def test_tty(box: Box) -> None:
    rc, out, _ = box.ex("sh", "-c", "tty; stty size", tty=(33, 101))
    assert rc == 0
    lines = out.decode().split()
    assert lines[0].startswith("/dev/pts/") and lines[1:] == ["33", "101"], out


def test_interactive_tty(box: Box) -> None:
    master, slave = pty.openpty()
    got = bytearray()

    def reader() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            got.extend(data)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    os.write(master, b"echo in-$((6*7))-tty; exit 4\n")
    before = termios.tcgetattr(slave)
    try:
        rc = exec_in_vm(box.run_dir, ["sh"], env=ENV, cwd=None, uid=0, gid=0, groups=[], tty=(24, 80),
                        interactive=True, stdin_fd=slave, stdout_fd=slave, stderr_fd=slave)
        assert termios.tcgetattr(slave) == before  # raw mode undone
    finally:
        os.close(slave)
        t.join(5)
        os.close(master)
    assert rc == 4
    assert b"in-42-tty" in got


def test_concurrent_execs(box: Box) -> None:
    results: dict[str, tuple[int, bytes, bytes]] = {}

    def one(me: str, other: str) -> None:
        results[me] = box.ex("sh", "-c", f"touch /tmp/{me}; for i in $(seq 30); do "
                                         f"[ -e /tmp/{other} ] && echo {me} && exit 0; sleep 1; done; exit 1")

    ts = [threading.Thread(target=one, args=("ca", "cb")), threading.Thread(target=one, args=("cb", "ca"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert results == {"ca": (0, b"ca\n", b""), "cb": (0, b"cb\n", b"")}


def test_ports_are_reused(box: Box) -> None:
    for i in range(EXEC_PORTS + 2):
        assert box.ex("echo", str(i))[:2] == (0, f"{i}\n".encode())


def test_signal_is_forwarded(box: Box) -> None:
    c = box.client("sleep", "101")
    try:
        assert "sleep 101" in box.wait_for("sleep 101", present=True)
        c.send_signal(signal.SIGINT)
        assert c.wait(30) == 130, c.stderr.read() if c.stderr else ""
    finally:
        c.kill()
        c.wait()
    assert "sleep 101" not in box.wait_for("sleep 101", present=False)


def test_killed_client_leaves_no_process(box: Box) -> None:
    c = box.client("sh", "-c", "sleep 102 & sleep 103")
    try:
        listing = box.wait_for("sleep 103", present=True)
        assert "sleep 102" in listing and "sleep 103" in listing
    finally:
        c.kill()
        c.wait()
    listing = box.wait_for("sleep 103", present=False)
    assert "sleep 102" not in listing and "sleep 103" not in listing, listing
    # the port it held works again
    for _ in range(EXEC_PORTS):
        assert box.ex("echo", "again")[0] == 0


def test_detach(box: Box) -> None:
    t0 = time.monotonic()
    rc, out, _ = box.ex("sh", "-c", "sleep 2; echo lost; touch /tmp/detached", detach=True)
    assert (rc, out) == (0, b"")
    assert time.monotonic() - t0 < 2
    deadline = time.monotonic() + 30
    while box.ex("test", "-e", "/tmp/detached")[0] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.3)


def _held_ports(run_dir: Path) -> int:
    """How many exec ports' locks (flock on exec-K.lock) are held, read from /proc/locks
    (passively: trying the lock here could make a client starting meanwhile find it busy)."""
    locked = {int(f[5].rsplit(":", 1)[1]) for ln in Path("/proc/locks").read_text().splitlines()
              if len(f := ln.split()) > 5 and f[1] == "FLOCK"}
    held = 0
    for k in range(EXEC_PORTS):
        with contextlib.suppress(FileNotFoundError):
            held += os.stat(run_dir / f"exec-{k}.lock").st_ino in locked
    return held


def test_all_ports_busy(box: Box) -> None:
    clients = [box.client("sleep", "104") for _ in range(EXEC_PORTS)]
    try:
        deadline = time.monotonic() + 60
        while _held_ports(box.run_dir) < EXEC_PORTS:
            assert time.monotonic() < deadline and all(c.poll() is None for c in clients)
            time.sleep(0.1)
        with pytest.raises(VmrtError, match="in use"):
            box.ex("true")
    finally:
        for c in clients:
            c.kill()
            c.wait()
    assert "sleep 104" not in box.wait_for("sleep 104", present=False)


def test_container_exits_normally_and_cleans_up(box: Box) -> None:
    c = box.client("sleep", "105")
    try:
        box.wait_for("sleep 105", present=True)
        assert box.ex("touch", "/tmp/stop")[0] == 0
        assert box.proc.wait(60) == 7
        # the container's end ends its execs too
        assert c.wait(30) == 137, c.stderr.read() if c.stderr else ""
    finally:
        c.kill()
        c.wait()
    box.vmrt.assert_clean(timeout=15)
    assert not list((box.vmrt.run_root / "containers").glob("*/exec-*.sock"))
