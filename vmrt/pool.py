"""The warm pool: pre-booted micro-VMs waiting, agent ready, for a container (as Kata's VMCache).

``vmrt pool start`` runs the pool daemon (``vmrt pool serve`` in its own session, in the
background; ``vmrt pool stop`` ends it and kills its idle VMs). It keeps ``pool_size``
VMs of the default shape (memory, vCPUs, machine, kernel, initramfs, accelerator)
booted up to the agent's HELLO, each with its own virtiofsd serving an empty share
directory. ``vmrt run`` in VM mode asks it, over ``<run_root>/pool.sock``, for a VM of
the container's shape: the daemon moves that VM's directory into the container's run
dir, passes the agent and console channels (SCM_RIGHTS) and forgets the VM. From
then on the VM belongs to that one container and dies with it: a VM is never reused,
so no data crosses tenants. The container's rootfs is mounted into the share only
after the claim; the share is a shared mount, so the new mount propagates into
virtiofsd's mount namespace (a read-only overlay: read-only there too). The daemon
boots a replacement at once. No daemon, no ready VM of the right shape, or
``VMRT_POOL=off``: ``vmrt run`` cold-boots, as before.

The daemon is the parent of its VMs' QEMU and virtiofsd, also after a claim: it
reaps them and writes each one's exit status to ``<vm dir>/<name>.status``, where the
container's owner (watching them through pidfds) reads it. They are started without
a parent-death signal, so stopping the daemon never touches a claimed VM.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import agentbuild, cgroups, fsmode, kernel, network, rootfs
from .agent import protocol as P
from .config import Config
from .errors import AgentError, UsageError, VmrtError
from .proc import start_ticks
from .vm import accel as accel_mod
from .vm import jail
from .vm.qemu import EXEC_PORTS, QemuVM, VMSpec, exec_socket_name
from .vm.virtiofsd import Virtiofsd

SOCK_NAME = "pool.sock"
HOST_PIDS_MAX = 64  # QEMU's and virtiofsd's threads (as the driver's cgroup for a cold VM)
CLAIM_TIMEOUT = 5.0
CONSOLE_LOG_MAX = 1 << 20


def pool_dir(cfg: Config) -> Path:
    return cfg.run_root / "pool"


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a VM is booted with; a container takes a pooled VM only of exactly its shape."""

    memory_mib: int
    vcpus: int
    machine: str
    kernel: str
    initrd: str
    accel: str
    cmdline: str
    nic: bool = True   # a virtio-net NIC backed by a tap (every vmrt VM has one)

    @classmethod
    def of(cls, spec: VMSpec) -> Shape:
        return cls(spec.memory_mib, spec.vcpus, spec.machine, str(spec.kernel), str(spec.initrd),
                   spec.accel.name, spec.extra_cmdline)


def default_spec(cfg: Config, share_socket: Path, name: str) -> VMSpec:
    """The VM a container without -m/--cpus/--kernel gets: what the pool boots."""
    kernel_path, _ = kernel.find(cfg)
    acc = accel_mod.choose(cfg.accel, user_kernel=cfg.kernel is not None)
    return VMSpec(kernel=kernel_path, initrd=agentbuild.find(cfg), virtiofs_socket=share_socket,
                  memory_mib=cfg.memory_mib, cpus=cfg.cpus, accel=acc, machine=cfg.machine, name=name,
                  extra_cmdline=cfg.kernel_cmdline)


# --- the client side: `vmrt run`, `vmrt pool ...` ------------------------------------

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


