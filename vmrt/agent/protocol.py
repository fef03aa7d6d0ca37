"""Frames of the vmrt agent protocol, version 3 (docs/agent-protocol.md).

Pure encoding and decoding, no I/O: :class:`FrameDecoder` is fed bytes as they
arrive and yields whole frames, raising :class:`ProtocolError` on anything
malformed. Hypothesis drives it in tests/test_protocol.py.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import struct
from collections.abc import Iterator

from ..errors import ProtocolError

MAGIC = 0x7652
VERSION = 3
HEADER = struct.Struct(">HBBI")
MAX_PAYLOAD = 65536


class Msg(enum.IntEnum):
    HELLO = 0x01
    STARTED = 0x02
    STDOUT = 0x03
    STDERR = 0x04
    EXIT = 0x05
    ERROR = 0x06
    PONG = 0x07        # v3: answers PING (echoes its cookie); cookie 0 unprompted
    RUN = 0x41
    STDIN = 0x42
    STDIN_CLOSE = 0x43
    SIGNAL = 0x44
    RESIZE = 0x45
    SHUTDOWN = 0x46
    EXEC = 0x47
    PING = 0x48        # v3: u64 cookie, liveness check while the container runs


FROM_AGENT = frozenset({Msg.HELLO, Msg.STARTED, Msg.STDOUT, Msg.STDERR, Msg.EXIT, Msg.ERROR,
                        Msg.PONG})
FROM_HOST = frozenset({Msg.RUN, Msg.STDIN, Msg.STDIN_CLOSE, Msg.SIGNAL, Msg.RESIZE, Msg.SHUTDOWN,
                       Msg.EXEC, Msg.PING})


class Tag(enum.IntEnum):
    ARG = 1
    ENV = 2
    CWD = 3
    HOSTNAME = 4
    UID = 5
    GID = 6
    GROUPS = 7
    TTY = 8
    STDIN = 9
    TIME = 10
    ROOTFS = 11
    READONLY = 12
    CAPS = 13
    NO_NEW_PRIVS = 14
    MOUNT = 15
    MOUNT_SOURCE = 16
    MOUNT_FLAGS = 17
    MOUNT_DATA = 18
    MEMORY_MAX = 19
    PIDS_MAX = 20
    DETACH = 21
    SHARE_9P = 22
    SEED = 23
    NET = 24
    UPPER_DISK = 25     # u64 capacity, then a name under /dev: the writable layer's block device
    NET6 = 26           # eth0's IPv6 address, prefix and gateway (an --ipv6 network)
    DISK_SCRATCH = 27   # empty, with UPPER_DISK: the host discards the disk at exit (the agent skips its sync)
    SHARE_FRESH = 28    # empty, with SHARE_9P: files there change while it runs (9p cache=mmap, not loose)
    # 29 left for other records
    SECCOMP = 30        # struct sock_filter[]: the container's seccomp filter, installed before execve
    MASKED = 31         # an absolute path hidden from the container (OCI maskedPaths)
    RO_PATH = 32        # an absolute path made read-only (OCI readonlyPaths)
    WALK_UPPER = 33     # empty: the process walks the writable layer (vmrt/agent/walk.py) instead of exec'ing ARG
    RLIMIT = 34         # u32 resource, u64 soft, u64 hard: one OCI process.rlimits entry (RUN)
    WALK_CONTENT = 35   # empty, with WALK_UPPER: the walk carries contents too (VMRTWLK2: a build step's layer)
    WALK_AFTER = 36     # empty, RUN: after the process exits 0: its EXIT, the VMRTWLK2 walk as STDOUT, a second EXIT


class MountFlag(enum.IntFlag):
    RO = 1
    NOSUID = 2
    NODEV = 4
    NOEXEC = 8
    TMPFS = 256


@dataclasses.dataclass
class MountSpec:
    """A volume in the guest: a bind of share/<source>, or a tmpfs (source None)."""

    target: str
    source: str | None = None
    flags: int = 0
    data: str = ""


@dataclasses.dataclass
class NetSpec:
    """The guest's eth0 (NET): IPv4 address/prefix, default gateway (None: no default route), MAC, MTU."""

    address: str                     # dotted quad, e.g. "10.0.0.2"
    prefix: int                      # 1..32
    gateway: str | None              # dotted quad; None: no default route
    mac: str                         # "aa:bb:cc:dd:ee:ff", unicast
    mtu: int = 0                     # 0: the kernel's default; else 68..65535


