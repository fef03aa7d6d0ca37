"""The walk of a VM container's writable layer, as its guest agent writes it (WALK_UPPER,
docs/agent-protocol.md "The walk stream"), for ``docker diff``.

A VM container's writable layer is an ext4 image only its guest parses (vm/disk.py), so the
host asks the agent to list the overlay's upper dir (guest-agent/walk.c) and reads the list
from the process's stdout: the bytes of a guest, hostile. :class:`WalkParser` is fed them as
they arrive and refuses, with one :class:`~vmrt.errors.ProtocolError` line, anything but a
well-formed stream: more than :data:`BYTES_MAX` bytes or :data:`ENTRIES_MAX` entries (refused
as soon as the bound is crossed, before the rest is read; a record's path length is checked
from its header, before its path is waited for), a path that is empty, absolute, longer than
:data:`PATH_MAX` bytes or :data:`DEPTH_MAX` components, with a NUL byte, an empty, ``.`` or
``..`` component or a name over :data:`NAME_MAX` bytes, an entry listed twice or before its
directory, an unknown type or flag, mode bits beyond 07777, a size past 2^63 - 1, a device
number on what is no device, a stream without its end record or with bytes after it. What it
builds is a tree of :class:`Node` (the root: the upper dir), which the comparison with the
image's layers reads as it reads a process container's upper dir (vmrt/api/archive.py).

Pure decoding, no I/O: Hypothesis and hostile streams drive it in tests/test_api_archive.py.

:class:`ContentParser` reads the walk with contents (VMRTWLK2: WALK_CONTENT, and WALK_AFTER's
walk of a ``vmrt build --isolation vm`` step's layer in the step's own VM): the same rules and
more (file contents bounded from their headers, link targets, hard links, owners, xattrs), pulled
from a pipe as the stream comes; tests/test_build_vm.py plays the attacker against it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Callable, Iterator

from ..errors import ProtocolError
from ..formatting import inert

MAGIC = b"VMRTWLK1"
# u16 path length (0: the end record), u8 type, u8 flags, u32 permission bits, u64 size,
# i64 mtime (ns), u32 rdev major, u32 rdev minor; then the path
RECORD = struct.Struct(">HBBIQqII")
OPAQUE = 1                  # flags: a directory with trusted.overlay.opaque = "y"
TYPES = {ord("d"): stat.S_IFDIR, ord("f"): stat.S_IFREG, ord("l"): stat.S_IFLNK, ord("c"): stat.S_IFCHR,
         ord("b"): stat.S_IFBLK, ord("p"): stat.S_IFIFO, ord("s"): stat.S_IFSOCK}
PATH_MAX = 4096             # bytes of a path (the agent's bound)
NAME_MAX = 255              # bytes of one component
DEPTH_MAX = 512             # components of a path (the agent's bound)
ENTRIES_MAX = 500_000       # entries of one walk (the agent's bound)
BYTES_MAX = 64 << 20        # bytes of one walk stream
SIZE_MAX = (1 << 63) - 1
WALK_ARG = "vmrt-walk-upper"             # the process's argv: never exec'ed (ARG is required)
WALK_ANNOTATION = "org.vmrt.walk-upper"  # "true": a tool run's RUN carries WALK_UPPER (vmrt/offline.py)
WALK_TIMEOUT = 600.0                     # seconds a running container's walk (an exec) may take
WHAT = "the guest's walk of the writable layer"


class Node:
    """One entry of the writable layer, with lstat's fields as the comparison reads them;
    a directory has ``children`` (name -> Node), anything else None."""

    __slots__ = ("st_mode", "st_size", "st_mtime_ns", "st_rdev", "opaque", "children")

    def __init__(self, mode: int, size: int, mtime_ns: int, rdev: int, opaque: bool) -> None:
        self.st_mode, self.st_size, self.st_mtime_ns, self.st_rdev = mode, size, mtime_ns, rdev
        self.opaque = opaque
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None


class WalkParser:
    """Incremental, bounded decoder of one walk stream: :meth:`feed` it bytes as they come,
    then :meth:`close` gives the tree's root."""

    def __init__(self) -> None:
        self.root = Node(stat.S_IFDIR | 0o755, 0, 0, 0, False)
        self.count = 0
        self.total = 0
        self._buf = bytearray()
        self._magic = False
        self._ended = False
        self._dirs: dict[bytes, Node] = {b"": self.root}  # directories by path, for their entries
        self._at = 0  # the entry being decoded (1-based; 0: none), for messages

    def _bad(self, why: str) -> ProtocolError:
        return ProtocolError(f"{WHAT}: " + (f"entry {self._at}: " if self._at else "") + why)

    def feed(self, data: bytes) -> None:
        """Take the next bytes; ProtocolError (one line) at the first thing out of bounds or
        malformed, which ends the stream."""
        self.total += len(data)
        if self.total > BYTES_MAX:
            raise self._bad(f"more than {BYTES_MAX >> 20} MiB")
        if self._ended and data:
            raise self._bad("bytes after the end record")
        self._buf += data
        buf, off = self._buf, 0
        if not self._magic:
            if buf[:len(MAGIC)] != MAGIC[:len(buf)]:
                raise self._bad("not a walk stream (no magic)")
            if len(buf) < len(MAGIC):
                return
            self._magic, off = True, len(MAGIC)
        while len(buf) - off >= RECORD.size:
            plen, kind, flags, mode, size, mtime, major, minor = RECORD.unpack_from(buf, off)
            if plen == 0:
                if (kind, flags, mode, mtime, major, minor) != (0, 0, 0, 0, 0, 0) or size != self.count:
                    raise self._bad(f"a bad end record (it counts {size} entries, {self.count} came)")
                if len(buf) - off > RECORD.size:
                    raise self._bad("bytes after the end record")
                self._ended, off = True, len(buf)
                break
            self._at = self.count + 1
            if self._at > ENTRIES_MAX:
                raise self._bad(f"more than {ENTRIES_MAX} entries")
            if plen > PATH_MAX:
                raise self._bad(f"a path of {plen} bytes (at most {PATH_MAX})")
            if len(buf) - off < RECORD.size + plen:
                break
            path = bytes(buf[off + RECORD.size:off + RECORD.size + plen])
            off += RECORD.size + plen
            self._entry(path, kind, flags, mode, size, mtime, major, minor)
            self.count, self._at = self._at, 0
        del buf[:off]

    def _entry(self, path: bytes, kind: int, flags: int, mode: int, size: int, mtime: int, major: int,
               minor: int) -> None:
        if b"\0" in path:
            raise self._bad("a path with a NUL byte")
        if path.startswith(b"/"):
            raise self._bad("an absolute path")
        parts = path.split(b"/")
        if b".." in parts or b"." in parts or b"" in parts:
            raise self._bad(f"a path with an empty, '.' or '..' component: {_show(path)}")
        if len(parts) > DEPTH_MAX:
            raise self._bad(f"a path deeper than {DEPTH_MAX} components")
        if any(len(p) > NAME_MAX for p in parts):
            raise self._bad(f"a name longer than {NAME_MAX} bytes")
        if kind not in TYPES:
            raise self._bad(f"an unknown type 0x{kind:02x} for {_show(path)}")
        if flags & ~OPAQUE or (flags & OPAQUE and TYPES[kind] != stat.S_IFDIR):
            raise self._bad(f"flags 0x{flags:02x} on {_show(path)}")
        if mode & ~0o7777:
            raise self._bad(f"mode bits 0o{mode:o} for {_show(path)}")
        if size > SIZE_MAX:
            raise self._bad(f"a size of {size} bytes for {_show(path)}")
        device = TYPES[kind] in (stat.S_IFCHR, stat.S_IFBLK)
        if (major or minor) and not device:
            raise self._bad(f"a device number on {_show(path)}, no device")
        parent_path, _, name = path.rpartition(b"/")
        parent = self._dirs.get(parent_path)
        if parent is None or parent.children is None:
            raise self._bad(f"{_show(path)} comes before its directory")
        if name in parent.children:
            raise self._bad(f"{_show(path)} listed twice")
        node = Node(TYPES[kind] | mode, size, mtime, os.makedev(major, minor) if device else 0, bool(flags & OPAQUE))
        parent.children[name] = node
        if node.children is not None:
            self._dirs[path] = node

    def close(self) -> Node:
        """The root of the tree; a stream that ended early is refused."""
        if not self._magic:
            raise self._bad("no walk stream (empty or cut short)")
        if not self._ended:
            raise self._bad("the stream ended inside a record (cut short)" if self._buf else
                            "the stream ended before its end record (cut short)")
        self._dirs.clear()
        return self.root


