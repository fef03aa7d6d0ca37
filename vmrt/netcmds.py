"""``vmrt network ...`` and ``vmrt port``: Docker's commands over the vmrt/network package."""

from __future__ import annotations

import contextlib
import ipaddress
import json
from typing import Any

import click

from . import formatting, fsmode, lifecycle, network
from .config import Config
from .errors import StateError, UsageError, VmrtError
from .layout import container_dir
from .state import Container, State, Status

NET_COLUMNS = [("NETWORK ID", "ID", 0), ("NAME", "Name", 0), ("DRIVER", "Driver", 0), ("SCOPE", "Scope", 0)]


def _cfg(ctx: click.Context) -> Config:
    return ctx.obj["cfg"]


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
                out[ep.container_id] = {"Name": name, "MacAddress": ep.mac, "IPv4Address": f"{ep.ip}/{prefix}",
                                        "IPv6Address": ""}
        return out
    finally:
        st.close()


@click.group("network")
def network_group() -> None:
    """Manage networks."""


@network_group.command("create")
@click.argument("name")
@click.option("-d", "--driver", default="bridge", show_default=True, help="Only bridge.")
@click.option("--subnet", help="Subnet in CIDR form (default: a free /24 of the network pool).")
@click.option("--gateway", help="The bridge's address (default: the subnet's first).")
@click.option("--internal", is_flag=True, help="No traffic to or from outside the network.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE metadata.")
@click.pass_context
def create(ctx: click.Context, name: str, driver: str, subnet: str | None, gateway: str | None, internal: bool,
           labels: tuple[str, ...]) -> None:
    """Create a user network (a bridge; its containers reach each other by name)."""
    if driver != "bridge":
        raise UsageError(f"network driver {driver!r} is not supported (only bridge)")
    cfg = _cfg(ctx)
    with network.locked(cfg), network.Store(cfg) as store:
        net = store.create(name, subnet, gateway, internal,
                           dict(label.partition("=")[::2] for label in labels))
    click.echo(net.id)


@network_group.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only display network IDs.")
@click.option("-f", "--filter", "filters", multiple=True, help="name=..., id=..., driver=...")
@click.option("--format", "fmt", help="table, json or a template such as '{{.Name}}'.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate IDs.")
@click.pass_context
def ls(ctx: click.Context, quiet: bool, filters: tuple[str, ...], fmt: str | None, no_trunc: bool) -> None:
    """List networks."""
    with network.Store(_cfg(ctx)) as store:
        nets = store.networks()
    rows = [{"ID": n.id if no_trunc else n.id[:12], "Name": n.name, "Driver": "bridge", "Scope": "local",
             "Internal": n.internal, "Subnet": n.subnet} for n in nets]
    rows += [{"ID": "-", "Name": "host", "Driver": "host", "Scope": "local", "Internal": False, "Subnet": ""},
             {"ID": "-", "Name": "none", "Driver": "null", "Scope": "local", "Internal": False, "Subnet": ""}]
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep or key not in ("name", "id", "driver"):
            raise UsageError(f"invalid filter {f!r} (name=, id=, driver=)")
        field = {"name": "Name", "id": "ID", "driver": "Driver"}[key]
        rows = [r for r in rows if (value in str(r[field]) if key == "name" else str(r[field]).startswith(value))]
    if quiet:
        for r in rows:
            click.echo(r["ID"])
        return
    for line in formatting.emit(fmt, rows, NET_COLUMNS):
        click.echo(line)


@network_group.command("inspect")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", help="Go-template-like format, e.g. '{{.IPAM.Config}}'.")
@click.pass_context
def inspect(ctx: click.Context, refs: tuple[str, ...], fmt: str | None) -> None:
    """Details of networks as JSON, Docker's shape."""
    cfg = _cfg(ctx)
    docs, failed = [], False
    with network.Store(cfg) as store:
        for ref in refs:
            try:
                net = store.get(ref)
            except VmrtError as e:
                click.echo(f"vmrt: {formatting.inert(str(e))}", err=True)
                failed = True
                continue
            docs.append(net.inspect(_members(cfg, store, net)))
    if fmt and fmt != "json":
        for d in docs:
            click.echo(formatting.render(fmt, d))
    elif docs or not failed:
        click.echo(json.dumps(docs, indent=4))
    if failed:
        ctx.exit(1)


