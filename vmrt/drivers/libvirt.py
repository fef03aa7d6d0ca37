"""The libvirt VM driver (``vm_driver = libvirt``): each container's VM a transient libvirt domain.

The run is the QEMU driver's (drivers/vm.py: the same kernel, agent initramfs, agent protocol,
stdio relay, signals, liveness, exec ports); only where the VM comes from differs: this
module's :class:`LibvirtBoot` is a :class:`~vmrt.drivers.vmsource.VMSource` that asks libvirt
(libvirt-python, ``libvirt_uri``) to create the domain instead of spawning QEMU itself. So
``virsh -c URI list`` shows every running VM container as ``vmrt-<id12>``, with a ``<metadata>``
element in vmrt's namespace naming the container, and libvirt's own confinement applies.

The domain (:func:`domain_xml`):

* machine ``q35`` (libvirt 9.0 cannot describe QEMU's ``microvm``: no virtio-mmio devices on
  x86), direct kernel boot of vmrt's ``vmlinux`` (PVH) and agent initramfs, no ACPI (the guest
  kernel has none); under TCG ``<tcg><tb-cache>`` as the QEMU driver's ``tb-size``. No
  ``<qemu:commandline>`` passthrough: every device is libvirt's own.
* RAM ``<memoryBacking>`` memfd, shared (vhost-user-fs maps it), ``<vcpu>``, ``--cpus`` as
  ``<cputune>`` global period/quota (no ``<memtune><hard_limit>``: libvirt would raise QEMU's
  RLIMIT_MEMLOCK to it, which needs CAP_SYS_RESOURCE; the guest's cgroup enforces ``--memory``).
* the share (rootfs + volumes, as a cold boot's) served by vmrt's own virtiofsd (sandboxed,
  seccomp-filtered, in the container's host cgroup: vm/virtiofsd.py), given to libvirt as an
  external vhost-user socket (``<filesystem><driver type='virtiofs'/><source socket=...>``).
* the container's disk (vm/disk.py) as a raw virtio-blk ``vda``, ``cache=none``, errors
  reported to the guest; the serial console, the agent port ``org.vmrt.agent.0`` and the exec
  ports ``org.vmrt.exec.K`` as UNIX-socket chardevs the host connects to while the domain is
  still paused (nothing the guest says is lost), the exec ports linked into the run dir for
  ``vmrt exec``.
* the NIC: a tap made in the host's namespace, persistent, which libvirt opens
  (``<interface type='ethernet'>``, ``managed='no'``) and which is then moved into the container's
  namespace as its ``tap0`` (the open queue follows it), plumbed there as the QEMU driver's.

Confinement: libvirt's DAC driver runs the domain's QEMU under a uid/gid of its own,
``jail_uid_base + 0x400000 + <slot>`` (``<seclabel type='static' model='dac'>``, ``relabel='yes'``:
libvirt chowns the files it gives QEMU to it and back afterwards), not root and not shared with
another container's QEMU, as the QEMU driver's jail does. The slot is allocated under a lock
(:func:`_reserve`): one that no live domain's label, no domain dir left in ``libvirt_dir`` and no
running process holds, recorded by the domain's dir (its group) until libvirt has forgotten the
domain, so a domain whose vmrt was SIGKILLed keeps its uid to itself; whatever
other security driver the daemon has (AppArmor, SELinux) keeps its dynamic label, and QEMU its
``-sandbox`` filter (qemu.conf ``seccomp_sandbox``). That QEMU reaches nothing of root's: its
files are in ``libvirt_dir/<id16>/`` (0700, its uid's; ``libvirt_dir`` is root's, 0711): a copy of
the kernel and initramfs, a hard link of the container's disk (a bind mount where the disk is on
another file system), the virtiofsd socket (chowned to it) and the channel sockets.

Not here: the warm pool and snapshots (qemu driver only: a run says ``pool=none (libvirt)``),
the C monitor (a detached container's Python monitor stays its owner: libvirt, not vmrt, is
QEMU's parent). A domain a crashed vmrt left is destroyed by :func:`reap` (the next start of
the container, ``vmrt rm``, ``system prune`` through lifecycle's cleanup). A domain's dir goes only
once libvirt says the domain is gone: while it may still run (libvirt unreachable, a destroy that
failed or not yet done) the dir stays, and with it what makes rm, prune and start try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .. import fsmode, rootfs
from ..config import Config
from ..errors import LaunchError, UsageError, VmrtError
from ..network import netlink
from ..proc import connect_unix
from ..vm import disk as vmdisk
from ..vm import jail
from ..vm.qemu import AGENT_PORT_NAME, EXEC_PORTS, KERNEL_CMDLINE, VMSpec, exec_socket_name
from ..vm.virtiofsd import Virtiofsd
from . import vmsource
from .base import RunContext
from .vm import VMDriver

LOG = logging.getLogger(__name__)
NAMESPACE = "https://vmrt.dev/xmlns/libvirt/1"  # the domain's <metadata> element
UID_OFFSET = 0x400000      # above the jail's jail_uid_base + PID range (pid_max <= 2^22)
UID_SLOTS = 0x400000       # the domains' uids: jail_uid_base + UID_OFFSET + [0, UID_SLOTS)
UIDS_NAME = "uids"         # in libvirt_dir: the allocation's lock and the last slot given (decimal)
MACHINE = "q35"
CHANNEL_WAIT = 10.0        # the domain's channel sockets, after its creation (libvirt made them)
TAP_PREFIX = "vlv"         # the host-side name of a domain's tap before it moves into the container's netns
VIR_DOMAIN_START_PAUSED = 1
VIR_DOMAIN_DESTROY_GRACEFUL = 1


def domain_name(container_id: str) -> str:
    return f"vmrt-{container_id[:12]}"


def domain_dir(cfg: Config, container_id: str) -> Path:
    return cfg.libvirt_dir / container_id[:16]


def tap_name(container_id: str) -> str:
    return TAP_PREFIX + container_id[:11]


def _module() -> Any:
    """libvirt-python, imported on use, its default error printer silenced (errors are raised)."""
    try:
        import libvirt  # on use: only the libvirt driver needs the binding (an optional extra)
    except ImportError:
        raise UsageError("vm_driver libvirt needs libvirt-python: install vmrt's libvirt extra "
                         "(pip install 'vmrt[libvirt]')") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def connect(uri: str) -> Any:
    lv = _module()
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        raise LaunchError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}") from None


def version(uri: str) -> tuple[str, str]:
    """(libvirt's version, the daemon's security models) of ``uri``, for ``vmrt check isolation``."""
    conn = connect(uri)
    try:
        v = conn.getLibVersion()
        caps = ET.fromstring(conn.getCapabilities())
        models = [m.text or "" for m in caps.iterfind("host/secmodel/model")]
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}", ",".join(models) or "none"
    finally:
        conn.close()


def label_uid(xml: str) -> int | None:
    """The uid of a domain's static DAC label (``+U:+G`` or ``U:G``), None if it has none."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for sec in root.iterfind("seclabel"):
        if sec.get("model") != "dac":
            continue
        label = sec.findtext("label") or ""
        user = label.split(":", 1)[0].removeprefix("+")
        if user.isdigit() and len(user) <= 10:
            return int(user)
    return None


