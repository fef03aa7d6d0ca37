"""Container lifecycle operations on recorded containers: stop, kill, wait, logs, reconcile.

Every running container has an owner process recorded in ``monitor_pid``: the
monitor of a detached container, or the ``vmrt run`` that runs it attached.
Signals go to the owner, which passes them to the container (SIGKILL becomes
:data:`~vmrt.drivers.base.FORCE_KILL`, since SIGKILL would end the owner
instead). If the owner is gone (killed, crashed, the host rebooted), the record
is stale: :func:`reconcile` cleans up what the container left and records it
Exited, so ``ps`` tells the truth.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cgroups, fsmode, logfile, network, rootfs
from .config import Config
from .errors import StateError, UsageError, VmrtError
from .formatting import inert
from .layout import ATTACH_NAME, LOG_NAME, TTY_SIZE_NAME, container_dir, rw_dir
from .proc import connect_unix, kill_if_ours, start_ticks
from .signals import FORCE_KILL
from .state import Container, State, Status

LOG = logging.getLogger(__name__)

OWNER_LOST_STATUS = 255  # as Docker records a container whose shim vanished


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def owner_alive(c: Container) -> bool:
    """Whether the process recorded as the container's owner still is (not a reused PID).

    The owner's start time in ticks since boot is recorded with its PID and
    compared exactly: unlike wall-clock times, it does not move when the clock
    is stepped.
    """
    if not c.monitor_pid:
        return False
    ticks = start_ticks(c.monitor_pid)
    if not ticks:
        return False
    if c.owner_ticks:
        return ticks == c.owner_ticks
    started = _boot_time() + ticks / os.sysconf("SC_CLK_TCK")  # a record from before owner_ticks
    return c.started is None or started <= c.started + 2.0


def reconcile(cfg: Config, state: State) -> None:
    """Record as Exited every running container whose owner is gone, and clean up after it."""
    for c in state.list():
        if c.status == Status.RUNNING and not owner_alive(c):
            cleanup(cfg, c)
            with contextlib.suppress(StateError):
                state.transition(c, Status.EXITED, exit_code=OWNER_LOST_STATUS, finished=time.time())


def parse_signal(name: str) -> int:
    """``KILL``, ``SIGKILL`` or ``9`` -> 9."""
    s = name.strip().upper()
    if s.isdigit():
        n = int(s)
    else:
        try:
            n = int(signal.Signals[s if s.startswith("SIG") else "SIG" + s])
        except KeyError:
            raise UsageError(f"invalid signal: {name}") from None
    if not 0 < n < signal.NSIG:
        raise UsageError(f"invalid signal: {name}")
    return n


# what an owner passes on to its container (the drivers' FORWARDED); SIGKILL goes as FORCE_KILL
PROXIED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}


def resize(c: Container, rows: int, cols: int) -> None:
    """A running detached container's terminal takes this size: written to its run dir's
    TTY_SIZE_NAME, which its monitor reads at SIGWINCH (docker's resize)."""
    if c.status != Status.RUNNING or not owner_alive(c) or not c.run_dir:
        raise StateError(f"Container {c.id[:12]} is not running")
    fsmode.write_private(Path(c.run_dir) / TTY_SIZE_NAME, f"{rows} {cols}\n")
    os.kill(c.monitor_pid, signal.SIGWINCH)


def send(cfg: Config, c: Container, signo: int) -> None:
    """Deliver ``signo`` to the container: through its owner, or (process mode) the runtime directly."""
    if c.status != Status.RUNNING or not owner_alive(c):
        raise StateError(f"Cannot kill container: {c.name}: container is not running")
    if signo == signal.SIGKILL:
        os.kill(c.monitor_pid, FORCE_KILL)
    elif signo in PROXIED:
        os.kill(c.monitor_pid, signo)
    elif c.isolation == "process":  # any other signal (STOP, CONT, ALRM...) straight to the container's init
        from .drivers.process import choose_runtime  # on use: VM runs never load the process driver
        r = subprocess.run([choose_runtime(cfg.runtime), "--root", str(cfg.run_root / "runtime"), "kill", c.id,
                            str(signo)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise StateError(f"Cannot kill container: {c.name}: {r.stderr.strip() or 'runtime kill failed'}")
    else:
        raise UsageError(f"signal {signal.Signals(signo).name} cannot be sent to a VM container yet "
                         f"(supported: KILL, {', '.join(sorted(signal.Signals(s).name for s in PROXIED))})")


def wait_exit(state: State, c: Container, timeout: float | None) -> Container:
    """Poll until the container is not running and its owner is gone (or ``timeout``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            c = state.get(c.id)
        except StateError:  # removed meanwhile (run --rm, rm -f): stopped for good
            return dataclasses.replace(c, status=Status.EXITED)
        if c.status != Status.RUNNING and not owner_alive(c):
            return c
        if c.status == Status.RUNNING and not owner_alive(c):
            return c  # stale: the caller reconciles
        if deadline is not None and time.monotonic() > deadline:
            return c
        time.sleep(0.05)


def stop(cfg: Config, state: State, c: Container, timeout: float) -> None:
    """``docker stop``: the stop signal, then SIGKILL after ``timeout`` seconds; no restart after."""
    state.set_fields(c, stop_requested=True)
    if not owner_alive(c):
        reconcile(cfg, state)
        return
    if c.status == Status.RUNNING:
        stop_signal = _stop_signal(cfg, c)
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.monitor_pid, stop_signal)
        c = wait_exit(state, c, timeout)
        if c.status == Status.RUNNING and owner_alive(c):
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.monitor_pid, FORCE_KILL)
    else:  # a monitor between restarts: it ends at a stop signal
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.monitor_pid, signal.SIGTERM)
    wait_exit(state, c, 60.0)
    reconcile(cfg, state)


def _stop_signal(cfg: Config, c: Container) -> int:
    try:
        config = json.loads((container_dir(cfg, c.id) / "config.json").read_text())
        name = config.get("annotations", {}).get("org.opencontainers.image.stopSignal")
        return parse_signal(name) if name else signal.SIGTERM
    except (OSError, ValueError, UsageError):
        return signal.SIGTERM


# --- logs -----------------------------------------------------------------------------------
def parse_since(value: str, now: float | None = None) -> float:
    """``--since``: RFC 3339 time, Unix timestamp, or a duration before now (``10m``, ``1h30m``)."""
    now = time.time() if now is None else now
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", value)
    if m and any(m.groups()):
        h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
        return now - (h * 3600 + mi * 60 + sec)
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"invalid value for --since: {value!r} (use 10m, 2h, a Unix time or RFC 3339)") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def record_time(rec: dict[str, Any]) -> float | None:
    """A json-file log record's time (Unix seconds), or None if it has none that parses."""
    try:
        return dt.datetime.fromisoformat(str(rec.get("time", "")).replace("Z", "+00:00")[:26] + "+00:00").timestamp()
    except ValueError:
        return None


def logs(cfg: Config, state: State, c: Container, *, follow: bool, tail: int | None, timestamps: bool,
         since: float | None, stop: threading.Event | None = None,
         following: Callable[[], None] | None = None) -> None:
    """``docker logs``: the container's stdout and stderr, as recorded by its monitor
    (with ``follow``, until the container's owner is gone or ``stop`` is set; ``following``
    is called once what was already logged has been read: what comes after is shown)."""
    path = container_dir(cfg, c.id) / LOG_NAME

    def done() -> bool:
        if stop is not None and stop.is_set():
            return True
        cur = state.get(c.id)
        return not owner_alive(cur)

    def emit(rec: dict[str, Any]) -> None:
        out = sys.stderr.buffer if rec.get("stream") == "stderr" else sys.stdout.buffer
        text = rec.get("log", "")
        if timestamps:
            text = f"{inert(str(rec.get('time', '')))} {text}"  # ours; the log text is the container's, raw
        out.write(text.encode())
        out.flush()

    def keep(rec: dict[str, Any]) -> bool:
        t = record_time(rec)
        return since is None or t is None or t >= since

    # the rotated files oldest first, then the live one; None: all logged so far was read
    records = logfile.records(path, follow, done)
    last: collections.deque[dict[str, Any]] = collections.deque(maxlen=tail)  # --tail: memory bounded
    for rec in records:
        if rec is None:
            break
        if keep(rec):
            if tail is None:
                emit(rec)
            else:
                last.append(rec)
    if following is not None:
        following()
    for rec in last:
        emit(rec)
    if follow:  # then what arrives, across rotations, until the container's owner is gone
        for rec in records:
            if rec is not None and keep(rec):
                emit(rec)


DETACH_KEYS = b"\x10\x11"  # Ctrl-P Ctrl-Q, as Docker


class StdinRelay:
    """``vmrt attach``: this process's stdin to a running container's stdin, through the attach
    socket its C monitor serves (only for containers started with -i). With a terminal
    container and a terminal here, the terminal is raw and Ctrl-P Ctrl-Q detaches."""

    def __init__(self, sock: socket.socket, raw: bool) -> None:
        self.sock = sock
        self.detached = threading.Event()
        self.raw = raw
        self._restore = None
        if raw:
            self._restore = termios.tcgetattr(0)
            tty.setraw(0)

    def start(self) -> None:
        """Relay from now on (after the output so far was skipped: an answer is not missed)."""
        threading.Thread(target=self._pump, daemon=True).start()

    @classmethod
    def open(cls, c: Container) -> StdinRelay | None:
        if not c.run_dir or not os.path.exists(os.path.join(c.run_dir, ATTACH_NAME)):
            return None  # started without -i: output only, as Docker
        try:
            sock = connect_unix(c.run_dir, ATTACH_NAME)
        except OSError as e:
            raise StateError(f"cannot attach to {c.name}'s stdin: {e.strerror}") from None
        terminal = False
        with contextlib.suppress(OSError, ValueError, KeyError):
            terminal = bool(json.loads((Path(c.run_dir) / "config.json").read_text())["process"].get("terminal"))
        return cls(sock, raw=terminal and os.isatty(0))

    def _pump(self) -> None:
        prev = b""
        try:
            while data := os.read(0, 32768):
                if self.raw and DETACH_KEYS in prev[-1:] + data:
                    cut = (prev[-1:] + data).index(DETACH_KEYS) - len(prev[-1:])
                    if cut > 0:
                        self.sock.sendall(data[:cut])
                    self.detached.set()
                    return
                prev = data
                self.sock.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):  # our EOF: the container's stdin stays open, as Docker's
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self._restore is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self._restore)
            self._restore = None
        self.sock.close()


# --- lost owners and removal: nothing of a container is left -------------------------------
def _kill_recorded(c: Container) -> None:
    """SIGKILL the container's VMM and virtiofsd, if those PIDs are still theirs (their command
    lines name the container, its run dir, or the pooled VM it took)."""
    from .pool.files import vm_marker_in  # on use: VM containers only (process runs never load the pool)
    marks = [c.id[:12].encode()] + ([c.run_dir.encode()] if c.run_dir else [])
    pids = set(c.pids.values())
    if c.run_dir and (pooled := vm_marker_in(Path(c.run_dir) / "vm")) is not None:
        marks.append(pooled[0].encode())
        pids |= set(pooled[1].values())
    for pid in pids:
        kill_if_ours(pid, marks=marks)
    for pid in pids:  # wait (bounded) for them to go; reaped if they are our children
        for _ in range(100):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.02)


