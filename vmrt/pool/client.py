"""The pool's client: ``vmrt run`` claims a VM, ``vmrt pool ...`` asks and controls the daemon."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .. import fsmode
from ..agent import protocol as P
from ..config import Config
from ..errors import ProtocolError, UsageError, VmrtError
from ..proc import PidFd, connect_unix, vmrt_here
from ..vm.disk import Disk
from ..vm.shape import Shape
from .files import CLAIM_TIMEOUT, SOCK_NAME, clean_stale, daemon_pid, kill_marked, pool_dir, vm_marker_in


@dataclasses.dataclass
class Claimed:
    """A pooled VM, now the container's: its directory is ``<run dir>/vm``."""

    id: str
    dir: Path
    qemu: int
    virtiofsd: int
    agent_sock: socket.socket
    console_sock: socket.socket
    hello: P.Hello
    disk: bool = False    # the container's disk took the VM's placeholder's place
    clone: bool = False   # restored from a snapshot (its share is 9p), else booted ...
    snapshot: str = ""    # ... this one
    memory: str = "private"  # its RAM: its own, or shared (a snapshot's pages)


def request(cfg: Config, req: dict[str, Any], timeout: float = 30.0) -> tuple[dict[str, Any], list[int]]:
    """One request to the daemon: its JSON reply and any fds passed with it."""
    # by a short /proc path: run_root may be deeper than sun_path's 108 bytes allow
    sock = connect_unix(cfg.run_root, SOCK_NAME, timeout)
    with sock:
        sock.sendall(json.dumps(req).encode() + b"\n")
        fds = array.array("i")
        data = b""
        while not data.endswith(b"\n"):
            chunk, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * fds.itemsize))
            if not chunk:
                break
            data += chunk
            for level, typ, payload in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    try:
        reply = json.loads(data)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise VmrtError("the pool daemon sent no valid reply") from None
    return reply, list(fds)


def running(cfg: Config) -> bool:
    return (cfg.run_root / SOCK_NAME).exists()


def claim(cfg: Config, shape: Shape, run_dir: Path, disk: Disk | None = None, *, memory: str = "private",
          writable: bool = False) -> Claimed | None:
    """A ready VM of ``shape`` moved into ``run_dir``, with the container's ``disk`` in place of its
    placeholder, or None (no daemon, none ready, pool off, the disk could not be swapped in).
    ``memory``: private (never a VM that shares a snapshot's pages) or shared (any);
    ``writable``: a writable volume will be in its share (a VM restored from a snapshot cannot)."""
    if cfg.pool == "off" or not running(cfg):
        return None
    req: dict[str, Any] = {"op": "claim", "shape": dataclasses.asdict(shape), "run_dir": str(run_dir),
                           "memory": memory, "writable": writable}
    if disk is not None:
        req["disk"] = {"path": str(disk.file), "size": disk.size}  # disk.img.tmp while mkfs runs
    try:
        reply, fds = request(cfg, req, timeout=CLAIM_TIMEOUT)
    except (OSError, VmrtError):
        return None  # a daemon that is gone or stuck is a pool miss, not a failure
    try:
        if not reply.get("ok") or len(fds) != 2:
            raise ProtocolError("no VM")
        hello = P.Hello.from_record(reply.get("hello"))
        vm = (str(reply["id"]), int(reply["qemu"]), int(reply["virtiofsd"]))
        clone, snap = bool(reply.get("clone")), str(reply.get("snapshot", ""))
        mem = str(reply.get("memory", "private"))
    except (ProtocolError, KeyError, TypeError, ValueError):
        for fd in fds:
            os.close(fd)
        if reply.get("ok") and (m := vm_marker_in(run_dir / "vm")) is not None:
            kill_marked(*m)  # the daemon moved it in and forgot it: nobody else would stop it
        return None
    agent, console = (socket.socket(fileno=fd) for fd in fds)
    for s in (agent, console):
        s.setblocking(False)
    return Claimed(vm[0], run_dir / "vm", vm[1], vm[2], agent, console, hello, disk=disk is not None, clone=clone,
                   snapshot=snap, memory=mem)


class PidProc:
    """A pooled VM's QEMU or virtiofsd: not our child, so held by a pidfd; its exit status
    comes from the pool daemon, which reaps it (255 if it never says).
    Enough of :class:`subprocess.Popen` for the driver."""

    def __init__(self, pid: int, status_file: Path) -> None:
        self.pid = pid
        self.status_file = status_file
        self.returncode: int | None = None
        self.pidfd = PidFd(pid)

    def poll(self) -> int | None:
        if self.returncode is None and self.pidfd.exited(0):
            self.returncode = self._status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self.pidfd.exited(timeout):
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            self.returncode = self._status()
        return self.returncode

    def _status(self) -> int:
        for _ in range(20):  # the daemon writes it when it reaps: just after the pidfd fired
            with contextlib.suppress(OSError, ValueError):
                return int(self.status_file.read_text())
            time.sleep(0.01)
        return 255

    def send_signal(self, signo: int) -> None:
        self.pidfd.send_signal(signo)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        self.pidfd.close()


def start(cfg: Config, size: int, timeout: float = 30.0) -> int:
    """``vmrt pool start``: the daemon in the background; returns its PID once it serves."""
    if (pid := daemon_pid(cfg)) is not None:
        raise UsageError(f"the pool daemon already runs (pid {pid}): `vmrt pool fill N` changes its size")
    fsmode.private_dir(pool_dir(cfg))
    with open(pool_dir(cfg) / "daemon.log", "ab", opener=fsmode.opener) as log:
        proc = subprocess.Popen(vmrt_here("pool", "serve", "--size", str(size)),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (pool_dir(cfg) / "daemon.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise VmrtError(f"the pool daemon exited: {tail[0] if tail else proc.returncode}")
        with contextlib.suppress(OSError, VmrtError):
            request(cfg, {"op": "status"}, timeout=2.0)
            return proc.pid
        time.sleep(0.05)
    proc.kill()
    raise VmrtError(f"the pool daemon did not start within {timeout:g}s")


def stop(cfg: Config, timeout: float = 60.0) -> bool:
    """``vmrt pool stop``: the daemon ends, its idle VMs with it. False if none ran."""
    pid = daemon_pid(cfg)
    if pid is None:  # none, or one that died: what it left is removed
        clean_stale(cfg)
        (cfg.run_root / SOCK_NAME).unlink(missing_ok=True)
        (pool_dir(cfg) / "daemon.pid").unlink(missing_ok=True)
        return False
    with contextlib.suppress(OSError, VmrtError):
        request(cfg, {"op": "stop"}, timeout=5.0)
    deadline = time.monotonic() + timeout
    while daemon_pid(cfg) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if daemon_pid(cfg) is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        clean_stale(cfg)
        (cfg.run_root / SOCK_NAME).unlink(missing_ok=True)
        (pool_dir(cfg) / "daemon.pid").unlink(missing_ok=True)
    return True
