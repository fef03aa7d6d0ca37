"""A QEMU micro-VM: command line, launch, QMP control, shutdown.

The VM handle is a context manager in the style of ``qemu.machine``: launch in
``__enter__``/``launch()``, complete cleanup in ``shutdown()``, which always
runs. Host <-> QEMU channels (QMP, serial console, agent port) are socketpairs
handed to QEMU as file descriptors, so no socket file exists for them and no
connection race is possible. The exec ports (``org.vmrt.exec.K``, one extra
process each at a time, see vmrt/agent/exec_client.py) are the exception: other
processes (``vmrt exec``) connect to them, so QEMU listens on
``exec-K.sock`` in the container's run directory; ``shutdown()`` removes them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import socket
import subprocess
from pathlib import Path

from qemu.qmp import QMPClient

from .. import fsmode
from ..cgroups import HostGroup
from ..config import Config
from ..errors import LaunchError
from ..proc import connect_unix
from . import disk as disk_mod
from . import jail as jail_mod
from . import procs
from .accel import Accel

LOG = logging.getLogger(__name__)
AGENT_PORT_NAME = "org.vmrt.agent.0"
EXEC_PORTS = 4             # org.vmrt.exec.0 .. 3, the agent's NEXEC


def opt_value(v: str) -> str:
    """A value inside one of QEMU's ``key=value,...`` option strings: a comma is doubled, so
    a path or name can never end the value and add options of its own."""
    return v.replace(",", ",,")


def exec_socket_name(k: int) -> str:
    """The listening socket of exec port k, in the container's run directory."""
    return f"exec-{k}.sock"


# secretmem.enable=1: memfd_secret, which the seccomp profile allows, as on the newer host kernels that
# turn it on by default (6.1's default is off: ENOSYS)
KERNEL_CMDLINE = ("console=ttyS0 quiet reboot=t panic=-1 no_timer_check tsc=reliable "
                  "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 "
                  "random.trust_cpu=on secretmem.enable=1 rdinit=/init")


@dataclasses.dataclass
class VMSpec:
    kernel: Path
    initrd: Path
    virtiofs_socket: Path
    memory_mib: int
    cpus: float
    accel: Accel
    machine: str = "microvm"
    name: str = "vmrt"
    rootfs_tag: str = "rootfs"
    extra_cmdline: str = ""
    share_9p: Path | None = None   # share this dir over virtio-9p instead of virtio-fs: read-only, ...
    share_9p_writable: bool = False  # ... unless a writable volume is in it (its fsdev_fd's mounts say what is)
    incoming: str | None = None    # QEMU -incoming: "defer" to restore a snapshot's state
    ram_file: Path | None = None   # guest RAM in this file (a snapshot's), else a shared memfd
    ram_private: bool = True       # a clone's: a copy of ram_file of its own (jailed: always), else mapped
    tap_fd: int | None = None      # the VM's NIC (virtio-net) backed by this tap (vmrt/network/netns.py)
    mac: str = "02:56:00:00:00:01"  # the NIC's MAC at boot (the agent sets the container's own)
    disk_fd: int | None = None     # the writable layer's disk (vm/disk.py): QEMU's fd of it ...
    disk_direct: bool = False      # ... opened O_DIRECT (cache=none)
    disk_size: int = 0             # ... of this many bytes (0: a placeholder)
    disk_max: int = 0              # the most its disk may take (a pooled VM's: the claim's disk's)

    @property
    def vcpus(self) -> int:
        return max(1, min(math.ceil(self.cpus), os.cpu_count() or 1, 64))


