"""``vmrt-runtime``'s VM containers: an engine's OCI bundle run in a micro-VM (vmrt/ociruntime.py
chooses the isolation and hands VM containers here).

**The holder.** ``create`` starts a small resident process, the *holder*
(``python -m vmrt.ocivm holder ROOT ID``): it is the ``pid`` of ``state`` and of
``--pid-file``, lives exactly as long as the container and exits with its status, so the
engine's subreaper (conmon, containerd's shim) waits on it as on runc's init. It runs vmrt's
VM driver attached to the stdio ``create`` was given (or, with ``--console-socket``, a pty
whose master it sends there), over the bundle's ``root.path`` as the image (read-only in
the VM; the container's writes go to its own disk, vm/disk.py, discarded at ``delete``). It
boots the VM during ``create`` and waits, before the process would start, on its control
socket (``ctl.sock`` in the container's directory) for ``start``; ``kill`` signals it (KILL as
vmrt's FORCE_KILL: a SIGKILL would end the holder, not the VM), so a created container
killed ends too. Each ``exec`` gets a holder of its own (``exec-holder``), the exec's pid.

**Records.** ``ROOT/ID/vmrt.json`` (root's, 0600): the bundle, the creation time, the
annotations, the status the holder reached and, once it ended, the exit status; the
holder's PID with its start time (a reused PID is never taken for it). ``state`` answers
from it: a holder that is gone means ``stopped``. The VM's run dir is vmrt's
``<run_root>/containers/<vmid>`` (``vmid``: a hash of root and ID, so that socket paths stay
short whatever the engine's root) and its writable layer ``<root>/rw/<vmid>``; neither is
in vmrt's container list.

**Hooks** run on the host where the spec puts them in time, with the state on stdin, as
Kata does: ``prestart``, ``createRuntime`` and ``createContainer`` once the VM is ready in
``create``; ``startContainer`` in ``start`` before the process starts; ``poststart`` after it
started; ``poststop`` in ``delete``. A failing hook before ``start`` fails the operation and
takes the container down; after, it is logged.

**Differences from runc** (docs/ISOLATION.md): the container's file writes stay in its VM's
disk (an engine's ``cp``/``diff`` of its rootfs does not see them); ``pause`` stops the VM's
processes on the host (SIGSTOP to QEMU and virtiofsd: the vCPUs stop); ``update`` changes the
host-side CPU and PIDs limits of the VM (its memory is fixed at boot); ``ps`` lists the holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

from . import bundle as vbundle
from . import cgroups, fsmode
from .config import Config
from .config import load as load_config
from .errors import VmrtError
from .layout import rw_dir
from .lifecycle import parse_signal, remove_run_dir
from .ocibundle import MARK, SPEC_MAX, Failure, Globals, load_spec
from .proc import connect_unix, kill_if_ours, start_ticks
from .signals import FORCE_KILL, FORWARDED
from .state import Container, Status
from .timings import Timings

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
HOST_MOUNTS = {"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"}  # the agent makes the guest's own
GUEST_DIRS = {"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup"}
TMPFS_FLAGS = {"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec"}
TMPFS_DATA = {"mode", "size", "uid", "gid", "nr_inodes", "nr_blocks", "huge", "mpol"}
READY_TIMEOUT = 300.0  # a create's VM boot (TCG, a cold boot with its snapshot built meanwhile)
HOOK_TIMEOUT = 60.0


# --- records --------------------------------------------------------------------------------
def vm_id(root: str, cid: str) -> str:
    return hashlib.sha256(f"{os.path.realpath(root)}\0{cid}".encode()).hexdigest()


def _dir(g: Globals, cid: str) -> Path:
    return Path(g.root) / cid


@contextlib.contextmanager
def _locked(d: Path):  # type: ignore[no-untyped-def]
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_record(d: Path) -> dict[str, Any]:
    try:
        rec = json.loads((d / MARK).read_text())
    except FileNotFoundError:
        raise Failure(f"container does not exist: {d.name}") from None
    except (OSError, ValueError) as e:
        raise Failure(f"container {d.name}: its record is unreadable: {e}") from None
    return dict(rec)


def update_record(d: Path, **fields: Any) -> dict[str, Any]:
    with _locked(d):
        rec = read_record(d)
        rec.update(fields)
        fsmode.write_private(d / (MARK + ".new"), json.dumps(rec))
        os.replace(d / (MARK + ".new"), d / MARK)
    return rec


def holder_alive(rec: dict[str, Any]) -> bool:
    pid = int(rec.get("pid") or 0)
    return pid > 0 and start_ticks(pid) == int(rec.get("ticks") or -1)


def status_of(rec: dict[str, Any]) -> str:
    if rec.get("status") == "creating" and not int(rec.get("pid") or 0):
        return "creating"  # create has not started the holder yet
    if not holder_alive(rec):
        return "stopped"
    return str(rec.get("status") or "creating")


def state_doc(rec: dict[str, Any]) -> dict[str, Any]:
    status = status_of(rec)
    return {"ociVersion": rec.get("ociVersion", "1.0.2"), "id": rec["id"],
            "pid": int(rec.get("pid") or 0) if status != "stopped" else 0, "status": status,
            "bundle": rec["bundle"], "rootfs": rec.get("rootfs", ""), "created": rec["created"], "owner": "",
            "annotations": rec.get("annotations") or {}}


# --- the bundle ----------------------------------------------------------------------------
def vm_config(spec: dict[str, Any], bundle: str) -> dict[str, Any]:
    """The engine's spec as vmrt's VM driver takes it: vmrt's default guest mounts first, then
    the engine's binds (shared into the VM) and tmpfs mounts; the kernel file systems the
    engine mounts for runc (proc, sysfs, devpts, mqueue, cgroup) are the guest's own."""
    mounts: list[dict[str, Any]] = list(vbundle.DEFAULT_MOUNTS)
    for m in spec.get("mounts") or []:
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise Failure("a mount without a destination")
        dest, kind, opts = m["destination"], m.get("type") or "", list(m.get("options") or [])
        if kind in HOST_MOUNTS or dest in GUEST_DIRS:
            continue
        if kind == "bind" or "bind" in opts or "rbind" in opts:
            src = Path(m.get("source") or "")
            if not src.is_absolute():
                src = Path(bundle) / src
            if not src.exists():
                raise Failure(f"mount source {src} does not exist")
            mounts.append({"destination": dest, "type": "bind", "source": str(src),
                           "options": ["rbind", *(["ro"] if "ro" in opts else [])]})
        elif kind == "tmpfs":  # the flags the agent sets and tmpfs's own data; not atime or propagation
            mounts.append({"destination": dest, "type": "tmpfs", "source": "tmpfs",
                           "options": [o for o in opts if o in TMPFS_FLAGS or o.split("=", 1)[0] in TMPFS_DATA]})
        else:
            raise Failure(f"mount {dest}: type {kind!r} cannot be given to a VM (bind and tmpfs can)")
    notes = {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()
             if not str(k).startswith("org.vmrt.")}
    notes["org.vmrt.stdin"] = "true"  # the engine's stdin (/dev/null, or a pipe): EOF is the process's
    proc = dict(spec["process"])
    linux = dict(spec.get("linux") or {})
    return {"ociVersion": spec["ociVersion"], "process": proc,
            "root": {"path": "rootfs", "readonly": bool((spec.get("root") or {}).get("readonly"))},
            "hostname": spec.get("hostname") or "", "mounts": mounts, "annotations": notes,
            "linux": {"resources": vm_resources(linux.get("resources") or {}), "seccomp": linux.get("seccomp"),
                      "maskedPaths": linux.get("maskedPaths") or [], "readonlyPaths": linux.get("readonlyPaths") or []}}


