"""Issue 16, part 1: ``--ipv6`` networks as Docker's, in both isolations.

A network made with ``vmrt network create --ipv6 [--subnet V6]`` gives its bridge an IPv6 gateway
address and each container an IPv6 address and default route (process mode: netlink in the
container's namespace; VM mode: the agent's NET6 record). On a network without IPv6 the
container's eth0 has IPv6 off in both modes (Docker's). The anti-spoofing chain lets IPv6 out of
a container only from its own addresses, and no router advertisement or forged neighbour
advertisement at all. Frames are forged with test_hostile_network's helpers.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sqlite3
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, SLOT, Vmrt, one_line_error
from test_hostile_network import Capture, _csum, detach, ether, mac_bytes, rm, send_frames, settings

from vmrt import network
from vmrt.agent import protocol as P
from vmrt.config import Config
from vmrt.errors import ProtocolError

N = int(SLOT or 0)
SUBNET6 = f"fd76:{N}:1::/64"        # this slot's: parallel runs never share one
GW6 = f"fd76:{N}:1::1"
MODES = ["process", pytest.param("vm", marks=pytest.mark.vm)]


@pytest.fixture
def vmrt(vmrt: Vmrt) -> Iterator[Vmrt]:
    """conftest's, plus: a failed test's containers and networks go before the leak check."""
    yield vmrt
    vmrt.remove_all()


@pytest.fixture
def net6(vmrt: Vmrt) -> Iterator[str]:
    r = vmrt("network", "create", "--ipv6", "--subnet", SUBNET6, "net6")
    assert r.returncode == 0, r.stderr
    yield "net6"
    vmrt("network", "rm", "net6")


def sh(v: Vmrt, cid: str, script: str) -> str:
    r = v("exec", cid, "sh", "-c", script)
    assert r.returncode == 0, (script, r.stdout, r.stderr)
    return r.stdout.decode()


def bridge_of(v: Vmrt, name: str) -> str:
    r = v("network", "inspect", name)
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)[0]["VmrtBridge"])


# --- the NET6 record, both sides ------------------------------------------------------------------

NET = P.NetSpec("10.0.0.2", 24, "10.0.0.1", "02:56:0a:00:00:02", 1500)
NET6 = P.Net6Spec("fd00:1::2", 64, "fd00:1::1")

HARNESS = r"""
#include <stdio.h>
#include "proto.h"
static struct vmrt_run run;
static uint8_t buf[VMRT_MAX_PAYLOAD + 1];
int main(void)
{
	char err[256];
	size_t n = fread(buf, 1, sizeof buf, stdin);
	if (vmrt_run_parse(buf, n, &run, err, sizeof err) < 0) {
		printf("error %s\n", err);
		return 0;
	}
	if (!run.has_net6) {
		printf("none\n");
		return 0;
	}
	for (int i = 0; i < 16; i++) printf("%02x", run.net6_addr[i]);
	printf(" %u ", run.net6_prefix);
	for (int i = 0; i < 16; i++) printf("%02x", run.net6_gw[i]);
	printf("\n");
	return 0;
}
"""


@pytest.fixture(scope="module")
def agent_parser(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's own RUN parser (guest-agent/proto.c) behind a stdin/stdout driver."""
    d = tmp_path_factory.mktemp("proto")
    (d / "h.c").write_text(HARNESS)
    subprocess.run(["gcc", "-std=c11", "-D_GNU_SOURCE", "-I", str(REPO / "guest-agent"), "-o", str(d / "parse"),
                    str(d / "h.c"), str(REPO / "guest-agent/proto.c")], check=True)
    return d / "parse"


def agent_says(parser: Path, payload: bytes) -> str:
    return subprocess.run([str(parser)], input=payload, capture_output=True, check=True).stdout.decode().strip()


def payload(*records: tuple[int, bytes]) -> bytes:
    return struct.pack(">BI", P.Tag.ARG, 2) + b"sh" + b"".join(struct.pack(">BI", t, len(v)) + v for t, v in records)


