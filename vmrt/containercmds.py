"""Container commands: ps, rm, create, start, stop, restart, kill, wait, logs.

Registered on the main group by :mod:`vmrt.cli` (and under ``vmrt container``).
Containers are named by ID, unique ID prefix or name everywhere, as in Docker.
Every command that reads state first reconciles it (:func:`lifecycle.reconcile`),
so a container whose monitor died shows as Exited, not running.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal as signal_mod
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from . import formatting, lifecycle, network
from .config import Config
from .errors import StateError, UsageError, VmrtError
from .imagecmds import inspect_doc as image_doc
from .images.store import Store
from .layout import LOG_NAME, META_NAME, container_dir
from .netcmds import ports_text
from .state import Container, State, Status

PS_COLUMNS = [("CONTAINER ID", "ID", 0), ("IMAGE", "Image", 0), ("COMMAND", "Command", 0),
              ("CREATED", "RunningFor", 0), ("STATUS", "Status", 0), ("PORTS", "Ports", 0),
              ("ISOLATION", "Isolation", 0), ("NAMES", "Names", 0)]


GRACE = click.option("-t", "--time", "timeout", default=10.0, show_default=True, type=float,
                     help="Seconds to wait for the container to stop before killing it.")


def _cfg(ctx: click.Context) -> Config:
    return ctx.obj["cfg"]


@contextlib.contextmanager
def _state(ctx: click.Context) -> Iterator[State]:
    cfg = _cfg(ctx)
    st = State(cfg.db_path)
    try:
        lifecycle.reconcile(cfg, st)
        yield st
    finally:
        st.close()


def ago(ts: float | None) -> str:
    return formatting.ago(time.time() - ts) if ts else "-"


def status_text(c: Container) -> str:
    """Docker's STATUS column: Up 5 seconds, Exited (0) 2 minutes ago, Restarting (1) ..., Created."""
    if c.status == Status.RUNNING:
        return f"Up {ago(c.started).removesuffix(' ago')}"
    if c.status == Status.CREATED:
        return "Created"
    oom = ", OOM killed" if c.oom_killed else ""
    if lifecycle.owner_alive(c):  # exited, its monitor about to restart it
        return f"Restarting ({c.exit_code}{oom}) {ago(c.finished)}"
    return f"Exited ({c.exit_code}{oom}) {ago(c.finished)}"


def ps_row(c: Container) -> dict[str, Any]:
    cmd = " ".join(c.command)
    return {"ID": c.id[:12], "Image": c.image, "Command": cmd if len(cmd) <= 22 else cmd[:21] + "…",
            "CreatedAt": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(c.created)),
            "RunningFor": ago(c.created), "Status": status_text(c), "State": c.status.value,
            "Isolation": c.isolation, "Names": c.name, "ExitCode": c.exit_code, "Ports": ""}


def _filter_value(c: Container, key: str, value: str) -> bool:
    restarting = c.status == Status.EXITED and lifecycle.owner_alive(c)
    checks = {"id": lambda: c.id.startswith(value), "name": lambda: value in c.name,
              "status": lambda: c.status.value == value or (value == "restarting" and restarting),
              "isolation": lambda: c.isolation == value, "ancestor": lambda: c.image == value,
              "exited": lambda: c.status == Status.EXITED and str(c.exit_code) == value}
    if key not in checks:
        raise UsageError(f"invalid filter {key!r}")
    return checks[key]()


def _match(c: Container, filters: tuple[str, ...]) -> bool:
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep:
            raise UsageError(f"bad format of filter {f!r} (expected name=value)")
        if not _filter_value(c, key, value):
            return False
    return True


@click.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers (default shows just running).")
@click.option("-q", "--quiet", is_flag=True, help="Only display container IDs.")
@click.option("-f", "--filter", "filters", multiple=True,
              help="Filter: id=, name=, status=created|running|exited|restarting, isolation=, ancestor=, exited=N.")
@click.option("--format", "fmt", help="table, json, or a template such as '{{.Names}} {{.Status}}'.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate IDs and commands.")
@click.pass_context
def ps(ctx: click.Context, show_all: bool, quiet: bool, filters: tuple[str, ...], fmt: str | None,
       no_trunc: bool) -> None:
    """List containers."""
    with _state(ctx) as st:
        shown = [c for c in st.list() if (show_all or filters or c.status == Status.RUNNING) and _match(c, filters)]
        ports = ports_text(_cfg(ctx), [c.id for c in shown if c.status == Status.RUNNING])
        rows = []
        for c in shown:
            row = ps_row(c)
            row["Ports"] = ports.get(c.id, "")
            if no_trunc:
                row.update(ID=c.id, Command=" ".join(c.command))
            rows.append(row)
    if quiet:
        for r in rows:
            click.echo(r["ID"])
        return
    for line in formatting.emit(fmt, rows, PS_COLUMNS):
        click.echo(line)


