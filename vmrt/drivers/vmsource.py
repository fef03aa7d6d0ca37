"""Where a container's VM comes from: a cold boot, a pooled VM or a snapshot restore.

Three implementations of one small interface, :class:`VMSource` (as Kata's VM
factory): ``start`` readies the container's share, gets a VM running and returns a
:class:`RunningVM`, the one type the VM driver's run loop works with, whatever the
source. :func:`choose` picks it: a pooled VM of the container's shape if the pool
daemon has one (vmrt/pool/), else a verified snapshot of that shape
(vmrt/snapshot.py), else a cold boot. The share is ``share/rootfs`` (the image,
read-only) and ``share/volumes/N`` (bind volumes), sealed read-only at its top. Every source
gives the VM the container's disk, its writable layer (vm/disk.py): a cold boot and a restore
on QEMU's command line, a pooled VM by the pool daemon's swap at the claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from .. import bundle, cgroups, config, network, rootfs, snapshot
from ..agent import protocol as P
from ..errors import LaunchError
from ..pool import client as pool_client
from ..pool import files
from ..vm import disk as vmdisk
from ..vm import jail
from ..vm.qemu import EXEC_PORTS, QemuVM, VMSpec, exec_socket_name
from ..vm.shape import Shape
from ..vm.virtiofsd import P9Proxy, Virtiofsd
from .base import RunContext


class Watched(Protocol):
    """A VM's process as the driver watches it: our child (Popen), or a pooled VM's, which
    the pool daemon reaps (:class:`vmrt.pool.client.PidProc`)."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


async def _nothing() -> None:
    """A pooled VM has nothing to connect: it is stopped with SIGKILL, no QMP needed."""


@dataclasses.dataclass
class RunningVM:
    """A container's VM, running: the agent and console channels, the processes to watch,
    and how it is connected and stopped."""

    source: str                         # "cold", "pool" or "snapshot"
    qemu: Watched
    agent_sock: socket.socket
    console_sock: socket.socket
    console_log: Path                   # a pooled VM's boot console is in its own dir: the rest follows it
    share_server: Watched | None        # virtiofsd or the 9p proxy helper (None: QEMU serves 9p itself)
    connect: Callable[[], Awaitable[None]] = _nothing   # QMP; a restore loads the saved state
    stop: Callable[[], Awaitable[object]] = _nothing    # QEMU and the channels, gone
    hello: P.Hello | None = None        # said already (pooled, restored): no wait for it
    clone: bool = False                 # restored: its share is 9p, its RNG state every clone's
    # the pool daemon reaps a pooled VM's processes and writes their exit statuses here
    status_files: tuple[Path, Path] | None = None
    join_group: bool = False            # an unjailed QEMU: joins the VM's cgroup once it runs
    disk: bool = False                  # the container's disk is the VM's (else its placeholder)
    handoff: bool = True                # a detached run's C monitor may own it (not a libvirt domain's)

    @property
    def pid(self) -> int:
        return self.qemu.pid

    def exited(self) -> int | None:
        return self.qemu.poll()

    async def shutdown(self) -> None:
        await self.stop()


@dataclasses.dataclass
class Launch:
    """What every source is given: the run, the VM it wants, the VM's host cgroup and the
    exit stack that undoes the share (the driver stops the VM itself)."""

    ctx: RunContext
    spec: VMSpec
    group: cgroups.HostGroup
    stack: contextlib.AsyncExitStack
    disk: vmdisk.Disk | None = None     # the container's writable layer (None: a tmpfs in the guest)


class VMSource(Protocol):
    name: str
    memory: str  # its guest RAM: private (its own), or shared (a snapshot's pages, with other clones)
    snapshot: str  # the snapshot its VM was restored from ("": booted)

    async def start(self, launch: Launch) -> RunningVM:
        """The share ready and the VM running (its HELLO may still be on its way)."""
        ...


def share_volumes(config: bundle.Spec, share: Path, stack: contextlib.AsyncExitStack) -> None:
    """Bind each volume's host source under share/volumes/N (read-only on the host too)."""
    vols = share / "volumes"
    for i, m in enumerate(bundle.user_mounts(config)):
        if m["type"] != "bind":
            continue
        vols.mkdir(exist_ok=True)
        src, target = Path(m["source"]), vols / str(i)
        try:
            is_dir = stat.S_ISDIR(os.stat(src).st_mode)
        except OSError as e:
            raise LaunchError(f"volume source {src}: {e.strerror}") from None
        if is_dir:
            target.mkdir()
        else:
            target.touch()
        rootfs.bind(src, target, readonly="ro" in m.get("options", []))
        stack.callback(rootfs.umount, target)