def test_net6_record_is_checked_alike_by_host_and_agent(agent_parser: Path) -> None:
    """Tag 26: 16-byte address, prefix, 16-byte gateway (zero: none), after NET; the host's encoder
    and decoder and the agent's parser take and refuse the same records, with the same words."""
    assert P.Tag.NET6 == 26
    value = P.encode_net6(NET6)
    assert value == ipaddress.IPv6Address("fd00:1::2").packed + b"\x40" + ipaddress.IPv6Address("fd00:1::1").packed
    frame = P.encode_run(P.RunSpec(args=["sh"], net=NET, net6=NET6))
    assert frame.endswith(struct.pack(">BI", 26, 33) + value)
    spec = P.decode_run(frame[8:])
    assert spec.net6 == NET6 and spec.net == NET
    assert agent_says(agent_parser, frame[8:]) == f"{value[:16].hex()} 64 {value[17:].hex()}"
    nogw = P.Net6Spec("2001:db8::5", 48, None)
    rec = payload((P.Tag.NET, P.encode_net(NET)), (P.Tag.NET6, P.encode_net6(nogw)))
    assert P.decode_run(rec).net6 == nogw
    assert agent_says(agent_parser, rec) == f"{ipaddress.IPv6Address('2001:db8::5').packed.hex()} 48 {'00' * 16}"
    assert agent_says(agent_parser, payload((P.Tag.NET, P.encode_net(NET)))) == "none"
    # bad records: refused on both sides
    addr, gw = value[:16], value[17:]
    bad = {
        "must be 33 bytes": [value[:32], value + b"\0"],
        "address must be unicast": [bytes(16) + b"\x40" + gw, ipaddress.IPv6Address("::1").packed + b"\x40" + gw,
                                    ipaddress.IPv6Address("ff02::1").packed + b"\x40" + gw],
        "prefix must be 1..128": [addr + b"\0" + gw, addr + b"\x81" + gw],
        "gateway must be unicast": [addr + b"\x40" + ipaddress.IPv6Address("ff02::2").packed,
                                    addr + b"\x40" + ipaddress.IPv6Address("::1").packed],
    }
    for words, values in bad.items():
        for v in values:
            rec = payload((P.Tag.NET, P.encode_net(NET)), (P.Tag.NET6, v))
            with pytest.raises(ProtocolError, match=re.escape(words)):
                P.decode_run(rec)
            said = agent_says(agent_parser, rec)
            assert said.startswith("error RUN NET6") and (words in said or "wrong size" in said), said
    twice = payload((P.Tag.NET, P.encode_net(NET)), (P.Tag.NET6, value), (P.Tag.NET6, value))
    with pytest.raises(ProtocolError, match="more than one NET6 record"):
        P.decode_run(twice)
    assert agent_says(agent_parser, twice) == "error more than one NET6 record"
    alone = payload((P.Tag.NET6, value))
    with pytest.raises(ProtocolError, match="NET6 without NET"):
        P.decode_run(alone)
    assert agent_says(agent_parser, alone) == "error RUN NET6 without NET"
    with pytest.raises(ProtocolError, match="NET6 without NET"):
        P.encode_run(P.RunSpec(args=["sh"], net6=NET6))
    for wrong in (P.Net6Spec("10.0.0.2", 64, None), P.Net6Spec("fd00::2", 129, None),
                  P.Net6Spec("fd00::2", 64, "::"), P.Net6Spec("ff05::2", 64, None)):
        with pytest.raises(ProtocolError):
            P.encode_net6(wrong)
    # an EXEC ignores it, as the other RUN-only tags
    assert P.decode_exec(payload((P.Tag.NET6, value))) == P.ExecSpec(args=["sh"])


# --- state -----------------------------------------------------------------------------------------