def _each(ctx: click.Context, refs: tuple[str, ...], action: Any) -> None:
    """Apply ``action(cfg, state, container)`` to each; errors one line each, exit 1 if any (as Docker)."""
    failed = False
    with _state(ctx) as st:
        for ref in refs:
            try:
                out = action(_cfg(ctx), st, st.get(ref))
                if out is not None:
                    click.echo(formatting.inert(str(out)))
            except VmrtError as e:
                click.echo(f"vmrt: {formatting.inert(str(e))}", err=True)
                failed = True
    if failed:
        ctx.exit(1)


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Kill and remove a running container.")
@click.option("-v", "--volumes", is_flag=True, help="Accepted for Docker compatibility (no anonymous volumes).")
@click.pass_context
def rm(ctx: click.Context, containers: tuple[str, ...], force: bool, volumes: bool) -> None:
    """Remove containers."""
    _each(ctx, containers, lambda cfg, st, c: lifecycle.remove(cfg, c.id, force) and c.name)


@click.command()
@click.argument("containers", nargs=-1, required=True)
@GRACE
@click.pass_context
def stop(ctx: click.Context, containers: tuple[str, ...], timeout: float) -> None:
    """Stop running containers: the stop signal, then SIGKILL after the grace time."""
    def act(cfg: Config, st: State, c: Container) -> str:
        lifecycle.stop(cfg, st, c, timeout)
        return c.name
    _each(ctx, containers, act)


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("-s", "--signal", "sig", default="KILL", show_default=True, help="Signal to send.")
@click.pass_context
def kill(ctx: click.Context, containers: tuple[str, ...], sig: str) -> None:
    """Send a signal to running containers (default SIGKILL)."""
    signo = lifecycle.parse_signal(sig)

    def act(cfg: Config, st: State, c: Container) -> str:
        lifecycle.send(cfg, c, signo)
        if signo in (9, 15, 2):  # a kill by hand: no restart policy brings it back
            st.set_fields(c, stop_requested=True)
        return c.name
    _each(ctx, containers, act)


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def wait(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Block until containers stop, then print their exit codes."""
    def act(cfg: Config, st: State, c: Container) -> str:
        while True:
            c = st.get(c.id)
            if c.status != Status.RUNNING:
                return str(c.exit_code if c.exit_code is not None else 0)
            if not lifecycle.owner_alive(c):
                lifecycle.reconcile(cfg, st)
                continue
            time.sleep(0.05)
    _each(ctx, containers, act)


@click.command()
@click.argument("container")
@click.option("-f", "--follow", is_flag=True, help="Follow log output.")
@click.option("-n", "--tail", default="all", help="Number of lines to show from the end (default all).")
@click.option("-t", "--timestamps", is_flag=True, help="Show timestamps.")
@click.option("--since", help="Show logs since a time (RFC 3339, Unix time) or a duration (10m, 1h).")
@click.pass_context
def logs(ctx: click.Context, container: str, follow: bool, tail: str, timestamps: bool, since: str | None) -> None:
    """Fetch the logs of a container (detached containers: stdout and stderr as written)."""
    if tail != "all" and not tail.isdigit():
        raise UsageError(f"invalid --tail {tail!r}: a number or all")
    with _state(ctx) as st:
        c = st.get(container)
        lifecycle.logs(_cfg(ctx), st, c, follow=follow, tail=None if tail == "all" else int(tail),
                       timestamps=timestamps, since=lifecycle.parse_since(since) if since else None)


def _spawn(cfg: Config, st: State, c: Container) -> None:
    """A new monitor for a created or stopped container (a restart policy applies again)."""
    # on use: the run machinery (runner, monitor, the drivers' base) would add ~14 ms to ps, logs, stop...
    from .monitor import spawn
    st.set_fields(c, stop_requested=False, restart_count=0)
    started, status, message = spawn(cfg, c.id)
    if not started:
        raise VmrtError(message, exit_code=status)


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("-a", "--attach", is_flag=True, help="Attach stdout/stderr and forward signals (one container).")
@click.pass_context
def start(ctx: click.Context, containers: tuple[str, ...], attach: bool) -> None:
    """Start created or stopped containers."""
    if attach and len(containers) > 1:
        raise UsageError("you cannot start and attach multiple containers at once")
    if attach:
        # on use: the run machinery (runner, monitor, the drivers' base) would add ~14 ms to ps, logs, stop...
        from . import runner
        with _state(ctx) as st:
            c = st.get(containers[0])
        ctx.exit(runner.start_attached(_cfg(ctx), c.id))

    def act(cfg: Config, st: State, c: Container) -> str:
        if not lifecycle.owner_alive(c):  # already running: as Docker, nothing to do
            _spawn(cfg, st, c)
        return c.name
    _each(ctx, containers, act)


@click.command()
@click.argument("containers", nargs=-1, required=True)
@GRACE
@click.pass_context
def restart(ctx: click.Context, containers: tuple[str, ...], timeout: float) -> None:
    """Restart containers (stop, then start)."""
    def act(cfg: Config, st: State, c: Container) -> str:
        lifecycle.stop(cfg, st, c, timeout)
        _spawn(cfg, st, st.get(c.id))
        return c.name
    _each(ctx, containers, act)


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
    from .execs import ExecOptions, run_exec  # on use: not on `vmrt run`'s path
    if tty and interactive and not sys.stdin.isatty():
        raise UsageError("the input device is not a TTY")
    ctx.exit(run_exec(_cfg(ctx), container, ExecOptions(list(command), list(env), user, workdir, interactive, tty,
                                                        detach)))


def _iso(ts: float | None) -> str:
    if not ts:
        return "0001-01-01T00:00:00Z"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def inspect_doc(cfg: Config, c: Container) -> dict[str, Any]:
    """``docker container inspect``'s shape for one container."""
    cdir = container_dir(cfg, c.id)
    config: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((cdir / "config.json").read_text())
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((cdir / META_NAME).read_text())
    proc, res = config.get("process", {}), config.get("linux", {}).get("resources", {})
    running = c.status == Status.RUNNING
    restarting = c.status == Status.EXITED and lifecycle.owner_alive(c)
    policy, _, count = str(meta.get("restart", "no")).partition(":")
    quota = res.get("cpu", {}).get("quota")
    req = network.request_of(config)
    return {
        "Id": c.id, "Created": _iso(c.created), "Path": c.command[0] if c.command else "",
        "Args": c.command[1:],
        "State": {"Status": "restarting" if restarting else c.status.value, "Running": running,
                  "Paused": False, "Restarting": restarting, "OOMKilled": c.oom_killed, "Dead": False,
                  "Pid": (c.pids.get("init") or c.pids.get("qemu") or 0) if running else 0,
                  # the owner: the container's monitor (Podman's ConmonPid) or an attached `vmrt run`
                  "MonitorPid": c.monitor_pid if running or restarting else 0,
                  "ExitCode": c.exit_code or 0, "Error": "", "StartedAt": _iso(c.started),
                  "FinishedAt": _iso(c.finished)},
        "Image": c.image_id, "Name": "/" + c.name, "RestartCount": c.restart_count,
        "LogPath": str(cdir / LOG_NAME) if (cdir / LOG_NAME).exists() else "",
        "Isolation": c.isolation,
        "HostConfig": {"Isolation": c.isolation, "RestartPolicy": {"Name": policy, "MaximumRetryCount":
                                                                   int(count) if count.isdigit() else 0},
                       "AutoRemove": bool(meta.get("rm")), "Memory": res.get("memory", {}).get("limit", 0),
                       "NanoCpus": int(quota * 10000) if quota else 0,
                       "PidsLimit": res.get("pids", {}).get("limit"),
                       "ReadonlyRootfs": bool(config.get("root", {}).get("readonly")),
                       "NetworkMode": req.network, "PublishAllPorts": req.publish_all,
                       "PortBindings": _bindings(req), "Dns": req.dns, "DnsSearch": req.dns_search,
                       "DnsOptions": req.dns_options, "ExtraHosts": req.extra_hosts or None,
                       "LogConfig": {"Type": "json-file", "Config": _log_config(cfg, meta)}},
        "NetworkSettings": network.settings(cfg, c.id, req) if running else
        {"Networks": {n: {"IPAddress": ""} for n in req.networks}, "Ports": {}, "IPAddress": "",
         "Gateway": "", "MacAddress": "", "SandboxKey": ""},
        "Config": {"Hostname": config.get("hostname", ""), "User": _user(proc.get("user", {})),
                   "Env": proc.get("env", []), "Cmd": c.command, "Image": c.image,
                   "WorkingDir": proc.get("cwd", ""), "Tty": bool(proc.get("terminal")),
                   "OpenStdin": config.get("annotations", {}).get("org.vmrt.stdin") == "true",
                   "ExposedPorts": {e: {} for e in req.exposed}},
        "Mounts": [{"Type": m.get("type"), "Source": m.get("source"), "Destination": m.get("destination"),
                    "RW": "ro" not in m.get("options", [])} for m in config.get("mounts", [])
                   if m.get("type") in ("bind", "tmpfs") and m.get("destination") != "/dev"],
    }


def _log_config(cfg: Config, meta: dict[str, Any]) -> dict[str, str]:
    """The log's max-size and max-file kept with the container (the settings' for an older one)."""
    kept = meta.get("log")
    if isinstance(kept, dict):
        return {str(k): str(v) for k, v in kept.items()}
    return {"max-size": cfg.log_max_size, "max-file": str(cfg.log_max_file)}


def _bindings(req: Any) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for p in req.ports:
        out.setdefault(p.key(), []).append({"HostIp": p.host_ip, "HostPort": str(p.host_port or "")})
    return out


def _user(u: dict[str, Any]) -> str:
    return f"{u.get('uid', 0)}:{u.get('gid', 0)}" if u else ""


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", help="Go-template-like format, e.g. '{{.State.Status}}'.")
@click.option("--type", "kind", type=click.Choice(["container", "image"]), help="Only this kind of object.")
@click.pass_context
def inspect(ctx: click.Context, refs: tuple[str, ...], fmt: str | None, kind: str | None) -> None:
    """Details of containers (or images) as JSON, Docker's shape."""
    docs, failed = [], False
    with _state(ctx) as st:
        for ref in refs:
            try:
                if kind != "image":
                    try:
                        docs.append(inspect_doc(_cfg(ctx), st.get(ref)))
                        continue
                    except StateError:
                        if kind == "container":
                            raise
                docs.append(image_doc(Store(_cfg(ctx).root).get(ref)))
            except VmrtError:
                click.echo(f"vmrt: No such object: {formatting.inert(ref)}", err=True)
                failed = True
    if fmt and fmt != "json":
        for d in docs:
            click.echo(formatting.render(fmt, d))
    else:
        click.echo(json.dumps(docs, indent=4))
    if failed:
        ctx.exit(1)


@click.command()
@click.argument("container")
@click.argument("new_name")
@click.pass_context
def rename(ctx: click.Context, container: str, new_name: str) -> None:
    """Rename a container."""
    with _state(ctx) as st:
        st.rename(st.get(container), new_name)


@click.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.pass_context
def container_prune(ctx: click.Context, force: bool) -> None:
    """Remove all stopped containers."""
    if not force and sys.stdin.isatty():
        if not click.confirm("WARNING! This will remove all stopped containers.\nAre you sure you want to continue?"):
            return
    removed = []
    with _state(ctx) as st:
        victims = [c for c in st.list() if c.status != Status.RUNNING and not lifecycle.owner_alive(c)]
    for c in victims:
        with contextlib.suppress(VmrtError):
            lifecycle.remove(_cfg(ctx), c.id, False)
            removed.append(c.id)
    if removed:
        click.echo("Deleted Containers:")
        for cid in removed:
            click.echo(cid)
        click.echo()
    click.echo(f"Total reclaimed containers: {len(removed)}")


def _bytes(n: float | None) -> str:
    if n is None:
        return "--"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.4g}{unit}"
        n /= 1024
    return f"{n:.4g}TiB"