def vm_resources(res: dict[str, Any]) -> dict[str, Any]:
    """The limits a VM takes from ``linux.resources``: memory (the guest's RAM and its cgroup),
    a CPU quota (its vCPUs and host quota) and a PIDs limit; shares, cpusets, block I/O and the
    rest are the host's business (left to the engine's cgroup of the holder)."""
    out: dict[str, Any] = {}
    try:
        mem = int((res.get("memory") or {}).get("limit") or 0)
        cpu = res.get("cpu") or {}
        quota, period = int(cpu.get("quota") or 0), int(cpu.get("period") or 0)
        pids = int((res.get("pids") or {}).get("limit") or 0)
    except (TypeError, ValueError, AttributeError) as e:
        raise Failure(f"linux.resources: {e}") from None
    if mem > 0:
        out["memory"] = {"limit": mem}
    if quota > 0 and period > 0:
        out["cpu"] = {"quota": quota, "period": period}
    if pids > 0:
        out["pids"] = {"limit": pids}
    return out


def netns_path(spec: dict[str, Any]) -> str | None:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return None


# --- hooks ---------------------------------------------------------------------------------
def run_hooks(spec: dict[str, Any], which: str, state: dict[str, Any], *, strict: bool) -> None:
    """The spec's ``which`` hooks in order, each with the state on stdin (strict: the first
    that fails or times out raises; else it is logged and the next runs)."""
    for h in ((spec.get("hooks") or {}).get(which) or []):
        path = str(h.get("path", ""))
        args = [str(a) for a in (h.get("args") or [path])]
        env = [str(e) for e in (h.get("env") or [])]
        timeout = float(h.get("timeout") or HOOK_TIMEOUT)
        try:
            r = subprocess.run(args, executable=path, input=json.dumps(state).encode(), capture_output=True,
                               env=dict(e.split("=", 1) for e in env if "=" in e), timeout=timeout, check=False)
            failed = f"exit status {r.returncode}: {r.stderr.decode(errors='replace').strip()[:300]}" \
                if r.returncode else None
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout:g}s"
        except OSError as e:
            failed = e.strerror or str(e)
        if failed is not None:
            message = f"{which} hook {path}: {failed}"
            if strict:
                raise Failure(message)
            print(f"vmrt-runtime: {message}", file=sys.stderr)


