"""Networking in both isolation modes, through the real CLI: bridges, published ports, names.

Traffic goes only to 127.0.0.1 (published ports) and between containers in network
namespaces vmrt creates for them. Each private vmrt has its own bridge and subnet
(conftest); every test ends with the leak check, which also looks for namespaces,
veths, bridges and nftables tables left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt, one_line_error, track

from vmrt import network

MODES = ["process", pytest.param("vm", marks=pytest.mark.vm)]
HTTPD = "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && exec httpd -f -p {port} -h /www"


def detach(v: Vmrt, mode: str, *args: str, opts: tuple[str, ...] = ()) -> str:
    r = v("run", "-d", f"--isolation={mode}", *opts, "busybox", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def fetch(url: str, timeout: float = 60.0) -> str:
    """GET url, retrying while the server in the container comes up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def rm(v: Vmrt, *cids: str) -> None:
    r = v("rm", "-f", *cids)
    assert r.returncode == 0, r.stderr


def inspect(v: Vmrt, ref: str) -> dict:  # type: ignore[type-arg]
    r = v("inspect", ref)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]  # type: ignore[no-any-return]


@pytest.fixture
def vmrt(vmrt: Vmrt) -> Iterator[Vmrt]:
    """conftest's, plus: a failed test's containers and networks are removed before the leak check
    (conftest's fixture, which tears down after this one), so one failure does not fail every test
    after it (each test checks for leaks itself at its end)."""
    yield vmrt
    vmrt.remove_all()


def netcreate(v: Vmrt, name: str, *opts: str) -> None:
    r = v("network", "create", *opts, name)
    assert r.returncode == 0, r.stderr


def netrm(v: Vmrt, *names: str) -> None:
    r = v("network", "rm", *names)
    assert r.returncode == 0, r.stderr