def _proc_ids() -> set[int]:
    """Every uid and gid (real, effective, saved, fs) a running process has."""
    ids: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "status").read_text()
        except OSError:  # gone meanwhile
            continue
        for line in text.splitlines():
            if line.startswith(("Uid:", "Gid:")):
                ids.update(int(f) for f in line.split()[1:] if f.isdigit())
    return ids


def _taken_uids(cfg: Config, conn: Any) -> set[int]:
    """The uids a new domain may not have: every active domain's DAC label (any libvirt user's),
    the group of every domain dir in libvirt_dir (a domain not yet forgotten: its dir stays until
    it is), and every uid and gid a process runs with (a QEMU libvirt no longer lists, anyone)."""
    lv = _module()
    taken = _proc_ids()
    try:
        doms = conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except lv.libvirtError as e:
        raise LaunchError(f"libvirt: cannot list the domains: {e.get_error_message()}") from None
    for dom in doms:
        try:
            uid = label_uid(dom.XMLDesc(0))
        except lv.libvirtError:  # gone meanwhile
            continue
        if uid is not None:
            taken.add(uid)
    for entry in os.scandir(cfg.libvirt_dir):
        if entry.is_dir(follow_symlinks=False):
            taken.add(entry.stat(follow_symlinks=False).st_gid)
    return taken


