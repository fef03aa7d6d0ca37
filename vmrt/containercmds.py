"""What the container verbs do: run, create, ps, rm, stop, kill, wait, logs, start, restart,
exec, inspect, rename, prune, stats, top, cp, attach.

The CLI (:mod:`vmrt.cli.containers`) parses the flags and prints what these return: lines,
an exit status, or, for a verb over several containers, one line or one error per container
as it goes. Containers are named by ID, unique ID prefix or name everywhere, as in Docker.
Every command that reads state first reconciles it (:func:`lifecycle.reconcile`),
so a container whose monitor died shows as Exited, not running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import signal as signal_mod
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import bundle, formatting, fsmode, healthstate, lifecycle, logfile, network
from . import config as config_mod
from . import volumes as volumes_mod
from .bundle import STORAGE_SIZE, VM_MEMORY, RunOptions, parse_cpus, parse_memory, parse_pids
from .config import Config
from .errors import StateError, UsageError, VmrtError
from .imagecmds import inspect_doc as image_doc
from .images.store import Store
from .layout import LOG_NAME, META_NAME, VM_INFO_NAME, Meta, container_dir
from .netcmds import ports_text
from .ocispec import Spec
from .state import Container, State, Status
from .timings import Timings

KILL_WAIT = 10.0  # seconds a kill with SIGKILL waits for the container to be seen stopped

PS_COLUMNS = [("CONTAINER ID", "ID", 0), ("IMAGE", "Image", 0), ("COMMAND", "Command", 0),
              ("CREATED", "RunningFor", 0), ("STATUS", "Status", 0), ("PORTS", "Ports", 0),
              ("ISOLATION", "Isolation", 0), ("NAMES", "Names", 0)]

# what a verb over several containers yields: a line to print, or one container's failure
Outcomes = Iterator[str | VmrtError]


@contextlib.contextmanager
def _state(cfg: Config) -> Iterator[State]:
    st = State(cfg.db_path)
    try:
        lifecycle.reconcile(cfg, st)
        yield st
    finally:
        st.close()


# --- run, create ----------------------------------------------------------------------
@dataclasses.dataclass
class RunArgs:
    """``vmrt run``'s (and ``create``'s) flags as given: :func:`run` parses and checks them."""

    image: str
    command: tuple[str, ...] = ()
    rm: bool = False
    name: str | None = None
    env: tuple[str, ...] = ()
    env_file: tuple[Path, ...] = ()
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    entrypoint: str | None = None
    interactive: bool = False
    stdin_once: bool = False  # the API's StdinOnce: the first attach's EOF closes the container's stdin
    tty_size: tuple[int, int] | None = None  # rows, columns (else this terminal's, or 24x80)
    health_cmd: str | None = None
    health_interval: str | None = None
    health_timeout: str | None = None
    health_retries: int | None = None
    health_start_period: str | None = None
    no_healthcheck: bool = False
    healthcheck: Any = None  # the API's Config.Healthcheck (Docker's object), under the flags
    tty: bool = False
    memory: str | None = None
    cpus: str | None = None
    pids_limit: str | None = None
    volumes: tuple[str, ...] = ()
    mounts: tuple[str, ...] = ()
    tmpfs: tuple[str, ...] = ()
    runtime: str | None = None
    isolation: str = "default"
    read_only: bool = False
    storage_opts: tuple[str, ...] = ()
    vm_memory: str | None = None
    accel: str | None = None
    vm_driver: str | None = None   # --vm-driver: qemu or libvirt (None: the vm_driver setting)
    kernel: Path | None = None
    show_timings: bool = False
    pull_policy: str = "missing"
    platform: str | None = None
    detach: bool = False
    restart: str = "no"
    network: str = "bridge"
    network_aliases: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    publish_all: bool = False
    expose: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()
    add_hosts: tuple[str, ...] = ()
    log_opts: tuple[str, ...] = ()
    # removed once it exited by whoever waits for it (the API service: Docker's AutoRemove, whose
    # exit code a waiter still reads), not by its monitor as --rm is
    rm_deferred: bool = False
    labels: tuple[str, ...] = ()   # --label KEY=VALUE (or KEY: an empty value)
    label_file: tuple[Path, ...] = ()  # --label-file: lines as --label's, read before them
    cidfile: Path | None = None  # --cidfile: the new container's ID written there (it must not exist)
    cid_marker: str | None = None  # (hidden) vmrt -H's attached run --cidfile: the ID on stderr, marked


def run(cfg: Config, a: RunArgs, *, create: bool = False) -> tuple[int, str | None]:
    """``vmrt run`` (attached, or ``-d``) and ``vmrt create``: the exit status, and the line to
    print (the new container's ID, for create and -d)."""
    # on use: the run machinery (runner, monitor, the drivers' base) would add ~14 ms to ps, logs, stop...
    from . import runner
    from .monitor import parse_restart  # on use: as runner
    if os.geteuid() != 0:
        raise UsageError("vmrt run needs root for now (it mounts the image and starts virtiofsd)")
    for arg in (a.image, *a.command, *a.env, a.workdir or "", a.user or "", a.hostname or "", a.entrypoint or "",
                *a.volumes, *a.mounts, *a.tmpfs):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"argument is not valid UTF-8: {arg!r}") from None
    iso = config_mod.normalize_isolation(a.isolation) or cfg.isolation
    if a.tty and a.interactive and not a.detach and not create and not os.isatty(0):
        raise UsageError("the input device is not a TTY")
    size = a.tty_size or (24, 80)
    if a.tty and a.tty_size is None and os.isatty(1):
        s = os.get_terminal_size(1)
        size = (s.lines, s.columns)
    opts = RunOptions(
        image=a.image, command=list(a.command), entrypoint=a.entrypoint, env=list(a.env),
        env_files=list(a.env_file), workdir=a.workdir, user=a.user, hostname=a.hostname,
        interactive=a.interactive, stdin_once=a.stdin_once, tty=a.tty, tty_size=size,
        memory_bytes=parse_memory(a.memory) if a.memory else None,
        cpus=parse_cpus(a.cpus) if a.cpus else None, name=a.name, rm=a.rm, readonly=a.read_only,
        pids_limit=parse_pids(a.pids_limit) if a.pids_limit else None, pull=a.pull_policy, platform=a.platform,
        mounts=[*map(volumes_mod.parse_volume, a.volumes), *map(volumes_mod.parse_mount, a.mounts),
                *map(volumes_mod.parse_tmpfs, a.tmpfs)],
        net=_net_request(a), storage_size=_storage_size(a.storage_opts), vm_memory=a.vm_memory,
        healthcheck=_healthcheck(a),
        labels=parse_labels((*label_lines(a.label_file), *a.labels)))
    if a.vm_memory is not None:
        config_mod.check_vm_memory(cfg, a.vm_memory, "--vm-memory")
    volumes_mod.check_unique(opts.mounts)
    volumes_mod.resolve_named(cfg, opts.mounts)
    # as Docker: parents before children, whatever the order on the command line
    opts.mounts.sort(key=lambda m: len([p for p in m.target.split("/") if p]))
    if a.kernel is not None and not a.kernel.is_file():
        raise UsageError(f"kernel {a.kernel} not found")
    parse_restart(a.restart)
    if a.restart != "no" and a.rm:
        raise UsageError("conflicting options: cannot specify both --restart and --rm")
    if a.restart != "no" and not a.detach and not create:
        raise UsageError("--restart needs -d (a restart policy is applied by the container's monitor)")
    meta: Meta = {"accel": a.accel, "kernel": str(a.kernel) if a.kernel else None, "runtime": a.runtime,
                  "restart": a.restart, "rm": a.rm, "log": logfile.options(a.log_opts, cfg),
                  "vm_driver": a.vm_driver or cfg.vm_driver}
    config_mod.check_vm_driver(meta["vm_driver"], "--vm-driver")
    if a.rm_deferred:
        if a.restart != "no":
            raise UsageError("conflicting options: cannot specify both a restart policy and AutoRemove")
        meta["rm_deferred"] = True
    if a.cid_marker is not None and not (len(a.cid_marker) == 32 and all(ch in "0123456789abcdef"
                                                                         for ch in a.cid_marker)):
        raise UsageError("invalid --cid-marker: 32 hex digits (vmrt -H's own)")

    def created(cid_: str) -> None:
        cid.write(cid_)
        if a.cid_marker is not None:  # for the client of vmrt -H, whose marker token it is
            os.write(2, f"\0vmrt-cid:{a.cid_marker}:{cid_}\0".encode())
    with CidFile(a.cidfile) as cid:
        if create:  # `vmrt create`: the same flags, nothing started
            return 0, cid.write(runner.create_detached(cfg, opts, iso, meta))
        if a.detach:
            from .agentbuild import monitor_binary  # on use: -d only (a process run never loads it)
            if a.interactive and monitor_binary(cfg) is None:
                raise UsageError("-d with -i needs the C monitor (its attach socket): run `vmrt agent build`")
            return 0, _start_detached(cfg, cid.write(runner.create_detached(cfg, opts, iso, meta)))
        timings = Timings()  # its zero is this process's start, whenever it is made
        try:
            status = runner.run(cfg, opts, iso, accel=a.accel, kernel=a.kernel, timings=timings,
                                runtime=a.runtime, meta=meta, on_created=created)
        finally:
            if a.show_timings:
                timings.report()
        return status, None