# --- the seed's scenario ---------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_published_port_reaches_httpd(vmrt: Vmrt, mode: str) -> None:
    """`run -d -p 8888:8080` a busybox httpd, fetched from 127.0.0.1:8888; nothing left after rm."""
    cid = detach(vmrt, mode, "sh", "-c", HTTPD.format(port=8080), opts=("-p", "8888:8080"))
    assert fetch("http://127.0.0.1:8888/") == f"hello-from-{cid[:12]}\n"
    r = vmrt("port", cid)
    assert r.stdout == b"8080/tcp -> 0.0.0.0:8888\n", r.stderr
    assert vmrt("port", cid, "8080").stdout == b"0.0.0.0:8888\n"
    ns = inspect(vmrt, cid)["NetworkSettings"]
    assert ns["Ports"] == {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8888"}]}
    assert ns["IPAddress"].startswith(vmrt.subnet.rsplit(".", 1)[0] + ".")
    ps = [json.loads(x) for x in vmrt("ps", "--format", "json").stdout.splitlines()]
    assert [p["Ports"] for p in ps if cid.startswith(p["ID"])] == ["0.0.0.0:8888->8080/tcp"]
    rm(vmrt, cid)
    assert refused(8888)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_own_address_route_and_outbound_nat(vmrt: Vmrt, mode: str) -> None:
    """The container's eth0 has an address of the subnet and a default route via the bridge;
    the bridge (the host) answers; packets to elsewhere leave masqueraded (rule present)."""
    r = vmrt("run", "--rm", f"--isolation={mode}", "busybox", "sh", "-c",
             "ip -4 -o addr show eth0; ip route; ping -c1 -W5 $(ip route | awk '/default/ {print $3}') >/dev/null "
             "&& echo gateway-ok; cat /etc/hostname")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    prefix = vmrt.subnet.rsplit(".", 1)[0] + "."
    assert f"inet {prefix}" in out and f"default via {prefix}1 dev eth0" in out and "gateway-ok" in out, out
    vmrt.assert_clean()


# --- names on user networks, isolation between networks ----------------------------------

@pytest.mark.parametrize("server,client", [("process", "vm"), pytest.param("vm", "process", marks=pytest.mark.vm)])
def test_containers_reach_each_other_by_name_and_alias(vmrt: Vmrt, server: str, client: str) -> None:
    """A user network: a container of one isolation mode finds one of the other by name and alias."""
    netcreate(vmrt, "appnet")
    try:
        srv = detach(vmrt, server, "sh", "-c", HTTPD.format(port=8080),
                     opts=("--network", "appnet", "--name", "srv", "--network-alias", "web"))
        r = vmrt("run", "--rm", f"--isolation={client}", "--network", "appnet", "busybox", "sh", "-c",
                 "for i in $(seq 50); do timeout 5 wget -q -O- http://srv:8080/ 2>/dev/null && break; sleep 0.2; done; "
                 "timeout 10 wget -q -O- http://web:8080/; grep -w srv /etc/hosts")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.decode().splitlines()
        assert lines[:2] == [f"hello-from-{srv[:12]}"] * 2, lines
        assert "web" in lines[2] and srv[:12] in lines[2]
        rm(vmrt, srv)
    finally:
        netrm(vmrt, "appnet")
    vmrt.assert_clean()


def test_networks_are_isolated_from_each_other(vmrt: Vmrt) -> None:
    netcreate(vmrt, "neta")
    netcreate(vmrt, "netb")
    try:
        a = detach(vmrt, "process", "sleep", "60", opts=("--network", "neta", "--name", "a1"))
        b = detach(vmrt, "process", "sleep", "60", opts=("--network", "netb", "--name", "b1"))
        ip_a = inspect(vmrt, a)["NetworkSettings"]["Networks"]["neta"]["IPAddress"]
        ip_b = inspect(vmrt, b)["NetworkSettings"]["Networks"]["netb"]["IPAddress"]
        # same network: reachable; other network: not, not even by address; not by name either
        r = vmrt("run", "--rm", "--isolation=process", "--network", "neta", "busybox", "sh", "-c",
                 f"ping -c1 -W3 {ip_a} >/dev/null && echo same-ok; "
                 f"ping -c1 -W2 {ip_b} >/dev/null || echo other-blocked; "
                 "ping -c1 -W1 b1 >/dev/null 2>&1 || echo no-name")
        assert r.stdout.decode().split() == ["same-ok", "other-blocked", "no-name"], r.stderr
        # the default bridge is another network too
        r = vmrt("run", "--rm", "--isolation=process", "busybox", "sh", "-c",
                 f"ping -c1 -W2 {ip_a} >/dev/null || echo blocked")
        assert r.stdout == b"blocked\n", r.stderr
        rm(vmrt, a, b)
    finally:
        netrm(vmrt, "neta", "netb")
    vmrt.assert_clean()


# --- modes --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_network_none_has_loopback_only(vmrt: Vmrt, mode: str) -> None:
    r = vmrt("run", "--rm", f"--isolation={mode}", "--network", "none", "busybox", "sh", "-c",
             "ip -4 -o addr; ping -c1 -W2 127.0.0.1 >/dev/null && echo lo-ok; ip route | wc -l")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 3 and " lo " in lines[0] and "127.0.0.1/8" in lines[0], lines
    assert lines[1:] == ["lo-ok", "0"]
    vmrt.assert_clean()


def test_host_network_in_process_mode_and_refused_in_a_vm(vmrt: Vmrt) -> None:
    r = vmrt("run", "--rm", "--isolation=process", "--network", "host", "busybox", "ls", "/sys/class/net")
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.decode().split()) == set(os.listdir("/sys/class/net"))  # the host's own interfaces
    r = vmrt("run", "--rm", "--isolation=vm", "--network", "host", "busybox", "true")
    assert r.returncode == 125
    assert "--network host is for --isolation=process only" in one_line_error(r.stderr)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_dns_search_and_add_host(vmrt: Vmrt, mode: str) -> None:
    r = vmrt("run", "--rm", f"--isolation={mode}", "--dns", "192.0.2.53", "--dns-search", "example.test",
             "--dns-option", "ndots:2", "--add-host", "db.internal:10.9.8.7", "--hostname", "box1",
             "busybox", "sh", "-c", "cat /etc/resolv.conf; echo --; cat /etc/hosts; echo --; hostname")
    assert r.returncode == 0, r.stderr
    resolv, hosts, host = r.stdout.decode().split("--\n")
    assert resolv.splitlines() == ["nameserver 192.0.2.53", "search example.test", "options ndots:2"]
    assert "10.9.8.7\tdb.internal" in hosts.splitlines()
    assert any(ln.endswith("\tbox1") for ln in hosts.splitlines()) and host == "box1\n"
    vmrt.assert_clean()


