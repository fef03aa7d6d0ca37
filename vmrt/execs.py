"""``vmrt exec``: another process inside a running container, never on the host.

Process mode: ``runc exec`` in the container's namespaces and cgroup (runc runs
it in the foreground, relaying a terminal itself with ``-t``). VM mode: the
guest agent starts it in the same VM, root and cgroup, over one of the VM's exec
ports (:mod:`vmrt.agent.exec_client`). Both take the container's own
environment, user and working directory, overridden by ``-e``, ``-u`` and ``-w``
as Docker does, and return the process's exit status (126/127 when it cannot be
executed, 128+N when killed by signal N).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import bundle
from .config import Config
from .errors import AgentError, ContainerExecError, StateError, UsageError
from .images.store import Store
from .layout import container_dir
from .lifecycle import owner_alive, reconcile
from .rootfs import LayeredRoot
from .signals import FORWARDED
from .state import Container, State, Status


@dataclasses.dataclass
class ExecOptions:
    args: list[str]
    env: list[str] = dataclasses.field(default_factory=list)
    user: str | None = None
    workdir: str | None = None
    interactive: bool = False
    tty: bool = False
    detach: bool = False
    stdio: tuple[int, int, int] = (0, 1, 2)  # where the process's stdin/stdout/stderr go
    # a pipe whose bytes say that the terminal changed size (a caller off the main thread, which
    # gets no SIGWINCH: the API service), and whose end that it hung up (the process gets SIGHUP);
    # the terminal is stdio's, its size read from stdout
    winch: int | None = None
    timeout: float | None = None  # seconds the exec may take (health checks): then TimeoutError


@dataclasses.dataclass
class Resolved:
    env: list[str]
    uid: int
    gid: int
    groups: list[int]
    cwd: str


def resolve(cfg: Config, c: Container, eo: ExecOptions) -> Resolved:
    """The exec's environment, user and directory: the container's, then the flags."""
    try:
        config: dict[str, Any] = json.loads((container_dir(cfg, c.id) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise StateError(f"container {c.name}: its configuration is unreadable: {e}") from e
    proc = config.get("process", {})
    env = bundle.merge_env(list(proc.get("env", [])), bundle.RunOptions(image="", env=eo.env))
    user = proc.get("user", {})
    uid, gid, groups = int(user.get("uid", 0)), int(user.get("gid", 0)), list(user.get("additionalGids", []))
    if eo.user:
        lookup = LayeredRoot(Store(cfg.root).get(c.image_id).layer_dirs())
        u = bundle.resolve_user((lookup.pick("/etc/passwd"), lookup.pick("/etc/group")), eo.user)
        uid, gid, groups = u.uid, u.gid, list(u.groups)
    cwd = eo.workdir or proc.get("cwd", "/")
    if not cwd.startswith("/"):
        raise UsageError(f"the working directory {cwd!r} is not absolute")
    return Resolved(env, uid, gid, groups, cwd)


def run_exec(cfg: Config, ref: str, eo: ExecOptions) -> int:
    if not eo.args:
        raise UsageError("exec needs a command")
    state = State(cfg.db_path)
    try:
        reconcile(cfg, state)
        c = state.get(ref)
        if c.status != Status.RUNNING or not owner_alive(c):
            raise StateError(f"container {c.id[:12]} is not running")
        r = resolve(cfg, c, eo)
    finally:
        state.close()
    if c.isolation == "vm":
        # on use: a process exec never loads the VM exec client (nor vm.qemu behind it)
        from .agent.exec_client import exec_in_vm
        t0 = time.monotonic()
        try:
            return exec_in_vm(Path(c.run_dir), eo.args, env=r.env, cwd=r.cwd, uid=r.uid, gid=r.gid,
                              groups=r.groups, tty=_tty_size(eo.stdio[1]) if eo.tty else None,
                              interactive=eo.interactive, detach=eo.detach, stdin_fd=eo.stdio[0],
                              stdout_fd=eo.stdio[1], stderr_fd=eo.stdio[2],
                              winch=eo.winch, timeout=eo.timeout)
        except AgentError:
            if eo.timeout is not None and time.monotonic() - t0 >= eo.timeout:
                raise TimeoutError(f"the exec took longer than {eo.timeout:g}s") from None
            raise
    return _runc_exec(cfg, c, eo, r)


def _current(cfg: Config, ref: str) -> Container:
    """Container ``ref``'s record as it is now (stale owners reconciled first)."""
    state = State(cfg.db_path)
    try:
        reconcile(cfg, state)
        return state.get(ref)
    finally:
        state.close()


def run_tool(cfg: Config, ref: str, args: list[str], stdio: tuple[int, int, int], *, stdin: bool) -> int:
    """``args`` in container ``ref`` as its root, whether it runs or not (``docker cp``): an exec
    while it runs, else a tool run over its files in its isolation (:mod:`vmrt.offline`)."""
    c = _current(cfg, ref)
    if c.status == Status.RUNNING and owner_alive(c):
        return run_exec(cfg, c.id, ExecOptions(args, user="0:0", interactive=stdin,
                                               stdio=(stdio[0] if stdin else stdio[1], stdio[1], stdio[2])))
    from .offline import run_offline  # on use: copies to running containers never load the drivers
    return run_offline(cfg, c, args, stdio, stdin=stdin)


