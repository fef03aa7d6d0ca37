"""The pool daemon (``vmrt pool serve``): keeps ``pool_size`` VMs booted to their agent's
HELLO and hands one to each claim (see the package's docstring)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .. import cgroups, fsmode, layout, network, rootfs, snapshot
from .. import config as config_mod
from ..agent import protocol as P
from ..agent.hello import read_hello
from ..config import Config
from ..errors import UsageError, VmrtError
from ..proc import start_ticks
from ..vm import disk as vmdisk
from ..vm import jail
from ..vm.qemu import QemuVM
from ..vm.shape import Shape, default_spec
from ..vm.virtiofsd import P9Proxy, Virtiofsd
from .files import CLAIM_TIMEOUT, SOCK_NAME, clean_stale, pool_dir, remove_vm_dir

HOST_PIDS_MAX = 64  # QEMU's and virtiofsd's threads (as the driver's cgroup for a cold VM)
CONSOLE_LOG_MAX = 1 << 20
# the disk swap of a claim, all of it (QMP connect, the swap, the disconnect): 2 s below the
# client's wait, left for the request, the rename and the reply on a loaded host
SWAP_BUDGET = CLAIM_TIMEOUT - 2.0


@dataclasses.dataclass
class PoolVM:
    id: str
    dir: Path
    shape: Shape
    qemu: QemuVM | None = None
    vfs: Virtiofsd | P9Proxy | None = None  # a restored VM's share server is the 9p proxy helper
    hello: P.Hello | None = None
    booted: float = 0.0
    console_task: asyncio.Task[None] | None = None
    clone: bool = False       # restored from the snapshot of its shape (else booted) ...
    snapshot: str = ""        # ... this one
    memory: str = "private"   # its RAM: its own, or the snapshot's pages shared with other clones


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
            # restored from the snapshot of its shape where there is a valid one (as a run
            # without the pool would be), else booted
            snap = self._snapshot(vm.shape)
            if snap is not None:  # its share: a 9p export the proxy helper serves (jailed or not)
                vm.clone, vm.snapshot, vm.memory = True, snap.dir.name, config_mod.vm_memory(self.cfg, None)
                vm.vfs = P9Proxy(self.cfg, share, logs / "virtiofsd.log", die_with_parent=False, group=group)
            else:
                vm.vfs = Virtiofsd(self.cfg, share, spec.virtiofs_socket, logs / "virtiofsd.log",
                                   die_with_parent=False, group=group)
            vm.vfs.start()
            assert vm.vfs.proc is not None and vm.vfs.pid is not None
            self._track(vm.vfs.proc, vm.dir / "virtiofsd.status")
            # its NIC's tap waits in a namespace of its own; a claim moves it into the container's
            network.create_netns(vm.dir / "netns")
            tap = network.open_tap(vm.dir / "netns")
            # its disk is an empty placeholder until a claim swaps the container's in (vm/disk.py),
            # one of at most the default size (its jail's file size limit)
            placeholder = vmdisk.placeholder()
            spec = dataclasses.replace(spec, tap_fd=tap, disk_fd=placeholder,
                                       disk_max=vmdisk.parse_size(self.cfg.vm_storage_size))
            if snap is not None:
                spec = snapshot.restore_spec(spec, snap, share, private=vm.memory == "private")
            vm.qemu = QemuVM(self.cfg, spec, logs / "qemu.log", group=group,
                             fs_fd=vm.vfs.qemu_fd if isinstance(vm.vfs, P9Proxy) else None)
            try:
                vm.qemu.launch(die_with_parent=False)
            finally:
                os.close(tap)
                os.close(placeholder)
                if isinstance(vm.vfs, P9Proxy):
                    vm.vfs.handed()
            assert vm.qemu.proc is not None and vm.qemu.pid is not None
            self._track(vm.qemu.proc, vm.dir / "qemu.status")
            if not vm.qemu.jailed:
                group.add(vm.qemu.pid)
            (vm.dir / "pids.json").write_text(json.dumps({"id": vmid, "qemu": vm.qemu.pid,
                                                          "virtiofsd": vm.vfs.pid}))
            assert vm.qemu.console_sock is not None and vm.qemu.agent_sock is not None
            vm.console_task = asyncio.ensure_future(_log_console(vm.qemu.console_sock, vm.dir / "console.log"))
            if snap is not None:  # its QMP stays connected: the claim swaps the disk through it
                await vm.qemu.connect_qmp()
                await snapshot.restore(vm.qemu, snap, self.cfg.timeouts.agent_ready)
                vm.hello = snap.hello
            else:
                vm.hello = await asyncio.wait_for(read_hello(vm.qemu.agent_sock), self.cfg.timeouts.agent_ready)
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

    def _snapshot(self, shape: Shape) -> snapshot.Snapshot | None:
        """A valid snapshot of the pool's shape (``snapshot`` not off), else None: a cold boot."""
        snap = snapshot.find(self.cfg, shape)
        if snap is not None and (why := snap.verify()) is not None:
            print(f"vmrt pool: snapshot {snap.dir.name} refused ({why}): cold boot", file=sys.stderr, flush=True)
            return None
        return snap

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
            vm.qemu.close_channels()
        remove_vm_dir(vm.dir, vm.id)

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
                reply, fds, claimed = await self._handle(req)
            except (OSError, ValueError, TimeoutError) as e:
                reply, fds, claimed = {"ok": False, "error": str(e)}, [], None
            msg = json.dumps(reply).encode() + b"\n"
            conn.setblocking(True)
            sent = False
            with contextlib.suppress(OSError):
                if fds:
                    conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    conn.sendall(msg)
                sent = True
            for fd in fds:
                os.close(fd)
            if claimed is not None and not sent:
                # the client gave up (it cold-boots): the VM moved into its run dir has nobody
                # to stop it; killed and removed there, with the container's disk's fd
                print(f"vmrt pool: claimed VM {claimed.id} not taken: destroyed", file=sys.stderr, flush=True)
                self._destroy(claimed)

    async def _handle(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int], PoolVM | None]:
        """A request's reply, the fds that go with it and, for a claim, the VM handed out."""
        op = req.get("op")
        if op == "claim":
            return await self._claim(req)
        reply, fds = await self._request(op, req)
        return reply, fds, None

    async def _request(self, op: Any, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
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

    async def _claim(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int], PoolVM | None]:
        try:
            shape = Shape(**req["shape"])
            run_dir = Path(req["run_dir"])
            disk = req.get("disk")
            disk_size = int(disk["size"]) if disk is not None else 0
        except (KeyError, TypeError, ValueError) as e:
            return {"ok": False, "error": f"bad claim: {e}"}, [], None
        containers = (self.cfg.run_root / "containers").resolve()
        if run_dir.resolve().parent != containers or not run_dir.is_dir() or (run_dir / "vm").exists():
            return {"ok": False, "error": "a claim names a container's run dir"}, [], None
        # only the container's own disk, where vmrt keeps it: <root>/rw/<the run dir's id>/disk.img
        # (disk.img.tmp while its mkfs runs)
        rw = layout.rw_dir(self.cfg, run_dir.name)
        disk_path = Path(str(disk.get("path"))) if disk is not None else rw / vmdisk.IMAGE_NAME
        if disk is not None and (disk_path not in (rw / vmdisk.IMAGE_NAME, rw / vmdisk.TMP_NAME)
                                 or disk_size <= 0 or disk_size % 512):
            return {"ok": False, "error": "a claim's disk is the container's disk.img"}, [], None
        # a restored VM's 9p export is read-only (a writable volume's run restores its own VM);
        # a run that asks for private memory never gets the snapshot's pages
        writable, private = bool(req.get("writable")), req.get("memory") == "private"
        vm = next((v for v in self.ready if v.shape == shape and v.qemu is not None
                   and v.qemu.proc is not None and v.qemu.proc.poll() is None
                   and disk_size <= v.qemu.spec.disk_max and not (writable and v.clone)
                   and not (private and v.memory != "private")), None)
        if vm is None:
            return {"ok": False, "error": "no ready VM of that shape"}, [], None
        self.ready.remove(vm)
        assert vm.qemu is not None and vm.vfs is not None and vm.hello is not None
        if vm.console_task is not None:
            vm.console_task.cancel()
        if disk is not None:
            try:
                await asyncio.wait_for(self._swap_disk(vm.qemu, disk_path, disk_size), SWAP_BUDGET)
            except Exception as e:  # QMP's own errors too: the VM is not handed out, the run cold-boots
                self._destroy(vm)  # QEMU killed first: its QMP connection ends with it
                if vm.qemu.qmp is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(vm.qemu.qmp.disconnect(), 1.0)
                self.changed.set()  # refill
                err = str(e) or type(e).__name__
                return {"ok": False, "error": f"the container's disk could not be swapped in: {err}"}, [], None
        target = run_dir / "vm"
        os.rename(vm.dir, target)  # from now on: the container's (the share's mount moves along)
        for pid, path in list(self.status_files.items()):
            if path.parent == vm.dir:
                self.status_files[pid] = target / path.name
        vm.dir = target
        assert vm.qemu.agent_sock is not None and vm.qemu.console_sock is not None
        fds = [os.dup(vm.qemu.agent_sock.fileno()), os.dup(vm.qemu.console_sock.fileno())]
        vm.qemu.close_channels()
        self.served += 1
        self.changed.set()  # refill
        return {"ok": True, "id": vm.id, "qemu": vm.qemu.pid, "virtiofsd": vm.vfs.pid,
                "hello": vm.hello.record(), "clone": vm.clone, "snapshot": vm.snapshot, "memory": vm.memory}, fds, vm

    async def _swap_disk(self, qemu: QemuVM, path: Path, size: int) -> None:
        """The container's disk in place of the VM's placeholder (vm/disk.py), over QMP, which
        the daemon connects only now; the jailed QEMU's file size limit (the default disk size,
        at least: it was set before its disk was known) lowered to this disk's where the host
        lets us (CAP_SYS_RESOURCE). A restored VM's QMP is still connected from its restore."""
        if qemu.qmp is None:
            await qemu.connect_qmp()
        assert qemu.qmp is not None and qemu.pid is not None
        if qemu.jailed:
            limit = max(qemu.spec.memory_mib << 20, size)
            with contextlib.suppress(PermissionError):
                resource.prlimit(qemu.pid, resource.RLIMIT_FSIZE, (limit, limit))
        fd, direct = vmdisk.open_for_vmm(path)
        try:
            if os.fstat(fd).st_size != size:
                raise VmrtError(f"{path} is not of {size} bytes")
            await vmdisk.swap(qemu.qmp, fd, direct, size)
        finally:
            os.close(fd)
        await qemu.qmp.disconnect()  # all of it within the claim's SWAP_BUDGET
        qemu.qmp = None

    def _status(self) -> dict[str, Any]:
        shape = self.ready[0].shape if self.ready else None
        return {"pid": os.getpid(), "size": self.size, "ready": len(self.ready), "booting": self.booting,
                "served": self.served, "last_error": self.last_error,
                "shape": dataclasses.asdict(shape) if shape else None,
                "vms": [{"id": v.id, "qemu": v.qemu.pid if v.qemu else None,
                         "virtiofsd": v.vfs.pid if v.vfs else None, "since": v.booted,
                         "snapshot": v.snapshot, "memory": v.memory} for v in self.ready]}


async def _log_console(sock: socket.socket, path: Path) -> None:
    loop = asyncio.get_running_loop()
    written = 0
    with open(path, "ab", opener=fsmode.opener) as log:
        while data := await loop.sock_recv(sock, 65536):
            if written < CONSOLE_LOG_MAX:
                log.write(data[:CONSOLE_LOG_MAX - written])
                log.flush()
                written += len(data)
