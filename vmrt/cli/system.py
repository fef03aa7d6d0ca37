"""The commands about vmrt itself and this host (click only: what each does is in
:mod:`vmrt.systemcmds`, and ``vmrt bench`` in :mod:`vmrt.bench`): info, check, bench,
kernel, agent, pool, snapshot, setup."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .. import systemcmds
from ..errors import UsageError
from .common import config_of, echo_lines


@click.command()
@click.pass_context
def info(ctx: click.Context) -> None:
    """Show the accelerator, component versions, kernel and state directories."""
    echo_lines(systemcmds.info(config_of(ctx)))


@click.group()
def check() -> None:
    """Checks of this host and of the isolation vmrt gives."""


@check.command("isolation")
@click.argument("image", default="busybox")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def check_isolation(ctx: click.Context, image: str, fmt: str) -> None:
    """Run benign isolation probes in both modes and show them side by side."""
    click.echo(systemcmds.check_isolation(config_of(ctx), image, fmt=fmt))


@click.command("bench")
@click.option("--runs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed runs per mode (start, exec), after one warm-up run.")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="Concurrent starts per batch (1: no parallel part).")
@click.option("--density-max", type=click.IntRange(min=1), default=30, show_default=True,
              help="Density: start idle containers until this many run (or memory/starts give out).")
@click.option("--modes", default="process,vm-cold,vm-pool,vm-snapshot,vm-default,runc,podman", show_default=True)
@click.option("--only", default="start,exec,memory,density,io,cpu,net", show_default=True)
@click.option("--network", default="none", show_default=True,
              help="The network of the vmrt modes' containers for start, exec, memory, density, io and cpu "
                   "(none: as the podman baseline; bridge: with the cost of the bridge network). "
                   "net always uses the default bridge.")
@click.option("--net-mib", type=click.IntRange(min=1), default=64, show_default=True,
              help="net: MiB sent per TCP throughput repetition (the same for every mode).")
@click.option("--net-requests", type=click.IntRange(min=1), default=200, show_default=True,
              help="net: HTTP GETs per mode (a new connection each) for the latency percentiles.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the results here [default: ./vmrt-bench-DATE-TIME.json].")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path, file_okay=False),
              help="PNG plots (needs matplotlib) [default: ./vmrt-bench-plots/].")
@click.option("--write-md", type=click.Path(path_type=Path, dir_okay=False),
              help="Append a dated section with the tables to this markdown file (e.g. docs/BENCHMARKS.md).")
@click.option("--image", default="busybox", show_default=True)
@click.option("--idle", type=click.IntRange(min=1), help="Idle containers per mode for memory [default: --parallel].")
@click.option("--pool-size", type=click.IntRange(min=1), help="vm-pool: warm VMs kept [default: --parallel].")
@click.pass_context
def bench(ctx: click.Context, **kw: Any) -> None:
    """Measure every isolation mode side by side (with runc and podman as baselines)."""
    from .. import bench as bench_mod  # imported on use: keeps `vmrt run` start-up lean
    ctx.exit(bench_mod.main(config_of(ctx), argv=sys.argv[1:], **kw))


@click.group()
def kernel() -> None:
    """Build the guest kernel."""


@kernel.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists.")
@click.option("-j", "--jobs", type=int, help="Parallel make jobs.")
@click.pass_context
def kernel_build(ctx: click.Context, force: bool, jobs: int | None) -> None:
    """Build (or reuse from cache) the trimmed guest kernel."""
    click.echo(systemcmds.kernel_build(config_of(ctx), force=force, jobs=jobs))


@click.group()
def agent() -> None:
    """Build the guest agent."""


@agent.command("build")
@click.option("--force", is_flag=True)
@click.pass_context
def agent_build(ctx: click.Context, force: bool) -> None:
    """Build (or reuse from cache) the static guest agent and its initramfs."""
    click.echo(systemcmds.agent_build(config_of(ctx), force=force))


@click.group(invoke_without_command=True)
@click.option("--format", "fmt", help="json, or a Go-template-like format, e.g. '{{.Ready}}'.")
@click.pass_context
def pool(ctx: click.Context, fmt: str | None) -> None:
    """The warm pool of pre-booted VMs (`vmrt pool` alone: its status)."""
    if ctx.invoked_subcommand is None:
        echo_lines(systemcmds.pool_status(config_of(ctx), fmt=fmt))


@pool.command("start")
@click.option("--size", type=click.IntRange(0, 256), help="Ready VMs to keep (default: the pool_size setting).")
@click.pass_context
def pool_start(ctx: click.Context, size: int | None) -> None:
    """Start the pool daemon in the background (it keeps SIZE VMs booted; `vmrt pool stop` ends it)."""
    click.echo(systemcmds.pool_start(config_of(ctx), size=size))


@pool.command("serve")
@click.option("--size", type=click.IntRange(0, 256), help="Ready VMs to keep (default: the pool_size setting).")
@click.pass_context
def pool_serve(ctx: click.Context, size: int | None) -> None:
    """Run the pool daemon in the foreground (what `vmrt pool start` runs)."""
    ctx.exit(systemcmds.pool_serve(config_of(ctx), size=size))


@pool.command("fill")
@click.argument("size", type=click.IntRange(0, 256), required=False)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until SIZE VMs are ready.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait at most.")
@click.pass_context
def pool_fill(ctx: click.Context, size: int | None, wait: bool, timeout: float) -> None:
    """Set the pool's size (if given) and wait until that many VMs are ready."""
    click.echo(systemcmds.pool_fill(config_of(ctx), size=size, wait=wait, timeout=timeout))


