"""A container's files and processes: ``GET|HEAD|PUT /containers/{id}/archive`` (what
``docker cp`` uses), ``GET /containers/{id}/top`` and ``GET /containers/{id}/changes``.

Copies run ``tar`` inside the running container through an exec, as ``vmrt cp`` does
(vmrt/cp.py: runc exec, or the guest agent in VM mode), so the host never resolves a path of
the container's: ``tar cf - -C PARENT NAME`` out of it, ``tar xf - -C DIR`` into it (the image
needs a ``tar``). The service never extracts an archive itself: both ways it reads the tar
stream member by member and writes it again (:class:`Members`), so what reaches the other
side has relative names without ``..``, nothing that lies beyond a symbolic link of the same
archive, no link that points out of it, no device node (out: skipped; in: refused), no
setuid/setgid bit, no extended attribute, and no member header larger than
:data:`HEADER_MAX`. Nothing is buffered whole: out, the container's tar is parsed as it is
read and written to the client as it goes; in, the request body is read as the container's
tar consumes it. The stat Docker sends in ``X-Docker-Container-Path-Stat`` is the first
member's header (size 0 for a directory, where Docker gives lstat's). A created or stopped
container is copied from and to as Docker allows, by a short tool run of its tar over its
files in its isolation (vmrt/offline.py: runc, or a VM booted for it), its record untouched.
The whole root cannot be copied (``path=/``: 400): its /proc and /sys are live file systems
there. What an upload may replace is tar's to say (``noOverwriteDirNonDir`` is accepted, not
enforced): busybox's tar refuses a directory over a file and a file over a directory; GNU tar
replaces a file with a directory. Docker's CLI refuses both at the top level itself.

``changes`` (``docker diff``) reads a process container's writable layer, the overlay's
upper dir, from the host, beside the image's layers: every directory is opened relative to
its parent with ``O_NOFOLLOW | O_DIRECTORY`` and every entry is lstat'ed through that fd, so
a symbolic link the container left is never followed; a whiteout (a character device 0:0) is
a deletion, an opaque directory (``trusted.overlay.opaque``) hides the layers below it. A VM
container's writable layer is an ext4 image only its guest reads (vm/disk.py): its guest agent
lists the upper dir (WALK_UPPER: an exec while it runs, else a VM booted for the walk by a tool
run; one created and never started has no disk: no changes, nothing booted), and the service
parses that list as a guest's hostile bytes, bounded (vmrt/agent/walk.py), into a tree that
the same comparison reads (:class:`UpperDir`: :class:`FdUpper` on the host, :class:`TreeUpper`
of the walk), so both isolations report the same changes for the same writes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import posixpath
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from aiohttp import web

from ..agent import walk
from ..config import Config
from ..errors import ContainerExecError, VmrtError
from ..execs import ExecOptions, resolve, run_tool, walk_upper
from ..formatting import inert
from ..images.store import Store
from ..layout import rw_dir
from ..lifecycle import owner_alive
from ..state import Container, State, Status
from ..vm import disk as vmdisk
from .base import ApiError, Request, Routes, in_thread

LOG = logging.getLogger(__name__)

STAT_HEADER = "X-Docker-Container-Path-Stat"
NAME_MAX = 4096          # a member's name or link target (PATH_MAX)
HEADER_MAX = 1 << 20     # what one member's headers (pax records, GNU long names) may take
LINKS_MAX = 1 << 20      # symbolic links remembered per archive (what lies beyond one is refused)
BUF = 1 << 16
ERR_MAX = 1 << 14        # the container's tar's stderr kept (for the message)
DRAIN_MAX = 64 << 20     # an upload's rest (a refused one's) read and dropped, so that the client reads the answer
JOIN_TIMEOUT = 30.0      # the container's tar, once its output has ended, exits within this
DEPTH_MAX = 512          # directory levels `changes` walks
# Go's os.FileMode bits, as Docker's stat carries them
GO_DIR, GO_SYMLINK, GO_DEVICE, GO_PIPE = 1 << 31, 1 << 27, 1 << 26, 1 << 25
GO_SETUID, GO_SETGID, GO_CHAR, GO_STICKY = 1 << 23, 1 << 22, 1 << 21, 1 << 20
# Docker's change kinds
MODIFIED, ADDED, DELETED = 0, 1, 2
# what the runtime makes in every container's root (Docker's init layer): never a change of its;
# their directories' mtimes changed when they were made, so only a change in them marks those
INIT_PATHS = frozenset({"/dev", "/dev/pts", "/dev/shm", "/dev/console", "/proc", "/sys", "/etc/hosts",
                        "/etc/hostname", "/etc/resolv.conf", "/etc/mtab", "/.dockerenv"})
INIT_DIRS = frozenset(posixpath.dirname(p) for p in INIT_PATHS)


class Refused(VmrtError):
    """A member of a copied archive that vmrt does not pass on (400 on an upload)."""


# --- helpers -------------------------------------------------------------------------------
def _container(cfg: Config, ref: str, *, running: bool) -> Container:
    st = State(cfg.db_path)
    try:
        c = st.get(ref)
    finally:
        st.close()
    if running and (c.status != Status.RUNNING or not owner_alive(c)):
        raise ApiError(409, f"Container {c.id} is not running")
    return c


def _read_capped(fd: int, into: bytearray, limit: int) -> None:
    with open(fd, "rb", buffering=0) as f:
        while chunk := f.read(BUF):
            into += chunk[:max(0, limit - len(into))]


def _exec_tar(cfg: Config, cid: str, args: list[str], stdin: int | None, stdout: int, stderr: int) -> int:
    """``tar ARGS`` in the container as its root (as Docker's copies), running or not: its
    exit status."""
    return run_tool(cfg, cid, ["tar", *args], (stdin if stdin is not None else stdout, stdout, stderr),
                    stdin=stdin is not None)


class _Tar:
    """``tar ARGS`` running in the container, in a thread of its own, with its stderr kept."""

    def __init__(self, cfg: Config, cid: str, args: list[str], stdin: int | None, stdout: int) -> None:
        self.status: int | None = None
        self.error: Exception | None = None
        self.err = bytearray()
        er, ew = os.pipe2(os.O_CLOEXEC)
        self._err = threading.Thread(target=_read_capped, args=(er, self.err, ERR_MAX), daemon=True)
        self._err.start()
        self._run = threading.Thread(target=self._exec, args=(cfg, cid, args, stdin, stdout, ew), daemon=True)
        self._run.start()

    def _exec(self, cfg: Config, cid: str, args: list[str], stdin: int | None, stdout: int, ew: int) -> None:
        try:
            self.status = _exec_tar(cfg, cid, args, stdin, stdout, ew)
        except Exception as e:
            self.error = e
        finally:  # our copies: the reader sees EOF once the container's tar has closed its own
            for fd in {fd for fd in (stdin, stdout, ew) if fd is not None}:
                os.close(fd)

    def wait(self, timeout: float | None = JOIN_TIMEOUT) -> bool:
        """Whether it ended within ``timeout`` seconds."""
        self._run.join(timeout)
        self._err.join(1.0 if self._run.is_alive() else timeout)
        return not self._run.is_alive()

    def no_tar(self) -> bool:
        """The exec could not run tar at all (not in the image, not executable)."""
        if isinstance(self.error, ContainerExecError):
            return True
        return self.status in (126, 127)

    def failure(self, what: str) -> VmrtError | None:
        """What went wrong, in one line: None when tar ran and exited 0."""
        if self.no_tar():
            return VmrtError(f"{what}: the container has no usable tar (vmrt copies with the image's own tar)")
        if self.error is not None:
            return self.error if isinstance(self.error, VmrtError) else VmrtError(f"{what}: {self.error}")
        if self.status is None:
            return VmrtError(f"{what}: tar in the container did not exit")
        if self.status != 0:
            said = "; ".join(inert(ln).strip() for ln in bytes(self.err).splitlines() if ln.strip())[:500]
            return VmrtError(f"{what}: tar in the container failed (exit {self.status})"
                             + (f": {said}" if said else ""))
        return None


class _Reader:
    """A file-like ``read`` over a function that reads up to n bytes, which bounds what the
    headers of one member take (``budget``: None while a member's data is read)."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.budget: int | None = HEADER_MAX + 2 * BUF
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        data = self._read(BUF if n is None or n < 0 else n)
        self.total += len(data)
        if self.budget is not None:
            self.budget -= len(data)
            if self.budget < 0:
                raise tarfile.ReadError(f"a member's headers take more than {HEADER_MAX} bytes")
        return data

    def headers_next(self) -> None:
        self.budget = HEADER_MAX + 2 * BUF


class _Writer:
    """A file-like ``write`` over a function (the client's response, a pipe). Once ``closed``
    it writes nothing: a tar stream left unclosed after an error would write its end when it
    is collected (into a pipe fd that may by then be another file's)."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self.closed = False

    def write(self, data: bytes) -> int:
        if not self.closed:
            self._write(bytes(data))
        return len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- members ---------------------------------------------------------------------------------
class Members:
    """The checks every member of a copied archive passes, both ways, and the member written
    again in its place (None: skipped). ``base``: out of a container, every name lies under
    it ("." for the whole root); ``inbound``: into one (a device node is refused rather than
    skipped); ``owner``: (uid, gid) every member gets (``copyUIDGID``)."""

    def __init__(self, base: str = ".", *, inbound: bool = False, owner: tuple[int, int] | None = None) -> None:
        self.base, self.inbound, self.owner = base, inbound, owner
        self.links: set[str] = set()

    def name(self, raw: str, what: str = "member") -> str:
        if not raw or "\x00" in raw or len(raw) > NAME_MAX:
            raise Refused(f"{what} {raw[:100]!r}: an empty or over-long name")
        if raw.startswith("/"):
            raise Refused(f"{what} {raw[:200]!r} has an absolute name")
        if ".." in raw.split("/"):
            raise Refused(f"{what} {raw[:200]!r} leads out with ..")
        name = posixpath.normpath(raw)
        if self.base != "." and name != self.base and not name.startswith(self.base + "/"):
            raise Refused(f"{what} {raw[:200]!r} is not under {self.base!r}")
        i = name.find("/")
        while i >= 0:
            if name[:i] in self.links:
                raise Refused(f"{what} {raw[:200]!r} lies beyond the symbolic link {name[:i]!r} of the same archive")
            i = name.find("/", i + 1)
        return name

    def _out(self, name: str) -> str:
        """A name as it goes out: a directory's content (base ".") as ``./NAME``, as Docker's."""
        return name if self.inbound or self.base != "." or name == "." else "./" + name

    def check(self, m: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = self.name(m.name)
        out = tarfile.TarInfo(self._out(name))
        out.mode = m.mode & 0o1777  # no setuid, no setgid
        out.mtime = min(max(0, int(m.mtime)), 8 ** 11 - 1)
        out.uid, out.gid = self.owner if self.owner is not None else (max(0, m.uid), max(0, m.gid))
        out.uname = out.gname = ""  # numeric ids, as Docker's: the names are the other side's
        if m.isreg():
            out.type, out.size = tarfile.REGTYPE, m.size
        elif m.isdir():
            out.type = tarfile.DIRTYPE
        elif m.issym():
            target = m.linkname
            if not target or "\x00" in target or len(target) > NAME_MAX:
                raise Refused(f"symbolic link {m.name[:200]!r}: an empty or over-long target")
            if not target.startswith("/"):
                to = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
                if to == ".." or to.startswith("../"):
                    raise Refused(f"symbolic link {m.name[:200]!r} -> {target[:200]!r} points out of the archive")
            if len(self.links) >= LINKS_MAX:
                raise Refused(f"more than {LINKS_MAX} symbolic links in one archive")
            self.links.add(name)
            out.type, out.linkname = tarfile.SYMTYPE, target
        elif m.islnk():
            out.type = tarfile.LNKTYPE
            out.linkname = self._out(self.name(m.linkname, f"hard link {m.name[:200]!r} to"))
        elif self.inbound:
            raise Refused(f"member {m.name[:200]!r} is a device node or a FIFO: vmrt does not copy those")
        else:
            LOG.info("not copied out of a container: %r (a device node or a FIFO)", m.name[:200])
            return None
        return out


def copy_members(src: tarfile.TarFile, reader: _Reader, dst: tarfile.TarFile, members: Members,
                 first: tarfile.TarInfo | None, keep: Callable[[tarfile.TarInfo], bool] = lambda m: True) -> None:
    """Every member of ``src`` from ``first`` on, checked, into ``dst`` (not closed)."""
    m = first
    while m is not None:
        out = members.check(m)
        if out is not None and keep(out):
            if out.isreg():
                reader.budget = None
                dst.addfile(out, src.extractfile(m))
            else:
                dst.addfile(out)
        src.members.clear()  # type: ignore[attr-defined]  # a stream's members: none is looked up again (a long archive stays small)
        reader.headers_next()
        m = src.next()


# --- paths and stat --------------------------------------------------------------------------
def _target(raw: str) -> tuple[str, str, str]:
    """A path of the container as ``(dir, member, name)``: tar runs in ``dir`` on ``member``,
    whose members' names start with it; ``name`` is the stat's. A path ending in ``/.`` (and
    the root) is its directory's content, as Docker reads it."""
    if not raw:
        raise ApiError(400, "Path cannot be empty")
    if "\x00" in raw or len(raw) > NAME_MAX:
        raise ApiError(400, "invalid path: a NUL byte, or longer than 4096 bytes")
    path = "/" + raw.lstrip("/")  # relative: from the root, as Docker's daemon takes it
    norm = "/" + posixpath.normpath(path).lstrip("/")
    if norm == "/" or path.endswith("/."):
        return norm, ".", "/" if norm == "/" else "."
    parent, base = posixpath.split(norm)
    return parent, base, base


def _go_mode(m: tarfile.TarInfo) -> int:
    mode = m.mode & 0o777
    for bit, go in ((0o4000, GO_SETUID), (0o2000, GO_SETGID), (0o1000, GO_STICKY)):
        if m.mode & bit:
            mode |= go
    if m.isdir():
        mode |= GO_DIR
    elif m.issym():
        mode |= GO_SYMLINK
    elif m.ischr():
        mode |= GO_DEVICE | GO_CHAR
    elif m.isblk():
        mode |= GO_DEVICE
    elif m.isfifo():
        mode |= GO_PIPE
    return mode


def stat_doc(m: tarfile.TarInfo, name: str) -> dict[str, Any]:
    """Docker's ContainerPathStat of the path whose tar header ``m`` is."""
    mtime = min(max(0, int(m.mtime)), 253402300799)  # up to 9999-12-31
    return {"name": name, "size": m.size if m.isreg() else len(m.linkname) if m.issym() else 0,
            "mode": _go_mode(m), "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)),
            "linkTarget": m.linkname if m.issym() else ""}


def _stat_header(doc: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


class _Source:
    """``tar cf -`` of a path run in the container, read here as a stream of members."""

    def __init__(self, cfg: Config, cid: str, raw: str) -> None:
        self.raw = raw
        self.parent, member, self.name = _target(raw)
        self.base = member
        self.r, w = os.pipe2(os.O_CLOEXEC)
        arg = f"./{member}" if member.startswith("-") else member  # a name, never a tar option
        self.tar = _Tar(cfg, cid, ["cf", "-", "-C", self.parent, arg], None, w)
        self.reader = _Reader(self._read)
        self.tf: tarfile.TarFile | None = None

    def _read(self, n: int) -> bytes:
        return os.read(self.r, n)

    def open(self, ref: str) -> tarfile.TarInfo | None:
        """The first member (the path itself), or None where the path does not exist."""
        try:
            self.tf = tarfile.open(fileobj=self.reader, mode="r|", bufsize=BUF)  # type: ignore[call-overload]
            first = self.tf.next()
        except (tarfile.TarError, OSError):
            first = None
        if first is None:
            self.close()
            failed = self.tar.failure(f"cannot copy {ref}:{self.raw}")
            if self.tar.no_tar() or self.tar.error is not None or self.tar.status is None:
                raise failed or VmrtError(f"cannot copy {ref}:{self.raw}")
            if self.tar.status == 0:
                raise VmrtError(f"cannot copy {ref}:{self.raw}: tar in the container wrote no archive")
            return None  # tar said no: the path is not there
        if (member := posixpath.normpath(first.name)) != self.base:
            self.close()
            raise VmrtError(f"cannot copy {ref}:{self.raw}: tar in the container wrote {member[:200]!r} first")
        return first

    def drain(self) -> None:
        """What the container's tar writes after the archive's end (padding), read and dropped."""
        left = HEADER_MAX
        while left > 0 and (chunk := os.read(self.r, BUF)):
            left -= len(chunk)
        if left <= 0:
            raise VmrtError("tar in the container wrote more after the archive's end")

    def close(self) -> None:
        """Stop reading (the container's tar, if still writing, gets EPIPE) and wait for it."""
        if self.r >= 0:
            os.close(self.r)
            self.r = -1
        self.tar.wait()


def stat_path(cfg: Config, c: Container, raw: str, ref: str) -> dict[str, Any] | None:
    """The stat of ``raw`` in the container, or None where it does not exist."""
    src = _Source(cfg, c.id, raw)
    try:
        first = src.open(ref)
        return None if first is None else stat_doc(first, src.name)
    finally:
        src.close()


def _not_found(raw: str, ref: str) -> ApiError:
    return ApiError(404, f"Could not find the file {raw} in container {ref}")


def send_archive(cfg: Config, c: Container, raw: str, ref: str, start: Callable[[dict[str, Any]], None],
                 write: Callable[[bytes], None]) -> None:
    """The archive of ``raw``: ``start(stat)`` once its first member is known, then ``write``
    for each piece of the checked tar stream. Raises before ``start`` when there is nothing to
    send (ApiError 404, 400), and after it when the stream must not end as a whole archive."""
    if _target(raw)[:2] == ("/", "."):
        raise ApiError(400, "copying the whole root of a container is not supported: its /proc and /sys are live "
                            "file systems (copy its directories one by one)")
    src = _Source(cfg, c.id, raw)
    writer = _Writer(write)
    try:
        first = src.open(ref)
        if first is None:
            raise _not_found(raw, ref)
        members = Members(src.base)
        try:  # the path itself, before the answer's headers (afterwards, a refusal can only cut it short)
            if members.check(first) is None:
                raise Refused("it is a device node or a FIFO: vmrt does not copy those")
        except Refused as e:
            raise ApiError(400, f"cannot copy {ref}:{raw}: {e}") from None
        assert src.tf is not None
        start(stat_doc(first, src.name))
        dst = tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                           bufsize=BUF)
        copy_members(src.tf, src.reader, dst, members, first)
        src.drain()
        os.close(src.r)
        src.r = -1
        if not src.tar.wait():
            raise VmrtError(f"cannot copy {ref}:{raw}: tar in the container did not exit")
        if (failed := src.tar.failure(f"cannot copy {ref}:{raw}")) is not None:
            raise failed
        dst.close()  # the archive's end: only now that the container's tar said it is all there
    finally:
        writer.closed = True
        src.close()


def _extraction_dir(cfg: Config, c: Container, raw: str, ref: str) -> str:
    """The directory an upload goes into: ``raw``, or where it leads as a symbolic link."""
    path = "/" + posixpath.normpath("/" + raw.lstrip("/")).lstrip("/")
    for _ in range(40):
        doc = stat_path(cfg, c, path, ref)
        if doc is None:
            raise _not_found(raw, ref)
        if doc["mode"] & GO_DIR:
            return path
        if not doc["mode"] & GO_SYMLINK:
            raise ApiError(400, f"extraction point is not a directory: {raw}")
        to = doc["linkTarget"]
        path = "/" + posixpath.normpath(posixpath.join(posixpath.dirname(path), to)).lstrip("/")
    raise ApiError(400, f"too many levels of symbolic links: {raw}")


def receive_archive(cfg: Config, c: Container, where: str, ref: str, read: Callable[[int], bytes],
                    owner: tuple[int, int] | None) -> None:
    """The uploaded tar stream (``read``), checked, into ``tar xf - -C where`` in the container."""
    r, w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)  # closed by the exec's thread, as r
    tar = _Tar(cfg, c.id, ["xf", "-", "-C", where], r, null)
    reader = _Reader(read)
    writer = _Writer(lambda b: _write_all(w, b))
    refused: Exception | None = None
    try:
        try:
            dst = tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                               bufsize=BUF)
            try:
                src = tarfile.open(fileobj=reader, mode="r|", bufsize=BUF)  # type: ignore[call-overload]
            except tarfile.ReadError:
                if reader.total:
                    raise
                src = None  # an empty body: nothing to extract, as Docker's
            if src is not None:
                copy_members(src, reader, dst, Members(inbound=True, owner=owner), src.next(),
                             keep=lambda m: not (m.name == "." and m.isdir()))  # DIR itself keeps its mode
            dst.close()
        except BrokenPipeError:
            pass  # the container's tar stopped reading: its status says why
        except (Refused, tarfile.TarError, OSError) as e:
            refused = e
    finally:
        writer.closed = True
        os.close(w)
    ended = tar.wait(None if refused is None else JOIN_TIMEOUT)
    with contextlib.suppress(Exception):  # the body's rest (padding, or all of a refused one's)
        left = DRAIN_MAX
        while left > 0 and (chunk := read(BUF)):
            left -= len(chunk)
    if refused is not None:
        if isinstance(refused, Refused):
            raise ApiError(400, f"refusing the archive: {refused}")
        if isinstance(refused, tarfile.TarError):
            raise ApiError(400, f"invalid tar archive: {refused}")
        raise VmrtError(f"cannot copy to {ref}:{where}: {refused}")
    if not ended:
        raise VmrtError(f"cannot copy to {ref}:{where}: tar in the container did not exit")
    if (failed := tar.failure(f"cannot copy to {ref}:{where}")) is not None:
        raise failed


