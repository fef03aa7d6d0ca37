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
"""

from __future__ import annotations

import os
import stat
import struct

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