def _show(path: bytes) -> str:
    """A guest's path for a message: its first 100 bytes, terminal controls escaped."""
    return inert(path[:100]) + ("..." if len(path) > 100 else "")


# --- VMRTWLK2: the walk with contents (WALK_CONTENT, a build's RUN step) -----------------------
MAGIC2 = b"VMRTWLK2"
# RECORD's fields, then u32 uid, u32 gid, u32 the xattr block's length; then the path, the xattr
# block, and ``size`` bytes: a regular file's content, a link's target, a hard link's first path
RECORD2 = struct.Struct(">HBBIQqIIIII")
REDIRECT = 2                # flags: a directory with trusted.overlay.redirect (a renamed lower dir)
HARDLINK = ord("h")         # the type of a second name of a regular file listed before
XATTRS_MAX = 256 << 10      # bytes of one entry's xattr block (the agent's bound)
XATTR_VALUE_MAX = 65536     # bytes of one xattr's value (the kernel's XATTR_SIZE_MAX)
LINK_MAX = 4096             # bytes of a link's target
ID_MAX = 0xFFFFFFFE         # a uid or gid (all ones is "no id", never an owner)
META_BYTES = 64 << 20       # what a content walk may send beyond its files' bytes, and its own
# budget of paths, xattr blocks and link targets (each entry's becomes a tar header on the host)
CHUNK = 1 << 16


