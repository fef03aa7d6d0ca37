"""The process driver: the bundle's config.json run by an OCI runtime (runc/crun).

vmrt acts as the shim (like containerd-shim or conmon), so that errors, exit
codes and stdio behave exactly as in VM mode:

  mount overlay (image layers read-only + a per-container upper) -> become a
  child subreaper -> ``runtime create`` with pipes vmrt relays (or a
  console socket for ``-t``) -> exec lookup errors surface here and map to
  126/127 -> ``runtime start`` -> the container's init is vmrt's child:
  waitpid gives its status (128+N for a signal) -> read the OOM count ->
  ``runtime delete -f`` (removes its cgroup) -> unmount.

Signals to vmrt are forwarded to the container's init (pidfd); a second stop
signal, or no exit within ``stop_grace``, kills it (exit 137), as in VM mode.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import termios
import threading
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import cgroups, fsmode, healthstate, rootfs
from ..errors import ContainerExecError, LaunchError, VmrtError
from ..layout import TTY_SIZE_NAME
from ..proc import PidFd, write_all
from ..signals import FORCE_KILL, FORWARDED, STOP_SIGNALS
from .base import Handoff, RunContext

LOG = logging.getLogger(__name__)
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def choose_runtime(setting: str) -> str:
    """``auto``: crun where it works (cgroup v2 or pure v1; it refuses hybrid), else runc."""
    if setting not in ("auto", ""):
        path = shutil.which(setting)
        if path is None:
            raise LaunchError(f"OCI runtime {setting!r} not found")
        return path
    crun, runc = shutil.which("crun"), shutil.which("runc")
    hybrid = not cgroups.is_v2() and Path("/sys/fs/cgroup/unified").is_dir()
    if crun and not hybrid:
        return crun
    if runc:
        return runc
    if crun:
        return crun
    raise LaunchError("no OCI runtime found: install runc (apt install runc)")


def exec_error(message: str) -> ContainerExecError | None:
    """runc/crun's create error for a command that cannot be executed, as Docker maps it."""
    i = message.find("exec: ")
    what = message[i:].strip() if i >= 0 else message.strip()
    if i < 0 and "executable file" not in what:  # crun: "executable file `x` not found in $PATH"
        return None
    low = what.lower()
    if "executable file not found" in low or "no such file or directory" in low:
        return ContainerExecError(what, exit_code=127)
    if "permission denied" in low or "exec format error" in low or "is a directory" in low:
        return ContainerExecError(what, exit_code=126)
    return None


class ProcessDriver:
    name = "process"

    def __init__(self, runtime: str = "auto") -> None:
        self.runtime_setting = runtime

    def run(self, ctx: RunContext) -> int:
        return _Session(ctx, choose_runtime(self.runtime_setting)).run()


def _pump(src: int, dst: int, on_first: object = None, close_dst: bool = False,
          tee: Callable[[bytes], None] | None = None) -> None:
    """Copy src to dst (and to ``tee``) until EOF (EIO on a pty master is EOF too). The pump
    owns src and closes it when done: if dst's reader went away, the writer in the container
    then gets EPIPE, as in a shell pipeline."""
    first = True
    try:
        while True:
            try:
                data = os.read(src, 65536)
            except OSError:
                break
            if not data:
                break
            if first and callable(on_first):
                on_first()
                first = False
            if tee is not None:
                tee(data)
            if not write_all(dst, data):
                return
    finally:
        with contextlib.suppress(OSError):
            os.close(src)
        if close_dst:
            with contextlib.suppress(OSError):
                os.close(dst)