def _reap_libvirt(cfg: Config, container_id: str) -> None:
    """A libvirt VM's leftovers (its domain, dir, tap), where a crashed owner left any. Raises
    VmrtError while the domain may still run: its dir stays, so the next call tries again."""
    if not (cfg.libvirt_dir / container_id[:16]).exists():
        return
    from .drivers import libvirt  # on use: only where a libvirt domain's dir is left
    libvirt.reap(cfg, container_id)


def _delete_runtime_container(cfg: Config, container_id: str) -> None:
    from .drivers.process import choose_runtime  # on use: VM runs never load the process driver
    subprocess.run([choose_runtime(cfg.runtime), "--root", str(cfg.run_root / "runtime"), "delete", "--force",
                    container_id], capture_output=True, check=False)
    cgroups.remove_tree(cgroups.runtime_path(container_id))


def remove_run_dir(run_dir: Path) -> None:
    """A run dir and every mount under it (listed from mountinfo, deepest first)."""
    if not run_dir.exists():
        return
    rootfs.umount_all(run_dir)
    left = rootfs.mounts_under(run_dir)
    if left:
        raise VmrtError(f"cannot remove {run_dir}: {left[0]} is still mounted")
    shutil.rmtree(run_dir, ignore_errors=True)


def cleanup(cfg: Config, c: Container) -> None:
    """Release what a container holds on the host when its owner can no longer do it."""
    if c.isolation == "process":
        _delete_runtime_container(cfg, c.id)
    else:
        _kill_recorded(c)
        try:
            _reap_libvirt(cfg, c.id)
        except VmrtError as e:  # rm (and prune) reap again and fail while it stays
            LOG.warning("%s", e)
        cgroups.remove_tree(f"{cgroups.PARENT}/{c.id}-vmm")
    network.detach(cfg, c.id)
    if c.run_dir:
        remove_run_dir(Path(c.run_dir))


