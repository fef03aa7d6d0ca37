"""``vmrt run``, ``create`` and the container commands (click only: what each does is in
:mod:`vmrt.containercmds`), at the top level and under ``vmrt container``, as Docker has them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .. import containercmds
from .common import config_of, echo_lines, report

GRACE = click.option("-t", "--time", "timeout", default=10.0, show_default=True, type=float,
                     help="Seconds to wait for the container to stop before killing it.")


@click.command(context_settings={"allow_interspersed_args": False})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--rm", is_flag=True, help="Remove the container when it exits.")
@click.option("--name", help="Assign a name to the container.")
@click.option("-e", "--env", multiple=True, help="Set environment variables (KEY=VALUE or KEY).")
@click.option("--env-file", multiple=True, type=click.Path(path_type=Path),
              help="Read a file of environment variables.")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.option("-u", "--user", help="Username or UID (format: <name|uid>[:<group|gid>]).")
@click.option("--hostname", help="Container host name.")
@click.option("--entrypoint", help="Overwrite the default ENTRYPOINT of the image.")
@click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("-m", "--memory", help="Memory limit (e.g. 512m); in VM mode also sizes the VM.")
@click.option("--cpus", help="Number of CPUs; in VM mode also the vCPU count (rounded up).")
@click.option("--pids-limit", help="Tune the container's pids limit (-1 for unlimited).")
@click.option("-v", "--volume", "volumes", multiple=True, help="Bind mount a volume (HOST:CONTAINER[:ro]).")
@click.option("--mount", "mounts", multiple=True,
              help="Attach a mount (type=bind|tmpfs,source=..,target=..[,readonly]).")
@click.option("--tmpfs", "tmpfs", multiple=True, help="Mount a tmpfs (CONTAINER[:size=64m,mode=1777]).")
@click.option("--runtime", help="OCI runtime for --isolation=process (runc, crun or a path; default auto).")
@click.option("--isolation", default="default", show_default=True,
              help="vm (alias hyperv), process or default (config / $VMRT_ISOLATION).")
@click.option("--read-only", is_flag=True, help="Mount the container's root filesystem read-only.")
@click.option("--storage-opt", "storage_opts", multiple=True,
              help="Storage driver option: size=SIZE, the VM's writable layer (default: the vm_storage_size setting).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), help="VM accelerator (default: auto).")
@click.option("--vm-driver", type=click.Choice(["qemu", "libvirt"]),
              help="Who runs the VM: vmrt's own QEMU, or a libvirt domain (default: the vm_driver setting).")
@click.option("--vm-memory", type=click.Choice(["auto", "shared", "private"]),
              help="A VM restored from a snapshot: share the snapshot's RAM pages with other containers, or "
                   "copy them (default: the vm_memory setting).")
@click.option("--kernel", type=click.Path(path_type=Path), help="Guest kernel (vmlinux) to boot instead of vmrt's.")
@click.option("--timings", "show_timings", is_flag=True, help="Print start-up phase timings to stderr.")
@click.option("--pull", "pull_policy", default="missing", show_default=True,
              type=click.Choice(["missing", "always", "never"]), help="Pull the image before running.")
@click.option("--platform", help="Platform (os/arch[/variant]) to pull if the image is not here.")
@click.option("-d", "--detach", is_flag=True, help="Run in the background (a monitor owns it) and print its ID.")
@click.option("--restart", default="no", show_default=True,
              help="Restart policy: no, on-failure[:N], always or unless-stopped (with -d).")
@click.option("--network", "--net", "network", default="bridge", show_default=True,
              help="Connect to a network: bridge, none, host (process isolation only) or a user network.")
@click.option("--network-alias", "--net-alias", "network_aliases", multiple=True,
              help="Add a network-scoped alias (user networks).")
@click.option("-p", "--publish", "publish", multiple=True,
              help="Publish a port: [IP:][HOST[-END]:]CONTAINER[-END][/tcp|udp].")
@click.option("-P", "--publish-all", is_flag=True, help="Publish every exposed port to a random host port.")
@click.option("--expose", multiple=True, help="Expose a port or range (for -P).")
@click.option("--dns", multiple=True, help="Set a DNS server.")
@click.option("--dns-search", multiple=True, help="Set a DNS search domain.")
@click.option("--dns-option", "dns_options", multiple=True, help="Set a DNS option.")
@click.option("--add-host", "add_hosts", multiple=True, help="Add a host-to-IP mapping (NAME:IP).")
@click.option("-l", "--label", "labels", multiple=True, help="Set metadata on the container (KEY=VALUE).")
@click.option("--label-file", multiple=True, type=click.Path(path_type=Path),
              help="Read a file of labels (KEY=VALUE lines; # comments).")
@click.option("--cidfile", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the container ID to the file (which must not exist).")
@click.option("--cid-marker", hidden=True,  # vmrt -H's attached run --cidfile (vmrt/remote/client.py)
              help="Write the new container's ID to stderr, marked with this token.")
@click.option("--log-opt", "log_opts", multiple=True,
              help="Log option (json-file): max-size=SIZE (10k, 10m, 1g), max-file=N (default: the settings).")
@click.option("--health-cmd", help="Command to run to check health (in the container's shell).")
@click.option("--health-interval", help="Time between running the check (ms|s|m|h) (default 30s).")
@click.option("--health-timeout", help="Maximum time to allow one check to run (ms|s|m|h) (default 30s).")
@click.option("--health-retries", type=int, help="Consecutive failures needed to report unhealthy (default 3).")
@click.option("--health-start-period", help="Start period: failures then do not count (ms|s|m|h) (default 0s).")
@click.option("--no-healthcheck", is_flag=True, help="Disable any container-specified HEALTHCHECK.")
@click.pass_context
def run(ctx: click.Context, **flags: Any) -> None:
    """Run a command in a new container."""
    # `vmrt create` is this command under another name: the same flags, nothing started
    status, line = containercmds.run(config_of(ctx), containercmds.RunArgs(**flags),
                                     create=ctx.info_name == "create")
    if line is not None:
        click.echo(line)
    ctx.exit(status)


create = click.Command("create", params=run.params, callback=run.callback, help="Create a new container "
                       "(the flags of run; start it with `vmrt start`).",
                       context_settings={"allow_interspersed_args": False})


@click.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers (default shows just running).")
@click.option("-q", "--quiet", is_flag=True, help="Only display container IDs.")
@click.option("-f", "--filter", "filters", multiple=True,
              help="Filter: id=, name=, status=created|running|exited|restarting, isolation=, ancestor=, exited=N, "
                   "label=KEY[=VALUE].")
@click.option("--format", "fmt", help="table, json, or a template such as '{{.Names}} {{.Status}}'.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate IDs and commands.")
@click.pass_context
def ps(ctx: click.Context, show_all: bool, quiet: bool, filters: tuple[str, ...], fmt: str | None,
       no_trunc: bool) -> None:
    """List containers."""
    echo_lines(containercmds.ps(config_of(ctx), show_all=show_all, quiet=quiet, filters=filters, fmt=fmt,
                                no_trunc=no_trunc))


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Kill and remove a running container.")
@click.option("-v", "--volumes", is_flag=True,
              help="Accepted for Docker compatibility (anonymous volumes stay: vmrt volume prune).")
@click.pass_context
def rm(ctx: click.Context, containers: tuple[str, ...], force: bool, volumes: bool) -> None:
    """Remove containers."""
    report(ctx, containercmds.rm(config_of(ctx), containers, force=force))


@click.command()
@click.argument("containers", nargs=-1, required=True)
@GRACE
@click.pass_context
def stop(ctx: click.Context, containers: tuple[str, ...], timeout: float) -> None:
    """Stop running containers: the stop signal, then SIGKILL after the grace time."""
    report(ctx, containercmds.stop(config_of(ctx), containers, timeout=timeout))


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("-s", "--signal", "sig", default="KILL", show_default=True, help="Signal to send.")
@click.pass_context
def kill(ctx: click.Context, containers: tuple[str, ...], sig: str) -> None:
    """Send a signal to running containers (default SIGKILL)."""
    report(ctx, containercmds.kill(config_of(ctx), containers, sig=sig))


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def wait(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Block until containers stop, then print their exit codes."""
    report(ctx, containercmds.wait(config_of(ctx), containers))


