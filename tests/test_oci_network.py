"""vmrt-runtime in an engine's network namespace (issue 19 part 4): the spec names a namespace by
path (podman's netavark/CNI, Kubernetes), with an ``eth0`` the engine configured; a VM container
takes that interface (tap0 beside it, tc redirects both ways, the guest gets its MAC, MTU and
addresses), a process container joins the namespace (runc's).

The "engine" here is the test: it makes the namespace (``ip netns add``, a private name), a
veth pair to the host side with addresses in a private subnet (10.250.20+SLOT.0/24 and an
IPv6 ULA), and a bundle whose spec names ``/run/netns/NAME``. From the host side it reaches the
container's HTTP server (busybox httpd) at the engine's address, and the container reaches a
listener on the host side (busybox nc). Teardown leaves nothing (the runtime's leak check), and
the namespace as the engine made it: no tap, no tc filter, eth0's addresses and routes back.
The namespace paths a hostile bundle could give (a file, a FIFO, another kind of namespace, the
host's own) are refused in one line before anything is made.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import SLOT, Vmrt
from test_oci_runtime import Runtime, _wait

N = int(SLOT or 0)
NET4 = f"10.250.{20 + N}"
NET6 = f"fd00:250:{20 + N}::"
PORT = 8080
MAC = f"02:fe:00:00:{20 + N:02x}:02"
MTU = 1400


@dataclass
class EngineNs:
    name: str
    path: str
    host_if: str

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True, check=True).stdout

    def tc(self, *args: str) -> str:
        return subprocess.run(["tc", "-n", self.name, *args], capture_output=True, text=True, check=True).stdout


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _ipv6_here() -> bool:
    return Path("/proc/sys/net/ipv6").is_dir()


@contextlib.contextmanager
def _netns(tag: str, *, ifaces: int = 1) -> Iterator[EngineNs]:
    """A namespace as an engine makes one: eth0 (a veth, MAC and MTU set) with an address, a
    default route, and IPv6 where the host has it; ``ifaces`` 0 gives lo only."""
    ns = EngineNs(f"vmrt-oci{N}{tag}-{os.getpid()}", "", f"voci{N}{tag}")
    ns.path = f"/run/netns/{ns.name}"
    _run("ip", "netns", "add", ns.name)
    try:
        _run("ip", "-n", ns.name, "link", "set", "lo", "up")
        for i in range(ifaces):
            host = f"{ns.host_if}{i}"
            _run("ip", "link", "add", host, "mtu", str(MTU), "type", "veth", "peer", "name", f"eth{i}",
                 "netns", ns.name)
            _run("ip", "-n", ns.name, "link", "set", f"eth{i}", "address", MAC if i == 0 else f"02:fe:00:01:00:{i:02x}",
                 "mtu", str(MTU))
            if _ipv6_here():
                _run("sysctl", "-qw", f"net.ipv6.conf.{host}.disable_ipv6=0")
                _run("ip", "netns", "exec", ns.name, "sysctl", "-qw", f"net.ipv6.conf.eth{i}.disable_ipv6=0")
                _run("ip", "netns", "exec", ns.name, "sysctl", "-qw", f"net.ipv6.conf.eth{i}.accept_dad=0")
            _run("ip", "addr", "add", f"{NET4}.1/24" if i == 0 else f"10.250.{30 + N}.1/24", "dev", host)
            _run("ip", "link", "set", host, "up")
            _run("ip", "-n", ns.name, "addr", "add", f"{NET4}.2/24" if i == 0 else f"10.250.{30 + N}.2/24",
                 "dev", f"eth{i}")
            _run("ip", "-n", ns.name, "link", "set", f"eth{i}", "up")
            if i == 0:
                _run("ip", "-n", ns.name, "route", "add", "default", "via", f"{NET4}.1")
                if _ipv6_here():
                    _run("ip", "addr", "add", f"{NET6}1/64", "dev", host, "nodad")
                    _run("ip", "-n", ns.name, "addr", "add", f"{NET6}2/64", "dev", "eth0", "nodad")
                    _run("ip", "-n", ns.name, "-6", "route", "add", "default", "via", f"{NET6}1")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        for i in range(ifaces):  # the namespace's end goes with it, and its peer with it
            subprocess.run(["ip", "link", "del", f"{ns.host_if}{i}"], capture_output=True)


@pytest.fixture
def engine_ns() -> Iterator[EngineNs]:
    with _netns("a") as ns:
        yield ns


@pytest.fixture
def rt(vmrt: Vmrt, tmp_path: Path) -> Iterator[Runtime]:
    runtime = Runtime(vmrt, tmp_path)
    yield runtime
    r = runtime("list", "--format", "json")
    for entry in json.loads(r.stdout or b"null") or []:
        runtime("delete", "--force", entry["id"])


def _bundle(rt: Runtime, name: str, mode: str, netns: str, script: str, notes: dict[str, str] | None = None) -> Path:
    b = rt.bundle(name, mode, ["sh", "-c", script])
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"].update(notes or {})
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    spec["linux"]["namespaces"].append({"type": "network", "path": netns})
    (b / "config.json").write_text(json.dumps(spec))
    return b


class _Listener:
    """The host side's listener: the address each client came from and what it said."""

    def __init__(self, addr: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, 0))
        self.sock.listen(4)
        self.sock.settimeout(120)
        self.port = self.sock.getsockname()[1]
        self.got: list[tuple[str, bytes]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, peer = self.sock.accept()
            with conn:
                conn.settimeout(30)
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                self.got.append((peer[0], data))

    def close(self) -> None:
        self.sock.close()


def _get(url: str, timeout: float = 120.0) -> bytes:
    """The page, once the server answers (the container's start takes a while under TCG)."""
    body: list[bytes] = []

    def fetch() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body.append(r.read())
            return True
        except OSError:
            return False
    assert _wait(fetch, timeout), f"no answer from {url}"
    return body[0]


def _server_script(host_port: int) -> str:
    """The container: what it sees of its network into /out, a line to the host's listener, then
    an HTTP server on the engine's address."""
    return ("busybox ip -o link show eth0 > /out/link; busybox ip -o addr show dev eth0 > /out/addr; "
            "busybox ip route > /out/route; busybox ip -6 route >> /out/route; "
            "mkdir -p /tmp/www; echo hello-from-the-container > /tmp/www/index.html; "
            f"for i in 1 2 3 4 5 6 7 8 9 10; do echo from-the-container | busybox nc {NET4}.1 {host_port} && break; "
            "sleep 1; done; "
            f"exec busybox httpd -f -p {PORT} -h /tmp/www")


def _namespace_as_made(ns: EngineNs) -> None:
    """The namespace as the engine made it: no tap, no ingress qdisc on eth0, its addresses and
    default routes back."""
    assert "tap0" not in ns.ip("-o", "link"), ns.ip("-o", "link")
    assert "ingress" not in ns.tc("qdisc", "show", "dev", "eth0")
    assert ns.tc("filter", "show", "dev", "eth0", "ingress").strip() == ""
    assert f"inet {NET4}.2/24" in ns.ip("-o", "-4", "addr", "show", "dev", "eth0")
    assert f"default via {NET4}.1 dev eth0" in ns.ip("-4", "route")
    if _ipv6_here():
        assert f"inet6 {NET6}2/64" in ns.ip("-o", "-6", "addr", "show", "dev", "eth0")
        assert f"default via {NET6}1 dev eth0" in ns.ip("-6", "route")


def _serve_and_check(rt: Runtime, ns: EngineNs, mode: str, cid: str) -> dict[str, Any]:
    """A container in ``ns``: the host side reaches its server at the engine's address (also over
    IPv6 where the host has it), it reaches the host side. Returns what it saw of its network."""
    listener = _Listener(f"{NET4}.1")
    try:
        b = _bundle(rt, cid, mode, ns.path, _server_script(listener.port))
        r = rt("create", "--bundle", str(b), cid)
        assert r.returncode == 0, r.stderr
        assert rt("start", cid).returncode == 0
        assert _get(f"http://{NET4}.2:{PORT}/") == b"hello-from-the-container\n"
        if _ipv6_here():
            assert _get(f"http://[{NET6}2]:{PORT}/", 30) == b"hello-from-the-container\n"
        listener.thread.join(60)
        assert listener.got == [(f"{NET4}.2", b"from-the-container\n")], listener.got
        seen = {n: (b / "out" / n).read_text() for n in ("link", "addr", "route")}
        during = {"ns_addr": ns.ip("-o", "addr", "show", "dev", "eth0"), "links": ns.ip("-o", "link"),
                  "filters": ns.tc("filter", "show", "dev", "eth0", "ingress")}
        assert rt("kill", cid, "KILL").returncode == 0
        assert _wait(lambda: rt.state(cid)["status"] == "stopped")
        assert rt("delete", cid).returncode == 0
        rt.gone(cid)
        return {**seen, **during}
    finally:
        listener.close()


@pytest.mark.vm
def test_a_vm_container_takes_the_engines_interface(rt: Runtime, engine_ns: EngineNs) -> None:
    ns = engine_ns
    got = _serve_and_check(rt, ns, "vm", "n1")
    # the guest is the container on the engine's network: its MAC, MTU, address and routes
    assert MAC in got["link"] and f"mtu {MTU}" in got["link"], got["link"]
    assert f"inet {NET4}.2/24" in got["addr"], got["addr"]
    assert f"default via {NET4}.1 dev eth0" in got["route"], got["route"]
    if _ipv6_here():
        assert f"inet6 {NET6}2/64" in got["addr"] and f"default via {NET6}1 dev eth0" in got["route"], got
    # meanwhile the namespace's own stack had given the addresses up, and redirected eth0 to tap0
    assert not re.search(r"\binet6? ", got["ns_addr"]), got["ns_addr"]
    assert "tap0" in got["links"] and "mirred" in got["filters"] and "tap0" in got["filters"], got
    _namespace_as_made(ns)
    rt.v.assert_clean()


@pytest.mark.vm
def test_the_namespace_gives_up_its_addresses_while_the_vm_runs(rt: Runtime, engine_ns: EngineNs) -> None:
    """While the VM runs eth0 has no address in the namespace (nothing there answers ARP for the
    guest's address), the redirect is on; after delete all is back."""
    ns = engine_ns
    b = _bundle(rt, "g", "vm", ns.path, "sleep 300")
    r = rt("create", "--bundle", str(b), "g1")
    assert r.returncode == 0, r.stderr
    assert rt("start", "g1").returncode == 0
    assert "inet" not in ns.ip("-o", "addr", "show", "dev", "eth0")
    assert "mirred" in ns.tc("filter", "show", "dev", "tap0", "ingress")
    assert "disable_ipv6 = 1" in subprocess.run(["ip", "netns", "exec", ns.name, "sysctl", "net.ipv6.conf.tap0"],
                                                capture_output=True, text=True).stdout or not _ipv6_here()
    # a second VM container in the same namespace is refused: the interface is taken
    b2 = _bundle(rt, "g2", "vm", ns.path, "true")
    r = rt("create", "--bundle", str(b2), "g2")
    assert r.returncode != 0 and b"taken by another VM" in r.stderr, r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
    rt.gone("g2")
    assert rt("delete", "--force", "g1").returncode == 0
    rt.gone("g1")
    _namespace_as_made(ns)
    rt.v.assert_clean()


@pytest.mark.vm
def test_a_pods_sandbox_vm_leaves_the_interface_to_the_pods_container(rt: Runtime, engine_ns: EngineNs) -> None:
    """Kubernetes: the pod's sandbox ("pause") container comes first, in the pod's namespace, and
    gets the pod's annotations (a VM too); CRI marks it. Its VM takes no interface, the pod's
    container's VM does."""
    ns = engine_ns
    pause = _bundle(rt, "pause", "vm", ns.path, "sleep 300", {"io.kubernetes.cri.container-type": "sandbox"})
    r = rt("create", "--bundle", str(pause), "pause")
    assert r.returncode == 0, r.stderr
    assert rt("start", "pause").returncode == 0
    assert "tap0" not in ns.ip("-o", "link") and f"inet {NET4}.2/24" in ns.ip("-o", "addr", "show", "dev", "eth0")
    _serve_and_check(rt, ns, "vm", "app")
    assert rt("delete", "--force", "pause").returncode == 0
    rt.gone("pause")
    _namespace_as_made(ns)
    rt.v.assert_clean()


def test_a_process_container_joins_the_namespace(rt: Runtime, engine_ns: EngineNs) -> None:
    """runc joins the namespace: the same reachability, and eth0 stays as the engine made it."""
    ns = engine_ns
    got = _serve_and_check(rt, ns, "process", "p1")
    assert MAC in got["link"] and f"inet {NET4}.2/24" in got["addr"], got
    assert "tap0" not in got["links"] and got["filters"].strip() == ""
    _namespace_as_made(ns)
    rt.v.assert_clean()


@pytest.mark.vm
def test_lo_only_gives_a_vm_without_network(rt: Runtime) -> None:
    with _netns("l", ifaces=0) as ns:
        b = _bundle(rt, "l", "vm", ns.path, "busybox ip -o -4 addr; busybox ip -o link show eth0")
        r = rt("run", "--bundle", str(b), "l1")
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        eth0 = next(line for line in out.splitlines() if "eth0" in line)
        assert "127.0.0.1" in out and "inet 10." not in out and ",UP" not in eth0.split(">")[0], out
        assert len(ns.ip("-o", "link").splitlines()) == 1  # lo: nothing was made in it
    rt.gone("l1")
    rt.v.assert_clean()


@pytest.mark.vm
def test_namespace_paths_a_bundle_cannot_use(rt: Runtime, tmp_path: Path) -> None:
    """The attacker's paths: a regular file, a FIFO (opening it would block), a symlink to a file,
    a namespace of another kind, the runtime's own network namespace, a relative path, a missing
    one; and what cannot work: two interfaces. Each refused in one line, nothing made."""
    paths = tmp_path / "paths"
    paths.mkdir()
    plain = paths / "not-a-netns"
    plain.write_text("x")
    fifo = paths / "fifo"
    os.mkfifo(fifo)
    link = paths / "link"
    link.symlink_to(plain)
    cases = {"file": (str(plain), "not a namespace file"), "fifo": (str(fifo), "not a namespace file"),
             "symlink": (str(link), "not a namespace file"),
             "mntns": ("/proc/self/ns/mnt", "not a network namespace"),
             "host": (f"/proc/{os.getpid()}/ns/net", "is the host's"),
             "relative": ("run/netns/x", "not an absolute path"),
             "missing": (str(paths / "nope"), "No such file")}
    for name, (path, why) in cases.items():
        b = _bundle(rt, name, "vm", path, "true")
        r = rt("create", "--bundle", str(b), name, timeout=120)
        assert r.returncode != 0 and why.encode() in r.stderr, (name, r.stderr)
        assert len(r.stderr.decode().strip().splitlines()) == 1 and b"Traceback" not in r.stderr, (name, r.stderr)
        rt.gone(name)
    assert plain.read_text() == "x"
    with _netns("t", ifaces=2) as ns:
        b = _bundle(rt, "two", "vm", ns.path, "true")
        r = rt("create", "--bundle", str(b), "two")
        assert r.returncode != 0 and b"joins one network" in r.stderr, r.stderr
        rt.gone("two")
        assert f"inet {NET4}.2/24" in ns.ip("-o", "-4", "addr", "show", "dev", "eth0")  # untouched
    rt.v.assert_clean()


@pytest.mark.vm
def test_a_pooled_vm_takes_the_engines_interface(rt: Runtime, engine_ns: EngineNs) -> None:
    """A pooled VM (its tap made in the pool's namespace) is moved into the engine's: the same,
    with the container's disk (where vmrt keeps every container's) swapped in."""
    v = rt.v
    assert v("pool", "start", "--size", "1").returncode == 0
    try:
        assert v("pool", "fill", "--wait", timeout=300).returncode == 0
        _serve_and_check(rt, engine_ns, "vm", "pool1")
        st = json.loads(v("pool", "--format", "json").stdout)
        assert st["Served"] == 1, st
    finally:
        assert v("pool", "stop").returncode == 0
    _namespace_as_made(engine_ns)
    v.assert_clean()


# --- a real engine: podman with a CNI bridge network of the test's own ------------------------
@pytest.mark.parametrize("mode", ["process", pytest.param("vm", marks=pytest.mark.vm)])
def test_podman_with_a_cni_bridge_network(rt: Runtime, tmp_path: Path, mode: str) -> None:
    """podman makes the namespace (CNI's bridge plugin: a veth on a bridge of the test's own,
    host-local addresses) and names it in the spec; the host reaches the container's server at the
    address podman gave it and at the port it published on 127.0.0.1 (CNI's portmap plugin), and
    podman's teardown (CNI DEL) finds its interface as it left it."""
    if not shutil.which("podman") or not Path("/usr/lib/cni/bridge").exists():
        pytest.fail("podman and the CNI plugins are set-up's (setup.sh installs them)")
    chains_before, tables_before = _cni_chains(), _nft_tables()
    name, bridge, net = f"vmrtoci{N}", f"vmrtoci{N}", f"10.250.{40 + N}"
    d = Path(tempfile.mkdtemp(prefix="vmrt-pn-"))  # podman refuses a long run root
    cni = d / "cni"
    cni.mkdir()
    (cni / f"{name}.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": name,
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                     "ipam": {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}],
                              "ranges": [[{"subnet": f"{net}.0/24", "gateway": f"{net}.1"}]]}},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    published = 18600 + N
    conf = d / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
                    '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                    f'[network]\nnetwork_backend = "cni"\nnetwork_config_dir = "{cni}"\n')
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    base = ["podman", "--root", str(d / "storage"), "--runroot", str(d / "run"), "--tmpdir", str(d / "tmp"),
            "--storage-driver", "vfs", "--runtime", str(rt.wrapper)]

    def podman(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*base, *args], capture_output=True, env=env, timeout=240, stdin=subprocess.DEVNULL,
                              check=False)
    rootfs = rt.bundle("pm", mode, ["true"]) / "rootfs"
    try:
        r = podman("run", "-d", "--name", "web", "--network", name, "--annotation", f"io.vmrt.isolation={mode}",
                   "-p", f"127.0.0.1:{published}:{PORT}", "--rootfs", str(rootfs), "sh", "-c",
                   "mkdir -p /tmp/www; echo hello-from-podman > "
                   f"/tmp/www/index.html; exec busybox httpd -f -p {PORT} -h /tmp/www")
        assert r.returncode == 0, r.stderr
        ip = podman("inspect", "web", "--format", f"{{{{.NetworkSettings.Networks.{name}.IPAddress}}}}")
        addr = ip.stdout.decode().strip()
        assert addr.startswith(f"{net}."), ip
        assert _get(f"http://{addr}:{PORT}/") == b"hello-from-podman\n"
        assert _get(f"http://127.0.0.1:{published}/") == b"hello-from-podman\n"
        assert podman("stop", "-t", "5", "web").returncode == 0
        r = podman("rm", "web")
        assert r.returncode == 0, r.stderr
        assert not list(Path("/var/lib/cni/networks", name).glob(f"{net}.*"))  # CNI DEL released the address
    finally:
        podman("rm", "-af", "-t", "0")
        subprocess.run(["umount", "-R", str(d)], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(Path("/var/lib/cni/networks", name), ignore_errors=True)
        _drop_cni_chains(_cni_chains() - chains_before)
        _drop_empty_tables(_nft_tables() - tables_before)
    assert not _cni_chains() - chains_before
    assert not _nft_tables() - tables_before
    rt.v.assert_clean()


# the chains CNI's portmap and firewall plugins add to iptables once and leave (their scaffolding,
# empty once every mapping is gone), with the rules that jump to them
_CNI_JUMPS = {
    ("filter", "CNI-FORWARD"): [["FORWARD", "-m", "comment", "--comment", "CNI firewall plugin rules"]],
    ("nat", "CNI-HOSTPORT-DNAT"): [["PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL"],
                                   ["OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL"]],
    ("nat", "CNI-HOSTPORT-MASQ"): [["POSTROUTING", "-m", "comment", "--comment", "CNI portfwd requiring masquerade"]],
}


def _cni_chains() -> set[tuple[str, str]]:
    found = set()
    for table in ("filter", "nat"):
        out = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True).stdout
        found |= {(table, ln[1:].split()[0]) for ln in out.splitlines() if ln.startswith(":CNI-")}
    return found