def _reserve(cfg: Config, conn: Any, ddir: Path) -> int:
    """A uid for a new domain, and its dir ``ddir`` made (root's, group that uid, 0710) while the
    allocation's lock is held: the dir is the uid's record until the domain is gone. The slots are
    handed out round-robin from the one after the last given; one that is taken is skipped."""
    fd = os.open(cfg.libvirt_dir / UIDS_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 16, 0).strip()
        last = int(raw) if raw.isdigit() and int(raw) < UID_SLOTS else UID_SLOTS - 1
        taken = _taken_uids(cfg, conn)
        base = cfg.jail_uid_base + UID_OFFSET
        for i in range(1, UID_SLOTS + 1):
            slot = (last + i) % UID_SLOTS
            if base + slot not in taken:
                break
        else:
            raise LaunchError("no uid is free for a libvirt domain")
        uid = base + slot
        # root's, searchable by the domain's group alone: its QEMU reaches what libvirt labels for it
        # but can neither add nor replace a name here (a symlink in an exec port's place would send
        # `vmrt exec`, which connects through the run dir's link, to a socket of QEMU's choosing)
        ddir.mkdir(mode=0o700)
        os.chown(ddir, 0, uid)
        os.chmod(ddir, 0o710)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{slot}\n".encode(), 0)
        return uid
    finally:
        os.close(fd)


# --- the domain's description ----------------------------------------------------------------
@dataclasses.dataclass
class Domain:
    """What a domain is made of (all paths are in its dir, but the share's socket)."""

    name: str
    container_id: str
    container_name: str
    spec: VMSpec
    dir: Path
    uid: int
    emulator: str
    cmdline: str
    tb_cache_mib: int = 0
    cpu_quota: tuple[int, int] | None = None   # (period, quota) of the whole domain, microseconds
    disk: bool = False
    disk_cache: str = "none"
    tap: str | None = None


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, attrs)
    if text is not None:
        e.text = text
    return e


def domain_xml(d: Domain) -> str:
    """The transient domain's XML (ElementTree: names and paths are escaped, never spliced)."""
    s = d.spec
    kvm = s.accel.name == "kvm"
    dom = ET.Element("domain", type="kvm" if kvm else "qemu")
    _sub(dom, "name", d.name)
    _sub(dom, "uuid", str(uuid.UUID(d.container_id[:32])))
    meta = _sub(dom, "metadata")
    ET.register_namespace("vmrt", NAMESPACE)
    ET.SubElement(meta, f"{{{NAMESPACE}}}container", {"id": d.container_id, "name": d.container_name})
    _sub(dom, "memory", str(s.memory_mib), unit="MiB")
    mb = _sub(dom, "memoryBacking")
    _sub(mb, "source", type="memfd")
    _sub(mb, "access", mode="shared")
    # no <memtune><hard_limit>: libvirt would raise QEMU's RLIMIT_MEMLOCK to it (CAP_SYS_RESOURCE)
    _sub(dom, "vcpu", str(s.vcpus))
    if d.cpu_quota is not None:
        ct = _sub(dom, "cputune")
        _sub(ct, "global_period", str(d.cpu_quota[0]))
        _sub(ct, "global_quota", str(d.cpu_quota[1]))
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=MACHINE)
    _sub(os_, "kernel", str(d.dir / "kernel"))
    _sub(os_, "initrd", str(d.dir / "initrd"))
    _sub(os_, "cmdline", d.cmdline)
    if d.tb_cache_mib and not kvm:
        feats = _sub(dom, "features")
        tcg = _sub(feats, "tcg")
        _sub(tcg, "tb-cache", str(d.tb_cache_mib), unit="MiB")
    cpu = _sub(dom, "cpu", mode="host-passthrough" if kvm else "maximum")
    if not kvm:
        cpu.set("check", "none")
    _sub(dom, "clock", offset="utc")
    for ev in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, ev, "destroy")
    dev = _sub(dom, "devices")
    _sub(dev, "emulator", d.emulator)
    if d.disk:
        disk = _sub(dev, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="raw", cache=d.disk_cache, io="threads", discard="unmap",
             error_policy="report", rerror_policy="report")
        _sub(disk, "source", file=str(d.dir / "disk.img"))
        _sub(disk, "target", dev="vda", bus="virtio")
    fs = _sub(dev, "filesystem", type="mount")
    _sub(fs, "driver", type="virtiofs", queue="1024")
    _sub(fs, "source", socket=str(s.virtiofs_socket))
    _sub(fs, "target", dir=s.rootfs_tag)
    _sub(dev, "controller", type="usb", model="none")
    ser = _sub(dev, "serial", type="unix")
    _sub(ser, "source", mode="bind", path=str(d.dir / "console.sock"))
    _sub(ser, "target", port="0")
    for port, sock in ((AGENT_PORT_NAME, "agent.sock"),
                       *((f"org.vmrt.exec.{k}", exec_socket_name(k)) for k in range(EXEC_PORTS))):
        ch = _sub(dev, "channel", type="unix")
        _sub(ch, "source", mode="bind", path=str(d.dir / sock))
        _sub(ch, "target", type="virtio", name=port)
    if d.tap is not None:
        nic = _sub(dev, "interface", type="ethernet")
        _sub(nic, "mac", address=s.mac)
        _sub(nic, "target", dev=d.tap, managed="no")
        _sub(nic, "model", type="virtio")
    rng = _sub(dev, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(dev, "memballoon", model="virtio", freePageReporting="on")
    label = f"+{d.uid}:+{d.uid}"
    sec = _sub(dom, "seclabel", type="static", model="dac", relabel="yes")
    _sub(sec, "label", label)
    return ET.tostring(dom, encoding="unicode")


# --- the domain's host side --------------------------------------------------------------------
def _persistent_tap(name: str) -> None:
    """A persistent tap in this thread's (the host's) namespace: libvirt opens it by name."""
    tunsetiff, tunsetpersist = 0x400454CA, 0x400454CB
    iff_tap, iff_no_pi, iff_vnet_hdr = 0x0002, 0x1000, 0x4000
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, tunsetiff, struct.pack("16sH22x", name.encode(), iff_tap | iff_no_pi | iff_vnet_hdr))
        fcntl.ioctl(fd, tunsetpersist, 1)
    except OSError as e:
        raise LaunchError(f"cannot create tap {name}: {e.strerror}") from None
    finally:
        os.close(fd)


