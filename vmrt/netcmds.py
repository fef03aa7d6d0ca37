"""What ``vmrt network ...`` and ``vmrt port`` do: Docker's commands over the vmrt/network
package (the CLI, :mod:`vmrt.cli.networks`, prints what these return)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Callable, Iterator
from typing import Any

from . import formatting, fsmode, lifecycle, network
from .config import Config
from .errors import StateError, UsageError, VmrtError
from .layout import container_dir
from .state import Container, State, Status

NET_COLUMNS = [("NETWORK ID", "ID", 0), ("NAME", "Name", 0), ("DRIVER", "Driver", 0), ("SCOPE", "Scope", 0)]


def _container(cfg: Config, ref: str) -> Container:
    st = State(cfg.db_path)
    try:
        lifecycle.reconcile(cfg, st)
        return st.get(ref)
    finally:
        st.close()


def _running(c: Container) -> bool:
    return c.status == Status.RUNNING and lifecycle.owner_alive(c)


def _members(cfg: Config, store: network.Store, net: network.Network) -> dict[str, dict[str, str]]:
    st = State(cfg.db_path)
    try:
        out = {}
        for ep in store.live_endpoints(network_id=net.id):
            with contextlib.suppress(StateError):
                name = st.get(ep.container_id).name
                prefix = ipaddress.IPv4Network(net.subnet).prefixlen
                ip6 = f"{ep.ip6}/{ipaddress.IPv6Network(net.subnet6).prefixlen}" if ep.ip6 and net.ipv6 else ""
                out[ep.container_id] = {"Name": name, "MacAddress": ep.mac, "IPv4Address": f"{ep.ip}/{prefix}",
                                        "IPv6Address": ip6}
        return out
    finally:
        st.close()


def create(cfg: Config, name: str, *, driver: str, subnets: tuple[str, ...], gateways: tuple[str, ...],
           internal: bool, labels: tuple[str, ...], ipv6: bool = False) -> str:
    """``vmrt network create``: a user network (a bridge; with ``ipv6`` an IPv6 subnet too); its ID."""
    if driver != "bridge":
        raise UsageError(f"network driver {driver!r} is not supported (only bridge)")
    with network.locked(cfg), network.Store(cfg) as store:
        net = store.create(name, subnets, gateways, internal,
                           dict(label.partition("=")[::2] for label in labels), ipv6=ipv6)
    return net.id


def ls(cfg: Config, *, quiet: bool, filters: tuple[str, ...], fmt: str | None, no_trunc: bool) -> list[str]:
    """``vmrt network ls``' lines."""
    with network.Store(cfg) as store:
        nets = store.networks()
    rows = [{"ID": n.id if no_trunc else n.id[:12], "Name": n.name, "Driver": "bridge", "Scope": "local",
             "Internal": n.internal, "IPv6": n.ipv6, "Subnet": n.subnet} for n in nets]
    rows += [{"ID": "-", "Name": "host", "Driver": "host", "Scope": "local", "Internal": False, "IPv6": False,
              "Subnet": ""},
             {"ID": "-", "Name": "none", "Driver": "null", "Scope": "local", "Internal": False, "IPv6": False,
              "Subnet": ""}]
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep or key not in ("name", "id", "driver"):
            raise UsageError(f"invalid filter {f!r} (name=, id=, driver=)")
        field = {"name": "Name", "id": "ID", "driver": "Driver"}[key]
        rows = [r for r in rows if (value in str(r[field]) if key == "name" else str(r[field]).startswith(value))]
    if quiet:
        return [str(r["ID"]) for r in rows]
    return formatting.emit(fmt, rows, NET_COLUMNS)


