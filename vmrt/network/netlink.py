"""Netlink work with pyroute2: bridges, veths, addresses, routes, tc, a pooled VM's tap.

pyroute2 is imported on first use (:func:`_iproute_class`), never at module level: it costs
~100 ms, and a container without a bridge network never needs it (:func:`preload` starts the
import early in the background when one will)."""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import sys
import threading
import types
from pathlib import Path
from typing import Any

from ..errors import NetworkError
from .netns import in_netns, link_exists, remove_netns
from .nft import IfName
from .parse import NetRequest
from .store import Endpoint, Network, check_host_overlap

RTPROT_BOOT = 3  # rtnetlink: a route set up at boot (what ip route add and the kernel default to)

IFA_F_NODAD = 0x02  # linux/if_addr.h: no duplicate address detection for this address


def iproute() -> Any:
    """pyroute2's IPRoute without its package __init__, which imports every netlink family it
    has (~100 ms): vmrt needs rtnetlink only, and this is on the container start path.
    Its ``netns=`` argument is not used: it forks a child that pyroute2 ends with SIGTERM, which
    the parent's asyncio signal handling (the inherited wakeup fd) takes for its own. Work in a
    namespace runs in a thread that entered it (:func:`in_netns`)."""
    return _iproute_class()()


def _iproute_class() -> Any:
    """pyroute2's IPRoute class, imported on first use (see :func:`iproute`)."""
    import importlib.util  # on use, with pyroute2: ~0.7 ms that a run without a bridge never needs
    with _import_lock:
        if "pyroute2" not in sys.modules:
            spec = importlib.util.find_spec("pyroute2")
            if spec is None or spec.submodule_search_locations is None:
                raise NetworkError("pyroute2 is not installed (pip install pyroute2)")
            shell = types.ModuleType("pyroute2")
            shell.__path__ = list(spec.submodule_search_locations)
            shell.__spec__ = spec
            sys.modules["pyroute2"] = shell
    from pyroute2.iproute.linux import IPRoute  # on use: pyroute2 costs ~100 ms at start-up
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


def link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_bridge(net: Network) -> bool:
    """The network's bridge with the gateway address, up; forwarding on (idempotent). True if
    the bridge was made now (then the rules need writing)."""
    IfName(net.bridge)  # it names a /proc/sys path and reaches nft: a strict interface name
    if link_exists(net.bridge) and Path(f"/proc/sys/net/ipv4/conf/{net.bridge}/route_localnet").read_text() == "1\n":
        return False  # set up already (the common case: no netlink round trips)
    _sysctl("net.ipv4.ip_forward", "1")
    subnet = ipaddress.IPv4Network(net.subnet)
    with iproute() as ipr:
        idx = link_index(ipr, net.bridge)
        if idx is None:
            check_host_overlap(subnet)
            try:
                ipr.link("add", ifname=net.bridge, kind="bridge")
            except Exception as e:  # NetlinkError; a concurrent creator is fine
                if link_index(ipr, net.bridge) is None:
                    raise _nl_error(f"cannot create bridge {net.bridge}", e) from None
            idx = link_index(ipr, net.bridge)
        addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
        if net.gateway not in addrs:
            try:
                ipr.addr("add", index=idx, address=net.gateway, prefixlen=subnet.prefixlen)
            except Exception as e:
                raise _nl_error(f"cannot address bridge {net.bridge}", e) from None
        if net.ipv6 and idx is not None:
            _bridge_v6(ipr, idx, net)
        ipr.link("set", index=idx, state="up")
    # published ports reached from 127.0.0.1: DNAT'd loopback traffic may leave through the bridge
    # (and its replies come back); the guard chain keeps containers off the host's loopback
    _sysctl(f"net.ipv4.conf.{net.bridge}.route_localnet", "1")
    return True


def _bridge_v6(ipr: Any, idx: int, net: Network) -> None:
    """An --ipv6 network's bridge: IPv6 on (whatever the host's default), no router advertisement
    taken from a container, and the IPv6 gateway address without duplicate address detection
    (nothing else on the bridge may hold it: the anti-spoofing chains see to that). It goes with
    the bridge (``network rm``)."""
    subnet6 = ipaddress.IPv6Network(net.subnet6)
    ipv6_conf(net.bridge, "disable_ipv6", "0")
    ipv6_conf(net.bridge, "accept_ra", "0")
    addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=socket.AF_INET6)}
    if net.gateway6 not in addrs:
        check_host_overlap(subnet6)
        try:
            ipr.addr("add", index=idx, address=net.gateway6, prefixlen=subnet6.prefixlen, flags=IFA_F_NODAD)
        except Exception as e:
            raise _nl_error(f"cannot give bridge {net.bridge} its IPv6 address", e) from None


def delete_link(name: str) -> None:
    with contextlib.suppress(Exception), iproute() as ipr:
        idx = link_index(ipr, name)
        if idx is not None:
            ipr.link("del", index=idx)


def mac_for(ip: str) -> str:
    """Locally administered, derived from the address (as Docker's 02:42:...)."""
    b = ipaddress.IPv4Address(ip).packed
    return "02:56:" + ":".join(f"{x:02x}" for x in b)


