"""The micro-VM driver: one QEMU + one virtiofsd per container.

Flow of ``run``: mount the image read-only in the bundle -> virtiofsd serves it
-> QEMU boots the vmrt kernel with the agent initramfs -> agent HELLO -> RUN
(from the bundle's config.json) -> relay stdio, signals and window size ->
EXIT -> QMP quit -> virtiofsd gone -> unmount. Cleanup runs in ``finally``
whatever happened, and every wait is bounded by a configurable timeout.

While the container runs the host PINGs the agent every ``agent_ping``
seconds; any frame from it counts as life. Nothing for ``agent_dead`` seconds
means the VM (or the agent) is hung: QEMU is killed and the run fails with
exit status 137, as Docker reports a killed container.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from .. import agentbuild, bundle, cgroups, fsmode, healthstate, kernel, network, seccomp
from ..agent import protocol as P
from ..agent.walk import WALK_ANNOTATION
from ..errors import AgentError, ContainerExecError, LaunchError, VmrtError
from ..layout import TTY_SIZE_NAME, VM_INFO_NAME
from ..proc import write_all
from ..signals import FORCE_KILL, FORWARDED, STOP_SIGNALS
from ..vm import accel as accel_mod
from ..vm import disk as vmdisk
from ..vm import jail
from ..vm.outcome import hung, virtiofsd_gone, vm_gone
from ..vm.qemu import VMSpec
from . import vmsource
from .base import Handoff, Option, RunContext

LOG = logging.getLogger(__name__)
STDIN_HIGH, STDIN_LOW = 1 << 20, 256 << 10
CONSOLE_LOG_MAX = 1 << 20
KERNEL_UP_MARK = b"vmrt-agent: init"
GUEST_OVERHEAD_MIB = 64    # guest kernel + agent beside a container's --memory
SHUTDOWN_GRACE = 2.0       # after SHUTDOWN, the VM's time to power off by itself (monitor.c's GRACE_MS)
HOST_PIDS_MAX = 512        # QEMU and virtiofsd threads of one VM, a bound against runaways


_TMPFS_FLAGS = {"ro": P.MountFlag.RO, "nosuid": P.MountFlag.NOSUID, "nodev": P.MountFlag.NODEV,
                "noexec": P.MountFlag.NOEXEC}
_TMPFS_CLEAR = {"rw": P.MountFlag.RO, "suid": P.MountFlag.NOSUID, "dev": P.MountFlag.NODEV,
                "exec": P.MountFlag.NOEXEC}


def guest_mounts(config: bundle.Spec) -> list[P.MountSpec]:
    """The bundle's volumes as the agent mounts them: bind sources are shared as volumes/N."""
    out = []
    for i, m in enumerate(bundle.user_mounts(config)):
        opts = m.get("options", [])
        if m["type"] == "bind":
            out.append(P.MountSpec(m["destination"], f"volumes/{i}", P.MountFlag.RO if "ro" in opts else 0))
            continue
        flags, data = int(P.MountFlag.TMPFS), []
        for o in opts:
            if o in _TMPFS_FLAGS:
                flags |= _TMPFS_FLAGS[o]
            elif o in _TMPFS_CLEAR:
                flags &= ~_TMPFS_CLEAR[o]
            else:
                data.append(o)
        out.append(P.MountSpec(m["destination"], None, flags, ",".join(data)))
    return out


def _default_seccomp(caps: dict[str, list[str]] | None) -> dict[str, Any]:
    """The default profile for a config written before VM configs carried one (a container
    created by an older vmrt and started now): never a VM container without the filter."""
    return seccomp.default_profile(list((caps or {}).get("bounding", bundle.DEFAULT_CAPS)), kernel=kernel.RELEASE)