# --- changes ---------------------------------------------------------------------------------
class _Stat(Protocol):
    """What the comparison reads of an entry: lstat's, or the guest's walk's (agent/walk.py)."""

    @property
    def st_mode(self) -> int: ...
    @property
    def st_size(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_rdev(self) -> int: ...


class UpperDir(Protocol):
    """A directory of a writable layer, as :func:`layer_changes` reads it: a process
    container's upper dir on the host (:class:`FdUpper`), or a VM container's as its guest
    listed it (:class:`TreeUpper`)."""

    def entries(self) -> list[tuple[str, _Stat]]:
        """Its entries, sorted by name."""
    def subdir(self, name: str) -> UpperDir | None:
        """Its entry ``name`` as a directory (None: it is none), closed by the caller."""
    def opaque(self) -> bool:
        """Whether it hides what the layers below have there (``trusted.overlay.opaque``)."""
    def close(self) -> None: ...


class FdUpper:
    """A directory of a writable layer on the host, by its fd (the caller's: not closed
    here; a :meth:`subdir`'s is its own, closed by :meth:`close`)."""

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        self.fd, self._owned = fd, owned

    def entries(self) -> list[tuple[str, _Stat]]:
        return list(_entries(self.fd))

    def subdir(self, name: str) -> FdUpper | None:
        sub = _open_dir(name, self.fd)
        return FdUpper(sub, owned=True) if sub is not None else None

    def opaque(self) -> bool:
        return _opaque(self.fd)

    def close(self) -> None:
        if self._owned:
            os.close(self.fd)
            self._owned = False


class TreeUpper:
    """A directory of a VM container's writable layer, as its guest's walk listed it."""

    def __init__(self, node: walk.Node) -> None:
        self.node = node

    def entries(self) -> list[tuple[str, _Stat]]:
        return sorted(((os.fsdecode(n), c) for n, c in (self.node.children or {}).items()),
                      key=lambda entry: entry[0])

    def subdir(self, name: str) -> TreeUpper | None:
        child = (self.node.children or {}).get(os.fsencode(name))
        return TreeUpper(child) if child is not None and child.children is not None else None

    def opaque(self) -> bool:
        return self.node.opaque

    def close(self) -> None:
        pass


def _is_whiteout(st: _Stat) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, "trusted.overlay.opaque") == b"y"
    except OSError:
        return False


