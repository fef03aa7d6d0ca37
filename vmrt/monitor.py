"""The monitor of a detached container (``vmrt run -d``, ``vmrt start``).

One small process per container, started in its own session by :func:`spawn`, so
``vmrt`` itself can exit and be started again at any time. It owns the container
the way an attached ``vmrt run`` does (the same drivers: the VM's QEMU and
virtiofsd, or the OCI runtime's container), writes the container's stdout and
stderr to ``<root>/containers/<id>/container.log`` as JSON lines with
timestamps (Docker's json-file format), records the exit code, OOM flag and
times, and applies the restart policy. It tells the starting ``vmrt`` through a
pipe when the container's process has started, or why it could not.

Signals: SIGTERM/SIGINT and the other forwarded signals go to the container
(via the driver); :data:`~vmrt.drivers.base.FORCE_KILL` kills it. Between runs
(a restart policy's back-off) a stop signal ends the monitor.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from . import config as config_mod
from .drivers.base import FORCE_KILL
from .errors import StateError, UsageError, VmrtError

LOG_NAME = "container.log"
META_NAME = "monitor.json"
READY_TIMEOUT = 300.0  # a cold VM boot under TCG, the image pulled first: generous


def parse_restart(policy: str) -> tuple[str, int]:
    """``no``, ``always``, ``unless-stopped`` or ``on-failure[:N]`` -> (name, max retries; 0 = unbounded)."""
    name, _, count = policy.partition(":")
    if name not in ("no", "always", "unless-stopped", "on-failure") or (count and name != "on-failure"):
        raise UsageError(f"invalid restart policy {policy!r}: use no, always, unless-stopped or on-failure[:N]")
    try:
        n = int(count) if count else 0
    except ValueError:
        raise UsageError(f"invalid restart policy {policy!r}: the maximum retry count must be a number") from None
    if n < 0:
        raise UsageError(f"invalid restart policy {policy!r}: the maximum retry count cannot be negative")
    return name, n


def should_restart(policy: str, status: int, stopped: bool, restarts: int) -> bool:
    name, limit = parse_restart(policy)
    if stopped or name == "no":
        return False
    if name == "on-failure":
        return status != 0 and (limit == 0 or restarts < limit)
    return True  # always, unless-stopped (no daemon restarts here, so they behave alike)


class LogWriter:
    """Turns the container's stdout/stderr pipes into Docker json-file lines."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "ab", buffering=0)  # noqa: SIM115 (closed in close())
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def pipe(self, stream: str, copy_to: int | None = None) -> int:
        """The write end of a pipe whose lines are logged as ``stream`` (and, with ``copy_to``,
        also passed on to that fd as they come: an attached run's terminal)."""
        r, w = os.pipe()
        t = threading.Thread(target=self._pump, args=(r, stream, copy_to), daemon=True)
        t.start()
        self._threads.append(t)
        return w

    def line(self, stream: str, text: bytes) -> None:
        rec = {"log": text.decode("utf-8", "replace"), "stream": stream,
               "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        with self._lock:
            self._f.write(json.dumps(rec, separators=(",", ":")).encode() + b"\n")

    def _pump(self, fd: int, stream: str, copy_to: int | None = None) -> None:
        from .drivers.base import write_all
        pending = b""
        with open(fd, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                if copy_to is not None and not write_all(copy_to, chunk):
                    break  # the reader went away: closing our end gives the container its EPIPE
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for ln in lines:
                    self.line(stream, ln + b"\n")
                if len(pending) >= 16384:  # as Docker: a long line is logged in pieces
                    self.line(stream, pending)
                    pending = b""
        if pending:
            self.line(stream, pending)

    def close(self) -> None:
        for t in self._threads:
            t.join(timeout=5)
        self._f.close()


def write_meta(cfg: config_mod.Config, container_id: str, meta: dict[str, Any]) -> None:
    """How to run the container again (accelerator, kernel, runtime, restart policy, --rm)."""
    from .runner import container_dir
    cdir = container_dir(cfg, container_id)
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / META_NAME).write_text(json.dumps(meta))


def spawn(cfg: config_mod.Config, container_id: str) -> tuple[bool, int, str]:
    """Start the monitor of a created (or exited) container and wait until its process started.

    Returns (started, status, message): (True, 0, "") once the process runs; else
    the exit status and the one-line reason (the container is then Exited).
    """
    from .runner import container_dir
    cdir = container_dir(cfg, container_id)
    r, w = os.pipe()
    try:
        with open(cdir / "monitor.log", "ab") as errlog:
            proc = subprocess.Popen([sys.executable, "-m", "vmrt.monitor", container_id, str(w)], pass_fds=(w,),
                                    stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                                    start_new_session=True, close_fds=True)
    finally:
        os.close(w)
    with open(r, "rb") as f:
        ready, _, _ = select.select([f], [], [], READY_TIMEOUT)
        reply = f.readline(65536).decode(errors="replace").strip() if ready else ""
    if not ready:  # bounded: a start that hangs is killed, not waited for forever
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, FORCE_KILL)
        return False, 125, f"container {container_id[:12]} did not start within {READY_TIMEOUT:g}s (killed)"
    if reply == "ok":
        return True, 0, ""
    code, _, message = reply.partition(" ")
    if not code.isdigit():
        return False, 125, f"the monitor of {container_id[:12]} ended before the container started " \
                           f"(see {cdir / 'monitor.log'})"
    return False, int(code), message