class CidFile:
    """``--cidfile PATH``, as Docker's: refused if PATH exists, made (the caller's umask) before
    the container, its ID written once it exists, removed again if none came to be."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.fd, self.written = path, -1, False
        if path is None:
            return
        if os.path.lexists(path):
            raise UsageError(f"container ID file found, make sure the other container isn't running or delete {path}")
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.fchmod(self.fd, 0o666 & ~fsmode.caller_umask())  # the user's file, as save -o's
        except OSError as e:
            raise UsageError(f"failed to create the container ID file {path}: {e.strerror}") from None

    def write(self, cid: str) -> str:
        if self.fd >= 0 and not self.written:
            os.write(self.fd, cid.encode())
            self.written = True
        return cid

    def __enter__(self) -> CidFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if not self.written and self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


def _healthcheck(a: RunArgs) -> dict[str, Any] | None:
    """The run's Healthcheck fields (``--health-*``, the API's object), checked; None: the image's."""
    flags = (a.health_cmd, a.health_interval, a.health_timeout, a.health_retries, a.health_start_period)
    if a.no_healthcheck:
        if any(f is not None for f in flags):
            raise UsageError("--no-healthcheck conflicts with --health-* options")
        return {"Test": ["NONE"]}
    hc = healthstate.check(a.healthcheck, "Healthcheck") if a.healthcheck is not None else {}
    if a.health_cmd is not None:
        if not a.health_cmd.strip():
            raise UsageError("--health-cmd is empty")
        hc["Test"] = ["CMD-SHELL", a.health_cmd]
    for text, key, flag in ((a.health_interval, "Interval", "--health-interval"),
                            (a.health_timeout, "Timeout", "--health-timeout"),
                            (a.health_start_period, "StartPeriod", "--health-start-period")):
        if text is not None:
            hc[key] = healthstate.parse_duration(text, flag)
    if a.health_retries is not None:
        if a.health_retries < 0:
            raise UsageError("--health-retries cannot be negative")
        hc["Retries"] = a.health_retries
    return healthstate.check(hc, "Healthcheck") if hc else None