@click.command()
@click.argument("container")
@click.option("-f", "--follow", is_flag=True, help="Follow log output.")
@click.option("-n", "--tail", default="all", help="Number of lines to show from the end (default all).")
@click.option("-t", "--timestamps", is_flag=True, help="Show timestamps.")
@click.option("--since", help="Show logs since a time (RFC 3339, Unix time) or a duration (10m, 1h).")
@click.pass_context
def logs(ctx: click.Context, container: str, follow: bool, tail: str, timestamps: bool, since: str | None) -> None:
    """Fetch the logs of a container (detached containers: stdout and stderr as written)."""
    containercmds.logs(config_of(ctx), container, follow=follow, tail=tail, timestamps=timestamps, since=since)


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("-a", "--attach", is_flag=True, help="Attach stdout/stderr and forward signals (one container).")
@click.pass_context
def start(ctx: click.Context, containers: tuple[str, ...], attach: bool) -> None:
    """Start created or stopped containers."""
    if attach:
        ctx.exit(containercmds.start_attached(config_of(ctx), containers))
    report(ctx, containercmds.start(config_of(ctx), containers))


@click.command()
@click.argument("containers", nargs=-1, required=True)
@GRACE
@click.pass_context
def restart(ctx: click.Context, containers: tuple[str, ...], timeout: float) -> None:
    """Restart containers (stop, then start)."""
    report(ctx, containercmds.restart(config_of(ctx), containers, timeout=timeout))


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-d", "--detach", is_flag=True, help="Run the command in the background.")
@click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("-e", "--env", multiple=True, help="Set environment variables (KEY=VALUE or KEY).")
@click.option("-u", "--user", help="Username or UID (format: <name|uid>[:<group|gid>]).")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.pass_context
def exec_(ctx: click.Context, container: str, command: tuple[str, ...], detach: bool, interactive: bool, tty: bool,
          env: tuple[str, ...], user: str | None, workdir: str | None) -> None:
    """Run a command in a running container (in VM mode: inside its VM, through the guest agent)."""
    ctx.exit(containercmds.exec_command(config_of(ctx), container, command, detach=detach, interactive=interactive,
                                        tty=tty, env=env, user=user, workdir=workdir))


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", help="Go-template-like format, e.g. '{{.State.Status}}'.")
@click.option("--type", "kind", type=click.Choice(["container", "image"]), help="Only this kind of object.")
@click.pass_context
def inspect(ctx: click.Context, refs: tuple[str, ...], fmt: str | None, kind: str | None) -> None:
    """Details of containers (or images) as JSON, Docker's shape."""
    report(ctx, containercmds.inspect(config_of(ctx), refs, fmt=fmt, kind=kind))