# NET: u32 address, u8 prefix, u32 gateway (0: none), 6 bytes MAC, u16 MTU (0: default), u8 flags (0)
NET_VALUE = struct.Struct(">4sB4s6sHB")
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


def _check_net(prefix: int, mac: bytes, mtu: int, flags: int) -> None:
    """The agent's checks of a NET record (proto.c), with its messages."""
    if not 1 <= prefix <= 32:
        raise ProtocolError("NET prefix must be 1..32")
    if mac[0] & 1:
        raise ProtocolError("NET MAC must not be multicast")
    if mtu and not 68 <= mtu <= 65535:
        raise ProtocolError("NET MTU must be 0 or 68..65535")
    if flags:
        raise ProtocolError("NET flags must be 0")


def _ipv4(s: str, what: str) -> bytes:
    try:
        return ipaddress.IPv4Address(s).packed
    except ValueError as e:
        raise ProtocolError(f"NET {what} {s!r} is not an IPv4 address") from e


def encode_net(net: NetSpec) -> bytes:
    """The 18-byte NET value."""
    if not isinstance(net.mac, str) or not _MAC.fullmatch(net.mac):
        raise ProtocolError(f"NET MAC {net.mac!r} is not of the form aa:bb:cc:dd:ee:ff")
    mac = bytes.fromhex(net.mac.replace(":", ""))
    _check_net(net.prefix, mac, net.mtu, 0)
    gw = _ipv4(net.gateway, "gateway") if net.gateway is not None else bytes(4)
    return NET_VALUE.pack(_ipv4(net.address, "address"), net.prefix, gw, mac, net.mtu, 0)


def decode_net(v: bytes) -> NetSpec:
    """Inverse of encode_net; the gateway 0.0.0.0 decodes as None."""
    if len(v) != NET_VALUE.size:
        raise ProtocolError(f"NET must be {NET_VALUE.size} bytes")
    addr, prefix, gw, mac, mtu, flags = NET_VALUE.unpack(v)
    _check_net(prefix, mac, mtu, flags)
    return NetSpec(str(ipaddress.IPv4Address(addr)), prefix,
                   str(ipaddress.IPv4Address(gw)) if gw != bytes(4) else None, mac.hex(":"), mtu)


@dataclasses.dataclass
class Net6Spec:
    """The guest's eth0 on an --ipv6 network (NET6, with NET): IPv6 address/prefix, default gateway
    (None: no default route)."""

    address: str                     # e.g. "fd00:1::2": unicast, not ::
    prefix: int                      # 1..128
    gateway: str | None              # unicast; None: no default route


# NET6: 16 bytes address, u8 prefix, 16 bytes gateway (all zero: none)
NET6_VALUE = struct.Struct(">16sB16s")


def _ipv6(s: str, what: str) -> bytes:
    try:
        return ipaddress.IPv6Address(s).packed
    except ValueError as e:
        raise ProtocolError(f"NET6 {what} {s!r} is not an IPv6 address") from e


def _check_net6(addr: bytes, prefix: int, gw: bytes) -> None:
    """The agent's checks of a NET6 record (proto.c), with its messages."""
    if addr == bytes(16) or addr[0] == 0xFF or addr == bytes(15) + b"\x01":
        raise ProtocolError("NET6 address must be unicast")
    if not 1 <= prefix <= 128:
        raise ProtocolError("NET6 prefix must be 1..128")
    if gw[0] == 0xFF or gw == bytes(15) + b"\x01":
        raise ProtocolError("NET6 gateway must be unicast")


def encode_net6(net: Net6Spec) -> bytes:
    """The 33-byte NET6 value."""
    addr = _ipv6(net.address, "address")
    gw = _ipv6(net.gateway, "gateway") if net.gateway is not None else bytes(16)
    if net.gateway is not None and gw == bytes(16):
        raise ProtocolError("NET6 gateway must be unicast")
    _check_net6(addr, net.prefix, gw)
    return NET6_VALUE.pack(addr, net.prefix, gw)