def test_an_older_database_without_the_ipv6_columns_still_loads(tmp_path: Path) -> None:
    """A state database of a vmrt before IPv6 (no subnet6/gateway6/ip6 columns) is migrated when
    opened: its networks and endpoints load as IPv4-only, and an --ipv6 network can be made."""
    cfg = Config(root=tmp_path / "root", run_root=tmp_path / "run")
    cfg.db_path.parent.mkdir(parents=True)
    db = sqlite3.connect(cfg.db_path)
    db.execute("""CREATE TABLE networks (id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, subnet TEXT NOT NULL,
                  gateway TEXT NOT NULL, bridge TEXT NOT NULL, internal INTEGER NOT NULL DEFAULT 0,
                  created REAL NOT NULL, labels TEXT NOT NULL DEFAULT '{}')""")
    db.execute("""CREATE TABLE endpoints (container_id TEXT NOT NULL, network_id TEXT NOT NULL, ip TEXT NOT NULL,
                  mac TEXT NOT NULL, ifname TEXT NOT NULL, host_if TEXT NOT NULL, aliases TEXT NOT NULL,
                  name TEXT NOT NULL, ports TEXT NOT NULL, PRIMARY KEY (container_id, network_id))""")
    db.execute("INSERT INTO networks VALUES (?,?,?,?,?,?,?,?)",
               ("a" * 64, "old", "10.99.0.0/24", "10.99.0.1", "vmbraaaaaaaaaa", 0, 1.0, '{"k": "v"}'))
    db.execute("INSERT INTO endpoints VALUES (?,?,?,?,?,?,?,?,?)",
               ("c" * 64, "a" * 64, "10.99.0.2", "02:56:0a:63:00:02", "eth0", "vcccccccccc0", "[]", "c", "[]"))
    db.commit()
    db.close()
    with network.Store(cfg) as store:
        old = store.get("old")
        assert (old.subnet, old.labels, old.ipv6, old.subnet6) == ("10.99.0.0/24", {"k": "v"}, False, "")
        assert old.inspect({})["EnableIPv6"] is False and len(old.inspect({})["IPAM"]["Config"]) == 1
        (ep,) = store.endpoints(network_id=old.id)
        assert (ep.ip, ep.ip6) == ("10.99.0.2", "")
        new = store.create("new", [f"10.98.{N}.0/24", f"fd76:{N}:99::/64"], [], False, {}, ipv6=True)
        assert (new.subnet6, new.gateway6) == (f"fd76:{N}:99::/64", f"fd76:{N}:99::1")
    with network.Store(cfg) as store:  # opened again: nothing more to migrate, the rows as written
        assert store.get("new").gateway6 == f"fd76:{N}:99::1" and store.get("old").gateway6 == ""


# --- network create, inspect, rm -----------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (("--subnet", f"10.{230 + N}.1.0/24", "--subnet", f"10.{230 + N}.2.0/24"), "one IPv4 value only"),
    (("--ipv6", "--subnet", f"fd76:{N}:2::/64", "--subnet", f"fd76:{N}:3::/64"), "one IPv6 value only"),
    (("--subnet", f"fd76:{N}:2::/64"), "an IPv6 subnet needs --ipv6"),
    (("--ipv6", "--subnet", f"fd76:{N}:2::/80"), "too small for IPv6 (at most /64)"),
    (("--ipv6", "--subnet", "fe80::/64"), "not a unicast IPv6 subnet"),
    (("--ipv6", "--subnet", "ff05::/64"), "not a unicast IPv6 subnet"),
    (("--ipv6", "--subnet", f"fd76:{N}:2::/64", "--gateway", f"fd76:{N}:3::1"), "is not a host address of"),
    (("--ipv6", "--gateway", f"fd76:{N}:2::1"), "give the IPv6 --subnet it belongs to"),
    (("--ipv6", "--subnet", "fd76:zz::/64"), "invalid --subnet"),
])
def test_bad_ipv6_network_flags_are_one_line_errors(vmrt: Vmrt, args: tuple[str, ...], message: str) -> None:
    r = vmrt("network", "create", *args, "bad6")
    assert r.returncode == 125
    assert message in one_line_error(r.stderr)
    assert vmrt("network", "inspect", "bad6").returncode != 0


