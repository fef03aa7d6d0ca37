"""Networks and the endpoints of running containers in the state database, and the
host-wide lock that every change to addresses, interfaces or rules is made under."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import secrets
import socket
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import fsmode
from ..config import Config
from ..errors import NetworkError, UsageError
from .netns import netns_path
from .parse import PortMapping

BUILTIN = ("none", "host", "bridge")


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
    subnet6: str = ""     # an --ipv6 network's IPv6 subnet ("": IPv4 only, as the default bridge)
    gateway6: str = ""    # ... and the bridge's IPv6 address in it

    @property
    def ipv6(self) -> bool:
        return bool(self.subnet6)

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN

    @property
    def user(self) -> bool:
        return not self.builtin

    def inspect(self, containers: dict[str, dict[str, str]]) -> dict[str, Any]:
        ipam = [{"Subnet": self.subnet, "Gateway": self.gateway}]
        if self.ipv6:
            ipam.append({"Subnet": self.subnet6, "Gateway": self.gateway6})
        return {"Name": self.name, "Id": self.id, "Created": _iso(self.created), "Scope": "local",
                "Driver": "bridge", "EnableIPv6": self.ipv6, "IPAM": {"Driver": "default", "Config": ipam},
                # as Docker: the default network names its bridge in Options, a user network made
                # without options has none (Compose compares them with what it asked for)
                "Internal": self.internal,
                "Options": {"com.docker.network.bridge.name": self.bridge} if self.builtin else {},
                "VmrtBridge": self.bridge, "Labels": self.labels, "Containers": containers}


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
    ip6: str = ""         # its IPv6 address on an --ipv6 network ("": none)


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
            labels TEXT NOT NULL DEFAULT '{}', subnet6 TEXT NOT NULL DEFAULT '',
            gateway6 TEXT NOT NULL DEFAULT '')""")
        self.db.execute("""CREATE TABLE IF NOT EXISTS endpoints (
            container_id TEXT NOT NULL, network_id TEXT NOT NULL, ip TEXT NOT NULL, mac TEXT NOT NULL,
            ifname TEXT NOT NULL, host_if TEXT NOT NULL, aliases TEXT NOT NULL, name TEXT NOT NULL,
            ports TEXT NOT NULL, ip6 TEXT NOT NULL DEFAULT '', PRIMARY KEY (container_id, network_id))""")
        self._migrate()

    def _migrate(self) -> None:
        """A database of an older vmrt lacks the IPv6 columns: added (empty: IPv4 only), appended
        after the others so that rows read positionally keep their order."""
        for table, columns in (("networks", ("subnet6", "gateway6")), ("endpoints", ("ip6",))):
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column in have:
                    continue
                try:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
                except sqlite3.OperationalError as e:  # another vmrt added it meanwhile
                    if "duplicate column" not in str(e):
                        raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @staticmethod
    def _net(r: tuple) -> Network:
        return Network(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], json.loads(r[7]), r[8], r[9])

    def networks(self) -> list[Network]:
        self._ensure_default()
        return [self._net(r) for r in self.db.execute("SELECT * FROM networks ORDER BY created")]

    def _ensure_default(self) -> None:
        if self.db.execute("SELECT 1 FROM networks WHERE name='bridge'").fetchone():
            return
        net = ipaddress.IPv4Network(self.cfg.network_subnet, strict=False)
        with contextlib.suppress(sqlite3.IntegrityError):
            self.db.execute("INSERT INTO networks VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (secrets.token_hex(32), "bridge", str(net), str(net.network_address + 1),
                             self.cfg.network_bridge, 0, time.time(), "{}", "", ""))

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

    def create(self, name: str, subnets: Sequence[str], gateways: Sequence[str], internal: bool,
               labels: dict[str, str], ipv6: bool = False) -> Network:
        """A user network: an IPv4 subnet (given or a free one of the pool) and, with ``ipv6``, an
        IPv6 one (given, or a random ULA /64 as Docker's default pool gives). ``--subnet`` and
        ``--gateway`` may be repeated, one of each family (Docker's flags)."""
        if name in BUILTIN:
            raise UsageError(f"{name} is a pre-defined network and cannot be created")
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}", name):
            raise UsageError(f"invalid network name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        self._ensure_default()
        given4, given6 = _by_family(subnets, "--subnet", _subnet)
        gw4, gw6 = _by_family(gateways, "--gateway", _address)
        if given6 and not ipv6:
            raise UsageError(f"--subnet {given6}: an IPv6 subnet needs --ipv6")
        if gw6 and not given6:
            raise UsageError(f"--gateway {gw6}: give the IPv6 --subnet it belongs to")
        nets = self.networks()
        used = [ipaddress.IPv4Network(n.subnet) for n in nets]
        if given4:
            net = ipaddress.IPv4Network(given4)
            if net.prefixlen > 30:
                raise UsageError(f"--subnet {given4}: too small (at most /30)")
            if any(net.overlaps(u) for u in used):
                raise NetworkError(f"Pool overlaps with other one on this address space: {net}")
        else:
            net = self._free_subnet(used)
        if gw4:
            gw = ipaddress.IPv4Address(gw4)
            if gw not in net or gw in (net.network_address, net.broadcast_address):
                raise UsageError(f"--gateway {gw4} is not a host address of {net}")
        else:
            gw = net.network_address + 1
        check_host_overlap(net)
        subnet6 = gateway6 = ""
        if ipv6:
            used6 = [ipaddress.IPv6Network(n.subnet6) for n in nets if n.subnet6]
            net6 = _check_subnet6(ipaddress.IPv6Network(given6), used6) if given6 else _free_subnet6(used6)
            g6 = ipaddress.IPv6Address(gw6) if gw6 else net6.network_address + 1
            if g6 not in net6 or g6 == net6.network_address:
                raise UsageError(f"--gateway {gw6} is not a host address of {net6}")
            subnet6, gateway6 = str(net6), str(g6)
        nid = secrets.token_hex(32)
        row = (nid, name, str(net), str(gw), "vmbr" + nid[:10], int(internal), time.time(), json.dumps(labels),
               subnet6, gateway6)
        try:
            self.db.execute("INSERT INTO networks VALUES (?,?,?,?,?,?,?,?,?,?)", row)
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
                                [PortMapping(**p) for p in json.loads(r[8])], r[9]))
        return out

    def add_endpoint(self, ep: Endpoint) -> None:
        self.db.execute("INSERT OR REPLACE INTO endpoints VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (ep.container_id, ep.network_id, ep.ip, ep.mac, ep.ifname, ep.host_if,
                         json.dumps(ep.aliases), ep.name, json.dumps([dataclasses.asdict(p) for p in ep.ports]),
                         ep.ip6))

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


