"""``vmrt volume ...`` (click only: what each does is in :mod:`vmrt.volumecmds`)."""

from __future__ import annotations

import click

from .. import volumecmds
from .common import config_of, echo_lines, report


@click.group("volume")
def volume_group() -> None:
    """Manage named volumes (`-v NAME:/path`)."""


@volume_group.command("create")
@click.argument("name", required=False)
@click.option("-d", "--driver", default="local", show_default=True, help="Only local.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE metadata.")
@click.pass_context
def create(ctx: click.Context, name: str | None, driver: str, labels: tuple[str, ...]) -> None:
    """Create a volume (a random name if none is given); an existing one is kept."""
    if driver != "local":
        raise click.UsageError(f"volume driver {driver!r} is not supported (local)")
    click.echo(volumecmds.create(config_of(ctx), name, labels))


@volume_group.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only display volume names.")
@click.option("-f", "--filter", "filters", multiple=True, help="dangling=true|false, name=...")
@click.option("--format", "fmt", help="table, json or a template such as '{{.Name}}'.")
@click.pass_context
def ls(ctx: click.Context, quiet: bool, filters: tuple[str, ...], fmt: str | None) -> None:
    """List volumes."""
    echo_lines(volumecmds.ls(config_of(ctx), quiet=quiet, fmt=fmt, filters=filters))


@volume_group.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", help="Go-template-like format, e.g. '{{.Mountpoint}}'.")
@click.pass_context
def inspect(ctx: click.Context, names: tuple[str, ...], fmt: str | None) -> None:
    """Details of volumes as JSON, Docker's shape."""
    report(ctx, volumecmds.inspect(config_of(ctx), names, fmt=fmt))


@volume_group.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="No error for a volume that does not exist.")
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...], force: bool) -> None:
    """Remove volumes (none of their containers may still exist)."""
    report(ctx, volumecmds.rm(config_of(ctx), names, force=force))


@volume_group.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.pass_context
def prune(ctx: click.Context, force: bool) -> None:
    """Remove every volume no container uses."""
    if not force and not click.confirm("WARNING! This will remove all local volumes not used by at least one "
                                       "container.\nAre you sure you want to continue?"):
        return
    echo_lines(volumecmds.prune(config_of(ctx)))


def register(main: click.Group) -> None:
    main.add_command(volume_group)