# --- published ports: ranges, -P, addresses, conflicts ------------------------------------

def test_port_range_bound_address_and_publish_all(vmrt: Vmrt) -> None:
    cid = detach(vmrt, "process", "sh", "-c",
                 HTTPD.format(port=8080).replace("exec httpd -f", "httpd") + " && exec httpd -f -p 8081 -h /www",
                 opts=("-p", "127.0.0.1:18080-18081:8080-8081"))
    assert fetch("http://127.0.0.1:18080/").startswith("hello-from-")
    assert fetch("http://127.0.0.1:18081/").startswith("hello-from-")
    assert vmrt("port", cid).stdout.decode().splitlines() == ["8080/tcp -> 127.0.0.1:18080",
                                                              "8081/tcp -> 127.0.0.1:18081"]
    # -P: every exposed port (here --expose) to a free host port
    other = detach(vmrt, "process", "sh", "-c", HTTPD.format(port=9090), opts=("-P", "--expose", "9090"))
    host = vmrt("port", other, "9090/tcp").stdout.decode().strip()
    ip, _, port = host.rpartition(":")
    assert ip == "0.0.0.0" and 1024 < int(port) < 65536
    assert fetch(f"http://127.0.0.1:{port}/") == f"hello-from-{other[:12]}\n"
    # the same host port twice: refused, one line, nothing left of the second container's try
    r = vmrt("run", "--rm", "--isolation=process", "-p", "127.0.0.1:18080:80", "busybox", "true")
    assert r.returncode == 125 and "port is already allocated" in one_line_error(r.stderr)
    rm(vmrt, cid, other)
    vmrt.assert_clean()


