"""An engine's network namespace, joined by a VM container (vmrt-runtime, issue 19).

An OCI engine (podman with netavark or CNI, containerd's CRI, Kubernetes) makes the container's
network namespace itself and names it in the spec (``linux.namespaces[type=network].path``),
with an interface in it (``eth0``, usually a veth) that it gave a MAC, an address, routes and
perhaps IPv6. runc's container joins that namespace; a VM's processes run in the guest's kernel
and cannot. So, as Kata Containers' ``tcfilter`` mode, the VM's ``tap0`` is made in the
namespace and tc redirects every frame between the engine's interface and the tap (both ways,
an ingress mirred redirect: :func:`netlink.redirect_both`, as vmrt's own VM networking). The
guest's eth0 gets the interface's MAC, MTU, address, default gateway (and its IPv6 address and
gateway): the guest *is* the container on the engine's network.

The namespace's own stack gives the interface's addresses up while the VM runs (IPv4 flushed,
IPv6 off, as Kata flushes them): the frames that arrive on the interface are the guest's and
are redirected before that stack sees them, and nothing in the namespace may send as the
guest's address either. :meth:`Foreign.release`, once the VM is gone, takes the redirect off
the interface and gives it back its addresses and routes (the tap went with QEMU), so that the
engine's teardown (CNI DEL, netavark) finds what it made.

What cannot work is refused in one line: more than one interface (a VM's NIC is fixed at
boot), an interface that is not Ethernet, one without an IPv4 address or with several, a
gateway that is not on the interface's subnet (a /32 with an on-link route, as Calico's), an
interface another VM already redirects. A namespace with only ``lo`` (``--network none``) gives
a VM without network, as without a namespace; so does a Kubernetes pod's sandbox ("pause")
container run as a VM: the pod's interface is left to the pod's container (one per pod: the
next VM in that namespace is refused, its interface being taken).

The path is the spec's, so it is trusted for nothing: it is opened with ``O_PATH`` (nothing is
read or run by opening it), must be a namespace file (``fstatfs``: ``NSFS_MAGIC``) of a network
namespace (``NS_GET_NSTYPE``) and not the runtime's own (a VM never takes over the host's
interface); every later use goes through the one fd kept (``/proc/self/fd/N``), never the path
again.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import ipaddress
import logging
import os
import re
import socket
import struct
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import NetworkError
from .attach import Attached
from .netlink import iproute, ipv6_conf, link_index, redirect_both
from .netns import CLONE_NEWNET, in_netns
from .store import Endpoint, Network

LOG = logging.getLogger(__name__)

NSFS_MAGIC = 0x6E736673     # linux/magic.h: the file system of /proc/PID/ns/* and their bind mounts
NS_GET_NSTYPE = 0xB703      # linux/nsfs.h: _IO(0xb7, 0x3)
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
RT_TABLE_MAIN = 254
RTPROT_KERNEL, RTPROT_RA = 2, 9  # routes the kernel (or a router advertisement) makes again by itself
IFA_F_TEMPORARY = 0x01      # an IPv6 privacy address (IFA_F_SECONDARY for IPv4)
IFA_F_NODAD = 0x02
TAP = "tap0"
SANDBOX_NOTES = ("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType")  # containerd, CRI-O
IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
NETWORK_ID = "engine"       # the one network of a Foreign: the engine's, which vmrt does not know
_libc = ctypes.CDLL(None, use_errno=True)


@dataclasses.dataclass(frozen=True)
class _Addr:
    family: int
    address: str
    prefix: int
    broadcast: str | None = None


@dataclasses.dataclass(frozen=True)
class _Route:
    family: int
    dst: str | None             # None: the default route
    dst_len: int
    gateway: str | None
    priority: int | None
    proto: int
    scope: int


@dataclasses.dataclass
class Foreign(Attached):
    """The engine's namespace and interface as the VM driver takes a container's network
    (``RunContext.net``): one endpoint (the interface's address and MAC) on one network (its
    subnet and gateway). ``netns`` is the kept fd's ``/proc/self/fd/N``."""

    ifname: str = ""
    ifindex: int = 0
    fd: int = -1
    addrs: list[_Addr] = dataclasses.field(default_factory=list)    # the interface's, given back at release
    routes: list[_Route] = dataclasses.field(default_factory=list)
    ipv6_on: bool = False       # the interface had IPv6 on (it is off while the VM runs)
    taken: bool = False         # _plumb changed the namespace: release undoes it

    def _plumb(self, cfg: Config, isolation: str) -> None:
        assert self.netns is not None
        in_netns(self.netns, self._take)

    def _take(self) -> None:
        """In the namespace: tap0 up with the interface's MTU, the redirect both ways, the
        interface's addresses off."""
        with iproute() as nsr:
            if link_index(nsr, self.ifname) != self.ifindex:
                raise NetworkError(f"{self.ifname} left the engine's network namespace")
            tap = link_index(nsr, TAP)
            if tap is None:
                raise NetworkError(f"the VM's {TAP} is missing in the engine's network namespace")
            self.taken = True
            ipv6_conf(TAP, "disable_ipv6", "1")
            nsr.link("set", index=tap, mtu=self.mtu, state="up")
            redirect_both(nsr, self.ifindex, tap)
            for a in self.addrs:
                if a.family == socket.AF_INET:
                    nsr.addr("del", index=self.ifindex, address=a.address, prefixlen=a.prefix)
            if self.ipv6_on:  # its addresses and routes go with it
                ipv6_conf(self.ifname, "disable_ipv6", "1")

    def release(self) -> None:
        """Once the VM is gone: the redirect off the interface, its addresses and routes back
        (each step on its own: a namespace the engine emptied meanwhile is fine); the fd closed.
        Idempotent."""
        if self.fd < 0:
            return
        self.wait(quiet=True)
        try:
            if self.taken and self.netns is not None:
                in_netns(self.netns, self._give_back)
        except Exception as e:  # noqa: BLE001 - the container is over; say why, do not fail its exit
            LOG.warning("the engine's network namespace: %s", e)
        finally:
            os.close(self.fd)
            self.fd, self.netns, self.taken = -1, None, False

    def _give_back(self) -> None:
        with iproute() as nsr:
            if link_index(nsr, self.ifname) != self.ifindex:
                return  # the engine took its interface away already
            with contextlib.suppress(Exception):  # its filter goes with it
                nsr.tc("del", "ingress", self.ifindex, "ffff:")
            if self.ipv6_on:
                with contextlib.suppress(NetworkError):
                    ipv6_conf(self.ifname, "disable_ipv6", "0")
            for a in self.addrs:
                extra: dict[str, Any] = {"broadcast": a.broadcast} if a.broadcast else {}
                if a.family == socket.AF_INET6:
                    extra["flags"] = IFA_F_NODAD  # it was the guest's meanwhile, and is the namespace's again
                with contextlib.suppress(Exception):  # one already there (EEXIST)
                    nsr.addr("add", index=self.ifindex, address=a.address, prefixlen=a.prefix, **extra)
            for r in self.routes:
                route: dict[str, Any] = {"dst": f"{r.dst}/{r.dst_len}" if r.dst else
                                         ("0.0.0.0/0" if r.family == socket.AF_INET else "::/0"),
                                         "oif": self.ifindex, "family": r.family, "proto": r.proto, "scope": r.scope}
                if r.gateway:
                    route["gateway"] = r.gateway
                if r.priority is not None:
                    route["priority"] = r.priority
                with contextlib.suppress(Exception):
                    nsr.route("add", **route)