def test_ipv6_network_inspect_bridge_address_and_rm(vmrt: Vmrt, net6: str) -> None:
    """inspect: EnableIPv6 and a second IPAM entry (the default bridge stays IPv4-only); an
    overlapping IPv6 subnet is refused; --ipv6 alone takes a random ULA /64; the bridge holds the
    gateway address (no DAD) while the network exists, and `network rm` takes it."""
    doc = json.loads(vmrt("network", "inspect", net6).stdout)[0]
    assert doc["EnableIPv6"] is True
    assert doc["IPAM"]["Config"][1] == {"Subnet": SUBNET6, "Gateway": GW6}
    default = json.loads(vmrt("network", "inspect", "bridge").stdout)[0]
    assert default["EnableIPv6"] is False and len(default["IPAM"]["Config"]) == 1
    r = vmrt("network", "create", "--ipv6", "--subnet", f"fd76:{N}::/32", "over6")
    assert r.returncode == 125 and "Pool overlaps" in one_line_error(r.stderr)
    r = vmrt("network", "create", "--ipv6", "pool6")
    assert r.returncode == 0, r.stderr
    pooled = json.loads(vmrt("network", "inspect", "pool6").stdout)[0]["IPAM"]["Config"][1]
    sub = ipaddress.IPv6Network(pooled["Subnet"])
    assert sub.prefixlen == 64 and sub.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    assert pooled["Gateway"] == str(sub.network_address + 1)
    assert vmrt("network", "rm", "pool6").returncode == 0
    # the bridge is made by the first container
    r = vmrt("run", "--rm", "--isolation=process", "--network", net6, "busybox", "true")
    assert r.returncode == 0, r.stderr
    br = bridge_of(vmrt, net6)
    addrs = subprocess.run(["ip", "-6", "addr", "show", "dev", br], capture_output=True, text=True).stdout
    assert re.search(rf"inet6 {GW6}/64 scope global nodad", addrs), addrs
    assert Path(f"/proc/sys/net/ipv6/conf/{br}/accept_ra").read_text() == "0\n"
    assert vmrt("network", "rm", net6).returncode == 0
    assert not Path(f"/sys/class/net/{br}").exists()
    r = subprocess.run(["ip", "-6", "addr", "show", "to", GW6], capture_output=True, text=True)
    assert r.stdout == ""
    vmrt.assert_clean()


# --- both isolations ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_no_ipv6_on_eth0_of_a_network_without_it(vmrt: Vmrt, mode: str) -> None:
    """The default bridge network is IPv4-only: eth0 has IPv6 off (no link-local either), as Docker
    does; lo keeps ::1. The same in both isolations."""
    r = vmrt("run", "--rm", f"--isolation={mode}", "busybox", "sh", "-c",
             "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6; ip -6 addr show dev eth0; ping -6 -c1 -W5 ::1 >/dev/null "
             "&& echo lo6-ok")
    assert r.stdout == b"1\nlo6-ok\n", (r.stdout, r.stderr)
    vmrt.assert_clean()


def v6_state(v: Vmrt, cid: str) -> tuple[list[str], list[str]]:
    """eth0's IPv6 addresses (waiting for the link-local, made once the link has its carrier) and
    IPv6 default route."""
    for _ in range(50):
        out = sh(v, cid, "ip -6 addr show dev eth0; echo ==; ip -6 route show default")
        addrs, routes = out.split("==\n")
        found = re.findall(r"inet6 (\S+) scope (\w+)", addrs)
        if any(scope == "link" for _, scope in found):
            return sorted(f"{a} {s}" for a, s in found), routes.split()
        time.sleep(0.2)
    raise AssertionError(f"no link-local address on eth0: {out}")