def _open_dir(name: str, dir_fd: int) -> int | None:
    """``name`` in ``dir_fd`` opened as a directory, never through a symbolic link (None: it
    is not a directory). O_DIRECTORY fails before any device's open would run."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def _lower(name: str, lowers: list[int]) -> os.stat_result | None:
    """``name`` as the image's layers (top first) show it: the first layer that has it decides
    (a whiteout there: it does not exist)."""
    for fd in lowers:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            return None
        return None if _is_whiteout(st) else st
    return None


def _lower_dirs(name: str, lowers: list[int]) -> list[int]:
    """The directories ``name`` merges in the layers (top first), down to the first opaque one,
    or the first layer where it is something else."""
    out: list[int] = []
    for fd in lowers:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISDIR(st.st_mode):
            break
        sub = _open_dir(name, fd)
        if sub is None:
            break
        out.append(sub)
        if _opaque(sub):
            break
    return out


def _same_dir(a: _Stat, b: _Stat, mtime: bool = True) -> bool:
    """Docker's test for a directory that was only copied up: same size, mode and mtime."""
    if a.st_size != b.st_size or a.st_mode != b.st_mode:
        return False
    if not mtime or a.st_mtime_ns == b.st_mtime_ns:
        return True
    return (a.st_mtime_ns % 10**9 == 0 or b.st_mtime_ns % 10**9 == 0) and \
        a.st_mtime_ns // 10**9 == b.st_mtime_ns // 10**9


