"""The ``vmrt`` command line: click only (the flags, and printing what a command returns).

The main group here (global options, logging, the Config every command gets) and
:func:`entry`, which turns every failure into one line on stderr and Docker's exit codes;
the commands are in click-only modules per area (:mod:`.containers`, :mod:`.images`,
:mod:`.networks`, :mod:`.system`), each calling one function of the commands layer
(:mod:`vmrt.containercmds`, :mod:`vmrt.imagecmds`, :mod:`vmrt.netcmds`,
:mod:`vmrt.systemcmds`, :mod:`vmrt.bench`) that does what the verb does.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Any, NoReturn

import click

from .. import __version__, fsmode
from .. import config as config_mod
from ..errors import VmrtError
from ..formatting import inert
from ..remote import routing as remote_routing
from ..remote import session as remote_session
from . import containers, contexts, images, networks, system, volumes

LOG = logging.getLogger("vmrt")


class _InertFormatter(logging.Formatter):
    """Log lines (guest console tails, QEMU output with --debug) with terminal controls escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return inert(super().format(record), block=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Log debug details to stderr.")
@click.option("-H", "--host", metavar="ssh://[user@]host[:port]",
              help="Run the command on this remote host over SSH (env VMRT_HOST).")
@click.option("-c", "--context", metavar="NAME", help="Run the command on this context's host (vmrt context).")
@click.version_option(__version__, prog_name="vmrt")
@click.pass_context
def main(ctx: click.Context, debug: bool, host: str | None, context: str | None) -> None:
    """Containers with a per-run choice of isolation: Linux namespaces or a micro-VM."""
    handler = logging.StreamHandler()
    handler.setFormatter(_InertFormatter("vmrt: %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    if not debug:  # qemu.qmp logs connection drops itself; vmrt reports them once
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    cfg = config_mod.load()
    fsmode.secure_tops(cfg.root, cfg.run_root, cfg.cache)  # an install made 0755 before: closed
    ctx.obj = {"cfg": cfg, "debug": debug}


containers.register(main)
contexts.register(main)
images.register(main)
networks.register(main)
system.register(main)
volumes.register(main)


def _finish(code: int) -> NoReturn:
    """A command that ran to its end: its objects are frozen first, so the interpreter's exit
    does not walk them all in a last garbage collection (~15 ms of a `vmrt run` on a 2-core
    host); atexit hooks, module teardown and the flush of stdout still run as usual."""
    gc.freeze()
    sys.exit(code)


def entry() -> None:
    """Console script: one line on stderr and Docker's exit codes on failure."""
    fsmode.restrict_umask()  # every file and socket vmrt (and what it starts) makes: root's alone
    try:
        # -H / --context / VMRT_HOST / a context: the command runs on a remote host (vmrt/remote);
        # a remote session's own command (another vmrt's -H) runs here, its parent watching the link
        route = remote_routing.route(sys.argv[1:], os.environ)
        if route.session is not None:  # its arguments come from the client, as data (never argv)
            route.argv = remote_session.serve(route.session, route.argv)
        elif route.target is not None:
            from . import remote  # imported on use: a remote host only (paramiko comes with it)
            _finish(remote.run(main, route))
        rv: Any = main.main(args=route.argv, standalone_mode=False, prog_name="vmrt")
        _finish(rv if isinstance(rv, int) else 0)
    except click.exceptions.Exit as e:
        _finish(e.exit_code)
    except click.exceptions.Abort:
        click.echo("vmrt: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"vmrt: {inert(e.format_message())}", err=True)
        sys.exit(125)
    except VmrtError as e:
        click.echo(f"vmrt: {inert(str(e))}", err=True)  # guest and image text is in many messages
        LOG.debug("details", exc_info=True)
        if os.environ.get("VMRT_DEBUG") and hasattr(e, "evidence"):
            click.echo(inert(e.evidence(), block=True), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        click.echo(inert(f"vmrt: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"), err=True)
        LOG.debug("details", exc_info=True)
        sys.exit(125)
    except Exception as e:  # a bug, or a library's own error type (pyroute2's NetlinkError): still one line
        click.echo(inert(f"vmrt: internal error: {type(e).__name__}: {e} (--debug shows where)"), err=True)
        LOG.debug("details", exc_info=True)
        sys.exit(125)