def _connect(cfg: Config, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    dfd = os.open(cfg.run_root, os.O_PATH | os.O_DIRECTORY)
    try:  # by a short /proc path: run_root may be deeper than sun_path's 108 bytes allow
        sock.connect(f"/proc/self/fd/{dfd}/{SOCK_NAME}")
    except OSError:
        sock.close()
        raise
    finally:
        os.close(dfd)
    return sock


def request(cfg: Config, req: dict[str, Any], timeout: float = 30.0) -> tuple[dict[str, Any], list[int]]:
    """One request to the daemon: its JSON reply and any fds passed with it."""
    sock = _connect(cfg, timeout)
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


def claim(cfg: Config, shape: Shape, run_dir: Path) -> Claimed | None:
    """A ready VM of ``shape`` moved into ``run_dir``, or None (no daemon, none ready, pool off)."""
    if cfg.pool == "off" or not running(cfg):
        return None
    try:
        reply, fds = request(cfg, {"op": "claim", "shape": dataclasses.asdict(shape), "run_dir": str(run_dir)},
                             timeout=CLAIM_TIMEOUT)
    except (OSError, VmrtError):
        return None  # a daemon that is gone or stuck is a pool miss, not a failure
    if not reply.get("ok") or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        return None
    agent, console = (socket.socket(fileno=fd) for fd in fds)
    for s in (agent, console):
        s.setblocking(False)
    h = reply["hello"]
    return Claimed(reply["id"], run_dir / "vm", reply["qemu"], reply["virtiofsd"], agent, console,
                   P.Hello(h["version"], h["flags"], h["boot_ns"], h["ready_ns"], h["agent"]))


class PidProc:
    """A pooled VM's QEMU or virtiofsd: not our child, so watched through a pidfd; its exit
    status comes from the pool daemon, which reaps it (255 if it never says).
    Enough of :class:`subprocess.Popen` for the driver and :func:`vmrt.vm.procs.stop`."""

    def __init__(self, pid: int, status_file: Path) -> None:
        self.pid = pid
        self.status_file = status_file
        self.returncode: int | None = None
        self.fd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.fd], [], [], 0)[0]:
            self.returncode = self._status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self.fd], [], [], timeout)[0]:
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
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.fd, signo)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class AdoptedVM:
    """The VM driver's view of a claimed VM (the parts of :class:`QemuVM` it uses)."""

    def __init__(self, claimed: Claimed, run_dir: Path) -> None:
        self.claimed = claimed
        self.run_dir = run_dir
        self.proc = PidProc(claimed.qemu, claimed.dir / "qemu.status")
        self.agent_sock: socket.socket | None = claimed.agent_sock
        self.console_sock: socket.socket | None = claimed.console_sock
        for k in range(EXEC_PORTS):  # QEMU made them in its own dir: `vmrt exec` looks in the run dir
            (run_dir / exec_socket_name(k)).symlink_to(Path("vm") / exec_socket_name(k))

    @property
    def pid(self) -> int:
        return self.claimed.qemu

    def exited(self) -> int | None:
        return self.proc.poll()

    async def connect_qmp(self) -> None:
        """Nothing: a disposable VM is stopped with SIGKILL, no QMP needed."""

    async def shutdown(self) -> int | None:
        self.proc.kill()  # nothing in a used VM is worth a clean shutdown: it is never reused
        try:
            status = await asyncio.to_thread(self.proc.wait, 10.0)
        except subprocess.TimeoutExpired:
            status = None
        self.proc.close()
        for s in (self.agent_sock, self.console_sock):
            if s is not None:
                s.close()
        for k in range(EXEC_PORTS):
            (self.run_dir / exec_socket_name(k)).unlink(missing_ok=True)
        return status


class AdoptedVirtiofsd:
    def __init__(self, claimed: Claimed) -> None:
        self.pid = claimed.virtiofsd
        self.proc = PidProc(claimed.virtiofsd, claimed.dir / "virtiofsd.status")

    def stop(self) -> None:
        self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        self.proc.close()


# --- the daemon ------------------------------------------------------------------------

@dataclasses.dataclass
class PoolVM:
    id: str
    dir: Path
    shape: Shape
    qemu: QemuVM | None = None
    vfs: Virtiofsd | None = None
    hello: P.Hello | None = None
    booted: float = 0.0
    console_task: asyncio.Task[None] | None = None


