"""What every click-only module of the CLI shares: the Config the main group loaded, and
printing what a command returned."""

from __future__ import annotations

from collections.abc import Iterable

import click

from ..config import Config
from ..errors import VmrtError
from ..formatting import inert


def config_of(ctx: click.Context) -> Config:
    """The Config the main group loaded (``vmrt --debug ...``: the same for every command)."""
    return ctx.obj["cfg"]


def echo_lines(lines: Iterable[str], *, err: bool = False) -> None:
    """Print each line as it comes (a generator's lines appear while the command still works)."""
    for line in lines:
        click.echo(line, err=err)


def report(ctx: click.Context, items: Iterable[str | VmrtError]) -> None:
    """A command over several objects (``rm a b``, ``network inspect x y``): each line as it comes,
    each failure one line on stderr, and exit 1 at the end if any failed (as Docker)."""
    failed = False
    for item in items:
        if isinstance(item, VmrtError):
            click.echo(f"vmrt: {inert(str(item))}", err=True)
            failed = True
        else:
            click.echo(item)
    if failed:
        ctx.exit(1)
