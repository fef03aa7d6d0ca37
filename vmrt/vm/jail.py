"""The VMM jail: every QEMU runs without root's power (Firecracker's jailer, Kata's hardening).

QEMU parses everything a guest does (device models, TCG), so a bug a guest reaches must not
be host root. Between fork and exec, still root, the child:

1. joins the VM's host cgroup (before it has charged any memory: it is never moved later);
2. enters mount, network, IPC and UTS namespaces of its own (a network namespace with no
   interface: its NIC is a tap fd, and the host's abstract sockets are out of reach; private
   mount propagation) and mounts a small tmpfs on
   ``<run_root>/jail`` holding only what QEMU needs: ``/usr`` (read-only, nosuid, nodev;
   the ``/lib``-style links of a merged-/usr host), ``/etc/ld.so.cache``, ``/dev/null``,
   ``zero``, ``urandom``, ``random`` (and ``/dev/kvm`` under KVM), the kernel and initramfs
   bound read-only as ``/kernel`` and ``/initrd``; a snapshot clone's RAM is copied (sparse)
   into ``/ram``, private to this VM; then ``chroot``s there. Nothing of vmrt's state, of
   other tenants or of the host's ``/proc`` is in it;
3. sets bounded limits (open files, processes of its uid, and the size of any file it writes:
   its RAM's or its disk's, the larger: a compromised VMM grows the container's disk file to
   at most that, its RAM's size where the disk is smaller);
4. drops to a uid and gid of its own, ``jail_uid_base + its PID`` (a PID is unique among live
   processes, so no two VMMs share an identity; the range is reserved for vmrt), with no
   supplementary groups (the ``/dev/kvm`` group under KVM): a change of uid from 0 clears
   every capability; no_new_privs is set.

QEMU then runs with ``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
resourcecontrol=deny`` (its seccomp filter). Every channel reaches it as an inherited file
descriptor (QMP, serial console, agent and exec ports, the vhost-user socket, the NIC's tap,
a snapshot's migration stream), so it needs no path into the root-only run directory.

A jailed process must be spawned with :func:`spawn` (this module), never with a shell.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import signal
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..errors import LaunchError

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x04000000, 0x08000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 1 << 14, 1 << 18
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SIGKILL = 9
# the links a merged-/usr host has at its root (Debian 12); real directories are bound instead
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
DEVICES = ("null", "zero", "urandom", "random")
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
NOFILE = 4096       # QEMU's fds: channels, eventfds, and the files a 9p share's proxy hands it
NPROC = 512         # processes/threads of the jail's own uid (spawn=deny forbids processes anyway)


@dataclasses.dataclass
class Jail:
    """What one jailed QEMU sees and how it is bounded."""

    mountpoint: Path                        # an empty host dir; the jail's tmpfs covers it privately
    uid_base: int                           # its uid and gid are uid_base + its PID
    cgroup_procs: list[Path]                # cgroup.procs files it joins before anything else
    files: dict[str, Path] = dataclasses.field(default_factory=dict)      # jail name -> host file (ro)
    rw_files: dict[str, Path] = dataclasses.field(default_factory=dict)   # ... (rw, owned by the jail uid)
    ram_copy: tuple[int, int] | None = None  # (fd, size): copied into /ram, private to this VM
    kvm: bool = False
    nofile: int = NOFILE
    fsize: int | None = None                # RLIMIT_FSIZE: no file it writes grows past this

    def path(self, name: str) -> str:
        """The name QEMU uses for a file the jail holds."""
        return "/" + name


def _check(r: int, what: str) -> None:
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src.encode() if src else None, target.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")


def _bind_ro(src: str, target: str, extra: int = MS_NOSUID | MS_NODEV) -> None:
    _mount(src, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | extra)


def copy_sparse(src: int, dst: int, size: int) -> None:
    """The data extents of src into dst (holes stay holes: only what the guest touched is copied)."""
    os.ftruncate(dst, size)
    off = 0
    while off < size:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            break
        hole = os.lseek(src, data, os.SEEK_HOLE)
        pos = data
        while pos < hole:
            os.lseek(dst, pos, os.SEEK_SET)
            n = os.sendfile(dst, src, pos, min(hole - pos, 1 << 24))
            if n <= 0:
                raise OSError(0, "short copy of the snapshot's RAM")
            pos += n
        off = hole


def kvm_group() -> list[int]:
    """The supplementary group that opens /dev/kvm (Debian: group kvm, 0660), if any."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return []
    if st.st_mode & 0o006 == 0o006:
        return []
    if st.st_mode & 0o060 == 0o060 and st.st_gid != 0:
        return [st.st_gid]
    raise LaunchError(f"the jailed VMM cannot open /dev/kvm (mode {stat.S_IMODE(st.st_mode):o}, group "
                      f"{st.st_gid}): give it a group of its own with rw access (Debian's udev rule: "
                      "group kvm, 0660) or use --accel=tcg")