UDP_ECHO = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5353))
print("ready", flush=True)
data, peer = s.recvfrom(100); s.sendto(b"echo " + data, peer)
"""


def test_udp_published_port(vmrt: Vmrt) -> None:
    """busybox has no UDP server: the host's python serves in the container's network namespace
    (what a process of the container would do), reached through the published UDP port."""
    cid = detach(vmrt, "process", "sleep", "60", opts=("-p", "127.0.0.1:15353:5353/udp"))
    ns = inspect(vmrt, cid)["NetworkSettings"]["SandboxKey"]
    server = subprocess.Popen(["nsenter", f"--net={ns}", "python3", "-c", UDP_ECHO], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            s.sendto(b"ping-udp", ("127.0.0.1", 15353))
            assert s.recvfrom(100)[0] == b"echo ping-udp"
    finally:
        server.kill()
        server.wait()
    assert vmrt("port", cid).stdout == b"5353/udp -> 127.0.0.1:15353\n"
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.parametrize("args,message", [
    (("-p", "99999:80"), "invalid host port"),
    (("-p", "80:80/sctp"), "invalid protocol"),
    (("-p", "8000-8002:80-81"), "differ in size"),
    (("--network", "nosuchnet"), "network nosuchnet not found"),
    (("--network", "none", "-p", "80:80"), "need a bridge network"),
    (("--network-alias", "x"), "only supported for user-defined networks"),
    (("--add-host", "nocolon"), "invalid --add-host"),
    (("--dns", "not-an-ip"), "invalid --dns"),
    (("--network", "container:other"), "not supported"),
])
def test_bad_network_flags_are_one_line_errors(vmrt: Vmrt, args: tuple[str, ...], message: str) -> None:
    r = vmrt("run", "--rm", "--isolation=process", *args, "busybox", "true")
    assert r.returncode == 125
    assert message in one_line_error(r.stderr)
    assert vmrt("ps", "-aq").stdout == b""
    vmrt.assert_clean()


# --- network commands ------------------------------------------------------------------------

def test_network_create_inspect_connect_disconnect_rm(vmrt: Vmrt) -> None:
    netcreate(vmrt, "front", "--subnet", "10.202.7.0/24", "--label", "tier=web")
    netcreate(vmrt, "back")
    try:
        r = vmrt("network", "create", "front")
        assert r.returncode == 125 and "already exists" in one_line_error(r.stderr)
        r = vmrt("network", "create", "--subnet", "10.202.7.128/25", "clash")
        assert r.returncode == 125 and "overlaps" in one_line_error(r.stderr)
        names = vmrt("network", "ls", "--format", "{{.Name}}").stdout.decode().split()
        assert {"bridge", "host", "none", "front", "back"} <= set(names)
        doc = json.loads(vmrt("network", "inspect", "front").stdout)[0]
        assert doc["IPAM"]["Config"] == [{"Subnet": "10.202.7.0/24", "Gateway": "10.202.7.1"}]
        assert doc["Labels"] == {"tier": "web"} and doc["Containers"] == {}

        srv = detach(vmrt, "process", "sh", "-c", HTTPD.format(port=8080), opts=("--network", "back", "--name", "api"))
        app = detach(vmrt, "process", "sleep", "120", opts=("--network", "front", "--name", "app"))
        members = json.loads(vmrt("network", "inspect", "front").stdout)[0]["Containers"]
        assert [m["Name"] for m in members.values()] == ["app"]
        assert members[app]["IPv4Address"] == "10.202.7.2/24"
        # app cannot reach api until it is connected to back (a second interface, eth1)
        assert vmrt("exec", app, "timeout", "5", "wget", "-q", "-O-", "http://api:8080/").returncode != 0
        r = vmrt("network", "connect", "--alias", "application", "back", "app")
        assert r.returncode == 0, r.stderr
        r = vmrt("exec", app, "sh", "-c", "ip -o -4 addr show eth1 | wc -l; timeout 10 wget -q -O- http://api:8080/")
        assert r.stdout.decode().splitlines() == ["1", f"hello-from-{srv[:12]}"], r.stderr
        # api now knows app by its alias on back
        assert vmrt("exec", srv, "ping", "-c1", "-W3", "application").returncode == 0
        settings = inspect(vmrt, app)["NetworkSettings"]["Networks"]
        assert set(settings) == {"front", "back"}
        r = vmrt("network", "rm", "back")
        assert r.returncode == 1 and b"active endpoints" in r.stderr
        r = vmrt("network", "disconnect", "back", "app")
        assert r.returncode == 0, r.stderr
        assert vmrt("exec", app, "sh", "-c", "ip link show eth1").returncode != 0
        assert set(inspect(vmrt, app)["NetworkSettings"]["Networks"]) == {"front"}
        r = vmrt("network", "rm", "bridge")
        assert r.returncode == 1 and b"pre-defined network" in r.stderr
        rm(vmrt, srv, app)
    finally:
        netrm(vmrt, "front", "back")
    assert "front" not in vmrt("network", "ls").stdout.decode()
    r = vmrt("network", "inspect", "front")
    assert r.returncode == 1 and b"not found" in r.stderr
    vmrt.assert_clean()


def test_vm_connect_while_running_is_refused(vmrt: Vmrt) -> None:
    netcreate(vmrt, "vmnet")
    try:
        cid = detach(vmrt, "vm", "sleep", "60")
        r = vmrt("network", "connect", "vmnet", cid)
        assert r.returncode == 125 and "fixed at boot" in one_line_error(r.stderr)
        rm(vmrt, cid)
    finally:
        netrm(vmrt, "vmnet")
    vmrt.assert_clean()


# --- teardown after faults -------------------------------------------------------------------

def _monitor_pids(cid: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if cid.encode() in cmd and (b"vmrt.monitor" in cmd or b"vmrt-monitor" in cmd):
            out.append(int(pid))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_killed_monitor_and_a_reboot_leave_nothing_that_blocks_the_port(vmrt: Vmrt, mode: str) -> None:
    """The monitor killed with SIGKILL: reconciling removes namespace, veth, rules. Then a
    'reboot' (every process and /run gone, the database kept): the same published port starts."""
    cid = detach(vmrt, mode, "sleep", "100", opts=("-p", "127.0.0.1:18555:80"))
    for pid in _monitor_pids(cid):
        os.kill(pid, signal.SIGKILL)
    r = vmrt("ps", "-a")  # reconciles
    assert r.returncode == 0
    rm(vmrt, cid)
    vmrt.assert_clean()

    cid = detach(vmrt, "process", "sleep", "100", opts=("-p", "127.0.0.1:18555:80"))
    init = inspect(vmrt, cid)["State"]["Pid"]
    for pid in [*_monitor_pids(cid), init]:
        os.kill(pid, signal.SIGKILL)
    for line in reversed(open("/proc/self/mountinfo").read().splitlines()):
        mp = line.split()[4]
        if mp.startswith(str(vmrt.run_root)):
            subprocess.run(["umount", "-l", mp], check=True)
    subprocess.run(["rm", "-rf", str(vmrt.run_root / "containers"), str(vmrt.run_root / "runtime"),
                    str(vmrt.run_root / "netns")], check=True)
    again = detach(vmrt, "process", "sh", "-c", HTTPD.format(port=80), opts=("-p", "127.0.0.1:18555:80"))
    assert fetch("http://127.0.0.1:18555/") == f"hello-from-{again[:12]}\n"
    rm(vmrt, cid, again)
    vmrt.assert_clean()


# --- parsing (no containers) -----------------------------------------------------------------

def test_parse_publish() -> None:
    P = network.PortMapping
    assert network.parse_publish("8888:8080") == [P("", 8888, 8080, "tcp")]
    assert network.parse_publish("127.0.0.1:53:53/udp") == [P("127.0.0.1", 53, 53, "udp")]
    assert network.parse_publish("0.0.0.0:80:8080") == [P("", 80, 8080, "tcp")]
    assert network.parse_publish("9000-9001:7000-7001") == [P("", 9000, 7000), P("", 9001, 7001)]
    assert network.parse_publish("8080") == [P("", 0, 8080)]
    assert network.parse_publish("127.0.0.1::8080") == [P("127.0.0.1", 0, 8080)]
    for bad in ("0:80", "80:70000", "a:b", "1.2.3:80:80", "80:80/icmp", "9-8:1-2", "[::1]:80:80", "1:2:3:4"):
        with pytest.raises(Exception):  # noqa: B017 - UsageError, a one-line message
            network.parse_publish(bad)


def test_ruleset_text() -> None:
    """The nftables tables vmrt writes: DNAT per published port (host address or all local ones),
    masquerade per non-internal network, drops between networks, anti-spoofing per veth."""
    a = network.Network("a" * 64, "bridge", "10.1.0.0/24", "10.1.0.1", "br-a")
    b = network.Network("b" * 64, "other", "10.2.0.0/24", "10.2.0.1", "br-b", internal=True)
    ep = network.Endpoint("c" * 64, a.id, "10.1.0.2", "02:56:0a:01:00:02", "eth0", "vcccccccccc0", [], "c",
                          [network.PortMapping("", 8888, 8080), network.PortMapping("127.0.0.1", 53, 53, "udp")])
    text = network.ruleset("vmrt_t", [a, b], [ep], 0x1234)
    assert 'meta nfproto ipv4 tcp dport 8888 dnat ip to 10.1.0.2:8080 comment "cccccccccccc"' in text
    assert "ip daddr 127.0.0.1 udp dport 53 dnat ip to 10.1.0.2:53" in text
    assert 'ip saddr 10.1.0.0/24 oifname != "br-a" masquerade' in text
    assert "10.2.0.0/24" not in text  # internal: no NAT out, no forwarding out
    assert "iifname @bridges oifname @bridges drop" in text
    assert '"vcccccccccc0" : goto ep_vcccccccccc0' in text and "ip saddr 10.1.0.2 accept" in text
    assert text.startswith("table ip vmrt_t\ndelete table ip vmrt_t\ntable inet vmrt_t\ndelete table inet vmrt_t\n")


# --- an "outside" host the test creates: outbound NAT and published ports from elsewhere ----

PEER_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.250.0.2", 9999)); s.listen(8)
print("ready", flush=True)
while True:
    c, addr = s.accept()
    c.sendall(f"you-are {addr[0]}\n".encode()); c.close()
"""