def decode_net6(v: bytes) -> Net6Spec:
    """Inverse of encode_net6; the gateway :: decodes as None."""
    if len(v) != NET6_VALUE.size:
        raise ProtocolError(f"NET6 must be {NET6_VALUE.size} bytes")
    addr, prefix, gw = NET6_VALUE.unpack(v)
    _check_net6(addr, prefix, gw)
    return Net6Spec(str(ipaddress.IPv6Address(addr)), prefix,
                    str(ipaddress.IPv6Address(gw)) if gw != bytes(16) else None)


@dataclasses.dataclass
class DiskSpec:
    """The writable layer's block device in the guest (UPPER_DISK): its name under /dev and
    the capacity the agent waits for before it mounts it (a swapped-in disk's new size
    reaches the guest by an interrupt)."""

    device: str                      # e.g. "vda": 1..31 of [a-z0-9]
    size: int                        # bytes, whole 512-byte sectors


_DISK_NAME = re.compile(r"[a-z0-9]{1,31}")


def _check_disk(device: str, size: int) -> None:
    """The agent's checks of an UPPER_DISK record (proto.c), with its messages."""
    if not 0 < size < 1 << 64 or size % 512:
        raise ProtocolError("UPPER_DISK capacity must be whole 512-byte sectors")
    if not _DISK_NAME.fullmatch(device):
        raise ProtocolError("UPPER_DISK device name must be [a-z0-9]")


def encode_disk(disk: DiskSpec) -> bytes:
    """UPPER_DISK's value: u64 capacity, then the device name (no NUL)."""
    _check_disk(disk.device, disk.size)
    return struct.pack(">Q", disk.size) + disk.device.encode()


def decode_disk(v: bytes) -> DiskSpec:
    if not 9 <= len(v) <= 8 + 31:
        raise ProtocolError("UPPER_DISK must be 9 to 39 bytes")
    (size,) = struct.unpack_from(">Q", v)
    name = v[8:].decode("ascii", errors="replace")
    _check_disk(name, size)
    return DiskSpec(name, size)


@dataclasses.dataclass(frozen=True)
class Frame:
    type: Msg
    payload: bytes = b""


def encode(msg: Msg, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, VERSION, int(msg), len(payload)) + payload


class FrameDecoder:
    """Incremental decoder for one direction of the stream."""

    def __init__(self, allowed: frozenset[Msg] = FROM_AGENT) -> None:
        self._buf = bytearray()
        self._allowed = allowed

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            magic, version, mtype, length = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise ProtocolError(f"bad frame magic 0x{magic:04x}")
            if version != VERSION:
                raise ProtocolError(f"unsupported frame version {version}")
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            try:
                msg = Msg(mtype)
            except ValueError:
                raise ProtocolError(f"unknown frame type 0x{mtype:02x}") from None
            if msg not in self._allowed:
                raise ProtocolError(f"frame type {msg.name} not allowed in this direction")
            end = HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[HEADER.size:end])
            del self._buf[:end]
            yield Frame(msg, payload)

    def close(self) -> None:
        """The stream ended; leftover bytes mean a truncated frame."""
        if self._buf:
            raise ProtocolError(f"stream ended inside a frame ({len(self._buf)} bytes pending)")

    @property
    def pending(self) -> int:
        return len(self._buf)