def main(argv: list[str]) -> int:
    """``python -m vmrt.monitor ID READY_FD``: run container ID until it (finally) exits."""
    container_id, ready_fd = argv[0], int(argv[1])
    ready: list[int] = [ready_fd]

    def notify(text: str) -> None:
        if ready:
            fd = ready.pop()
            with contextlib.suppress(OSError):
                os.write(fd, text.encode() + b"\n")
            os.close(fd)

    try:
        return _monitor(container_id, notify)
    except VmrtError as e:
        notify(f"{e.exit_code} {e}")
        return e.exit_code
    finally:
        notify("125 the monitor failed")


def _monitor(container_id: str, notify: Any) -> int:
    from .images.store import Store
    from .runner import container_dir, execute, make_driver, remove
    from .state import State
    from .timings import Timings

    cfg = config_mod.load()
    cdir = container_dir(cfg, container_id)
    meta = json.loads((cdir / META_NAME).read_text())
    config = json.loads((cdir / "config.json").read_text())
    state = State(cfg.db_path)
    c = state.get(container_id)
    store = Store(cfg.root)
    image = store.get(c.image_id)
    layers = image.layer_dirs()
    driver = make_driver(c.isolation, accel=meta.get("accel"),
                         kernel=Path(meta["kernel"]) if meta.get("kernel") else None,
                         runtime=meta.get("runtime") or cfg.runtime)
    # escalation is `vmrt stop`'s job (its -t): the driver's own grace timer would cut it short
    cfg.timeouts.stop_grace = 10.0 ** 9
    logs = LogWriter(cdir / LOG_NAME)
    stdio = (os.open(os.devnull, os.O_RDONLY), logs.pipe("stdout"), logs.pipe("stderr"))
    stopping = threading.Event()
    started = threading.Event()

    def on_stop(signo: int, _frame: object) -> None:  # between runs: no container to pass it to
        stopping.set()

    def on_started() -> None:
        started.set()
        notify("ok")

    def own_handlers() -> None:  # the drivers replace them while they run (VM mode: with SIG_DFL after)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, FORCE_KILL):
            signal.signal(s, on_stop)

    status = 125
    try:
        while True:
            own_handlers()
            if stopping.is_set() or state.get(container_id).stop_requested and started.is_set():
                break  # a stop that came during the back-off
            timings = Timings()
            timings.on_mark["process-started"] = on_started
            try:
                status = execute(cfg, state, c, image, layers, config, driver, timings, log_dir=cdir,
                                 stdio=stdio)
            except StateError as e:  # already running (another start won): leave it alone
                notify(f"125 {e}")
                return 125
            except VmrtError as e:
                status = e.exit_code
                logs.line("stderr", f"vmrt: {e}\n".encode())
                notify(f"{status} {e}")
            finally:
                own_handlers()
            c = state.get(container_id)
            if not started.is_set() or stopping.is_set() or not should_restart(
                    meta.get("restart", "no"), status, c.stop_requested, c.restart_count):
                break  # (a container that never started is not restarted: its error was reported)
            delay = min(0.1 * 2 ** c.restart_count, 5.0)
            state.set_fields(c, restart_count=c.restart_count + 1)
            if stopping.wait(delay):
                break
    finally:
        for fd in stdio:
            os.close(fd)
        logs.close()
        with contextlib.suppress(StateError):
            c = state.get(container_id)
            if c.monitor_pid == os.getpid():  # never clear another owner's record
                state.set_fields(c, monitor_pid=0)
        state.close()
    if meta.get("rm"):
        with contextlib.suppress(VmrtError):
            remove(cfg, container_id, force=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