def _nic(ctx: RunContext, spec: VMSpec, fds: contextlib.ExitStack) -> VMSpec:
    """The VM's NIC: a tap in the container's network namespace, joined to its veth (its fd
    closed by ``fds``, whatever comes after)."""
    net = ctx.net
    if net is None or net.netns is None:  # no namespace of its own: an unconnected NIC (same shape)
        return dataclasses.replace(spec, tap_fd=_held(fds, network.open_tap_detached()))
    fd = _held(fds, network.open_tap(net.netns))
    net.plumb_in_background(ctx.cfg, "vm")  # veth + tc while QEMU boots; waited for before RUN
    ep = net.primary()
    return dataclasses.replace(spec, tap_fd=fd, mac=ep.mac if ep is not None else spec.mac)


def _disk(launch: Launch, spec: VMSpec, fds: contextlib.ExitStack) -> VMSpec:
    """The VM's disk: the container's (its fd, O_DIRECT where the host's file system can), else
    an empty placeholder (the fd closed by ``fds``)."""
    if launch.disk is None:
        return dataclasses.replace(spec, disk_fd=_held(fds, vmdisk.placeholder()), disk_direct=False, disk_size=0)
    fd, direct = vmdisk.open_for_vmm(launch.disk.file)
    return dataclasses.replace(spec, disk_fd=_held(fds, fd), disk_direct=direct, disk_size=launch.disk.size)


def _held(fds: contextlib.ExitStack, fd: int) -> int:
    """``fd``, closed when ``fds`` closes: after QEMU's launch (QEMU holds the tap and the disk
    then; they go when QEMU does) or on any error before it."""
    fds.callback(os.close, fd)
    return fd


def _running(vm: QemuVM, launch: Launch, source: str, share_server: Watched | None,
             connect: Callable[[], Awaitable[None]], **kw: Any) -> RunningVM:
    """A QEMU of ours, launched (a jailed one joined the VM's cgroup before it started)."""
    assert vm.proc is not None and vm.agent_sock is not None and vm.console_sock is not None
    return RunningVM(source, vm.proc, vm.agent_sock, vm.console_sock, launch.ctx.bundle_dir / "console.log",
                     share_server, connect=connect, stop=vm.shutdown, join_group=not vm.jailed,
                     disk=launch.disk is not None, **kw)


class ColdBoot:
    """Boot a new VM: virtiofsd serves the share, QEMU boots the kernel and the agent."""

    name = "cold"
    memory = "private"
    snapshot = ""

    async def start(self, launch: Launch) -> RunningVM:
        ctx, cfg, stack = launch.ctx, launch.ctx.cfg, launch.stack
        share = ctx.bundle_dir / "share"
        rootfs.share_top(share)
        rootfs.mount_readonly(ctx.layers, share / "rootfs")
        stack.callback(rootfs.umount, share / "rootfs")
        share_volumes(ctx.config, share, stack)
        rootfs.seal_share(share)
        ctx.timings.mark("rootfs-ready")
        logs = jail.vmm_log_dir(ctx.bundle_dir)  # bounded
        # nothing in a share changes while the container runs (no bind volume, no user network's
        # names): the guest may keep what it read (issue 17: image reads at tmpfs speed, not the
        # ~20 MB/s of re-reading a file through virtio-fs on every open)
        cache = "always" if cfg.virtiofs_cache == "auto" and not fresh_share(ctx) else None
        ctx.timings.info["share"] = f"virtio-fs cache={cache or cfg.virtiofs_cache}"
        vfs = Virtiofsd(cfg, share, launch.spec.virtiofs_socket, logs / "virtiofsd.log", group=launch.group,
                        cache=cache)
        if ctx.handoff is None:
            await asyncio.to_thread(vfs.start)
        else:  # its parent-death signal follows the thread that started it: the C monitor's one
            vfs.start()
        stack.callback(vfs.stop)
        assert vfs.proc is not None
        with contextlib.ExitStack() as fds:
            vm = QemuVM(cfg, _disk(launch, _nic(ctx, launch.spec, fds), fds), logs / "qemu.log", group=launch.group)
            vm.launch()
        ctx.timings.mark("vmm-spawned")
        return _running(vm, launch, self.name, vfs.proc, vm.connect_qmp)


