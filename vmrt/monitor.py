"""The monitor of a detached container (``vmrt run -d``, ``vmrt start``).

One small process per container, started in its own session by :func:`spawn`, so
``vmrt`` itself can exit and be started again at any time. It owns the container
the way an attached ``vmrt run`` does (the same drivers: the VM's QEMU and
virtiofsd, or the OCI runtime's container), writes the container's stdout and
stderr to ``<root>/containers/<id>/container.log`` as JSON lines with
timestamps (Docker's json-file format), records the exit code, OOM flag and
times, and applies the restart policy. It tells the starting ``vmrt`` through a
pipe when the container's process has started, or why it could not.

Signals: SIGTERM/SIGINT and the other forwarded signals go to the container
(via the driver); :data:`~vmrt.drivers.base.FORCE_KILL` kills it. Between runs
(a restart policy's back-off) a stop signal ends the monitor.

Memory: a Python process with the drivers imported is 16-20 MiB PSS, too much for
something that exists once per container. So Python only sets the container up:
once its process runs (VM mode: once the guest agent is ready) the driver hands it
over and this process execve()s the small C monitor (``monitor/``, built with the
agent), which keeps the PID (QEMU, virtiofsd, the container's init stay its
children) and the owner record. It relays output to the log, forwards signals, pings
the agent, serves the attach socket (stdin), and when the container ends execs
``python -m vmrt.monitor --finish ID HOW VALUE OOM DETAIL`` to record the exit,
release everything (:func:`vmrt.lifecycle.cleanup`) and apply the restart policy.
Without the built C monitor the Python monitor stays resident and does it all.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import cgroups, fsmode, healthstate, logfile
from . import config as config_mod
from .errors import StateError, UsageError, VmrtError
from .formatting import inert
from .layout import ATTACH_NAME, LOG_NAME, META_NAME, container_dir, rw_dir
from .lifecycle import cleanup, remove
from .logfile import LogWriter
from .signals import FORCE_KILL
from .state import State, Status
from .vm.outcome import hung, virtiofsd_gone, vm_gone

if TYPE_CHECKING:  # an annotation only: the drivers are imported where a run is set up
    from .drivers.base import Handoff

READY_TIMEOUT = 300.0  # a cold VM boot under TCG, the image pulled first: generous


def parse_restart(policy: str) -> tuple[str, int]:
    """``no``, ``always``, ``unless-stopped`` or ``on-failure[:N]`` -> (name, max retries; 0 = unbounded)."""
    name, _, count = policy.partition(":")
    if name not in ("no", "always", "unless-stopped", "on-failure") or (count and name != "on-failure"):
        raise UsageError(f"invalid restart policy {policy!r}: use no, always, unless-stopped or on-failure[:N]")
    try:
        n = int(count) if count else 0
    except ValueError:
        raise UsageError(f"invalid restart policy {policy!r}: the maximum retry count must be a number") from None
    if n < 0:
        raise UsageError(f"invalid restart policy {policy!r}: the maximum retry count cannot be negative")
    return name, n


def should_restart(policy: str, status: int, stopped: bool, restarts: int) -> bool:
    name, limit = parse_restart(policy)
    if stopped or name == "no":
        return False
    if name == "on-failure":
        return status != 0 and (limit == 0 or restarts < limit)
    return True  # always, unless-stopped (no daemon restarts here, so they behave alike)


class ForkServer:
    """A process that forks containers' monitors, for a long-lived caller (the API service): it
    is forked from the caller before the caller starts any thread, with vmrt's modules already
    loaded, so a monitor starts without a new interpreter (~100 ms less per start). Requests go
    over a socket pair: the container's ID with the ready pipe and the log as fds; the answer is
    the monitor's PID. The server ends when the caller closes its end (or dies).

    It also finishes runs: the C monitors it started (and those of any vmrt) are given
    ``--finisher`` = its listening socket (``finisher``, root's), over which a monitor whose
    container ended asks for its finish command instead of exec'ing a new interpreter."""

    def __init__(self, finisher: Path) -> None:
        from . import agentbuild  # on use: only a fork server's children need the monitor's key
        agentbuild.monitor_key()  # its compiler line cached now, not found again in each child
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gc.freeze()  # what is loaded stays shared with the server: its collector does not write to it
        pid = os.fork()
        if pid == 0:  # the server
            ours.close()
            for name in ("vmrt.runner", "vmrt.drivers.process"):  # what every child needs, loaded once here
                importlib.import_module(name)
            code = 0
            try:
                _fork_monitors(theirs, finisher)
            except BaseException:  # noqa: BLE001  # its end: nothing propagates into the caller's code
                code = 1
            os._exit(code)
        theirs.close()
        self.sock, self.pid, self.lock = ours, pid, threading.Lock()

    def launch(self, container_id: str, ready_fd: int, log_fd: int) -> int:
        """Fork container_id's monitor; its PID."""
        with self.lock:
            socket.send_fds(self.sock, [container_id.encode()], [ready_fd, log_fd])
            reply = self.sock.recv(64)
        if not reply.startswith(b"ok "):
            raise VmrtError(f"cannot start the monitor of {container_id[:12]}: the fork server "
                            f"{'failed' if reply else 'is gone'}")
        return int(reply[3:])

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _fork_monitors(sock: socket.socket, finisher: Path) -> None:
    """The fork server's loop: a monitor per request, a finish per C monitor's request, its
    children reaped as they end."""
    global FINISHER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller's ^C: the caller's; EOF ends this
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock_ = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener: socket.socket | None = sock_
    bound = -1
    old = os.umask(0o177)
    try:
        finisher.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            finisher.unlink()  # a dead server's
        sock_.bind(str(finisher))
        bound = os.stat(finisher).st_ino
        sock_.listen(64)
        FINISHER = finisher  # what the monitors forked from here are given
    except OSError as e:  # monitors exec their finish command then
        print(f"vmrt: the fork server cannot listen on {finisher}: {e.strerror}", file=sys.stderr)
        sock_.close()
        listener = None
    finally:
        os.umask(old)
    try:
        _serve_forks(sock, listener)
    finally:
        if listener is not None:
            with contextlib.suppress(OSError):  # ours still (another server may have taken the name)
                if os.stat(finisher).st_ino == bound:
                    finisher.unlink()
            listener.close()


def _serve_forks(sock: socket.socket, listener: socket.socket | None) -> None:
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        ready, _, _ = select.select([sock, *([listener] if listener else [])], [], [], 5.0)
        if listener is not None and listener in ready:
            _finish_request(sock, listener)
        if sock not in ready:
            continue
        msg, fds, _flags, _addr = socket.recv_fds(sock, 256, 2)
        if not msg:
            return
        try:
            pid = os.fork()
            if pid == 0:
                _monitor_child(sock, msg.decode(), fds)
        except OSError:
            pid = -1
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(f"ok {pid}".encode() if pid > 0 else b"error")


def _finish_request(sock: socket.socket, listener: socket.socket) -> None:
    """A C monitor's ``--finisher`` request: its container's ID and finish arguments, with its
    stderr, its ready pipe (if any) and the socket whose EOF tells it that the finish is done."""
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        conn.settimeout(5.0)
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        msg, fds, _flags, _addr = socket.recv_fds(conn, 8192, 3)
        fields = msg.split(b"\0")
        if uid != 0 or len(fields) != 6 or fields[5] or len(fds) not in (2, 3):
            return
        pid = os.fork()
        if pid == 0:
            conn.close()
            listener.close()
            _finish_child(sock, [f.decode("utf-8", "surrogateescape") for f in fields[:5]], fds)
        conn.send(b"ok")
    except OSError:
        return
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _finish_child(sock: socket.socket, args: list[str], fds: list[int]) -> NoReturn:
    """The finish command (``python -m vmrt.monitor --finish ...``) in a forked child; its
    status to the waiting C monitor at its end (the socket closes with it, or with an exec: a
    restart's new C monitor)."""
    _run_forked(sock, fds[1], ["--finish", *args, str(fds[2]) if len(fds) > 2 else "-1"], done=fds[0])


def _monitor_child(sock: socket.socket, container_id: str, fds: list[int]) -> NoReturn:
    """A forked monitor: what ``python -m vmrt.monitor ID FD`` would be."""
    ready, log = fds
    _run_forked(sock, log, [container_id, str(ready)])


def _run_forked(sock: socket.socket, log: int, argv: list[str], done: int | None = None) -> NoReturn:
    """A child of the fork server as ``python -m vmrt.monitor ARGV`` would be (its own session,
    stdin /dev/null, stdout and stderr on ``log``, default signals), then its status: the exit
    code, written to ``done`` too if given."""
    code = 125
    try:
        sock.close()
        os.setsid()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)
        if done is not None:
            os.set_inheritable(done, False)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        if log > 2:
            os.close(log)
        code = main(argv)
    except BaseException:  # noqa: BLE001  # a forked child never returns into the server's loop
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
            if done is not None:
                os.write(done, str(code).encode())
        os._exit(code)


