"""The bench's child processes: every command it runs, timed, tracked and stoppable the way a
user would stop it (an interrupt still tears every container down)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any

CMD_TIMEOUT = 300.0


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "notice:" not in ln]
    return lines[-1][:300] if lines else ""


class Result:
    def __init__(self, rc: int, out: str, err: str, ms: float, t0: float = 0.0, t1: float = 0.0) -> None:
        self.rc, self.out, self.err, self.ms, self.t0, self.t1 = rc, out, err, ms, t0, t1

    def error(self, what: str) -> str:
        return f"{what}: exit {self.rc}: {last_line(self.err) or last_line(self.out) or 'no output'}"


class Procs:
    """Every child runs in its own session and is tracked while it runs, so that an
    interrupt stops it the way a user would (SIGTERM, which vmrt forwards; a second
    SIGTERM kills the container) and its teardown still happens."""

    def __init__(self) -> None:
        self.live: set[subprocess.Popen[Any]] = set()
        self.servers: set[subprocess.Popen[Any]] = set()  # spawn(): stopped as a process group
        self.lock = threading.Lock()

    def _track(self, p: subprocess.Popen[Any]) -> None:
        with self.lock:
            self.live.add(p)

    def _untrack(self, p: subprocess.Popen[Any]) -> None:
        with self.lock:
            self.live.discard(p)

    def run(self, cmd: list[str], env: dict[str, str] | None = None, timeout: float = CMD_TIMEOUT,
            detach_stdio: bool = False) -> Result:
        """Run to completion; wall time in ms. ``detach_stdio``: the child's stdout goes to
        /dev/null and stderr to a file (for `runc run -d`, whose container keeps them)."""
        errf = tempfile.TemporaryFile("w+") if detach_stdio else None
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL if detach_stdio else subprocess.PIPE,
                             stderr=errf if errf else subprocess.PIPE, text=True, start_new_session=True)
        self._track(p)
        try:
            out, err = p.communicate(timeout=timeout)
            t1 = time.perf_counter()
        except subprocess.TimeoutExpired:
            self.stop(p)
            out, err = p.communicate()
            t1 = time.perf_counter()
            err = (err or "") + f"\ntimed out after {timeout:.0f} s"
        self._untrack(p)
        if errf:
            errf.seek(0)
            err = errf.read()
            errf.close()
        rc = p.returncode if p.returncode is not None else 124
        return Result(rc, out or "", err or "", (t1 - t0) * 1000, t0, t1)

    def run_marked(self, cmd: list[str], env: dict[str, str] | None = None,
                   timeout: float = CMD_TIMEOUT) -> tuple[Result, list[tuple[float, str]]]:
        """Run; timestamp (host monotonic, s) every stdout line as it arrives."""
        errf = tempfile.TemporaryFile("w+")
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                             start_new_session=True)
        self._track(p)
        timer = threading.Timer(timeout, self.stop, (p,))
        timer.start()
        lines = []
        assert p.stdout is not None
        try:
            for raw in iter(p.stdout.readline, b""):
                lines.append((time.perf_counter(), raw.decode(errors="replace").rstrip("\n")))
            p.wait()
        finally:
            timer.cancel()
        self._untrack(p)
        errf.seek(0)
        err = errf.read()
        errf.close()
        t1 = time.perf_counter()
        return Result(p.returncode, "\n".join(x for _, x in lines), err, (t1 - t0) * 1000, t0, t1), lines

    def spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        """Start a server in a session (and process group) of its own, stdio to /dev/null;
        ``stop_group`` (or ``stop_all``) ends it and every process it started."""
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        with self.lock:
            self.servers.add(p)
        return p

    def stop_group(self, p: subprocess.Popen[Any]) -> None:
        """SIGTERM to the process group of a spawned server (a shell's loop and the child it waits
        for), SIGKILL if its leader outlives 3 s; the group is signalled before the leader is reaped."""
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)  # its own session, started by us
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(wait)
                break
        with self.lock:
            self.servers.discard(p)

    def stop(self, p: subprocess.Popen[Any]) -> None:
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGTERM, 30.0)):
            if p.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(wait)
                return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # its own session, started by us
        p.wait()

    def stop_all(self) -> None:
        with self.lock:
            live, servers = list(self.live), list(self.servers)
        threads = [threading.Thread(target=self.stop, args=(p,)) for p in live]
        threads += [threading.Thread(target=self.stop_group, args=(p,)) for p in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
