"""A VM container's writable layer: an ext4 file system in a sparse file, a virtio-blk disk.

The overlay's upper layer used to be a tmpfs in the guest, so a container could write no more
than its memory. Now each VM container has ``<root>/rw/<id>/disk.img`` (:data:`IMAGE_NAME`,
0600 in the 0700 writable-layer dir a process container keeps its upper dir in), a sparse
file of the size ``--storage-opt size=`` asks (else the ``vm_storage_size`` setting) that
the host formats with ``mkfs.ext4`` once, when the container first starts, and that stays
with the container until ``vmrt rm``, across its restarts (as Docker keeps a writable layer).
QEMU gets it as an fd (``-add-fd``, ``/dev/fdset/N``) and shows it to the guest as ``vda``;
the agent mounts it and keeps the overlay's upper and work dirs there (RUN's UPPER_DISK).

From the moment a guest runs with it, the file's content is the guest's: hostile. The host
never mounts, reads or parses it again; it only stats it (its size), hands QEMU an fd of it
and deletes it. Its size bounds what the guest takes of the host's disk: QEMU refuses a
guest request past the device's end. A compromised VMM is bounded by its jail's
``RLIMIT_FSIZE``, that size or its RAM's, the larger (vm/jail.py): a disk smaller than the
RAM can grow to the RAM's size. A full host file system is the guest's EIO
(``werror=report``), never a paused VM. Freed blocks go
back to the host: the guest mounts it with ``discard``, and QEMU punches holes for them.

Every vmrt VM has the disk device, so that a pooled VM or a snapshot's (booted before the
container exists; microvm has no hotplug) has it too: they boot with an empty placeholder
(a memfd of 0 bytes), and the container's file takes its place over QMP (:func:`swap`: the
pool daemon at a claim) or on the restoring QEMU's command line (a snapshot clone), then
``block_resize`` tells the guest the new capacity (a virtio config interrupt); the agent
waits for it and drops what it cached of the device before it mounts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

from .. import fsmode
from ..errors import LaunchError, UsageError

IMAGE_NAME = "disk.img"
TMP_NAME = IMAGE_NAME + ".tmp"  # a new disk until mkfs made it one (Disk.ready)
DEVICE = "vda"                  # the guest's name for it: the VM's one virtio-blk device
NODE = "vmrt-disk"              # its format node (raw); the file node under it is NODE-file<set>
MIN_SIZE = 16 << 20             # ext4 with a journal and room for an overlay's dirs
# the largest file ext4 holds with 4 KiB blocks ((2^32 - 1) blocks: 16 TiB less one block), so a
# size that passes fits a host's ext4, xfs, btrfs or tmpfs; ftruncate's EFBIG is still caught
MAX_SIZE = (1 << 44) - 4096
ALIGN = 4096                    # sizes are cut to whole 4 KiB blocks (never above the limit)
BOOT_FDSET = 1                  # -add-fd's set on the command line; a swapped-in file gets SWAP_FDSET
SWAP_FDSET = 2
# ext4 that stays sparse: inode tables and the journal are not zeroed (the kernel does it lazily,
# only where it writes), nothing is discarded (a new file has nothing to discard), no blocks held
# back for root (the container's root is its only user)
MKFS_OPTS = ("-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard")

_SIZE = r"(\d+(?:\.\d+)*) ?([kmgtp])?i?b?"  # go-units' pattern (compiled on use: `vmrt ps` imports this)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: str) -> int:
    """A size as Docker's go-units ``RAMInBytes`` reads it (``10G``, ``64m``, ``512MiB``,
    ``1.5g``, ``4096``: binary units, case-insensitive), cut to whole 4 KiB blocks."""
    m = re.fullmatch(_SIZE, value.strip(), re.IGNORECASE)
    if not m or m[1].count(".") > 1:
        raise UsageError(f"invalid size: '{value}'")
    n = int(float(m[1]) * _UNITS[(m[2] or "").lower()])
    return n - n % ALIGN


def parse_storage_opts(opts: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``--storage-opt KEY=VALUE`` (repeatable), as Docker's CLI splits them; only ``size`` is
    known (Docker's overlay2 refuses any other key too)."""
    out: dict[str, str] = {}
    for o in opts:
        key, eq, value = o.partition("=")
        if not eq:
            raise UsageError(f"invalid storage option {o!r}: use KEY=VALUE (size=10G)")
        if key.strip().lower() != "size":
            raise UsageError(f"unknown storage option {key!r} (only size= is supported)")
        out["size"] = value
    return out