class SnapshotRestore:
    """Restore a snapshot of the container's shape: its share is a 9p export (the proxy
    helper's, jailed or with a writable volume), its RUN carries SHARE_9P and a fresh seed."""

    name = "snapshot"

    def __init__(self, snap: snapshot.Snapshot, memory: str) -> None:
        self.snap, self.memory, self.snapshot = snap, memory, snap.dir.name

    async def start(self, launch: Launch) -> RunningVM:
        ctx, cfg, stack = launch.ctx, launch.ctx.cfg, launch.stack
        share = ctx.bundle_dir / "share"
        rootfs.share_top(share)
        share_rootfs(ctx, share / "rootfs")
        stack.callback(rootfs.umount, share / "rootfs")
        share_volumes(ctx.config, share, stack)  # vmrt's /etc files, read-only volumes: choose() checked
        rootfs.seal_share(share)
        ctx.timings.mark("rootfs-ready")
        logs = jail.vmm_log_dir(ctx.bundle_dir)
        writable = _writable_binds(ctx)
        proxy = None
        # the jailed QEMU cannot read the root-only share, and a writable volume's files are
        # written as their guest owners: a helper serves it (what is read-only there is so by
        # its mounts: the image's overlay, the share's top, each read-only volume's bind)
        if cfg.vmm_jail or writable:
            proxy = P9Proxy(cfg, share, logs / "virtiofsd.log", group=launch.group)
            proxy.start()
            stack.callback(proxy.stop)
        with contextlib.ExitStack() as fds:
            spec = _disk(launch, _nic(ctx, launch.spec, fds), fds)
            spec = snapshot.restore_spec(spec, self.snap, share, writable=writable, private=self.memory == "private")
            vm = QemuVM(cfg, spec,
                        logs / "qemu.log", group=launch.group, fs_fd=proxy.qemu_fd if proxy is not None else None)
            vm.launch()
        if proxy is not None:
            proxy.handed()
        ctx.timings.mark("vmm-spawned")

        async def connect() -> None:
            await vm.connect_qmp()
            await snapshot.restore(vm, self.snap, cfg.timeouts.agent_ready)

        return _running(vm, launch, self.name, proxy.proc if proxy is not None else None, connect,
                              hello=self.snap.hello, clone=True)


class PoolClaim:
    """A pooled VM, booted and waiting: its share gets the rootfs now; its processes stay
    the pool daemon's children (watched through pidfds) and are killed, never reused."""

    name = "pool"

    def __init__(self, claimed: pool_client.Claimed) -> None:
        self.claimed = claimed
        self.memory, self.snapshot = claimed.memory, claimed.snapshot

    async def start(self, launch: Launch) -> RunningVM:
        ctx, cfg, stack, c = launch.ctx, launch.ctx.cfg, launch.stack, self.claimed
        ctx.timings.mark("pool-claim")
        held: list[pool_client.PidProc] = []
        try:
            qemu = pool_client.PidProc(c.qemu, c.dir / "qemu.status")
            held.append(qemu)
            vfs = pool_client.PidProc(c.virtiofsd, c.dir / "virtiofsd.status")
            held.append(vfs)
            if ctx.net is not None and ctx.net.endpoints:  # its tap moves into the container's netns
                ctx.net.plumb_in_background(cfg, "vm", pool_netns=c.dir / "netns")
            # (--network none: the tap stays, unconnected, in the namespace the VM booted in)
            share = c.dir / "share"
            # an overlay without upper dir: read-only also in virtiofsd's namespace, where it propagates
            rootfs.seal_share(share, readonly=False)  # the guest runs nothing of the tenant's yet
            share_rootfs(ctx, share / "rootfs")
            stack.callback(rootfs.umount, share / "rootfs")
            share_volumes(ctx.config, share, stack)
            rootfs.seal_share(share)
            ctx.timings.mark("rootfs-ready")
            # QEMU, virtiofsd and virtiofsd's sandboxed child: now this container's cost
            # (its cgroup becomes the container's, renamed with what it charged, under the
            # container's limits: a process moved to another cgroup would leave its charges behind)
            launch.group.take_over(f"pool-{c.id}")
            for k in range(EXEC_PORTS):  # QEMU made them in its own dir: `vmrt exec` looks in the run dir
                (ctx.bundle_dir / exec_socket_name(k)).symlink_to(Path("vm") / exec_socket_name(k))
        except BaseException:
            self._kill(held)
            raise
        stack.callback(self._stop_share_server, vfs)

        async def stop() -> None:
            qemu.kill()  # nothing in a used VM is worth a clean shutdown: it is never reused
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(qemu.wait, 10.0)
            qemu.close()
            c.agent_sock.close()
            c.console_sock.close()
            for k in range(EXEC_PORTS):
                (ctx.bundle_dir / exec_socket_name(k)).unlink(missing_ok=True)

        return RunningVM(self.name, qemu, c.agent_sock, c.console_sock, c.dir / "console.log", vfs, stop=stop,
                         hello=c.hello, status_files=(c.dir / "qemu.status", c.dir / "virtiofsd.status"),
                         disk=c.disk, clone=c.clone)

    def _kill(self, held: list[pool_client.PidProc]) -> None:
        """A claim that failed half-way: the VM's processes killed (those not yet held by a
        pidfd, by their marks), its channels and exec-port links gone."""
        c = self.claimed
        for p in held:
            p.kill()
            p.close()
        files.kill_marked(c.id, {"qemu": c.qemu, "virtiofsd": c.virtiofsd})
        c.agent_sock.close()
        c.console_sock.close()
        for k in range(EXEC_PORTS):
            (c.dir.parent / exec_socket_name(k)).unlink(missing_ok=True)

    @staticmethod
    def _stop_share_server(vfs: pool_client.PidProc) -> None:
        vfs.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            vfs.wait(5.0)
        vfs.close()


