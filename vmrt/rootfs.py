"""Present an image's unpacked layers as one read-only directory.

One layer: a read-only bind mount. Several: a read-only overlayfs with the
layers as lowerdirs (no upper). The mount belongs to one container and is
removed at teardown; the layers themselves are shared and never written.
:class:`LayeredRoot` finds which layer a path (``/etc/passwd``) comes from without mounting them.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from . import safefs
from .errors import LaunchError

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_PRIVATE, MS_REC = 1, 2, 4, 32, 4096, 1 << 18, 1 << 14
MS_SHARED = 1 << 20
MS_NOEXEC = 8
SYS_MOUNT_SETATTR = 442  # x86_64 and every architecture's new-syscall table
AT_RECURSIVE, AT_SYMLINK_NOFOLLOW, MOUNT_ATTR_RDONLY = 0x8000, 0x100, 0x1
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8


def _mount(src: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    r = _libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None,
                    ctypes.c_ulong(flags), data.encode() if data else None)
    if r != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"mount {src} on {target}: {os.strerror(err)}")


def mount_readonly(layers: list[Path], target: Path) -> None:
    """The layers stacked read-only at ``target``: what virtiofsd serves to a VM.

    Also nosuid and nodev on the host: the image is untrusted, and nothing on the
    host should ever exec a setuid file or open a device node from it (the guest
    kernel applies those bits itself on its side of virtio-fs).
    """
    target.mkdir(parents=True, exist_ok=True)
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    if len(layers) == 1:
        _mount(str(layers[0]), str(target), None, MS_BIND)
        try:
            _mount("none", str(target), None, MS_BIND | MS_REMOUNT | flags)
            _mount("none", str(target), None, MS_PRIVATE)
        except LaunchError:
            umount(target)
            raise
    else:
        lower = ":".join(str(p) for p in reversed(layers))
        _mount("overlay", str(target), "overlay", flags, f"lowerdir={lower}")


def mount_readonly_overlay(layers: list[Path], empty: Path, target: Path) -> None:
    """The layers as a read-only overlay (no upper dir: read-only in every mount namespace it
    propagates to, unlike a bind mount whose read-only flag is set after it propagated).
    A single layer gets ``empty`` as a second lower dir: overlayfs needs two without an upper."""
    target.mkdir(parents=True, exist_ok=True)
    lower = [str(p) for p in reversed(layers)]
    if len(lower) == 1:
        empty.mkdir(exist_ok=True)
        lower.append(str(empty))
    _mount("overlay", str(target), "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV, f"lowerdir={':'.join(lower)}")


def mount_overlay(layers: list[Path], upper: Path, work: Path, target: Path) -> None:
    """The image's layers read-only under a writable upper: the container's root."""
    target.mkdir(parents=True, exist_ok=True)
    lower = ":".join(str(p) for p in reversed(layers))
    _mount("overlay", str(target), "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")


def umount(target: Path) -> None:
    """Detach the mount at ``target``; never through a symlink at its last component (a path a
    guest could have changed: UMOUNT_NOFOLLOW)."""
    if _libc.umount2(str(target).encode(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise LaunchError(f"umount {target}: {os.strerror(err)}")


def bind(src: Path, target: Path, readonly: bool) -> None:
    """Bind src (a directory or a file) on target, with what is mounted below it; read-only if
    asked, and then recursively (as Docker 25's ``rro``): a mount under a ``:ro`` volume's source
    is read-only too. Always nosuid and nodev: these binds are the host side of a VM's share,
    where virtiofsd (root) opens files for the guest: a device node the guest made in a volume
    must never open a host device (the guest applies suid/dev bits itself, on its side)."""
    _mount(str(src), str(target), None, MS_BIND | MS_REC)
    try:
        _mount("none", str(target), None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0))
        if readonly:
            readonly_recursive(target)
        _mount("none", str(target), None, MS_PRIVATE | MS_REC)
    except LaunchError:
        umount(target)
        raise


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def readonly_recursive(target: Path) -> None:
    """The mount at ``target`` and every mount below it read-only: mount_setattr(2) with
    AT_RECURSIVE (Linux 5.12), which a remount cannot do (it changes one mount)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    r = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(-100), str(target).encode(),
                      ctypes.c_uint(AT_RECURSIVE | AT_SYMLINK_NOFOLLOW), ctypes.byref(attr),
                      ctypes.c_size_t(ctypes.sizeof(attr)))
    if r != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"cannot make {target} recursively read-only: {os.strerror(err)}")


def mount_tmpfs(target: Path, options: str) -> None:
    """A tmpfs at ``target`` (nosuid, nodev, noexec) with ``options`` (size=, nr_inodes=, mode=)."""
    _mount("tmpfs", str(target), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)


def mounts_under(top: Path) -> list[Path]:
    """Mount points at or below top, deepest first."""
    t = str(top).rstrip("/")
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    found = {p for p in points if p == t or p.startswith(t + "/")}
    return [Path(p) for p in sorted(found, key=len, reverse=True)]


def umount_all(top: Path) -> None:
    for p in mounts_under(top):
        umount(p)


SHARE_TOP = "mode=0755,size=64k,nr_inodes=1024"


def share_top(share: Path, shared: bool = False) -> None:
    """The top of a VM's share: a small tmpfs of its own holding only the mount points
    (``rootfs``, ``volumes/N``). Once they are mounted, :func:`seal_share` makes it read-only, so
    the guest, through virtiofsd, can neither add nor rename an entry on the host's path to
    what the host later unmounts. ``shared``: a pooled VM's, whose later mounts must reach the
    virtiofsd that already runs."""
    share.mkdir(mode=0o700)
    _mount("vmrt-share", str(share), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, SHARE_TOP)
    if shared:
        try:
            _mount("none", str(share), None, MS_SHARED)
        except LaunchError:
            umount(share)
            raise


def seal_share(share: Path, readonly: bool = True) -> None:
    """The share's top read-only (or writable again, for a pooled VM's claim): the tmpfs's own
    flag, so it holds in every mount namespace that has a copy (virtiofsd's)."""
    _mount("none", str(share), None, MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC | (MS_RDONLY if readonly else 0),
           SHARE_TOP)


class LayeredRoot:
    """Looks a path up in an image's layers, topmost first (for /etc/passwd): resolved inside
    each layer, never opened (a whiteout or a device node there ends the search too)."""

    def __init__(self, layers: list[Path]) -> None:
        self.layers = layers

    def pick(self, path: str) -> Path:
        for layer in reversed(self.layers):
            if safefs.stat_in_root(layer, path) is not None:
                return layer
        return self.layers[-1]
