"""``vmrt-runtime``: vmrt as an OCI runtime, for engines (podman with conmon, containerd's runc
shim, dockerd ``--add-runtime``) that run an OCI runtime binary per container operation.

It speaks runc's command line (the runtime spec's operations, and runc's flags where the spec
is silent, since engines pass them). Each container's isolation is chosen at ``create``:
the bundle's annotation ``io.vmrt.isolation`` (``vm`` or ``process``; engines pass
annotations through), else the global ``--isolation`` flag (an engine's runtime args), else
vmrt's configured default. A process container is runc's, unchanged: this entry point
execs runc with the same arguments (minus ``--isolation``), so it costs one interpreter start
and no more. A VM container is :mod:`vmrt.ocivm`'s, in a directory of its own under the
engine's ``--root`` (``ID/vmrt.json`` marks it, where runc keeps ``ID/state.json``); every
later command for that ID goes there. Containers created under an engine's ``--root`` are the
engine's: ``vmrt ps`` does not show them (``vmrt-runtime --root ROOT list`` does).

Errors are one line on stderr and, when the engine passed ``--log``, one record there in its
``--log-format`` (text or json, as runc writes them), with exit status 1.
"""

from __future__ import annotations

import os
import sys

from .ocibundle import MARK, Failure, Globals, load_spec

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (mypy reads it by name)

if TYPE_CHECKING:  # the entry point imports only os and sys: engines call it 3+ times per container
    from collections.abc import Sequence
    from typing import Any, NoReturn

ANNOTATION = "io.vmrt.isolation"
ISOLATIONS = {"vm": "vm", "hyperv": "vm", "process": "process"}
# runc's global flags: those that take a value, and the booleans
GLOBAL_VALUES = {"--root", "--log", "--log-format", "--criu", "--rootless", "--isolation"}
GLOBAL_BOOLS = {"--debug", "--systemd-cgroup"}
# every flag of runc's commands that takes a value (the container's ID is the first other word)
# the flags of runc's commands that take a value (the container's ID is the first other word);
# per command: `-f` is ps's --format but delete's --force
_UPDATE = ("--resources", "-r", "--blkio-weight", "--cpu-period", "--cpu-quota", "--cpu-rt-period",
           "--cpu-rt-runtime", "--cpu-share", "--cpuset-cpus", "--cpuset-mems", "--kernel-memory",
           "--kernel-memory-tcp", "--memory", "--memory-reservation", "--memory-swap", "--pids-limit",
           "--l3-cache-schema", "--mem-bw-schema")
_CRIU = ("--image-path", "--work-path", "--parent-path", "--page-server", "--manage-cgroups-mode", "--empty-ns",
         "--status-fd", "--lazy-pages", "--bundle", "-b", "--console-socket", "--pid-file")
VALUE_FLAGS: dict[str, frozenset[str]] = {
    "create": frozenset({"--bundle", "-b", "--console-socket", "--pid-file", "--preserve-fds"}),
    "run": frozenset({"--bundle", "-b", "--console-socket", "--pid-file", "--preserve-fds"}),
    "exec": frozenset({"--console-socket", "--cwd", "--env", "-e", "--user", "-u", "--additional-gids", "-g",
                       "--process", "-p", "--pid-file", "--process-label", "--apparmor", "--cap", "-c",
                       "--preserve-fds", "--cgroup"}),
    "ps": frozenset({"--format", "-f"}),
    "list": frozenset({"--format", "-f"}),
    "update": frozenset(_UPDATE),
    "events": frozenset({"--interval"}),
    "checkpoint": frozenset(_CRIU),
    "restore": frozenset(_CRIU),
}
ID_COMMANDS = {"start", "state", "kill", "delete", "exec", "pause", "resume", "ps", "update", "events",
               "checkpoint", "restore"}