class QemuVM:
    """One QEMU. Jailed (``cfg.vmm_jail``, the default: vm/jail.py) it gets every channel as an
    inherited fd — ``fs_fd`` is the virtio-9p proxy helper's socket for a 9p share (unjailed
    too, for a writable one) — and joins ``group`` before it starts; unjailed it runs as root
    in the run directory, as before."""

    def __init__(self, cfg: Config, spec: VMSpec, stderr_log: Path, *, group: HostGroup | None = None,
                 fs_fd: int | None = None) -> None:
        # QEMU runs in the container's run directory: the virtio-fs socket is
        # named relative to it (see virtiofsd.py)
        self.cfg, self.spec, self.stderr_log = cfg, spec, stderr_log
        self.group, self.fs_fd = group, fs_fd
        self.jailed = cfg.vmm_jail
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None
        self.agent_sock: socket.socket | None = None
        self.console_sock: socket.socket | None = None
        self._qmp_sock: socket.socket | None = None

    def command(self, fds: dict[str, int]) -> list[str]:
        s = self.spec
        mem = f"{s.memory_mib}M"
        if s.machine == "microvm":
            machine = ["-M", "microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on,"
                             "acpi=off,memory-backend=mem",
                       "-global", "virtio-mmio.force-legacy=false"]
            fs_dev, serial_dev, rng, balloon = ("vhost-user-fs-device", "virtio-serial-device",
                                                "virtio-rng-device", "virtio-balloon-device")
            p9_dev, net_dev = "virtio-9p-device", "virtio-net-device"
            cmdline = KERNEL_CMDLINE + " pci=off"
        elif s.machine == "q35":
            machine = ["-M", "q35,memory-backend=mem,sata=off,smbus=off"]
            fs_dev, serial_dev, rng, balloon = ("vhost-user-fs-pci", "virtio-serial-pci", "virtio-rng-pci",
                                                "virtio-balloon-pci")
            p9_dev, net_dev = "virtio-9p-pci", "virtio-net-pci"
            cmdline = KERNEL_CMDLINE
        else:
            raise LaunchError(f"unsupported machine type {s.machine!r} (use microvm or q35)")
        if s.accel.kernel_args():
            cmdline += " " + s.accel.kernel_args()
        if s.extra_cmdline:
            cmdline += " " + s.extra_cmdline
        if self.jailed:  # every file and channel is in the jail or an inherited fd
            kernel, initrd = "/kernel", "/initrd"
            vfs = f"socket,id=vfs,fd={fds['fs']}"
            sandbox = ["-sandbox", jail_mod.QEMU_SANDBOX]
        else:
            kernel, initrd = str(s.kernel), str(s.initrd)  # plain values (not QEMU option strings)
            vfs = f"socket,id=vfs,path={opt_value(s.virtiofs_socket.name)}"
            sandbox = []
        if "fs" in fds:  # the proxy helper's (vm/virtiofsd.py: P9Proxy)
            fs9 = f"proxy,id=fs9,sock_fd={fds['fs']}" + ("" if s.share_9p_writable else ",readonly=on")
        else:  # unjailed QEMU reads the share itself (a writable one always has the helper)
            fs9 = f"local,id=fs9,path={opt_value(str(s.share_9p))},security_model=none,readonly=on"
        return [
            self.cfg.qemu, "-name", opt_value(s.name), *machine, *s.accel.qemu_args(self.cfg.tcg_tb_size_mib),
            "-m", mem, "-smp", str(s.vcpus),
            "-object", self.memory_backend(mem), *sandbox,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-chardev", f"socket,id=con,fd={fds['console']}", "-serial", "chardev:con",
            "-chardev", f"socket,id=qmp,fd={fds['qmp']}", "-mon", "chardev=qmp,mode=control",
            *(["-fsdev", fs9, "-device", f"{p9_dev},fsdev=fs9,mount_tag={s.rootfs_tag}"] if s.share_9p is not None
              else ["-chardev", vfs, "-device", f"{fs_dev},chardev=vfs,tag={s.rootfs_tag}"]),
            "-device", rng,
            # free page reporting discards guest pages; QEMU 7.2 does that on file-backed RAM by
            # punching holes in the file even when it is mapped private: a snapshot's RAM file,
            # shared by every clone, would lose pages. So snapshot VMs report nothing.
            "-device", balloon if s.ram_file is not None else f"{balloon},free-page-reporting=on",
            "-device", f"{serial_dev},max_ports={2 + EXEC_PORTS}",
            "-chardev", f"socket,id=agent,fd={fds['agent']}",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME},nr=1",
            *self.exec_port_args(fds),
            *(["-netdev", f"tap,id=net0,fd={s.tap_fd},vhost=off",
               "-device", f"{net_dev},netdev=net0,mac={s.mac}"] if s.tap_fd is not None else []),
            *(disk_mod.qemu_args(s.disk_fd, s.disk_direct, s.machine == "microvm") if s.disk_fd is not None
              else []),
            *(["-incoming", s.incoming] if s.incoming else []),
        ]

    def memory_backend(self, mem: str) -> str:
        """Guest RAM. vhost-user-fs needs RAM virtiofsd can map: a shared memfd. A snapshot's
        VM keeps its RAM in the snapshot's file: shared while it is built (the file is the
        saved memory, ``x-ignore-shared`` leaves it out of the state stream). A clone with
        ``ram_private`` (always, jailed) maps a copy of its own; else it maps the file private
        (copy-on-write: the file never changes), so the page cache is shared among clones and
        only the pages one writes become its own."""
        s = self.spec
        if s.ram_file is None:
            return f"memory-backend-memfd,id=mem,size={mem},share=on"
        if self.jailed:  # the jail's /ram: the snapshot's file while it is built, a clone's own copy
            return f"memory-backend-file,id=mem,size={mem},mem-path=/ram,share=on"
        path = opt_value(str(s.ram_file))
        if s.incoming and s.ram_private:  # its own copy in its run dir
            return f"memory-backend-file,id=mem,size={mem},mem-path={opt_value(str(self.ram_copy))},share=on"
        if s.incoming:
            return f"memory-backend-file,id=mem,size={mem},mem-path={path},share=off"
        return f"memory-backend-file,id=mem,size={mem},mem-path={path},share=on"

    def exec_port_args(self, fds: dict[str, int]) -> list[str]:
        # jailed: sockets vmrt bound in the run directory, listened on by QEMU; else relative
        # paths: QEMU runs in the run directory, whose absolute path can exceed what sun_path holds
        args = []
        for k in range(EXEC_PORTS):
            where = f"fd={fds[f'exec{k}']}" if self.jailed else f"path={exec_socket_name(k)}"
            args += ["-chardev", f"socket,id=exec{k},{where},server=on,wait=off",
                     "-device", f"virtserialport,chardev=exec{k},name=org.vmrt.exec.{k},nr={k + 2}"]
        return args

    def _jail_channels(self, fds: dict[str, int], held: list[socket.socket]) -> None:
        """The sockets a jailed QEMU cannot open itself: the exec ports' listening sockets (bound
        here, in the root-only run dir) and, for virtio-fs, a connection to virtiofsd."""
        dfd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for k in range(EXEC_PORTS):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(s)
                (self.run_dir / exec_socket_name(k)).unlink(missing_ok=True)
                s.bind(f"/proc/self/fd/{dfd}/{exec_socket_name(k)}")
                fds[f"exec{k}"] = s.fileno()
            if self.fs_fd is not None:
                fds["fs"] = self.fs_fd
            elif self.spec.share_9p is None:
                s = connect_unix(self.run_dir, self.spec.virtiofs_socket.name)
                held.append(s)
                fds["fs"] = s.fileno()
        finally:
            os.close(dfd)

    def jail(self) -> jail_mod.Jail:
        s = self.spec
        mountpoint = self.cfg.run_root / "jail"  # an empty dir; each jail's tmpfs covers it privately
        fsmode.make_dirs(mountpoint, fsmode.PRIVATE_DIR)
        j = jail_mod.Jail(mountpoint=mountpoint, uid_base=self.cfg.jail_uid_base,
                          cgroup_procs=self.group.procs_files() if self.group is not None else [],
                          files={"kernel": s.kernel, "initrd": s.initrd}, kvm=s.accel.name == "kvm",
                          fsize=max(s.memory_mib << 20, s.disk_size, s.disk_max))
        if s.ram_file is not None and not s.incoming:  # the snapshot being built writes its RAM file
            j.rw_files["ram"] = s.ram_file
        return j

    @property
    def run_dir(self) -> Path:
        return self.spec.virtiofs_socket.parent

    @property
    def ram_copy(self) -> Path:
        """An unjailed clone's private copy of the snapshot's RAM (a jailed one's is in its jail)."""
        return self.run_dir / "ram"

    def _copy_ram(self) -> None:
        assert self.spec.ram_file is not None
        src = os.open(self.spec.ram_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = os.open(self.ram_copy, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                jail_mod.copy_sparse(src, dst, os.fstat(src).st_size)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def launch(self, die_with_parent: bool = True) -> None:
        pairs = {k: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for k in ("console", "qmp", "agent")}
        fds = {k: b.fileno() for k, (_a, b) in pairs.items()}
        held: list[socket.socket] = []  # what QEMU inherits and we close once it runs
        ram = -1
        cmd: list[str] = []
        try:
            tap = tuple(fd for fd in (self.spec.tap_fd, self.spec.disk_fd) if fd is not None)
            if self.jailed:
                self._jail_channels(fds, held)
                j = self.jail()
                if self.spec.ram_file is not None and self.spec.incoming:  # a clone: its own copy
                    ram = os.open(self.spec.ram_file, os.O_RDONLY | os.O_CLOEXEC)
                    j.ram_copy = (ram, os.fstat(ram).st_size)
            else:
                if self.fs_fd is not None:  # a writable 9p share's helper
                    fds["fs"] = self.fs_fd
                if self.spec.ram_file is not None and self.spec.incoming and self.spec.ram_private:
                    self._copy_ram()
            cmd = self.command(fds)
            self._cmd = cmd
            with open(self.stderr_log, "ab", opener=fsmode.opener) as err:
                if self.jailed:
                    self.proc = jail_mod.spawn(cmd, j, pass_fds=(*fds.values(), *tap), stderr=err.fileno(),
                                               die_with_parent=die_with_parent)
                else:
                    self.proc = procs.spawn(cmd, pass_fds=(*fds.values(), *tap), stdout=err.fileno(),
                                            stderr=err.fileno(), cwd=str(self.run_dir),
                                            die_with_parent=die_with_parent)
        except OSError as e:
            for a, _b in pairs.values():
                a.close()
            raise LaunchError(f"cannot start QEMU: {e.strerror or e}", command=cmd,
                              output=self._log_text()) from e
        finally:
            for _a, b in pairs.values():
                b.close()
            for h in held:
                h.close()
            if ram >= 0:
                os.close(ram)
        self.console_sock = pairs["console"][0]
        self._qmp_sock = pairs["qmp"][0]
        self.agent_sock = pairs["agent"][0]
        for s in (self.console_sock, self._qmp_sock, self.agent_sock):
            s.setblocking(False)

    async def connect_qmp(self) -> None:
        assert self._qmp_sock is not None
        self.qmp = QMPClient(self.spec.name)
        try:
            await asyncio.wait_for(self.qmp.connect(self._qmp_sock), self.cfg.timeouts.qmp_connect)
        except Exception as e:  # qemu.qmp raises ConnectError and friends
            raise self.failure(f"QMP handshake with QEMU failed: {e}") from e

    def _log_text(self) -> str:
        try:
            with open(self.stderr_log, "rb") as f:
                return f.read(1 << 16).decode(errors="replace")
        except OSError:
            return ""

    def failure(self, message: str) -> LaunchError:
        status = self.proc.poll() if self.proc else None
        return LaunchError(message, command=getattr(self, "_cmd", []), output=self._log_text(),
                           exit_status=status)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc else None

    async def shutdown(self) -> int | None:
        """Quit QEMU (QMP, then SIGTERM, then SIGKILL) and close every channel."""
        if self.qmp is not None:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    await asyncio.wait_for(self.qmp.execute("quit"), 2.0)
                except Exception as e:  # the VM may be gone already
                    LOG.debug("QMP quit: %s", e)
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 2.0)
            except Exception as e:
                LOG.debug("QMP disconnect: %s", e)
            self.qmp = None
        status = None
        if self.proc is not None:
            status = await asyncio.to_thread(procs.stop, self.proc, self.cfg.timeouts.shutdown,
                                             signal.SIGTERM)
        self.close_channels()
        for k in range(EXEC_PORTS):
            (self.run_dir / exec_socket_name(k)).unlink(missing_ok=True)
        return status

    def close_channels(self) -> None:
        """Close our ends of the console, QMP and agent channels (the pool daemon, once it
        handed a VM's agent and console on, keeps none of them)."""
        for s in (self.console_sock, self._qmp_sock, self.agent_sock):
            if s is not None:
                s.close()