def xattr_kept(name: bytes | str) -> bool:
    """The xattrs a build layer carries: ``user.*`` and file capabilities (what the safe unpacker
    applies, vmrt/images/unpack.py); never ``trusted.*`` (overlayfs's own) or ``security.selinux``."""
    n = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    return n.startswith(b"user.") or n == b"security.capability"


class ContentEntry:
    """One entry of a content walk. ``data`` (a regular file's): a reader of exactly ``size``
    bytes, to be read before the next entry is asked for (what is left is skipped)."""

    __slots__ = ("path", "mode", "uid", "gid", "mtime_ns", "rdev", "opaque", "link", "hardlink", "xattrs",
                 "size", "data")

    def __init__(self, path: str, mode: int, uid: int, gid: int, mtime_ns: int, rdev: int, opaque: bool,
                 link: str, hardlink: bool, xattrs: dict[str, bytes], size: int, data: _Data | None) -> None:
        self.path, self.mode, self.uid, self.gid, self.mtime_ns = path, mode, uid, gid, mtime_ns
        self.rdev, self.opaque, self.link, self.hardlink, self.xattrs = rdev, opaque, link, hardlink, xattrs
        self.size, self.data = size, data


class _Data:
    """A regular file's content in the stream: at most its declared size, never past it."""

    def __init__(self, parser: ContentParser, size: int) -> None:
        self.parser, self.left = parser, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        if n <= 0:
            return b""
        b = self.parser._exact(n)
        self.left -= len(b)
        return b

    def drain(self) -> None:
        while self.left:
            self.read(CHUNK)