def check_host_overlap(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    hosts: list[ipaddress.IPv4Network] | list[ipaddress.IPv6Network] = (
        _host_networks() if net.version == 4 else _host_networks6())
    for h in hosts:
        if net.overlaps(h):
            raise NetworkError(f"subnet {net} overlaps the host's route to {h}: choose another --subnet")


def _subnet(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise UsageError(f"invalid --subnet {text[:64]!r}: {e}") from None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"invalid --gateway {text[:64]!r}") from None


def _by_family(values: Sequence[str], flag: str,
               parse: Callable[[str], ipaddress.IPv4Network | ipaddress.IPv6Network
                               | ipaddress.IPv4Address | ipaddress.IPv6Address]) -> tuple[str, str]:
    """Repeated --subnet/--gateway values: at most one IPv4 and one IPv6 (canonical text each)."""
    out = {4: "", 6: ""}
    for text in values:
        v = parse(text)
        if out[v.version]:
            raise UsageError(f"{flag}: one IPv{v.version} value only ({out[v.version]} and {v})")
        out[v.version] = str(v)
    return out[4], out[6]


def _check_subnet6(net: ipaddress.IPv6Network, used: list[ipaddress.IPv6Network]) -> ipaddress.IPv6Network:
    """A given IPv6 subnet: a unicast /64 or larger (neighbour discovery and SLAAC's size), apart
    from vmrt's other networks and the host's own routes."""
    if net.prefixlen > 64:
        raise UsageError(f"--subnet {net}: too small for IPv6 (at most /64)")
    if (net.is_multicast or net.is_link_local or net.is_site_local or net.is_loopback
            or net.overlaps(ipaddress.IPv6Network("::/8"))):
        raise UsageError(f"--subnet {net}: not a unicast IPv6 subnet (use a global or a ULA fd00::/8 one)")
    if any(net.overlaps(u) for u in used):
        raise NetworkError(f"Pool overlaps with other one on this address space: {net}")
    check_host_overlap(net)
    return net


def _free_subnet6(used: list[ipaddress.IPv6Network]) -> ipaddress.IPv6Network:
    """A random ULA /64 (RFC 4193: fd, a random 40-bit global ID, subnet 0), Docker's default pool."""
    for _ in range(16):
        prefix = 0xFD << 120 | secrets.randbits(40) << 80
        cand = ipaddress.IPv6Network((prefix, 64))
        if not any(cand.overlaps(u) for u in used + _host_networks6()):
            return cand
    raise NetworkError("no free IPv6 subnet found for --ipv6: give one with --subnet")


def _host_networks6() -> list[ipaddress.IPv6Network]:
    """The host's IPv6 routes (/proc/net/ipv6_route) but the default, link-local and multicast ones."""
    nets = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            f = line.split()
            if len(f) < 10 or int(f[1], 16) == 0:
                continue
            with contextlib.suppress(ValueError):
                net = ipaddress.IPv6Network((int(f[0], 16), int(f[1], 16)), strict=False)
                if not (net.is_link_local or net.is_multicast or net.is_loopback):
                    nets.append(net)
    return nets


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