def label_lines(files: tuple[Path, ...]) -> list[str]:
    """``--label-file``: its lines as ``--label`` values (blank and ``#`` lines skipped, as an
    env file's; Docker's format)."""
    out: list[str] = []
    for f in files:
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--label-file {f}: {getattr(e, 'strerror', None) or e}") from None
        out += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return out


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """``--label KEY=VALUE`` (``KEY`` alone: an empty value), as Docker; a key is non-empty text."""
    out = {}
    for p in pairs:
        k, _, v = p.partition("=")
        if not k.strip() or "\0" in p:
            raise UsageError(f"invalid label {p!r}: KEY=VALUE")
        out[k] = v
    return out


def _storage_size(opts: tuple[str, ...]) -> int | None:
    """``--storage-opt size=SIZE``: the bytes of a VM container's disk (vm/disk.py)."""
    if not opts:
        return None
    from .vm import disk as vmdisk  # on use: only a run with --storage-opt parses one
    size = vmdisk.parse_storage_opts(opts).get("size")
    return vmdisk.storage_size(size) if size is not None else None


def _net_request(a: RunArgs) -> network.NetRequest:
    if a.network.startswith("container:"):
        raise UsageError("--network container:NAME is not supported")
    if not a.network:
        raise UsageError("invalid --network ''")
    return network.NetRequest(
        network=a.network, aliases=[network.valid_alias(x) for x in a.network_aliases],
        ports=[m for p in a.publish for m in network.parse_publish(p)], publish_all=a.publish_all,
        exposed=[e for x in a.expose for e in network.parse_expose(x)], dns=[network.parse_dns(d) for d in a.dns],
        dns_search=[_resolv_word(d, "--dns-search") for d in a.dns_search],
        dns_options=[_resolv_word(o, "--dns-option") for o in a.dns_options],
        extra_hosts=[network.parse_add_host(h) for h in a.add_hosts])