def _fstatfs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs (120 bytes on 64-bit Linux); f_type first
    if _libc.fstatfs(fd, buf) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return int(struct.unpack_from("l", buf.raw)[0])


def open_netns(path: str) -> int:
    """The network namespace a spec names, as an fd (O_CLOEXEC): only a namespace file (never
    read or executed; a path to anything else is refused before any use), of a network
    namespace, not the runtime's own."""
    if not os.path.isabs(path):
        raise NetworkError(f"network namespace {path!r}: not an absolute path")
    try:
        opath = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkError(f"network namespace {path}: {e.strerror}") from None
    try:
        if _fstatfs_type(opath) != NSFS_MAGIC:
            raise NetworkError(f"network namespace {path}: not a namespace file")
        fd = os.open(f"/proc/self/fd/{opath}", os.O_RDONLY | os.O_CLOEXEC)  # the same nsfs inode, opened
    except OSError as e:
        raise NetworkError(f"network namespace {path}: {e.strerror}") from None
    finally:
        os.close(opath)
    try:
        if _fstatfs_type(fd) != NSFS_MAGIC or fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET:
            raise NetworkError(f"network namespace {path}: not a network namespace")
        mine, st = os.stat("/proc/self/ns/net"), os.fstat(fd)
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            raise NetworkError(f"network namespace {path} is the host's: a VM container cannot take over "
                               "the host's interface")
    except OSError as e:
        os.close(fd)
        raise NetworkError(f"network namespace {path}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def pod_sandbox(annotations: dict[str, Any]) -> bool:
    """A Kubernetes pod's sandbox ("pause") container, as CRI's runtimes mark it: it only holds
    the pod's namespaces, and the pod's interface is for the container that serves."""
    return any(annotations.get(k) == "sandbox" for k in SANDBOX_NOTES)


def join_engine(path: str | None, annotations: dict[str, Any] | None = None) -> Foreign | None:
    """The engine's namespace at ``path`` (the spec's), read: its interface's MAC, MTU,
    addresses and routes. None: no path, a namespace with no interface but ``lo`` (a VM
    without network), or a pod's sandbox container (``annotations``: its VM leaves the pod's
    interface to the pod's container). Nothing in the namespace changes until the VM's tap is
    there (:meth:`Foreign.plumb_in_background`)."""
    if not path or pod_sandbox(annotations or {}):
        return None
    fd = open_netns(path)
    try:
        ns = Path(f"/proc/self/fd/{fd}")
        net = in_netns(ns, _read, path)
        if net is None:
            os.close(fd)
            return None
        net.fd, net.netns = fd, ns
        return net
    except BaseException:
        os.close(fd)
        raise


def _read(path: str) -> Foreign | None:
    """In the namespace: its one interface (the default route's), as a Foreign."""
    with iproute() as ipr:
        links = {m["index"]: m for m in ipr.get_links() if m["ifi_type"] != ARPHRD_LOOPBACK}
        if link_index(ipr, TAP) is not None:  # (and its interface's addresses are the guest's meanwhile)
            raise NetworkError(f"network namespace {path}: its interface is taken by another VM already ({TAP})")
        routes = [r for r in ipr.get_routes(family=socket.AF_INET) + ipr.get_routes(family=socket.AF_INET6)
                  if (r.get_attr("RTA_TABLE") or r["table"]) == RT_TABLE_MAIN]
        v4 = {i: list(ipr.get_addr(index=i, family=socket.AF_INET)) for i in links}
        with_v4 = [i for i in links if v4[i]]
        default = [r for r in routes if r["dst_len"] == 0 and r["family"] == socket.AF_INET]
        via = {r.get_attr("RTA_OIF") for r in default}
        if not with_v4 and not via:
            if any(m["ifi_type"] == ARPHRD_ETHER for m in links.values()):
                names = ", ".join(str(m.get_attr("IFLA_IFNAME")) for m in links.values())
                raise NetworkError(f"network namespace {path}: no IPv4 address on {names} (a VM container "
                                   "needs one: IPv6 alone is not supported)")
            return None  # lo only (and the kernel's fallback tunnels): no network
        used = sorted(set(with_v4) | {i for i in via if i is not None})
        if None in via or any(i not in links for i in used):
            raise NetworkError(f"network namespace {path}: its default route does not leave through one "
                               "interface (a VM container takes one)")
        if len(used) != 1:
            names = ", ".join(str(links[i].get_attr("IFLA_IFNAME")) for i in used)
            raise NetworkError(f"network namespace {path} has {len(used)} interfaces ({names}): a VM container "
                               "joins one network (its NIC is fixed at boot)")
        idx = used[0]
        link = links[idx]
        name = str(link.get_attr("IFLA_IFNAME"))
        if link["ifi_type"] != ARPHRD_ETHER:
            raise NetworkError(f"network namespace {path}: {name} is not an Ethernet interface (a VM's NIC is)")
        if not IFNAME.fullmatch(name):  # part of /proc/sys paths
            raise NetworkError(f"network namespace {path}: an interface name vmrt does not take: {name[:20]!r}")
        if any(q["index"] == idx and q.get_attr("TCA_KIND") == "ingress" for q in ipr.get_qdiscs()):
            raise NetworkError(f"network namespace {path}: {name} has an ingress qdisc already (tc): the VM's "
                               "redirect needs its own")
        if len(v4[idx]) != 1:
            raise NetworkError(f"network namespace {path}: {name} has {len(v4[idx])} IPv4 addresses "
                               "(a VM container takes one)")
        a4 = v4[idx][0]
        addr = str(a4.get_attr("IFA_LOCAL") or a4.get_attr("IFA_ADDRESS"))
        iface = ipaddress.IPv4Interface(f"{addr}/{a4['prefixlen']}")
        gw4 = next((str(r.get_attr("RTA_GATEWAY")) for r in default
                    if r.get_attr("RTA_OIF") == idx and r.get_attr("RTA_GATEWAY")), "")
        if gw4 and ipaddress.IPv4Address(gw4) not in iface.network:
            raise NetworkError(f"network namespace {path}: the gateway {gw4} is not on {name}'s subnet "
                               f"{iface.network} (an on-link route to it is not supported for a VM container)")
        addrs = [_Addr(socket.AF_INET, addr, int(a4["prefixlen"]),
                       str(a4.get_attr("IFA_BROADCAST")) if a4.get_attr("IFA_BROADCAST") else None)]
        ip6, subnet6, gw6 = _read6(ipr, path, name, idx, routes, addrs)
        ipv6_on = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").exists() and \
            Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").read_text().strip() == "0"
        mtu = int(link.get_attr("IFLA_MTU") or 1500)
        if not 68 <= mtu <= 65535:
            raise NetworkError(f"network namespace {path}: {name}'s MTU {mtu} is not one a VM's NIC takes")
        mac = str(link.get_attr("IFLA_ADDRESS"))
        net = Network(NETWORK_ID, "engine", str(iface.network), gw4, "", subnet6=subnet6, gateway6=gw6)
        ep = Endpoint("", NETWORK_ID, addr, mac, name, "", [], "", [], ip6)
        kept = [_route(r) for r in routes if r.get_attr("RTA_OIF") == idx
                and r["proto"] not in (RTPROT_KERNEL, RTPROT_RA) and (r["family"] == socket.AF_INET or ipv6_on)]
        return Foreign("engine", None, [ep], {}, {NETWORK_ID: net}, mtu=mtu, ifname=name, ifindex=idx,  # mode: the
                       addrs=addrs, routes=kept, ipv6_on=ipv6_on)  # engine's network