FORK_SERVER: ForkServer | None = None  # a long-lived caller's (the API service's): spawn uses it
FINISHER: Path | None = None  # in the fork server and its children: the socket C monitors finish by


def spawn(cfg: config_mod.Config, container_id: str) -> tuple[bool, int, str]:
    """Start the monitor of a created (or exited) container and wait until its process started.

    Returns (started, status, message): (True, 0, "") once the process runs; else
    the exit status and the one-line reason (the container is then Exited).
    """
    cdir = container_dir(cfg, container_id)
    r, w = os.pipe()
    try:
        with open(cdir / "monitor.log", "ab", opener=fsmode.opener) as errlog:
            if FORK_SERVER is not None:
                pid = FORK_SERVER.launch(container_id, w, errlog.fileno())
            else:
                pid = subprocess.Popen([sys.executable, "-m", "vmrt.monitor", container_id, str(w)], pass_fds=(w,),
                                       stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                                       start_new_session=True, close_fds=True).pid
    finally:
        os.close(w)
    with open(r, "rb") as f:
        ready, _, _ = select.select([f], [], [], READY_TIMEOUT)
        reply = f.readline(65536).decode(errors="replace").strip() if ready else ""
    if not ready:  # bounded: a start that hangs is killed, not waited for forever
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, FORCE_KILL)
        return False, 125, f"container {container_id[:12]} did not start within {READY_TIMEOUT:g}s (killed)"
    if reply == "ok":
        return True, 0, ""
    code, _, message = reply.partition(" ")
    if not code.isdigit():
        return False, 125, f"the monitor of {container_id[:12]} ended before the container started " \
                           f"(see {cdir / 'monitor.log'})"
    return False, int(code), message


