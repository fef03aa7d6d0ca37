"""The remote end of ``vmrt -H ssh://...``: ``vmrt --remote-session=MODE ARGV...`` on the remote host.

``pty:TOKEN``: the command runs on the pty sshd made; Ctrl-C is a byte the container's terminal
turns into SIGINT, and when the connection goes, sshd closes the pty's master: the kernel sends
SIGHUP (vmrt run forwards it to the container), and the parent below sees the hang-up on the pty
and goes on as in framed mode (SIGTERM, then SIGKILL), since a container's PID 1 may ignore
SIGHUP. Signals (SIGTERM to the local vmrt), in both modes, come through a second exec channel
on the same connection: ``vmrt --remote-signal=TOKEN:TERM`` finds the process of this user whose
first argument is ``--remote-session=MODE:TOKEN`` (TOKEN: 128 random bits the client chose) and
signals it: out of band, never queued behind stdin data. OpenSSH's own "signal" channel request is
not used: Debian's sshd 9.2 refuses it ("session signalling requires privilege separation") for
the sessions here.

The command line sshd runs holds only fixed tokens (``vmrt --remote-session=MODE:TOKEN``): the
command's arguments (an ``--env`` value, a ``--build-arg`` secret) would be readable there by
every user of the remote host (/proc/PID/cmdline, audit logs), and a login shell that is not
POSIX's (fish) would split them its own way. They come as data instead, once the client has seen
the hello: an ``A`` frame (below) on stdin, the arguments NUL-separated (at most MAX_ARGV bytes);
with a pty, the terminal is put in raw mode without echo before the hello and restored once the
frame is read, so no byte of it is echoed or taken as a control character.

``framed``: without a pty nothing tells a command that its client went away until it writes (a
``vmrt run`` of a quiet container would wait forever), and OpenSSH's "signal" channel request does
not reach a command in every setup. So the client sends its stdin as frames on the channel's
stdin, and this process forks: the child runs the command (its stdin a pipe, its stdout and
stderr sshd's own), the parent reads the frames:

    frame = type (1 byte) + length (4 bytes, big-endian, at most MAX_FRAME) + payload
    A  the command's arguments (first, once; NUL-separated)
    D  stdin data, written to the command's stdin (at most MAX_BUFFER queued)
    E  the end of stdin (the pipe is closed once what is queued is written)
    S  a signal (its name: INT, TERM, HUP, QUIT, USR1, USR2) sent to the command (older
       clients; signals now come on their own channel)
    P  a ping: the client's every N seconds (its payload: N, ASCII); once one came, 3 N seconds
       without a frame while the session reads them is a hang-up (a connection that dropped
       without a FIN or RST, behind TCP's own timeouts)

The client never ends the channel's stdin while it waits for the command, so the end of the
frames (EOF), like a hang-up of the stdout sshd reads, means the connection is gone: the command
gets SIGHUP (as on a terminal's hang-up; vmrt run passes it to the container), SIGTERM
``TERM_AFTER`` seconds later (a stop signal: the container is killed after its grace time and
``--rm`` removes it), and SIGKILL after ``KILL_AFTER`` as a last resort. The parent exits with the
command's status (128+N for signal N), which sshd sends as the channel's exit status.

Both modes first write :data:`HELLO` to stderr (with a pty: the pty): the client holds that stream
back until it comes, so a host whose shell finds no ``vmrt`` ("command not found", 127), or whose
``vmrt`` predates the session protocol (it refuses ``--remote-session``), is one clear line on the
client instead of the remote shell's words and a status a container could have given.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import struct
import sys
import termios
import time
import tty

from ..errors import UsageError
from ..signals import FORWARDED

MAX_FRAME = 1 << 20
MAX_BUFFER = 1 << 20
TERM_AFTER = 2.0
KILL_AFTER = 60.0
HEADER = struct.Struct(">cI")
SIGNALS = {signal.Signals(s).name[3:]: s for s in FORWARDED}
HELLO = b"\0vmrt-session:2\0"  # no newline: a pty's ONLCR leaves it as it is
MAX_ARGV = 1 << 20
MAX_ARGS = 1 << 16


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def argv_frame(argv: list[str]) -> bytes:
    """The ``A`` frame of ``argv`` (what :func:`read_argv` reads); ValueError past the bounds."""
    data = [os.fsencode(a) for a in argv]
    if any(b"\0" in a for a in data):
        raise ValueError("an argument holds a NUL byte")
    payload = b"\0".join(data)
    if len(payload) > MAX_ARGV or len(data) > MAX_ARGS:
        raise ValueError(f"the arguments are over {MAX_ARGV} bytes or {MAX_ARGS} in number")
    return frame(b"A", payload)


def _read_exactly(fd: int, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        try:
            chunk = os.read(fd, n - len(got))
        except OSError:  # a pty hung up: EIO
            chunk = b""
        if not chunk:
            raise UsageError("remote session: the client went away before sending the command")
        got += chunk
    return bytes(got)


def read_argv(fd: int) -> list[str]:
    """The client's ``A`` frame from ``fd`` (read to its last byte, nothing past it)."""
    kind, n = HEADER.unpack(_read_exactly(fd, HEADER.size))
    if kind != b"A" or n > MAX_ARGV:
        raise UsageError(f"remote session: expected the command's arguments, got a frame {kind!r} of {n} bytes")
    payload = _read_exactly(fd, n)
    args = [os.fsdecode(a) for a in payload.split(b"\0")] if payload else []
    if len(args) > MAX_ARGS:
        raise UsageError("remote session: too many arguments")
    return args