def walk_upper(cfg: Config, ref: str, stdio: tuple[int, int, int]) -> int:
    """The guest agent's walk of VM container ``ref``'s writable layer (WALK_UPPER, for
    ``docker diff``; vmrt/agent/walk.py) onto stdio's stdout, its errors onto its stderr: an
    exec while the container runs, else a VM booted for it over its disk (:mod:`vmrt.offline`);
    the walk's exit status."""
    from .agent.walk import WALK_ANNOTATION, WALK_ARG, WALK_TIMEOUT  # on use: only a diff of a VM container needs it
    c = _current(cfg, ref)
    if c.isolation != "vm":
        raise UsageError(f"container {c.id[:12]} is no VM container: its writable layer is read on the host")
    if c.status == Status.RUNNING and owner_alive(c):
        from .agent.exec_client import exec_in_vm  # on use, as run_exec's
        return exec_in_vm(Path(c.run_dir), [WALK_ARG], env=[], cwd="/", uid=0, gid=0, groups=[], tty=None,
                          interactive=False, stdin_fd=stdio[0], stdout_fd=stdio[1], stderr_fd=stdio[2],
                          walk=True, timeout=WALK_TIMEOUT)
    from .offline import run_offline  # on use, as run_tool's: execs never load the drivers
    return run_offline(cfg, c, [WALK_ARG], stdio, stdin=False, annotations={WALK_ANNOTATION: "true"})


def _tty_size(fd: int) -> tuple[int, int]:
    try:
        s = os.get_terminal_size(fd)
        return s.lines, s.columns
    except OSError:
        return 24, 80


def _runc_exec(cfg: Config, c: Container, eo: ExecOptions, r: Resolved) -> int:
    from .drivers.process import choose_runtime, exec_error  # on use: a VM exec never loads runc's driver
    runtime = choose_runtime(cfg.runtime)
    with tempfile.NamedTemporaryFile(prefix="exec-", suffix=".log", dir=c.run_dir or None) as log:
        cmd = [runtime, "--root", str(cfg.run_root / "runtime"), "--log", log.name, "--log-format", "json", "exec",
               "--cwd", r.cwd, "--user", f"{r.uid}:{r.gid}", *(f"--additional-gids={g}" for g in r.groups),
               *(f"--env={e}" for e in r.env), *(["--tty"] if eo.tty else []), *(["--detach"] if eo.detach else []),
               c.id, *eo.args]
        if eo.detach:  # as Docker: a detached exec is connected to nothing
            stdio: tuple[Any, Any, Any] = (subprocess.DEVNULL,) * 3
        else:
            stdio = (eo.stdio[0] if eo.interactive else subprocess.DEVNULL, eo.stdio[1], eo.stdio[2])
        # umask 022 as under dockerd: the runtime gives the exec'd process its own umask (vmrt's
        # private 077 is for vmrt's files, not the container's)
        proc = subprocess.Popen(cmd, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], umask=0o022)
        forwarding = threading.current_thread() is threading.main_thread()  # only it may set handlers
        if eo.tty and eo.winch is not None and not eo.detach:  # runc resizes from its own terminal
            threading.Thread(target=_pass_winch, args=(os.dup(eo.winch), proc), daemon=True).start()
        old = {s: signal.signal(s, lambda signo, _f: _forward(proc, signo)) for s in FORWARDED} if forwarding else {}
        try:
            status = proc.wait(eo.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # runc: the process it started runs on (as under Docker)
            proc.wait()
            raise TimeoutError(f"the exec took longer than {eo.timeout:g}s") from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if status == 255 or (eo.detach and status != 0):
            err = _runtime_error(Path(log.name))
            if err is not None and eo.detach:  # runc's stderr went nowhere: say it ourselves
                raise exec_error(err) or ContainerExecError(err, exit_code=126)
            if err is not None:  # runc printed it, one line: keep that, exit as Docker does
                mapped = exec_error(err)
                return mapped.exit_code if mapped is not None else 126
        return status if status >= 0 else 128 - status


def _pass_winch(fd: int, proc: subprocess.Popen[bytes]) -> None:
    """SIGWINCH to runc for each resize the pipe tells of; SIGHUP when its writer closes it (the
    terminal hung up; runc passes both on to the process)."""
    try:
        while os.read(fd, 512):
            _forward(proc, signal.SIGWINCH)
        _forward(proc, signal.SIGHUP)
    except OSError:
        pass
    finally:
        os.close(fd)


def _forward(proc: subprocess.Popen[bytes], signo: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signo)


def _runtime_error(log: Path) -> str | None:
    """The last error runc wrote to its JSON log (the reason an exec could not start)."""
    msg = None
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("level") == "error":
                    msg = str(rec.get("msg", ""))
    return msg