# the signals the C monitor reads from its signalfd: blocked across the execve so that one
# arriving meanwhile waits for it instead of killing the process (or, SIGWINCH: a resize, being
# ignored)
HANDOFF_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGCHLD, signal.SIGWINCH, FORCE_KILL)



def handoff_argv(binary: Path, cfg: config_mod.Config, container_id: str, run_dir: Path,
                 h: Handoff) -> list[str]:
    """The C monitor's command line for a driver's hand-off (its fds made inheritable)."""
    cdir = container_dir(cfg, container_id)
    limits = logfile.container_limits(cdir, cfg)
    argv = [str(binary), "--mode", h.mode, "--id", container_id, "--log", str(cdir / LOG_NAME),
            "--log-max-size", str(limits.max_size), "--log-max-file", str(limits.max_file)]
    for opt, fd in h.fds.items():
        os.set_inheritable(fd, True)
        argv += [opt, str(fd)]
    for opt, value in h.options.items():
        if value is True:
            argv.append(opt)
        elif value is not False and value is not None:
            argv += [opt, str(value)]
    if "--stdin" in h.fds or h.options.get("--stdin-open"):
        argv += ["--attach", str(run_dir / ATTACH_NAME)]
    if FINISHER is not None:
        argv += ["--finisher", str(FINISHER)]
    if h.options.get("--health"):  # a new start: its health is starting again
        healthstate.write(run_dir, healthstate.starting())
    return [*argv, "--", sys.executable, "-m", "vmrt.monitor", "--finish", container_id]


def outcome(how: str, value: str, detail: str) -> tuple[int, str]:
    """The C monitor's account of a run -> (exit status, one-line message or "")."""
    known = value.lstrip("-").isdigit()  # an adopted (pooled) VM's QEMU/virtiofsd: maybe "unknown"
    n = int(value) if known else 0
    if how == "exit":
        return n, ""
    if how == "killed":
        return 137, "container killed: killed"
    if how == "hung":
        return 137, str(hung(float(value)))
    if how == "virtiofsd":
        return 125, str(virtiofsd_gone(n if known else None))
    if how == "error":
        return (n if n in (125, 126, 127) else 125), detail
    if how == "interrupted":
        return 128 + n, f"interrupted by signal {n}"
    if how == "timeout":
        return 125, f"timed out after {value}s waiting for the container process to start"
    if how == "qemu":
        return 125, f"the VM stopped before the container exited (qemu exit status {n})"
    return 125, detail or f"the monitor ended the container ({how} {value})"