TOOL_PID_NAME = "tool.pid"  # a run dir's, while a tool run (vmrt/offline.py) holds it: "PID TICKS"


def tool_running(cfg: Config, container_id: str) -> bool:
    """Whether a tool run (a copy of a container that is not running) holds its run dir now."""
    try:
        pid, ticks = (int(f) for f in (cfg.run_root / "containers" / container_id / TOOL_PID_NAME).read_text().split())
    except (OSError, ValueError):
        return False
    return start_ticks(pid) == ticks


def remove(cfg: Config, ref: str, force: bool) -> str:
    """``docker rm [-f]``: a running container is killed first (with -f); then nothing of it is left."""
    state = State(cfg.db_path)
    try:
        c = state.get(ref)
        if tool_running(cfg, c.id):
            raise StateError(f"cannot remove container {c.name}: it is in use by a copy to or from it")
        if owner_alive(c):  # running, or its monitor waits to restart it
            if not force:
                raise UsageError(f"cannot remove running container {c.name}: stop it first or use -f")
            state.set_fields(c, stop_requested=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.monitor_pid, FORCE_KILL if c.status == Status.RUNNING else signal.SIGTERM)
            c = wait_exit(state, c, 60.0)
        reconcile(cfg, state)
        c = state.get(c.id)
        if c.status == Status.RUNNING:  # an owner that did not go: take it down ourselves
            cleanup(cfg, c)
        else:
            if network.netns_path(cfg, c.id).exists():  # an owner killed during its start
                network.detach(cfg, c.id)
            if c.run_dir:
                remove_run_dir(Path(c.run_dir))
        if c.isolation == "vm":
            _reap_libvirt(cfg, c.id)
            cgroups.remove_tree(f"{cgroups.PARENT}/{c.id}-vmm")
        shutil.rmtree(container_dir(cfg, c.id), ignore_errors=True)
        shutil.rmtree(rw_dir(cfg, c.id), ignore_errors=True)
        state.remove(c)
        return c.name
    finally:
        state.close()
