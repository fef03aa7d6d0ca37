"""vmrt.proc: process identity, pidfds, kill-if-ours, write_all and the short-path unix connect.

Nothing here needs root: the processes are this test's own children.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmrt.proc import PidFd, connect_unix, kill_if_ours, start_ticks, write_all


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping child whose command line carries a mark of its own; killed at teardown."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"vmrt-test-mark-{os.getpid()}"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _gone_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_start_ticks() -> None:
    assert start_ticks(os.getpid()) > 0
    assert start_ticks(os.getpid()) == start_ticks(os.getpid())
    assert start_ticks(_gone_pid()) == 0


def test_start_ticks_of_a_zombie_is_zero() -> None:
    p = subprocess.Popen(["true"])
    with PidFd(p.pid) as pfd:
        assert pfd.exited(10)  # exited, not reaped: a zombie
        assert start_ticks(p.pid) == 0
    p.wait()


def test_write_all_through_a_full_nonblocking_pipe() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    data = os.urandom(1 << 20)  # more than a pipe holds: write_all waits for the reader
    got = bytearray()

    def read() -> None:
        while chunk := os.read(r, 65536):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert write_all(w, data)
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    assert bytes(got) == data


def test_write_all_reader_gone() -> None:
    r, w = os.pipe()
    os.close(r)
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in Python: EPIPE, not the signal
    try:
        assert not write_all(w, b"x")
    finally:
        signal.signal(signal.SIGPIPE, old)
        os.close(w)


def test_pidfd_waits_and_signals(child: subprocess.Popen[bytes]) -> None:
    with PidFd(child.pid) as pfd:
        assert pfd.pid == child.pid
        assert not pfd.exited()        # a poll
        assert not pfd.exited(0.05)    # a bounded wait that runs out
        assert pfd.send_signal(signal.SIGTERM)
        assert pfd.exited(10)
        assert pfd.exited(None)        # readable for good once exited
        assert child.wait(10) == -signal.SIGTERM
        assert not pfd.send_signal(signal.SIGTERM)  # reaped: gone
    assert pfd.fd == -1
    assert not pfd.send_signal(signal.SIGTERM)      # closed
    pfd.close()                                     # twice is fine


def test_pidfd_of_a_gone_process() -> None:
    with pytest.raises(ProcessLookupError):
        PidFd(_gone_pid())


def test_kill_if_ours_by_ticks(child: subprocess.Popen[bytes]) -> None:
    ticks = start_ticks(child.pid)
    assert not kill_if_ours(child.pid, ticks=ticks + 1)  # another process with that PID
    assert not kill_if_ours(child.pid, ticks=0)          # no ticks recorded: never ours
    assert child.poll() is None
    assert kill_if_ours(child.pid, signal.SIGTERM, ticks=ticks)
    assert child.wait(10) == -signal.SIGTERM
    assert not kill_if_ours(child.pid, ticks=ticks)      # gone


def test_kill_if_ours_by_marks(child: subprocess.Popen[bytes]) -> None:
    mark = f"vmrt-test-mark-{os.getpid()}".encode()
    assert not kill_if_ours(child.pid, marks=[b"vmrt-test-not-this-one"])
    assert not kill_if_ours(child.pid, ticks=start_ticks(child.pid) + 1, marks=[mark])  # both must hold
    assert child.poll() is None
    assert kill_if_ours(child.pid, marks=[b"elsewhere", mark])  # SIGKILL by default
    assert child.wait(10) == -signal.SIGKILL


def test_kill_if_ours_spares_a_zombie_and_needs_a_record() -> None:
    p = subprocess.Popen(["sleep", "0"])
    with PidFd(p.pid) as pfd:
        assert pfd.exited(10)
        assert not kill_if_ours(p.pid, marks=[b"sleep"])  # a zombie's command line is empty
    p.wait()
    with pytest.raises(ValueError):
        kill_if_ours(os.getpid())


def _listen(directory: Path, name: str) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        srv.bind(f"/proc/self/fd/{dfd}/{name}")
    finally:
        os.close(dfd)
    srv.listen(1)
    return srv


def test_connect_unix_beyond_sun_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(os.fsencode(deep / "x.sock")) > 108
    with pytest.raises(OSError):  # too long to be named directly
        socket.socket(socket.AF_UNIX).connect(str(deep / "x.sock"))
    with _listen(deep, "x.sock") as srv:
        with connect_unix(deep, "x.sock", timeout=5.0) as sock:
            assert sock.gettimeout() == 5.0
            conn, _ = srv.accept()
            with conn:
                sock.sendall(b"ping")
                assert conn.recv(4) == b"ping"
        with connect_unix(str(deep), "x.sock") as sock:
            assert sock.gettimeout() is None  # blocking
            srv.accept()[0].close()


def test_connect_unix_fails_cleanly(tmp_path: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        connect_unix(tmp_path, "missing.sock")
    with pytest.raises(FileNotFoundError):
        connect_unix(tmp_path / "missing-dir", "x.sock")
    (tmp_path / "plain").write_text("")
    with pytest.raises(ConnectionRefusedError):
        connect_unix(tmp_path, "plain")
    assert len(os.listdir("/proc/self/fd")) == fds  # neither the socket nor the dir fd leaks
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(ValueError):
            connect_unix(tmp_path, bad)