def _entries(fd: int) -> list[tuple[str, os.stat_result]]:
    with os.scandir(fd) as it:
        found = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    return sorted(found, key=lambda entry: entry[0])


def layer_changes(upper: UpperDir, lowers: list[int]) -> Iterator[tuple[str, int]]:
    """(path, kind) for each change of the writable layer ``upper`` over the layers ``lowers``
    (directory fds, top first), as Docker's overlay driver reports them: a directory that was
    only copied up is no change of its own, but the parent of an added or deleted entry is a
    modified one."""
    changed: set[str] = set()
    lazy: set[str] = set()  # the init paths' directories: modified once something else in them is

    def walk_dir(d: UpperDir, below: list[int], path: str, depth: int) -> Iterator[tuple[str, int]]:
        if depth > DEPTH_MAX:
            raise VmrtError(f"the container's writable layer is deeper than {DEPTH_MAX} directories at {path[:200]}")
        for name, st in d.entries():
            p = f"{path}/{name}" if path != "/" else f"/{name}"
            if p in INIT_PATHS:
                continue
            old = _lower(name, below)
            sub = d.subdir(name) if stat.S_ISDIR(st.st_mode) else None
            try:
                opaque = sub is not None and sub.opaque()
                if _is_whiteout(st):
                    kind: int | None = DELETED
                elif old is None:
                    kind = ADDED
                elif sub is not None and stat.S_ISDIR(old.st_mode) and not opaque and \
                        _same_dir(st, old, mtime=p not in INIT_DIRS):
                    kind = None
                    if p in INIT_DIRS:
                        lazy.add(p)
                else:
                    kind = MODIFIED
                if kind is not None and (kind != MODIFIED or path in lazy) and path != "/" and path not in changed:
                    changed.add(path)
                    yield path, MODIFIED
                if kind is not None:
                    if sub is not None:
                        changed.add(p)
                    yield p, kind
                if sub is not None:
                    subs = [] if opaque or old is None else _lower_dirs(name, below)
                    try:
                        if opaque:  # what the layers had there is gone
                            yield from _hidden(name, below, p, {n for n, _ in sub.entries()})
                        yield from walk_dir(sub, subs, p, depth + 1)
                    finally:
                        for fd in subs:
                            os.close(fd)
            finally:
                if sub is not None:
                    sub.close()

    yield from walk_dir(upper, lowers, "/", 0)