def storage_size(value: str, what: str = "--storage-opt size") -> int:
    """The writable layer's size in bytes, at least :data:`MIN_SIZE`."""
    try:
        n = parse_size(value)
    except UsageError:
        raise UsageError(f"invalid {what} {value!r} (e.g. 10G, 512m)") from None
    if n < MIN_SIZE:
        raise UsageError(f"{what} {value!r} is below the minimum of {MIN_SIZE >> 20}m")
    if n > MAX_SIZE:
        raise UsageError(f"{what} {value!r} is above the maximum of 16t less 4k (ext4's largest file)")
    return n


@dataclasses.dataclass
class Disk:
    """A container's disk on the host: its file, size, and the ``mkfs`` that may still run."""

    path: Path
    size: int
    mkfs: subprocess.Popen[bytes] | None = None   # a new disk being formatted (wait: ready())

    @property
    def file(self) -> Path:
        """Where the file is now: a new disk is :data:`TMP_NAME` until :meth:`ready`."""
        return _tmp(self.path) if self.mkfs is not None else self.path

    def ready(self) -> None:
        """Wait for a new disk's mkfs (done before RUN: the guest reads it only at its mount),
        then give it its name: only a formatted file is ever ``disk.img``, so a start cut off
        during mkfs leaves no half-formatted disk that later starts would take (the fd QEMU
        holds stays valid across the rename)."""
        if self.mkfs is None:
            return
        proc, self.mkfs = self.mkfs, None
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self._discard()
            raise LaunchError("formatting the container's disk took more than 120s") from None
        if proc.returncode != 0:
            self._discard()
            raise LaunchError(f"formatting the container's disk failed (mkfs.ext4 exit {proc.returncode})",
                              command=list(map(str, proc.args)) if isinstance(proc.args, list) else [],
                              output=err.decode(errors="replace"))
        try:
            os.rename(_tmp(self.path), self.path)
        except OSError as e:
            self._discard()
            raise LaunchError(f"cannot name the container's disk {self.path}: {e.strerror}") from None

    def abort(self) -> None:
        """A run that failed before the disk was ready: a half-formatted file is not kept."""
        if self.mkfs is not None:
            self.mkfs.kill()
            self.mkfs.communicate()
            self.mkfs = None
            self._discard()

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            _tmp(self.path).unlink()


def _tmp(path: Path) -> Path:
    """Where a new disk is made and formatted before it gets its name (:meth:`Disk.ready`)."""
    return path.with_name(TMP_NAME)