# --- commands ------------------------------------------------------------------------------
def command(g: Globals, cmd: str, args: list[str], bundle: str | None) -> int:
    if cmd in ("create", "run"):
        assert bundle is not None
        return create(g, args, os.path.abspath(bundle), run=cmd == "run")
    handlers = {"start": start, "state": state, "kill": kill, "delete": delete, "exec": exec_,
                "pause": pause, "resume": resume, "ps": ps, "update": update, "events": events}
    if cmd in handlers:
        return handlers[cmd](g, args)
    raise Failure(f"{cmd} is not supported for a VM container")


def _positional(args: list[str], bools: set[str], values: set[str]) -> tuple[dict[str, str | bool], list[str]]:
    """A command's own flags (``--x v``, ``--x=v``, booleans) and its other words, in order."""
    flags: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if rest or not a.startswith("-") or a == "-":
            rest.append(a)
        elif a == "--":
            rest += args[i + 1:]
            break
        else:
            name, eq, value = a.partition("=")
            if name in values:
                if not eq:
                    if i + 1 >= len(args):
                        raise Failure(f"flag needs an argument: {name}")
                    i += 1
                    value = args[i]
                if name in flags and name in ("--env", "-e", "--additional-gids", "-g", "--cap", "-c"):
                    flags[name] = f"{flags[name]}\0{value}"
                else:
                    flags[name] = value
            elif name in bools:
                flags[name] = value != "false"
            else:
                raise Failure(f"flag provided but not defined: {name}")
        i += 1
    return flags, rest


def _one_id(g: Globals, rest: list[str], what: str) -> tuple[str, Path]:
    if not rest:
        raise Failure(f"{what} needs a container ID")
    cid = rest[0]
    if not ID_RE.match(cid):
        raise Failure(f"invalid container ID {cid!r}")
    return cid, _dir(g, cid)


def _write_pid_file(path: str, pid: int) -> None:
    """As runc: the PID, no newline, written whole (a temporary beside it, renamed)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.vmrt-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)
    os.replace(tmp, target)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def create(g: Globals, args: list[str], bundle: str, *, run: bool) -> int:
    flags, rest = _positional(args, {"--no-pivot", "--no-new-keyring", "--detach", "-d", "--keep",
                                     "--no-subreaper"},
                              {"--bundle", "-b", "--console-socket", "--pid-file", "--preserve-fds"})
    cid, d = _one_id(g, rest, "create")
    spec = load_spec(bundle)
    vm_config(spec, bundle)  # what cannot go to a VM fails here, before anything is made
    console = flags.get("--console-socket")
    if bool(spec["process"].get("terminal")) != bool(console) and not run:
        raise Failure("process.terminal needs --console-socket (and --console-socket needs process.terminal)"
                      if not console else "--console-socket given but process.terminal is false")
    if int(str(flags.get("--preserve-fds") or 0)):
        raise Failure("--preserve-fds is not supported for a VM container")
    Path(g.root).mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        raise Failure(f"container with id exists: {cid}") from None
    rec = {"id": cid, "vmid": vm_id(g.root, cid), "bundle": bundle, "ociVersion": spec["ociVersion"],
           "rootfs": str((Path(bundle) / spec["root"]["path"]).resolve()), "created": _now(),
           "annotations": spec.get("annotations") or {}, "status": "creating", "pid": 0, "ticks": 0,
           "netns": netns_path(spec)}
    fsmode.write_private(d / MARK, json.dumps(rec))
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        env = dict(os.environ)
        argv = [sys.executable, "-m", "vmrt.ocivm", "holder", g.root, cid, str(w)]
        if console:
            argv.append(str(console))
        interactive = run and sys.stdin.isatty() and bool(spec["process"].get("terminal"))
        if interactive:
            argv.append("--here")
        holder = subprocess.Popen(argv, pass_fds=(w,), env=env, start_new_session=not interactive, close_fds=True)
    except BaseException:
        os.close(r)
        os.close(w)
        _remove(g, cid, d)
        raise
    os.close(w)
    with open(r, "rb") as f:
        ready, _, _ = select.select([f], [], [], READY_TIMEOUT)
        reply = f.readline(65536).decode(errors="replace").strip() if ready else ""
    if reply != "ok":
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.pid, FORCE_KILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            holder.wait(30)
        said = ""
        with contextlib.suppress(OSError):
            said = " | ".join((d / "holder.log").read_text(errors="replace").strip().splitlines()[-3:])[:500]
        _remove(g, cid, d)
        raise Failure(reply.removeprefix("error ") if reply.startswith("error ") else
                      f"the VM did not get ready within {READY_TIMEOUT:g}s" if not ready else
                      "the container's holder ended before the VM was ready" + (f": {said}" if said else ""))
    rec = read_record(d)
    try:
        st = state_doc(rec) | {"status": "creating"}  # as runc gives them
        run_hooks(spec, "prestart", st, strict=True)
        run_hooks(spec, "createRuntime", st, strict=True)
        run_hooks(spec, "createContainer", st, strict=True)
    except Failure:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.pid, FORCE_KILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            holder.wait(30)
        _remove(g, cid, d)
        raise
    if flags.get("--pid-file"):
        _write_pid_file(str(flags["--pid-file"]), holder.pid)
    if not run:
        return 0
    try:
        start(g, [cid])
    except Failure:
        with contextlib.suppress(Failure):
            delete(g, ["--force", cid])
        raise
    if flags.get("--detach") or flags.get("-d"):
        return 0
    status = holder.wait()
    delete(g, [cid])
    return status


def _ctl(d: Path, message: str, timeout: float) -> str:
    """One request to the holder's control socket: its one-line answer."""
    try:
        sock = connect_unix(d, "ctl.sock", timeout=timeout)
    except OSError as e:
        raise Failure(f"the container's holder does not answer: {e.strerror or e}") from None
    with sock:
        sock.settimeout(timeout)
        sock.sendall(message.encode() + b"\n")
        answer = b""
        with contextlib.suppress(TimeoutError, OSError):
            while not answer.endswith(b"\n") and len(answer) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    return answer.decode(errors="replace").strip()


