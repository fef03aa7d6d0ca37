"""Host code touching a tree an image or a container controls: never follow it out, never open a device.

An image's layers, a container's writable layer and its volumes are written by
the tenant: any path in them may be a symlink aimed at the host (``/etc/passwd ->
/etc/shadow``, ``-> ../../../../etc/shadow``), a FIFO (a read blocks for ever), a
device node (``c 1 1`` is the host's ``/dev/mem`` once the host opens it; opening
a tty node makes it the opener's controlling terminal), or a huge file. So:

* :func:`open_in_root` resolves a path as ``chroot(root)`` would (``openat2`` with
  ``RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS``: symlinks, absolute ones too, and
  ``..`` stay inside ``root``; ``/proc/self/...``-style magic links are refused),
  or on kernels without openat2 (before 5.6) by walking the path one component at a
  time with ``O_NOFOLLOW`` and resolving each link itself, the same way;
* :func:`read_regular` opens the result as ``O_PATH`` first (no open of a device
  driver, no blocking on a FIFO), checks the fd is a regular file, only then reopens
  it for reading (``O_NONBLOCK | O_NOCTTY``) and reads at most ``limit`` bytes;
* :func:`replace_in_root` writes a file into such a tree: its parent resolved in
  the root, a new file created ``O_EXCL | O_NOFOLLOW`` beside it and renamed over
  the name (a planted symlink or FIFO there is replaced, never followed);
* :func:`inert_mount` puts a directory (vmrt's state root, which holds the image
  store's unpacked layers and the process-mode writable layers) on a ``nosuid,
  nodev, noexec`` mount: a setuid binary or a device node an image or a container
  left there is inert on the host. Containers see their own root through an
  overlay mounted elsewhere, whose flags alone apply to them.

Below every other module but :mod:`vmrt.errors` (anything may use it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat

from .errors import VmrtError

LOG = logging.getLogger(__name__)

SYS_OPENAT2 = 437          # the same number on every architecture (asm-generic, Linux 5.6)
SYS_MOUNT_SETATTR = 442    # Linux 5.12
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 1 << 14
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
INERT = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC
MAX_LINKS = 40             # symlinks followed in one resolution (the kernel's own limit)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2: bool | None = None   # unknown until the first call; False: walk instead


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class FileTooLarge(VmrtError):
    """A file read with a size bound held more (the caller names it in the message)."""


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """The openat2(2) system call; OSError with the errno (ENOSYS before Linux 5.6)."""
    creating = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE  # O_TMPFILE includes O_DIRECTORY
    how = _OpenHow(flags, mode if creating else 0, resolve)  # a mode without them: EINVAL
    fd = _libc.syscall(SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(path), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _root_fd(root: str | os.PathLike[str] | int) -> tuple[int, bool]:
    """(an O_PATH fd of the root dir, whether we opened it). The root itself is vmrt's own path."""
    if isinstance(root, int):
        return root, False
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), True


def open_in_root(root: str | os.PathLike[str] | int, path: str, flags: int = os.O_RDONLY,
                 mode: int = 0o600, *, follow: bool = True) -> int:
    """``path`` opened inside ``root`` (a dir path or fd) as chroot(root) would resolve it.

    Symlinks (absolute ones too) and ``..`` never leave ``root``; magic links are refused.
    ``follow=False``: a symlink as the last component is not followed (ELOOP, or with
    ``O_PATH`` an fd of the link itself). ``O_CLOEXEC`` (and but for ``O_PATH``, ``O_NOCTTY``)
    are always added.
    Raises OSError (ENOENT, ENOTDIR, ELOOP, ...) like open(2)."""
    global _have_openat2
    flags |= os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY  # openat2: O_PATH takes no others
    if not follow:
        flags |= os.O_NOFOLLOW
    rfd, owned = _root_fd(root)
    try:
        if _have_openat2 is not False:
            for _ in range(8):  # EAGAIN: a rename raced the resolution; try again
                try:
                    fd = openat2(rfd, path, flags, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
                    _have_openat2 = True
                    return fd
                except OSError as e:
                    if e.errno == errno.ENOSYS:
                        _have_openat2 = False
                        break
                    if e.errno != errno.EAGAIN:
                        raise
            else:
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)
        return _walk(rfd, path, flags, mode)
    finally:
        if owned:
            os.close(rfd)


def _walk(rfd: int, path: str, flags: int, mode: int) -> int:
    """open_in_root without openat2: one component at a time, each opened O_PATH|O_NOFOLLOW
    relative to its parent's fd; a symlink is read from its own fd and its target resolved
    the same way from the root (absolute) or its dir (relative); ``..`` stops at the root."""
    follow_last = not flags & os.O_NOFOLLOW
    stack = [os.dup(rfd)]           # dir fds from the root down to the current dir
    parts = [p for p in path.split("/") if p not in ("", ".")]
    parts.reverse()                 # a stack: the next component is parts[-1]
    links = 0
    try:
        while parts:
            name = parts.pop()
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            last = not parts
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            except FileNotFoundError:
                if last and flags & os.O_CREAT:
                    return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=stack[-1])
                raise
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
                try:
                    target = os.readlink("", dir_fd=fd)  # readlinkat(fd, ""): this very link
                finally:
                    os.close(fd)
                links += 1
                if links > MAX_LINKS or not target:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
                continue
            if last:
                return _reopen(fd, st, name, stack[-1], flags, mode)
            if not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            stack.append(fd)
        # the root itself (an empty path, or one that climbed back to it)
        return _reopen(os.dup(stack[-1]), os.fstat(stack[-1]), ".", stack[-1], flags, mode)
    finally:
        for d in stack:
            os.close(d)