@pytest.mark.vm
def test_both_isolations_get_ipv6_and_reach_each_other(vmrt: Vmrt, net6: str) -> None:
    """A process container and a VM container on one --ipv6 network: each has its address, its
    EUI-64 link-local and a default route via the gateway (the same in both); they reach each other
    (ping, and TCP with nc), the gateway and the host reaches them, over IPv6."""
    proc = detach(vmrt, "process", "sleep", "300", opts=("--network", net6))
    vm = detach(vmrt, "vm", "sh", "-c", "while true; do echo from-vm | nc -l -p 7000; done", opts=("--network", net6))
    sp, sv = settings(vmrt, proc), settings(vmrt, vm)
    for s in (sp, sv):
        assert s["IPv6Gateway"] == GW6 and s["GlobalIPv6PrefixLen"] == 64
        assert s["Networks"][net6]["GlobalIPv6Address"] == s["GlobalIPv6Address"]
        assert ipaddress.IPv6Address(s["GlobalIPv6Address"]) in ipaddress.IPv6Network(SUBNET6)
    assert sp["GlobalIPv6Address"] != sv["GlobalIPv6Address"]
    members = json.loads(vmrt("network", "inspect", net6).stdout)[0]["Containers"]
    assert members[vm]["IPv6Address"] == sv["GlobalIPv6Address"] + "/64"
    for cid, s in ((proc, sp), (vm, sv)):
        addrs, route = v6_state(vmrt, cid)
        assert addrs == sorted([f"{network.nft.link_local(s['MacAddress'])}/64 link",
                                f"{s['GlobalIPv6Address']}/64 global"])
        assert route == ["default", "via", GW6, "dev", "eth0", "metric", "1024"]
    pings = " && ".join(f"ping -6 -c1 -W10 {a} >/dev/null" for a in (GW6, sv["GlobalIPv6Address"]))
    assert sh(vmrt, proc, f"{pings} && echo pings-ok") == "pings-ok\n"
    assert sh(vmrt, proc, f"for i in $(seq 30); do nc {sv['GlobalIPv6Address']} 7000 </dev/null && break; "
                          "sleep 0.3; done") == "from-vm\n"
    pings = " && ".join(f"ping -6 -c1 -W10 {a} >/dev/null" for a in (GW6, sp["GlobalIPv6Address"]))
    assert sh(vmrt, vm, f"{pings} && echo pings-ok") == "pings-ok\n"
    for s in (sp, sv):
        subprocess.run(["busybox", "ping", "-6", "-c1", "-W10", s["GlobalIPv6Address"]], check=True,
                       capture_output=True)
    rm(vmrt, proc, vm)
    # its bridge goes with the network: without a test slot every vmrt bridge counts as a leftover
    assert vmrt("network", "rm", net6).returncode == 0
    vmrt.assert_clean()