def _hidden(name: str, below: list[int], path: str, kept: set[str]) -> Iterator[tuple[str, int]]:
    """The entries an opaque directory ``name`` hides: what the layers had in it (but for the
    names in ``kept``, which the directory has anew)."""
    subs = _lower_dirs(name, below)
    try:
        seen = set(kept)
        for fd in subs:
            for child, st in _entries(fd):
                if child not in seen:
                    seen.add(child)
                    if not _is_whiteout(st):
                        yield f"{path}/{child}", DELETED
    finally:
        for d in subs:
            os.close(d)


def guest_upper(cfg: Config, c: Container) -> walk.Node | None:
    """A VM container's writable layer as its guest agent lists it (the host never reads the
    disk): by an exec while the container runs, else by a VM booted for the walk
    (:func:`vmrt.execs.walk_upper`); None when it has none yet (created, never started: no
    disk). What the guest writes is parsed as it comes, bounded (:class:`walk.WalkParser`);
    a failure is one VmrtError line."""
    running = c.status == Status.RUNNING and owner_alive(c)
    if not running and not (rw_dir(cfg, c.id) / vmdisk.IMAGE_NAME).is_file():
        return None
    what = f"cannot list the changes of {c.name}"
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    err = bytearray()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["status"] = walk_upper(cfg, c.id, (out_w, out_w, err_w))
        except Exception as e:
            result["error"] = e
        finally:  # our copies: EOF once the guest's walk (or the tool run) has ended
            os.close(out_w)
            os.close(err_w)

    reader = threading.Thread(target=_read_capped, args=(err_r, err, ERR_MAX), daemon=True)
    reader.start()
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    parser = walk.WalkParser()
    try:
        # closed on a refusal too: the walk's next write fails, which ends it (and its VM)
        with open(out_r, "rb", buffering=0) as f:
            while chunk := f.read(BUF):
                parser.feed(chunk)
    except VmrtError as e:
        raise VmrtError(f"{what}: {e}") from None
    finally:
        runner.join(JOIN_TIMEOUT)
        reader.join(1.0)
    if (failed := result.get("error")) is not None:
        raise VmrtError(f"{what}: {failed}") from failed
    if "status" not in result:
        raise VmrtError(f"{what}: the walk in its VM did not end")
    if result["status"] != 0:
        said = "; ".join(inert(ln).strip() for ln in bytes(err).splitlines() if ln.strip())[:500]
        raise VmrtError(f"{what}: the walk in its VM failed (exit {result['status']})" + (f": {said}" if said else ""))
    try:
        return parser.close()
    except VmrtError as e:
        raise VmrtError(f"{what}: {e}") from None