def _reopen(fd: int, st: os.stat_result, name: str, dirfd: int, flags: int, mode: int) -> int:
    """The walk's last component, found as the O_PATH ``fd``, opened with the caller's flags."""
    if flags & os.O_PATH:
        if flags & os.O_DIRECTORY and not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
        return fd
    if stat.S_ISLNK(st.st_mode):  # follow=False and a link: what open(O_NOFOLLOW) says
        os.close(fd)
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)
    try:
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), name)
        # the same inode again, through our own fd: no path is resolved a second time
        return os.open(f"/proc/self/fd/{fd}", flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW), mode)
    finally:
        os.close(fd)


def stat_in_root(root: str | os.PathLike[str] | int, path: str, *, follow: bool = True) -> os.stat_result | None:
    """What ``path`` is inside ``root`` (never opening it), or None where nothing resolves."""
    try:
        fd = open_in_root(root, path, os.O_PATH, follow=follow)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def open_regular(root: str | os.PathLike[str] | int, path: str) -> int | None:
    """A read-only fd of ``path`` inside ``root`` if it is a regular file; None if it is
    missing, a dangling or looping link, or anything else (a device, FIFO, socket, dir):
    such a file is never opened, only looked at through an O_PATH fd."""
    try:
        pfd = open_in_root(root, path, os.O_PATH)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EXDEV):
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            return None
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(pfd)


def read_regular(root: str | os.PathLike[str] | int, path: str, limit: int) -> bytes | None:
    """The content of ``path`` inside ``root`` if it is a regular file (None otherwise, as for
    a missing file); FileTooLarge if it holds more than ``limit`` bytes."""
    fd = open_regular(root, path)
    if fd is None:
        return None
    try:
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise FileTooLarge(f"{path} is larger than {limit >> 10} KiB")
    return b"".join(chunks)


def replace_in_root(root: str | os.PathLike[str] | int, path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` as ``path`` inside ``root``: the parent dir resolved inside the root,
    a fresh file made beside the name (``O_EXCL|O_NOFOLLOW``) and renamed over it, so a
    symlink, FIFO or device planted at the name is replaced, never followed or opened.
    A directory at the name stays (IsADirectoryError)."""
    parent, _, base = path.rstrip("/").rpartition("/")
    if base in ("", ".", ".."):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
    dfd = open_in_root(root, parent or "/", os.O_PATH | os.O_DIRECTORY)
    try:
        tmp = f".{base}.vmrt-{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


# --- inert mounts ---------------------------------------------------------------------


def is_inert(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies on a nosuid, nodev, noexec mount."""
    return os.statvfs(path).f_flag & INERT == INERT


def inert_mount(path: str | os.PathLike[str]) -> bool:
    """Make sure ``path`` (an existing dir) is on a nosuid, nodev, noexec mount: if it is not,
    bind it on itself (recursively) and set those flags on the bind (and its submounts).
    Idempotent and cheap once done (one statvfs); set up once per boot, under a lock on the
    dir so two first uses make one mount. Returns whether a mount was made. Needs root;
    without it nothing is done (nothing vmrt runs unprivileged exec's or opens from there)."""
    try:
        if is_inert(path):
            return False
    except FileNotFoundError:
        return False
    if os.geteuid() != 0:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.statvfs(path)
        if st.f_flag & INERT == INERT:
            return False
        p = os.fsencode(path)
        _mount(p, p, MS_BIND | MS_REC)
        try:
            _set_inert(p, st.f_flag)
        except OSError:
            _libc.umount2(p, 2)  # MNT_DETACH: leave nothing half made
            raise
        LOG.debug("%s: bound on itself nosuid,nodev,noexec", path)
        return True
    except OSError as e:
        raise VmrtError(f"cannot put {path} on a nosuid,nodev,noexec mount: {e.strerror}") from None
    finally:
        os.close(fd)


def _mount(src: bytes, target: bytes, flags: int) -> None:
    if _libc.mount(src, target, None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def mount_setattr(path: str | os.PathLike[str] | bytes, attr_set: int, attr_clr: int = 0, *,
                  recursive: bool = True) -> None:
    """mount_setattr(2) on the mount at ``path`` (with ``recursive``, every mount below it too):
    ``MOUNT_ATTR_*`` bits to set and clear. OSError (ENOSYS before Linux 5.12)."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    r = _libc.syscall(SYS_MOUNT_SETATTR, ctypes.c_int(-100), os.fsencode(path),  # AT_FDCWD
                      ctypes.c_uint(AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
                      ctypes.c_size_t(ctypes.sizeof(attr)))
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def _set_inert(p: bytes, old_flags: int) -> None:
    """nosuid,nodev,noexec on the mount at ``p`` and every mount below it (mount_setattr
    AT_RECURSIVE), or on older kernels on the top one by a bind remount keeping its other flags."""
    try:
        mount_setattr(p, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC)
        return
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
    keep = 0
    for st_flag, ms_flag in ((os.ST_RDONLY, MS_RDONLY), (os.ST_NOATIME, MS_NOATIME),
                             (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if old_flags & st_flag:
            keep |= ms_flag
    _mount(b"none", p, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC | keep)


def mount_flags(path: str | os.PathLike[str]) -> set[str]:
    """The ``ro/nosuid/nodev/noexec`` flags of the mount ``path`` lies on (for checks and tests)."""
    f = os.statvfs(path).f_flag
    names = {os.ST_RDONLY: "ro", os.ST_NOSUID: "nosuid", os.ST_NODEV: "nodev", os.ST_NOEXEC: "noexec"}
    return {n for bit, n in names.items() if f & bit}


__all__ = ["FileTooLarge", "inert_mount", "is_inert", "mount_flags", "mount_setattr", "open_in_root", "open_regular",
           "openat2", "read_regular", "replace_in_root", "stat_in_root"]