def test_connect_to_an_ipv6_network_and_names(vmrt: Vmrt, net6: str) -> None:
    """A process container on the default network connected to an --ipv6 one gets its IPv6 address
    and default route on eth1 (the first network with IPv6 has it), eth0 keeps IPv6 off; the hosts
    files list each one's IPv6 address beside its IPv4 one (Docker's own line, and vmrt's peers)."""
    first = detach(vmrt, "process", "sleep", "120", opts=("--network", net6, "--name", "first6"))
    late = detach(vmrt, "process", "sleep", "120", opts=("--name", "late6"))
    assert vmrt("network", "connect", net6, late).returncode == 0
    s1, s2 = settings(vmrt, first), settings(vmrt, late)
    ip1, ip2 = s1["GlobalIPv6Address"], s2["Networks"][net6]["GlobalIPv6Address"]
    assert s2["GlobalIPv6Address"] == "" and ip2 and ip2 != ip1  # its first network has none
    out = sh(vmrt, late, "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6; ip -6 addr show dev eth1 scope global; "
                         "ip -6 route show default; ping -6 -c1 -W5 first6 >/dev/null && echo by-name")
    assert out.startswith("1\n") and f"inet6 {ip2}/64 scope global" in out, out
    assert f"default via {GW6} dev eth1" in out and out.endswith("by-name\n"), out
    hosts1, hosts2 = sh(vmrt, first, "cat /etc/hosts"), sh(vmrt, late, "cat /etc/hosts")
    assert f"{ip1}\t{first[:12]}\n" in hosts1 and f"{ip2}\tlate6 {late[:12]}\n" in hosts1, hosts1
    assert f"{ip1}\tfirst6 {first[:12]}\n" in hosts2, hosts2
    assert vmrt("network", "disconnect", net6, late).returncode == 0
    assert sh(vmrt, late, "ip -6 addr show scope global") == ""
    assert ip2 not in sh(vmrt, first, "cat /etc/hosts")
    rm(vmrt, first, late)
    # its bridge goes with the network: without a test slot every vmrt bridge counts as a leftover
    assert vmrt("network", "rm", net6).returncode == 0
    vmrt.assert_clean()


# --- anti-spoofing -----------------------------------------------------------------------------------

def ip6(src: str, dst: str, nh: int, body: bytes, hlim: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), nh, hlim, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + body


def _l4(src: str, dst: str, nh: int, msg: bytes, at: int) -> bytes:
    """msg with its checksum (at byte ``at``) over the IPv6 pseudo-header."""
    pseudo = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
              + struct.pack("!I3xB", len(msg), nh))
    return msg[:at] + struct.pack("!H", _csum(pseudo + msg) or 0xFFFF) + msg[at + 2:]


def udp6(src: str, dst: str, tag: bytes) -> bytes:
    return ip6(src, dst, 17, _l4(src, dst, 17, struct.pack("!HHHH", 40000, 40001, 8 + len(tag), 0) + tag, 6))


def icmp6(src: str, dst: str, kind: int, body: bytes) -> bytes:
    return ip6(src, dst, 58, _l4(src, dst, 58, struct.pack("!BBH", kind, 0, 0) + body, 2), hlim=255)


def lladdr(kind: int, mac: str) -> bytes:
    """A neighbour discovery link-layer address option (1: source, 2: target)."""
    return struct.pack("!BB", kind, 1) + mac_bytes(mac)


def na(src: str, dst: str, target: str, mac: str) -> bytes:
    return icmp6(src, dst, 136, struct.pack("!I", 0x60000000) + ipaddress.IPv6Address(target).packed
                 + lladdr(2, mac))


def ns(src: str, dst: str, target: str, mac: str | None) -> bytes:
    return icmp6(src, dst, 135, bytes(4) + ipaddress.IPv6Address(target).packed + (lladdr(1, mac) if mac else b""))


def icmp6_behind_hbh(src: str, dst: str, kind: int, body: bytes) -> bytes:
    """An ICMPv6 message behind a hop-by-hop options header (PadN only): the rules must see through it."""
    msg = _l4(src, dst, 58, struct.pack("!BBH", kind, 0, 0) + body, 2)
    return ip6(src, dst, 0, struct.pack("!BB", 58, 0) + bytes([1, 4, 0, 0, 0, 0]) + msg, hlim=255)


def icmp6_fragments(src: str, dst: str, kind: int, body: bytes) -> list[bytes]:
    """An ICMPv6 message split in two IPv6 fragments (the first 8 bytes, then the rest)."""
    msg = _l4(src, dst, 58, struct.pack("!BBH", kind, 0, 0) + body, 2)
    first = struct.pack("!BBHI", 58, 0, 0 << 3 | 1, 0x5EED) + msg[:8]
    rest = struct.pack("!BBHI", 58, 0, 1 << 3, 0x5EED) + msg[8:]
    return [ip6(src, dst, 44, first, hlim=255), ip6(src, dst, 44, rest, hlim=255)]