def documents(cfg: Config, refs: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Docker's network documents: of ``refs`` (a missing one raises), else of every network."""
    with network.Store(cfg) as store:
        nets = [store.get(r) for r in refs] if refs is not None else store.networks()
        return [n.inspect(_members(cfg, store, n)) for n in nets]


def inspect(cfg: Config, refs: tuple[str, ...], *, fmt: str | None) -> Iterator[str | VmrtError]:
    """``vmrt network inspect``: Docker's documents; a ref that names no network is one error,
    the others are shown."""
    docs, failed = [], False
    with network.Store(cfg) as store:
        for ref in refs:
            try:
                net = store.get(ref)
            except VmrtError as e:
                yield e
                failed = True
                continue
            docs.append(net.inspect(_members(cfg, store, net)))
    if docs or not failed:  # every ref missing: no empty list
        yield from formatting.documents(fmt, docs)


def rm(cfg: Config, refs: tuple[str, ...]) -> Iterator[str | VmrtError]:
    """``vmrt network rm``: each network's name once removed, or its error."""
    for ref in refs:
        try:
            name = network.remove_network(cfg, ref)
        except VmrtError as e:
            yield e
            continue
        yield name


def prune(cfg: Config) -> list[str]:
    """``vmrt network prune`` (confirmed): remove every user network no running container uses;
    the report's lines."""
    with network.Store(cfg) as store:
        names = [n.name for n in store.networks() if n.user and not store.live_endpoints(network_id=n.id)]
    removed = []
    for name in names:
        with contextlib.suppress(VmrtError):
            removed.append(network.remove_network(cfg, name))
    return ["Deleted Networks:", *removed] if removed else []


def _update_request(cfg: Config, c: Container, change: Callable[[network.NetRequest], None]) -> None:
    """Change the network request kept in the container's config (what its next start uses)."""
    p = container_dir(cfg, c.id) / "config.json"
    try:
        config = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise StateError(f"container {c.name} has no kept configuration: {e}") from None
    req = network.request_of(config)
    change(req)
    config.setdefault("annotations", {})[network.ANNOTATION] = req.to_json()
    tmp = p.with_suffix(".tmp")
    fsmode.write_private(tmp, json.dumps(config, indent=1))  # the container's env: 0600
    tmp.replace(p)


def connect(cfg: Config, net_ref: str, ref: str, *, aliases: tuple[str, ...]) -> None:
    """``vmrt network connect``: a container joins a network (a running one: process isolation only)."""
    c = _container(cfg, ref)
    for a in aliases:
        network.valid_alias(a)
    with network.Store(cfg) as store:
        net = store.get(net_ref)
    try:
        req = network.request_of(json.loads((container_dir(cfg, c.id) / "config.json").read_text()))
    except (OSError, ValueError):
        raise StateError(f"container {c.name} has no kept configuration (was it run with --rm?)") from None
    # none: a stopped container whose last network was disconnected joins this one as its first
    # (Compose disconnects a new container and connects it again with its aliases)
    rejoin = req.network == "none" and not req.extra_networks and not _running(c)
    if req.network in ("host", "none") and not rejoin:
        raise UsageError(f"container {c.name} is on network {req.network}: it cannot join others")
    if net.name in req.networks:
        raise UsageError(f"container {c.name} is already connected to network {net.name}")
    if _running(c):
        if c.isolation == "vm":
            raise UsageError(f"container {c.name} runs in a VM whose NICs are fixed at boot: stop it, "
                             "connect it, start it again")
        network.connect_live(cfg, c.id, c.name, net.name, list(aliases))
    elif c.isolation == "vm" and not rejoin:
        raise UsageError("a VM container joins one network (its NIC is fixed at boot): use "
                         "`vmrt network disconnect` first")

    def change(r: network.NetRequest) -> None:
        if rejoin:
            r.network = net.name
        else:
            r.extra_networks.append(net.name)
        r.aliases = list(dict.fromkeys([*r.aliases, *aliases]))
    _update_request(cfg, c, change)


def disconnect(cfg: Config, net_ref: str, ref: str) -> None:
    """``vmrt network disconnect``."""
    c = _container(cfg, ref)
    with network.Store(cfg) as store:
        net = store.get(net_ref)
    if _running(c):
        if c.isolation == "vm":
            raise UsageError(f"container {c.name} runs in a VM whose NIC is fixed at boot: stop it first")
        network.disconnect_live(cfg, c.id, net.name)

    def change(r: network.NetRequest) -> None:
        if net.name not in r.networks:
            raise UsageError(f"container {c.name} is not connected to network {net.name}")
        rest = [n for n in r.networks if n != net.name]
        r.network = rest[0] if rest else "none"
        r.extra_networks = rest[1:]
        if r.network == "none":  # its ports stay: they apply again once it joins a network
            r.aliases = []
    _update_request(cfg, c, change)


def port(cfg: Config, ref: str, private_port: str | None) -> list[str]:
    """``vmrt port``: a container's published ports, or the host address of one (PORT[/PROTO])."""
    c = _container(cfg, ref)
    return network.port_lines(cfg, c.id, private_port) if _running(c) else []


def ports_text(cfg: Config, container_ids: list[str]) -> dict[str, str]:
    """ps's PORTS column: 0.0.0.0:8888->8080/tcp, ..."""
    out: dict[str, str] = {}
    with network.Store(cfg) as store:
        for ep in store.live_endpoints():
            if ep.container_id in container_ids and ep.ports:
                text = ", ".join(f"{p.host_ip or '0.0.0.0'}:{p.host_port}->{p.key()}" for p in ep.ports)
                out[ep.container_id] = ", ".join(x for x in (out.get(ep.container_id), text) if x)
    return out
