"""Attach and detach: a container's namespace, interfaces, address, rules and /etc files at its
start and stop; ``network connect``/``disconnect``/``rm`` on the live system; what ``inspect``
and ``port`` show."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .. import fsmode, rootfs
from ..config import Config
from ..errors import NetworkError, UsageError, VmrtError
from ..ocispec import Spec
from .names import FILES_TMPFS, files_dir, hosts_file, refresh_hosts, resolv_conf, write_in_place
from .netlink import adopt_tap, delete_link, ensure_bridge, mac_for, plumb_veth
from .netns import create_netns, link_exists, netns_path, remove_netns
from .nft import drop_endpoint_rules, endpoint_rules, port_group, sync_rules
from .parse import MAX_PORTS, PROTOS, NetRequest, PortMapping, parse_exposed, request_of, split_exposed
from .store import Endpoint, Network, Store, locked


@dataclasses.dataclass
class Attached:
    mode: str                  # none | host | bridge; engine: an OCI engine's namespace (foreign.py)
    netns: Path | None
    endpoints: list[Endpoint]
    files: dict[str, Path]     # container path -> host file (bind-mounted)
    networks: dict[str, Network] = dataclasses.field(default_factory=dict)  # by id, those of endpoints
    rules_done: bool = False   # attach rewrote the tables (with this container's chains)
    mtu: int = 1500            # the VM's eth0 (an engine's interface may have another: foreign.py)
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
                self._plumb(cfg, isolation)
            except BaseException as e:  # noqa: B036 - raised again by wait()
                self._error = e
        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def _plumb(self, cfg: Config, isolation: str) -> None:
        plumb(cfg, self, isolation)

    def wait(self, quiet: bool = False) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and not quiet:
            err, self._error = self._error, None
            raise err


def attach(cfg: Config, container_id: str, name: str, isolation: str, config: Spec,
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
        # under the lock, and only while its endpoints are still recorded: a stop that detached the
        # container meanwhile (a restart policy's back-off, a plumbing in the background) has
        # dropped its chains already, and ones added after that would outlive it
        with locked(cfg), Store(cfg) as store:
            live = {ep.host_if for ep in store.live_endpoints(container_id=att.endpoints[0].container_id)}
            if any(ep.host_if not in live for ep in att.endpoints):
                raise NetworkError("the container was stopped while its network was being set up")
            endpoint_rules(cfg, att.endpoints, store)
    group = port_group(cfg)
    first6 = next((ep for ep in att.endpoints if ep.ip6), None)
    for i, ep in enumerate(att.endpoints):
        plumb_veth(att.networks[ep.network_id], ep, att.netns, isolation == "vm", default_route=i == 0,
                   group=group, default_route6=ep is first6)
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
    return Endpoint(cid, net.id, ip, mac_for(ip), f"eth{index}", f"v{cid[:10]}{index}", aliases, name, ports,
                    _allocate6(store, net) if net.ipv6 else "")


def _allocate6(store: Store, net: Network) -> str:
    """The first free IPv6 address of an --ipv6 network's subnet (as IPv4's: Docker's order)."""
    used = {ipaddress.IPv6Address(net.gateway6)} | {ipaddress.IPv6Address(e.ip6)
                                                    for e in store.live_endpoints(network_id=net.id) if e.ip6}
    for host in ipaddress.IPv6Network(net.subnet6).hosts():
        if host not in used:
            return str(host)
    raise NetworkError(f"no free IPv6 address left in network {net.name} ({net.subnet6})")


def _resolve_ports(store: Store, req: NetRequest, config: Spec) -> list[PortMapping]:
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
        write_in_place(p, text)
        att.files[target] = p
    fsmode.write_private(fdir / "request.json", req.to_json())


def _mount_files(config: Spec, att: Attached) -> None:
    mounts = config.setdefault("mounts", [])
    targets = {m.get("destination") for m in mounts}
    for target, src in att.files.items():
        if target in targets:  # a user volume on /etc/hosts wins, as in Docker
            continue
        mounts.append({"destination": target, "type": "bind", "source": str(src),
                       "options": ["rbind", "rprivate"], "org.vmrt.managed": True})


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
                if not link_exists(name):
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


def remove_network(cfg: Config, ref: str) -> str:
    with locked(cfg), Store(cfg) as store:
        net = store.get(ref)
        if net.builtin:
            raise UsageError(f"{net.name} is a pre-defined network and cannot be removed")
        if store.live_endpoints(network_id=net.id):
            raise NetworkError(f"error while removing network: network {net.name} id {net.id} has active endpoints")
        if link_exists(net.bridge):
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
            plumb_veth(net, ep, ns, vm=False, default_route=not own, group=port_group(cfg),
                       default_route6=not any(e.ip6 for e in own))
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
        # eth0 first: the top-level fields are its network's (the store keeps no order of its own)
        eps = sorted(store.live_endpoints(container_id=container_id), key=lambda e: (len(e.ifname), e.ifname))
        names = {n.id: n for n in store.networks()}
    nets: dict[str, Any] = {}
    ports: dict[str, Any] = {}
    for ep in eps:
        n = names.get(ep.network_id)
        if n is None:
            continue
        nets[n.name] = {"NetworkID": n.id, "IPAddress": ep.ip, "Gateway": n.gateway,
                        "IPPrefixLen": ipaddress.IPv4Network(n.subnet).prefixlen, "MacAddress": ep.mac,
                        "Aliases": ep.aliases or None, **_v6_settings(n, ep)}
        for p in ep.ports:
            ports.setdefault(p.key(), []).append({"HostIp": p.host_ip or "0.0.0.0", "HostPort": str(p.host_port)})
    if not eps:
        for name in req.networks:
            nets[name] = {"IPAddress": "", "Gateway": "", "MacAddress": "", **_v6_settings(None, None)}
    first = eps[0] if eps else None
    first_net = names.get(first.network_id) if first else None
    return {"Networks": nets, "Ports": ports, "IPAddress": first.ip if first else "",
            "Gateway": first_net.gateway if first_net else "", "MacAddress": first.mac if first else "",
            **_v6_settings(first_net, first), "SandboxKey": str(netns_path(cfg, container_id)) if eps else ""}


def _v6_settings(net: Network | None, ep: Endpoint | None) -> dict[str, Any]:
    """Docker's IPv6 members of NetworkSettings (and of each of its Networks): empty but on an
    --ipv6 network."""
    if net is None or ep is None or not (net.ipv6 and ep.ip6):
        return {"GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "IPv6Gateway": ""}
    return {"GlobalIPv6Address": ep.ip6, "GlobalIPv6PrefixLen": ipaddress.IPv6Network(net.subnet6).prefixlen,
            "IPv6Gateway": net.gateway6}


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