def _wait_bounded(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """``proc.wait(timeout)`` without its polling (sleeps of up to 50 ms on every start's path):
    a pidfd becomes readable the moment the process exits."""
    with PidFd(proc.pid) as pfd:
        if not pfd.exited(timeout):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    return proc.wait()


class _Session:
    def __init__(self, ctx: RunContext, runtime: str) -> None:
        self.ctx = ctx
        self.runtime = runtime
        self.state_root = ctx.cfg.run_root / "runtime"
        self.cid = ctx.container.id
        self.pidfd: PidFd | None = None  # the container's init, once it runs
        self.pid = 0
        self.status: int | None = None
        self.stop_signals = 0
        self.forced: str | None = None
        self.timer: threading.Timer | None = None
        self.threads: list[threading.Thread] = []
        self.tty_restore: list[Any] | None = None
        self.fds: list[int] = []  # our ends, closed at teardown
        self.handoff_fds: dict[str, int] = {}

    def _rt(self, *args: str) -> list[str]:
        return [self.runtime, "--root", str(self.state_root), "--log",
                str(self.ctx.bundle_dir / "runtime.log"), "--log-format", "json", *args]

    # --- the run ----------------------------------------------------------------
    def run(self) -> int:
        ctx = self.ctx
        t = ctx.timings
        t.info.update(runtime=os.path.basename(self.runtime))
        bdir = ctx.bundle_dir
        root = bdir / "rootfs"
        rw = ctx.rw_dir or bdir / "rw"
        # the writable layer is root's alone (what container root leaves there, a setuid binary
        # or a device node, is out of other users' reach); the upper dir is the container's
        # "/" (overlayfs gives the root the upper's mode): 0755, as Docker's
        fsmode.private_dir(rw)
        fsmode.make_dirs(rw / "upper", 0o755)
        fsmode.private_dir(rw / "work")
        fsmode.touch_private(bdir / "runtime.log")  # the runtime appends to it, under umask 022 (below)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (*FORWARDED, FORCE_KILL)}
        try:
            rootfs.mount_overlay(ctx.layers, rw / "upper", rw / "work", root)
            t.mark("rootfs-ready")
            try:
                return self._run_mounted()
            finally:
                rootfs.umount(root)
                shutil.rmtree(rw / "work", ignore_errors=True)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            t.mark("teardown-done")

    def _run_mounted(self) -> int:
        ctx = self.ctx
        if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise LaunchError("cannot become a child subreaper")
        created = False
        if ctx.net is not None:  # veth and address while runc creates the container
            ctx.net.plumb_in_background(ctx.cfg, "process")
        try:
            self._create()
            created = True
            if ctx.net is not None:
                ctx.net.wait()
            ctx.timings.mark("vmm-spawned")
            r = subprocess.run(self._rt("start", self.cid), check=False, capture_output=True, text=True)
            if r.returncode != 0:
                raise LaunchError(f"{os.path.basename(self.runtime)} start: "
                                  f"{self._runtime_error() or r.stderr.strip() or r.returncode}")
            ctx.timings.mark("process-started")
            if ctx.handoff is not None:
                ctx.handoff(self._handoff_args())
            status = self._wait()
            ctx.timings.mark("exit")
            if self.forced:
                raise VmrtError(f"container killed: {self.forced}", exit_code=137)
            return status
        finally:
            if ctx.net is not None:
                ctx.net.wait(quiet=True)
            self._teardown(created)

    def _create(self) -> None:
        ctx = self.ctx
        proc_cfg = ctx.config["process"]
        terminal = bool(proc_cfg.get("terminal"))
        stdin_open = ctx.config.get("annotations", {}).get("org.vmrt.stdin") == "true"
        pid_file = ctx.bundle_dir / "init.pid"
        args = ["create", "--bundle", str(ctx.bundle_dir), "--pid-file", str(pid_file)]
        console_sock = None
        child_fds: list[int] = []
        master = -1
        try:
            if terminal:
                # the runtime sends the pty master over this socket (its own stdio stay
                # separate); bound by a short /proc/self/fd path, named relatively for the
                # runtime, which runs in the bundle dir: sun_path is only 108 bytes
                console_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                dfd = os.open(ctx.bundle_dir, os.O_PATH | os.O_DIRECTORY)
                try:
                    console_sock.bind(f"/proc/self/fd/{dfd}/console.sock")
                finally:
                    os.close(dfd)
                console_sock.listen(1)
                args[1:1] = ["--console-socket", "console.sock"]
                stdio: tuple[int, int, int] = (subprocess.DEVNULL, subprocess.DEVNULL, subprocess.DEVNULL)
            else:
                # pass-through: the runtime hands its own stdio to the container, so the
                # container's pipes are the runtime's stdio during create; its error
                # messages are taken from its JSON log instead
                in_r = subprocess.DEVNULL
                if stdin_open:
                    in_r, in_w = os.pipe()
                    child_fds.append(in_r)
                    self.fds.append(in_w)
                out_r, out_w = os.pipe()
                er_r, er_w = os.pipe()
                child_fds += [out_w, er_w]
                self.fds += [out_r, er_r]  # until their pumps own them
                stdio = (in_r, out_w, er_w)
            # umask 022 as under dockerd: the mount targets the runtime makes in the container's
            # root (a volume's missing parents) are 0755, not vmrt's private 0700
            proc = subprocess.Popen(self._rt(*args, self.cid), stdin=stdio[0], stdout=stdio[1],
                                    stderr=stdio[2], close_fds=True, cwd=ctx.bundle_dir, umask=0o022)
            for fd in child_fds:
                os.close(fd)
            child_fds = []
            if console_sock is not None:
                console_sock.settimeout(ctx.cfg.timeouts.start)
                with contextlib.suppress(TimeoutError, OSError):
                    conn, _ = console_sock.accept()
                    with conn:
                        master = _recv_fd(conn)
            try:  # bounded: the runtime's init reads the image's /etc/passwd and /etc/group
                rc = _wait_bounded(proc, ctx.cfg.timeouts.start)  # (a FIFO there blocks it)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()  # its init, stuck in the container's cgroup, goes with the teardown
                raise LaunchError(f"{os.path.basename(self.runtime)} create did not finish within "
                                  f"{ctx.cfg.timeouts.start:g} s (its init reads the image's /etc/passwd "
                                  "and /etc/group: is one a FIFO?)") from None
            except BaseException:  # interrupted (a signal): no runtime left behind
                proc.kill()
                proc.wait()
                raise
        finally:
            for fd in child_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if console_sock is not None:
                console_sock.close()
        if rc != 0:
            if master >= 0:
                os.close(master)
            text = self._runtime_error() or f"exit status {rc}"
            for prefix in ("runc create failed: ", "unable to start container process: ",
                           "error during container init: "):
                text = text.removeprefix(prefix)
            raise exec_error(text) or LaunchError(f"{os.path.basename(self.runtime)} create: {text}")
        if ctx.handoff is not None:  # the monitor reads and writes these fds itself
            if not terminal:
                _discard_pending(self.fds[-1])
                self.handoff_fds = {"--stderr": self.fds[-1], "--stdout": self.fds[-2]}
                if stdin_open:
                    self.handoff_fds["--stdin"] = self.fds[-3]
            elif master < 0:
                raise LaunchError("the runtime did not send the container's terminal")
            else:
                self.fds.append(master)
                self.handoff_fds = {"--tty": master}
                if stdin_open:
                    self.handoff_fds["--stdin"] = master
        elif not terminal:
            _discard_pending(self.fds[-1])  # runtime warnings printed during create
            if stdin_open:  # the pump closes the pipe at our stdin's EOF
                self._thread(_pump, os.dup(ctx.stdin_fd), self.fds.pop(-3), None, True, daemon=True)
        os.chmod(pid_file, fsmode.PRIVATE_FILE)  # the runtime wrote it under umask 022
        self.pid = int(pid_file.read_text().strip())
        self.pidfd = PidFd(self.pid)
        if ctx.state is not None:
            ctx.state.set_fields(ctx.container, pids={"init": self.pid})
        if ctx.handoff is not None:
            return
        if terminal:
            self._relay_tty(master, stdin_open)
        else:
            er_r, out_r = self.fds.pop(), self.fds.pop()
            self._thread(_pump, out_r, ctx.stdout_fd, self._first_output, False, self._tee("stdout"))
            self._thread(_pump, er_r, ctx.stderr_fd, self._first_output, False, self._tee("stderr"))

    def _handoff_args(self) -> Handoff:
        once = self.ctx.config.get("annotations", {}).get("org.vmrt.stdin-once") == "true"
        return Handoff("process", dict(self.handoff_fds), {"--init": self.pid, "--stdin-once": once,
                                                           "--partial": "--tty" in self.handoff_fds,
                                                           "--resize": str(self.ctx.bundle_dir / TTY_SIZE_NAME)
                                                           if "--tty" in self.handoff_fds else None,
                                                           "--health": healthstate.interval_s(self.ctx.config)})

    def _runtime_error(self) -> str | None:
        try:
            lines = (self.ctx.bundle_dir / "runtime.log").read_text().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("level") in ("error", "fatal"):
                    return str(rec.get("msg", "")).strip()
        return None

    def _tee(self, stream: str) -> Callable[[bytes], None] | None:
        tee = self.ctx.tee
        return None if tee is None else lambda data: tee(stream, data)

    def _first_output(self) -> None:
        self.ctx.timings.mark("first-output")

    def _thread(self, fn: object, *args: object, daemon: bool = False) -> None:
        th = threading.Thread(target=fn, args=args, daemon=daemon)  # type: ignore[arg-type]
        th.start()
        if not daemon:
            self.threads.append(th)

    def _relay_tty(self, master: int, stdin_open: bool) -> None:
        ctx = self.ctx
        if master < 0:
            raise LaunchError("the runtime did not send the container's terminal")
        if os.isatty(ctx.stdout_fd):
            sz = os.get_terminal_size(ctx.stdout_fd)
            termios.tcsetwinsize(master, (sz.lines, sz.columns))
            signal.signal(signal.SIGWINCH, lambda *_: self._resize(master))
        if stdin_open:
            if os.isatty(ctx.stdin_fd):
                self.tty_restore = termios.tcgetattr(ctx.stdin_fd)
                tty.setraw(ctx.stdin_fd)
            self._thread(_pump, os.dup(ctx.stdin_fd), os.dup(master), None, True, daemon=True)
        self._thread(_pump, master, ctx.stdout_fd, self._first_output, False, self._tee("stdout"))

    def _resize(self, master: int) -> None:
        with contextlib.suppress(OSError):
            sz = os.get_terminal_size(self.ctx.stdout_fd)
            termios.tcsetwinsize(master, (sz.lines, sz.columns))

    # --- waiting and signals -----------------------------------------------------
    def _wait(self) -> int:
        while True:  # the init is our child: we are the subreaper the runtime's exit left it to;
            try:       # so are `exec -d` processes: reap those too, or they stay zombies
                pid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                raise LaunchError(f"the container's init {self.pid} is not vmrt's child") from None
            if pid == self.pid:
                break
        if self.timer is not None:
            self.timer.cancel()
        for th in self.threads:  # the pipes close when every process in the container is gone
            th.join(timeout=5)
        self.status = os.waitstatus_to_exitcode(st)
        return self.status if self.status >= 0 else 128 - self.status

    def _on_signal(self, signo: int, _frame: object) -> None:
        if signo == FORCE_KILL:
            if self.pidfd is None:
                raise VmrtError("killed before the container started", exit_code=137)
            self._force_kill("killed")
            return
        if self.pidfd is None:
            raise VmrtError(f"interrupted by signal {signo}", exit_code=128 + signo)
        if signo in STOP_SIGNALS:
            self.stop_signals += 1
            if self.stop_signals >= 2:
                self._force_kill("a second stop signal")
                return
            if self.timer is None:
                grace = self.ctx.cfg.timeouts.stop_grace
                self.timer = threading.Timer(grace, self._force_kill,
                                             (f"no exit {grace:g}s after signal {signo}",))
                self.timer.daemon = True
                self.timer.start()
        self.pidfd.send_signal(signo)

    def _force_kill(self, why: str) -> None:
        self.forced = why
        if self.pidfd is not None:
            self.pidfd.send_signal(signal.SIGKILL)

    # --- teardown -------------------------------------------------------------------
    def _teardown(self, created: bool) -> None:
        ctx = self.ctx
        if self.timer is not None:
            self.timer.cancel()
        signal.signal(signal.SIGWINCH, signal.SIG_DFL)
        if self.tty_restore is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(ctx.stdin_fd, termios.TCSADRAIN, self.tty_restore)
        if ctx.state is not None and created:
            if cgroups.oom_kills(ctx.config["linux"].get("cgroupsPath", "")) > 0:
                ctx.state.set_fields(ctx.container, oom_killed=True)
        if self.pid and self.status is None:  # killed before it exited
            if self.pidfd is not None:
                self.pidfd.send_signal(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        # delete even after a failed create: the runtime may have left its state behind
        r = subprocess.run(self._rt("delete", "--force", self.cid), capture_output=True, text=True)
        if r.returncode != 0 and created:
            LOG.warning("runtime delete %s: %s", self.cid, r.stderr.strip())
        for fd in self.fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.pidfd is not None:
            self.pidfd.close()
        with contextlib.suppress(ChildProcessError):  # reap anything else reparented to us
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        cgroups.remove_tree(ctx.config["linux"].get("cgroupsPath", ""))
        if ctx.log_dir is not None and (ctx.bundle_dir / "runtime.log").exists():
            fsmode.private_dir(ctx.log_dir)
            shutil.copy(ctx.bundle_dir / "runtime.log", ctx.log_dir / "runtime.log")


def _discard_pending(fd: int) -> None:
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 65536):
            pass
    os.set_blocking(fd, True)


def _recv_fd(conn: socket.socket) -> int:
    fds = array.array("i")
    _, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(data[:fds.itemsize])
    if not fds:
        raise LaunchError("the runtime's console socket message carried no terminal")
    return fds[0]