def prepare(rw_dir: Path, size: int, mkfs: str = "mkfs.ext4") -> Disk:
    """The container's disk: the one it had (a restart: stat only, the content is the guest's),
    else a new sparse file of ``size`` bytes whose formatting starts now (:meth:`Disk.ready`),
    made as ``disk.img.tmp`` (a leftover of a start cut off is replaced)."""
    fsmode.private_dir(rw_dir.parent)
    fsmode.private_dir(rw_dir)
    path = rw_dir / IMAGE_NAME
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise LaunchError(f"the container's disk {path}: {e.strerror}") from None
    else:
        if not stat.S_ISREG(st.st_mode) or st.st_size < MIN_SIZE or st.st_size % 512:
            raise LaunchError(f"the container's disk {path} is not a disk vmrt made")
        return Disk(path, st.st_size)
    tmp = _tmp(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise LaunchError(f"cannot create the container's disk {tmp}: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
    except (OSError, OverflowError) as e:  # EFBIG past the host file system's largest file
        tmp.unlink()
        raise LaunchError(f"cannot create a disk of {size} bytes in {rw_dir}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    finally:
        os.close(fd)
    try:  # the host formats its own empty file; from the guest's first start on it never reads it
        proc = subprocess.Popen([mkfs, *MKFS_OPTS, str(tmp)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as e:
        tmp.unlink()
        raise LaunchError(f"cannot run {mkfs}: {e.strerror} (Debian package e2fsprogs)") from None
    return Disk(path, size, proc)


def open_for_vmm(path: Path) -> tuple[int, bool]:
    """An fd of the disk for QEMU (which opens nothing itself) and whether it is O_DIRECT:
    the guest has its own page cache, so the host's is bypassed where the file system can
    (QEMU's cache=none); a file system without O_DIRECT (tmpfs) gets the page cache."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_DIRECT), True
    except OSError as e:
        if e.errno != 22:  # EINVAL: no O_DIRECT there
            raise LaunchError(f"cannot open the container's disk {path}: {e.strerror}") from None
    return os.open(path, flags), False


def placeholder() -> int:
    """What a VM booted before its container (pooled, a snapshot's) has as its disk: an empty
    memfd (nothing on the host to clean up; the guest sees a disk of 0 bytes)."""
    return os.memfd_create("vmrt-disk-placeholder", os.MFD_CLOEXEC)


def qemu_args(fd: int, direct: bool, microvm: bool) -> list[str]:
    """The disk on QEMU's command line: the fd in an fdset, a file node over it, a raw node,
    a virtio-blk device (the same device whatever the file: a snapshot's state restores)."""
    dev = "virtio-blk-device" if microvm else "virtio-blk-pci"
    return ["-add-fd", f"fd={fd},set={BOOT_FDSET}",
            "-blockdev", _file_node(BOOT_FDSET, direct),
            "-blockdev", f"driver=raw,node-name={NODE},file={NODE}-file{BOOT_FDSET},discard=unmap",
            # an I/O error reaches the guest as EIO: QEMU's default (werror=enospc) would pause the
            # VM when the host's file system is full (sparse files overcommit it), freezing every
            # tenant whose next write needs a block there
            "-device", f"{dev},drive={NODE},id={NODE},werror=report,rerror=report"]


def _file_node(fdset: int, direct: bool) -> str:
    return (f"driver=file,node-name={NODE}-file{fdset},filename=/dev/fdset/{fdset},aio=threads,"
            f"discard=unmap,cache.direct={'on' if direct else 'off'},locking=off")


async def swap(qmp: Any, fd: int, direct: bool, size: int) -> None:
    """The container's disk in place of a pooled VM's placeholder (QMP: the fd in a new fdset,
    a file node over it, the raw node reopened on it, the placeholder's node gone), then the
    guest told its new capacity."""
    qmp.send_fd_scm(fd)
    await qmp.execute("add-fd", {"fdset-id": SWAP_FDSET})
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": f"{NODE}-file{SWAP_FDSET}",
                                       "filename": f"/dev/fdset/{SWAP_FDSET}", "aio": "threads",
                                       "discard": "unmap", "cache": {"direct": direct}, "locking": "off"})
    await qmp.execute("blockdev-reopen", {"options": [{"driver": "raw", "node-name": NODE,
                                                       "file": f"{NODE}-file{SWAP_FDSET}", "discard": "unmap"}]})
    await qmp.execute("blockdev-del", {"node-name": f"{NODE}-file{BOOT_FDSET}"})
    await qmp.execute("remove-fd", {"fdset-id": BOOT_FDSET})  # the placeholder's memfd: closed
    await resize(qmp, size)


async def resize(qmp: Any, size: int) -> None:
    """Tell the guest the disk's capacity (``block_resize`` to the file's own size changes no
    byte of it; virtio-blk raises a config interrupt and the guest reads the capacity again)."""
    await qmp.execute("block_resize", {"node-name": NODE, "size": size})