def log_error(g: Globals, message: str) -> None:
    """``message`` on stderr and, with ``--log``, as one record in the log's format (as runc's)."""
    print(f"vmrt-runtime: {message}", file=sys.stderr, flush=True)
    if not g.log:
        return
    import json  # on use (as time): only a failure logs
    import time
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
    if g.log_format == "json":
        line = json.dumps({"level": "error", "msg": message, "time": stamp})
    else:
        line = f'time="{stamp}" level=error msg={json.dumps(message)}'
    try:
        fd = os.open(g.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def parse_globals(argv: Sequence[str]) -> tuple[Globals, list[str]]:
    g = Globals()
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in GLOBAL_VALUES:
            if not eq:
                if i + 1 >= len(argv):
                    raise Failure(f"flag needs an argument: {name}")
                i += 1
                value = argv[i]
            if name == "--isolation":
                if value not in ISOLATIONS:
                    raise Failure(f"invalid --isolation {value!r}: use vm or process")
                g.isolation = ISOLATIONS[value]
            else:
                g.argv += [name, value]
                if name == "--root":
                    g.root = value
                elif name == "--log":
                    g.log = value
                elif name == "--log-format":
                    if value not in ("text", "json"):
                        raise Failure(f"invalid --log-format {value!r}: use text or json")
                    g.log_format = value
        elif name in GLOBAL_BOOLS:
            if eq and value not in ("true", "false"):
                raise Failure(f"invalid value {value!r} for {name}")
            on = value != "false"
            g.argv.append(arg)
            if name == "--debug":
                g.debug = on
            else:
                g.systemd_cgroup = on
        elif name in ("--version", "-v", "--help", "-h"):
            break
        else:
            raise Failure(f"flag provided but not defined: {name}")
        i += 1
    if g.systemd_cgroup and not os.path.isdir("/run/systemd/system"):
        raise Failure("--systemd-cgroup needs a host that runs systemd, and this one does not: "
                      "use the cgroupfs driver (the engine's cgroup_manager = cgroupfs)")
    return g, list(argv[i:])


def container_id(cmd: str, args: Sequence[str]) -> str | None:
    """The container's ID among ``cmd``'s arguments: the first word that is no flag's value."""
    values = VALUE_FLAGS.get(cmd, frozenset())
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return args[i + 1] if i + 1 < len(args) else None
        if a.startswith("-") and a != "-":
            if "=" not in a and a in values:
                i += 1
        else:
            return a
        i += 1
    return None


def option(cmd: str, args: Sequence[str], *names: str) -> str | None:
    """The value of ``cmd``'s flag (``--bundle B``, ``--bundle=B``, ``-b B``), or None."""
    values = VALUE_FLAGS.get(cmd, frozenset())
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        if name in names:
            if eq:
                return value
            return args[i + 1] if i + 1 < len(args) else None
        if a == "--" or not a.startswith("-") and (i == 0 or args[i - 1] not in values):
            break
    return None


def _which(name: str) -> str | None:
    """shutil.which, without importing shutil (and what it imports) on every call."""
    for d in os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def full_python() -> None:
    """The interpreter's site-packages, for what needs more than the standard library (the VM
    side, vmrt's configuration): the installed launcher starts Python without them (-S), lean."""
    if "site" not in sys.modules:
        import site  # on use: see above
        site.main()


def runc_binary() -> str:
    found = os.environ.get("VMRT_OCI_RUNC") or _which("runc") or _which("crun")
    if not found:
        raise Failure("no runc or crun on PATH: process containers need one")
    return found


def exec_runc(g: Globals, args: list[str]) -> NoReturn:
    """This process becomes runc, with the same arguments (bar ``--isolation``)."""
    binary = runc_binary()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(binary, [binary, *g.argv, *args])
    except OSError as e:
        raise Failure(f"cannot run {binary}: {e.strerror}") from None


def isolation_of(g: Globals, spec: dict[str, Any]) -> str:
    """The isolation a new container gets: its annotation, else ``--isolation``, else vmrt's default."""
    notes = spec.get("annotations") or {}
    asked = notes.get(ANNOTATION) if isinstance(notes, dict) else None
    if asked is not None:
        if asked not in ISOLATIONS:
            raise Failure(f"annotation {ANNOTATION}={asked!r}: use vm or process")
        return ISOLATIONS[asked]
    if g.isolation is not None:
        return g.isolation
    full_python()
    from . import config  # on use: only a create without either reads vmrt's configuration
    return config.load().isolation


def is_vm(g: Globals, cid: str | None) -> bool:
    return bool(cid) and "/" not in str(cid) and os.path.isfile(os.path.join(g.root, str(cid), MARK))


def run(g: Globals, rest: list[str]) -> int:
    if not rest or rest[0] in ("--version", "-v"):
        if rest:
            print("vmrt-runtime (vmrt's OCI runtime): process containers by runc, VM containers by vmrt")
        exec_runc(g, rest or ["--help"])
    cmd, args = rest[0], rest[1:]
    if cmd in ("create", "run"):
        bundle = option(cmd, args, "--bundle", "-b") or os.getcwd()
        if isolation_of(g, load_spec(bundle)) == "process":
            exec_runc(g, rest)
        full_python()
        from . import ocivm  # on use: process containers never load the VM side
        return ocivm.command(g, cmd, args, bundle)
    if cmd in ID_COMMANDS and is_vm(g, container_id(cmd, args)):
        full_python()
        from . import ocivm  # on use (as below): process containers never load the VM side
        return ocivm.command(g, cmd, args, None)
    if cmd == "list" and os.path.isdir(g.root) and any(
            os.path.isfile(os.path.join(g.root, n, MARK)) for n in os.listdir(g.root)):
        full_python()
        from . import ocivm  # on use: only a root with VM containers lists them
        return ocivm.list_all(g, args, runc_binary())
    if cmd == "features":
        full_python()
        from . import ocivm  # on use: features adds the isolation annotation to runc's
        return ocivm.features(runc_binary())
    exec_runc(g, rest)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    g = Globals()
    try:
        g, rest = parse_globals(argv)
        return run(g, rest)
    except Failure as e:
        log_error(g, str(e))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
