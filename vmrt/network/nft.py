"""vmrt's nftables rules: NAT, published ports, forwarding, the loopback guard, anti-spoofing.

Two tables per state root, rewritten whole from the database (sync_rules) when a bridge
is made, ports are published or a network goes; a container's own anti-spoofing chain is
added when it starts and removed when it stops (endpoint_rules / drop_endpoint_rules).

No text from an image, a flag or the state database is pasted into a script: every value
is parsed into a typed object first (ints, ipaddress objects, names checked against a
strict pattern) and _lit checks it again where it is written (a plain str, or a value
that no longer matches, is a bug and stops the write).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import logging
import re
import subprocess
import threading
from typing import Any

from ..config import Config
from ..errors import NetworkError
from .netns import link_exists
from .parse import PROTOS
from .store import Endpoint, Network, Store, locked

LOG = logging.getLogger(__name__)
TABLE = "vmrt"


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


class Raw(int):
    """A raw payload value of ``bits`` bits (16, 48 or 128), written in hex: for the fields nft
    1.0.6 (Debian 12) has no typed name for (an ND message's target, its link-layer option)."""

    bits = 0

    def __new__(cls, value: int, bits: int) -> Raw:
        if type(value) is not int or bits not in (16, 48, 128) or not 0 <= value < 1 << bits:
            raise NetworkError(f"invalid {bits}-bit value {value!r} for nftables")
        obj = super().__new__(cls, value)
        obj.bits = bits
        return obj

_ADDRESSES = (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network)


def _lit(v: object) -> str:
    """One value for an nft script, checked at the point it is pasted in."""
    if isinstance(v, _Checked):
        if not _PATTERNS[v.what].fullmatch(v):
            raise NetworkError(f"bug: {v.what} {str(v)[:40]!r} changed after it was checked")
        return f'"{v}"' if v.quoted else str(v)
    if isinstance(v, Port) and 0 < v < 65536 or isinstance(v, Group) and 0 < v < 1 << 32:
        return str(int(v))
    if isinstance(v, Raw) and v.bits in (16, 48, 128) and 0 <= v < 1 << v.bits:
        return f"0x{int(v):0{v.bits // 4}x}"
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
_import_lock = threading.Lock()


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


def link_local(mac: str) -> ipaddress.IPv6Address:
    """The EUI-64 link-local address the kernel gives an interface with this MAC (RFC 4291)."""
    b = bytearray(bytes.fromhex(Mac(mac).replace(":", "")))
    b[0] ^= 0x02
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + bytes(b[:3]) + b"\xff\xfe" + bytes(b[3:]))


def _endpoint_rules(ep: Endpoint) -> list[str]:
    """Anti-spoofing for one host-side veth: frames from it carry the container's MAC; ARP and IPv4
    carry its MAC and address. IPv6 only on an --ipv6 network (elsewhere the container's interface
    has IPv6 off, as Docker's; nothing IPv6 passes): see _ipv6_rules. Nothing else passes."""
    mac, ip = Mac(ep.mac), ipaddress.IPv4Address(ep.ip)
    return [_nf("ether saddr != %s drop", mac),
            _nf("arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether %s arp saddr ip %s accept", mac, ip),
            _nf("ip saddr %s accept", ip),
            *(_ipv6_rules(mac, ipaddress.IPv6Address(ep.ip6)) if ep.ip6 else []),
            "drop"]


def _ipv6_rules(mac: Mac, ip6: ipaddress.IPv6Address) -> list[str]:
    """IPv6 from a container on an --ipv6 network: from its own address or its own EUI-64 link-local
    only (``::`` only for duplicate address detection of one of them); no router advertisement or
    redirect at all; a neighbour solicitation or advertisement carries no extension header and no
    option but a link-layer address option with its own MAC, and an advertisement is for one of its
    own addresses. nft 1.0.6 has no name for the target and the option: raw payload offsets into
    the ICMPv6 message (the target at bit 64, the option's type and length at 192, its MAC at 208)."""
    own = (ip6, link_local(mac))
    targets = tuple(Raw(int(a), 128) for a in own)
    nd = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }"
    return ["icmpv6 type { nd-router-advert, nd-redirect } drop",
            _nf("ip6 saddr :: ip6 nexthdr ipv6-icmp icmpv6 type nd-neighbor-solicit @th,64,128 %s accept", targets),
            _nf("ip6 saddr != %s drop", own),
            _nf("icmpv6 type nd-neighbor-advert @th,64,128 != %s drop", targets),
            nd + " ip6 nexthdr ipv6-icmp ip6 length 24 accept",
            _nf(nd + " ip6 nexthdr ipv6-icmp ip6 length 32 @th,192,16 %s @th,208,48 %s accept",
                (Raw(0x0101, 16), Raw(0x0201, 16)), Raw(int(mac.replace(":", ""), 16), 48)),
            nd + " drop",
            "ether type ip6 accept"]


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


def endpoint_rules(cfg: Config, eps: list[Endpoint], store: Store | None = None) -> None:
    """Add the anti-spoofing chains of a starting container's veths (idempotent: a chain a crash
    left is flushed first; a new chain costs ~0.5 ms, an existing one a kernel grace period). If
    the tables are gone (a firewall reload that flushed the ruleset: the bridge table is written
    with the inet one, and the first command fails without it), everything is rewritten
    (from ``store``, when the caller holds the network lock with it open)."""
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
        if store is not None:
            sync_rules(store)
            return
        with locked(cfg), Store(cfg) as own:
            sync_rules(own)


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
    networks = [n for n in store.networks() if link_exists(n.bridge)]
    endpoints = store.live_endpoints()
    if not networks:
        _nft("\n".join(_delete_tables(Ident(table))) + "\n")
        return
    _nft(ruleset(table, networks, endpoints, port_group(store.cfg)))
