"""Child processes that die with vmrt and are stopped by PID, never by name."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _own_life() -> None:  # a pooled VM outlives the pool daemon that booted it
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def spawn(cmd: list[str], *, pass_fds: tuple[int, ...] = (), stdout: int | None = None,
          stderr: int | None = None, cwd: str | None = None, die_with_parent: bool = True,
          ) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd,
                            pass_fds=pass_fds, preexec_fn=_die_with_parent if die_with_parent else _own_life,
                            close_fds=True)


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