def _child(jail: Jail, die_with_parent: bool, groups: list[int]) -> Callable[[], None]:
    """The function run between fork and exec (root until its last step)."""
    root = str(jail.mountpoint)
    procs = [str(p) for p in jail.cgroup_procs]
    links = [(n, os.readlink("/" + n)) for n in ROOT_LINKS if os.path.islink("/" + n)]
    dirs = [n for n in ROOT_LINKS if not os.path.islink("/" + n) and os.path.isdir("/" + n)]
    devices = [*DEVICES, *(["kvm"] if jail.kvm else [])]
    files = {n: str(p) for n, p in jail.files.items()}
    rw_files = {n: str(p) for n, p in jail.rw_files.items()}
    ldcache = os.path.isfile("/etc/ld.so.cache")
    size_mib = 1 + ((jail.ram_copy[1] >> 20) if jail.ram_copy else 0)
    try:
        last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last_cap = 40

    parent = os.getpid()

    def run() -> None:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            pid = os.getpid()
            for p in procs:  # first: everything it allocates from here on is the VM's
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.write(fd, str(pid).encode())
                finally:
                    os.close(fd)
            # its own mount, network (no interface but a down lo: its NIC is a tap fd; abstract
            # sockets of the host out of reach), IPC and UTS namespaces
            _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
            _mount("vmrt-jail", root, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size={size_mib}m,nr_inodes=256")
            os.chdir(root)
            for name, target in links:
                os.symlink(target, name)
            for d in ("usr", *dirs, "dev", "etc"):
                os.mkdir(d, 0o755)
            _bind_ro("/usr", "usr")
            for d in dirs:
                _bind_ro("/" + d, d)
            if ldcache:
                os.close(os.open("etc/ld.so.cache", os.O_CREAT | os.O_WRONLY, 0o644))
                _bind_ro("/etc/ld.so.cache", "etc/ld.so.cache")
            for dev in devices:  # the bind keeps the device usable (the tmpfs itself is nodev); a
                # read-only mount does not stop writes to a device node
                os.close(os.open("dev/" + dev, os.O_CREAT | os.O_WRONLY, 0o644))
                _bind_ro("/dev/" + dev, "dev/" + dev, MS_NOSUID)
            uid = jail.uid_base + pid
            for name, src in files.items():
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
                _bind_ro(src, name, MS_NOSUID | MS_NODEV | MS_NOEXEC)
            for name, src in rw_files.items():
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600))
                _mount(src, name, None, MS_BIND)
                os.chown(name, uid, uid)
            if jail.ram_copy is not None:
                fd = os.open("ram", os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
                try:
                    copy_sparse(jail.ram_copy[0], fd, jail.ram_copy[1])
                    os.fchown(fd, uid, uid)
                finally:
                    os.close(fd)
                    os.close(jail.ram_copy[0])  # QEMU never sees the snapshot's own file
            os.chroot(".")
            os.chdir("/")
            resource.setrlimit(resource.RLIMIT_NOFILE, (jail.nofile, jail.nofile))
            resource.setrlimit(resource.RLIMIT_NPROC, (NPROC, NPROC))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if jail.fsize is not None:  # its RAM (a memfd or file) and its disk are the largest
                resource.setrlimit(resource.RLIMIT_FSIZE, (jail.fsize, jail.fsize))
            for cap in range(last_cap + 1):  # nothing to regain either (no_new_privs too)
                _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "capability bounding set")
            os.setgroups(groups)
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)  # from 0 to another uid: every capability is gone
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
            if die_with_parent:  # only now: a change of uid clears the parent-death signal
                _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
                if os.getppid() != parent:  # the parent died before it was set
                    os._exit(1)
        except BaseException as e:  # the parent only learns "preexec failed": say why in the log
            os.write(2, f"vmrt jail: {e}\n".encode(errors="replace"))
            raise

    return run


VMM_LOGS = "vmm"            # QEMU's and virtiofsd's own output: a dir of the run dir ...
VMM_LOGS_SIZE = "2m"        # ... on a tmpfs of this size: a guest that makes them print without end
                            # fills it, never the host's /run (they go on, their writes fail)


def vmm_log_dir(run_dir: Path) -> Path:
    """``run_dir/vmm``, a small tmpfs of its own for the VMM's and virtiofsd's logs (removed with
    the run dir's mounts; its files are moved to the container's dir at teardown)."""
    d = run_dir / VMM_LOGS
    d.mkdir(mode=0o700)
    try:
        _mount("vmrt-logs", str(d), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               f"mode=0700,size={VMM_LOGS_SIZE},nr_inodes=16")
    except OSError as e:
        raise LaunchError(f"log space {d}: {e.strerror}") from None
    return d


def spawn(cmd: list[str], jail: Jail, *, pass_fds: tuple[int, ...] = (), stderr: int | None = None,
          die_with_parent: bool = True) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (an argv list) jailed; its stdout and stderr go to ``stderr``."""
    groups = kvm_group() if jail.kvm else []
    extra = (jail.ram_copy[0],) if jail.ram_copy else ()
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                pass_fds=(*pass_fds, *extra), close_fds=True,
                                preexec_fn=_child(jail, die_with_parent, groups))
    except subprocess.SubprocessError as e:
        raise OSError(0, f"the VMM jail could not be set up ({e})") from None