def start(g: Globals, args: list[str]) -> int:
    _, rest = _positional(args, set(), set())
    cid, d = _one_id(g, rest, "start")
    rec = read_record(d)
    status = status_of(rec)
    if status != "created":
        raise Failure(f"cannot start a container that is {status}" if status != "stopped"
                      else "cannot start a container that has stopped")
    spec = load_spec(rec["bundle"])
    run_hooks(spec, "startContainer", state_doc(rec), strict=True)
    answer = _ctl(d, "start", READY_TIMEOUT)
    if answer != "ok":
        raise Failure(answer.removeprefix("error ") or "the container's process did not start")
    run_hooks(spec, "poststart", state_doc(read_record(d)), strict=False)
    return 0


def state(g: Globals, args: list[str]) -> int:
    _, rest = _positional(args, set(), set())
    _, d = _one_id(g, rest, "state")
    print(json.dumps(state_doc(read_record(d)), indent=2))
    return 0


def _to_holder(rec: dict[str, Any], signo: int) -> bool:
    """``signo`` to the container's holder while it is the recorded one (never PID 0, a reused
    PID, or a process of someone else's): whether it was sent."""
    pid, ticks = int(rec.get("pid") or 0), int(rec.get("ticks") or 0)
    return pid > 0 and ticks > 0 and kill_if_ours(pid, signo, ticks=ticks)


def _signal(rec: dict[str, Any], signo: int) -> None:
    if signo == signal.SIGKILL:
        signo = FORCE_KILL
    elif signo not in FORWARDED and signo != FORCE_KILL:
        name = signal.Signals(signo).name if signo in signal.Signals._value2member_map_ else str(signo)
        raise Failure(f"signal {name} cannot be sent to a VM container (KILL, "
                      f"{', '.join(signal.Signals(s).name for s in FORWARDED)} can)")
    if not _to_holder(rec, signo):
        raise Failure("container not running")


def kill(g: Globals, args: list[str]) -> int:
    flags, rest = _positional(args, {"--all", "-a"}, set())
    cid, d = _one_id(g, rest, "kill")
    rec = read_record(d)
    if status_of(rec) == "stopped":
        raise Failure("container not running")
    try:
        signo = parse_signal(rest[1]) if len(rest) > 1 else signal.SIGTERM
    except VmrtError as e:
        raise Failure(str(e)) from None
    if rec.get("status") == "paused":
        _stop_vm(rec, signal.SIGCONT)  # a paused VM takes its signal once it runs again
        update_record(d, status="running")
    _signal(rec, signo)
    return 0