def plumb_veth(net: Network, ep: Endpoint, ns: Path, vm: bool, default_route: bool, group: int,
               default_route6: bool | None = None) -> None:
    """veth: host end on the bridge, the other as ep.ifname in the namespace; process mode puts the
    address and route on it, VM mode redirects it to and from tap0 (the VM's NIC). The host end is
    made in ``group`` (port_group), so the bridge table guards it from its first frame.
    VM mode needs no rule on the tap: it is in the container's namespace, and every frame the guest
    sends is redirected by tc to the veth, whose host end is checked. The IPv6 default route goes
    with ``default_route6`` (None: as ``default_route``): the first network with IPv6 has it."""
    prefix = ipaddress.IPv4Network(net.subnet).prefixlen
    v6 = None
    if net.ipv6 and ep.ip6 and not vm:
        route6 = default_route if default_route6 is None else default_route6
        v6 = (ep.ip6, ipaddress.IPv6Network(net.subnet6).prefixlen, net.gateway6 if route6 else None)
    tmp = "vp" + secrets.token_hex(6)
    if link_exists(ep.host_if):  # the same container's previous run, its namespace still being destroyed
        delete_link(ep.host_if)
    with iproute() as ipr:
        br = link_index(ipr, net.bridge)
        if br is None:
            raise NetworkError(f"bridge {net.bridge} of network {net.name} is gone")
        try:
            ipr.link("add", ifname=ep.host_if, kind="veth", group=group,
                     peer={"ifname": tmp, "net_ns_fd": str(ns)})
        except Exception as e:
            raise _nl_error(f"cannot create veth {ep.host_if}", e) from None
        hidx = link_index(ipr, ep.host_if)
        ipr.link("set", index=hidx, master=br, state="up")
    in_netns(ns, _inside, tmp, ep, vm, prefix, net.gateway if default_route else None, v6)


def _inside(tmp: str, ep: Endpoint, vm: bool, prefix: int, gateway: str | None,
            v6: tuple[str, int, str | None] | None) -> None:
    """The namespace's end of the veth (run inside the namespace). IPv6 on it as Docker's: off on a
    network without IPv6 (only lo keeps ::1); on an --ipv6 one, the address (v6: address, prefix,
    gateway or None) without duplicate address detection and a default route. In VM mode the
    namespace's own interfaces only carry the guest's frames: IPv6 off on both."""
    with iproute() as nsr:
        idx = link_index(nsr, tmp)
        if idx is None:
            raise NetworkError(f"veth {tmp} did not reach the container's namespace")
        nsr.link("set", index=idx, ifname=ep.ifname, **({} if vm else {"address": ep.mac}))
        # before it is up: no link-local address is made, or none probed for (DAD)
        if v6:
            ipv6_conf(ep.ifname, "accept_dad", "0")
        else:
            ipv6_conf(ep.ifname, "disable_ipv6", "1")
        nsr.link("set", index=idx, state="up")
        if vm:
            tap = link_index(nsr, "tap0")
            if tap is None:
                raise NetworkError("the VM's tap0 is missing in its namespace")
            ipv6_conf("tap0", "disable_ipv6", "1")
            nsr.link("set", index=tap, state="up")
            redirect_both(nsr, idx, tap)
            return
        # as Docker's and the VM's eth0: the subnet's broadcast address, a default route of proto boot
        brd = str(ipaddress.IPv4Network(f"{ep.ip}/{prefix}", strict=False).broadcast_address)
        nsr.addr("add", index=idx, address=ep.ip, prefixlen=prefix, broadcast=brd)
        if gateway:
            nsr.route("add", dst="0.0.0.0/0", gateway=gateway, proto=RTPROT_BOOT)
        if v6:
            addr6, prefix6, gateway6 = v6
            nsr.addr("add", index=idx, address=addr6, prefixlen=prefix6)  # accept_dad=0: no DAD (as the VM's)
            if gateway6:
                nsr.route("add", dst="::/0", gateway=gateway6, family=socket.AF_INET6, proto=RTPROT_BOOT)


def redirect_both(nsr: Any, a: int, b: int) -> None:
    """Every frame that comes in on interface ``a`` goes out of ``b`` and the other way round:
    an ingress qdisc on each with a match-all u32 filter whose action is a mirred redirect (as
    Kata Containers' tcfilter). The namespace's own stack never sees those frames."""
    for src, dst in ((a, b), (b, a)):
        nsr.tc("add", "ingress", src, "ffff:")
        nsr.tc("add-filter", "u32", src, parent=0xFFFF0000, protocol=0x0003,  # ETH_P_ALL, match all
               keys=["0x0/0x0+0"], target=0x1,
               action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst})


def adopt_tap(src_ns: Path, dst_ns: Path, name: str = "tap0") -> None:
    """Move a pooled VM's tap from the namespace it was booted in into the container's."""
    def move() -> None:
        with iproute() as ipr:
            idx = link_index(ipr, name)
            if idx is None:
                raise NetworkError(f"the pooled VM's {name} is missing")
            try:
                ipr.link("set", index=idx, net_ns_fd=str(dst_ns))
            except Exception as e:
                raise _nl_error(f"cannot move {name} into the container's namespace", e) from None
    in_netns(src_ns, move)
    remove_netns(src_ns)


def ipv6_conf(ifname: str, key: str, value: str) -> None:
    """An interface's IPv6 setting (of the namespace the calling thread is in: /proc/sys/net is
    per network namespace). The host without IPv6 (ipv6.disable=1) has none to set: an --ipv6
    network is refused there, and nothing is to be turned off."""
    IfName(ifname)  # part of a /proc/sys path
    if not Path("/proc/sys/net/ipv6").is_dir():
        if key == "disable_ipv6" and value == "1":
            return
        raise NetworkError("the host has IPv6 disabled (ipv6.disable=1): an --ipv6 network cannot work here")
    _sysctl(f"net/ipv6/conf/{ifname}/{key}", value)


def _sysctl(key: str, value: str) -> None:
    p = Path("/proc/sys") / (key if "/" in key else key.replace(".", "/"))  # an interface name may hold "."
    try:
        if p.read_text().strip() != value:
            p.write_text(value)
    except OSError as e:
        raise NetworkError(f"cannot set {key}={value}: {e.strerror}") from None
