"""Container networking: networks, addresses, plumbing, published ports and names.

A container joins ``none`` (its own network namespace, loopback only), ``host``
(the host's namespace; process mode only), the default ``bridge`` network or a
user network (``vmrt network create``). Every non-host container has its own
network namespace, bind-mounted at ``<run_root>/netns/<id>``:

* process mode: a veth pair, one end on the network's bridge, the other as
  ``eth0`` (``eth1``... for more networks) in the namespace, with the address;
* VM mode: the veth end ``eth0`` in the namespace carries no address; a tap
  ``tap0`` beside it backs the VM's virtio-net NIC and tc redirects every frame
  between the two (as Kata Containers does); the guest agent sets the address,
  route and MAC inside the VM (RUN's NET record).

Addresses come from the network's subnet (the gateway is the bridge's own).
Outbound NAT, published ports (DNAT, also from 127.0.0.1 through
``route_localnet``, guarded), forwarding (drop but for what vmrt publishes, what
a container started and its own network) are nftables rules in a table of
vmrt's own (``inet vmrt``); anti-spoofing per host-side veth (a container sends
from its own MAC and address only) in another (``bridge vmrt``). Both are
rewritten whole and atomically from the state database when a bridge is made
or ports are published, so a crash leaves nothing another start trips on; a
container's anti-spoofing chain comes and goes with it. Names: each container gets managed ``/etc/hosts`` and
``/etc/resolv.conf`` files (bind-mounted, as Docker does); on a user network
the hosts file lists every other container of the network by name, alias and
short id, and is rewritten when one comes or goes.

Netlink work (bridge, veth, addresses, routes, tc) is done with pyroute2; it is
imported only when a container needs a bridge.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import socket
import sqlite3
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import fsmode, rootfs
from ..config import Config
from ..errors import UsageError, VmrtError

LOG = logging.getLogger(__name__)
DEFAULT = "bridge"
BUILTIN = ("none", "host", "bridge")
TABLE = "vmrt"
ANNOTATION = "org.vmrt.network"
MANAGED_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname")
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


class NetworkError(VmrtError):
    pass


# --- what a container asks for -------------------------------------------------------
#
# Ports are data: whatever they come from (-p, --expose, the image's EXPOSE/ExposedPorts,
# vmrt's own state read back), they are parsed into ints, a protocol of PROTOS and an
# IPv4 address before anything is done with them, and checked again where they reach nft.

PROTOS = ("tcp", "udp")          # what vmrt publishes
EXPOSE_PROTOS = (*PROTOS, "sctp")  # what an image may expose (Docker's); sctp is never published
MAX_PORTS = 4096                 # exposed or published ports of one container (a range is many)
_DIGITS = re.compile(r"[0-9]{1,5}")


def _port(text: str, what: str, where: str = "-p") -> int:
    if not _DIGITS.fullmatch(text) or not 0 < int(text) < 65536:
        raise UsageError(f"invalid {what} port {text[:32]!r} in {where}")
    return int(text)


def _range(text: str, what: str, where: str = "-p") -> list[int]:
    """``PORT`` or ``FIRST-LAST``, each end checked (Docker's ranges)."""
    lo, sep, hi = text.partition("-")
    a = _port(lo, what, where)
    b = _port(hi, what, where) if sep else a
    if b < a:
        raise UsageError(f"invalid {what} port range {text[:32]!r} in {where}")
    if b - a >= MAX_PORTS:
        raise UsageError(f"{where}: port range {text} is larger than {MAX_PORTS} ports")
    return list(range(a, b + 1))


def _proto(text: str, where: str, allowed: tuple[str, ...] = PROTOS) -> str:
    proto = (text or "tcp").lower()
    if proto == "sctp" and "sctp" not in allowed:
        raise UsageError(f"invalid protocol 'sctp' in {where}: vmrt publishes tcp and udp ports only")
    if proto not in allowed:
        raise UsageError(f"invalid protocol {text[:16]!r} in {where} (use tcp or udp)")
    return proto


def _host_ip(text: str) -> str:
    """A canonical IPv4 address ("" for every address)."""
    if not text:
        return ""
    ip = ipaddress.IPv4Address(text)  # ValueError for anything else
    return "" if ip == ipaddress.IPv4Address(0) else str(ip)


@dataclasses.dataclass
class PortMapping:
    host_ip: str          # "" = every host address
    host_port: int        # 0 = pick a free one (-P, or -p CTR)
    container_port: int
    proto: str = "tcp"

    def __post_init__(self) -> None:
        """Checked whenever one is made (from a flag, or read back from state): the values reach nft."""
        ok = (type(self.host_port) is int and 0 <= self.host_port < 65536
              and type(self.container_port) is int and 0 < self.container_port < 65536
              and self.proto in PROTOS and isinstance(self.host_ip, str))
        if ok and self.host_ip:
            try:
                ok = _host_ip(self.host_ip) == self.host_ip
            except ValueError:
                ok = False
        if not ok:
            raise NetworkError(f"invalid published port {self.host_ip!r}:{self.host_port!r}:"
                               f"{self.container_port!r}/{self.proto!r}"[:160])

    def key(self) -> str:
        return f"{self.container_port}/{self.proto}"


@dataclasses.dataclass
class NetRequest:
    """The ``run`` flags about networking; kept in the container's config (annotation)."""

    network: str = DEFAULT
    aliases: list[str] = dataclasses.field(default_factory=list)
    ports: list[PortMapping] = dataclasses.field(default_factory=list)
    publish_all: bool = False
    exposed: list[str] = dataclasses.field(default_factory=list)   # "8080/tcp" (image EXPOSE + --expose)
    dns: list[str] = dataclasses.field(default_factory=list)
    dns_search: list[str] = dataclasses.field(default_factory=list)
    dns_options: list[str] = dataclasses.field(default_factory=list)
    extra_hosts: list[str] = dataclasses.field(default_factory=list)   # "name:ip"
    extra_networks: list[str] = dataclasses.field(default_factory=list)  # `network connect` on a stopped one

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NetRequest:
        """Read back from state; ports and exposed ports are parsed again (never trusted as text)."""
        try:
            d = json.loads(text)
            d["ports"] = [PortMapping(**p) for p in d.get("ports", [])]
            d["exposed"] = [k for e in d.get("exposed", []) for k in parse_exposed(e, "the container's configuration")]
            return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})
        except (ValueError, TypeError, AttributeError, UsageError) as e:
            raise NetworkError(f"the container's network configuration is damaged: {e}"[:200]) from None

    @property
    def networks(self) -> list[str]:
        return [self.network, *[n for n in self.extra_networks if n != self.network]]


def request_of(config: dict[str, Any]) -> NetRequest:
    text = config.get("annotations", {}).get(ANNOTATION)
    return NetRequest.from_json(text) if text else NetRequest()


def parse_publish(spec: str) -> list[PortMapping]:
    """Docker's ``-p [IP:][HOST[-END]:]CTR[-END][/tcp|udp]``."""
    where = f"-p {spec[:64]}"
    body, _, proto = spec.partition("/")
    proto = _proto(proto, where)
    ip = ""
    if body.startswith("["):
        raise UsageError(f"{where}: IPv6 addresses are not supported")
    parts = body.split(":")
    if len(parts) == 3:
        ip, host, ctr = parts
        try:
            ip = _host_ip(ip)
        except ValueError:
            raise UsageError(f"invalid IP address {parts[0][:40]!r} in {where}") from None
    elif len(parts) == 2:
        host, ctr = parts
    elif len(parts) == 1:
        host, ctr = "", parts[0]
    else:
        raise UsageError(f"invalid {where!r}: use [IP:][HOST:]CONTAINER[/tcp|udp]")
    ctr_ports = _range(ctr, "container", where)
    if not host:
        return [PortMapping(ip, 0, c, proto) for c in ctr_ports]
    host_ports = _range(host, "host", where)
    if len(host_ports) != len(ctr_ports):
        if len(ctr_ports) == 1 and len(host_ports) > 1:
            raise UsageError(f"{where}: a host port range needs a container range of the same size")
        raise UsageError(f"{where}: the host and container port ranges differ in size")
    return [PortMapping(ip, h, c, proto) for h, c in zip(host_ports, ctr_ports, strict=True)]