@pytest.fixture
def outside() -> Iterator[str]:
    """A network namespace ``vmrtext`` as another host on a link 10.250.0.0/24 to this one
    (host side 10.250.0.1), running a server that tells each client its source address."""
    ns = f"vmrtext{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", "vxhost0", "type", "veth", "peer", "name", "vxpeer0",
                        "netns", ns], check=True)
        subprocess.run(["ip", "addr", "add", "10.250.0.1/24", "dev", "vxhost0"], check=True)
        subprocess.run(["ip", "link", "set", "vxhost0", "up"], check=True)
        for cmd in (["ip", "addr", "add", "10.250.0.2/24", "dev", "vxpeer0"], ["ip", "link", "set", "vxpeer0", "up"],
                    ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", "10.250.0.1"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        server = track(subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", PEER_SERVER],
                                        stdout=subprocess.PIPE))  # killed at the test's end if this fails
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        yield ns
        server.kill()
        server.wait()
    finally:
        subprocess.run(["ip", "link", "del", "vxhost0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("mode", MODES)
def test_outbound_nat_and_a_published_port_from_another_host(vmrt: Vmrt, outside: str, mode: str) -> None:
    """The container reaches a host outside (seen there as the host's address: masqueraded), and
    that host reaches the container's published port through this host's address."""
    cid = detach(vmrt, mode, "sh", "-c", HTTPD.format(port=8080), opts=("-p", "18777:8080"))
    r = vmrt("exec", cid, "sh", "-c", "for i in $(seq 20); do nc 10.250.0.2 9999 && break; sleep 0.3; done")
    assert r.stdout == b"you-are 10.250.0.1\n", r.stderr  # not the container's own 10.200.x address
    r = subprocess.run(["ip", "netns", "exec", outside, "python3", "-c", "import urllib.request, sys; sys.stdout."
                        "write(urllib.request.urlopen('http://10.250.0.1:18777/', timeout=20).read().decode())"],
                       capture_output=True, timeout=60)
    assert r.stdout == f"hello-from-{cid[:12]}\n".encode(), r.stderr
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.vm
def test_a_running_vm_learns_names_that_come_and_go(vmrt: Vmrt) -> None:
    """Names on a user network are live: a VM started first sees a later container in its
    /etc/hosts (rewritten on the host, read through virtio-fs) and no longer once it is gone."""
    netcreate(vmrt, "livenet")
    vm = detach(vmrt, "vm", "sleep", "120", opts=("--network", "livenet", "--name", "first"))
    _names_come_and_go(vmrt, vm, "livenet")


def _names_come_and_go(vmrt: Vmrt, vm: str, net: str) -> None:
    """A container that joins ``net`` after ``vm`` is in its /etc/hosts and reachable by name, and
    gone from there once removed; then ``vm`` and ``net`` go."""
    later = detach(vmrt, "process", "sleep", "120", opts=("--network", net, "--name", "later"))
    r = vmrt("exec", vm, "sh", "-c", "for i in $(seq 50); do grep -q later /etc/hosts && break; sleep 0.1; done; "
             "ping -c1 -W5 later >/dev/null && echo reached")
    assert r.stdout == b"reached\n", r.stderr
    rm(vmrt, later)
    r = vmrt("exec", vm, "sh", "-c", "for i in $(seq 50); do grep -q later /etc/hosts || break; sleep 0.1; done; "
             "grep -c later /etc/hosts")
    assert r.stdout == b"0\n", r.stderr
    rm(vmrt, vm)
    netrm(vmrt, net)
    vmrt.assert_clean()


@pytest.mark.vm
def test_a_restored_vm_on_a_user_network_learns_names_too(vmrt: Vmrt, snap: Path) -> None:
    """Issue 17: a container on a user network is served from the snapshot cache as well; its
    clone mounts the 9p share uncached (SHARE_FRESH), so the names rewritten on the host while
    it runs reach it, as through virtio-fs."""
    netcreate(vmrt, "cachednet")
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "--network", "cachednet", "busybox", "true")
    assert r.returncode == 0 and f"snapshot={snap.name}".encode() in r.stderr, r.stderr
    vm = detach(vmrt, "vm", "sleep", "120", opts=("--network", "cachednet", "--name", "first"))
    qemu = int(vmrt("inspect", "-f", "{{.State.Pid}}", vm).stdout)
    assert b"-incoming" in Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")  # restored, not booted
    _names_come_and_go(vmrt, vm, "cachednet")


@pytest.mark.vm
def test_a_restored_vm_publishes_ports_with_a_tmpfs_and_two_cpus(vmrt: Vmrt, snap: Path) -> None:
    """Issue 17: published ports and --tmpfs are served from the cache (the default shape's
    snapshot), and a --cpus 2 shape gets its own snapshot (built here, then restored)."""
    cid = detach(vmrt, "vm", "sh", "-c", "grep -q ' /scratch tmpfs ' /proc/mounts && " + HTTPD.format(port=8080),
                 opts=("-p", "127.0.0.1:18779:8080", "--tmpfs", "/scratch"))
    qemu = int(vmrt("inspect", "-f", "{{.State.Pid}}", cid).stdout)
    assert b"-incoming" in Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")  # restored
    assert fetch("http://127.0.0.1:18779/") == f"hello-from-{cid[:12]}\n"
    rm(vmrt, cid)
    assert vmrt("snapshot", "build", "--cpus", "2", timeout=300).returncode == 0
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "--cpus", "2", "busybox", "nproc")
    assert r.returncode == 0 and r.stdout == b"2\n", r.stderr
    assert re.search(rb"snapshot=[0-9a-f]{16} ", r.stderr), r.stderr
    vmrt.assert_clean()