STATS_COLUMNS = [("CONTAINER ID", "ID", 0), ("NAME", "Name", 0), ("ISOLATION", "Isolation", 0),
                 ("CPU %", "CPUPerc", 0), ("MEM USAGE / LIMIT", "MemUsage", 0), ("MEM %", "MemPerc", 0),
                 ("GUEST MEM", "GuestMem", 0), ("PIDS", "PIDs", 0)]


@click.command()
@click.argument("containers", nargs=-1)
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers (default shows just running).")
@click.option("--no-stream", is_flag=True, help="One reading, then exit.")
@click.option("--format", "fmt", help="table, json, or a template such as '{{.Name}} {{.MemUsage}}'.")
@click.pass_context
def stats(ctx: click.Context, containers: tuple[str, ...], show_all: bool, no_stream: bool, fmt: str | None) -> None:
    """CPU and memory of containers. For a VM: MEM is the host's real cost (PSS of QEMU, virtiofsd
    and the monitor) and GUEST MEM the container's memory as the guest sees it."""
    from . import stats as stats_mod  # on use: not on `vmrt run`'s path
    while True:
        with _state(ctx) as st:
            cs = [st.get(r) for r in containers] if containers else \
                [c for c in st.list() if show_all or c.status == Status.RUNNING]
        rows = []
        for r in stats_mod.measure([c for c in cs if c.status == Status.RUNNING],
                                   timeout=_cfg(ctx).timeouts.probe_exec):
            c, limit = r["c"], r["limit"]
            rows.append({"ID": c.id[:12], "Name": c.name, "Isolation": c.isolation, "CPUPerc": f"{r['cpu']:.2f}%",
                         "MemUsage": f"{_bytes(r['mem'])} / {_bytes(limit)}",
                         "MemPerc": f"{100 * r['mem'] / limit:.2f}%" if limit else "--",
                         "GuestMem": _bytes(r["guest_mem"]) if c.isolation == "vm" else "--", "PIDs": r["pids"]})
        rows += [{"ID": c.id[:12], "Name": c.name, "Isolation": c.isolation, "CPUPerc": "0.00%",
                  "MemUsage": "0B / 0B", "MemPerc": "0.00%", "GuestMem": "--", "PIDs": 0}
                 for c in cs if c.status != Status.RUNNING]
        if not no_stream and sys.stdout.isatty():
            click.echo("\x1b[2J\x1b[H", nl=False)
        for line in formatting.emit(fmt, rows, STATS_COLUMNS):
            click.echo(line)
        if no_stream:
            return
        time.sleep(0.5)