def serve(mode: str, rest: list[str] | None = None) -> list[str]:
    """Returns (the command's arguments, read from the client) in the process that runs the
    command; the parent (framed: relaying the frames; pty: watching for the hang-up) exits with
    the command's status (it never returns)."""
    if mode.startswith("signal:"):
        _, token, name = mode.split(":")
        os._exit(0 if signal_session(token, name) else 1)
    if rest:
        raise UsageError("remote session: the command's arguments come as data, not on the command line")
    framed = mode.startswith("framed:")
    saved = None
    if not framed and os.isatty(0):  # no echo, no line editing, no signal characters for the frame
        saved = termios.tcgetattr(0)
        tty.setraw(0, termios.TCSANOW)
    try:
        try:
            os.write(2, HELLO)
        except OSError:  # no stderr: nobody reads it either
            pass
        argv = read_argv(0)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSANOW, saved)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # until each side has its handlers
    r, w = os.pipe() if framed else (-1, -1)
    pid = os.fork()
    if pid == 0:
        if framed:
            os.dup2(r, 0)
            os.close(r)
            os.close(w)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return argv
    if framed:
        os.close(r)
    for s in FORWARDED:  # what reaches the whole group (a terminal's signals) the command gets itself
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        code = _relay(pid, w if framed else None)
    except BaseException:  # never let the relay's failure leave the command without its parent
        os.kill(pid, signal.SIGHUP)
        code = 255
    sys.stdout.flush()
    os._exit(code)


def signal_session(token: str, name: str) -> bool:
    """``--remote-signal``: SIGname to this user's processes serving ``pty:token`` or
    ``framed:token``; whether any."""
    sig = SIGNALS.get(name)
    if sig is None:
        return False
    wanted = {f"--remote-session={m}:{token}".encode() for m in ("pty", "framed")}
    sent = False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read(4096).split(b"\0")
        except OSError:
            continue
        if wanted.intersection(args[:4]):
            try:
                os.kill(int(entry), sig)
                sent = True
            except ProcessLookupError:
                pass
    return sent