def test_a_container_sends_ipv6_only_from_its_own_addresses(vmrt: Vmrt, net6: str) -> None:
    """From the attacker's namespace, to the victim's MAC: IPv6 from its own address and its own
    link-local arrives, and its own neighbour solicitations and advertisements; another source
    (the victim's, the gateway's, a spare one of the subnet, another link-local), an advertisement
    for the victim's address or with another MAC (also behind a hop-by-hop header), a router
    advertisement (also in fragments), a redirect, and duplicate address detection for the
    victim's address do not."""
    victim = detach(vmrt, "process", "sleep", "120", opts=("--network", net6))
    attacker = detach(vmrt, "process", "sleep", "120", opts=("--network", net6))
    v, a = settings(vmrt, victim), settings(vmrt, attacker)
    vmac, amac = v["MacAddress"], a["MacAddress"]
    vip, aip = v["GlobalIPv6Address"], a["GlobalIPv6Address"]
    vll, all_ = str(network.nft.link_local(vmac)), str(network.nft.link_local(amac))
    spare, other = str(ipaddress.IPv6Address(GW6) + 0x99), "02:56:de:ad:be:ef"
    ra = struct.pack("!BBHII", 64, 0, 1800, 0, 0) + lladdr(1, amac)
    redirect = bytes(4) + ipaddress.IPv6Address(GW6).packed + ipaddress.IPv6Address(vip).packed
    legit = {
        "own": udp6(aip, vip, b"v6-own"),
        "own link-local": udp6(all_, vll, b"v6-own-ll"),
        "own NS": ns(aip, vip, vip, amac),
        "own NA": na(aip, vip, aip, amac),
        "own link-local NA": na(all_, vll, all_, amac),
        "own DAD": ns("::", "ff02::1:ff00:0", aip, None),
    }
    forged = {
        "the victim's source": udp6(vip, vip, b"v6-spoof-victim"),
        "the gateway's source": udp6(GW6, vip, b"v6-spoof-gw"),
        "a spare source": udp6(spare, vip, b"v6-spoof-spare"),
        "another link-local": udp6("fe80::1", vll, b"v6-spoof-ll"),
        "NA for the victim": na(aip, vip, vip, amac),
        "NA for the gateway": na(aip, vip, GW6, amac),
        "NA with another MAC": na(aip, vip, aip, other),
        "NS with another MAC": ns(aip, vip, vip, other),
        "RA": icmp6(all_, "ff02::1", 134, ra),
        "redirect": icmp6(all_, vll, 137, redirect),
        "DAD for the victim's": ns("::", "ff02::1:ff00:0", vip, None),
        "NA for the victim behind hop-by-hop": icmp6_behind_hbh(
            aip, vip, 136, struct.pack("!I", 0x60000000) + ipaddress.IPv6Address(vip).packed + lladdr(2, amac)),
        "RA in fragments (1st)": icmp6_fragments(all_, "ff02::1", 134, ra)[0],
        "RA in fragments (2nd)": icmp6_fragments(all_, "ff02::1", 134, ra)[1],
    }
    frames = {k: ether(vmac, amac, 0x86DD, f) for k, f in {**legit, **forged}.items()}
    cap = Capture("eth0", 4.0, netns=v["SandboxKey"])
    send_frames(a["SandboxKey"], *frames.values())
    seen = cap.frames()
    assert [k for k in legit if frames[k] in seen] == list(legit)
    assert [k for k in forged if frames[k] in seen] == []
    # the host did not learn the victim's address at the attacker's MAC
    neigh = subprocess.run(["ip", "-6", "neigh", "show", vip], capture_output=True, text=True).stdout
    assert amac not in neigh, neigh
    rm(vmrt, attacker, victim)
    # its bridge goes with the network: without a test slot every vmrt bridge counts as a leftover
    assert vmrt("network", "rm", net6).returncode == 0
    vmrt.assert_clean()