class Ready:
    """The pipe to the starting ``vmrt``: "ok", or "<status> <message>"; one line, then closed."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def __call__(self, text: str) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, text.replace("\n", " ").encode() + b"\n")  # one line, whatever a guest said
            os.close(self.fd)
            self.fd = None


def main(argv: list[str]) -> int:
    """``python -m vmrt.monitor ID READY_FD``: run container ID until it (finally) exits.

    ``python -m vmrt.monitor --finish ID HOW VALUE OOM DETAIL``: the C monitor's end of a run."""
    fsmode.restrict_umask()  # its logs, sockets and the VMM's files: root's alone
    if argv and argv[0] == "--finish":
        try:
            return _finish(*argv[1:7])
        except VmrtError as e:
            print(f"vmrt-monitor: {e}", file=sys.stderr)
            return e.exit_code
    container_id, notify = argv[0], Ready(int(argv[1]))
    try:
        return _monitor(container_id, notify)
    except VmrtError as e:
        notify(f"{e.exit_code} {e}")
        return e.exit_code
    finally:
        notify("125 the monitor failed")


def _finish(container_id: str, how: str, value: str, oom: str, detail: str = "", ready: str = "-1") -> int:
    """After the C monitor: the exit recorded, the container's resources released (as for a
    lost owner), the VM's or runtime's logs kept; a start that failed is told to the waiting
    ``vmrt run -d`` (``ready``: the pipe's fd, or -1); then the restart policy, as before."""
    cfg = config_mod.load()
    state = State(cfg.db_path)
    # DETAIL may be a guest's ERROR text: argv bytes that are not UTF-8 come as surrogates, which
    # no encode() takes; they become U+FFFD, and controls are escaped wherever it is shown
    detail = detail.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    status, message = outcome(how, value, detail)
    try:
        c = state.get(container_id)
        run_dir = Path(c.run_dir) if c.run_dir else None
        cdir = container_dir(cfg, c.id)
        if c.isolation == "vm":
            host_oom = cgroups.oom_kills(f"{cgroups.PARENT}/{c.id}-vmm") > 0
            if how == "qemu":
                console = b"".join(_tail(d / "console.log") for d in (run_dir, run_dir / "vm")) if run_dir else b""
                message = str(vm_gone(int(value) if value.lstrip("-").isdigit() else None, console, host_oom))
            oom_killed = oom == "1" or host_oom
            kept: tuple[str, ...] = ("console.log", "qemu.log", "virtiofsd.log")
        else:
            oom_killed = cgroups.oom_kills(cgroups.runtime_path(c.id)) > 0
            kept = ("runtime.log",)
        _reap_children()
        if run_dir is not None:
            for name in kept:
                # a cold VM's; a pooled one's (console.log, then the VMM logs on their tmpfs)
                for path in (run_dir / name, run_dir / "vm" / name, run_dir / "vmm" / name,
                             run_dir / "vm" / "vmm" / name):
                    with contextlib.suppress(OSError):
                        shutil.move(path, cdir / name)
        cleanup(cfg, c)
        _reap_children()
        shutil.rmtree(rw_dir(cfg, c.id) / "work", ignore_errors=True)
        if message:
            logs = LogWriter(cdir / LOG_NAME, logfile.container_limits(cdir, cfg))
            logs.line("stderr", f"vmrt: {inert(message)}\n".encode())  # vmrt's own line: inert
            logs.close()
        with contextlib.suppress(StateError):
            state.transition(c, Status.EXITED, exit_code=status, finished=time.time(), oom_killed=oom_killed)
    finally:
        state.close()
        Ready(int(ready) if ready.isdigit() else None)(f"{status} {message}" if message else "ok")
    started = how not in ("error", "interrupted", "timeout")
    return _monitor(container_id, Ready(None), finished=(status, started))


def _tail(path: Path, size: int = 8192) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read()
    except OSError:
        return b""