def parse_exposed(spec: str, where: str, protos: tuple[str, ...] = EXPOSE_PROTOS) -> list[str]:
    """``PORT[-END][/PROTO]`` as exposed ports, one ``"PORT/proto"`` each (the only form kept)."""
    if not isinstance(spec, str):
        raise UsageError(f"invalid port {str(spec)[:32]!r} in {where}")
    body, _, proto = spec.partition("/")
    proto = _proto(proto, where, protos)
    return [f"{p}/{proto}" for p in _range(body, "exposed", where)]


def parse_expose(spec: str) -> list[str]:
    """``--expose PORT[-END][/tcp|udp]``."""
    return parse_exposed(spec, f"--expose {spec[:64]}", PROTOS)


def image_exposed(value: object) -> list[str]:
    """The image config's ExposedPorts keys, each parsed; a key that is not a port refuses the
    run (as Docker does), named in the one-line error, and is never passed on."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise UsageError("the image's ExposedPorts is not a map of ports: refusing to run it")
    out: list[str] = []
    for key in value:
        try:
            out += parse_exposed(key, "the image's ExposedPorts")
        except UsageError:
            raise UsageError(f"the image's ExposedPorts key {str(key)[:64]!r} is not a port "
                             f"(PORT[-END][/tcp|udp|sctp], at most {MAX_PORTS}): refusing to run it") from None
        if len(out) > MAX_PORTS:
            raise UsageError(f"the image exposes more than {MAX_PORTS} ports: refusing to run it")
    return out


def split_exposed(key: str) -> tuple[int, str]:
    """An exposed port kept as ``"PORT/proto"``, parsed again: (port, proto)."""
    ports = parse_exposed(key, "the container's exposed ports")
    if len(ports) != 1:
        raise NetworkError(f"exposed port {key[:32]!r} is not one port")
    port, _, proto = ports[0].partition("/")
    return int(port), proto


def parse_add_host(spec: str) -> str:
    name, sep, ip = spec.partition(":")
    if not sep or not name or not _valid_hostname(name):
        raise UsageError(f"invalid --add-host {spec!r}: use NAME:IP")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise UsageError(f"invalid IP address in --add-host {spec!r}") from None
    return f"{name}:{ip}"


def parse_dns(spec: str) -> str:
    try:
        return str(ipaddress.ip_address(spec))
    except ValueError:
        raise UsageError(f"invalid --dns {spec!r}: not an IP address") from None


def _valid_hostname(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})", name))


def valid_alias(name: str) -> str:
    if not _valid_hostname(name):
        raise UsageError(f"invalid network alias {name!r}")
    return name


# --- networks and endpoints in the state database -------------------------------------

@dataclasses.dataclass
class Network:
    id: str
    name: str
    subnet: str
    gateway: str
    bridge: str
    internal: bool = False
    created: float = 0.0
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN

    @property
    def user(self) -> bool:
        return not self.builtin

    def inspect(self, containers: dict[str, dict[str, str]]) -> dict[str, Any]:
        return {"Name": self.name, "Id": self.id, "Created": _iso(self.created), "Scope": "local",
                "Driver": "bridge", "EnableIPv6": False,
                "IPAM": {"Driver": "default", "Config": [{"Subnet": self.subnet, "Gateway": self.gateway}]},
                "Internal": self.internal, "Options": {"com.docker.network.bridge.name": self.bridge},
                "Labels": self.labels, "Containers": containers}


@dataclasses.dataclass
class Endpoint:
    container_id: str
    network_id: str
    ip: str
    mac: str
    ifname: str           # in the container's namespace: eth0, eth1...
    host_if: str          # the veth end on the bridge
    aliases: list[str]
    name: str             # the container's name when it joined
    ports: list[PortMapping]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Store:
    """Networks and the endpoints of running containers, beside the container records."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        fsmode.private_dir(cfg.db_path.parent)
        self.db = sqlite3.connect(fsmode.touch_private(cfg.db_path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("""CREATE TABLE IF NOT EXISTS networks (
            id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, subnet TEXT NOT NULL, gateway TEXT NOT NULL,
            bridge TEXT NOT NULL, internal INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}')""")
        self.db.execute("""CREATE TABLE IF NOT EXISTS endpoints (
            container_id TEXT NOT NULL, network_id TEXT NOT NULL, ip TEXT NOT NULL, mac TEXT NOT NULL,
            ifname TEXT NOT NULL, host_if TEXT NOT NULL, aliases TEXT NOT NULL, name TEXT NOT NULL,
            ports TEXT NOT NULL, PRIMARY KEY (container_id, network_id))""")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @staticmethod
    def _net(r: tuple) -> Network:
        return Network(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], json.loads(r[7]))

    def networks(self) -> list[Network]:
        self._ensure_default()
        return [self._net(r) for r in self.db.execute("SELECT * FROM networks ORDER BY created")]

    def _ensure_default(self) -> None:
        if self.db.execute("SELECT 1 FROM networks WHERE name='bridge'").fetchone():
            return
        net = ipaddress.IPv4Network(self.cfg.network_subnet, strict=False)
        with contextlib.suppress(sqlite3.IntegrityError):
            self.db.execute("INSERT INTO networks VALUES (?,?,?,?,?,?,?,?)",
                            (secrets.token_hex(32), "bridge", str(net), str(net.network_address + 1),
                             self.cfg.network_bridge, 0, time.time(), "{}"))

    def get(self, ref: str) -> Network:
        if ref in ("none", "host"):
            raise UsageError(f"network {ref} has no bridge, addresses or members to show")
        self._ensure_default()
        rows = self.db.execute("SELECT * FROM networks WHERE name=? OR id=?", (ref, ref)).fetchall()
        if not rows and len(ref) >= 3 and re.fullmatch(r"[0-9a-f]+", ref):
            rows = self.db.execute("SELECT * FROM networks WHERE substr(id,1,?)=?", (len(ref), ref)).fetchall()
        if len(rows) != 1:
            raise NetworkError(f"network {ref} not found" if not rows else f"network {ref} is ambiguous")
        return self._net(rows[0])

    def create(self, name: str, subnet: str | None, gateway: str | None, internal: bool,
               labels: dict[str, str]) -> Network:
        if name in BUILTIN:
            raise UsageError(f"{name} is a pre-defined network and cannot be created")
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}", name):
            raise UsageError(f"invalid network name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        self._ensure_default()
        used = [ipaddress.IPv4Network(n.subnet) for n in self.networks()]
        if subnet:
            try:
                net = ipaddress.IPv4Network(subnet, strict=False)
            except ValueError as e:
                raise UsageError(f"invalid --subnet {subnet!r}: {e}") from None
            if net.prefixlen > 30:
                raise UsageError(f"--subnet {subnet}: too small (at most /30)")
            if any(net.overlaps(u) for u in used):
                raise NetworkError(f"Pool overlaps with other one on this address space: {net}")
        else:
            net = self._free_subnet(used)
        if gateway:
            try:
                gw = ipaddress.IPv4Address(gateway)
            except ValueError:
                raise UsageError(f"invalid --gateway {gateway!r}") from None
            if gw not in net or gw in (net.network_address, net.broadcast_address):
                raise UsageError(f"--gateway {gateway} is not a host address of {net}")
        else:
            gw = net.network_address + 1
        _check_host_overlap(net)
        nid = secrets.token_hex(32)
        row = (nid, name, str(net), str(gw), "vmbr" + nid[:10], int(internal), time.time(), json.dumps(labels))
        try:
            self.db.execute("INSERT INTO networks VALUES (?,?,?,?,?,?,?,?)", row)
        except sqlite3.IntegrityError:
            raise NetworkError(f"network with name {name} already exists") from None
        return self._net(row)

    def _free_subnet(self, used: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
        pool = ipaddress.IPv4Network(self.cfg.network_pool, strict=False)
        host = _host_networks()
        for cand in pool.subnets(new_prefix=max(pool.prefixlen, 24)):
            if not any(cand.overlaps(u) for u in used + host):
                return cand
        raise NetworkError(f"no free subnet left in the network pool {pool}")

    def remove_network(self, net: Network) -> None:
        self.db.execute("DELETE FROM networks WHERE id=?", (net.id,))

    # endpoints
    def endpoints(self, network_id: str | None = None, container_id: str | None = None) -> list[Endpoint]:
        q, args = "SELECT * FROM endpoints WHERE 1=1", list[str]()
        if network_id:
            q, args = q + " AND network_id=?", [*args, network_id]
        if container_id:
            q, args = q + " AND container_id=?", [*args, container_id]
        out = []
        for r in self.db.execute(q, args).fetchall():
            out.append(Endpoint(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7],
                                [PortMapping(**p) for p in json.loads(r[8])]))
        return out

    def add_endpoint(self, ep: Endpoint) -> None:
        self.db.execute("INSERT OR REPLACE INTO endpoints VALUES (?,?,?,?,?,?,?,?,?)",
                        (ep.container_id, ep.network_id, ep.ip, ep.mac, ep.ifname, ep.host_if,
                         json.dumps(ep.aliases), ep.name, json.dumps([dataclasses.asdict(p) for p in ep.ports])))

    def drop_endpoints(self, container_id: str, network_id: str | None = None) -> None:
        if network_id:
            self.db.execute("DELETE FROM endpoints WHERE container_id=? AND network_id=?", (container_id, network_id))
        else:
            self.db.execute("DELETE FROM endpoints WHERE container_id=?", (container_id,))

    def live_endpoints(self, **kw: str) -> list[Endpoint]:
        """Endpoints whose container still has its namespace (rows a crash or reboot left are dropped)."""
        out = []
        for ep in self.endpoints(**kw):
            if netns_path(self.cfg, ep.container_id).exists():
                out.append(ep)
            else:
                self.drop_endpoints(ep.container_id)
        return out


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Subnets of the host's own addresses (kernel-reported, from /proc/net/route and fib_trie)."""
    nets = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[1] != "00000000":
                dest = socket.inet_ntoa(struct.pack("<I", int(f[1], 16)))
                mask = socket.inet_ntoa(struct.pack("<I", int(f[7], 16)))
                with contextlib.suppress(ValueError):
                    nets.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return nets


def _check_host_overlap(net: ipaddress.IPv4Network) -> None:
    for h in _host_networks():
        if net.overlaps(h):
            raise NetworkError(f"subnet {net} overlaps the host's route to {h}: choose another --subnet")


# --- locking, namespaces, sysctls --------------------------------------------------------

@contextlib.contextmanager
def locked(cfg: Config) -> Iterator[None]:
    """Every change to addresses, interfaces or rules happens under one host-wide lock."""
    fsmode.private_dir(cfg.run_root)
    fd = os.open(cfg.run_root / "network.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def netns_path(cfg: Config, container_id: str) -> Path:
    return cfg.run_root / "netns" / container_id


def _in_thread(fn: Any, *args: Any) -> Any:
    """Run fn in a fresh thread (namespace switches stay in that thread, which then ends)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: B036 - carried to the caller
            box["error"] = e
    th = threading.Thread(target=target)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _loopback_up() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def create_netns(path: Path) -> None:
    """A new network namespace with its loopback up, kept alive by a bind mount at ``path``."""
    fsmode.private_dir(path.parent)
    path.touch(exist_ok=False)

    def make() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise NetworkError(f"cannot create a network namespace: {os.strerror(e)}")
        _loopback_up()
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        if _libc.mount(src, str(path).encode(), None, MS_BIND, None) != 0:
            e = ctypes.get_errno()
            raise NetworkError(f"cannot keep the network namespace at {path}: {os.strerror(e)}")
    try:
        _in_thread(make)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def remove_netns(path: Path) -> None:
    if path.exists():
        _libc.umount2(str(path).encode(), MNT_DETACH)
        with contextlib.suppress(OSError):
            path.unlink()


def in_netns(path: Path, fn: Any, *args: Any) -> Any:
    """Call fn inside the network namespace at path (in a thread of its own)."""
    def run() -> Any:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise NetworkError(f"cannot enter network namespace {path}: {os.strerror(e)}")
        finally:
            os.close(fd)
        return fn(*args)
    return _in_thread(run)


def _make_tap(name: str) -> int:
    """A tap in the calling thread's network namespace (vnet headers: QEMU's virtio-net offloads)."""
    TUNSETIFF, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x400454CA, 0x0002, 0x1000, 0x4000
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as e:
        os.close(fd)
        raise NetworkError(f"cannot create tap {name}: {e.strerror}") from None
    return fd


def open_tap(path: Path, name: str = "tap0") -> int:
    """Create the tap ``name`` in the namespace at path; returns its fd (for QEMU's -netdev tap,fd=).
    The tap lives as long as that fd is open anywhere: it goes with QEMU."""
    return int(in_netns(path, _make_tap, name))


def open_tap_detached() -> int:
    """A tap in a namespace of its own that nothing else holds (a snapshot's build VM): it and
    the namespace go when the fd's last holder, QEMU, exits."""
    def make() -> int:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise NetworkError(f"cannot create a network namespace: {os.strerror(ctypes.get_errno())}")
        return _make_tap("tap0")
    return int(_in_thread(make))


def adopt_tap(src_ns: Path, dst_ns: Path, name: str = "tap0") -> None:
    """Move a pooled VM's tap from the namespace it was booted in into the container's."""
    def move() -> None:
        with _iproute() as ipr:
            idx = _link_index(ipr, name)
            if idx is None:
                raise NetworkError(f"the pooled VM's {name} is missing")
            try:
                ipr.link("set", index=idx, net_ns_fd=str(dst_ns))
            except Exception as e:
                raise _nl_error(f"cannot move {name} into the container's namespace", e) from None
    in_netns(src_ns, move)
    remove_netns(src_ns)


def _sysctl(key: str, value: str) -> None:
    p = Path("/proc/sys") / key.replace(".", "/")
    try:
        if p.read_text().strip() != value:
            p.write_text(value)
    except OSError as e:
        raise NetworkError(f"cannot set {key}={value}: {e.strerror}") from None


# --- netlink (pyroute2) ------------------------------------------------------------------

def _iproute() -> Any:
    """pyroute2's IPRoute without its package __init__, which imports every netlink family it
    has (~100 ms): vmrt needs rtnetlink only, and this is on the container start path.
    Its ``netns=`` argument is not used: it forks a child that pyroute2 ends with SIGTERM, which
    the parent's asyncio signal handling (the inherited wakeup fd) takes for its own. Work in a
    namespace runs in a thread that entered it (:func:`in_netns`)."""
    return _iproute_class()()


def _iproute_class() -> Any:
    import importlib.util
    import sys
    import types
    with _import_lock:
        if "pyroute2" not in sys.modules:
            spec = importlib.util.find_spec("pyroute2")
            if spec is None or spec.submodule_search_locations is None:
                raise NetworkError("pyroute2 is not installed (pip install pyroute2)")
            shell = types.ModuleType("pyroute2")
            shell.__path__ = list(spec.submodule_search_locations)
            shell.__spec__ = spec
            sys.modules["pyroute2"] = shell
    from pyroute2.iproute.linux import IPRoute
    return IPRoute


_import_lock = threading.Lock()


def preload(req: NetRequest | None) -> None:
    """Import pyroute2 in the background while the run looks up its image and writes its
    records (much of that waits on files): a bridge network needs it soon after."""
    if req is not None and req.network in ("none", "host"):
        return
    def load() -> None:
        with contextlib.suppress(Exception):  # a missing pyroute2 is reported where it is needed
            _iproute_class()
    threading.Thread(target=load, daemon=True).start()


def _nl_error(what: str, e: Exception) -> NetworkError:
    return NetworkError(f"{what}: {e.args[-1] if e.args else e}")


def _link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_bridge(net: Network) -> bool:
    """The network's bridge with the gateway address, up; forwarding on (idempotent). True if
    the bridge was made now (then the rules need writing)."""
    IfName(net.bridge)  # it names a /proc/sys path and reaches nft: a strict interface name
    if _link_exists(net.bridge) and Path(f"/proc/sys/net/ipv4/conf/{net.bridge}/route_localnet").read_text() == "1\n":
        return False  # set up already (the common case: no netlink round trips)
    _sysctl("net.ipv4.ip_forward", "1")
    subnet = ipaddress.IPv4Network(net.subnet)
    with _iproute() as ipr:
        idx = _link_index(ipr, net.bridge)
        if idx is None:
            _check_host_overlap(subnet)
            try:
                ipr.link("add", ifname=net.bridge, kind="bridge")
            except Exception as e:  # NetlinkError; a concurrent creator is fine
                if _link_index(ipr, net.bridge) is None:
                    raise _nl_error(f"cannot create bridge {net.bridge}", e) from None
            idx = _link_index(ipr, net.bridge)
        addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
        if net.gateway not in addrs:
            try:
                ipr.addr("add", index=idx, address=net.gateway, prefixlen=subnet.prefixlen)
            except Exception as e:
                raise _nl_error(f"cannot address bridge {net.bridge}", e) from None
        ipr.link("set", index=idx, state="up")
    # published ports reached from 127.0.0.1: DNAT'd loopback traffic may leave through the bridge
    # (and its replies come back); the guard chain keeps containers off the host's loopback
    _sysctl(f"net.ipv4.conf.{net.bridge}.route_localnet", "1")
    return True


def delete_link(name: str) -> None:
    with contextlib.suppress(Exception), _iproute() as ipr:
        idx = _link_index(ipr, name)
        if idx is not None:
            ipr.link("del", index=idx)


def mac_for(ip: str) -> str:
    """Locally administered, derived from the address (as Docker's 02:42:...)."""
    b = ipaddress.IPv4Address(ip).packed
    return "02:56:" + ":".join(f"{x:02x}" for x in b)


def plumb_veth(net: Network, ep: Endpoint, ns: Path, vm: bool, default_route: bool, group: int) -> None:
    """veth: host end on the bridge, the other as ep.ifname in the namespace; process mode puts the
    address and route on it, VM mode redirects it to and from tap0 (the VM's NIC). The host end is
    made in ``group`` (port_group), so the bridge table guards it from its first frame.
    VM mode needs no rule on the tap: it is in the container's namespace, and every frame the guest
    sends is redirected by tc to the veth, whose host end is checked."""
    prefix = ipaddress.IPv4Network(net.subnet).prefixlen
    tmp = "vp" + secrets.token_hex(6)
    if _link_exists(ep.host_if):  # the same container's previous run, its namespace still being destroyed
        delete_link(ep.host_if)
    with _iproute() as ipr:
        br = _link_index(ipr, net.bridge)
        if br is None:
            raise NetworkError(f"bridge {net.bridge} of network {net.name} is gone")
        try:
            ipr.link("add", ifname=ep.host_if, kind="veth", group=group,
                     peer={"ifname": tmp, "net_ns_fd": str(ns)})
        except Exception as e:
            raise _nl_error(f"cannot create veth {ep.host_if}", e) from None
        hidx = _link_index(ipr, ep.host_if)
        ipr.link("set", index=hidx, master=br, state="up")
    in_netns(ns, _inside, tmp, ep, vm, prefix, net.gateway if default_route else None)


def _inside(tmp: str, ep: Endpoint, vm: bool, prefix: int, gateway: str | None) -> None:
    """The namespace's end of the veth (run inside the namespace)."""
    with _iproute() as nsr:
        idx = _link_index(nsr, tmp)
        if idx is None:
            raise NetworkError(f"veth {tmp} did not reach the container's namespace")
        nsr.link("set", index=idx, ifname=ep.ifname, **({} if vm else {"address": ep.mac}))
        nsr.link("set", index=idx, state="up")
        if vm:
            tap = _link_index(nsr, "tap0")
            if tap is None:
                raise NetworkError("the VM's tap0 is missing in its namespace")
            nsr.link("set", index=tap, state="up")
            for a, b in ((idx, tap), (tap, idx)):  # every frame in on one goes out of the other
                nsr.tc("add", "ingress", a, "ffff:")
                nsr.tc("add-filter", "u32", a, parent=0xFFFF0000, protocol=0x0003,  # ETH_P_ALL, match all
                       keys=["0x0/0x0+0"], target=0x1,
                       action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": b})
            return
        nsr.addr("add", index=idx, address=ep.ip, prefixlen=prefix)
        if gateway:
            nsr.route("add", dst="0.0.0.0/0", gateway=gateway)


# --- nftables ---------------------------------------------------------------------------
#
# Two tables per state root, rewritten whole from the database (sync_rules) when a bridge
# is made, ports are published or a network goes; a container's own anti-spoofing chain is
# added when it starts and removed when it stops (endpoint_rules / drop_endpoint_rules).
#
# No text from an image, a flag or the state database is pasted into a script: every value
# is parsed into a typed object first (ints, ipaddress objects, names checked against a
# strict pattern) and _lit checks it again where it is written (a plain str, or a value
# that no longer matches, is a bug and stops the write).

_PATTERNS = {
    "interface name": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}"),  # IFNAMSIZ - 1
    "nftables name": re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}"),
    "MAC address": re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}"),
    "container tag": re.compile(r"[0-9a-f]{12}"),
    "protocol": re.compile("|".join(PROTOS)),
}


class _Checked(str):
    """A string that matched its kind's pattern when made (and is checked again by _lit)."""

    what = ""
    quoted = False

    def __new__(cls, value: str) -> _Checked:
        if not isinstance(value, str) or not _PATTERNS[cls.what].fullmatch(value):
            raise NetworkError(f"invalid {cls.what} {str(value)[:40]!r} for nftables")
        return super().__new__(cls, value)


class IfName(_Checked):
    what, quoted = "interface name", True


class Ident(_Checked):
    what = "nftables name"


class Mac(_Checked):
    what = "MAC address"


class Tag(_Checked):
    what, quoted = "container tag", True


class Port(int):
    """A port number, 1-65535."""

    def __new__(cls, value: int) -> Port:
        if type(value) is not int or not 0 < value < 65536:
            raise NetworkError(f"invalid port {value!r} for nftables")
        return super().__new__(cls, value)


class Group(int):
    """An interface group number (u32, not 0)."""

    def __new__(cls, value: int) -> Group:
        if type(value) is not int or not 0 < value < 1 << 32:
            raise NetworkError(f"invalid interface group {value!r} for nftables")
        return super().__new__(cls, value)


class Proto(_Checked):
    what = "protocol"

_ADDRESSES = (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network)


def _lit(v: object) -> str:
    """One value for an nft script, checked at the point it is pasted in."""
    if isinstance(v, _Checked):
        if not _PATTERNS[v.what].fullmatch(v):
            raise NetworkError(f"bug: {v.what} {str(v)[:40]!r} changed after it was checked")
        return f'"{v}"' if v.quoted else str(v)
    if isinstance(v, Port) and 0 < v < 65536 or isinstance(v, Group) and 0 < v < 1 << 32:
        return str(int(v))
    if type(v) in _ADDRESSES:  # an ipaddress object prints as an address, nothing else
        return str(v)
    if type(v) is tuple and v:  # an anonymous set of checked values
        return "{ " + ", ".join(_lit(x) for x in v) + " }"
    raise NetworkError(f"bug: refusing to write a {type(v).__name__} into an nft script")


def _nf(template: str, *values: object) -> str:
    """A line of nft: each ``%s`` of the template (a literal of this module) filled by _lit."""
    parts = template.split("%s")
    if len(parts) != len(values) + 1:
        raise NetworkError("bug: nft template and values do not match")
    return parts[0] + "".join(_lit(v) + rest for v, rest in zip(values, parts[1:], strict=True))


def table_name(cfg: Config) -> str:
    """vmrt's nftables tables: ``vmrt`` for the default state root, one per other root (tests)."""
    if cfg.root == Config().root:
        return TABLE
    return f"{TABLE}_{hashlib.sha256(str(cfg.root).encode()).hexdigest()[:8]}"


def port_group(cfg: Config) -> int:
    """The interface group of this state root's host-side veths (set when a veth is made, before it
    joins a bridge): the bridge table drops every frame from a port of the group that has no
    anti-spoofing chain, so a veth is never unguarded, and other roots' veths are not ours."""
    return 0x10000000 | int(hashlib.sha256(table_name(cfg).encode()).hexdigest()[:7], 16)


def _nft(script: str) -> None:
    """Run an nft script as one transaction: through libnftables in this process (what ``nft -f``
    does, without its fork and exec: ~10 ms less per container start and stop), else ``nft``."""
    lib = _libnftables()
    if lib is not None:
        ctx = lib.nft_ctx_new(0)
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            if lib.nft_run_cmd_from_buffer(ctx, script.encode()) == 0:
                return
            msg = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace").strip().splitlines()
        finally:
            lib.nft_ctx_free(ctx)
        raise NetworkError(f"nft: {msg[0] if msg else 'the script failed'}")
    try:
        r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetworkError("nft not found: install nftables (apt install nftables)") from None
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()
        raise NetworkError(f"nft: {msg[0] if msg else 'exit status ' + str(r.returncode)}")


_nftlib: list[Any] = []


def _libnftables() -> Any:
    """libnftables (nftables' own library, which the ``nft`` binary is a front end of), loaded once;
    None where it is missing."""
    with _import_lock:
        if not _nftlib:
            lib = None
            with contextlib.suppress(OSError):
                lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
                lib.nft_ctx_new.restype = ctypes.c_void_p
                lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
                for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
                    getattr(lib, name).argtypes = [ctypes.c_void_p]
                lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
                lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            _nftlib.append(lib)
        return _nftlib[0]


def _chain_name(ep: Endpoint) -> Ident:
    return Ident("ep_" + IfName(ep.host_if))


def _endpoint_rules(ep: Endpoint) -> list[str]:
    """Anti-spoofing for one host-side veth: frames from it carry the container's MAC; ARP and IPv4
    carry its MAC and address; nothing else passes (no IPv6 until containers get addresses: as
    Docker, which turns IPv6 off on the interfaces of a network without it)."""
    mac, ip = Mac(ep.mac), ipaddress.IPv4Address(ep.ip)
    return [_nf("ether saddr != %s drop", mac),
            _nf("arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether %s arp saddr ip %s accept", mac, ip),
            _nf("ip saddr %s accept", ip),
            "drop"]


def _delete_tables(table: Ident) -> list[str]:
    # the ip table is vmrt's before the inet and bridge ones: removed wherever it is left
    return [line for family in ("ip", "inet", "bridge")
            for line in (_nf(f"table {family} %s", table), _nf(f"delete table {family} %s", table))]


def ruleset(table: str, networks: list[Network], endpoints: list[Endpoint], group: int) -> str:
    """vmrt's whole nftables tables for these networks and running endpoints (one transaction)."""
    try:
        return _ruleset(table, networks, endpoints, group)
    except ValueError as e:  # an address from the database that does not parse
        raise NetworkError(f"vmrt's network state is damaged: {e}"[:200]) from None


def _ruleset(table: str, networks: list[Network], endpoints: list[Endpoint], group: int) -> str:
    t = Ident(table)
    nets = sorted(networks, key=lambda n: n.bridge)
    by_id = {n.id: n for n in nets}
    bridges = tuple(IfName(n.bridge) for n in nets)
    eps = [ep for ep in endpoints if ep.network_id in by_id]
    nat, fwd, post = [], [], []
    for ep in eps:
        for p in ep.ports:
            to = (ipaddress.IPv4Address(ep.ip), Port(p.container_port))
            match = (_nf("ip daddr %s", ipaddress.IPv4Address(p.host_ip)) if p.host_ip else "meta nfproto ipv4")
            nat.append(match + _nf(" %s dport %s dnat ip to %s:%s comment %s", Proto(p.proto),
                                   Port(p.host_port), *to, Tag(ep.container_id[:12])))
    for n in nets:  # same network: accepted (bridged traffic passes here with br_netfilter)
        fwd.append(_nf("iifname %s oifname %s accept", IfName(n.bridge), IfName(n.bridge)))
    fwd.append("iifname @bridges oifname @bridges drop")  # between networks, published ports too
    for n in nets:
        br, subnet = IfName(n.bridge), ipaddress.IPv4Network(n.subnet)
        if n.internal:  # nothing in or out but its own bridge
            fwd += [_nf("iifname %s drop", br), _nf("oifname %s drop", br)]
        else:
            post.append(_nf("ip saddr %s oifname != %s masquerade", subnet, br))
    fwd.append("ct status dnat accept")  # what vmrt publishes
    for n in nets:
        if not n.internal:  # what a container starts outbound, from its network's own addresses
            fwd.append(_nf("iifname %s ip saddr %s accept", IfName(n.bridge), ipaddress.IPv4Network(n.subnet)))
    fwd.append("drop")
    post.append("oifname @bridges ip saddr 127.0.0.0/8 masquerade")
    inet = [
        _nf("table inet %s {", t),
        _nf("  set bridges { type ifname; elements = %s; }", bridges),
        "  chain ports {", *(f"    {r}" for r in nat), "  }",
        # loopback addresses are DNAT'd for the host's own connections only (output), never for
        # a packet that arrives (a port published on 127.0.0.1 is not reachable from elsewhere)
        "  chain prerouting {", "    type nat hook prerouting priority dstnat; policy accept;",
        "    ip daddr 127.0.0.0/8 return", "    ip6 daddr ::1 return",
        "    fib daddr type local jump ports", "  }",
        "  chain output {", "    type nat hook output priority -100; policy accept;",
        "    fib daddr type local jump ports", "  }",
        "  chain postrouting {", "    type nat hook postrouting priority srcnat; policy accept;",
        *(f"    {r}" for r in post), "  }",
        # CVE-2020-8558: the bridges have route_localnet=1 (for published ports reached from
        # 127.0.0.1), so a container could send to the host's loopback through its gateway:
        # nothing from a bridge to a loopback address, before NAT (replies to the host's own
        # connections arrive addressed to the bridge and become 127.0.0.1 only in NAT), and after
        # it unless DNAT'd (kube-proxy's rule)
        "  chain guard {", "    type filter hook prerouting priority raw; policy accept;",
        "    iifname @bridges ip daddr 127.0.0.0/8 drop", "    iifname @bridges ip6 daddr ::1 drop", "  }",
        "  chain input {", "    type filter hook input priority filter; policy accept;",
        "    iifname @bridges ip daddr 127.0.0.0/8 ct status dnat accept",
        "    iifname @bridges ip daddr 127.0.0.0/8 drop", "    iifname @bridges ip6 daddr ::1 drop", "  }",
        # forwarding to or from a bridge: only what is listed in guarded, the rest dropped
        "  chain forward {", "    type filter hook forward priority filter; policy accept;",
        "    iifname @bridges jump guarded", "    oifname @bridges jump guarded", "  }",
        "  chain guarded {", "    ct state established,related accept", *(f"    {r}" for r in fwd), "  }",
        "}",
    ]
    elements = tuple(_nf("%s : goto %s", IfName(ep.host_if), _chain_name(ep)) for ep in eps)
    bridge = [
        _nf("table bridge %s {", t),
        "  map ports {", "    type ifname : verdict;",
        *(["    elements = { " + ", ".join(elements) + " }"] if elements else []), "  }",
        # before the bridge learns a source address or forwards anything (priority -300)
        "  chain prerouting {", "    type filter hook prerouting priority -300; policy accept;",
        _nf("    meta iifgroup %s iifname vmap @ports", Group(group)),
        _nf("    meta iifgroup %s drop", Group(group)), "  }",
    ]
    for ep in eps:
        bridge += [_nf("  chain %s {", _chain_name(ep)), *(f"    {r}" for r in _endpoint_rules(ep)), "  }"]
    bridge.append("}")
    return "\n".join([*_delete_tables(t), *inet, *bridge]) + "\n"


def endpoint_rules(cfg: Config, eps: list[Endpoint]) -> None:
    """Add the anti-spoofing chains of a starting container's veths (idempotent: a chain a crash
    left is flushed first; a new chain costs ~0.5 ms, an existing one a kernel grace period). If
    the tables are gone (a firewall reload that flushed the ruleset: the bridge table is written
    with the inet one, and the first command fails without it), everything is rewritten."""
    if not eps:
        return
    t = Ident(table_name(cfg))
    script: list[str] = []
    for ep in eps:
        chain = _chain_name(ep)
        script += [_nf("add chain bridge %s %s", t, chain), _nf("flush chain bridge %s %s", t, chain),
                   *(_nf("add rule bridge %s %s ", t, chain) + r for r in _endpoint_rules(ep)),
                   _nf("add element bridge %s ports { %s : goto %s }", t, IfName(ep.host_if), chain)]
    try:
        _nft("\n".join(script) + "\n")
    except NetworkError:
        LOG.info("vmrt's nftables tables are missing or damaged: rewriting them")
        with locked(cfg), Store(cfg) as store:
            sync_rules(store)


def drop_endpoint_rules(cfg: Config, host_ifs: set[str]) -> None:
    """Remove the anti-spoofing chains of these veths, whether they exist or not."""
    t = Ident(table_name(cfg))
    script = []
    for name in sorted(host_ifs):
        ifname = IfName(name)
        chain = Ident("ep_" + ifname)
        script += [_nf("add chain bridge %s %s", t, chain),
                   _nf("add element bridge %s ports { %s : goto %s }", t, ifname, chain),
                   _nf("delete element bridge %s ports { %s }", t, ifname),
                   _nf("flush chain bridge %s %s", t, chain), _nf("delete chain bridge %s %s", t, chain)]
    if not script:
        return
    try:
        _nft("\n".join(script) + "\n")
    except NetworkError as e:  # no table: nothing to remove
        LOG.debug("no anti-spoofing chains removed: %s", e)


def sync_rules(store: Store) -> None:
    """Rewrite vmrt's nftables tables from the database (atomically: one nft transaction)."""
    table = table_name(store.cfg)
    networks = [n for n in store.networks() if _link_exists(n.bridge)]
    endpoints = store.live_endpoints()
    if not networks:
        _nft("\n".join(_delete_tables(Ident(table))) + "\n")
        return
    _nft(ruleset(table, networks, endpoints, port_group(store.cfg)))



# --- names: managed /etc files ------------------------------------------------------------

def _write_in_place(path: Path, text: str) -> None:
    """Rewrite a file keeping its inode (it is bind-mounted into running containers).
    0644 whatever the umask: any uid in the container reads it (its dir stays 0700: the
    container sees the file through its bind mount)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, fsmode.SHARED_FILE)
    try:
        os.fchmod(fd, fsmode.SHARED_FILE)
        data = text.encode()
        os.write(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def host_resolv() -> list[str]:
    try:
        return Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return []


def resolv_conf(req: NetRequest, host_mode: bool) -> str:
    """Docker's rules: --dns/--dns-search/--dns-option, else the host's file without loopback
    nameservers (unreachable from the container), else public resolvers."""
    lines = host_resolv()
    if host_mode and not (req.dns or req.dns_search or req.dns_options):
        return "\n".join(lines) + "\n"
    servers = req.dns or [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1
                          and not ln.split()[1].startswith(("127.", "::1"))]
    if not servers:
        servers = ["8.8.8.8", "8.8.4.4"]
    search = req.dns_search or [w for ln in lines if ln.startswith("search") for w in ln.split()[1:]]
    options = req.dns_options or [w for ln in lines if ln.startswith("options") for w in ln.split()[1:]]
    out = [f"nameserver {s}" for s in servers]
    if search and search != ["."]:
        out.append("search " + " ".join(search))
    if options:
        out.append("options " + " ".join(options))
    return "\n".join(out) + "\n"


HOSTS_HEAD = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def hosts_file(hostname: str, own: list[Endpoint], peers: list[Endpoint], extra_hosts: list[str],
               host_mode: bool) -> str:
    out = [HOSTS_HEAD.rstrip("\n")]
    if host_mode:
        with contextlib.suppress(OSError):
            out = [Path("/etc/hosts").read_text().rstrip("\n")]
    for h in extra_hosts:
        name, _, ip = h.partition(":")
        out.append(f"{ip}\t{name}")
    if own:
        out.append(f"{own[0].ip}\t{hostname}")
    elif not host_mode:
        out.append(f"127.0.1.1\t{hostname}")
    seen = set()
    for p in peers:
        names = [n for n in dict.fromkeys([p.name, *p.aliases, p.container_id[:12]]) if n]
        line = f"{p.ip}\t{' '.join(names)}"
        if line not in seen:
            seen.add(line)
            out.append(line)
    return "\n".join(out) + "\n"


# --- attach / detach ------------------------------------------------------------------------

@dataclasses.dataclass
class Attached:
    mode: str                  # none | host | bridge
    netns: Path | None
    endpoints: list[Endpoint]
    files: dict[str, Path]     # container path -> host file (bind-mounted)
    networks: dict[str, Network] = dataclasses.field(default_factory=dict)  # by id, those of endpoints
    rules_done: bool = False   # attach rewrote the tables (with this container's chains)
    _thread: threading.Thread | None = dataclasses.field(default=None, repr=False)
    _error: BaseException | None = dataclasses.field(default=None, repr=False)

    def primary(self) -> Endpoint | None:
        return self.endpoints[0] if self.endpoints else None

    def plumb_in_background(self, cfg: Config, isolation: str, pool_netns: Path | None = None) -> None:
        """Interfaces and tc (and a pooled VM's tap, moved from ``pool_netns``) in a thread: pyroute2's
        import and the netlink work overlap with ``runc create`` or the VM's boot. :meth:`wait` before
        the container's process may run."""
        def work() -> None:
            try:
                if pool_netns is not None and self.netns is not None:
                    adopt_tap(pool_netns, self.netns)
                plumb(cfg, self, isolation)
            except BaseException as e:  # noqa: B036 - raised again by wait()
                self._error = e
        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def wait(self, quiet: bool = False) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and not quiet:
            err, self._error = self._error, None
            raise err


def files_dir(run_dir: Path) -> Path:
    return run_dir / "net"


# the managed files stay writable inside the container (as under Docker), but on a tmpfs of their
# own: a container that writes without end fills these 256 KiB, never the host's /run
FILES_TMPFS = "size=256k,nr_inodes=16,mode=0700"
FILE_READ_MAX = 256 << 10  # vmrt reads them with this bound (the tmpfs's size)


def _read_managed(path: Path, limit: int = FILE_READ_MAX) -> str:
    """A managed file's text, read without following a link, from a regular file, at most
    ``limit`` bytes (the container may have written anything into it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data.decode()


def attach(cfg: Config, container_id: str, name: str, isolation: str, config: dict[str, Any],
           run_dir: Path) -> Attached:
    """Give a starting container its network: namespace, interfaces, address, rules, /etc files.
    Edits ``config`` (the run's bundle config): namespace path, managed-file mounts."""
    req = request_of(config)
    hostname = config.get("hostname") or container_id[:12]
    mode = req.network if req.network in ("none", "host") else "bridge"
    if mode == "host" and isolation == "vm":
        raise UsageError("--network host is for --isolation=process only: a VM has its own network stack")
    fdir = fsmode.private_dir(files_dir(run_dir))
    att = Attached(mode, None, [], {})
    ns = netns_path(cfg, container_id)
    linux = config.setdefault("linux", {})
    try:
        rootfs.mount_tmpfs(fdir, FILES_TMPFS)  # unmounted by detach (and with the run dir)
        if mode == "host":
            linux["namespaces"] = [n for n in linux.get("namespaces", []) if n.get("type") != "network"]
        else:
            remove_netns(ns)  # one a crash left
            create_netns(ns)
            att.netns = ns
            for n in linux.get("namespaces", []):
                if n.get("type") == "network":
                    n["path"] = str(ns)
        if mode == "bridge":
            with locked(cfg), Store(cfg) as store:
                nets = [store.get(n) for n in req.networks]
                if isolation == "vm" and len(nets) > 1:
                    raise UsageError("a VM container joins one network (its NIC is fixed at boot)")
                ports = _resolve_ports(store, req, config)
                made = False
                for i, net in enumerate(nets):
                    made |= ensure_bridge(net)
                    ep = _allocate(store, net, container_id, name, i, req, ports if i == 0 else [])
                    store.add_endpoint(ep)
                    att.endpoints.append(ep)
                    att.networks[net.id] = net
                if made or ports:  # the rules change with a new bridge or published ports only
                    sync_rules(store)  # (with this container's anti-spoofing chains)
                    att.rules_done = True
        _write_files(cfg, att, req, hostname, mode == "host", fdir)
        _mount_files(config, att)
        return att
    except BaseException:
        detach(cfg, container_id)
        raise


def plumb(cfg: Config, att: Attached, isolation: str) -> None:
    """Interfaces for the endpoints ``attach`` recorded (VM mode: after the driver made tap0)."""
    if not att.endpoints:
        return
    assert att.netns is not None
    if not att.rules_done:  # before its veths exist: a veth of vmrt's without its chain sends nothing
        endpoint_rules(cfg, att.endpoints)
    group = port_group(cfg)
    for i, ep in enumerate(att.endpoints):
        plumb_veth(att.networks[ep.network_id], ep, att.netns, isolation == "vm", default_route=i == 0,
                   group=group)
    if any(n.user for n in att.networks.values()):
        with locked(cfg), Store(cfg) as store:
            refresh_hosts(cfg, store)


def _allocate(store: Store, net: Network, cid: str, name: str, index: int, req: NetRequest,
              ports: list[PortMapping]) -> Endpoint:
    subnet = ipaddress.IPv4Network(net.subnet)
    used = {ipaddress.IPv4Address(net.gateway)} | {ipaddress.IPv4Address(e.ip)
                                                    for e in store.live_endpoints(network_id=net.id)}
    for host in subnet.hosts():
        if host not in used:
            ip = str(host)
            break
    else:
        raise NetworkError(f"no free address left in network {net.name} ({net.subnet})")
    aliases = list(req.aliases) if net.user else []
    return Endpoint(cid, net.id, ip, mac_for(ip), f"eth{index}", f"v{cid[:10]}{index}", aliases, name, ports)


def _resolve_ports(store: Store, req: NetRequest, config: dict[str, Any]) -> list[PortMapping]:
    """The container's published ports: -p as given, -P for every exposed port; a host port 0 gets
    a free one; a host port another container publishes or a host process listens on is refused."""
    ports = [dataclasses.replace(p) for p in req.ports]  # checked again (PortMapping)
    if req.publish_all:
        given = {p.key() for p in ports}
        for e in req.exposed:
            port, proto = split_exposed(e)
            if proto not in PROTOS:
                raise UsageError(f"-P: the container exposes {port}/{proto}, and vmrt publishes tcp and udp "
                                 "ports only (publish the others with -p, or run without -P)")
            if f"{port}/{proto}" not in given:
                given.add(f"{port}/{proto}")
                ports.append(PortMapping("", 0, port, proto))
    if len(ports) > MAX_PORTS:
        raise UsageError(f"more than {MAX_PORTS} published ports")
    taken = {(p.host_ip, p.host_port, p.proto) for ep in store.live_endpoints() for p in ep.ports}
    for p in ports:
        if p.host_port == 0:
            p.host_port = _free_port(p.proto, taken)
        clash = [t for t in taken if t[1] == p.host_port and t[2] == p.proto and (not t[0] or not p.host_ip
                                                                                   or t[0] == p.host_ip)]
        if clash:
            raise NetworkError(f"Bind for {p.host_ip or '0.0.0.0'}:{p.host_port} failed: port is already allocated")
        _check_bindable(p.host_ip, p.host_port, p.proto)
        taken.add((p.host_ip, p.host_port, p.proto))
    return ports


def _free_port(proto: str, taken: set[tuple[str, int, str]]) -> int:
    lo, hi = 32768, 60999
    with contextlib.suppress(OSError, ValueError):
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        port = random.randint(lo, hi)
        if any(t[1] == port and t[2] == proto for t in taken):
            continue
        try:
            _check_bindable("", port, proto)
        except NetworkError:
            continue
        return port
    raise NetworkError("no free host port found for -P")


def _check_bindable(host_ip: str, port: int, proto: str) -> None:
    """A host process listening on the port would be shadowed by the DNAT rule: refuse, as Docker's
    proxy fails to bind."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host_ip or "0.0.0.0", port))
        except OSError as e:
            raise NetworkError(f"Bind for {host_ip or '0.0.0.0'}:{port} failed: {e.strerror}") from None


def _write_files(cfg: Config, att: Attached, req: NetRequest, hostname: str, host_mode: bool, fdir: Path) -> None:
    peers: list[Endpoint] = []
    if att.endpoints:
        with Store(cfg) as store:
            user_nets = {n.id for n in store.networks() if n.user}
            mine = {ep.network_id for ep in att.endpoints if ep.network_id in user_nets}
            cid = att.endpoints[0].container_id
            for nid in mine:
                peers += [e for e in store.live_endpoints(network_id=nid) if e.container_id != cid]
    files = {"/etc/hosts": hosts_file(hostname, att.endpoints, peers, req.extra_hosts, host_mode),
             "/etc/resolv.conf": resolv_conf(req, host_mode),
             "/etc/hostname": hostname + "\n"}
    for target, text in files.items():
        p = fdir / Path(target).name
        _write_in_place(p, text)
        att.files[target] = p
    fsmode.write_private(fdir / "request.json", req.to_json())


def _mount_files(config: dict[str, Any], att: Attached) -> None:
    mounts = config.setdefault("mounts", [])
    targets = {m.get("destination") for m in mounts}
    for target, src in att.files.items():
        if target in targets:  # a user volume on /etc/hosts wins, as in Docker
            continue
        mounts.append({"destination": target, "type": "bind", "source": str(src),
                       "options": ["rbind", "rprivate"], "org.vmrt.managed": True})


def refresh_hosts(cfg: Config, store: Store) -> None:
    """Rewrite the hosts file of every running container on a user network (names come and go)."""
    eps = store.live_endpoints()
    user_nets = {n.id for n in store.networks() if n.user}
    by_container: dict[str, list[Endpoint]] = {}
    for ep in eps:
        by_container.setdefault(ep.container_id, []).append(ep)
    for cid, own in by_container.items():
        fdir = files_dir(cfg.run_root / "containers" / cid)
        try:
            req = NetRequest.from_json(_read_managed(fdir / "request.json"))
            # the container can write its /etc/hostname: bounded, its first line only
            hostname = _read_managed(fdir / "hostname", 4096).partition("\n")[0].strip()
        except (OSError, ValueError, VmrtError):
            continue
        if not hostname:
            continue
        nets = {ep.network_id for ep in own if ep.network_id in user_nets}
        peers = [e for e in eps if e.network_id in nets and e.container_id != cid]
        with contextlib.suppress(OSError):
            _write_in_place(fdir / "hosts", hosts_file(hostname, own, peers, req.extra_hosts, False))


def detach(cfg: Config, container_id: str) -> None:
    """Undo attach, whatever of it was done (also for a container whose owner died, or after a
    reboot): interfaces, namespace, addresses, rules, names. Idempotent."""
    ns = netns_path(cfg, container_id)
    with contextlib.suppress(VmrtError):  # the managed files' tmpfs (attach mounted it)
        rootfs.umount(files_dir(cfg.run_root / "containers" / container_id))
    with locked(cfg), Store(cfg) as store:
        eps = store.endpoints(container_id=container_id)
        # the namespace goes first: with nothing else holding it the kernel destroys it and its veths
        remove_netns(ns)
        for name in {*(ep.host_if for ep in eps), *(f"v{container_id[:10]}{i}" for i in range(4))}:
            for _ in range(20):  # the kernel's namespace cleanup runs asynchronously
                if not _link_exists(name):
                    break
                time.sleep(0.005)
            else:
                delete_link(name)
        store.drop_endpoints(container_id)
        if any(ep.ports for ep in eps):
            sync_rules(store)  # without its ports and its anti-spoofing chains
        elif eps:  # its chains (and any a crash left under its veth names)
            drop_endpoint_rules(cfg, {*(ep.host_if for ep in eps), *(f"v{container_id[:10]}{i}" for i in range(16))})
        user = {n.id for n in store.networks() if n.user}
        if any(ep.network_id in user for ep in eps):
            refresh_hosts(cfg, store)


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def remove_network(cfg: Config, ref: str) -> str:
    with locked(cfg), Store(cfg) as store:
        net = store.get(ref)
        if net.builtin:
            raise UsageError(f"{net.name} is a pre-defined network and cannot be removed")
        if store.live_endpoints(network_id=net.id):
            raise NetworkError(f"error while removing network: network {net.name} id {net.id} has active endpoints")
        if _link_exists(net.bridge):
            delete_link(net.bridge)
        store.remove_network(net)
        sync_rules(store)
        return net.name


def connect_live(cfg: Config, container_id: str, name: str, ref: str, aliases: list[str]) -> None:
    """``network connect`` for a running process-mode container: one more veth (eth1...)."""
    ns = netns_path(cfg, container_id)
    if not ns.exists():
        raise NetworkError("the container has no network namespace of vmrt's (--network host or none?)")
    with locked(cfg), Store(cfg) as store:
        net = store.get(ref)
        own = store.live_endpoints(container_id=container_id)
        if any(ep.network_id == net.id for ep in own):
            raise NetworkError(f"container {name} is already connected to network {net.name}")
        ensure_bridge(net)
        req = NetRequest(aliases=aliases)
        ep = _allocate(store, net, container_id, name, _next_index(own), req, [])
        store.add_endpoint(ep)
        try:
            sync_rules(store)  # its anti-spoofing chain before its veth is on the bridge
            plumb_veth(net, ep, ns, vm=False, default_route=not own, group=port_group(cfg))
        except BaseException:
            store.drop_endpoints(container_id, net.id)
            delete_link(ep.host_if)
            sync_rules(store)
            raise
        refresh_hosts(cfg, store)


def _next_index(own: list[Endpoint]) -> int:
    used = {int(ep.ifname[3:]) for ep in own if ep.ifname.startswith("eth") and ep.ifname[3:].isdigit()}
    return next(i for i in range(16) if i not in used)


def disconnect_live(cfg: Config, container_id: str, ref: str) -> None:
    with locked(cfg), Store(cfg) as store:
        net = store.get(ref)
        eps = [ep for ep in store.live_endpoints(container_id=container_id) if ep.network_id == net.id]
        if not eps:
            raise NetworkError(f"container is not connected to network {net.name}")
        delete_link(eps[0].host_if)
        store.drop_endpoints(container_id, net.id)
        sync_rules(store)
        refresh_hosts(cfg, store)


def settings(cfg: Config, container_id: str, req: NetRequest) -> dict[str, Any]:
    """``inspect``'s NetworkSettings: addresses while it runs, ports as published."""
    with Store(cfg) as store:
        eps = store.live_endpoints(container_id=container_id)
        names = {n.id: n for n in store.networks()}
    nets: dict[str, Any] = {}
    ports: dict[str, Any] = {}
    for ep in eps:
        n = names.get(ep.network_id)
        if n is None:
            continue
        nets[n.name] = {"NetworkID": n.id, "IPAddress": ep.ip, "Gateway": n.gateway,
                        "IPPrefixLen": ipaddress.IPv4Network(n.subnet).prefixlen, "MacAddress": ep.mac,
                        "Aliases": ep.aliases or None}
        for p in ep.ports:
            ports.setdefault(p.key(), []).append({"HostIp": p.host_ip or "0.0.0.0", "HostPort": str(p.host_port)})
    if not eps:
        for name in req.networks:
            nets[name] = {"IPAddress": "", "Gateway": "", "MacAddress": ""}
    first = eps[0] if eps else None
    return {"Networks": nets, "Ports": ports, "IPAddress": first.ip if first else "",
            "Gateway": names[first.network_id].gateway if first and first.network_id in names else "",
            "MacAddress": first.mac if first else "",
            "SandboxKey": str(netns_path(cfg, container_id)) if eps else ""}


def port_lines(cfg: Config, container_id: str, which: str | None) -> list[str]:
    """``vmrt port C [PORT[/PROTO]]``."""
    with Store(cfg) as store:
        eps = store.live_endpoints(container_id=container_id)
    want = None
    if which:
        port, proto = split_exposed(parse_exposed(which, f"port {which[:32]}", PROTOS)[0])
        want = f"{port}/{proto}"
    out = []
    for ep in eps:
        for p in sorted(ep.ports, key=lambda p: (p.container_port, p.proto)):
            if want and p.key() != want:
                continue
            host = f"{p.host_ip or '0.0.0.0'}:{p.host_port}"
            out.append(host if want else f"{p.key()} -> {host}")
    if want and not out:
        raise NetworkError(f"no public port '{want}' published for {container_id[:12]}")
    return out