def _resolv_word(value: str, flag: str) -> str:
    """A word of the container's resolv.conf: a space or newline would add an entry or a line."""
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise UsageError(f"invalid {flag} {value!r}: one word, without spaces or newlines")
    return value


def _start_detached(cfg: Config, container_id: str) -> str:
    """Hand a created container to a new monitor; its ID once its process runs."""
    from .monitor import spawn  # on use: as in run
    started, status, message = spawn(cfg, container_id)
    if not started:
        raise VmrtError(message, exit_code=status)
    return container_id


# --- ps -------------------------------------------------------------------------------
def ago(ts: float | None) -> str:
    return formatting.ago(time.time() - ts) if ts else "-"


def status_text(c: Container) -> str:
    """Docker's STATUS column: Up 5 seconds, Exited (0) 2 minutes ago, Restarting (1) ..., Created."""
    if c.status == Status.RUNNING:
        health = (healthstate.read(c.run_dir) or {}).get("Status")
        shown = {"starting": " (health: starting)", "healthy": " (healthy)", "unhealthy": " (unhealthy)"}
        return f"Up {ago(c.started).removesuffix(' ago')}{shown.get(health or '', '')}"
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


def _labels(cfg: Config, c: Container) -> dict[str, str]:
    try:
        return bundle.labels_of(json.loads((container_dir(cfg, c.id) / "config.json").read_text()))
    except (OSError, ValueError):
        return {}


def _filter_value(cfg: Config, c: Container, key: str, value: str) -> bool:
    if key == "label":  # label=KEY or label=KEY=VALUE
        k, sep, v = value.partition("=")
        labels = _labels(cfg, c)
        return k in labels and (not sep or labels[k] == v)
    restarting = c.status == Status.EXITED and lifecycle.owner_alive(c)
    checks = {"id": lambda: c.id.startswith(value), "name": lambda: value in c.name,
              "status": lambda: c.status.value == value or (value == "restarting" and restarting),
              "isolation": lambda: c.isolation == value, "ancestor": lambda: c.image == value,
              "exited": lambda: c.status == Status.EXITED and str(c.exit_code) == value,
              "health": lambda: ((healthstate.read(c.run_dir) if c.status == Status.RUNNING else None)
                                 or {}).get("Status", "none") == value}
    if key not in checks:
        raise UsageError(f"invalid filter {key!r}")
    return checks[key]()


def _match(cfg: Config, c: Container, filters: tuple[str, ...]) -> bool:
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep:
            raise UsageError(f"bad format of filter {f!r} (expected name=value)")
        if not _filter_value(cfg, c, key, value):
            return False
    return True