def _reap_children() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _monitor(container_id: str, notify: Ready, finished: tuple[int, bool] | None = None) -> int:
    # on use: `vmrt run` imports this module (parse_restart, spawn) and never needs the C build
    from . import agentbuild

    # on use, these three: `--finish` (after every detached exit), `start` and `restart`
    # (spawn) import this module and never run a container here
    from .images.store import Store  # on use (above)
    from .runner import execute, make_driver  # on use (above)
    from .timings import Timings  # on use (above)

    cfg = config_mod.load()
    cdir = container_dir(cfg, container_id)
    meta = json.loads((cdir / META_NAME).read_text())
    config = json.loads((cdir / "config.json").read_text())
    state = State(cfg.db_path)
    c = state.get(container_id)
    store = Store(cfg.root)
    image = store.get(c.image_id)
    layers = image.layer_dirs()
    driver = make_driver(c.isolation, accel=meta.get("accel"),
                         kernel=Path(meta["kernel"]) if meta.get("kernel") else None,
                         runtime=meta.get("runtime") or cfg.runtime, vm_driver=meta.get("vm_driver", "qemu"))
    # escalation is `vmrt stop`'s job (its -t): the driver's own grace timer would cut it short
    cfg.timeouts.stop_grace = 10.0 ** 9
    logs = LogWriter(cdir / LOG_NAME, logfile.limits_of(meta.get("log"), cfg))
    stdio = (os.open(os.devnull, os.O_RDONLY), logs.pipe("stdout"), logs.pipe("stderr"))
    stopping = threading.Event()
    started = threading.Event()

    def on_stop(signo: int, _frame: object) -> None:  # between runs: no container to pass it to
        stopping.set()

    def on_started() -> None:
        started.set()
        notify("ok")

    def own_handlers() -> None:  # the drivers replace them while they run (VM mode: with SIG_DFL after)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, FORCE_KILL):
            signal.signal(s, on_stop)

    binary = agentbuild.monitor_binary(cfg)

    def handoff(h: Handoff) -> NoReturn:  # this process becomes the C monitor
        assert binary is not None
        if h.mode == "vm" and notify.fd is not None:
            h.fds["--ready"] = notify.fd  # it tells `vmrt run -d` when the process started
        run_dir = cfg.run_root / "containers" / container_id
        argv = handoff_argv(binary, cfg, container_id, run_dir, h)
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDOFF_SIGNALS)
        try:
            os.execv(argv[0], argv)
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOFF_SIGNALS)
            raise VmrtError(f"cannot start the container monitor {argv[0]}: {e.strerror}") from e

    status = 125
    try:
        while True:
            if finished is not None:  # a run the C monitor saw to its end
                status, ran = finished
                finished = None
                if ran:
                    started.set()
            else:
                own_handlers()
                if stopping.is_set() or state.get(container_id).stop_requested and started.is_set():
                    break  # a stop that came during the back-off
                timings = Timings()
                timings.on_mark["process-started"] = on_started
                try:
                    status = execute(cfg, state, c, image, layers, config, driver, timings, log_dir=cdir,
                                     stdio=stdio, handoff=handoff if binary is not None else None)
                except StateError as e:  # already running (another start won): leave it alone
                    notify(f"125 {e}")
                    return 125
                except VmrtError as e:
                    status = e.exit_code
                    logs.line("stderr", f"vmrt: {inert(str(e))}\n".encode())  # it may quote the guest
                    notify(f"{status} {e}")
                finally:
                    own_handlers()
            c = state.get(container_id)
            if not started.is_set() or stopping.is_set() or not should_restart(
                    meta.get("restart", "no"), status, c.stop_requested, c.restart_count):
                break  # (a container that never started is not restarted: its error was reported)
            delay = min(0.1 * 2 ** c.restart_count, 5.0)
            state.set_fields(c, restart_count=c.restart_count + 1)
            if stopping.wait(delay):
                break
    finally:
        for fd in stdio:
            os.close(fd)
        logs.close()
        with contextlib.suppress(StateError):
            c = state.get(container_id)
            if c.monitor_pid == os.getpid():  # never clear another owner's record
                state.set_fields(c, monitor_pid=0)
        state.close()
    if meta.get("rm"):
        with contextlib.suppress(VmrtError):
            remove(cfg, container_id, force=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