class _Relay:
    def __init__(self, pid: int, stdin_w: int | None) -> None:
        self.pid = pid
        self.w: int | None = stdin_w
        self.queued = bytearray()
        self.frames = bytearray()
        self.ended = False  # E seen
        self.hung_at: float | None = None
        self.termed = False
        self.ping_every: float | None = None  # the client's ping interval, once it said it
        self.seen = time.monotonic()

    def feed(self, data: bytes) -> None:
        self.frames += data
        while len(self.frames) >= HEADER.size:
            kind, n = HEADER.unpack_from(self.frames)
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes")
            if len(self.frames) < HEADER.size + n:
                return
            payload = bytes(self.frames[HEADER.size:HEADER.size + n])
            del self.frames[:HEADER.size + n]
            if kind == b"D":
                if not self.ended and self.w is not None:
                    self.queued += payload
            elif kind == b"E":
                self.ended = True
            elif kind == b"P":
                try:
                    every = float(payload.decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    raise ValueError(f"ping {payload[:16]!r}") from None
                if not 0.05 <= every <= 3600:
                    raise ValueError(f"ping every {every} s")
                self.ping_every = every
            elif kind == b"S":
                sig = SIGNALS.get(payload.decode("ascii", "replace"))
                if sig is None:
                    raise ValueError(f"signal {payload[:16]!r}")
                os.kill(self.pid, sig)
            else:
                raise ValueError(f"frame type {kind!r}")

    def write(self) -> None:
        assert self.w is not None
        try:
            n = os.write(self.w, self.queued)
            del self.queued[:n]
        except BlockingIOError:
            pass
        except OSError as e:  # the command closed its stdin: what is left has no reader
            if e.errno != errno.EPIPE:
                raise
            self.queued.clear()
            self.close_stdin()

    def close_stdin(self) -> None:
        if self.w is not None:
            os.close(self.w)
            self.w = None

    def hang_up(self) -> None:
        if self.hung_at is None:
            self.hung_at = time.monotonic()
            self.close_stdin()
            os.kill(self.pid, signal.SIGHUP)

    def escalate(self) -> None:
        if self.hung_at is None:
            return
        waited = time.monotonic() - self.hung_at
        if waited >= TERM_AFTER and not self.termed:
            self.termed = True
            os.kill(self.pid, signal.SIGTERM)
        if waited >= KILL_AFTER:
            os.kill(self.pid, signal.SIGKILL)


def _status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _relay(pid: int, stdin_w: int | None) -> int:
    """Frames to the command (``stdin_w``: its stdin; None with a pty: no frames, only the watch of
    the hang-up) until it exits; its status."""
    relay = _Relay(pid, stdin_w)
    if stdin_w is not None:
        os.set_blocking(stdin_w, False)
    pidfd = os.pidfd_open(pid)
    reading = True
    framed = stdin_w is not None
    while True:
        if relay.ended and not relay.queued:
            relay.close_stdin()
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        if reading:
            if framed:
                poll.register(0, select.POLLIN if len(relay.queued) < MAX_BUFFER else 0)
            poll.register(1, 0)  # sshd's end of our stdout: POLLERR/POLLHUP once it is gone
        if relay.w is not None and relay.queued:
            poll.register(relay.w, select.POLLOUT)
        listening = reading and framed and len(relay.queued) < MAX_BUFFER
        if not listening:  # frames not read now: their silence says nothing
            relay.seen = time.monotonic()
        timeout = None if relay.hung_at is None else 500
        if listening and relay.ping_every is not None:
            timeout = min(timeout or 10**9, int(relay.ping_every * 1000))
        events = dict(poll.poll(timeout))
        if pidfd in events:
            os.close(pidfd)
            return _status(pid)
        if reading and events.get(1, 0) & (select.POLLERR | select.POLLHUP):
            reading = False
            relay.hang_up()
        if reading and framed and 0 in events:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            relay.seen = time.monotonic()
            try:
                if not data:
                    raise EOFError
                relay.feed(data)
            except EOFError:
                reading = False
                relay.hang_up()
            except ValueError as e:
                print(f"vmrt: remote session: a bad frame from the client ({e}): stopping", file=sys.stderr)
                reading = False
                relay.hang_up()
        if reading and relay.ping_every is not None and time.monotonic() - relay.seen > 3 * relay.ping_every:
            print("vmrt: remote session: no word from the client: the connection is taken as gone", file=sys.stderr)
            reading = False
            relay.hang_up()
        if relay.w is not None and relay.queued and relay.w in events:
            relay.write()
        relay.escalate()