def changes(cfg: Config, c: Container) -> list[dict[str, Any]]:
    upper: UpperDir
    if c.isolation == "vm":
        tree = guest_upper(cfg, c)
        if tree is None:
            return []  # never started: nothing written yet
        upper = TreeUpper(tree)
    else:
        try:
            fd = os.open(rw_dir(cfg, c.id) / "upper", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []  # never started: nothing written yet
        upper = FdUpper(fd, owned=True)
    lowers: list[int] = []
    try:
        for layer in reversed(Store(cfg.root).get(c.image_id).layer_dirs()):
            lowers.append(os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        found: dict[str, int] = {}
        for path, kind in layer_changes(upper, lowers):
            found.setdefault(path, kind)  # a parent marked modified stays so
        # the names are the container's: bytes that are not UTF-8 are shown as \xNN
        return [{"Path": inert(os.fsencode(p)), "Kind": k} for p, k in found.items()]
    finally:
        upper.close()
        for fd in lowers:
            os.close(fd)


# --- endpoints -------------------------------------------------------------------------------
async def get_archive(req: Request) -> web.StreamResponse:
    raw, ref = req.query("path"), req.params["id"]
    _target(raw)
    c = await in_thread(lambda: _container(req.cfg, ref, running=False))
    if req.http.method == "HEAD":
        doc = await in_thread(lambda: stat_path(req.cfg, c, raw, ref))
        if doc is None:
            raise _not_found(raw, ref)
        return web.Response(status=200, headers={STAT_HEADER: _stat_header(doc)})
    loop = asyncio.get_running_loop()
    resp = web.StreamResponse(headers={"Content-Type": "application/x-tar"})

    async def start(doc: dict[str, Any]) -> None:
        resp.headers[STAT_HEADER] = _stat_header(doc)
        await resp.prepare(req.http)

    def start_sync(doc: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(start(doc), loop).result()

    def write_sync(data: bytes) -> None:
        asyncio.run_coroutine_threadsafe(resp.write(data), loop).result()

    try:
        await in_thread(lambda: send_archive(req.cfg, c, raw, ref, start_sync, write_sync))
    except Exception as e:
        if not resp.prepared:
            raise
        # the headers went out: the stream is cut short, so that the client sees an error rather
        # than an archive that ends cleanly without what is missing
        if not isinstance(e, ConnectionError):
            LOG.warning("GET archive %s:%s cut short: %s", ref, raw, e)
        if req.http.transport is not None:
            req.http.transport.abort()
        return resp
    await resp.write_eof()
    return resp


async def put_archive(req: Request) -> web.StreamResponse:
    raw, ref = req.query("path"), req.params["id"]
    _target(raw)
    copy_ids = req.flag("copyUIDGID")
    req.flag("noOverwriteDirNonDir")  # checked; tar in the container never replaces a directory with a file
    c = await in_thread(lambda: _container(req.cfg, ref, running=False))
    where = await in_thread(lambda: _extraction_dir(req.cfg, c, raw, ref))
    owner = None
    if copy_ids:
        user = await in_thread(lambda: resolve(req.cfg, c, ExecOptions(["tar"])))
        owner = (user.uid, user.gid)
    loop = asyncio.get_running_loop()

    def read(n: int) -> bytes:
        return asyncio.run_coroutine_threadsafe(req.http.content.read(n), loop).result()

    await in_thread(lambda: receive_archive(req.cfg, c, where, ref, read, owner))
    return web.Response(status=200)


async def top(req: Request) -> web.StreamResponse:
    from .. import stats  # on use: the first top request loads it
    c = await in_thread(lambda: _container(req.cfg, req.params["id"], running=True))
    args = req.query("ps_args").split()
    titles, rows = await in_thread(lambda: stats.ps_table(c, args, timeout=req.cfg.timeouts.probe_exec))
    return web.json_response({"Titles": titles, "Processes": rows})


async def container_changes(req: Request) -> web.StreamResponse:
    c = await asyncio.to_thread(_container, req.cfg, req.params["id"], running=False)
    return web.json_response(await asyncio.to_thread(changes, req.cfg, c))


def register(routes: Routes) -> None:
    cid = "/containers/(?P<id>[^/]+)"
    routes.add("GET", cid + "/archive", get_archive)
    routes.add("PUT", cid + "/archive", put_archive)
    routes.add("GET", cid + "/top", top)
    routes.add("GET", cid + "/changes", container_changes)