class Daemon:
    def __init__(self, cfg: Config, size: int) -> None:
        self.cfg, self.size = cfg, size
        self.ready: list[PoolVM] = []
        self.booting = 0
        self.served = 0
        self.last_error = ""
        self.changed: asyncio.Event
        self.stop_event: asyncio.Event
        self.status_files: dict[int, Path] = {}   # pid -> where its exit status goes
        self.children: dict[int, Any] = {}        # pid -> Popen: kept, so subprocess never reaps them

    # --- lifetime ----------------------------------------------------------------
    def serve(self) -> int:
        return asyncio.run(self._serve())

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        self.changed, self.stop_event = asyncio.Event(), asyncio.Event()
        d = fsmode.private_dir(pool_dir(self.cfg))
        self._claim_pidfile(d / "daemon.pid")
        clean_stale(self.cfg)
        listener = self._listen()
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(s, self.stop_event.set)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        tasks = [asyncio.ensure_future(self._accept(listener)), asyncio.ensure_future(self._refill())]
        print(f"vmrt pool: serving {self.cfg.run_root / SOCK_NAME} (size {self.size})", file=sys.stderr, flush=True)
        try:
            await self.stop_event.wait()
        finally:
            (self.cfg.run_root / SOCK_NAME).unlink(missing_ok=True)
            listener.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            while self.ready:
                self._destroy(self.ready.pop())
            self._reap()
            (d / "daemon.pid").unlink(missing_ok=True)
        return 0

    def _claim_pidfile(self, path: Path) -> None:
        try:
            rec = json.loads(path.read_text())
            if start_ticks(int(rec["pid"])) == int(rec["ticks"]):
                raise UsageError(f"the pool daemon already runs (pid {rec['pid']})")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        path.write_text(json.dumps({"pid": os.getpid(), "ticks": start_ticks(os.getpid())}))

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dfd = os.open(self.cfg.run_root, os.O_PATH | os.O_DIRECTORY)
        try:
            name = f"/proc/self/fd/{dfd}/{SOCK_NAME}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            sock.bind(name)
            os.chmod(name, 0o600)
        finally:
            os.close(dfd)
        sock.listen(16)
        sock.setblocking(False)
        return sock

    def _reap(self) -> None:
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.pop(pid, None)
            path = self.status_files.pop(pid, None)
            if path is not None:  # atomically: a reader never sees half a number
                with contextlib.suppress(OSError):
                    tmp = path.with_name(path.name + ".tmp")
                    tmp.write_text(str(os.waitstatus_to_exitcode(st)))
                    os.rename(tmp, path)
            for vm in list(self.ready):  # an idle VM that died: gone from the pool
                if pid in (vm.qemu.pid if vm.qemu else 0, vm.vfs.pid if vm.vfs else 0):
                    self.ready.remove(vm)
                    self.last_error = f"pooled VM {vm.id} died while idle"
                    self._destroy(vm)
                    self.changed.set()

    # --- booting -----------------------------------------------------------------
    async def _refill(self) -> None:
        failures = 0
        while True:
            if len(self.ready) < self.size:
                ok = await self._boot()
                failures = 0 if ok else failures + 1
                self.changed.set()
                if failures:  # a VM that cannot boot: back off, do not spin
                    await asyncio.sleep(min(0.5 * 2 ** failures, 30.0))
                continue
            self.changed.clear()
            await self.changed.wait()

    async def _boot(self) -> bool:
        vmid = secrets.token_hex(6)
        vm = PoolVM(vmid, pool_dir(self.cfg) / vmid, shape=Shape(0, 0, "", "", "", "", ""))
        self.booting += 1
        try:
            vm.dir.mkdir(mode=0o700)
            share = vm.dir / "share"
            rootfs.share_top(share, shared=True)  # mounts made in it later reach virtiofsd's namespace
            rootfs.seal_share(share)  # a claim opens it for its mounts, then seals it again
            spec = default_spec(self.cfg, vm.dir / f"vfs-{vmid}.sock", f"vmrt-pool-{vmid}")
            vm.shape = Shape.of(spec)
            host_mib = spec.memory_mib + self.cfg.vm_host_overhead_mib
            group = cgroups.HostGroup(f"pool-{vmid}", memory_bytes=host_mib << 20, cpus=None, pids=HOST_PIDS_MAX)
            group.create()
            # virtiofsd and QEMU join the VM's cgroup before they start (a claim renames it the
            # container's: nothing is ever moved after it charged memory)
            logs = jail.vmm_log_dir(vm.dir)
            vm.vfs = Virtiofsd(self.cfg, share, spec.virtiofs_socket, logs / "virtiofsd.log", die_with_parent=False,
                               group=group)
            vm.vfs.start()
            assert vm.vfs.proc is not None and vm.vfs.pid is not None
            self._track(vm.vfs.proc, vm.dir / "virtiofsd.status")
            # its NIC's tap waits in a namespace of its own; a claim moves it into the container's
            network.create_netns(vm.dir / "netns")
            tap = network.open_tap(vm.dir / "netns")
            vm.qemu = QemuVM(self.cfg, dataclasses.replace(spec, tap_fd=tap), logs / "qemu.log", group=group)
            try:
                vm.qemu.launch(die_with_parent=False)
            finally:
                os.close(tap)
            assert vm.qemu.proc is not None and vm.qemu.pid is not None
            self._track(vm.qemu.proc, vm.dir / "qemu.status")
            if not vm.qemu.jailed:
                group.add(vm.qemu.pid)
            (vm.dir / "pids.json").write_text(json.dumps({"id": vmid, "qemu": vm.qemu.pid,
                                                          "virtiofsd": vm.vfs.pid}))
            assert vm.qemu.console_sock is not None and vm.qemu.agent_sock is not None
            vm.console_task = asyncio.ensure_future(_log_console(vm.qemu.console_sock, vm.dir / "console.log"))
            vm.hello = await asyncio.wait_for(_read_hello(vm.qemu.agent_sock), self.cfg.timeouts.agent_ready)
            vm.booted = time.time()
            self.ready.append(vm)
            return True
        except asyncio.CancelledError:  # the daemon stops: a VM half booted goes too
            self._destroy(vm)
            raise
        except (VmrtError, OSError, TimeoutError) as e:
            self.last_error = f"booting a pooled VM: {e or type(e).__name__}"
            print(f"vmrt pool: {self.last_error}", file=sys.stderr, flush=True)
            self._destroy(vm)
            return False
        finally:
            self.booting -= 1

    def _track(self, proc: Any, status_file: Path) -> None:
        self.children[proc.pid] = proc
        self.status_files[proc.pid] = status_file

    def _destroy(self, vm: PoolVM) -> None:
        """An idle VM killed and everything of it removed (it never served a container)."""
        if vm.console_task is not None:
            vm.console_task.cancel()
        for p in (vm.qemu.proc if vm.qemu else None, vm.vfs.proc if vm.vfs else None):
            if p is not None and p.returncode is None:
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, 0)
                self.children.pop(p.pid, None)
                self.status_files.pop(p.pid, None)
        if vm.qemu is not None:
            for s in (vm.qemu.agent_sock, vm.qemu.console_sock, vm.qemu._qmp_sock):
                if s is not None:
                    s.close()
        _remove_vm_dir(vm.dir, vm.id)

    # --- serving -----------------------------------------------------------------
    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            asyncio.ensure_future(self._client(conn))

    async def _client(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            data = b""
            try:
                while not data.endswith(b"\n") and len(data) < 65536:
                    chunk = await asyncio.wait_for(loop.sock_recv(conn, 65536), 10.0)
                    if not chunk:
                        return
                    data += chunk
                req = json.loads(data)
                reply, fds = await self._handle(req)
            except (OSError, ValueError, TimeoutError) as e:
                reply, fds = {"ok": False, "error": str(e)}, []
            msg = json.dumps(reply).encode() + b"\n"
            conn.setblocking(True)
            with contextlib.suppress(OSError):
                if fds:
                    conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    conn.sendall(msg)
            for fd in fds:
                os.close(fd)

    async def _handle(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op = req.get("op")
        if op == "claim":
            return self._claim(req)
        if op == "fill":
            if req.get("size") is not None:
                self.size = max(0, int(req["size"]))
                self.changed.set()
            if req.get("wait"):
                deadline = time.monotonic() + float(req.get("timeout", 300))
                while len(self.ready) < self.size and time.monotonic() < deadline:
                    self.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), 1.0)
            return {"ok": len(self.ready) >= self.size, **self._status()}, []
        if op == "drain":
            self.size = 0
            while self.ready:
                self._destroy(self.ready.pop())
            return {"ok": True, **self._status()}, []
        if op == "stop":
            self.stop_event.set()
            return {"ok": True}, []
        if op == "status":
            return {"ok": True, **self._status()}, []
        return {"ok": False, "error": f"unknown request {op!r}"}, []

    def _claim(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        try:
            shape = Shape(**req["shape"])
            run_dir = Path(req["run_dir"])
        except (KeyError, TypeError) as e:
            return {"ok": False, "error": f"bad claim: {e}"}, []
        containers = (self.cfg.run_root / "containers").resolve()
        if run_dir.resolve().parent != containers or not run_dir.is_dir() or (run_dir / "vm").exists():
            return {"ok": False, "error": "a claim names a container's run dir"}, []
        vm = next((v for v in self.ready if v.shape == shape and v.qemu is not None
                   and v.qemu.proc is not None and v.qemu.proc.poll() is None), None)
        if vm is None:
            return {"ok": False, "error": "no ready VM of that shape"}, []
        self.ready.remove(vm)
        assert vm.qemu is not None and vm.vfs is not None and vm.hello is not None
        if vm.console_task is not None:
            vm.console_task.cancel()
        target = run_dir / "vm"
        os.rename(vm.dir, target)  # from now on: the container's (the share's mount moves along)
        for pid, path in list(self.status_files.items()):
            if path.parent == vm.dir:
                self.status_files[pid] = target / path.name
        assert vm.qemu.agent_sock is not None and vm.qemu.console_sock is not None
        fds = [os.dup(vm.qemu.agent_sock.fileno()), os.dup(vm.qemu.console_sock.fileno())]
        for s in (vm.qemu.agent_sock, vm.qemu.console_sock, vm.qemu._qmp_sock):
            if s is not None:
                s.close()
        self.served += 1
        self.changed.set()  # refill
        h = vm.hello
        return {"ok": True, "id": vm.id, "qemu": vm.qemu.pid, "virtiofsd": vm.vfs.pid,
                "hello": {"version": h.version, "flags": h.flags, "boot_ns": h.boot_ns, "ready_ns": h.ready_ns,
                          "agent": h.agent}}, fds

    def _status(self) -> dict[str, Any]:
        shape = self.ready[0].shape if self.ready else None
        return {"pid": os.getpid(), "size": self.size, "ready": len(self.ready), "booting": self.booting,
                "served": self.served, "last_error": self.last_error,
                "shape": dataclasses.asdict(shape) if shape else None,
                "vms": [{"id": v.id, "qemu": v.qemu.pid if v.qemu else None,
                         "virtiofsd": v.vfs.pid if v.vfs else None, "since": v.booted} for v in self.ready]}


async def _read_hello(sock: socket.socket) -> P.Hello:
    loop = asyncio.get_running_loop()
    decoder = P.FrameDecoder(P.FROM_AGENT)
    while True:
        data = await loop.sock_recv(sock, 4096)
        if not data:
            raise AgentError("the guest agent channel closed during boot")
        for fr in decoder.feed(data):
            if fr.type != P.Msg.HELLO:
                raise AgentError(f"the guest agent sent {fr.type.name} before HELLO")
            h = P.decode_hello(fr.payload)
            if h.version != P.VERSION:
                raise AgentError(f"agent speaks protocol {h.version}, host speaks {P.VERSION}")
            if decoder.pending:
                raise AgentError("the guest agent sent more than HELLO")
            return h


async def _log_console(sock: socket.socket, path: Path) -> None:
    loop = asyncio.get_running_loop()
    written = 0
    with open(path, "ab", opener=fsmode.opener) as log:
        while data := await loop.sock_recv(sock, 65536):
            if written < CONSOLE_LOG_MAX:
                log.write(data[:CONSOLE_LOG_MAX - written])
                log.flush()
                written += len(data)


def _remove_vm_dir(d: Path, vmid: str) -> None:
    import shutil
    rootfs.umount_all(d)
    shutil.rmtree(d, ignore_errors=True)
    cgroups.remove_tree(f"{cgroups.PARENT}/pool-{vmid}")


def kill_marked(vmid: str, pids: dict[str, int]) -> None:
    """SIGKILL a pooled VM's processes if those PIDs still are theirs (their command lines name the VM)."""
    for pid in pids.values():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if vmid.encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def clean_stale(cfg: Config) -> None:
    """Idle VMs a dead daemon left behind (a crash, a reboot): killed and removed."""
    d = pool_dir(cfg)
    if not d.is_dir():
        return
    for sub in d.iterdir():
        if sub.is_dir():
            if (m := vm_marker_in(sub)) is not None:
                kill_marked(*m)
            _remove_vm_dir(sub, sub.name)


def vm_marker_in(d: Path) -> tuple[str, dict[str, int]] | None:
    try:
        rec = json.loads((d / "pids.json").read_text())
        return str(rec["id"]), {k: int(rec[k]) for k in ("qemu", "virtiofsd")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def daemon_pid(cfg: Config) -> int | None:
    try:
        rec = json.loads((pool_dir(cfg) / "daemon.pid").read_text())
        pid = int(rec["pid"])
        return pid if start_ticks(pid) == int(rec["ticks"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start(cfg: Config, size: int, timeout: float = 30.0) -> int:
    """``vmrt pool start``: the daemon in the background; returns its PID once it serves."""
    if (pid := daemon_pid(cfg)) is not None:
        raise UsageError(f"the pool daemon already runs (pid {pid}): `vmrt pool fill N` changes its size")
    fsmode.private_dir(pool_dir(cfg))
    with open(pool_dir(cfg) / "daemon.log", "ab", opener=fsmode.opener) as log:
        proc = subprocess.Popen([sys.executable, "-m", "vmrt", "pool", "serve", "--size", str(size)],
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