def matching(cfg: Config, *, show_all: bool, filters: tuple[str, ...]) -> list[Container]:
    """The containers ``ps`` shows: running ones, or all (``show_all`` or any filter), filtered."""
    with _state(cfg) as st:
        return [c for c in st.list()
                if (show_all or filters or c.status == Status.RUNNING) and _match(cfg, c, filters)]


def removes_when_waited(cfg: Config, c: Container) -> bool:
    """Whether a container is removed by its waiter once it exited (AutoRemove through the API)."""
    try:
        return bool(json.loads((container_dir(cfg, c.id) / META_NAME).read_text()).get("rm_deferred"))
    except (OSError, ValueError):
        return False


def ps(cfg: Config, *, show_all: bool, quiet: bool, filters: tuple[str, ...], fmt: str | None,
       no_trunc: bool) -> list[str]:
    """``vmrt ps``'s lines."""
    shown = matching(cfg, show_all=show_all, filters=filters)
    ports = ports_text(cfg, [c.id for c in shown if c.status == Status.RUNNING])
    rows = []
    for c in shown:
        row = ps_row(c)
        row["Ports"] = ports.get(c.id, "")
        if no_trunc:
            row.update(ID=c.id, Command=" ".join(c.command))
        rows.append(row)
    if quiet:
        return [r["ID"] for r in rows]
    return formatting.emit(fmt, rows, PS_COLUMNS)


# --- rm, stop, kill, wait, start, restart: each container in turn ------------------------
def _each(cfg: Config, refs: tuple[str, ...], action: Callable[[Config, State, Container], object]) -> Outcomes:
    """``action(cfg, state, container)`` on each: what it returns (a name, an exit code) as a
    line, or its error; the next container either way (as Docker)."""
    with _state(cfg) as st:
        for ref in refs:
            try:
                out = action(cfg, st, st.get(ref))
            except VmrtError as e:
                yield e
                continue
            if out is not None:
                yield formatting.inert(str(out))


def rm(cfg: Config, refs: tuple[str, ...], *, force: bool) -> Outcomes:
    """``vmrt rm [-f]``."""
    return _each(cfg, refs, lambda cfg, st, c: lifecycle.remove(cfg, c.id, force) and c.name)


def stop(cfg: Config, refs: tuple[str, ...], *, timeout: float) -> Outcomes:
    """``vmrt stop``: the stop signal, then SIGKILL after ``timeout`` seconds."""
    def act(cfg: Config, st: State, c: Container) -> str:
        lifecycle.stop(cfg, st, c, timeout)
        return c.name
    return _each(cfg, refs, act)


def kill(cfg: Config, refs: tuple[str, ...], *, sig: str) -> Outcomes:
    """``vmrt kill -s SIG`` (a bad signal name fails before any container is touched)."""
    signo = lifecycle.parse_signal(sig)

    def act(cfg: Config, st: State, c: Container) -> str:
        lifecycle.send(cfg, c, signo)
        if signo in (9, 15, 2):  # a kill by hand: no restart policy brings it back
            st.set_fields(c, stop_requested=True)
        if signo == 9:  # as Docker's: a SIGKILL is seen through (bounded), so that ps shows it stopped
            lifecycle.wait_exit(st, c, KILL_WAIT)
        return c.name
    return _each(cfg, refs, act)


def wait(cfg: Config, refs: tuple[str, ...]) -> Outcomes:
    """``vmrt wait``: each container's exit code once it stopped."""
    def act(cfg: Config, st: State, c: Container) -> str:
        while True:
            c = st.get(c.id)
            if c.status != Status.RUNNING:
                return str(c.exit_code if c.exit_code is not None else 0)
            if not lifecycle.owner_alive(c):
                lifecycle.reconcile(cfg, st)
                continue
            time.sleep(0.05)
    return _each(cfg, refs, act)