def _nft_tables() -> set[tuple[str, str]]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return {(f, n) for _, f, n in (ln.split() for ln in out.splitlines() if ln.startswith("table "))
            if f in ("ip", "ip6") and n in ("nat", "filter", "mangle", "raw")}  # iptables-nft's


def _drop_empty_tables(tables: set[tuple[str, str]]) -> None:
    """The tables iptables-nft made for those chains (``ip nat``, ``ip filter``: base chains only,
    no rule left), gone; a table holding a rule stays, for the assertion to name."""
    for family, name in tables:
        r = subprocess.run(["nft", "-j", "list", "table", family, name], capture_output=True, text=True)
        if r.returncode == 0 and not any("rule" in o for o in json.loads(r.stdout).get("nftables", [])):
            subprocess.run(["nft", "delete", "table", family, name], capture_output=True)


def _drop_cni_chains(chains: set[tuple[str, str]]) -> None:
    """The CNI chains this test made, gone: the jumps to them, then each chain emptied and deleted."""
    for (table, chain), jumps in _CNI_JUMPS.items():
        if (table, chain) in chains:
            for jump in jumps:
                subprocess.run(["iptables", "-t", table, "-D", *jump, "-j", chain], capture_output=True)
    for table, chain in sorted(chains):
        subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
    for table, chain in sorted(chains, key=lambda c: c[1] != "CNI-FORWARD"):  # it jumps to CNI-ADMIN
        subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True)
