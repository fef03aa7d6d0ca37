"""The ``vmrt`` command line (thin: parsing and output only)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time as time_mod
from pathlib import Path
from typing import Any

import click

from .. import __version__, cgroups, containercmds, formatting, fsmode, imagecmds, logfile, netcmds
from .. import config as config_mod
from .. import network as net
from .. import volumes as volumes_mod
from ..bundle import RunOptions, parse_cpus, parse_memory, parse_pids
from ..errors import StateError, UsageError, VmrtError
from ..formatting import inert
from ..images.store import Store
from ..network import NetRequest
from ..paths import source_root
from ..timings import Timings

LOG = logging.getLogger("vmrt")
TIMINGS = Timings()  # created at import: as close to process start as we get


class _InertFormatter(logging.Formatter):
    """Log lines (guest console tails, QEMU output with --debug) with terminal controls escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return inert(super().format(record), block=True)


def _cfg(ctx: click.Context) -> config_mod.Config:
    return ctx.obj["cfg"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Log debug details to stderr.")
@click.version_option(__version__, prog_name="vmrt")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Containers with a per-run choice of isolation: Linux namespaces or a micro-VM."""
    handler = logging.StreamHandler()
    handler.setFormatter(_InertFormatter("vmrt: %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    if not debug:  # qemu.qmp logs connection drops itself; vmrt reports them once
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    cfg = config_mod.load()
    fsmode.secure_tops(cfg.root, cfg.run_root, cfg.cache)  # an install made 0755 before: closed
    ctx.obj = {"cfg": cfg, "debug": debug}


@main.command(context_settings={"allow_interspersed_args": False})
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
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), help="VM accelerator (default: auto).")
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
@click.option("--log-opt", "log_opts", multiple=True,
              help="Log option (json-file): max-size=SIZE (10k, 10m, 1g), max-file=N (default: the settings).")
@click.pass_context
def run(ctx: click.Context, image: str, command: tuple[str, ...], rm: bool, name: str | None,
        env: tuple[str, ...], env_file: tuple[Path, ...], workdir: str | None, user: str | None,
        hostname: str | None, entrypoint: str | None, interactive: bool, tty: bool,
        memory: str | None, cpus: str | None, pids_limit: str | None, volumes: tuple[str, ...],
        mounts: tuple[str, ...], tmpfs: tuple[str, ...], runtime: str | None, isolation: str,
        read_only: bool, accel: str | None, kernel: Path | None, show_timings: bool, pull_policy: str,
        platform: str | None, detach: bool, restart: str, network: str, network_aliases: tuple[str, ...],
        publish: tuple[str, ...], publish_all: bool, expose: tuple[str, ...], dns: tuple[str, ...],
        dns_search: tuple[str, ...], dns_options: tuple[str, ...], add_hosts: tuple[str, ...],
        log_opts: tuple[str, ...]) -> None:
    """Run a command in a new container."""
    # on use: the run machinery (runner, monitor, the drivers' base) would add ~14 ms to ps, logs, stop...
    from .. import runner
    from ..monitor import parse_restart  # on use: as runner
    cfg = _cfg(ctx)
    if os.geteuid() != 0:
        raise UsageError("vmrt run needs root for now (it mounts the image and starts virtiofsd)")
    for arg in (image, *command, *env, workdir or "", user or "", hostname or "", entrypoint or "",
                *volumes, *mounts, *tmpfs):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"argument is not valid UTF-8: {arg!r}") from None
    iso = config_mod.normalize_isolation(isolation) or cfg.isolation
    if tty and interactive and not detach and not os.isatty(0):
        raise UsageError("the input device is not a TTY")
    size = (24, 80)
    if tty and os.isatty(1):
        s = os.get_terminal_size(1)
        size = (s.lines, s.columns)
    opts = RunOptions(
        image=image, command=list(command), entrypoint=entrypoint, env=list(env),
        env_files=list(env_file), workdir=workdir, user=user, hostname=hostname,
        interactive=interactive, tty=tty, tty_size=size,
        memory_bytes=parse_memory(memory) if memory else None,
        cpus=parse_cpus(cpus) if cpus else None, name=name, rm=rm, readonly=read_only,
        pids_limit=parse_pids(pids_limit) if pids_limit else None, pull=pull_policy, platform=platform,
        mounts=[*map(volumes_mod.parse_volume, volumes), *map(volumes_mod.parse_mount, mounts),
                *map(volumes_mod.parse_tmpfs, tmpfs)],
        net=_net_request(network, network_aliases, publish, publish_all, expose, dns, dns_search, dns_options,
                         add_hosts))
    volumes_mod.check_unique(opts.mounts)
    # as Docker: parents before children, whatever the order on the command line
    opts.mounts.sort(key=lambda m: len([p for p in m.target.split("/") if p]))
    if kernel is not None and not kernel.is_file():
        raise UsageError(f"kernel {kernel} not found")
    parse_restart(restart)
    if restart != "no" and rm:
        raise UsageError("conflicting options: cannot specify both --restart and --rm")
    if restart != "no" and not detach and ctx.info_name != "create":
        raise UsageError("--restart needs -d (a restart policy is applied by the container's monitor)")
    meta = {"accel": accel, "kernel": str(kernel) if kernel else None, "runtime": runtime,
            "restart": restart, "rm": rm, logfile.KEY: logfile.options(log_opts, cfg)}
    if ctx.info_name == "create":  # `vmrt create`: the same flags, nothing started
        click.echo(runner.create_detached(cfg, opts, iso, meta))
        return
    if detach:
        from ..agentbuild import monitor_binary  # on use: -d only (a process run never loads it)
        if interactive and monitor_binary(cfg) is None:
            raise UsageError("-d with -i needs the C monitor (its attach socket): run `vmrt agent build`")
        ctx.exit(_start_detached(cfg, runner.create_detached(cfg, opts, iso, meta)))
    try:
        status = runner.run(cfg, opts, iso, accel=accel, kernel=kernel, timings=TIMINGS, runtime=runtime, meta=meta)
    finally:
        if show_timings:
            TIMINGS.report()
    ctx.exit(status)


def _net_request(network: str, aliases: tuple[str, ...], publish: tuple[str, ...], publish_all: bool,
                 expose: tuple[str, ...], dns: tuple[str, ...], dns_search: tuple[str, ...],
                 dns_options: tuple[str, ...], add_hosts: tuple[str, ...]) -> NetRequest:
    if network.startswith("container:"):
        raise UsageError("--network container:NAME is not supported")
    if not network:
        raise UsageError("invalid --network ''")
    return net.NetRequest(
        network=network, aliases=[net.valid_alias(a) for a in aliases],
        ports=[m for p in publish for m in net.parse_publish(p)], publish_all=publish_all,
        exposed=[e for x in expose for e in net.parse_expose(x)], dns=[net.parse_dns(d) for d in dns],
        dns_search=[_resolv_word(d, "--dns-search") for d in dns_search],
        dns_options=[_resolv_word(o, "--dns-option") for o in dns_options],
        extra_hosts=[net.parse_add_host(h) for h in add_hosts])


def _resolv_word(value: str, flag: str) -> str:
    """A word of the container's resolv.conf: a space or newline would add an entry or a line."""
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise UsageError(f"invalid {flag} {value!r}: one word, without spaces or newlines")
    return value


def _start_detached(cfg: config_mod.Config, container_id: str) -> int:
    """Hand a created container to a new monitor; print its ID once its process runs."""
    from ..monitor import spawn  # on use: as in run
    started, status, message = spawn(cfg, container_id)
    if not started:
        raise VmrtError(message, exit_code=status)
    click.echo(container_id)
    return 0


def _runtime_line(cfg: config_mod.Config) -> str:
    from ..drivers.process import choose_runtime  # on use: a VM run never loads the process driver
    try:
        rt = choose_runtime(cfg.runtime)
    except VmrtError as e:
        return f"missing ({e})"
    out = subprocess.run([rt, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    cg = "v2" if cgroups.is_v2() else "v1"
    return f"{rt} ({out[0] if out else 'unknown version'}; setting {cfg.runtime}; cgroup {cg})"


@main.command()
@click.pass_context
def info(ctx: click.Context) -> None:
    """Show the accelerator, component versions, kernel and state directories."""
    # on use: the VM's build modules are not on a process run's path
    from .. import agentbuild
    from .. import kernel as kernel_mod  # on use: not on a process run's path
    from ..vm import accel as accel_mod  # on use: not on a process run's path
    cfg = _cfg(ctx)

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"
    acc = accel_mod.choose(cfg.accel, user_kernel=cfg.kernel is not None)
    try:
        kpath, kid = kernel_mod.find(cfg)
        kline, kidline = str(kpath), kid
    except VmrtError as e:
        kline, kidline = f"missing ({e})", "-"
    try:
        initrd = str(agentbuild.find(cfg))
    except VmrtError as e:
        initrd = f"missing ({e})"
    rows = [
        ("vmrt", __version__),
        ("Default isolation", cfg.isolation),
        ("Accelerator", f"{acc.name} ({acc.reason}; host /dev/kvm: {acc.host_kind})"),
        ("Machine", cfg.machine),
        ("QEMU", f"{shutil.which(cfg.qemu) or cfg.qemu}: {version([cfg.qemu, '--version'])}"),
        ("virtiofsd", f"{cfg.virtiofsd}: {version([cfg.virtiofsd, '--version'])}"),
        ("Process runtime", _runtime_line(cfg)),
        ("Kernel", kline),
        ("Kernel build id", kidline),
        ("Agent initramfs", initrd),
        ("State directory", str(cfg.root)),
        ("Run directory", str(cfg.run_root)),
        ("Cache directory", str(cfg.cache)),
        ("Timeouts (s)", ", ".join(f"{k}={v:g}" for k, v in vars(cfg.timeouts).items())),
    ]
    for k, v in rows:
        click.echo(f"{k + ':':<20} {v}")


@main.group()
def check() -> None:
    """Checks of this host and of the isolation vmrt gives."""


@check.command("isolation")
@click.argument("image", default="busybox")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def check_isolation(ctx: click.Context, image: str, fmt: str) -> None:
    """Run benign isolation probes in both modes and show them side by side."""
    from .. import probes  # on use: not on `vmrt run`'s path
    cfg = _cfg(ctx)
    if os.geteuid() != 0:
        raise UsageError("vmrt check isolation needs root (it runs containers)")
    result = probes.run_probes(image, None, str(cfg.root), str(cfg.run_root), cfg.jail_uid_base)
    click.echo(json.dumps(result, indent=1) if fmt == "json" else probes.table(result))


@main.command("bench")
@click.option("--runs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed runs per mode (start, exec), after one warm-up run.")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="Concurrent starts per batch (1: no parallel part).")
@click.option("--density-max", type=click.IntRange(min=1), default=30, show_default=True,
              help="Density: start idle containers until this many run (or memory/starts give out).")
@click.option("--modes", default="process,vm-cold,vm-pool,vm-snapshot,runc,podman", show_default=True)
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
    ctx.exit(bench_mod.main(_cfg(ctx), argv=sys.argv[1:], **kw))


@main.group()
def kernel() -> None:
    """Build the guest kernel."""


@kernel.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists.")
@click.option("-j", "--jobs", type=int, help="Parallel make jobs.")
@click.pass_context
def kernel_build(ctx: click.Context, force: bool, jobs: int | None) -> None:
    """Build (or reuse from cache) the trimmed guest kernel."""
    from .. import kernel as kernel_mod  # on use: the VM's build modules are not on a process run's path
    out = kernel_mod.build(_cfg(ctx), force=force, jobs=jobs)
    click.echo(str(out / "vmlinux"))


@main.group()
def agent() -> None:
    """Build the guest agent."""


@agent.command("build")
@click.option("--force", is_flag=True)
@click.pass_context
def agent_build(ctx: click.Context, force: bool) -> None:
    """Build (or reuse from cache) the static guest agent and its initramfs."""
    from .. import agentbuild  # on use: the VM's build modules are not on a process run's path
    out = agentbuild.build(_cfg(ctx), force=force)
    click.echo(str(out / "initramfs.cpio"))


@main.group(invoke_without_command=True)
@click.option("--format", "fmt", help="json, or a Go-template-like format, e.g. '{{.Ready}}'.")
@click.pass_context
def pool(ctx: click.Context, fmt: str | None) -> None:
    """The warm pool of pre-booted VMs (`vmrt pool` alone: its status)."""
    if ctx.invoked_subcommand is not None:
        return
    from ..pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    cfg = _cfg(ctx)
    if pool_mod.daemon_pid(cfg) is None:
        row = {"Running": False, "Pid": 0, "Size": 0, "Ready": 0, "Booting": 0, "Served": 0, "Shape": "",
               "LastError": ""}
    else:
        st, _ = pool_mod.request(cfg, {"op": "status"}, timeout=10.0)
        shape = st.get("shape") or {}
        row = {"Running": True, "Pid": st.get("pid"), "Size": st.get("size"), "Ready": st.get("ready"),
               "Booting": st.get("booting"), "Served": st.get("served"),
               "Shape": f"{shape.get('memory_mib')}MiB {shape.get('vcpus')}vcpu {shape.get('machine')} "
                        f"{shape.get('accel')}" if shape else "", "LastError": st.get("last_error", "")}
    for line in formatting.emit(fmt, [row], [("RUNNING", "Running", 7), ("PID", "Pid", 3), ("SIZE", "Size", 4),
                                             ("READY", "Ready", 5), ("BOOTING", "Booting", 7),
                                             ("SERVED", "Served", 6), ("SHAPE", "Shape", 5)]):
        click.echo(line)


@pool.command("start")
@click.option("--size", type=click.IntRange(0, 256), help="Ready VMs to keep (default: the pool_size setting).")
@click.pass_context
def pool_start(ctx: click.Context, size: int | None) -> None:
    """Start the pool daemon in the background (it keeps SIZE VMs booted; `vmrt pool stop` ends it)."""
    from ..pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    cfg = _cfg(ctx)
    pid = pool_mod.start(cfg, cfg.pool_size if size is None else size)
    click.echo(f"pool daemon started (pid {pid}, size {cfg.pool_size if size is None else size})")


@pool.command("serve")
@click.option("--size", type=click.IntRange(0, 256), help="Ready VMs to keep (default: the pool_size setting).")
@click.pass_context
def pool_serve(ctx: click.Context, size: int | None) -> None:
    """Run the pool daemon in the foreground (what `vmrt pool start` runs)."""
    from ..pool.daemon import Daemon  # on use: the daemon's modules are on no other command's path
    cfg = _cfg(ctx)
    ctx.exit(Daemon(cfg, cfg.pool_size if size is None else size).serve())


@pool.command("fill")
@click.argument("size", type=click.IntRange(0, 256), required=False)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until SIZE VMs are ready.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait at most.")
@click.pass_context
def pool_fill(ctx: click.Context, size: int | None, wait: bool, timeout: float) -> None:
    """Set the pool's size (if given) and wait until that many VMs are ready."""
    from ..pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    cfg = _cfg(ctx)
    if pool_mod.daemon_pid(cfg) is None:
        raise StateError("the pool daemon is not running: start it with `vmrt pool start`")
    st, _ = pool_mod.request(cfg, {"op": "fill", "size": size, "wait": wait, "timeout": timeout},
                             timeout=timeout + 10)
    if wait and not st.get("ok"):
        raise VmrtError(f"the pool has {st.get('ready')} of {st.get('size')} VMs ready"
                        + (f": {st['last_error']}" if st.get("last_error") else ""))
    click.echo(f"{st.get('ready')} of {st.get('size')} VMs ready")


@pool.command("drain")
@click.pass_context
def pool_drain(ctx: click.Context) -> None:
    """Kill the idle VMs and stop refilling (size 0; `vmrt pool fill N` sets it again)."""
    from ..pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    cfg = _cfg(ctx)
    if pool_mod.daemon_pid(cfg) is None:
        raise StateError("the pool daemon is not running")
    pool_mod.request(cfg, {"op": "drain"})
    click.echo("pool drained")


@pool.command("stop")
@click.pass_context
def pool_stop(ctx: click.Context) -> None:
    """Stop the pool daemon; its idle VMs go with it (VMs serving containers stay theirs)."""
    from ..pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    click.echo("pool daemon stopped" if pool_mod.stop(_cfg(ctx)) else "the pool daemon was not running")


@main.group()
def snapshot() -> None:
    """VM snapshots: VM-mode runs without a pooled VM restore one instead of booting."""


@snapshot.command("build")
@click.option("--force", is_flag=True, help="Build again even if a valid snapshot exists.")
@click.pass_context
def snapshot_build(ctx: click.Context, force: bool) -> None:
    """Boot a VM of the default shape to its agent, save its state (cached by shape and QEMU version)."""
    from .. import snapshot as snap_mod  # on use: the snapshot modules are not on a process run's path
    snap = snap_mod.build(_cfg(ctx), force=force)
    click.echo(f"{snap.dir} ({(snap.meta['size'] + _allocated(snap.ram)) >> 20} MiB)")


@snapshot.command("ls")
@click.option("--format", "fmt", help="json, or a Go-template-like format, e.g. '{{.Key}}'.")
@click.pass_context
def snapshot_ls(ctx: click.Context, fmt: str | None) -> None:
    """List the snapshots."""
    from .. import snapshot as snap_mod  # on use: the snapshot modules are not on a process run's path
    rows = [{"Key": s.dir.name, "Shape": f"{s.meta['shape']['memory_mib']}MiB {s.meta['shape']['vcpus']}vcpu "
                                         f"{s.meta['shape']['machine']} {s.meta['shape']['accel']}",
             "Size": f"{(s.meta['size'] + _allocated(s.ram)) / 2 ** 20:.1f}MiB", "Qemu": s.meta.get("qemu", ""),
             "Created": formatting.ago(time_mod.time() - s.meta.get("created", 0))}
            for s in snap_mod.listing(_cfg(ctx))]
    for line in formatting.emit(fmt, rows, [("KEY", "Key", 16), ("SHAPE", "Shape", 5), ("SIZE", "Size", 4),
                                            ("CREATED", "Created", 7)]):
        click.echo(line)


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512  # a sparse file: what it holds, not its length
    except OSError:
        return 0


@snapshot.command("rm")
@click.pass_context
def snapshot_rm(ctx: click.Context) -> None:
    """Remove every snapshot (runs cold-boot again)."""
    from .. import snapshot as snap_mod  # on use: the snapshot modules are not on a process run's path
    click.echo(f"removed {snap_mod.remove_all(_cfg(ctx))} snapshot(s)")


@main.group()
def image() -> None:
    """Manage images."""


@image.command("build")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.pass_context
def image_build(ctx: click.Context, recipe: Path) -> None:
    """Build an image from a recipe directory (see images/)."""
    from ..images import recipe as recipe_mod  # on use: not on `vmrt run`'s path
    ref = recipe_mod.build(recipe, Store(_cfg(ctx).root))
    click.echo(ref)


imagecmds.register(main, image)
containers = containercmds.register(main)
netcmds.register(main)
create = click.Command("create", params=run.params, callback=run.callback, help="Create a new container "
                       "(the flags of run; start it with `vmrt start`).",
                       context_settings={"allow_interspersed_args": False})
main.add_command(create)
containers.add_command(create)
containers.add_command(run)


@main.command()
@click.pass_context
def setup(ctx: click.Context) -> None:
    """Build the kernel, the agent and the project's images (idempotent)."""
    # on use: the VM's build modules are not on a process run's path
    from .. import agentbuild
    from .. import kernel as kernel_mod  # on use: not on a process run's path
    from ..images import recipe as recipe_mod  # on use: not on `vmrt run`'s path
    cfg = _cfg(ctx)
    kernel_mod.build(cfg)
    agentbuild.build(cfg)
    store = Store(cfg.root)
    for r in sorted((source_root() / "images").glob("*/recipe.toml")):
        click.echo(f"[image] {recipe_mod.build(r.parent, store)}", err=True)


def entry() -> None:
    """Console script: one line on stderr and Docker's exit codes on failure."""
    fsmode.restrict_umask()  # every file and socket vmrt (and what it starts) makes: root's alone
    try:
        rv: Any = main.main(standalone_mode=False, prog_name="vmrt")
        sys.exit(rv if isinstance(rv, int) else 0)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
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
