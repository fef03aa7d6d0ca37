"""Child processes that die with vmrt and are stopped by PID, never by name."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _child(die_with_parent: bool, join: tuple[str, ...], nofile: int, seccomp: bytes) -> Callable[[], None]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if nofile and hard != resource.RLIM_INFINITY:
        nofile = min(nofile, hard)  # never above what vmrt itself may have
    prog = ctypes.create_string_buffer(seccomp, len(seccomp))  # built before the fork

    def run() -> None:  # in the child between fork and exec
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if die_with_parent:  # else: a pooled VM outlives the pool daemon that booted it
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for p in join:  # before it allocates anything: a process is never moved after it charged memory
            fd = os.open(p, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        # last: root (CAP_SYS_ADMIN) loads it without no_new_privs; it holds across exec
        if seccomp:
            fprog = _SockFprog(len(seccomp) // 8, ctypes.addressof(prog))
            if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "cannot load the seccomp filter")
    return run


def spawn(cmd: list[str], *, pass_fds: tuple[int, ...] = (), stdout: int | None = None,
          stderr: int | None = None, cwd: str | None = None, die_with_parent: bool = True,
          join: list[Path] | tuple[Path, ...] = (), nofile: int = 0,
          seccomp: bytes = b"") -> subprocess.Popen[bytes]:
    """Start ``cmd`` (an argv list, never a shell); ``join``: cgroup.procs files it joins first;
    ``nofile``: its open-file limit (0: inherited); ``seccomp``: a classic BPF program
    (struct sock_filter[]) it runs under."""
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd,
                            pass_fds=pass_fds, close_fds=True,
                            preexec_fn=_child(die_with_parent, tuple(str(p) for p in join), nofile, seccomp))


def stop(proc: subprocess.Popen[bytes], grace: float, sig: int = signal.SIGTERM) -> int:
    """Wait up to ``grace`` seconds, then signal, then SIGKILL; returns its status."""
    if proc.poll() is None:
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_for_path(path: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False