@click.command()
@click.argument("container")
@click.argument("new_name")
@click.pass_context
def rename(ctx: click.Context, container: str, new_name: str) -> None:
    """Rename a container."""
    containercmds.rename(config_of(ctx), container, new_name)


@click.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.pass_context
def container_prune(ctx: click.Context, force: bool) -> None:
    """Remove all stopped containers."""
    if not force and sys.stdin.isatty():
        if not click.confirm("WARNING! This will remove all stopped containers.\nAre you sure you want to continue?"):
            return
    echo_lines(containercmds.prune(config_of(ctx)))


@click.command()
@click.argument("containers", nargs=-1)
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers (default shows just running).")
@click.option("--no-stream", is_flag=True, help="One reading, then exit.")
@click.option("--format", "fmt", help="table, json, or a template such as '{{.Name}} {{.MemUsage}}'.")
@click.pass_context
def stats(ctx: click.Context, containers: tuple[str, ...], show_all: bool, no_stream: bool, fmt: str | None) -> None:
    """CPU and memory of containers. For a VM: MEM is the host's real cost (PSS of QEMU, virtiofsd
    and the monitor) and GUEST MEM the container's memory as the guest sees it."""
    clear = not no_stream and sys.stdout.isatty()  # a live view, redrawn
    for lines in containercmds.stats(config_of(ctx), containers, show_all=show_all, fmt=fmt, stream=not no_stream):
        if clear:
            click.echo("\x1b[2J\x1b[H", nl=False)
        echo_lines(lines)


@click.command(context_settings={"allow_interspersed_args": False})
@click.argument("container")
@click.argument("ps_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def top(ctx: click.Context, container: str, ps_args: tuple[str, ...]) -> None:
    """The running processes of a container (for a VM: as seen inside it)."""
    ctx.exit(containercmds.top(config_of(ctx), container, ps_args))


@click.command()
@click.argument("src")
@click.argument("dest")
@click.option("--source-name", hidden=True,  # a remote client's `cp LOCAL C:PATH` (vmrt/remote)
              help="With - as SRC: stdin's tar holds one tree of this name, copied as `cp NAME C:PATH` would.")
@click.pass_context
def cp(ctx: click.Context, src: str, dest: str, source_name: str | None) -> None:
    """Copy files between a container and the host: CONTAINER:PATH HOSTPATH or the reverse;
    - as HOSTPATH is a tar stream (stdin's unpacked into a directory, or a tar on stdout)."""
    containercmds.cp(config_of(ctx), src, dest, source_name=source_name)


@click.command()
@click.argument("container")
@click.option("--sig-proxy/--no-sig-proxy", default=True, show_default=True,
              help="Pass the signals vmrt receives (Ctrl-C) to the container.")
@click.option("--no-stdin", is_flag=True, help="Do not attach stdin.")
@click.pass_context
def attach(ctx: click.Context, container: str, sig_proxy: bool, no_stdin: bool) -> None:
    """Attach to a running detached container: its output (stdout/stderr) until it exits, and this
    stdin to its stdin if it was started with -i; exit with its status. With a terminal (-t),
    Ctrl-P Ctrl-Q detaches."""
    ctx.exit(containercmds.attach(config_of(ctx), container, sig_proxy=sig_proxy, no_stdin=no_stdin))


def register(main: click.Group) -> None:
    """Top-level commands, and the same under ``vmrt container`` (Docker's management form)."""
    group = click.Group("container", help="Manage containers.")
    for cmd, sub in ((ps, "ls"), (rm, "rm"), (stop, "stop"), (kill, "kill"), (wait, "wait"), (logs, "logs"),
                     (start, "start"), (restart, "restart"), (exec_, "exec"), (inspect, "inspect"),
                     (rename, "rename"), (stats, "stats"), (top, "top"), (cp, "cp"), (attach, "attach")):
        main.add_command(cmd)
        group.add_command(cmd, sub)
    group.add_command(container_prune)
    for cmd in (run, create):
        main.add_command(cmd)
        group.add_command(cmd)
    main.add_command(group)
