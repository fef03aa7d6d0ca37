"""``vmrt context``: named remote hosts, as Docker's contexts (click only: the store is
:mod:`vmrt.remote.contexts`). Always runs on this host, whatever -H or VMRT_HOST say."""

from __future__ import annotations

import json
import os

import click

from ..formatting import inert
from ..remote import contexts as store
from ..remote.target import parse_host


@click.group("context")
def context() -> None:
    """Manage contexts (named remote hosts: vmrt -c NAME, or vmrt context use NAME)."""


@context.command("create")
@click.argument("name")
@click.option("--host", "-H", "host", required=True, help="The remote host: ssh://[user@]host[:port].")
@click.option("--description", default="", help="Description of the context.")
@click.option("--accept-host-key", is_flag=True,
              help="Connect now and add the host's key to ~/.ssh/known_hosts if it is not known yet "
                   "(check the fingerprint it prints); a changed key is still refused.")
def create(name: str, host: str, description: str, accept_host_key: bool) -> None:
    """Create a context."""
    target = parse_host(host)
    store.check_name(name)
    if accept_host_key:
        from ..remote.client import check_host  # imported on use: paramiko, only to connect
        check_host(target, accept_new=True)
    store.create(name, host, description)
    click.echo(name)
    click.echo(f'Successfully created context "{name}"', err=True)


@context.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only show context names.")
@click.option("--format", "fmt", help="table or json.")
def ls(quiet: bool, fmt: str | None) -> None:
    """List contexts."""
    current = os.environ.get("VMRT_CONTEXT") or store.current()
    rows = [store.load(n) for n in store.names()]
    if quiet:
        for c in rows:
            click.echo(c.name)
        return
    if fmt == "json":
        for c in rows:
            click.echo(json.dumps({"Name": c.name, "Current": c.name == current, "Description": c.description,
                                   "DockerEndpoint": c.host or "local"}))
        return
    table = [("NAME", "DESCRIPTION", "VMRT ENDPOINT")]
    table += [(c.name + (" *" if c.name == current else ""), c.description, c.host or "local") for c in rows]
    widths = [max(len(r[i]) for r in table) for i in range(2)]
    for r in table:
        click.echo(inert(f"{r[0]:<{widths[0]}}   {r[1]:<{widths[1]}}   {r[2]}".rstrip()))
    if os.environ.get("VMRT_HOST"):
        click.echo("Warning: VMRT_HOST is set and overrides the active context", err=True)


@context.command("use")
@click.argument("name")
def use(name: str) -> None:
    """Set the current context."""
    store.use(name)
    click.echo(name)
    click.echo(f'Current context is now "{name}"', err=True)


@context.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove a context in use (the default context is then current).")
def rm(names: tuple[str, ...], force: bool) -> None:
    """Remove contexts."""
    for name in names:
        store.remove(name, force=force)
        click.echo(name)


@context.command("inspect")
@click.argument("names", nargs=-1)
def inspect(names: tuple[str, ...]) -> None:
    """Show contexts in detail (the current one by default)."""
    docs = []
    for name in names or (os.environ.get("VMRT_CONTEXT") or store.current(),):
        c = store.load(name)
        docs.append({"Name": c.name, "Metadata": {"Description": c.description},
                     "Endpoints": {"vmrt": {"Host": c.host or "local"}}})
    click.echo(inert(json.dumps(docs, indent=4)))


@context.command("show")
def show() -> None:
    """Print the name of the current context."""
    click.echo(os.environ.get("VMRT_CONTEXT") or store.current())


def register(main: click.Group) -> None:
    main.add_command(context)