def logs(cfg: Config, ref: str, *, follow: bool, tail: str, timestamps: bool, since: str | None) -> None:
    """``vmrt logs``: the container's recorded stdout and stderr, written to ours."""
    if tail != "all" and not tail.isdigit():
        raise UsageError(f"invalid --tail {tail!r}: a number or all")
    with _state(cfg) as st:
        c = st.get(ref)
        lifecycle.logs(cfg, st, c, follow=follow, tail=None if tail == "all" else int(tail),
                       timestamps=timestamps, since=lifecycle.parse_since(since) if since else None)


def _spawn(cfg: Config, st: State, c: Container) -> None:
    """A new monitor for a created or stopped container (a restart policy applies again)."""
    # on use: the run machinery (runner, monitor, the drivers' base) would add ~14 ms to ps, logs, stop...
    from .monitor import spawn
    st.set_fields(c, stop_requested=False, restart_count=0)
    started, status, message = spawn(cfg, c.id)
    if not started:
        raise VmrtError(message, exit_code=status)


def start_attached(cfg: Config, refs: tuple[str, ...]) -> int:
    """``vmrt start -a``: one container, run again attached to this terminal; its exit status."""
    if len(refs) > 1:
        raise UsageError("you cannot start and attach multiple containers at once")
    # on use: the run machinery (runner, monitor, the drivers' base) would add ~14 ms to ps, logs, stop...
    from . import runner
    with _state(cfg) as st:
        c = st.get(refs[0])
    return runner.start_attached(cfg, c.id)


def start(cfg: Config, refs: tuple[str, ...]) -> Outcomes:
    """``vmrt start``: a new monitor for each container not running already."""
    def act(cfg: Config, st: State, c: Container) -> str:
        if not lifecycle.owner_alive(c):  # already running: as Docker, nothing to do
            _spawn(cfg, st, c)
        return c.name
    return _each(cfg, refs, act)


def restart(cfg: Config, refs: tuple[str, ...], *, timeout: float) -> Outcomes:
    """``vmrt restart``: stop (as :func:`stop`), then start."""
    def act(cfg: Config, st: State, c: Container) -> str:
        lifecycle.stop(cfg, st, c, timeout)
        _spawn(cfg, st, st.get(c.id))
        return c.name
    return _each(cfg, refs, act)


def exec_command(cfg: Config, ref: str, command: tuple[str, ...], *, detach: bool, interactive: bool, tty: bool,
                 env: tuple[str, ...], user: str | None, workdir: str | None) -> int:
    """``vmrt exec``: the command's exit status."""
    from .execs import ExecOptions, run_exec  # on use: not on `vmrt run`'s path
    if tty and interactive and not sys.stdin.isatty():
        raise UsageError("the input device is not a TTY")
    return run_exec(cfg, ref, ExecOptions(list(command), list(env), user, workdir, interactive, tty, detach))