def _poolable(config: bundle.Spec) -> bool:
    """A pooled VM serves any container of its shape, unless it has read-only bind volumes
    (those get their read-only flag after the bind reached virtiofsd: a cold boot does them)."""
    return not any(m["type"] == "bind" and "ro" in m.get("options", []) for m in bundle.user_mounts(config))


def _user_binds(ctx: RunContext) -> list[dict[str, Any]]:
    return [m for m in bundle.user_mounts(ctx.config) if m["type"] == "bind" and not m.get("org.vmrt.managed")]


def _writable_binds(ctx: RunContext) -> bool:
    return any("ro" not in m.get("options", []) for m in _user_binds(ctx))


def fresh_share(ctx: RunContext) -> bool:
    """Whether files in a clone's share change while it runs: a user network's names (rewritten
    in place), a bind volume's files (the host's): its 9p share is mounted uncached (SHARE_FRESH)."""
    return bool(_user_binds(ctx)) or (ctx.net is not None and any(n.user for n in ctx.net.networks.values()))


def _snapshot(ctx: RunContext, shape: Shape) -> tuple[snapshot.Snapshot | None, str]:
    """A verified snapshot of this shape (where files in the clone's share change while it
    runs, it mounts it uncached: :func:`fresh_share`); a corrupt one is refused with a notice:
    then a cold boot. With none, why (``--timings``: ``snapshot=none:WHY``); a missing one is
    built in the background (``snapshot = "auto"``) for the next run."""
    cfg = ctx.cfg
    if cfg.snapshot == "off":
        return None, "off"
    snap = snapshot.find(cfg, shape)
    if snap is not None and (why := snap.verify()) is not None:
        print(f"vmrt: notice: snapshot {snap.dir.name} refused ({why}): cold boot", file=sys.stderr, flush=True)
        snap = None
    if snap is not None:
        return snap, snap.dir.name
    if cfg.snapshot != "auto":
        return None, "missing"
    try:
        return None, f"missing,{snapshot.build_in_background(cfg, shape)}"
    except OSError as e:  # the run goes on (cold); the next one tries again
        print(f"vmrt: notice: cannot start a snapshot build: {e.strerror}", file=sys.stderr, flush=True)
        return None, "missing"


def share_rootfs(ctx: RunContext, target: Path) -> None:
    """The image at ``target`` read-only, for a VM that was booted before (a snapshot's clone, a
    pooled VM): an overlay without an upper dir, read-only in every mount namespace it propagates
    to. An OCI engine's rootfs (no image: ``ctx.image`` None) is often an overlay mount itself,
    whose merged directories carry xattrs a second overlay cannot pass on to the guest's copy-up
    (EOPNOTSUPP): it is bound read-only, as a cold boot shares every one-layer image."""
    if ctx.image is None:
        rootfs.mount_readonly(ctx.layers, target)
    else:
        rootfs.mount_readonly_overlay(ctx.layers, ctx.bundle_dir / "empty", target)


def choose(ctx: RunContext, spec: VMSpec, disk: vmdisk.Disk | None = None) -> VMSource:
    """A pooled VM of the container's shape, else a snapshot of it, else a cold boot
    (``--timings`` shows which: its ``pool`` and ``snapshot`` fields). A pooled VM gets the
    container's ``disk`` in the claim (the daemon swaps it in)."""
    shape = Shape.of(spec)
    memory = config.vm_memory(ctx.cfg, ctx.config.get("annotations", {}).get(bundle.VM_MEMORY))
    claimed = pool_client.claim(ctx.cfg, shape, ctx.bundle_dir, disk, memory=memory,
                                writable=_writable_binds(ctx)) if _poolable(ctx.config) else None
    ctx.timings.info["pool"] = claimed.id if claimed is not None else "none"
    if claimed is not None:
        ctx.timings.info["snapshot"] = "none"
        ctx.timings.info["memory"] = claimed.memory
        return PoolClaim(claimed)
    # an OCI engine's rootfs (often an overlay mount) through a clone's 9p share fails the
    # guest's copy-ups (EOPNOTSUPP): virtio-fs only, a pooled VM or a cold boot
    snap, why = _snapshot(ctx, shape) if ctx.image is not None else (None, "oci-bundle")
    ctx.timings.info["snapshot"] = why if snap is not None else f"none:{why}"
    if snap is None:
        return ColdBoot()
    ctx.timings.info["memory"] = memory
    return SnapshotRestore(snap, memory)