def delete_host_tap(name: str) -> None:
    """A domain's tap still in the host's namespace (its move never came), gone."""
    if not Path("/sys/class/net", name).exists():
        return
    with netlink.iproute() as ipr:
        idx = netlink.link_index(ipr, name)
        if idx is not None:
            with contextlib.suppress(Exception):
                ipr.link("del", index=idx)


def _move_tap(name: str, netns: Path) -> None:
    """The domain's tap (QEMU holds its queue) into the container's namespace, named tap0 there."""
    with netlink.iproute() as ipr:
        idx = netlink.link_index(ipr, name)
        if idx is None:
            raise LaunchError(f"the domain's tap {name} is missing")
        try:
            ipr.link("set", index=idx, net_ns_fd=str(netns), ifname="tap0")
        except Exception as e:
            raise LaunchError(f"cannot move tap {name} into the container's namespace: {e}") from None


def _forget_labels(path: Path) -> None:
    """libvirt's record of a file's owner before it relabelled it (``remember_owner``: trusted
    xattrs with a use count), left on the disk when its domain's daemon died before restoring it:
    a later domain would be refused the file ("already in use")."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for n in names:
        if n.startswith("trusted.libvirt.security."):
            with contextlib.suppress(OSError):
                os.removexattr(path, n, follow_symlinks=False)


def _place_disk(src: Path, target: Path) -> bool:
    """The container's disk at ``target``: a hard link (same inode: libvirt's chown to the
    domain's uid, and back, reaches the file), or a bind mount on another file system. True
    if it is a mount."""
    _forget_labels(src)
    try:
        os.link(src, target, follow_symlinks=False)
        return False
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise LaunchError(f"cannot link the container's disk for libvirt: {e.strerror}") from None
    target.touch(mode=0o600)
    rootfs.bind(src, target, readonly=False)
    return True


def _copy_private(src: Path, dst: Path, uid: int) -> None:
    with open(src, "rb") as f, open(dst, "xb", opener=fsmode.opener) as out:
        shutil.copyfileobj(f, out, 1 << 20)
    os.chown(dst, uid, uid)
    os.chmod(dst, 0o400)


def clean_dir(path: Path) -> None:
    """A domain's dir and what it holds (its disk's bind mount first, where it has one)."""
    if not path.exists():
        return
    disk = path / "disk.img"
    if rootfs.mounts_under(path):
        rootfs.umount_all(path)
    with contextlib.suppress(FileNotFoundError):
        disk.unlink()
    shutil.rmtree(path, ignore_errors=True)


def _qemu_pid(dom: Any) -> int:
    """The domain's QEMU process: the thread group of a vCPU thread QMP names (libvirt has no
    call for the PID itself)."""
    import libvirt_qemu  # on use: with the libvirt binding (the monitor-command call)
    out = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-cpus-fast"}', 0))
    tid = int(out["return"][0]["thread-id"])
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    raise LaunchError("cannot find the domain's QEMU process")


class DomainProc:
    """The domain's QEMU as the driver watches it (vmsource.Watched): its PID, a pidfd to wait on
    (libvirt, not vmrt, is its parent: its exit status is libvirt's, reported as 0); ``kill``
    destroys the domain."""

    def __init__(self, dom: Any, pid: int) -> None:
        self.dom, self.pid = dom, pid
        self.pidfd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        r, _, _ = select.select([self.pidfd], [], [], 0)
        return 0 if r else None

    def wait(self, timeout: float | None = None) -> int:
        r, _, _ = select.select([self.pidfd], [], [], timeout)
        if not r:
            raise subprocess.TimeoutExpired(f"domain {self.dom.name()}", timeout or 0.0)
        return 0

    def kill(self) -> None:
        destroy(self.dom, graceful=False)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


def destroy(dom: Any, graceful: bool) -> None:
    """The domain gone (a transient one is forgotten by libvirt with it); already gone is fine."""
    lv = _module()
    try:
        dom.destroyFlags(VIR_DOMAIN_DESTROY_GRACEFUL if graceful else 0)
    except lv.libvirtError as e:
        if e.get_error_code() in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID):
            return
        if graceful:
            destroy(dom, graceful=False)
            return
        LOG.debug("destroying domain: %s", e.get_error_message())


def _wait_forgotten(conn: Any, name: str, timeout: float) -> None:
    """Until libvirt has forgotten the transient domain (or ``timeout``): its QEMU is gone first,
    then libvirt restores the files' owners (the disk's among them) and drops it; the domain's dir
    may go only after that (:func:`_still_there`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _lookup(conn, name) is None:
                return
        except VmrtError:
            return
        time.sleep(0.02)


def _still_there(conn: Any, container_id: str) -> bool:
    """Whether the container's domain may still be in libvirt (one of another libvirt user that has
    its name is not). Raises VmrtError where libvirt cannot say."""
    lv = _module()
    dom = _lookup(conn, domain_name(container_id))
    if dom is None:
        return False
    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except lv.libvirtError as e:
        if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
            return False
        raise LaunchError(f"libvirt: {e.get_error_message()}") from None
    except ET.ParseError:
        return True
    c = root.find(f"metadata/{{{NAMESPACE}}}container")
    return c is not None and c.get("id") == container_id


def _destroy_left(cfg: Config, conn: Any, container_id: str) -> None:
    """The container's domain destroyed and forgotten by libvirt (only one whose metadata names
    the container); raises VmrtError if it is still there after the shutdown timeout."""
    name = domain_name(container_id)
    dom = _lookup(conn, name)
    if dom is not None and _is_ours(dom, container_id):
        destroy(dom, graceful=False)
        _wait_forgotten(conn, name, cfg.timeouts.shutdown)
    if _still_there(conn, container_id):
        raise LaunchError(f"libvirt has not destroyed the container's domain {name} yet: "
                          f"its dir {domain_dir(cfg, container_id)} is kept (try again)")


def _release_dir(conn: Any, container_id: str, ddir: Path) -> None:
    """(The start's teardown, last.) The domain's dir removed once libvirt has forgotten the domain;
    while it may still run, kept: lifecycle's reap (rm, prune) and the next start try again."""
    try:
        there = _still_there(conn, container_id)
    except VmrtError as e:
        LOG.warning("%s: its dir %s is kept", e, ddir)
        return
    if there:
        LOG.warning("libvirt has not destroyed domain %s: its dir %s is kept (vmrt rm tries again)",
                    domain_name(container_id), ddir)
        return
    clean_dir(ddir)


def _lookup(conn: Any, name: str) -> Any | None:
    lv = _module()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as e:
        if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
            return None
        raise LaunchError(f"libvirt: {e.get_error_message()}") from None


def _is_ours(dom: Any, container_id: str) -> bool:
    """Whether the domain's metadata names this container (never destroy another's domain)."""
    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except Exception:
        return False
    c = root.find(f"metadata/{{{NAMESPACE}}}container")
    return c is not None and c.get("id") == container_id


def reap(cfg: Config, container_id: str) -> None:
    """What a crashed vmrt left of a container's libvirt VM: its domain destroyed (only one whose
    metadata names the container), its dir and a tap still in the host's namespace removed. The
    dir goes only once libvirt says the domain is gone: where it cannot (unreachable, the domain
    still there) the dir stays and VmrtError is raised, so that a later rm, prune or start (each
    reaps while the dir is there) tries again."""
    ddir = domain_dir(cfg, container_id)
    if not ddir.exists() and not Path("/sys/class/net", tap_name(container_id)).exists():
        return
    try:
        conn = connect(cfg.libvirt_uri)
    except VmrtError as e:
        if ddir.exists():
            raise VmrtError(f"{e}: the container's domain {domain_name(container_id)} may still run; "
                            f"its dir {ddir} is kept (try again)") from None
    else:
        try:
            _destroy_left(cfg, conn, container_id)
        finally:
            conn.close()
    clean_dir(ddir)
    delete_host_tap(tap_name(container_id))


def libvirt_log(name: str) -> Path:
    """Where a privileged libvirtd's QEMU driver logs a domain's QEMU (stderr, command line)."""
    return Path("/var/log/libvirt/qemu") / f"{name}.log"


# --- the source ------------------------------------------------------------------------------------
class LibvirtBoot:
    """A cold boot through libvirt (see the module's docstring)."""

    name = "libvirt"
    memory = "private"
    snapshot = ""

    async def start(self, launch: vmsource.Launch) -> vmsource.RunningVM:
        ctx, cfg, stack = launch.ctx, launch.ctx.cfg, launch.stack
        cid = ctx.container.id
        name = domain_name(cid)
        conn = await asyncio.to_thread(connect, cfg.libvirt_uri)
        stack.callback(conn.close)
        # a crashed vmrt's domain of this container: gone before its dir is
        await asyncio.to_thread(_destroy_left, cfg, conn, cid)
        fsmode.make_dirs(cfg.libvirt_dir, 0o711)
        os.chmod(cfg.libvirt_dir, 0o711)
        ddir = domain_dir(cfg, cid)
        clean_dir(ddir)
        uid = await asyncio.to_thread(_reserve, cfg, conn, ddir)
        stack.callback(_release_dir, conn, cid, ddir)
        # virtiofsd names its pid file after the socket: unique per container
        spec = dataclasses.replace(launch.spec, machine=MACHINE, virtiofs_socket=ddir / f"vfs-{cid[:16]}.sock")
        ctx.timings.info["machine"] = f"{MACHINE} (libvirt)"
        _copy_private(spec.kernel, ddir / "kernel", uid)
        _copy_private(spec.initrd, ddir / "initrd", uid)

        share = ctx.bundle_dir / "share"
        rootfs.share_top(share)
        rootfs.mount_readonly(ctx.layers, share / "rootfs")
        stack.callback(rootfs.umount, share / "rootfs")
        vmsource.share_volumes(ctx.config, share, stack)
        rootfs.seal_share(share)
        ctx.timings.mark("rootfs-ready")
        logs = jail.vmm_log_dir(ctx.bundle_dir)
        cache = "always" if cfg.virtiofs_cache == "auto" and not vmsource.fresh_share(ctx) else None
        ctx.timings.info["share"] = f"virtio-fs cache={cache or cfg.virtiofs_cache}"
        vfs = Virtiofsd(cfg, share, spec.virtiofs_socket, logs / "virtiofsd.log", group=launch.group, cache=cache)
        await asyncio.to_thread(vfs.start)
        stack.callback(vfs.stop)
        os.chown(spec.virtiofs_socket, uid, uid)  # QEMU connects to it as the domain's uid

        disk_cache = "none"
        if launch.disk is not None:
            fd, direct = vmdisk.open_for_vmm(launch.disk.file)
            os.close(fd)
            disk_cache = "none" if direct else "writeback"
            _place_disk(launch.disk.file, ddir / "disk.img")
        tap = None
        net = ctx.net
        if net is not None and net.netns is not None:
            tap = tap_name(cid)
            await asyncio.to_thread(delete_host_tap, tap)  # pyroute2: never in the event loop's thread
            _persistent_tap(tap)
            stack.push_async_callback(asyncio.to_thread, delete_host_tap, tap)
        cmdline = KERNEL_CMDLINE
        if spec.accel.kernel_args():
            cmdline += " " + spec.accel.kernel_args()
        if spec.extra_cmdline:
            cmdline += " " + spec.extra_cmdline
        res = ctx.config["linux"].get("resources", {})
        quota = res.get("cpu", {})
        emulator = shutil.which(cfg.qemu) or cfg.qemu
        d = Domain(name=name, container_id=cid, container_name=ctx.container.name, spec=spec, dir=ddir, uid=uid,
                   emulator=emulator, cmdline=cmdline, tb_cache_mib=cfg.tcg_tb_size_mib,
                   cpu_quota=(int(quota["period"]), int(quota["quota"])) if quota else None,
                   disk=launch.disk is not None, disk_cache=disk_cache, tap=tap)
        xml = domain_xml(d)
        (ddir / "domain.xml").write_text(xml)
        lv = _module()
        try:
            dom = await asyncio.to_thread(conn.createXML, xml, VIR_DOMAIN_START_PAUSED)
        except lv.libvirtError as e:
            raise LaunchError(f"libvirt could not start the VM: {e.get_error_message()}", command=[xml],
                              output=_tail(libvirt_log(name))) from None
        stack.callback(self._keep_log, ctx, name)
        proc: DomainProc | None = None
        socks: list[socket.socket] = []
        try:
            proc = DomainProc(dom, await asyncio.to_thread(_qemu_pid, dom))
            if tap is not None and net is not None and net.netns is not None:
                await asyncio.to_thread(_move_tap, tap, net.netns)
                net.plumb_in_background(cfg, "vm")
            for sock_name in ("console.sock", "agent.sock"):
                socks.append(await self._connect(ddir, sock_name, proc))
            for k in range(EXEC_PORTS):  # where `vmrt exec` looks for them
                link = ctx.bundle_dir / exec_socket_name(k)
                link.unlink(missing_ok=True)
                link.symlink_to(ddir / exec_socket_name(k))
            dom.resume()
        except BaseException:
            destroy(dom, graceful=False)
            _wait_forgotten(conn, name, cfg.timeouts.shutdown)
            for s in socks:
                s.close()
            if proc is not None:
                proc.close()
            raise
        ctx.timings.mark("vmm-spawned")
        console, agent = socks
        for s in socks:
            s.setblocking(False)
        domproc = proc

        async def stop() -> None:
            if domproc.poll() is None:
                await asyncio.to_thread(destroy, dom, True)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(domproc.wait, cfg.timeouts.shutdown)
                if domproc.poll() is None:
                    await asyncio.to_thread(destroy, dom, False)
            await asyncio.to_thread(_wait_forgotten, conn, name, cfg.timeouts.shutdown)
            domproc.close()
            console.close()
            agent.close()
            for k in range(EXEC_PORTS):
                (ctx.bundle_dir / exec_socket_name(k)).unlink(missing_ok=True)

        return vmsource.RunningVM(self.name, domproc, agent, console, ctx.bundle_dir / "console.log", vfs.proc,
                                  stop=stop, disk=launch.disk is not None, handoff=False)

    @staticmethod
    async def _connect(ddir: Path, name: str, proc: DomainProc) -> socket.socket:
        deadline = time.monotonic() + CHANNEL_WAIT
        while True:
            try:
                return connect_unix(ddir, name)
            except OSError as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LaunchError(f"the domain's {name} did not come up: {e.strerror}") from None
            await asyncio.sleep(0.01)

    @staticmethod
    def _keep_log(ctx: RunContext, name: str) -> None:
        """libvirt's log of the domain's QEMU: kept as the container's qemu.log where its logs are
        kept, else removed (nothing of a --rm run stays)."""
        log = libvirt_log(name)
        if not log.exists():
            return
        if ctx.log_dir is not None:
            fsmode.private_dir(ctx.log_dir)
            shutil.move(log, ctx.log_dir / "qemu.log")
        else:
            log.unlink(missing_ok=True)


def _tail(path: Path, size: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class LibvirtDriver(VMDriver):
    """The VM driver with :class:`LibvirtBoot` as every VM's source."""

    def source(self, ctx: RunContext, spec: VMSpec, disk: vmdisk.Disk | None) -> vmsource.VMSource:
        ctx.timings.info["pool"] = "none (libvirt)"
        ctx.timings.info["snapshot"] = "none:libvirt"
        return LibvirtBoot()