@network_group.command("rm")
@click.argument("refs", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Remove networks (none of their containers may be running)."""
    failed = False
    for ref in refs:
        try:
            click.echo(network.remove_network(_cfg(ctx), ref))
        except VmrtError as e:
            click.echo(f"vmrt: {formatting.inert(str(e))}", err=True)
            failed = True
    if failed:
        ctx.exit(1)


@network_group.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.pass_context
def prune(ctx: click.Context, force: bool) -> None:
    """Remove every user network no running container uses."""
    cfg = _cfg(ctx)
    if not force and not click.confirm("WARNING! This will remove all custom networks not used by at least one "
                                       "container.\nAre you sure you want to continue?"):
        return
    with network.Store(cfg) as store:
        names = [n.name for n in store.networks() if n.user and not store.live_endpoints(network_id=n.id)]
    removed = []
    for name in names:
        with contextlib.suppress(VmrtError):
            removed.append(network.remove_network(cfg, name))
    if removed:
        click.echo("Deleted Networks:\n" + "\n".join(removed))


def _update_request(cfg: Config, c: Container, change: Any) -> None:
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


@network_group.command("connect")
@click.argument("net_ref")
@click.argument("container")
@click.option("--alias", "aliases", multiple=True, help="Network-scoped alias for the container.")
@click.pass_context
def connect(ctx: click.Context, net_ref: str, container: str, aliases: tuple[str, ...]) -> None:
    """Connect a container to a network (a running one: process isolation only)."""
    cfg = _cfg(ctx)
    c = _container(cfg, container)
    for a in aliases:
        network.valid_alias(a)
    with network.Store(cfg) as store:
        net = store.get(net_ref)
    try:
        req = network.request_of(json.loads((container_dir(cfg, c.id) / "config.json").read_text()))
    except (OSError, ValueError):
        raise StateError(f"container {c.name} has no kept configuration (was it run with --rm?)") from None
    if req.network in ("host", "none"):
        raise UsageError(f"container {c.name} is on network {req.network}: it cannot join others")
    if net.name in req.networks:
        raise UsageError(f"container {c.name} is already connected to network {net.name}")
    if _running(c):
        if c.isolation == "vm":
            raise UsageError(f"container {c.name} runs in a VM whose NICs are fixed at boot: stop it, "
                             "connect it, start it again")
        network.connect_live(cfg, c.id, c.name, net.name, list(aliases))
    elif c.isolation == "vm":
        raise UsageError("a VM container joins one network (its NIC is fixed at boot): use "
                         "`vmrt network disconnect` first")

    def change(r: network.NetRequest) -> None:
        r.extra_networks.append(net.name)
        r.aliases = list(dict.fromkeys([*r.aliases, *aliases]))
    _update_request(cfg, c, change)


@network_group.command("disconnect")
@click.argument("net_ref")
@click.argument("container")
@click.option("-f", "--force", is_flag=True, help="Accepted for Docker compatibility.")
@click.pass_context
def disconnect(ctx: click.Context, net_ref: str, container: str, force: bool) -> None:
    """Disconnect a container from a network."""
    cfg = _cfg(ctx)
    c = _container(cfg, container)
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
        if r.network == "none":
            r.ports, r.publish_all, r.aliases = [], False, []
    _update_request(cfg, c, change)


@click.command("port")
@click.argument("container")
@click.argument("private_port", required=False)
@click.pass_context
def port(ctx: click.Context, container: str, private_port: str | None) -> None:
    """List a container's published ports, or the host address of one (PORT[/PROTO])."""
    cfg = _cfg(ctx)
    c = _container(cfg, container)
    for line in network.port_lines(cfg, c.id, private_port) if _running(c) else []:
        click.echo(line)


def ports_text(cfg: Config, container_ids: list[str]) -> dict[str, str]:
    """ps's PORTS column: 0.0.0.0:8888->8080/tcp, ..."""
    out: dict[str, str] = {}
    with network.Store(cfg) as store:
        for ep in store.live_endpoints():
            if ep.container_id in container_ids and ep.ports:
                text = ", ".join(f"{p.host_ip or '0.0.0.0'}:{p.host_port}->{p.key()}" for p in ep.ports)
                out[ep.container_id] = ", ".join(x for x in (out.get(ep.container_id), text) if x)
    return out


def register(main: click.Group) -> None:
    main.add_command(network_group)
    main.add_command(port)