def _wait_gone(rec: dict[str, Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while holder_alive(rec):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def delete(g: Globals, args: list[str]) -> int:
    flags, rest = _positional(args, {"--force", "-f"}, set())
    cid, d = _one_id(g, rest, "delete")
    if not (d / MARK).exists():
        raise Failure(f"container does not exist: {cid}")
    rec = read_record(d)
    status = status_of(rec)
    if status in ("running", "paused") and not (flags.get("--force") or flags.get("-f")):
        raise Failure(f"cannot delete container {cid} that is not stopped: {status}")
    if status != "stopped":  # forced, or created (as runc: a created container is killed)
        if status == "paused":
            _stop_vm(rec, signal.SIGCONT)
        if _to_holder(rec, FORCE_KILL) and not _wait_gone(rec, 60.0):
            _to_holder(rec, signal.SIGKILL)
            _wait_gone(rec, 10.0)
    spec: dict[str, Any] | None = None
    with contextlib.suppress(Failure):
        spec = load_spec(rec["bundle"])
    _remove(g, cid, d, rec)
    if spec is not None:
        doc = state_doc(rec) | {"status": "stopped", "pid": 0}
        run_hooks(spec, "poststop", doc, strict=False)
    return 0


def _remove(g: Globals, cid: str, d: Path, rec: dict[str, Any] | None = None) -> None:
    """Everything of the container's: what its holder left (a killed holder's VM), its run dir,
    writable layer and record."""
    cfg = load_config()
    vmid = vm_id(g.root, cid)
    cgroups.remove_tree(f"{cgroups.PARENT}/{vmid}-vmm")  # kills what is left in it (QEMU, virtiofsd)
    with contextlib.suppress(VmrtError):
        remove_run_dir(cfg.run_root / "containers" / vmid)
    shutil.rmtree(rw_dir(cfg, vmid), ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)


def _stop_vm(rec: dict[str, Any], signo: int) -> None:
    """``signo`` (SIGSTOP, SIGCONT) to the VM's QEMU and virtiofsd, while they are the recorded ones."""
    ticks = rec.get("pid_ticks") or {}
    for name, pid in (rec.get("pids") or {}).items():
        if int(pid) > 0 and ticks.get(name):
            kill_if_ours(int(pid), signo, ticks=int(ticks[name]))


def _pause(g: Globals, args: list[str], *, stop: bool) -> int:
    """``pause`` (stop: the VM's processes stopped) or ``resume`` (continued)."""
    what, before, after = ("pause", "running", "paused") if stop else ("resume", "paused", "running")
    _, rest = _positional(args, set(), set())
    cid, d = _one_id(g, rest, what)
    rec = read_record(d)
    if status_of(rec) != before:
        raise Failure(f"container {cid} is not {before}")
    _stop_vm(rec, signal.SIGSTOP if stop else signal.SIGCONT)
    update_record(d, status=after)
    return 0


def pause(g: Globals, args: list[str]) -> int:
    return _pause(g, args, stop=True)


def resume(g: Globals, args: list[str]) -> int:
    return _pause(g, args, stop=False)


def ps(g: Globals, args: list[str]) -> int:
    flags, rest = _positional(args, set(), {"--format", "-f"})
    cid, d = _one_id(g, rest, "ps")
    rec = read_record(d)
    pids = [int(rec["pid"])] if status_of(rec) != "stopped" else []
    if (flags.get("--format") or flags.get("-f") or "table") == "json":
        print(json.dumps(pids))
        return 0
    if pids:
        return subprocess.run(["ps", *(rest[1:] or ["-f"]), "-p", ",".join(map(str, pids))], check=False).returncode
    print("UID PID PPID C STIME TTY TIME CMD")
    return 0


def update(g: Globals, args: list[str]) -> int:
    flags, rest = _positional(args, set(), {"--resources", "-r", "--cpu-period", "--cpu-quota", "--pids-limit",
                                            "--memory", "--memory-swap", "--memory-reservation", "--cpu-share",
                                            "--cpuset-cpus", "--cpuset-mems", "--blkio-weight", "--kernel-memory",
                                            "--kernel-memory-tcp", "--cpu-rt-period", "--cpu-rt-runtime",
                                            "--l3-cache-schema", "--mem-bw-schema"})
    cid, d = _one_id(g, rest, "update")
    rec = read_record(d)
    if status_of(rec) == "stopped":
        raise Failure(f"container {cid} is not running")
    res: dict[str, Any] = {}
    src = flags.get("--resources") or flags.get("-r")
    if src:
        try:
            text = sys.stdin.read(SPEC_MAX) if src == "-" else Path(str(src)).read_text()
            res = dict(json.loads(text))
        except (OSError, ValueError) as e:
            raise Failure(f"--resources: {e}") from None
    cpu = dict(res.get("cpu") or {})
    for flag, key in (("--cpu-period", "period"), ("--cpu-quota", "quota")):
        if flags.get(flag):
            cpu[key] = int(str(flags[flag]))
    pids = int(str(flags["--pids-limit"])) if flags.get("--pids-limit") else (res.get("pids") or {}).get("limit")
    if any(flags.get(f) for f in ("--memory", "--memory-swap", "--memory-reservation", "--kernel-memory")) or \
            (res.get("memory") or {}).get("limit"):
        raise Failure("a VM container's memory is fixed when its VM boots: recreate it to change it")
    group = cgroups.dirs(f"{cgroups.PARENT}/{rec['vmid']}-vmm")
    for gdir in group:
        if cpu.get("quota") and (gdir / "cpu.max").exists():
            (gdir / "cpu.max").write_text(f"{cpu['quota']} {cpu.get('period') or 100000}")
        elif cpu.get("quota") and (gdir / "cpu.cfs_quota_us").exists():
            (gdir / "cpu.cfs_period_us").write_text(str(cpu.get("period") or 100000))
            (gdir / "cpu.cfs_quota_us").write_text(str(cpu["quota"]))
        if pids and (gdir / "pids.max").exists():
            (gdir / "pids.max").write_text(str(max(int(pids), 64)))  # QEMU's and virtiofsd's own threads
    return 0


def _stats(rec: dict[str, Any]) -> dict[str, Any]:
    """runc's ``events --stats`` record, from the VM's host cgroup (what the VM costs the host)."""
    cpu_ns = mem = pids = 0
    for gdir in cgroups.dirs(f"{cgroups.PARENT}/{rec['vmid']}-vmm"):
        with contextlib.suppress(OSError, ValueError):
            if (gdir / "cpu.stat").exists() and (gdir / "cgroup.controllers").exists():
                for line in (gdir / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        cpu_ns = int(line.split()[1]) * 1000
            if (gdir / "cpuacct.usage").exists():
                cpu_ns = int((gdir / "cpuacct.usage").read_text())
            for name in ("memory.current", "memory.usage_in_bytes"):
                if (gdir / name).exists():
                    mem = int((gdir / name).read_text())
            if (gdir / "pids.current").exists():
                pids = int((gdir / "pids.current").read_text())
    return {"type": "stats", "id": rec["id"],
            "data": {"cpu": {"usage": {"total": cpu_ns}}, "memory": {"usage": {"usage": mem}},
                     "pids": {"current": pids}}}


def events(g: Globals, args: list[str]) -> int:
    flags, rest = _positional(args, {"--stats"}, {"--interval"})
    cid, d = _one_id(g, rest, "events")
    rec = read_record(d)
    if status_of(rec) == "stopped":
        raise Failure(f"container {cid} is not running")
    if flags.get("--stats"):
        print(json.dumps(_stats(rec)), flush=True)
        return 0
    interval = float(str(flags.get("--interval") or "5s").removesuffix("s") or 5)
    while holder_alive(read_record(d)):
        print(json.dumps(_stats(read_record(d))), flush=True)
        time.sleep(interval)
    return 0


def exec_(g: Globals, args: list[str]) -> int:
    flags, rest = _positional(args, {"--tty", "-t", "--detach", "-d", "--no-new-privs", "--ignore-paused"},
                              {"--console-socket", "--cwd", "--env", "-e", "--user", "-u", "--additional-gids",
                               "-g", "--process", "-p", "--pid-file", "--process-label", "--apparmor", "--cap",
                               "-c", "--preserve-fds", "--cgroup"})
    cid, d = _one_id(g, rest, "exec")
    rec = read_record(d)
    if status_of(rec) not in ("running", "created"):
        raise Failure(f"cannot exec in a {status_of(rec)} container")
    src = flags.get("--process") or flags.get("-p")
    if src:
        try:
            proc = dict(json.loads(Path(str(src)).read_text()))
        except (OSError, ValueError) as e:
            raise Failure(f"--process {src}: {e}") from None
    else:
        if len(rest) < 2:
            raise Failure("exec needs a command (or --process)")
        spec = load_spec(rec["bundle"])
        base = spec["process"]
        user = dict(base.get("user") or {})
        if flags.get("--user") or flags.get("-u"):
            uid, _, gid = str(flags.get("--user") or flags.get("-u")).partition(":")
            user = {"uid": int(uid), "gid": int(gid or 0)}
        if flags.get("--additional-gids") or flags.get("-g"):
            user["additionalGids"] = [int(x) for x in str(flags.get("--additional-gids") or flags["-g"]).split("\0")]
        env = list(base.get("env") or [])
        env += [v for v in str(flags.get("--env") or flags.get("-e") or "").split("\0") if v]
        proc = {"args": rest[1:], "env": env, "cwd": str(flags.get("--cwd") or base.get("cwd") or "/"),
                "user": user, "terminal": bool(flags.get("--tty") or flags.get("-t"))}
    if not isinstance(proc.get("args"), list) or not proc["args"]:
        raise Failure("the exec's process has no args")
    detach = bool(flags.get("--detach") or flags.get("-d"))
    console = flags.get("--console-socket")
    if proc.get("terminal") and not console and not sys.stdin.isatty():
        raise Failure("a terminal exec needs --console-socket")
    fsmode.write_private(d / f"exec-{os.getpid()}.json", json.dumps(proc))
    r, w = os.pipe2(os.O_CLOEXEC)
    argv = [sys.executable, "-m", "vmrt.ocivm", "exec-holder", g.root, cid, str(w), str(d / f"exec-{os.getpid()}.json")]
    if console:
        argv.append(str(console))
    holder = subprocess.Popen(argv, pass_fds=(w,), start_new_session=detach, close_fds=True)
    os.close(w)
    with open(r, "rb") as f:
        reply = f.readline(65536).decode(errors="replace").strip()
    if reply != "ok":
        holder.wait()
        raise Failure(reply.removeprefix("error ") or "the exec did not start")
    if flags.get("--pid-file"):
        _write_pid_file(str(flags["--pid-file"]), holder.pid)
    if detach:
        return 0
    return holder.wait()


def list_all(g: Globals, args: list[str], runc: str) -> int:
    flags, _ = _positional(args, {"--quiet", "-q"}, {"--format", "-f"})
    r = subprocess.run([runc, *g.argv, "list", "--format", "json"], capture_output=True, text=True, check=False)
    entries: list[dict[str, Any]] = []
    with contextlib.suppress(ValueError):
        entries = list(json.loads(r.stdout or "null") or [])
    for name in sorted(os.listdir(g.root)):
        with contextlib.suppress(Failure, KeyError):
            if (Path(g.root) / name / MARK).is_file():
                doc = state_doc(read_record(Path(g.root) / name))
                entries.append({"ociVersion": doc["ociVersion"], "id": doc["id"], "pid": doc["pid"],
                                "status": doc["status"], "bundle": doc["bundle"], "rootfs": doc["rootfs"],
                                "created": doc["created"], "owner": "root", "annotations": doc["annotations"]})
    if flags.get("--quiet") or flags.get("-q"):
        for e in entries:
            print(e["id"])
    elif (flags.get("--format") or flags.get("-f") or "table") == "json":
        print(json.dumps(entries))
    else:
        print(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} {'CREATED':<31} OWNER")
        for e in entries:
            print(f"{e['id']:<20} {e['pid']:<8} {e['status']:<10} {e['bundle']:<40} {e['created']:<31} "
                  f"{e.get('owner', 'root')}")
    return 0


def features(runc: str) -> int:
    r = subprocess.run([runc, "features"], capture_output=True, text=True, check=False)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = {"ociVersionMin": "1.0.0", "ociVersionMax": "1.0.2"}
    doc.setdefault("annotations", {})
    doc["annotations"]["io.vmrt.isolation"] = "vm|process (the container's isolation; else --isolation, "\
        "else vmrt's configured default)"
    print(json.dumps(doc, indent=4))
    return 0


# --- the holders ---------------------------------------------------------------------------
class _Record:
    """The driver's Recorder: the VM's PIDs into the container's record."""

    def __init__(self, d: Path) -> None:
        self.d = d

    def set_fields(self, c: Container, **fields: Any) -> None:
        keep = {k: v for k, v in fields.items() if k in ("pids", "oom_killed")}
        if "pids" in keep:  # with their start times: a reused PID is never signalled
            keep["pid_ticks"] = {k: start_ticks(int(p)) for k, p in keep["pids"].items()}
        if keep:
            update_record(self.d, **keep)


def _send_console(path: str) -> int:
    """A pty: its master sent over the engine's console socket; the slave (this process's
    controlling terminal, so that the engine's resizes reach it as SIGWINCH) returned."""
    master, slave = os.openpty()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        socket.send_fds(sock, [b"/dev/ptmx"], [master])
    finally:
        sock.close()
        os.close(master)
    with contextlib.suppress(OSError):
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    return slave


def _engine_stdio(console: str | None) -> tuple[int, int, int]:
    """The container's stdio (the engine's fds, or the console's pty) moved off 0-2, which then
    point at /dev/null and the holder's log: nothing of vmrt's reaches the container's output."""
    if console:
        slave = _send_console(console)
        stdio = (slave, os.dup(slave), os.dup(slave))
    else:
        stdio = (os.dup(0), os.dup(1), os.dup(2))
    for fd in stdio:
        os.set_inheritable(fd, False)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    return stdio


def _log_to(d: Path) -> None:
    fd = os.open(d / "holder.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)


def holder(root: str, cid: str, ready_fd: int, console: str | None, here: bool) -> int:
    """The container's process as the engine sees it: see the module's doc."""
    d = Path(root) / cid
    notify = os.fdopen(ready_fd, "w")

    def tell(line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            notify.write(line + "\n")
            notify.flush()
            notify.close()

    try:
        stdio = (0, 1, 2) if here else _engine_stdio(console)
        if not here:
            _log_to(d)
        rec = update_record(d, pid=os.getpid(), ticks=start_ticks(os.getpid()))
        return _hold(root, cid, d, rec, stdio, tell)
    except (VmrtError, Failure) as e:
        tell(f"error {e}")
        print(f"vmrt-runtime holder: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, VmrtError) else 125
    except Exception as e:  # noqa: BLE001  # one line for the engine; the traceback in holder.log
        tell(f"error the container's holder failed: {type(e).__name__}: {e}")
        raise


def _hold(root: str, cid: str, d: Path, rec: dict[str, Any], stdio: tuple[int, int, int], tell: Any) -> int:
    from . import network  # on use, as the next: only a holder takes an engine's interface
    from .drivers.base import RunContext  # on use (as the next): only a holder runs a VM
    from .drivers.vm import VMDriver
    cfg = load_config()
    spec = load_spec(rec["bundle"])
    config = vm_config(spec, rec["bundle"])
    # the engine's namespace (the spec names it): the VM takes its interface (None: no network)
    net = network.join_engine(rec.get("netns"), spec.get("annotations") or {})
    vmid = rec["vmid"]
    run_dir = cfg.run_root / "containers" / vmid
    fsmode.private_dir(run_dir.parent)
    run_dir.mkdir(mode=0o700)
    layer_dir = rw_dir(cfg, vmid)  # where vmrt keeps a container's disk: the warm pool swaps in only those
    fsmode.private_dir(layer_dir.parent)
    c = Container(id=vmid, name=cid, image=rec["rootfs"], isolation="vm", status=Status.CREATED,
                  created=time.time(), command=list(config["process"]["args"]), run_dir=str(run_dir))
    timings = Timings()
    loop_box: dict[str, Any] = {}
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dfd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        ctl.bind(f"/proc/self/fd/{dfd}/ctl.sock")
    finally:
        os.close(dfd)
    ctl.listen(8)
    ctl.setblocking(False)

    async def gate() -> None:
        loop = asyncio.get_running_loop()
        loop_box["loop"] = loop
        update_record(d, status="created")
        tell("ok")
        while True:
            conn, _ = await loop.sock_accept(ctl)
            line = b""
            with contextlib.suppress(OSError):
                while not line.endswith(b"\n") and len(line) < 256:
                    chunk = await asyncio.wait_for(loop.sock_recv(conn, 256), 10)
                    if not chunk:
                        break
                    line += chunk
            if line.strip() == b"start":
                loop_box["start"] = conn
                return
            with contextlib.suppress(OSError):
                await loop.sock_sendall(conn, b"error unknown request\n")
            conn.close()

    def started() -> None:
        update_record(d, status="running", started=_now())
        conn = loop_box.pop("start", None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.setblocking(True)
                conn.sendall(b"ok\n")
            conn.close()

    timings.on_mark["process-started"] = started
    config["process"].pop("consoleSize", None)
    vbundle.write(run_dir, config)  # type: ignore[arg-type]
    ctx = RunContext(cfg, _Record(d), c, None, [Path(rec["rootfs"])], run_dir, config,  # type: ignore[arg-type]
                     timings, *stdio, rw_dir=layer_dir, gate=gate, net=net)
    driver = VMDriver(accel=None, kernel_path=None, notice=False)
    timings.on_mark["agent-ready"] = lambda: print(  # where its VM came from, for holder.log's reader
        "vmrt-runtime holder: VM ready: " + " ".join(f"{k}={v}" for k, v in timings.info.items()), file=sys.stderr,
        flush=True)
    status = 125
    try:
        status = driver.run(ctx)
    except VmrtError as e:
        status = e.exit_code
        conn = loop_box.pop("start", None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.setblocking(True)
                conn.sendall(f"error {e}\n".encode())
            conn.close()
        tell(f"error {e}")
        print(f"vmrt-runtime holder: {e}", file=sys.stderr)
    finally:
        timings.report(sys.stderr)  # holder.log: where the time went (create, the gate, start)
        if net is not None:  # the VM is gone: the interface as the engine made it
            net.release()
        ctl.close()
        with contextlib.suppress(FileNotFoundError):
            (d / "ctl.sock").unlink()
        with contextlib.suppress(Failure, OSError):
            update_record(d, status="stopped", exit_code=status, finished=_now())
        with contextlib.suppress(VmrtError):
            remove_run_dir(run_dir)
        shutil.rmtree(layer_dir, ignore_errors=True)  # an OCI container never runs again
    return status


def exec_holder(root: str, cid: str, ready_fd: int, proc_file: str, console: str | None) -> int:
    """One ``exec``'s process as the engine sees it: the exec relayed from the VM, its status."""
    from .agent.exec_client import exec_in_vm  # on use: only an exec's holder relays an exec
    d = Path(root) / cid
    notify = os.fdopen(ready_fd, "w")
    try:
        proc = json.loads(Path(proc_file).read_text())
        Path(proc_file).unlink()
        rec = read_record(d)
        cfg: Config = load_config()
        stdio = _engine_stdio(console) if console else (0, 1, 2)
        user = proc.get("user") or {}
        tty = None
        if proc.get("terminal"):
            try:
                size = os.get_terminal_size(stdio[1])
                tty = (size.lines, size.columns)
            except OSError:
                tty = (24, 80)
        notify.write("ok\n")
        notify.close()
        return exec_in_vm(cfg.run_root / "containers" / rec["vmid"], [str(a) for a in proc["args"]],
                          env=[str(e) for e in proc.get("env") or []], cwd=str(proc.get("cwd") or "/"),
                          uid=int(user.get("uid", 0)), gid=int(user.get("gid", 0)),
                          groups=[int(x) for x in user.get("additionalGids") or []], tty=tty, interactive=True,
                          stdin_fd=stdio[0], stdout_fd=stdio[1], stderr_fd=stdio[2])
    except (VmrtError, Failure, OSError, ValueError, KeyError) as e:
        with contextlib.suppress(OSError, ValueError):
            notify.write(f"error {e}\n")
            notify.close()
        print(f"vmrt-runtime: exec: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 126) if isinstance(e, VmrtError) else 126


def main(argv: list[str]) -> int:
    if argv[:1] == ["holder"] and len(argv) >= 4:
        rest = argv[4:]
        here = "--here" in rest
        rest = [a for a in rest if a != "--here"]
        return holder(argv[1], argv[2], int(argv[3]), rest[0] if rest else None, here)
    if argv[:1] == ["exec-holder"] and len(argv) >= 5:
        return exec_holder(argv[1], argv[2], int(argv[3]), argv[4], argv[5] if len(argv) > 5 else None)
    print("usage: python -m vmrt.ocivm holder ROOT ID READY_FD [CONSOLE]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
