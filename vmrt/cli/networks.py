"""``vmrt network ...`` and ``vmrt port`` (click only: what each does is in :mod:`vmrt.netcmds`)."""

from __future__ import annotations

import click

from .. import netcmds
from .common import config_of, echo_lines, report


@click.group("network")
def network_group() -> None:
    """Manage networks."""


@network_group.command("create")
@click.argument("name")
@click.option("-d", "--driver", default="bridge", show_default=True, help="Only bridge.")
@click.option("--subnet", "subnets", multiple=True,
              help="Subnet in CIDR form, one IPv4 and (with --ipv6) one IPv6 (default: a free /24 of the "
                   "network pool; a random fd00::/8 /64).")
@click.option("--gateway", "gateways", multiple=True,
              help="The bridge's address in a subnet, one per family (default: the subnet's first).")
@click.option("--ipv6", is_flag=True, help="Give the network and its containers IPv6 addresses too.")
@click.option("--internal", is_flag=True, help="No traffic to or from outside the network.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE metadata.")
@click.pass_context
def create(ctx: click.Context, name: str, driver: str, subnets: tuple[str, ...], gateways: tuple[str, ...],
           ipv6: bool, internal: bool, labels: tuple[str, ...]) -> None:
    """Create a user network (a bridge; its containers reach each other by name)."""
    click.echo(netcmds.create(config_of(ctx), name, driver=driver, subnets=subnets, gateways=gateways,
                              internal=internal, labels=labels, ipv6=ipv6))


@network_group.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only display network IDs.")
@click.option("-f", "--filter", "filters", multiple=True, help="name=..., id=..., driver=...")
@click.option("--format", "fmt", help="table, json or a template such as '{{.Name}}'.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate IDs.")
@click.pass_context
def ls(ctx: click.Context, quiet: bool, filters: tuple[str, ...], fmt: str | None, no_trunc: bool) -> None:
    """List networks."""
    echo_lines(netcmds.ls(config_of(ctx), quiet=quiet, filters=filters, fmt=fmt, no_trunc=no_trunc))


@network_group.command("inspect")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", help="Go-template-like format, e.g. '{{.IPAM.Config}}'.")
@click.pass_context
def inspect(ctx: click.Context, refs: tuple[str, ...], fmt: str | None) -> None:
    """Details of networks as JSON, Docker's shape."""
    report(ctx, netcmds.inspect(config_of(ctx), refs, fmt=fmt))


@network_group.command("rm")
@click.argument("refs", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Remove networks (none of their containers may be running)."""
    report(ctx, netcmds.rm(config_of(ctx), refs))


@network_group.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.pass_context
def prune(ctx: click.Context, force: bool) -> None:
    """Remove every user network no running container uses."""
    if not force and not click.confirm("WARNING! This will remove all custom networks not used by at least one "
                                       "container.\nAre you sure you want to continue?"):
        return
    echo_lines(netcmds.prune(config_of(ctx)))


@network_group.command("connect")
@click.argument("net_ref")
@click.argument("container")
@click.option("--alias", "aliases", multiple=True, help="Network-scoped alias for the container.")
@click.pass_context
def connect(ctx: click.Context, net_ref: str, container: str, aliases: tuple[str, ...]) -> None:
    """Connect a container to a network (a running one: process isolation only)."""
    netcmds.connect(config_of(ctx), net_ref, container, aliases=aliases)


@network_group.command("disconnect")
@click.argument("net_ref")
@click.argument("container")
@click.option("-f", "--force", is_flag=True, help="Accepted for Docker compatibility.")
@click.pass_context
def disconnect(ctx: click.Context, net_ref: str, container: str, force: bool) -> None:
    """Disconnect a container from a network."""
    netcmds.disconnect(config_of(ctx), net_ref, container)


@click.command("port")
@click.argument("container")
@click.argument("private_port", required=False)
@click.pass_context
def port(ctx: click.Context, container: str, private_port: str | None) -> None:
    """List a container's published ports, or the host address of one (PORT[/PROTO])."""
    echo_lines(netcmds.port(config_of(ctx), container, private_port))


def register(main: click.Group) -> None:
    main.add_command(network_group)
    main.add_command(port)