def run_spec(config: bundle.Spec, stdin_open: bool) -> P.RunSpec:
    """Translate the bundle's OCI config into the agent's RUN message."""
    proc = config["process"]
    linux = config.get("linux", {})
    res = linux.get("resources", {})
    user = proc.get("user", {})
    size = proc.get("consoleSize") or {}
    caps = proc.get("capabilities")
    return P.RunSpec(
        caps=bundle.cap_mask(caps.get("bounding", [])) if caps is not None else None,
        no_new_privs=bool(proc.get("noNewPrivileges")),
        args=list(proc["args"]), env=list(proc.get("env", [])), cwd=proc.get("cwd", "/"),
        hostname=config.get("hostname") or "vmrt", uid=int(user.get("uid", 0)),
        gid=int(user.get("gid", 0)), groups=[int(g) for g in user.get("additionalGids", [])],
        tty=(int(size.get("height", 24)), int(size.get("width", 80))) if proc.get("terminal") else None,
        stdin=stdin_open, time_ns=time.time_ns(),
        readonly=bool(config.get("root", {}).get("readonly")), mounts=guest_mounts(config),
        memory_max=int(res.get("memory", {}).get("limit") or 0), pids_max=int(res.get("pids", {}).get("limit") or 0),
        seccomp=seccomp.compile_bpf(linux.get("seccomp") or _default_seccomp(caps)),
        masked=list(linux.get("maskedPaths") or []), ro_paths=list(linux.get("readonlyPaths") or []),
        walk=config.get("annotations", {}).get(WALK_ANNOTATION) in ("true", "content"),  # a tool run's (offline.py)
        walk_content=config.get("annotations", {}).get(WALK_ANNOTATION) == "content",  # a build step's (build.py)
        rlimits=guest_rlimits(proc.get("rlimits") or []))