# --- inspect ---------------------------------------------------------------------------
def _iso(ts: float | None) -> str:
    if not ts:
        return "0001-01-01T00:00:00Z"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def inspect_doc(cfg: Config, c: Container) -> dict[str, Any]:
    """``docker container inspect``'s shape for one container."""
    cdir = container_dir(cfg, c.id)
    config: Spec = {}
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
    vm: dict[str, Any] | None = None  # a running VM's source and RAM mode (the VM driver wrote it)
    if c.isolation == "vm" and running and c.run_dir:
        with contextlib.suppress(OSError, ValueError):
            vm = json.loads((Path(c.run_dir) / VM_INFO_NAME).read_text())
    return {
        "Id": c.id, "Created": _iso(c.created), "Path": c.command[0] if c.command else "",
        "Args": c.command[1:],
        "State": {"Status": "restarting" if restarting else c.status.value, "Running": running,
                  "Paused": False, "Restarting": restarting, "OOMKilled": c.oom_killed, "Dead": False,
                  "Pid": (c.pids.get("init") or c.pids.get("qemu") or 0) if running else 0,
                  # the owner: the container's monitor (Podman's ConmonPid) or an attached `vmrt run`
                  "MonitorPid": c.monitor_pid if running or restarting else 0,
                  "ExitCode": c.exit_code or 0, "Error": "", "StartedAt": _iso(c.started),
                  "FinishedAt": _iso(c.finished),
                  **({"Health": healthstate.read(c.run_dir) or healthstate.starting()}
                     if healthstate.of(config) else {})},
        "Image": c.image_id, "Name": "/" + c.name, "RestartCount": c.restart_count,
        "LogPath": str(cdir / LOG_NAME) if (cdir / LOG_NAME).exists() else "",
        "Isolation": c.isolation,
        "HostConfig": {"Isolation": c.isolation, "RestartPolicy": {"Name": policy, "MaximumRetryCount":
                                                                   int(count) if count.isdigit() else 0},
                       "AutoRemove": bool(meta.get("rm") or meta.get("rm_deferred")),
                       "Memory": res.get("memory", {}).get("limit", 0),
                       "NanoCpus": int(quota * 10000) if quota else 0,
                       "PidsLimit": res.get("pids", {}).get("limit"),
                       "ReadonlyRootfs": bool(config.get("root", {}).get("readonly")),
                       "StorageOpt": {"size": size} if (size := config.get("annotations", {}).get(STORAGE_SIZE))
                       else None,
                       "NetworkMode": req.network, "PublishAllPorts": req.publish_all,
                       "PortBindings": _bindings(req), "Dns": req.dns, "DnsSearch": req.dns_search,
                       "DnsOptions": req.dns_options, "ExtraHosts": req.extra_hosts or None,
                       "LogConfig": {"Type": "json-file", "Config": _log_config(cfg, meta)},
                       "VMMemory": config.get("annotations", {}).get(VM_MEMORY, "")},
        "VM": vm,
        "NetworkSettings": network.settings(cfg, c.id, req) if running else
        {"Networks": {n: {"IPAddress": ""} for n in req.networks}, "Ports": {}, "IPAddress": "",
         "Gateway": "", "MacAddress": "", "SandboxKey": ""},
        "Config": {"Hostname": config.get("hostname", ""), "User": _user(proc.get("user", {})),
                   "Env": proc.get("env", []), "Cmd": c.command, "Image": c.image,
                   "WorkingDir": proc.get("cwd", ""), "Tty": bool(proc.get("terminal")),
                   "OpenStdin": config.get("annotations", {}).get("org.vmrt.stdin") == "true",
                   "StdinOnce": config.get("annotations", {}).get("org.vmrt.stdin-once") == "true",
                   **({"Healthcheck": hc} if (hc := healthstate.of(config)) else {}),
                   "ExposedPorts": {e: {} for e in req.exposed}, "Labels": bundle.labels_of(config)},
        "Mounts": [{"Type": "volume" if m.get(volumes_mod.VOLUME_KEY) else m.get("type"),
                    **({"Name": m[volumes_mod.VOLUME_KEY], "Driver": "local"} if m.get(volumes_mod.VOLUME_KEY)
                       else {}),
                    "Source": m.get("source"), "Destination": m.get("destination"),
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


def inspect(cfg: Config, refs: tuple[str, ...], *, fmt: str | None, kind: str | None) -> Outcomes:
    """``vmrt inspect``: containers (or images: ``kind``, or a ref no container has) as Docker's
    documents; a ref that names nothing is one error, the others are shown."""
    docs = []
    with _state(cfg) as st:
        for ref in refs:
            try:
                if kind != "image":
                    try:
                        docs.append(inspect_doc(cfg, st.get(ref)))
                        continue
                    except StateError:
                        if kind == "container":
                            raise
                docs.append(image_doc(Store(cfg.root).get(ref)))
            except VmrtError:
                yield StateError(f"No such object: {ref}")
    yield from formatting.documents(fmt, docs)


# --- rename, prune -----------------------------------------------------------------------
def rename(cfg: Config, ref: str, new_name: str) -> None:
    """``vmrt rename``."""
    with _state(cfg) as st:
        st.rename(st.get(ref), new_name)


def prune(cfg: Config) -> list[str]:
    """``vmrt container prune`` (confirmed): remove every stopped container; the report's lines."""
    removed = []
    with _state(cfg) as st:
        victims = [c for c in st.list() if c.status != Status.RUNNING and not lifecycle.owner_alive(c)]
    for c in victims:
        with contextlib.suppress(VmrtError):
            lifecycle.remove(cfg, c.id, False)
            removed.append(c.id)
    lines = ["Deleted Containers:", *removed, ""] if removed else []
    return [*lines, f"Total reclaimed containers: {len(removed)}"]


# --- stats, top, cp, attach -------------------------------------------------------------
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


def stats(cfg: Config, refs: tuple[str, ...], *, show_all: bool, fmt: str | None,
          stream: bool) -> Iterator[Iterator[str]]:
    """``vmrt stats``: one reading's lines, then (``stream``) another every half second; a
    reading's lines are formatted as they are read (a live view clears the screen first)."""
    from . import stats as stats_mod  # on use: not on `vmrt run`'s path
    while True:
        with _state(cfg) as st:
            cs = [st.get(r) for r in refs] if refs else \
                [c for c in st.list() if show_all or c.status == Status.RUNNING]
        rows = []
        for r in stats_mod.measure([c for c in cs if c.status == Status.RUNNING], timeout=cfg.timeouts.probe_exec):
            c, limit = r["c"], r["limit"]
            rows.append({"ID": c.id[:12], "Name": c.name, "Isolation": c.isolation, "CPUPerc": f"{r['cpu']:.2f}%",
                         "MemUsage": f"{_bytes(r['mem'])} / {_bytes(limit)}",
                         "MemPerc": f"{100 * r['mem'] / limit:.2f}%" if limit else "--",
                         "GuestMem": _bytes(r["guest_mem"]) if c.isolation == "vm" else "--", "PIDs": r["pids"]})
        rows += [{"ID": c.id[:12], "Name": c.name, "Isolation": c.isolation, "CPUPerc": "0.00%",
                  "MemUsage": "0B / 0B", "MemPerc": "0.00%", "GuestMem": "--", "PIDs": 0}
                 for c in cs if c.status != Status.RUNNING]
        yield _formatted(fmt, rows)
        if not stream:
            return
        time.sleep(0.5)


def _formatted(fmt: str | None, rows: list[dict[str, Any]]) -> Iterator[str]:
    """The reading's lines, formatted on the first read (a bad template fails after the clear)."""
    yield from formatting.emit(fmt, rows, STATS_COLUMNS)


def top(cfg: Config, ref: str, ps_args: tuple[str, ...]) -> int:
    """``vmrt top``: the container's processes (ps's output) written to our stdout; ps's status."""
    from . import stats as stats_mod  # on use: not on `vmrt run`'s path
    with _state(cfg) as st:
        c = st.get(ref)
        if c.status != Status.RUNNING:
            raise StateError(f"container {c.name} is not running")
    return stats_mod.top(c, list(ps_args), timeout=cfg.timeouts.probe_exec)


def cp(cfg: Config, src: str, dest: str, *, source_name: str | None = None) -> None:
    """``vmrt cp``: CONTAINER:PATH HOSTPATH or the reverse (``-``: a tar stream, as Docker's)."""
    from .cp import copy  # on use: not on `vmrt run`'s path
    copy(cfg, src, dest, source_name=source_name)


def attach(cfg: Config, ref: str, *, sig_proxy: bool, no_stdin: bool) -> int:
    """``vmrt attach``: the running container's output (and this stdin to its stdin, if it has
    one) until it exits or Ctrl-P Ctrl-Q detaches; its exit status (0 when detached)."""
    with _state(cfg) as st:
        c = st.get(ref)
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
            return 0
        c = st.get(c.id)
    return c.exit_code if c.status == Status.EXITED and c.exit_code is not None else 0


def _proxy(cfg: Config, st: State, container_id: str, signo: int) -> None:
    with contextlib.suppress(VmrtError, OSError):
        lifecycle.send(cfg, st.get(container_id), signo)
