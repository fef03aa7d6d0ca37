"""Process helpers every layer may use (the bottom layer: imports nothing of vmrt's).

A process's identity is its PID and its start time in clock ticks since boot
(:func:`start_ticks`): a reused PID or a stepped wall clock never fools a check that
compares both. A process we wait for or signal is held by a pidfd (:class:`PidFd`):
unlike its PID, the fd never comes to name another process. :func:`kill_if_ours`
signals a recorded PID only while it still is the process recorded.
:func:`write_all` writes a whole buffer to an fd, blocking or not;
:func:`connect_unix` reaches a unix socket whose path is longer than ``sun_path``.
:func:`vmrt_here` is the argv of vmrt's own children (a service's builds, the pool daemon, the
snapshot builder, probes): they run on this host whatever ``VMRT_HOST`` or the current context
says (vmrt/remote/routing.py never routes an argv that starts with :data:`HERE`).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
from collections.abc import Collection
from pathlib import Path
from types import TracebackType

HERE = "--internal-here"


def vmrt_here(*args: str) -> list[str]:
    """``python -m vmrt ARGS`` for a child of vmrt's own: never routed to a remote host."""
    return [sys.executable, "-m", "vmrt", HERE, *args]


def start_ticks(pid: int) -> int:
    """A process's start time in clock ticks since boot (0 if it is gone): with the PID, its identity."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return 0 if fields[0] == "Z" else int(fields[19])


def write_all(fd: int, data: bytes) -> bool:
    """Write all of data to fd (waiting out a non-blocking fd); False if the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except OSError:
            return False
        view = view[n:]
    return True


class PidFd:
    """A process held by a pidfd: waited for and signalled without the PID-reuse race of a
    bare PID, whether or not it is our child (a zombie still has one: its exit is seen).

    Raises :class:`ProcessLookupError` if ``pid`` is gone; a context manager that closes the fd.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def exited(self, timeout: float | None = 0) -> bool:
        """Whether the process has exited, waiting up to ``timeout`` seconds for it (0: a poll,
        None: until it has); a pidfd becomes readable the moment its process exits."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(None if timeout is None else max(timeout, 0.0) * 1000))

    def send_signal(self, signo: int) -> bool:
        """``signo`` to the process; False if it is gone (or the fd is closed)."""
        try:
            signal.pidfd_send_signal(self.fd, signo)
        except OSError:  # ProcessLookupError once it has exited, EBADF once closed
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PidFd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def kill_if_ours(pid: int, signo: int = signal.SIGKILL, *, ticks: int | None = None,
                 marks: Collection[bytes] = ()) -> bool:
    """``signo`` to a recorded ``pid`` only while it still is the process recorded: started at
    ``ticks`` (:func:`start_ticks`) and, with ``marks``, with one of them in its command line.
    The process is held by a pidfd before it is checked, so the PID cannot be reused between
    the check and the signal. True if it was signalled (False: gone, a zombie, or not ours)."""
    if ticks is None and not marks:
        raise ValueError("kill_if_ours needs the recorded start ticks or command-line marks")
    try:
        p = PidFd(pid)
    except OSError:  # gone (ProcessLookupError), or not a process (a thread id: EINVAL)
        return False
    with p:
        if ticks is not None and (not ticks or start_ticks(pid) != ticks):
            return False
        if marks:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return False
            if not any(m in cmdline for m in marks):
                return False
        return p.send_signal(signo)


def connect_unix(directory: str | os.PathLike[str], name: str, timeout: float | None = None) -> socket.socket:
    """A stream connection to the unix socket ``name`` in ``directory``, named through an O_PATH
    fd of the directory (``/proc/self/fd/N/name``): a run dir's full path can exceed the 108
    bytes of ``sun_path``. ``timeout`` (None: blocking) is the socket's, from the connect on.
    Raises OSError when the directory or the socket cannot be reached."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a file name: {name!r}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.connect(f"/proc/self/fd/{dfd}/{name}")
        finally:
            os.close(dfd)
    except BaseException:
        sock.close()
        raise
    return sock