def guest_rlimits(rlimits: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """OCI ``process.rlimits`` as the agent's (resource, soft, hard): the guest's resource numbers
    are the host's (same architecture); RLIM_INFINITY stays all ones."""
    import resource  # on use: only a run with rlimits maps their names
    out = []
    for r in rlimits:
        name = str(r.get("type", ""))
        number = getattr(resource, name, None) if name.startswith("RLIMIT_") else None
        if not isinstance(number, int):
            raise LaunchError(f"unknown rlimit {name!r}")
        out.append((number, int(r.get("soft", 0)), int(r.get("hard", 0))))
    return out


def guest_net(att: network.Attached | None) -> P.NetSpec | None:
    """What the agent's NET record carries for the VM's eth0 (None: it stays down): the
    network's endpoint in the agent protocol's terms (the network never speaks it)."""
    ep = att.primary() if att is not None else None
    if ep is None or att is None:
        return None
    net = att.networks[ep.network_id]
    return P.NetSpec(address=ep.ip, prefix=ipaddress.IPv4Network(net.subnet).prefixlen,
                     gateway=net.gateway or None, mac=ep.mac, mtu=att.mtu)


def guest_net6(att: network.Attached | None) -> P.Net6Spec | None:
    """What the agent's NET6 record carries (None: IPv6 off on the VM's eth0, as on a process
    container's on a network without IPv6)."""
    ep = att.primary() if att is not None else None
    if ep is None or att is None or not ep.ip6 or not att.networks[ep.network_id].ipv6:
        return None
    net = att.networks[ep.network_id]
    return P.Net6Spec(address=ep.ip6, prefix=ipaddress.IPv6Network(net.subnet6).prefixlen,
                      gateway=net.gateway6 or None)


def _wait_quietly(proc: vmsource.Watched, timeout: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


class VMDriver:
    name = "vm"

    def __init__(self, accel: str | None = None, kernel_path: Path | None = None,
                 notice: bool = True) -> None:
        self.accel_req = accel
        self.kernel_path = kernel_path
        self.notice = notice

    def run(self, ctx: RunContext) -> int:
        return asyncio.run(_Session(ctx, self).run())

    def source(self, ctx: RunContext, spec: VMSpec, disk: vmdisk.Disk | None) -> vmsource.VMSource:
        """Where the VM comes from: a pooled VM, a snapshot or a cold boot of vmrt's own QEMU
        (the libvirt driver, drivers/libvirt.py, has libvirt create it)."""
        return vmsource.choose(ctx, spec, disk)


class _Session:
    def __init__(self, ctx: RunContext, drv: VMDriver) -> None:
        self.ctx, self.drv = ctx, drv
        self.cfg = ctx.cfg
        self.loop: asyncio.AbstractEventLoop
        self.decoder = P.FrameDecoder(P.FROM_AGENT)
        self.hello: asyncio.Future[P.Hello]
        self.started: asyncio.Future[int]
        self.exited: asyncio.Future[P.Exit]
        # WALK_AFTER (a build step): the second EXIT, the walk's; after the first, STDOUT is the walk
        self.walked: asyncio.Future[P.Exit] | None = None
        self.out_fd = ctx.stdout_fd
        # frames to the agent: control (RUN, SIGNAL, RESIZE, SHUTDOWN) go before stdin data,
        # and stdin is read only while less than STDIN_HIGH bytes wait to be sent
        self.ctlq: collections.deque[bytes | None] = collections.deque()
        self.dataq: collections.deque[bytes] = collections.deque()
        self.data_bytes = 0
        self.wake = asyncio.Event()
        self.data_room = asyncio.Event()
        self.data_room.set()
        self.stdin_reader_paused = False
        self.stdin_made_nonblocking = False
        self.force_timer: asyncio.TimerHandle | None = None
        self.console_tail = bytearray()
        self.stop_signals = 0
        self.shutdown_sent = False  # SHUTDOWN: the agent syncs the disk and powers off by itself
        self.vm: vmsource.RunningVM | None = None
        self.group: cgroups.HostGroup | None = None
        self.tty_restore: list[Any] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        # liveness (after STARTED): loop time of the last bytes from the agent, and whether
        # the agent reader is blocked writing output to our stdout (then nothing is read)
        self.last_rx = 0.0
        self.writing_output = False

    # --- plumbing --------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        t = asyncio.ensure_future(coro)
        self.tasks.append(t)
        return t

    def _fail_futures(self, exc: BaseException) -> None:
        futures: list[asyncio.Future[Any]] = [self.hello, self.started, self.exited]
        for f in (*futures, *([self.walked] if self.walked else [])):
            if not f.done():
                f.set_exception(exc)
                f.exception()  # mark retrieved

    async def _read_agent(self, sock: socket.socket) -> None:
        try:
            while True:
                data = await self.loop.sock_recv(sock, 1 << 17)
                if not data:
                    self.decoder.close()
                    raise await self._channel_closed_error()
                self.last_rx = self.loop.time()
                for fr in self.decoder.feed(data):
                    if fr.type in (P.Msg.STDOUT, P.Msg.STDERR):
                        # a slow reader of our stdout must not stall signals and timeouts
                        self.ctx.timings.mark("first-output")
                        fd = self.out_fd if fr.type == P.Msg.STDOUT else self.ctx.stderr_fd
                        if self.ctx.tee is not None and fd != self.ctx.walk_fd:
                            self.ctx.tee("stdout" if fr.type == P.Msg.STDOUT else "stderr", fr.payload)
                        self.writing_output = True
                        try:
                            await asyncio.to_thread(write_all, fd, fr.payload)
                        finally:
                            self.writing_output = False
                            self.last_rx = self.loop.time()
                    else:
                        self._dispatch(fr)
        except (VmrtError, OSError) as e:
            if isinstance(e, OSError):
                e = AgentError(f"guest agent channel: {e.strerror}")
            self._fail_futures(e)

    def _dispatch(self, fr: P.Frame) -> None:
        if fr.type == P.Msg.HELLO:
            h = P.decode_hello(fr.payload)
            if h.version != P.VERSION:
                raise AgentError(f"agent speaks protocol {h.version}, host speaks {P.VERSION}")
            if not self.hello.done():
                self.hello.set_result(h)
        elif fr.type == P.Msg.STARTED:
            pid = P.decode_started(fr.payload)
            if not self.started.done():
                self.started.set_result(pid)
        elif fr.type == P.Msg.ERROR:
            err = P.decode_error(fr.payload)
            code = err.code if err.code in (125, 126, 127) else 125
            self._fail_futures(ContainerExecError(err.message, exit_code=code))
        elif fr.type == P.Msg.EXIT:
            ex = P.decode_exit(fr.payload)
            if not self.exited.done():
                self.exited.set_result(ex)
                if self.walked is not None and ex.status == 0 and self.ctx.walk_fd is not None:
                    self.out_fd = self.ctx.walk_fd  # what follows is the layer's walk (WALK_AFTER)
            elif self.walked is not None and not self.walked.done() and self.out_fd == self.ctx.walk_fd:
                self.walked.set_result(ex)
        elif fr.type == P.Msg.PONG:
            P.decode_cookie(fr.payload)  # life is any frame (last_rx); the cookie is not matched

    def _send(self, frame: bytes | None) -> None:
        self.ctlq.append(frame)
        self.wake.set()

    def _send_stdin(self, frame: bytes) -> None:
        self.dataq.append(frame)
        self.data_bytes += len(frame)
        if self.data_bytes >= STDIN_HIGH:
            self.data_room.clear()
        self.wake.set()

    async def _writer(self, sock: socket.socket) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.ctlq or self.dataq:
                if self.ctlq:
                    frame = self.ctlq.popleft()
                    if frame is None:
                        return
                else:
                    frame = self.dataq.popleft()
                    self.data_bytes -= len(frame)
                    if self.data_bytes <= STDIN_LOW:
                        self.data_room.set()
                        if self.stdin_reader_paused:
                            self.stdin_reader_paused = False
                            self.loop.add_reader(self.ctx.stdin_fd, self._stdin_readable)
                try:
                    await self.loop.sock_sendall(sock, frame)
                except OSError:
                    return

    async def _read_console(self, sock: socket.socket, log_path: Path) -> None:
        written = 0
        with open(log_path, "ab", opener=fsmode.opener) as log:
            while True:
                try:
                    data = await self.loop.sock_recv(sock, 65536)
                except OSError:
                    return
                if not data:
                    return
                if written < CONSOLE_LOG_MAX:  # a guest can print without end: keep the head
                    chunk = data[:CONSOLE_LOG_MAX - written]
                    log.write(chunk)
                    log.flush()
                    written += len(chunk)
                self.console_tail += data
                if KERNEL_UP_MARK in self.console_tail:
                    self.ctx.timings.mark("kernel-up")
                del self.console_tail[:-8192]

    def _vm_gone(self, status: int) -> AgentError:
        host_oom = self.group is not None and self.group.oom_kills() > 0
        if host_oom and self.ctx.state is not None:
            self.ctx.state.set_fields(self.ctx.container, oom_killed=True)
        return vm_gone(status, bytes(self.console_tail), host_oom)

    async def _channel_closed_error(self) -> AgentError:
        assert self.vm is not None
        for _ in range(40):  # the channel closes first when QEMU dies: say why
            if (status := self.vm.exited()) is not None:
                return self._vm_gone(status)
            await asyncio.sleep(0.025)
        return AgentError("guest agent channel closed")

    async def _watch_qemu(self) -> None:
        assert self.vm is not None
        status = await asyncio.to_thread(self.vm.qemu.wait)
        await asyncio.sleep(0.2)  # let the agent reader deliver what arrived first
        self._fail_futures(self._vm_gone(status))

    async def _watch_share_server(self, server: vmsource.Watched) -> None:
        status = await asyncio.to_thread(server.wait)
        await asyncio.sleep(0.5)  # virtiofsd also exits when QEMU dies: let QEMU's watcher say so
        if self.vm is not None and self.vm.exited() is not None:
            return
        self._fail_futures(virtiofsd_gone(status))

    async def _liveness(self) -> None:
        """After STARTED: PING the agent every agent_ping s (at most agent_dead/2); if nothing
        at all comes from it for agent_dead s, the VM is hung: fail the run with 137 and kill
        QEMU (a hung VM answers no QMP quit; the teardown does the rest). 0 disables it."""
        dead = self.cfg.timeouts.agent_dead
        if dead <= 0:
            return
        ping = min(self.cfg.timeouts.agent_ping, dead / 2) if self.cfg.timeouts.agent_ping > 0 else dead / 2
        step = max(0.05, ping / 4)
        cookie = 0
        now = last_ping = self.last_rx = self.loop.time()
        while True:
            await asyncio.sleep(step)
            before, now = now, self.loop.time()
            if self.writing_output or now - before > step + 1.0:
                # our stdout's reader, or this process itself (stopped, starved), held us up:
                # nothing could be read meanwhile, which says nothing about the agent
                self.last_rx = max(self.last_rx, now)
            if now - self.last_rx >= dead:
                self._hung(dead)
                return
            if now - last_ping >= ping:
                cookie += 1
                self._send(P.encode_ping(cookie))
                last_ping = now

    def _hung(self, dead: float) -> None:
        LOG.debug("no frame from the agent for %gs: killing the VM", dead)
        self._fail_futures(hung(dead))
        proc = self.vm.qemu if self.vm is not None else None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()  # SIGKILL works on a stopped process too

    async def _wait(self, fut: asyncio.Future[Any], timeout: float, phase: str) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            tail = self.console_tail.decode(errors="replace").strip().splitlines()[-3:]
            console = "; console: " + " | ".join(tail) if tail else ""
            raise AgentError(f"timed out after {timeout:g}s waiting for {phase} "
                             f"(raise it with VMRT_TIMEOUT_*){console}") from None

    # --- signals, terminal, stdin ---------------------------------------------
    def _on_signal(self, signo: int) -> None:
        if signo == FORCE_KILL:
            self._force_kill("killed")
            return
        if self.started.done() and not self.started.exception():
            if signo in STOP_SIGNALS:
                self.stop_signals += 1
                if self.stop_signals >= 2:
                    self._force_kill("a second stop signal")
                    return
                if self.force_timer is None:  # bounded, like `docker stop`
                    grace = self.cfg.timeouts.stop_grace
                    self.force_timer = self.loop.call_later(
                        grace, self._force_kill, f"no exit {grace:g}s after signal {signo}")
            self._send(P.encode_signal(signo))
        else:
            self._fail_futures(VmrtError(f"interrupted by signal {signo}", exit_code=128 + signo))

    def _force_kill(self, why: str) -> None:
        self._send(P.encode(P.Msg.SHUTDOWN))
        self.shutdown_sent = True
        self._fail_futures(VmrtError(f"container killed: {why}", exit_code=137))

    def _on_winch(self) -> None:
        try:
            sz = os.get_terminal_size(self.ctx.stdout_fd)
        except OSError:
            return
        self._send(P.encode_resize(sz.lines, sz.columns))

    def _start_stdin(self) -> None:
        fd = self.ctx.stdin_fd
        if stat.S_ISREG(os.fstat(fd).st_mode):
            self._spawn(self._stdin_thread(fd))
            return
        os.set_blocking(fd, False)
        self.stdin_made_nonblocking = True
        try:
            self.loop.add_reader(fd, self._stdin_readable)
        except PermissionError:  # not pollable (e.g. /dev/null): read it in a thread
            os.set_blocking(fd, True)
            self.stdin_made_nonblocking = False
            self._spawn(self._stdin_thread(fd))

    def _stdin_readable(self) -> None:
        fd = self.ctx.stdin_fd
        try:
            data = os.read(fd, 32768)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._send_stdin(P.encode(P.Msg.STDIN, data))
            if self.data_bytes >= STDIN_HIGH:
                self.loop.remove_reader(fd)
                self.stdin_reader_paused = True
        else:
            self.loop.remove_reader(fd)
            self._send_stdin(P.encode(P.Msg.STDIN_CLOSE))

    async def _stdin_thread(self, fd: int) -> None:
        while True:
            await self.data_room.wait()
            data = await asyncio.to_thread(os.read, fd, 32768)
            if not data:
                break
            self._send_stdin(P.encode(P.Msg.STDIN, data))
        self._send_stdin(P.encode(P.Msg.STDIN_CLOSE))

    # --- the run ----------------------------------------------------------------
    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.hello, self.started, self.exited = (self.loop.create_future() for _ in range(3))
        if self.ctx.walk_fd is not None:
            self.walked = self.loop.create_future()
        ctx = self.ctx
        for s in (*FORWARDED, FORCE_KILL):
            self.loop.add_signal_handler(s, self._on_signal, s)
        stack = contextlib.AsyncExitStack()
        try:
            async with stack:
                return await self._run(stack)
        finally:
            for s in (*FORWARDED, FORCE_KILL):
                self.loop.remove_signal_handler(s)
            self._restore_terminal()
            ctx.timings.mark("teardown-done")

    def _restore_terminal(self) -> None:
        if self.tty_restore is not None:
            termios.tcsetattr(self.ctx.stdin_fd, termios.TCSADRAIN, self.tty_restore)
            self.tty_restore = None
        if self.stdin_made_nonblocking:
            with contextlib.suppress(OSError):
                self.loop.remove_reader(self.ctx.stdin_fd)
                os.set_blocking(self.ctx.stdin_fd, True)

    async def _run(self, stack: contextlib.AsyncExitStack) -> int:
        ctx, cfg, t = self.ctx, self.cfg, self.ctx.timings
        if self.drv.kernel_path is None:
            kernel_path, build_id = kernel.find(cfg)
        else:
            kernel_path, build_id = self.drv.kernel_path, "user-supplied"
        if not kernel_path.is_file():
            raise LaunchError(f"kernel {kernel_path} not found")
        initrd = agentbuild.find(cfg)
        acc = accel_mod.choose(self.drv.accel_req or cfg.accel,
                               user_kernel=self.drv.kernel_path is not None or cfg.kernel is not None)
        if acc.name == "tcg" and self.drv.notice and (self.drv.accel_req or cfg.accel) == "auto":
            print(f"vmrt: notice: {acc.reason}", file=sys.stderr, flush=True)
        t.info.update(accel=acc.name, machine=cfg.machine, kernel=build_id)
        bdir = ctx.bundle_dir
        resources = ctx.config["linux"].get("resources", {})
        limit = resources.get("memory", {}).get("limit")
        # the guest gets the container's limit plus room for its kernel and agent; the limit
        # itself is enforced by the guest's cgroup (exit 137 + OOM flag, as in process mode)
        mem_mib = max(64, (int(limit) >> 20) + GUEST_OVERHEAD_MIB) if limit else cfg.memory_mib
        quota = resources.get("cpu", {})
        cpus = quota["quota"] / quota["period"] if quota else cfg.cpus
        group = cgroups.HostGroup(f"{ctx.container.id}-vmm",
                                  memory_bytes=(mem_mib + cfg.vm_host_overhead_mib) << 20,
                                  cpus=cpus if quota else None, pids=HOST_PIDS_MAX)
        self.group = group
        stack.callback(group.remove)
        group.create()
        # virtiofsd derives its pid file from the socket name: keep it unique per container
        spec = VMSpec(kernel=kernel_path, initrd=initrd, virtiofs_socket=bdir / f"vfs-{ctx.container.id[:16]}.sock",
                      memory_mib=mem_mib, cpus=cpus, accel=acc, machine=cfg.machine,
                      name=f"vmrt-{ctx.container.id[:12]}", extra_cmdline=cfg.kernel_cmdline)
        disk = self._disk()
        if disk is not None:
            stack.callback(disk.abort)
        source = self.drv.source(ctx, spec, disk)
        vm = self.vm = await source.start(vmsource.Launch(ctx, spec, group, stack, disk))
        stack.push_async_callback(self._teardown_vm)  # at once: whatever fails next, the VM goes
        # for `vmrt inspect`: where its VM came from, whether its RAM pages are shared
        fsmode.write_private(bdir / VM_INFO_NAME, json.dumps(
            {"Source": source.name, "Snapshot": source.snapshot, "Memory": source.memory}))
        if vm.join_group:
            group.add(vm.pid)
        server = vm.share_server
        if ctx.state is not None:
            ctx.state.set_fields(ctx.container, pids={"qemu": vm.pid, **({"virtiofsd": server.pid} if server else {})})

        self._spawn(self._read_console(vm.console_sock, vm.console_log))
        self._spawn(self._read_agent(vm.agent_sock))
        self._spawn(self._writer(vm.agent_sock))
        self._spawn(self._watch_qemu())
        if server is not None:
            self._spawn(self._watch_share_server(server))
        await vm.connect()
        if vm.hello is not None:
            self.hello.set_result(vm.hello)

        hello = await self._wait(self.hello, cfg.timeouts.agent_ready, "the guest agent (boot)")
        t.mark("agent-ready")
        t.info["agent"] = hello.agent
        proc = ctx.config["process"]
        stdin_open = ctx.config.get("annotations", {}).get("org.vmrt.stdin") == "true"
        if proc.get("terminal") and os.isatty(ctx.stdout_fd):
            sz = os.get_terminal_size(ctx.stdout_fd)
            proc["consoleSize"] = {"height": sz.lines, "width": sz.columns}
        rs = run_spec(ctx.config, stdin_open)
        if vm.clone:  # its share is 9p, its RNG state is every clone's until reseeded
            rs.share_9p, rs.seed = True, os.urandom(64)
            rs.share_fresh = vmsource.fresh_share(ctx)  # names, volumes: 9p reads uncached there
        rs.net, rs.net6 = guest_net(ctx.net), guest_net6(ctx.net)
        rs.walk_after = ctx.walk_fd is not None
        if disk is not None and vm.disk:  # formatted while the VM booted
            await asyncio.to_thread(disk.ready)
            t.mark("disk-ready")
            rs.upper_disk = P.DiskSpec(vmdisk.DEVICE, disk.size)
            rs.disk_scratch = ctx.scratch  # run --rm: nothing reads the disk after exit, no sync
        if ctx.net is not None:  # the VM's side of the network is joined before its process runs
            await asyncio.to_thread(ctx.net.wait)
        if ctx.gate is not None:
            await self._gated(ctx.gate)
        if ctx.handoff is not None and vm.handoff:
            await self._handoff(P.encode_run(rs), stdin_open)
        self._send(P.encode_run(rs))
        await self._wait(self.started, cfg.timeouts.start, "the container process to start")
        t.mark("process-started")
        self._spawn(self._liveness())
        if proc.get("terminal"):
            if os.isatty(ctx.stdin_fd) and stdin_open:
                self.tty_restore = termios.tcgetattr(ctx.stdin_fd)
                tty.setraw(ctx.stdin_fd)
            self.loop.add_signal_handler(signal.SIGWINCH, self._on_winch)
            stack.callback(self.loop.remove_signal_handler, signal.SIGWINCH)
        if stdin_open:
            self._start_stdin()
        ex: P.Exit = await self.exited
        t.mark("exit")
        if self.walked is not None and ex.status == 0:
            walked: P.Exit = await self.walked
            t.mark("walked")
            if walked.status != 0:
                raise AgentError(f"the guest's walk of the writable layer failed (status {walked.status})")
        if ex.oom and ctx.state is not None:
            ctx.state.set_fields(ctx.container, oom_killed=True)
        return ex.status

    async def _gated(self, gate: Callable[[], Awaitable[None]]) -> None:
        """Wait for ``gate`` (an OCI start), or for what ends the run first (a signal, the VM's
        death: they fail ``started``)."""
        waiting: asyncio.Future[None] = asyncio.ensure_future(gate())
        started: asyncio.Future[Any] = self.started
        await asyncio.wait([waiting, started], return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            self.started.result()  # its error
        waiting.result()

    def _disk(self) -> vmdisk.Disk | None:
        """The container's writable layer: its disk (kept in its writable-layer dir until rm, of
        its ``--storage-opt size=``, else ``vm_storage_size``), or None: a tmpfs in the guest,
        bounded by its RAM (no such dir, or ``vm_storage_size`` 0; ``--timings`` says so)."""
        ctx = self.ctx
        if ctx.rw_dir is None:
            ctx.timings.info["upper"] = "tmpfs (no writable-layer dir for a disk)"
            return None
        want = ctx.config.get("annotations", {}).get(bundle.STORAGE_SIZE)
        if not want and vmdisk.parse_size(self.cfg.vm_storage_size) == 0:
            ctx.timings.info["upper"] = "tmpfs (vm_storage_size 0)"
            return None
        size = int(want) if want else vmdisk.storage_size(self.cfg.vm_storage_size, "vm_storage_size")
        disk = vmdisk.prepare(ctx.rw_dir, size)
        ctx.timings.info["upper"] = f"disk {disk.size >> 20}m"
        return disk

    async def _handoff(self, run_frame: bytes, stdin_open: bool) -> None:
        """Give the booted VM to the C monitor: it sends RUN and does the rest (never returns).
        Before RUN the agent sends nothing after HELLO, so no frame is cut in two here."""
        vm, b = self.vm, self.ctx.bundle_dir
        assert vm is not None and self.ctx.handoff is not None
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        if self.decoder.pending or self.ctlq or self.dataq:
            raise AgentError("the guest agent channel is not idle after HELLO")
        fsmode.write_private(b / "run.frame", run_frame)  # the env: 0600
        t = self.cfg.timeouts
        opts: dict[str, Option] = {}
        if vm.status_files is not None:  # the pool daemon's children: watched through pidfds
            opts = {"--adopted": True, "--qemu-status": str(vm.status_files[0]),
                    "--virtiofsd-status": str(vm.status_files[1])}
        opts |= {"--qemu": vm.pid, "--virtiofsd": vm.share_server.pid if vm.share_server is not None else None,
                 "--run-frame": str(b / "run.frame"), "--console-log": str(b / "console.log"),
                 "--stdin-open": stdin_open,
                 "--stdin-once": self.ctx.config.get("annotations", {}).get("org.vmrt.stdin-once") == "true",
                 "--partial": bool(self.ctx.config["process"].get("terminal")),  # a prompt is logged as it comes
                 "--resize": str(b / TTY_SIZE_NAME) if self.ctx.config["process"].get("terminal") else None,
                 "--health": healthstate.interval_s(self.ctx.config),
                 "--start-timeout": t.start, "--ping": t.agent_ping,
                 "--dead": t.agent_dead}
        self.ctx.handoff(Handoff("vm", {"--agent": vm.agent_sock.fileno(), "--console": vm.console_sock.fileno()},
                                 opts))

    async def _teardown_vm(self) -> None:
        self._restore_terminal()
        if self.force_timer is not None:
            self.force_timer.cancel()
        self._send(None)
        if self.vm is not None:
            if self.shutdown_sent:  # as the C monitor: the agent's own power-off first (its disk synced)
                await asyncio.to_thread(_wait_quietly, self.vm.qemu, SHUTDOWN_GRACE)
            await self.vm.shutdown()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.ctx.log_dir is not None:
            fsmode.private_dir(self.ctx.log_dir)
            b = self.ctx.bundle_dir
            for n in ("console.log", "qemu.log", "virtiofsd.log"):
                # cold; pooled (console, then VMM logs on their tmpfs)
                for p in (b / n, b / "vm" / n, b / jail.VMM_LOGS / n, b / "vm" / jail.VMM_LOGS / n):
                    if p.exists():
                        shutil.move(p, self.ctx.log_dir / n)