def test_restarts_get_their_network_again(vmrt: Vmrt) -> None:
    """A restart policy brings the container back with its address and published port; after
    the last run nothing of its network is left."""
    cid = detach(vmrt, "process", "sh", "-c", "ip -4 -o addr show eth0 | wc -l; exit 3",
                 opts=("--restart", "on-failure:2", "-p", "127.0.0.1:18999:80"))
    r = vmrt("wait", cid)
    deadline = time.monotonic() + 60
    while inspect(vmrt, cid)["RestartCount"] < 2 or inspect(vmrt, cid)["State"]["Status"] != "exited":
        assert time.monotonic() < deadline, "restarts did not finish"
        time.sleep(0.2)
        r = vmrt("wait", cid)
    assert r.stdout == b"3\n"
    assert vmrt("logs", cid).stdout == b"1\n1\n1\n"  # eth0 with its address, each of the 3 runs
    rm(vmrt, cid)
    vmrt.assert_clean()


def test_publish_all_uses_the_images_expose(vmrt: Vmrt, tmp_path: Path) -> None:
    """`-P` publishes the ports the image EXPOSEs (here an image imported with `-c 'EXPOSE ...'`)."""
    tar = tmp_path / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add("/bin/busybox", "bin/busybox")
        for applet in ("sh", "mkdir", "hostname", "httpd"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(link)
    r = vmrt("import", str(tar), "exposing:1", "-c", "EXPOSE 9191", "-c", 'CMD ["sh"]')
    assert r.returncode == 0, r.stderr
    cid = vmrt("run", "-d", "--isolation=process", "-P", "exposing:1", "sh", "-c",
               HTTPD.format(port=9191)).stdout.decode().strip()
    host = vmrt("port", cid, "9191").stdout.decode().strip()
    assert host.startswith("0.0.0.0:")
    assert fetch(f"http://127.0.0.1:{host.rpartition(':')[2]}/") == f"hello-from-{cid[:12]}\n"
    assert inspect(vmrt, cid)["Config"]["ExposedPorts"] == {"9191/tcp": {}}
    rm(vmrt, cid)
    assert vmrt("rmi", "exposing:1").returncode == 0
    vmrt.assert_clean()
