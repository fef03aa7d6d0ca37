"""Issue 14, part 2 and the ports of part 1: a hostile image or container against the host's network.

Each test plays the attacker with benign probes: an image whose ExposedPorts key carries nft
syntax, flags with junk ports, a container (root with NET_RAW, or a VM's guest kernel) that
sends raw frames to the host's loopback, forges its MAC, address or ARP, or reaches past its
network. The frames are built here and sent from the container's network namespace
(``nsenter --net=<SandboxKey>`` and an AF_PACKET socket: what container root with NET_RAW
can do; in VM mode the same veth carries what the guest sends through tc). Traffic goes only
to loopback, to containers, and to a "remote host" in a namespace the test makes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ocibuild import OciLayout, busybox_layer
from support import SLOT, Vmrt, endpoint_rules, nft_table, one_line_error, track

from vmrt import network
from vmrt.errors import UsageError
from vmrt.network import nft

MODES = ["process", pytest.param("vm", marks=pytest.mark.vm)]
HTTPD = "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && exec httpd -f -p {port} -h /www"
N = int(SLOT or 0)


# --- helpers --------------------------------------------------------------------------------------

def detach(v: Vmrt, mode: str, *args: str, opts: tuple[str, ...] = ()) -> str:
    r = v("run", "-d", f"--isolation={mode}", *opts, "busybox", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def rm(v: Vmrt, *cids: str) -> None:
    for cid in cids:
        r = v("rm", "-f", cid)
        assert r.returncode == 0, r.stderr


def settings(v: Vmrt, cid: str) -> dict:  # type: ignore[type-arg]
    r = v("inspect", cid)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]["NetworkSettings"]  # type: ignore[no-any-return]


def fetch(url: str, timeout: float = 60.0, netns: str | None = None) -> str:
    """GET url (from the namespace ``netns`` if given), retrying while the server comes up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if netns is None:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    return str(resp.read().decode())
            r = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", "import sys, urllib.request; "
                                f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout=5).read().decode())"],
                               capture_output=True, timeout=30)
            if r.returncode == 0:
                return r.stdout.decode()
            raise ConnectionError(r.stderr.decode()[-200:])
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ether(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload


def udp4(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    """An IPv4 packet carrying a UDP datagram (UDP checksum 0: none, allowed over IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0x4000, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + udp


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return (struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac_bytes(sha) + socket.inet_aton(spa)
            + mac_bytes(tha) + socket.inet_aton(tpa))


SEND = ("import socket, sys, time\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "s.bind(('eth0', 0))\n"
        "for _ in range(3):\n"
        "    for h in sys.argv[1:]:\n"
        "        s.send(bytes.fromhex(h))\n"
        "    time.sleep(0.1)\n")


def send_frames(netns: str, *frames: bytes) -> None:
    """Send raw frames out of eth0 of the container's namespace: the attacker's own move."""
    r = subprocess.run(["nsenter", f"--net={netns}", "python3", "-c", SEND, *(f.hex() for f in frames)],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


CAPTURE = ("import socket, sys, time\n"
           "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\n"
           "s.bind((sys.argv[1], 0)); s.settimeout(0.2)\n"
           "print('ready', flush=True)\n"
           "end = time.monotonic() + float(sys.argv[2])\n"
           "while time.monotonic() < end:\n"
           "    try:\n"
           "        f = s.recv(65536)\n"
           "    except socket.timeout:\n"
           "        continue\n"
           "    print(f.hex(), flush=True)\n")


class Capture:
    """Every frame an interface receives for ``seconds`` (in a namespace, or the host's)."""

    def __init__(self, ifname: str, seconds: float, netns: str | None = None) -> None:
        pre = ["nsenter", f"--net={netns}"] if netns else []
        self.proc = track(subprocess.Popen([*pre, "python3", "-c", CAPTURE, ifname, str(seconds)],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # killed at the test's end
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"ready\n", self.proc.stderr

    def frames(self) -> list[bytes]:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return [bytes.fromhex(ln) for ln in out.decode().split()]


def udp_server(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(0.2)
    return s


def received(s: socket.socket, seconds: float = 2.0) -> list[bytes]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append(s.recv(2048))
        except TimeoutError:
            continue
    return out


def gateway_mac(v: Vmrt) -> str:
    return Path(f"/sys/class/net/{v.bridge}/address").read_text().strip()


def host_neighbour(ip: str, dev: str) -> str:
    r = subprocess.run(["ip", "neigh", "show", ip, "dev", dev], capture_output=True, text=True)
    return r.stdout.strip()


def vmrt_tables(v: Vmrt) -> str:
    t = nft_table(v.root)
    return "".join(subprocess.run(["nft", "list", "table", fam, t], capture_output=True, text=True).stdout
                   for fam in ("inet", "bridge"))


@pytest.fixture
def vmrt(vmrt: Vmrt) -> Iterator[Vmrt]:
    """conftest's, plus: a failed test's containers and networks go before the leak check (conftest's
    fixture, which tears down after this one)."""
    yield vmrt
    vmrt.remove_all()


# --- part 1: ports are data, never code -----------------------------------------------------------

PWN = f"vmrtpwn{N}"
# pasted into the old ruleset as the protocol of a DNAT rule, this closed vmrt's table and added one
# of the attacker's (then reopened one so the rest of the script still parsed)
EVIL_KEY = (f'80/tcp dport 1 accept\n  }}\n}}\ntable ip {PWN} {{\n  chain c {{\n    counter comment "pwned"\n'
            f'  }}\n}}\ntable ip {PWN}b {{\n  chain ports {{\n    tcp')


@pytest.fixture
def evil_image(vmrt: Vmrt, tmp_path: Path) -> Iterator[str]:
    """An image whose ExposedPorts holds a good key and one carrying nft syntax."""
    lay = OciLayout(tmp_path / "layout")
    lay.add_image([busybox_layer()], {"Cmd": ["sh"], "ExposedPorts": {"8080/tcp": {}, EVIL_KEY: {}}},
                  ref="nftevil")
    r = vmrt("load", "-i", str(lay.tar(tmp_path / "evil.tar")))
    assert r.returncode == 0, r.stderr
    yield "nftevil:latest"
    for t in (PWN, PWN + "b"):
        subprocess.run(["nft", "delete", "table", "ip", t], capture_output=True)
    vmrt("rmi", "nftevil:latest")


@pytest.mark.parametrize("mode", MODES)
def test_an_exposed_port_key_carrying_nft_syntax_is_refused(vmrt: Vmrt, evil_image: str, mode: str) -> None:
    """-P with the image's ports: the run is refused with one line naming the key; the host's
    ruleset gains nothing (no table, no rule, no counter of the attacker's)."""
    before = vmrt_tables(vmrt)
    r = vmrt("run", "--rm", "-P", f"--isolation={mode}", evil_image, "true")
    assert r.returncode == 125
    line = one_line_error(r.stderr)
    assert "ExposedPorts key '80/tcp dport 1 accept\\n" in line and "refusing to run it" in line, line
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert PWN not in ruleset and "pwned" not in ruleset
    assert vmrt_tables(vmrt) == before
    # without -P too: such an image does not run (as Docker refuses it); nothing is kept of it
    r = vmrt("run", "--rm", f"--isolation={mode}", evil_image, "true")
    assert r.returncode == 125 and "ExposedPorts key" in one_line_error(r.stderr)
    assert vmrt("ps", "-aq").stdout == b""
    vmrt.assert_clean()


@pytest.mark.parametrize("args,message", [
    (("--expose", "80/tcp; add table ip x"), "invalid protocol"),
    (("--expose", "80/tcp\nflush ruleset"), "invalid protocol"),
    (("--expose", "80 tcp"), "invalid exposed port"),
    (("--expose", "0"), "invalid exposed port"),
    (("--expose", "65536"), "invalid exposed port"),
    (("--expose", "90-80"), "invalid exposed port range"),
    (("--expose", "\u0668\u0660"), "invalid exposed port"),  # Arabic-Indic digits: isdigit() is true
    (("--expose", "132/sctp"), "tcp and udp ports only"),
    (("--expose", "1-65535"), "larger than 4096 ports"),
    (("-p", "80:80/udp;flush ruleset"), "invalid protocol"),
    (("-p", "80:80/SCTP"), "tcp and udp ports only"),
    (("-p", '127.0.0.1" ; flush ruleset ; "x:80:80'), "invalid IP address"),
    (("-p", "127.000.0.1:80:80"), "invalid IP address"),
    (("-p", "80:+80"), "invalid container port"),
    (("-p", "0x50:80"), "invalid host port"),
])
def test_junk_ports_from_flags_are_one_line_errors(vmrt: Vmrt, args: tuple[str, ...], message: str) -> None:
    before = vmrt_tables(vmrt)
    r = vmrt("run", "--rm", "--isolation=process", "-P", *args, "busybox", "true")
    assert r.returncode == 125
    assert message in one_line_error(r.stderr)
    assert vmrt_tables(vmrt) == before
    assert vmrt("ps", "-aq").stdout == b""
    vmrt.assert_clean()


def test_ports_read_back_from_state_are_parsed_again() -> None:
    """The container's stored request and the endpoint rows are data too: a damaged one is an
    error, never text in a script."""
    good = network.NetRequest(ports=[network.PortMapping("127.0.0.1", 8080, 80)], exposed=["80/tcp"])
    assert network.NetRequest.from_json(good.to_json()) == good
    for bad in ({"ports": [{"host_ip": "", "host_port": 80, "container_port": 80, "proto": "tcp dport 1"}]},
                {"ports": [{"host_ip": "1.2.3.4;", "host_port": 80, "container_port": 80, "proto": "tcp"}]},
                {"ports": [{"host_ip": "", "host_port": "80", "container_port": 80, "proto": "tcp"}]},
                {"ports": [{"host_ip": "", "host_port": 80, "container_port": 0, "proto": "tcp"}]},
                {"exposed": ["80/tcp accept"]}, {"exposed": [80]}):
        with pytest.raises(network.NetworkError):
            network.NetRequest.from_json(json.dumps(bad))
    assert network.image_exposed({"80/tcp": {}, "53/UDP": {}, "9000-9001": {}, "132/sctp": {}}) == [
        "80/tcp", "53/udp", "9000/tcp", "9001/tcp", "132/sctp"]
    for bad_cfg in ({"80/tcp\n": {}}, {"80/icmp": {}}, {"-1/tcp": {}}, ["80/tcp"], {"1-65535/tcp": {}}):
        with pytest.raises(UsageError):
            network.image_exposed(bad_cfg)


def test_nft_script_values_are_typed_and_checked() -> None:
    """The script generator takes nothing it has not parsed: names from the database that do not
    match their pattern, and plain strings at a value's place, stop the write."""
    a = network.Network("a" * 64, "bridge", "10.1.0.0/24", "10.1.0.1", "br-a")
    ep = network.Endpoint("c" * 64, a.id, "10.1.0.2", "02:56:0a:01:00:02", "eth0", "vcccccccccc0", [], "c",
                          [network.PortMapping("", 8888, 8080)])
    assert "dnat ip to 10.1.0.2:8080" in network.ruleset("vmrt_t", [a], [ep], 7)
    damaged = [
        ("vmrt_t", [network.Network(a.id, "bridge", "10.1.0.0/24", "10.1.0.1", 'br"; flush ruleset; "')], [ep]),
        ("vmrt_t", [network.Network(a.id, "bridge", "10.1.0.0/24 accept", "10.1.0.1", "br-a")], [ep]),
        ("vmrt t", [a], [ep]),
        ("vmrt_t", [a], [network.Endpoint(ep.container_id, a.id, "10.1.0.2", "02:56:0a:01:00:02 accept",
                                           "eth0", ep.host_if, [], "c", [])]),
        ("vmrt_t", [a], [network.Endpoint(ep.container_id, a.id, "10.1.0.2 ", ep.mac, "eth0", ep.host_if, [],
                                           "c", [])]),
        ("vmrt_t", [a], [network.Endpoint("x" * 64, a.id, ep.ip, ep.mac, "eth0", ep.host_if, [], "c", ep.ports)]),
        ("vmrt_t", [a], [network.Endpoint(ep.container_id, a.id, ep.ip, ep.mac, "eth0", "v-x.y", [], "c", [])]),
    ]
    for table, nets, eps in damaged:
        with pytest.raises(network.NetworkError):
            network.ruleset(table, nets, eps, 7)
    with pytest.raises(network.NetworkError):
        nft._nf("ip saddr %s accept", "10.1.0.2 accept; flush ruleset")
    with pytest.raises(network.NetworkError):
        nft._nf("meta iifgroup %s", 7)  # a bare int: not a Group
    p = network.PortMapping("", 80, 80)
    p.proto = "tcp dport 1 accept"  # changed after it was checked
    with pytest.raises(network.NetworkError):
        network.ruleset("vmrt_t", [a], [network.Endpoint(ep.container_id, a.id, ep.ip, ep.mac, "eth0",
                                                         ep.host_if, [], "c", [p])], 7)


# --- part 2: no reach into the host's loopback -------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_a_container_cannot_reach_the_hosts_loopback(vmrt: Vmrt, mode: str) -> None:
    """CVE-2020-8558: frames to the gateway's MAC addressed to 127.0.0.1 (a UDP service bound only to
    the host's loopback; a port published on 127.0.0.1 only) reach nothing, though the bridges
    have route_localnet=1; the same frame to the gateway's own address arrives (the probe works),
    and the published port still answers on 127.0.0.1."""
    cid = detach(vmrt, mode, "sh", "-c", HTTPD.format(port=8080), opts=("-p", f"127.0.0.1:{18380 + N}:8080"))
    ns = settings(vmrt, cid)
    gw, me, mac = ns["Gateway"], ns["IPAddress"], ns["MacAddress"]
    assert fetch(f"http://127.0.0.1:{18380 + N}/") == f"hello-from-{cid[:12]}\n"
    assert Path(f"/proc/sys/net/ipv4/conf/{vmrt.bridge}/route_localnet").read_text() == "1\n"
    lo, on_gw = udp_server("127.0.0.1"), udp_server(gw)
    try:
        gmac = gateway_mac(vmrt)
        send_frames(ns["SandboxKey"],
                    ether(gmac, mac, 0x0800, udp4(me, "127.0.0.1", 40000, lo.getsockname()[1], b"to-loopback")),
                    ether(gmac, mac, 0x0800, udp4(me, gw, 40000, on_gw.getsockname()[1], b"to-gateway")))
        assert received(on_gw) == [b"to-gateway"] * 3  # the frames were sent and delivered
        assert received(lo, 0.5) == []
    finally:
        lo.close()
        on_gw.close()
    assert fetch(f"http://127.0.0.1:{18380 + N}/") == f"hello-from-{cid[:12]}\n"
    rm(vmrt, cid)
    vmrt.assert_clean()


# --- part 2: anti-spoofing -----------------------------------------------------------------------

def spoofs(v: dict, a: dict, gw: str, gmac: str, spare: str) -> list[bytes]:  # type: ignore[type-arg]
    """The attacker's ``a`` frames toward the victim ``v`` and the host: one legitimate, the rest with
    another source address or MAC, a VLAN tag, IPv6, or a forged ARP reply."""
    def to_victim(src_mac: str, src_ip: str, tag: bytes) -> bytes:
        return ether(v["MacAddress"], src_mac, 0x0800, udp4(src_ip, v["IPAddress"], 40000, 40001, tag))

    return [to_victim(a["MacAddress"], a["IPAddress"], b"vmrt-legit"),
            to_victim(a["MacAddress"], spare, b"vmrt-spoof-ip"),
            to_victim(a["MacAddress"], gw, b"vmrt-spoof-gw"),
            to_victim("02:56:de:ad:be:ef", a["IPAddress"], b"vmrt-spoof-mac"),
            to_victim(v["MacAddress"], a["IPAddress"], b"vmrt-spoof-victim-mac"),
            # 802.1Q tag 5 around a spoofed packet
            ether(v["MacAddress"], a["MacAddress"], 0x8100, struct.pack("!H", 5) + struct.pack("!H", 0x0800)
                  + udp4(spare, v["IPAddress"], 40000, 40001, b"vmrt-spoof-vlan")),
            # IPv6 from its own MAC (the default network has no IPv6)
            ether(v["MacAddress"], a["MacAddress"], 0x86DD, struct.pack("!IHBB16s16s", 6 << 28, 14, 17, 64,
                  ipaddress.IPv6Address("fe80::1").packed, ipaddress.IPv6Address("fe80::2").packed)
                  + struct.pack("!HHHH", 1, 2, 14, 0) + b"vmrt-v6"),
            # "the gateway is at my MAC", to the victim; "the victim is at my MAC", to the host
            ether(v["MacAddress"], a["MacAddress"], 0x0806, arp(2, a["MacAddress"], gw, v["MacAddress"],
                                                               v["IPAddress"])),
            ether(gmac, a["MacAddress"], 0x0806, arp(2, a["MacAddress"], v["IPAddress"], gmac, gw)),
            # ARP with its own MAC in the frame but another's in the ARP sender field
            ether(v["MacAddress"], a["MacAddress"], 0x0806, arp(2, "02:56:de:ad:be:ef", a["IPAddress"],
                                                               v["MacAddress"], v["IPAddress"]))]


def assert_only_legit_arrived(vmrt: Vmrt, frames: list[bytes], v: dict, a: dict, gw: str,  # type: ignore[type-arg]
                              gmac: str) -> None:
    """Of spoofs(), the victim saw only the legitimate frame; neither it nor the host learnt a
    forged neighbour."""
    tags = [t for t in (b"vmrt-legit", b"vmrt-spoof-ip", b"vmrt-spoof-gw", b"vmrt-spoof-mac", b"vmrt-spoof-victim-mac",
                        b"vmrt-spoof-vlan", b"vmrt-v6") if any(t in f for f in frames)]
    assert tags == [b"vmrt-legit"], tags
    forged = [f for f in frames if f[12:14] == b"\x08\x06"  # ARP claiming the gateway, or another MAC's
              and (f[28:32] == socket.inet_aton(gw) and f[22:28] != mac_bytes(gmac)
                   or f[22:28] == mac_bytes("02:56:de:ad:be:ef"))]
    assert forged == [], [f.hex() for f in forged]
    assert mac_bytes(a["MacAddress"]).hex() not in host_neighbour(v["IPAddress"], vmrt.bridge).replace(":", "")
    r = subprocess.run(["nsenter", f"--net={v['SandboxKey']}", "ip", "neigh", "show", gw],
                       capture_output=True, text=True)
    assert a["MacAddress"] not in r.stdout


def host_knows_victim(v: dict) -> None:  # type: ignore[type-arg]
    """The host learns the victim's MAC (a neighbour entry the forged ARP would overwrite)."""
    subprocess.run(["busybox", "ping", "-c1", "-W5", v["IPAddress"]], check=True, capture_output=True)
    time.sleep(1.2)  # past the neighbour entry's locktime: an ARP reply may now replace it


@pytest.mark.parametrize("mode", MODES)
def test_a_container_sends_only_from_its_own_mac_and_address(vmrt: Vmrt, mode: str) -> None:
    """Frames from the attacker's netns with another source address, another MAC, a forged ARP
    reply (claiming the gateway to a neighbour, a neighbour to the host), a VLAN tag or IPv6 do
    not reach the other container or the host; a frame from its own MAC and address does."""
    victim = detach(vmrt, "process", "sleep", "120")
    attacker = detach(vmrt, mode, "sleep", "120")
    v, a = settings(vmrt, victim), settings(vmrt, attacker)
    gw, gmac = v["Gateway"], gateway_mac(vmrt)
    veth = f"v{attacker[:10]}0"
    assert f"ep_{veth}" in endpoint_rules(nft_table(vmrt.root))
    host_knows_victim(v)
    cap = Capture("eth0", 4.0, netns=v["SandboxKey"])
    send_frames(a["SandboxKey"], *spoofs(v, a, gw, gmac, str(ipaddress.IPv4Address(gw) + 200)))
    assert_only_legit_arrived(vmrt, cap.frames(), v, a, gw, gmac)
    rm(vmrt, attacker)
    assert f"ep_{veth}" not in endpoint_rules(nft_table(vmrt.root))  # its chain went with it
    rm(vmrt, victim)
    vmrt.assert_clean()


# the attacker inside a VM: root in the guest with NET_RAW (Docker's default capabilities). The
# guest kernel has AF_PACKET, as the host's: it forges whole frames (another MAC, ARP replies, VLAN
# tags, IPv6) and, through a raw IPv4 socket with IP_HDRINCL, packets with any source address.
# busybox has no tool for either: a static helper, mounted in. `sendraw ip HEX...` sends IPv4
# packets, `sendraw frame HEX...` Ethernet frames out of eth0; each three times.
SENDRAW_C = r"""
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int frames = strcmp(argv[1], "frame") == 0;
    /* IP_HDRINCL: the packet's own header; AF_PACKET: the frame's own */
    int fd = frames ? socket(AF_PACKET, SOCK_RAW, 0) : socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (fd < 0) { perror("socket"); return 1; }
    for (int round = 0; round < 3; round++, usleep(100000))
        for (int i = 2; i < argc; i++) {
            unsigned char pkt[1500]; size_t n = strlen(argv[i]) / 2;
            for (size_t j = 0; j < n && j < sizeof pkt; j++) sscanf(argv[i] + 2 * j, "%2hhx", &pkt[j]);
            struct sockaddr_in to = { .sin_family = AF_INET };
            struct sockaddr_ll ll = { .sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex("eth0"),
                                      .sll_halen = 6 };
            memcpy(&to.sin_addr, pkt + 16, 4);
            memcpy(ll.sll_addr, pkt, 6);
            ssize_t r = frames ? sendto(fd, pkt, n, 0, (struct sockaddr *)&ll, sizeof ll)
                               : sendto(fd, pkt, n, 0, (struct sockaddr *)&to, sizeof to);
            if (r < 0) { perror("sendto"); return 1; }
        }
    return 0;
}
"""


@pytest.fixture(scope="module")
def sendraw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sendraw")
    (d / "sendraw.c").write_text(SENDRAW_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "sendraw"), str(d / "sendraw.c")], check=True)
    (d / "sendraw.c").unlink()
    return d


@pytest.mark.vm
def test_a_vm_guest_sending_from_forged_addresses_reaches_nothing(vmrt: Vmrt, sendraw: Path) -> None:
    """The guest is the attacker: packets root in the VM sends with another source address (a spare
    one of the subnet, the neighbour's, the gateway's) reach neither the host nor the neighbour;
    from its own address they do (the probe works). Frames its kernel forges with AF_PACKET
    (another MAC, forged ARP, a VLAN tag, IPv6) are stopped as a process container's are."""
    victim = detach(vmrt, "process", "sleep", "120")
    vm = detach(vmrt, "vm", "sleep", "120", opts=("-v", f"{sendraw}:/probe:ro"))
    v, a = settings(vmrt, victim), settings(vmrt, vm)
    gw, me, gmac = v["Gateway"], a["IPAddress"], gateway_mac(vmrt)
    spare = str(ipaddress.IPv4Address(gw) + 201)
    on_gw = udp_server(gw)
    try:
        port = on_gw.getsockname()[1]
        packets = [udp4(me, gw, 40000, port, b"own-to-gateway"), udp4(spare, gw, 40000, port, b"spare-to-gateway"),
                   udp4(v["IPAddress"], gw, 40000, port, b"neighbour-to-gateway"),
                   udp4(me, v["IPAddress"], 40000, 40001, b"vmrt-legit"),
                   udp4(gw, v["IPAddress"], 40000, 40001, b"vmrt-spoof-gw"),
                   udp4(spare, v["IPAddress"], 40000, 40001, b"vmrt-spoof-spare")]
        cap = Capture("eth0", 6.0, netns=v["SandboxKey"])
        r = vmrt("exec", vm, "/probe/sendraw", "ip", *(p.hex() for p in packets))
        assert r.returncode == 0, r.stderr
        seen = cap.frames()
        assert received(on_gw) == [b"own-to-gateway"] * 3
    finally:
        on_gw.close()
    tags = (b"vmrt-legit", b"vmrt-spoof-gw", b"vmrt-spoof-spare")
    assert [t for t in tags if any(t in f for f in seen)] == [b"vmrt-legit"]
    assert host_neighbour(spare, vmrt.bridge) in ("", f"{spare} FAILED", f"{spare} INCOMPLETE")
    # whole frames, made by the guest's own kernel
    host_knows_victim(v)
    cap = Capture("eth0", 6.0, netns=v["SandboxKey"])
    r = vmrt("exec", vm, "/probe/sendraw", "frame", *(f.hex() for f in spoofs(v, a, gw, gmac, spare)))
    assert r.returncode == 0, r.stderr
    assert_only_legit_arrived(vmrt, cap.frames(), v, a, gw, gmac)
    rm(vmrt, vm, victim)
    vmrt.assert_clean()


# --- part 2: forwarding ----------------------------------------------------------------------

PEER_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9999)); s.listen(8)
print("ready", flush=True)
while True:
    c, addr = s.accept()
    c.sendall(f"you-are {addr[0]}\n".encode()); c.close()
"""


@pytest.fixture
def remote() -> Iterator[dict[str, str]]:
    """A network namespace as another host on a link of its own to this one (10.24N.0.0/24, host
    side .1), running a server on .2:9999 that tells each client its source address."""
    name, host_if, peer_if = f"vmrtrem{N}{os.getpid()}", f"vxrh{N}", f"vxrp{N}"
    net = f"10.{240 + N}.0"
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    server = None
    try:
        subprocess.run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", name],
                       check=True)
        subprocess.run(["ip", "addr", "add", f"{net}.1/24", "dev", host_if], check=True)
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        for cmd in (["ip", "addr", "add", f"{net}.2/24", "dev", peer_if], ["ip", "link", "set", peer_if, "up"],
                    ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", f"{net}.1"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", name, "python3", "-c", PEER_SERVER, f"{net}.2"],
                                  stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        yield {"ns": name, "host": f"{net}.1", "peer": f"{net}.2", "host_if": host_if, "peer_if": peer_if}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


UDP_ECHO = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5353)); s.settimeout(6)
print("ready", flush=True)
try:
    while True:
        data, peer = s.recvfrom(100); print(data.decode(), flush=True); s.sendto(b"echo " + data, peer)
except socket.timeout:
    pass
"""


def test_forwarding_is_only_what_vmrt_publishes_or_a_container_started(vmrt: Vmrt, remote: dict[str, str]) -> None:
    """From a remote host: a published port answers, the container's own address does not (no route
    in is accepted that vmrt did not publish), a port published on 127.0.0.1 is not reachable even
    by a frame addressed to 127.0.0.1; outbound from a container is NAT'd; from an --internal
    network nothing gets out."""
    cid = detach(vmrt, "process", "sh", "-c", HTTPD.format(port=8080),
                 opts=("-p", f"{18480 + N}:8080", "-p", f"127.0.0.1:{18490 + N}:5353/udp"))
    s = settings(vmrt, cid)
    url = f"http://{remote['host']}:{18480 + N}/"
    assert fetch(url, netns=remote["ns"]) == f"hello-from-{cid[:12]}\n"
    # the remote host routes the containers' subnet through this host and tries the address itself
    subnet = str(ipaddress.IPv4Network(vmrt.subnet))
    subprocess.run(["ip", "netns", "exec", remote["ns"], "ip", "route", "add", subnet, "via", remote["host"]],
                   check=True)
    r = subprocess.run(["ip", "netns", "exec", remote["ns"], "python3", "-c",
                        f"import socket; socket.create_connection(({s['IPAddress']!r}, 8080), timeout=3)"],
                       capture_output=True, timeout=30)
    assert r.returncode != 0 and b"timed out" in r.stderr, r.stderr
    # a frame to this host's MAC addressed to 127.0.0.1 and the loopback-only published UDP port
    server = subprocess.Popen(["nsenter", f"--net={s['SandboxKey']}", "python3", "-c", UDP_ECHO],
                              stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        host_mac = Path(f"/sys/class/net/{remote['host_if']}/address").read_text().strip()
        peer_mac = subprocess.run(["ip", "netns", "exec", remote["ns"], "cat",
                                   f"/sys/class/net/{remote['peer_if']}/address"],
                                  capture_output=True, text=True).stdout.strip()
        frame = ether(host_mac, peer_mac, 0x0800, udp4(remote["peer"], "127.0.0.1", 40000, 18490 + N, b"from-remote"))
        r = subprocess.run(["ip", "netns", "exec", remote["ns"], "python3", "-c",
                            SEND.replace("'eth0'", repr(remote["peer_if"])), frame.hex()], capture_output=True)
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:  # the host itself: still published
            c.settimeout(5)
            c.sendto(b"from-host", ("127.0.0.1", 18490 + N))
            assert c.recvfrom(100)[0] == b"echo from-host"
    finally:
        server.kill()
        out = server.communicate()[0]
    assert out.decode().split() == ["from-host"], out  # not "from-remote"
    # outbound: NAT'd to this host's address
    r = vmrt("exec", cid, "sh", "-c", f"for i in $(seq 20); do nc {remote['peer']} 9999 && break; sleep 0.3; done")
    assert r.stdout == f"you-are {remote['host']}\n".encode(), r.stderr
    rm(vmrt, cid)
    # --internal: not even outbound
    r = vmrt("network", "create", "--internal", "sealed")
    assert r.returncode == 0, r.stderr
    try:
        r = vmrt("run", "--rm", "--isolation=process", "--network", "sealed", "busybox", "sh", "-c",
                 f"timeout 5 nc {remote['peer']} 9999 || echo no-way-out")
        assert r.stdout == b"no-way-out\n", (r.stdout, r.stderr)
    finally:
        assert vmrt("network", "rm", "sealed").returncode == 0
    vmrt.assert_clean()


@pytest.mark.vm
def test_a_vm_cannot_reach_another_networks_container(vmrt: Vmrt) -> None:
    """Between networks nothing passes, whichever isolation the attacker runs under."""
    assert vmrt("network", "create", "isola").returncode == 0
    try:
        other = detach(vmrt, "process", "sh", "-c", HTTPD.format(port=8080), opts=("--network", "isola"))
        ip = settings(vmrt, other)["Networks"]["isola"]["IPAddress"]
        r = vmrt("run", "--rm", "--isolation=vm", "busybox", "sh", "-c",
                 f"ping -c1 -W3 {ip} >/dev/null || echo blocked; "
                 f"timeout 5 wget -q -O- http://{ip}:8080/ || echo blocked")
        assert r.stdout == b"blocked\nblocked\n", (r.stdout, r.stderr)
        rm(vmrt, other)
    finally:
        assert vmrt("network", "rm", "isola").returncode == 0
    vmrt.assert_clean()


def test_a_flushed_ruleset_is_rewritten_by_the_next_start(vmrt: Vmrt) -> None:
    """A firewall reload that flushes the ruleset takes vmrt's tables; the next start finds its
    chain cannot be added and rewrites both (guard included), and its traffic passes."""
    first = detach(vmrt, "process", "sleep", "60")  # the bridge and tables exist
    t = nft_table(vmrt.root)
    for fam in ("inet", "bridge"):
        subprocess.run(["nft", "delete", "table", fam, t], check=True)
    gw = settings(vmrt, first)["Gateway"]
    r = vmrt("run", "--rm", "--isolation=process", "busybox", "sh", "-c", f"ping -c1 -W5 {gw} >/dev/null && echo ok")
    assert r.stdout == b"ok\n", r.stderr
    tables = vmrt_tables(vmrt)
    assert "chain guard" in tables and f"ep_v{first[:10]}0" in tables
    rm(vmrt, first)
    vmrt.assert_clean()


# --- the anti-spoofing chains let the VMs of the fast paths through ----------------------------------

@pytest.mark.vm
def test_pooled_and_restored_vms_still_reach_their_gateway(vmrt: Vmrt) -> None:
    """A pooled VM (its tap moved into the container's namespace at claim) and a snapshot clone (its
    MAC set by the agent at restore) send from the endpoint's MAC and address: the chain lets them."""
    gw = str(ipaddress.IPv4Network(vmrt.subnet).network_address + 1)
    probe = f"ping -c1 -W10 {gw} >/dev/null && echo gw-ok"
    r = vmrt("snapshot", "build", timeout=300)
    assert r.returncode == 0, r.stderr
    try:
        r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "sh", "-c", probe)
        assert b"snapshot=" in r.stderr, r.stderr  # restored, not cold-booted
        assert r.stdout == b"gw-ok\n", r.stderr
    finally:
        assert vmrt("snapshot", "rm").returncode == 0
    assert vmrt("pool", "start", "--size", "1").returncode == 0
    try:
        assert vmrt("pool", "fill", "--wait", timeout=300).returncode == 0
        r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "sh", "-c", probe)
        assert b"pool-claim" in r.stderr, r.stderr
        assert r.stdout == b"gw-ok\n", r.stderr
    finally:
        assert vmrt("pool", "stop").returncode == 0
    vmrt.assert_clean()