@click.command(context_settings={"allow_interspersed_args": False})
@click.argument("container")
@click.argument("ps_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def top(ctx: click.Context, container: str, ps_args: tuple[str, ...]) -> None:
    """The running processes of a container (for a VM: as seen inside it)."""
    from . import stats as stats_mod  # on use: not on `vmrt run`'s path
    with _state(ctx) as st:
        c = st.get(container)
        if c.status != Status.RUNNING:
            raise StateError(f"container {c.name} is not running")
    ctx.exit(stats_mod.top(c, list(ps_args), timeout=_cfg(ctx).timeouts.probe_exec))


@click.command()
@click.argument("src")
@click.argument("dest")
@click.pass_context
def cp(ctx: click.Context, src: str, dest: str) -> None:
    """Copy files between a running container and the host: CONTAINER:PATH HOSTPATH or the reverse."""
    from .cp import copy  # on use: not on `vmrt run`'s path
    copy(_cfg(ctx), src, dest)


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
    cfg = _cfg(ctx)
    with _state(ctx) as st:
        c = st.get(container)
        if c.status != Status.RUNNING or not lifecycle.owner_alive(c):
            raise StateError(f"You cannot attach to a stopped container, start it first: {c.name}")
        relay = None if no_stdin else lifecycle.StdinRelay.open(c)
        if sig_proxy and not (relay is not None and relay.raw):
            for s in (signal_mod.SIGINT, signal_mod.SIGTERM, signal_mod.SIGHUP):
                signal_mod.signal(s, lambda signo, _f: _proxy(cfg, st, c.id, signo))
        try:
            lifecycle.logs(cfg, st, c, follow=True, tail=0, timestamps=False, since=None,
                           stop=relay.detached if relay is not None else None,
                           following=relay.start if relay is not None else None)
        finally:
            if relay is not None:
                relay.close()
        if relay is not None and relay.detached.is_set():
            ctx.exit(0)
        c = st.get(c.id)
    ctx.exit(c.exit_code if c.status == Status.EXITED and c.exit_code is not None else 0)


def _proxy(cfg: Config, st: State, container_id: str, signo: int) -> None:
    with contextlib.suppress(VmrtError, OSError):
        lifecycle.send(cfg, st.get(container_id), signo)


def register(main: click.Group) -> click.Group:
    """Top-level commands, and the same under ``vmrt container`` (Docker's management form)."""
    group = click.Group("container", help="Manage containers.")
    for cmd, sub in ((ps, "ls"), (rm, "rm"), (stop, "stop"), (kill, "kill"), (wait, "wait"), (logs, "logs"),
                     (start, "start"), (restart, "restart"), (exec_, "exec"), (inspect, "inspect"),
                     (rename, "rename"), (stats, "stats"), (top, "top"), (cp, "cp"), (attach, "attach")):
        main.add_command(cmd)
        group.add_command(cmd, sub)
    group.add_command(container_prune)
    main.add_command(group)
    return group