@pool.command("drain")
@click.pass_context
def pool_drain(ctx: click.Context) -> None:
    """Kill the idle VMs and stop refilling (size 0; `vmrt pool fill N` sets it again)."""
    click.echo(systemcmds.pool_drain(config_of(ctx)))


@pool.command("stop")
@click.pass_context
def pool_stop(ctx: click.Context) -> None:
    """Stop the pool daemon; its idle VMs go with it (VMs serving containers stay theirs)."""
    click.echo(systemcmds.pool_stop(config_of(ctx)))


@click.group()
def snapshot() -> None:
    """VM snapshots: VM-mode runs without a pooled VM restore one instead of booting."""


@snapshot.command("build")
@click.option("--force", is_flag=True, help="Build again even if a valid snapshot exists.")
@click.option("--memory", "memory_mib", type=click.IntRange(64, 1 << 20), metavar="MIB",
              help="Guest memory in MiB (default: memory_mib; `run -m` shapes add the guest's overhead).")
@click.option("--cpus", type=click.IntRange(1, 64), help="vCPUs (default: the configured cpus).")
@click.pass_context
def snapshot_build(ctx: click.Context, force: bool, memory_mib: int | None, cpus: int | None) -> None:
    """Boot a VM of the default shape to its agent, save its state (cached by shape and QEMU version)."""
    click.echo(systemcmds.snapshot_build(config_of(ctx), force=force, memory_mib=memory_mib, cpus=cpus))


@snapshot.command("ls")
@click.option("--format", "fmt", help="json, or a Go-template-like format, e.g. '{{.Key}}'.")
@click.pass_context
def snapshot_ls(ctx: click.Context, fmt: str | None) -> None:
    """List the snapshots."""
    echo_lines(systemcmds.snapshot_ls(config_of(ctx), fmt=fmt))


@snapshot.command("rm")
@click.pass_context
def snapshot_rm(ctx: click.Context) -> None:
    """Remove every snapshot (runs cold-boot again)."""
    click.echo(systemcmds.snapshot_rm(config_of(ctx)))


@click.command()
@click.pass_context
def setup(ctx: click.Context) -> None:
    """Build the kernel, the agent and the project's images (idempotent)."""
    echo_lines(systemcmds.setup(config_of(ctx)), err=True)


@click.group("system")
def system_group() -> None:
    """The Docker Engine API service, and what concerns the whole of vmrt."""


@system_group.command("service")
@click.option("--socket", "sock", type=click.Path(path_type=Path), default=None,
              help="Unix socket to serve on (default /run/vmrt/docker.sock).")
@click.option("-t", "--time", "idle", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Stop after this many seconds without a request (0: serve until stopped).")
@click.option("--group", help="A group that may use the socket too (0660); default root only (0600).")
@click.pass_context
def service(ctx: click.Context, sock: Path | None, idle: float, group: str | None) -> None:
    """Serve the Docker Engine API, so that `docker`, docker-compose and the Docker SDK drive vmrt
    (DOCKER_HOST=unix://SOCKET)."""
    from .. import monitor  # on use: the fork server is the service's alone
    cfg = config_of(ctx)
    path = sock or systemcmds.api_socket(cfg)
    if path.exists() and systemcmds.socket_answers(path):
        raise UsageError(f"a service already answers on {path}")
    # containers' monitors are forked from a process made now: before the service has threads, and
    # before aiohttp is loaded (the service's alone, not the fork server's)
    forks = monitor.ForkServer(cfg.run_root / "finisher.sock")
    try:
        from ..api import server  # on use: aiohttp is only the service's
        ctx.exit(server.serve(cfg, path, idle, group, forks))
    finally:
        forks.close()


@system_group.command("df")
@click.option("-v", "--verbose", is_flag=True, help="A table per type: each image, container, volume, cache entry.")
@click.option("--format", "fmt", help="json (a line per type), or a Go-template-like format, e.g. '{{.Size}}'.")
@click.pass_context
def system_df(ctx: click.Context, verbose: bool, fmt: str | None) -> None:
    """Show vmrt's disk usage: images, containers, local volumes, the build cache."""
    echo_lines(systemcmds.df(config_of(ctx), verbose=verbose, fmt=fmt))


@click.command("compose", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                            "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def compose(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run docker-compose ARGS against vmrt (its API service, started if none runs): a Compose
    file's services run as vmrt containers, each in the isolation its `isolation:` key names."""
    ctx.exit(systemcmds.compose(config_of(ctx), args))


def register(main: click.Group) -> None:
    for cmd in (info, check, bench, kernel, agent, pool, snapshot, setup, system_group, compose):
        main.add_command(cmd)