# --- payloads -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Hello:
    version: int
    flags: int
    boot_ns: int
    ready_ns: int
    agent: str

    def record(self) -> dict[str, int | str]:
        """As JSON keeps it: a snapshot's meta.json, the pool daemon's claim reply."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, r: object) -> Hello:
        """A HELLO kept as JSON (by :meth:`record`), checked field by field."""
        if not isinstance(r, dict):
            raise ProtocolError("HELLO record is not an object")
        try:
            ints = [r[k] for k in ("version", "flags", "boot_ns", "ready_ns")]
            agent = r["agent"]
        except KeyError as e:
            raise ProtocolError(f"HELLO record lacks {e.args[0]}") from None
        if not all(type(i) is int and i >= 0 for i in ints) or not isinstance(agent, str):
            raise ProtocolError("HELLO record has a field of the wrong type")
        return cls(ints[0], ints[1], ints[2], ints[3], agent)


@dataclasses.dataclass(frozen=True)
class Exit:
    status: int
    signal: int
    flags: int

    @property
    def oom(self) -> bool:
        return bool(self.flags & 1)


@dataclasses.dataclass(frozen=True)
class Error:
    code: int
    message: str


def _text(b: bytes, what: str) -> str:
    if b"\0" in b:
        raise ProtocolError(f"{what}: string contains NUL")
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{what}: invalid UTF-8") from e


def decode_hello(p: bytes) -> Hello:
    if len(p) < 20:
        raise ProtocolError("HELLO payload too short")
    version, flags, boot, ready = struct.unpack_from(">HHQQ", p)
    return Hello(version, flags, boot, ready, _text(p[20:], "HELLO agent version"))


def decode_started(p: bytes) -> int:
    if len(p) != 4:
        raise ProtocolError("STARTED payload must be 4 bytes")
    return int(struct.unpack(">I", p)[0])


def decode_exit(p: bytes) -> Exit:
    if len(p) != 12:
        raise ProtocolError("EXIT payload must be 12 bytes")
    status, sig, flags = struct.unpack(">III", p)
    if status > 255:
        raise ProtocolError(f"EXIT status {status} out of range")
    return Exit(status, sig, flags)


def decode_error(p: bytes) -> Error:
    if len(p) < 4:
        raise ProtocolError("ERROR payload too short")
    (code,) = struct.unpack_from(">I", p)
    return Error(code, _text(p[4:], "ERROR message").strip().replace("\n", " "))


def encode_ping(cookie: int) -> bytes:
    return encode(Msg.PING, struct.pack(">Q", cookie & 0xFFFF_FFFF_FFFF_FFFF))


def encode_pong(cookie: int) -> bytes:
    return encode(Msg.PONG, struct.pack(">Q", cookie & 0xFFFF_FFFF_FFFF_FFFF))


def decode_cookie(p: bytes) -> int:
    """The u64 cookie of a PING or PONG."""
    if len(p) != 8:
        raise ProtocolError("PING/PONG payload must be 8 bytes")
    return int(struct.unpack(">Q", p)[0])


def encode_signal(signo: int) -> bytes:
    return encode(Msg.SIGNAL, struct.pack(">I", signo))


def encode_resize(rows: int, cols: int) -> bytes:
    return encode(Msg.RESIZE, struct.pack(">HH", rows & 0xFFFF, cols & 0xFFFF))


@dataclasses.dataclass
class RunSpec:
    """What the agent needs to start the container process."""

    args: list[str]
    env: list[str] = dataclasses.field(default_factory=list)
    cwd: str = "/"
    hostname: str = "vmrt"
    uid: int = 0
    gid: int = 0
    groups: list[int] = dataclasses.field(default_factory=list)
    tty: tuple[int, int] | None = None   # rows, cols
    stdin: bool = False
    time_ns: int | None = None
    rootfs_tag: str = "rootfs"
    readonly: bool = False
    caps: int | None = None          # capability bitmask to keep; None: leave as is
    no_new_privs: bool = False
    mounts: list[MountSpec] = dataclasses.field(default_factory=list)
    memory_max: int = 0              # bytes; 0: no limit
    pids_max: int = 0                # 0: no limit
    share_9p: bool = False           # the ROOTFS tag is a virtio-9p share (a VM restored from a snapshot)
    seed: bytes = b""                # host randomness the agent reseeds the guest RNG with (16..256 bytes)
    net: NetSpec | None = None       # eth0's configuration; None: eth0 stays down (lo is always up)
    net6: Net6Spec | None = None     # eth0's IPv6 (needs net); None: IPv6 off on eth0 (lo keeps ::1)
    upper_disk: DiskSpec | None = None  # the writable layer's disk; None: a tmpfs in guest RAM
    disk_scratch: bool = False       # the disk is discarded at exit (run --rm): no sync before EXIT
    share_fresh: bool = False        # with share_9p: files there change (user-network names): uncached reads
    seccomp: bytes = b""             # classic BPF program (8-byte instructions); b"": no filter
    masked: list[str] = dataclasses.field(default_factory=list)     # OCI maskedPaths
    ro_paths: list[str] = dataclasses.field(default_factory=list)   # OCI readonlyPaths
    walk: bool = False               # WALK_UPPER: list the writable layer instead of exec'ing args (docker diff)
    walk_content: bool = False       # WALK_CONTENT: with walk, the contents too (a build step's layer)
    walk_after: bool = False         # WALK_AFTER: the layer's content walk after the process exits 0 (a build step)
    rlimits: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (resource, soft, hard)


def _rec(tag: Tag, value: bytes) -> bytes:
    return struct.pack(">BI", int(tag), len(value)) + value


def _str(tag: Tag, s: str) -> bytes:
    b = s.encode("utf-8")
    if b"\0" in b:
        raise ProtocolError(f"{tag.name.lower()} contains a NUL byte")
    return _rec(tag, b)


def _process_records(spec: RunSpec | ExecSpec) -> bytearray:
    """The records RUN and EXEC share: argv, environment, directory, user, terminal, stdin, walk."""
    if spec.walk and (spec.tty is not None or getattr(spec, "detach", False)):
        raise ProtocolError("WALK_UPPER with TTY or DETACH")
    out = bytearray()
    for a in spec.args:
        out += _str(Tag.ARG, a)
    for e in spec.env:
        out += _str(Tag.ENV, e)
    out += _str(Tag.CWD, spec.cwd)
    out += _rec(Tag.UID, struct.pack(">I", spec.uid))
    out += _rec(Tag.GID, struct.pack(">I", spec.gid))
    if spec.groups:
        out += _rec(Tag.GROUPS, b"".join(struct.pack(">I", g) for g in spec.groups))
    if spec.tty is not None:
        out += _rec(Tag.TTY, struct.pack(">HH", *spec.tty))
    if spec.stdin:
        out += _rec(Tag.STDIN, b"")
    if spec.walk:
        out += _rec(Tag.WALK_UPPER, b"")
    return out


SECCOMP_MAX = 4096 * 8     # BPF_MAXINSNS instructions of 8 bytes
MAX_PATHS = 64             # MASKED, and RO_PATH, records each
RLIMIT_RESOURCES = 16      # RLIMIT_NLIMITS: resources 0..15, one record each at most


def _check_rlimit(resource: int, soft: int, hard: int, seen: set[int]) -> None:
    if not 0 <= resource < RLIMIT_RESOURCES or resource in seen or not 0 <= soft <= hard < 1 << 64:
        raise ProtocolError(f"RLIMIT {resource}: an unknown or repeated resource, or soft {soft} above hard {hard}")
    seen.add(resource)


def _check_seccomp(prog: bytes) -> None:
    if not prog or len(prog) % 8 or len(prog) > SECCOMP_MAX:
        raise ProtocolError(f"SECCOMP must be 1 to {SECCOMP_MAX // 8} instructions of 8 bytes")


def _check_abs_path(path: str, tag: Tag) -> str:
    parts = path.split("/")[1:]
    if not path.startswith("/") or (path != "/" and any(p in ("", ".", "..") for p in parts)):
        raise ProtocolError(f"{tag.name} path {path!r} must be absolute without \"..\"")
    return path


def encode_run(spec: RunSpec) -> bytes:
    if not spec.args:
        raise ProtocolError("RUN needs at least one argument")
    out = _process_records(spec)
    out += _str(Tag.HOSTNAME, spec.hostname)
    if spec.time_ns is not None:
        out += _rec(Tag.TIME, struct.pack(">Q", spec.time_ns))
    out += _str(Tag.ROOTFS, spec.rootfs_tag)
    if spec.readonly:
        out += _rec(Tag.READONLY, b"")
    if spec.caps is not None:
        out += _rec(Tag.CAPS, struct.pack(">Q", spec.caps))
    if spec.no_new_privs:
        out += _rec(Tag.NO_NEW_PRIVS, b"")
    for m in spec.mounts:
        out += _str(Tag.MOUNT, m.target)
        if m.source is not None:
            out += _str(Tag.MOUNT_SOURCE, m.source)
        out += _rec(Tag.MOUNT_FLAGS, struct.pack(">I", m.flags))
        if m.data:
            out += _str(Tag.MOUNT_DATA, m.data)
    if spec.memory_max:
        out += _rec(Tag.MEMORY_MAX, struct.pack(">Q", spec.memory_max))
    if spec.pids_max:
        out += _rec(Tag.PIDS_MAX, struct.pack(">Q", spec.pids_max))
    if spec.share_9p:
        out += _rec(Tag.SHARE_9P, b"")
    if spec.seed:
        if not 16 <= len(spec.seed) <= 256:
            raise ProtocolError("SEED must be 16 to 256 bytes")
        out += _rec(Tag.SEED, spec.seed)
    if spec.net is not None:
        out += _rec(Tag.NET, encode_net(spec.net))
    if spec.net6 is not None:
        if spec.net is None:
            raise ProtocolError("NET6 without NET")
        out += _rec(Tag.NET6, encode_net6(spec.net6))
    if spec.upper_disk is not None:
        out += _rec(Tag.UPPER_DISK, encode_disk(spec.upper_disk))
    if spec.disk_scratch:
        if spec.upper_disk is None:
            raise ProtocolError("DISK_SCRATCH without UPPER_DISK")
        out += _rec(Tag.DISK_SCRATCH, b"")
    if spec.share_fresh:
        if not spec.share_9p:
            raise ProtocolError("SHARE_FRESH without SHARE_9P")
        out += _rec(Tag.SHARE_FRESH, b"")
    if spec.seccomp:
        _check_seccomp(spec.seccomp)
        out += _rec(Tag.SECCOMP, spec.seccomp)
    for tag, paths in ((Tag.MASKED, spec.masked), (Tag.RO_PATH, spec.ro_paths)):
        if len(paths) > MAX_PATHS:
            raise ProtocolError(f"more than {MAX_PATHS} {tag.name} paths")
        for path in paths:
            _check_abs_path(path, tag)
            out += _str(tag, path)
    seen: set[int] = set()
    for resource, soft, hard in spec.rlimits:
        _check_rlimit(resource, soft, hard, seen)
        out += _rec(Tag.RLIMIT, struct.pack(">IQQ", resource, soft, hard))
    if spec.walk_content:
        if not spec.walk:
            raise ProtocolError("WALK_CONTENT without WALK_UPPER")
        out += _rec(Tag.WALK_CONTENT, b"")
    if spec.walk_after:
        if spec.walk or spec.tty is not None:
            raise ProtocolError("WALK_AFTER with WALK_UPPER or TTY")
        out += _rec(Tag.WALK_AFTER, b"")
    if len(out) > MAX_PAYLOAD:
        raise ProtocolError(
            f"container spec is {len(out)} bytes; the agent protocol allows {MAX_PAYLOAD}")
    return encode(Msg.RUN, bytes(out))


def _records(p: bytes, what: str) -> Iterator[tuple[int, bytes]]:
    """The (tag, value) records of a RUN or EXEC payload."""
    i = 0
    while i < len(p):
        if len(p) - i < 5:
            raise ProtocolError(f"truncated {what} record header")
        tag, ln = struct.unpack_from(">BI", p, i)
        i += 5
        if ln > len(p) - i:
            raise ProtocolError(f"{what} record longer than payload")
        yield tag, p[i:i + ln]
        i += ln


def decode_run(p: bytes) -> RunSpec:
    """Inverse of encode_run (used by tests and the fuzz harness)."""
    spec = RunSpec(args=[])
    for tag, v in _records(p, "RUN"):
        ln = len(v)
        if tag == Tag.ARG:
            spec.args.append(_text(v, "ARG"))
        elif tag == Tag.ENV:
            spec.env.append(_text(v, "ENV"))
        elif tag == Tag.CWD:
            spec.cwd = _text(v, "CWD")
        elif tag == Tag.HOSTNAME:
            spec.hostname = _text(v, "HOSTNAME")
        elif tag in (Tag.UID, Tag.GID):
            if ln != 4:
                raise ProtocolError("UID/GID must be 4 bytes")
            setattr(spec, "uid" if tag == Tag.UID else "gid", struct.unpack(">I", v)[0])
        elif tag == Tag.GROUPS:
            if ln % 4:
                raise ProtocolError("GROUPS length not a multiple of 4")
            spec.groups += [g for (g,) in struct.iter_unpack(">I", v)]
        elif tag == Tag.TTY:
            if ln != 4:
                raise ProtocolError("TTY must be 4 bytes")
            spec.tty = struct.unpack(">HH", v)
        elif tag == Tag.STDIN:
            spec.stdin = True
        elif tag == Tag.TIME:
            if ln != 8:
                raise ProtocolError("TIME must be 8 bytes")
            spec.time_ns = struct.unpack(">Q", v)[0]
        elif tag == Tag.ROOTFS:
            spec.rootfs_tag = _text(v, "ROOTFS")
        elif tag == Tag.READONLY:
            spec.readonly = True
        elif tag == Tag.CAPS:
            if ln != 8:
                raise ProtocolError("CAPS must be 8 bytes")
            spec.caps = struct.unpack(">Q", v)[0]
        elif tag == Tag.NO_NEW_PRIVS:
            spec.no_new_privs = True
        elif tag == Tag.MOUNT:
            spec.mounts.append(MountSpec(_text(v, "MOUNT")))
        elif tag in (Tag.MOUNT_SOURCE, Tag.MOUNT_FLAGS, Tag.MOUNT_DATA):
            if not spec.mounts:
                raise ProtocolError(f"{Tag(tag).name} before any MOUNT")
            if tag == Tag.MOUNT_SOURCE:
                spec.mounts[-1].source = _text(v, "MOUNT_SOURCE")
            elif tag == Tag.MOUNT_DATA:
                spec.mounts[-1].data = _text(v, "MOUNT_DATA")
            elif ln != 4:
                raise ProtocolError("MOUNT_FLAGS must be 4 bytes")
            else:
                spec.mounts[-1].flags = struct.unpack(">I", v)[0]
        elif tag in (Tag.MEMORY_MAX, Tag.PIDS_MAX):
            if ln != 8:
                raise ProtocolError(f"{Tag(tag).name} must be 8 bytes")
            setattr(spec, "memory_max" if tag == Tag.MEMORY_MAX else "pids_max", struct.unpack(">Q", v)[0])
        elif tag == Tag.SHARE_9P:
            if ln:
                raise ProtocolError("SHARE_9P must be empty")
            spec.share_9p = True
        elif tag == Tag.SEED:
            if not 16 <= ln <= 256:
                raise ProtocolError("SEED must be 16 to 256 bytes")
            spec.seed = bytes(v)
        elif tag == Tag.NET:
            if ln != NET_VALUE.size:
                raise ProtocolError(f"NET must be {NET_VALUE.size} bytes")
            if spec.net is not None:
                raise ProtocolError("more than one NET record")
            spec.net = decode_net(v)
        elif tag == Tag.NET6:
            if ln != NET6_VALUE.size:
                raise ProtocolError(f"NET6 must be {NET6_VALUE.size} bytes")
            if spec.net6 is not None:
                raise ProtocolError("more than one NET6 record")
            spec.net6 = decode_net6(v)
        elif tag == Tag.UPPER_DISK:
            if spec.upper_disk is not None:
                raise ProtocolError("more than one UPPER_DISK record")
            spec.upper_disk = decode_disk(v)
        elif tag in (Tag.DISK_SCRATCH, Tag.SHARE_FRESH):
            if ln:
                raise ProtocolError(f"{Tag(tag).name} must be empty")
            setattr(spec, "disk_scratch" if tag == Tag.DISK_SCRATCH else "share_fresh", True)
        elif tag == Tag.SECCOMP:
            if spec.seccomp:
                raise ProtocolError("more than one SECCOMP record")
            _check_seccomp(v)
            spec.seccomp = bytes(v)
        elif tag in (Tag.WALK_UPPER, Tag.WALK_CONTENT, Tag.WALK_AFTER):
            if ln:
                raise ProtocolError(f"{Tag(tag).name} must be empty")
            setattr(spec, {Tag.WALK_UPPER: "walk", Tag.WALK_CONTENT: "walk_content"}.get(Tag(tag), "walk_after"), True)
        elif tag in (Tag.MASKED, Tag.RO_PATH):
            paths = spec.masked if tag == Tag.MASKED else spec.ro_paths
            if len(paths) >= MAX_PATHS:
                raise ProtocolError(f"more than {MAX_PATHS} {Tag(tag).name} paths")
            paths.append(_check_abs_path(_text(v, Tag(tag).name), Tag(tag)))
        elif tag == Tag.RLIMIT:
            if ln != 20:
                raise ProtocolError("RLIMIT must be 20 bytes")
            resource, soft, hard = struct.unpack(">IQQ", v)
            _check_rlimit(resource, soft, hard, {r for r, _, _ in spec.rlimits})
            spec.rlimits.append((resource, soft, hard))
        # unknown tags are skipped, as the spec requires
    if not spec.args:
        raise ProtocolError("RUN without ARG")
    if spec.net6 is not None and spec.net is None:
        raise ProtocolError("NET6 without NET")
    if spec.disk_scratch and spec.upper_disk is None:
        raise ProtocolError("DISK_SCRATCH without UPPER_DISK")
    if spec.share_fresh and not spec.share_9p:
        raise ProtocolError("SHARE_FRESH without SHARE_9P")
    if spec.walk and spec.tty is not None:
        raise ProtocolError("WALK_UPPER with TTY or DETACH")
    if spec.walk_content and not spec.walk:
        raise ProtocolError("WALK_CONTENT without WALK_UPPER")
    if spec.walk_after and (spec.walk or spec.tty is not None):
        raise ProtocolError("WALK_AFTER with WALK_UPPER or TTY")
    return spec


@dataclasses.dataclass
class ExecSpec:
    """An extra process in a running VM container (EXEC, on an exec port).

    The agent starts it in the container's PID and mount namespaces, root and
    cgroup, with the container's capabilities and no_new_privs; the user, the
    environment and the working directory are the EXEC's (numbers and strings
    resolved by the caller)."""

    args: list[str]
    env: list[str] = dataclasses.field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = dataclasses.field(default_factory=list)
    tty: tuple[int, int] | None = None   # rows, cols
    stdin: bool = False
    detach: bool = False
    walk: bool = False               # WALK_UPPER: list the writable layer instead of exec'ing args (docker diff)


def encode_exec(spec: ExecSpec) -> bytes:
    if not spec.args:
        raise ProtocolError("EXEC needs at least one argument")
    if not spec.cwd.startswith("/"):
        raise ProtocolError(f"exec working directory {spec.cwd!r} is not absolute")
    out = _process_records(spec)
    if spec.detach:
        out += _rec(Tag.DETACH, b"")
    if len(out) > MAX_PAYLOAD:
        raise ProtocolError(f"exec spec is {len(out)} bytes; the agent protocol allows {MAX_PAYLOAD}")
    return encode(Msg.EXEC, bytes(out))


def decode_exec(p: bytes) -> ExecSpec:
    """Inverse of encode_exec; RUN-only tags (HOSTNAME, TIME, mounts, limits) are ignored."""
    spec = ExecSpec(args=[])
    for tag, v in _records(p, "EXEC"):
        if tag == Tag.ARG:
            spec.args.append(_text(v, "ARG"))
        elif tag == Tag.ENV:
            spec.env.append(_text(v, "ENV"))
        elif tag == Tag.CWD:
            spec.cwd = _text(v, "CWD")
        elif tag in (Tag.UID, Tag.GID):
            if len(v) != 4:
                raise ProtocolError("UID/GID must be 4 bytes")
            setattr(spec, "uid" if tag == Tag.UID else "gid", struct.unpack(">I", v)[0])
        elif tag == Tag.GROUPS:
            if len(v) % 4:
                raise ProtocolError("GROUPS length not a multiple of 4")
            spec.groups += [g for (g,) in struct.iter_unpack(">I", v)]
        elif tag == Tag.TTY:
            if len(v) != 4:
                raise ProtocolError("TTY must be 4 bytes")
            spec.tty = struct.unpack(">HH", v)
        elif tag in (Tag.STDIN, Tag.DETACH, Tag.WALK_UPPER):
            if v:
                raise ProtocolError(f"{Tag(tag).name} must be empty")
            setattr(spec, {Tag.STDIN: "stdin", Tag.DETACH: "detach"}.get(Tag(tag), "walk"), True)
    if not spec.args:
        raise ProtocolError("EXEC without ARG")
    if spec.walk and (spec.tty is not None or spec.detach):
        raise ProtocolError("WALK_UPPER with TTY or DETACH")
    return spec
