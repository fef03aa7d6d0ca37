"""One extra process inside a running VM container, through its guest agent.

Every VM has ``EXEC_PORTS`` virtio-serial exec ports (``org.vmrt.exec.K``);
QEMU listens for each on ``exec-K.sock`` in the container's run directory (see
vmrt/vm/qemu.py). A port carries one exec at a time:

1. take a free port: an exclusive flock on ``exec-K.lock`` in the run directory
   (0600 in a 0700 dir: no other local user can hold it, as one could bind an
   abstract socket name; released when this process ends, however it ends), then
   connect to ``exec-K.sock``;
2. send EXEC (protocol version 2, docs/agent-protocol.md); the agent answers
   STARTED or ERROR (126/127 exec failures with Docker's messages, 125 other);
   frames before that belong to an earlier client of the port and are skipped;
3. relay STDIN/STDIN_CLOSE, forwarded signals (SIGNAL) and window size
   (RESIZE) one way, STDOUT/STDERR the other, until EXIT.

Closing the connection early makes the agent kill the process (and its process
group). Nothing here runs anything on the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import stat
import termios
import threading
import time
import tty as tty_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import AgentError, ContainerExecError, StateError, VmrtError
from ..proc import connect_unix, write_all
from ..signals import FORWARDED
from ..vm.qemu import EXEC_PORTS, exec_socket_name
from . import protocol as P

START_TIMEOUT = 60.0          # the agent answers EXEC at once; under TCG a busy guest is slow
OUT_HIGH = 1 << 20            # stdin is read only while less than this waits for the port


def _lock(run_dir: Path, k: int) -> int | None:
    """Port k's lock, held (an fd), or None when another exec holds it."""
    fd = os.open(run_dir / f"exec-{k}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _port(run_dir: Path) -> Iterator[socket.socket]:
    """A connection to a free exec port of the VM in run_dir, held for the block."""
    if not run_dir.is_dir():
        raise StateError(f"the container's run directory {run_dir} is gone: is it running?")
    found = busy = 0
    last: OSError | None = None
    for k in range(EXEC_PORTS):
        path = run_dir / exec_socket_name(k)
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                continue
        except OSError:
            continue
        found += 1
        try:
            lock = _lock(run_dir, k)
        except OSError as e:  # the run dir went with the container
            last = e
            continue
        if lock is None:
            busy += 1
            continue
        try:  # named through the run dir's fd: its full path can exceed sun_path's 108 bytes
            sock = connect_unix(run_dir, path.name)
        except OSError as e:
            os.close(lock)
            last = e
            continue
        try:
            yield sock
        finally:
            sock.close()
            os.close(lock)
        return
    if busy:
        raise VmrtError(f"all {EXEC_PORTS} exec ports of the container are in use; "
                        "try again when one of its execs has ended")
    if found:
        why = last.strerror if last is not None and last.strerror else "refused"
        raise StateError(f"cannot connect to the container's exec port ({why}): is it running?")
    raise StateError("the container's VM has no exec port: is it running (and started by this vmrt)?")


def exec_in_vm(bundle_dir: Path, args: list[str], *, env: list[str], cwd: str | None, uid: int,
               gid: int, groups: list[int], tty: tuple[int, int] | None, interactive: bool,
               stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2, detach: bool = False,
               start_timeout: float = START_TIMEOUT, timeout: float | None = None,
               max_output: int | None = None, capture: bytearray | None = None, winch: int | None = None,
               walk: bool = False) -> int:
    """Run args in the VM container whose run directory is bundle_dir; return its exit status.

    uid/gid/groups/env/cwd are used as given (the caller resolves names and the
    container's defaults). ``tty`` (rows, columns) gives the process a terminal;
    ``interactive`` relays stdin (else it is /dev/null). ``detach``: return 0
    once the process has started; it runs on with /dev/null for stdio.
    For vmrt's own probes (``stats``, ``top``): ``timeout`` bounds the whole exec (a guest that
    never answers: AgentError; the agent kills the process when the port closes), ``max_output``
    the bytes of output read (more: VmrtError), and ``capture`` takes stdout instead of stdout_fd.
    ``winch``: a pipe whose bytes say that the terminal (stdout_fd's) changed size, for a caller
    off the main thread (no SIGWINCH there: the API service); its end is the terminal's hang-up
    (the process gets SIGHUP).
    ``walk``: the process walks the container's writable layer instead of exec'ing ``args``
    (WALK_UPPER: its stdout is the walk stream, vmrt/agent/walk.py; no terminal, not detached).
    Exec failures raise ContainerExecError (exit_code 126 not executable, 127
    not found); other failures AgentError/StateError/VmrtError.
    """
    spec = P.ExecSpec(args=list(args), env=list(env), cwd=cwd or "/", uid=uid, gid=gid,
                      groups=list(groups), tty=None if detach else tty,
                      stdin=interactive and not detach, detach=detach, walk=walk)
    frame = P.encode_exec(spec)
    with _port(Path(bundle_dir)) as sock:
        relay = _Relay(sock, spec, stdin_fd, stdout_fd, stderr_fd)
        relay.deadline = None if timeout is None else time.monotonic() + timeout
        relay.timeout, relay.max_output, relay.capture = timeout, max_output, capture
        relay.winch = winch if spec.tty is not None else None
        return relay.run(frame, min(start_timeout, timeout) if timeout is not None else start_timeout)


class _Relay:
    def __init__(self, sock: socket.socket, spec: P.ExecSpec, stdin_fd: int, stdout_fd: int,
                 stderr_fd: int) -> None:
        self.sock, self.spec = sock, spec
        self.stdin_fd, self.stdout_fd, self.stderr_fd = stdin_fd, stdout_fd, stderr_fd
        self.decoder = P.FrameDecoder(P.FROM_AGENT)
        self.out = bytearray()          # frames for the agent
        self.signals: list[int] = []
        self.started = False
        self.stdin_open = False
        self.tty_restore: list[Any] | None = None
        self.pre: bytearray | None = bytearray()  # bytes before this session's STARTED/ERROR
        self.deadline: float | None = None      # monotonic: the whole exec ends by then (probes)
        self.timeout: float | None = None
        self.max_output: int | None = None      # output bytes read at most (probes)
        self.capture: bytearray | None = None   # stdout collected here instead of stdout_fd
        self.output = 0
        self.winch: int | None = None           # a resize pipe (see exec_in_vm)

    # --- signals -----------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self) -> Iterator[int | None]:
        """Catch the forwarded signals (and SIGWINCH) into self.signals; yields a wakeup fd."""
        if threading.current_thread() is not threading.main_thread():
            yield None
            return
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        catch = (*FORWARDED, *((signal.SIGWINCH,) if self.spec.tty else ()))
        old: dict[int, Any] = {}
        old_wakeup = -1
        try:
            old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            for s in catch:
                old[s] = signal.signal(s, lambda signo, _f: self.signals.append(signo))
            yield r
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(r)
            os.close(w)

    def _take_signals(self) -> None:
        while self.signals:
            signo = self.signals.pop(0)
            if signo == signal.SIGWINCH:
                self._resize()
            elif self.started:
                self.out += P.encode_signal(signo)
            else:
                raise VmrtError(f"interrupted by signal {signo}", exit_code=128 + signo)

    def _resize(self) -> None:
        for fd in (self.stdout_fd, self.stdin_fd):
            try:
                sz = os.get_terminal_size(fd)
            except OSError:
                continue
            self.out += P.encode_resize(sz.lines, sz.columns)
            return

    # --- the exec ----------------------------------------------------------------
    def run(self, frame: bytes, start_timeout: float) -> int:
        self.sock.setblocking(False)
        self.out += frame
        try:
            with self._signals() as wakeup:
                return self._loop(wakeup, start_timeout)
        finally:
            self._restore_terminal()

    def _on_started(self) -> None:
        self.started = True
        if not self.spec.stdin:
            return
        self.stdin_open = True
        if self.spec.tty is not None and os.isatty(self.stdin_fd):
            self.tty_restore = termios.tcgetattr(self.stdin_fd)
            tty_mod.setraw(self.stdin_fd, termios.TCSADRAIN)  # keep what was typed ahead
        if self.spec.tty is not None:
            self._resize()  # the terminal may have changed since EXEC was sent

    def _restore_terminal(self) -> None:
        if self.tty_restore is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self.tty_restore)
            self.tty_restore = None

    def _read_stdin(self) -> None:
        try:
            data = os.read(self.stdin_fd, 32768)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.out += P.encode(P.Msg.STDIN, data)
        else:
            self.stdin_open = False
            self.out += P.encode(P.Msg.STDIN_CLOSE)

    def _loop(self, wakeup: int | None, start_timeout: float) -> int:
        start_deadline = time.monotonic() + start_timeout
        poller = select.poll()
        while True:
            self._take_signals()
            fds: dict[int, int] = {self.sock.fileno(): select.POLLIN | (select.POLLOUT if self.out else 0)}
            if wakeup is not None:
                fds[wakeup] = select.POLLIN
            if self.winch is not None:
                fds[self.winch] = select.POLLIN
            if self.stdin_open and len(self.out) < OUT_HIGH:
                fds[self.stdin_fd] = fds.get(self.stdin_fd, 0) | select.POLLIN
            for fd, ev in fds.items():
                poller.register(fd, ev)
            timeout = None
            if not self.started:
                left = start_deadline - time.monotonic()
                if left <= 0:
                    raise AgentError(f"timed out after {start_timeout:g}s waiting for the guest agent "
                                     "to start the exec process")
                timeout = max(1, int(left * 1000))
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise AgentError(f"timed out after {self.timeout:g}s waiting for the container's VM to "
                                     "answer (is it hung or stopped?)")
                timeout = min(timeout or 1 << 30, max(1, int(left * 1000)))
            try:
                events = poller.poll(timeout)
            finally:
                for fd in fds:
                    poller.unregister(fd)
            for fd, ev in events:
                if fd == wakeup:
                    with contextlib.suppress(OSError):
                        os.read(wakeup, 512)
                elif fd == self.sock.fileno():
                    if ev & select.POLLOUT and self.out:
                        self._send()
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        status = self._receive()
                        if status is not None:
                            return status
                elif fd == self.winch:
                    self._winch()
                elif fd == self.stdin_fd and self.stdin_open:
                    self._read_stdin()

    def _winch(self) -> None:
        try:
            resized = os.read(self.winch, 512) if self.winch is not None else b""
        except BlockingIOError:
            return
        except OSError:
            resized = b""
        if not resized:  # the caller closed it: the terminal hung up
            self.winch = None
            if self.started:
                self.out += P.encode_signal(signal.SIGHUP)
        elif self.started:  # else the start sends the size then
            self._resize()

    def _send(self) -> None:
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            raise AgentError(f"exec port: {e.strerror}") from None
        del self.out[:n]

    def _frames(self, data: bytes) -> Iterator[P.Frame]:
        """Frames in data; before STARTED or ERROR, whatever an earlier client of the port
        left on the way (whole frames, or the rest of one) is skipped."""
        if self.pre is None:
            yield from self.decoder.feed(data)
            return
        self.pre += data
        prefix = P.HEADER.pack(P.MAGIC, P.VERSION, 0, 0)[:3]
        while True:
            i = self.pre.find(prefix)
            if i < 0:
                del self.pre[:max(0, len(self.pre) - 2)]
                return
            del self.pre[:i]
            try:
                fr = next(P.FrameDecoder(P.FROM_AGENT).feed(bytes(self.pre)), None)
            except VmrtError:  # not a frame: look further
                del self.pre[:1]
                continue
            if fr is None:
                return  # more bytes needed
            del self.pre[:P.HEADER.size + len(fr.payload)]
            if fr.type in (P.Msg.STARTED, P.Msg.ERROR):
                rest, self.pre = bytes(self.pre), None
                yield fr
                yield from self.decoder.feed(rest)
                return

    def _receive(self) -> int | None:
        try:
            data = self.sock.recv(1 << 17)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise AgentError(f"exec port: {e.strerror}") from None
        if not data:
            if self.started:
                raise AgentError("the container's VM went away before the exec process exited")
            raise AgentError("the guest agent closed the exec port before the process started")
        for fr in self._frames(data):
            if not self.started:
                if fr.type == P.Msg.STARTED:
                    P.decode_started(fr.payload)
                    self._on_started()
                    if self.spec.detach:
                        return 0
                elif fr.type == P.Msg.ERROR:
                    err = P.decode_error(fr.payload)
                    raise ContainerExecError(err.message,
                                             exit_code=err.code if err.code in (125, 126, 127) else 125)
                continue
            if fr.type in (P.Msg.STDOUT, P.Msg.STDERR) and self.max_output is not None:
                self.output += len(fr.payload)
                if self.output > self.max_output:
                    raise VmrtError(f"the process in the container printed more than {self.max_output} bytes: "
                                    "cut off")
            if fr.type == P.Msg.STDOUT:
                if self.capture is not None:
                    self.capture += fr.payload
                else:
                    write_all(self.stdout_fd, fr.payload)
            elif fr.type == P.Msg.STDERR:
                write_all(self.stderr_fd, fr.payload)
            elif fr.type == P.Msg.EXIT:
                return P.decode_exit(fr.payload).status
            elif fr.type == P.Msg.ERROR:
                err = P.decode_error(fr.payload)
                raise AgentError(f"guest agent: {err.message}")
        return None