def _read6(ipr: Any, path: str, name: str, idx: int, routes: list[Any], addrs: list[_Addr]) -> tuple[str, str, str]:
    """The interface's IPv6 address (global or unique-local; not a privacy one), its subnet and
    the default gateway: ("", "", "") without one. Its addresses go into ``addrs`` (given back)."""
    found = []
    for a in ipr.get_addr(index=idx, family=socket.AF_INET6):
        addr = ipaddress.IPv6Address(a.get_attr("IFA_ADDRESS"))
        if not addr.is_link_local and not a["flags"] & IFA_F_TEMPORARY:
            found.append((str(addr), int(a["prefixlen"])))
    addrs += [_Addr(socket.AF_INET6, ip, prefix) for ip, prefix in found]
    if not found:
        return "", "", ""
    if len(found) > 1:
        raise NetworkError(f"network namespace {path}: {name} has {len(found)} IPv6 addresses (a VM container "
                           "takes one)")
    ip, prefix = found[0]
    subnet = ipaddress.IPv6Interface(f"{ip}/{prefix}").network
    gw = next((str(r.get_attr("RTA_GATEWAY")) for r in routes if r["family"] == socket.AF_INET6
               and r["dst_len"] == 0 and r.get_attr("RTA_OIF") == idx and r.get_attr("RTA_GATEWAY")), "")
    if gw and not (ipaddress.IPv6Address(gw).is_link_local or ipaddress.IPv6Address(gw) in subnet):
        raise NetworkError(f"network namespace {path}: the IPv6 gateway {gw} is not on {name}'s subnet {subnet}")
    return ip, str(subnet), gw


def _route(r: Any) -> _Route:
    dst = r.get_attr("RTA_DST")
    return _Route(int(r["family"]), str(dst) if dst else None, int(r["dst_len"]),
                  str(r.get_attr("RTA_GATEWAY")) if r.get_attr("RTA_GATEWAY") else None,
                  r.get_attr("RTA_PRIORITY"), int(r["proto"]), int(r["scope"]))