class ContentParser:
    """Pull decoder of one VMRTWLK2 stream, read with ``read(n)`` (up to n bytes, b"" at its end),
    as hostile as :class:`WalkParser`'s (the same path, count and type rules) and more: at most
    ``max_bytes`` in all (a file's size is checked against what is left from its header, before
    its bytes are read), a link's target of 1-4096 bytes without NUL, a hard link to a regular
    file listed before, xattrs only ``user.*`` and ``security.capability``, each once, on files
    and directories, the block exactly filled; owners at most 2^32 - 2; nothing after the end.
    Metadata (paths, xattr blocks, link targets) has a budget of its own, ``meta_max`` bytes;
    the paths listed are remembered as 16-byte digests only. ``cut_short``: the stream ended
    early (no bad content: the run's own error, if it has one, is the one to tell)."""

    def __init__(self, read: Callable[[int], bytes], max_bytes: int, meta_max: int = META_BYTES) -> None:
        self._read, self.max_bytes, self.meta_max = read, max_bytes, meta_max
        self.total = 0
        self.meta = 0
        self.count = 0
        self.cut_short = False
        self._at = 0
        self._seen: dict[bytes, int] = {_key(b""): _DIR}  # path digest -> _DIR, _FILE or _OTHER

    def _bad(self, why: str) -> ProtocolError:
        return ProtocolError(f"{WHAT}: " + (f"entry {self._at}: " if self._at else "") + why)

    def _exact(self, n: int) -> bytes:
        if self.total + n > self.max_bytes:
            raise self._bad(f"more than {self.max_bytes} bytes")
        parts, got = [], 0
        while got < n:
            b = self._read(min(n - got, 1 << 20))
            if not b:
                self.cut_short = True
                raise self._bad("the stream ended inside a record (cut short)" if self.total + got
                                else "no walk stream (empty or cut short)")
            if len(b) > n - got:
                raise self._bad("the reader gave more than asked")
            parts.append(b)
            got += len(b)
        self.total += n
        return b"".join(parts)

    def entries(self) -> Iterator[ContentEntry]:
        """Each entry in the stream's order; ProtocolError (one line) at the first fault."""
        if self._exact(len(MAGIC2)) != MAGIC2:
            raise self._bad("not a content walk stream (no magic)")
        while True:
            head = self._exact(RECORD2.size)
            plen, kind, flags, mode, size, mtime, major, minor, uid, gid, xlen = RECORD2.unpack(head)
            if plen == 0:
                if (kind, flags, mode, mtime, major, minor, uid, gid, xlen) != (0,) * 9 or size != self.count:
                    raise self._bad(f"a bad end record (it counts {size} entries, {self.count} came)")
                if self._read(1):
                    raise self._bad("bytes after the end record")
                self._seen.clear()
                return
            self._at = self.count + 1
            if self._at > ENTRIES_MAX:
                raise self._bad(f"more than {ENTRIES_MAX} entries")
            if plen > PATH_MAX:
                raise self._bad(f"a path of {plen} bytes (at most {PATH_MAX})")
            if xlen > XATTRS_MAX:
                raise self._bad(f"an xattr block of {xlen} bytes (at most {XATTRS_MAX})")
            self.meta += plen + xlen + (min(size, LINK_MAX) if kind in (HARDLINK, ord("l")) else 0)
            if self.meta > self.meta_max:
                raise self._bad(f"more than {self.meta_max} bytes of paths, xattrs and link targets")
            raw = self._exact(plen)
            entry = self._entry(raw, kind, flags, mode, size, mtime, major, minor, uid, gid, xlen)
            yield entry
            if entry.data is not None:
                entry.data.drain()
            self.count, self._at = self._at, 0

    def _entry(self, raw: bytes, kind: int, flags: int, mode: int, size: int, mtime: int, major: int,
               minor: int, uid: int, gid: int, xlen: int) -> ContentEntry:
        _check_path(raw, self._bad)
        show = _show(raw)
        if kind != HARDLINK and kind not in TYPES:
            raise self._bad(f"an unknown type 0x{kind:02x} for {show}")
        ftype = stat.S_IFREG if kind == HARDLINK else TYPES[kind]
        if flags & ~(OPAQUE | REDIRECT) or (flags and ftype != stat.S_IFDIR):
            raise self._bad(f"flags 0x{flags:02x} on {show}")
        if flags & REDIRECT:
            raise self._bad(f"the build step renamed the directory /{show} of a lower layer: "
                            "overlayfs redirect_dir is not supported in builds")
        if mode & ~0o7777:
            raise self._bad(f"mode bits 0o{mode:o} for {show}")
        if uid > ID_MAX or gid > ID_MAX:
            raise self._bad(f"an owner {uid}:{gid} for {show}")
        device = ftype in (stat.S_IFCHR, stat.S_IFBLK)
        if (major or minor) and not device:
            raise self._bad(f"a device number on {show}, no device")
        if xlen and (ftype not in (stat.S_IFREG, stat.S_IFDIR) or kind == HARDLINK):
            raise self._bad(f"xattrs on {show}, neither a file nor a directory")
        if kind == HARDLINK or ftype == stat.S_IFLNK:
            if not 0 < size <= LINK_MAX:
                raise self._bad(f"a link target of {size} bytes for {show}")
        elif ftype != stat.S_IFREG and size:
            raise self._bad(f"a size of {size} bytes for {show}, no regular file")
        elif size > self.max_bytes - self.total:
            raise self._bad(f"a file of {size} bytes for {show}: more than the stream may hold")
        parent, _, _ = raw.rpartition(b"/")
        if self._seen.get(_key(parent)) != _DIR:
            raise self._bad(f"{show} comes before its directory")
        key = _key(raw)
        if key in self._seen:
            raise self._bad(f"{show} listed twice")
        xattrs = self._xattrs(self._exact(xlen), show) if xlen else {}
        link = ""
        if kind == HARDLINK or ftype == stat.S_IFLNK:
            target = self._exact(size)
            if b"\0" in target:
                raise self._bad(f"a link target with a NUL byte for {show}")
            if kind == HARDLINK:
                if self._seen.get(_key(target)) != _FILE or target == raw:
                    raise self._bad(f"a hard link {show} to what is no regular file listed before")
                ftype = stat.S_IFREG
            link = os.fsdecode(target)
        self._seen[key] = (_DIR if ftype == stat.S_IFDIR else _FILE if ftype == stat.S_IFREG and kind != HARDLINK
                           else _OTHER)
        data = _Data(self, size) if ftype == stat.S_IFREG and kind != HARDLINK else None
        return ContentEntry(os.fsdecode(raw), ftype | mode, uid, gid, mtime, os.makedev(major, minor) if device else 0,
                            bool(flags & OPAQUE), link, kind == HARDLINK, xattrs, size if data is not None else 0, data)

    def _xattrs(self, block: bytes, show: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        off = 0
        while off < len(block):
            if len(block) - off < 5:
                raise self._bad(f"a cut xattr record on {show}")
            nlen, vlen = block[off], struct.unpack_from(">I", block, off + 1)[0]
            off += 5
            if nlen == 0 or vlen > XATTR_VALUE_MAX or len(block) - off < nlen + vlen:
                raise self._bad(f"a bad xattr record on {show}")
            name = bytes(block[off:off + nlen])
            if b"\0" in name or not xattr_kept(name):
                raise self._bad(f"the xattr {_show(name)} on {show}: only user.* and security.capability")
            key = name.decode("utf-8", "surrogateescape")
            if key in out:
                raise self._bad(f"the xattr {_show(name)} twice on {show}")
            out[key] = bytes(block[off + nlen:off + nlen + vlen])
            off += nlen + vlen
        return out


_OTHER, _DIR, _FILE = 0, 1, 2


def _key(path: bytes) -> bytes:
    """What the parser keeps of a path it has seen: 16 bytes, whatever the path's length."""
    return hashlib.blake2b(path, digest_size=16).digest()


def _check_path(path: bytes, bad: Callable[[str], ProtocolError]) -> None:
    if b"\0" in path:
        raise bad("a path with a NUL byte")
    if path.startswith(b"/"):
        raise bad("an absolute path")
    parts = path.split(b"/")
    if b".." in parts or b"." in parts or b"" in parts:
        raise bad(f"a path with an empty, '.' or '..' component: {_show(path)}")
    if len(parts) > DEPTH_MAX:
        raise bad(f"a path deeper than {DEPTH_MAX} components")
    if any(len(p) > NAME_MAX for p in parts):
        raise bad(f"a name longer than {NAME_MAX} bytes")
