"""The local end of ``vmrt -H ssh://...``: the remote ``vmrt`` over an SSH exec channel (paramiko).

Trust: the host key must be in ``~/.ssh/known_hosts`` or ``/etc/ssh/ssh_known_hosts`` (an unknown
host is refused with how to accept it; a changed key is refused loudly), authentication is by key
alone (the ssh-agent, then ``~/.ssh/id_*`` without a passphrase): vmrt never asks for a password,
as ssh's BatchMode. The remote command line (the one string that goes to the remote user's login
shell) holds fixed tokens alone, ``vmrt --remote-session=MODE:TOKEN``: the command's arguments
(environment values, build args) go as data once the session greets (vmrt/remote/session.py),
never where the remote host's other users read them (/proc/PID/cmdline).

Failures of the connection itself (cannot connect, host key, authentication, a connection lost
mid-run) are :class:`RemoteError`, exit status 255 as ssh's; the remote command's own status is
passed on as it is.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

from .. import fsmode
from ..errors import VmrtError
from ..signals import FORWARDED
from .session import HELLO, argv_frame, frame
from .target import SESSION_FLAG, SIGNAL_FLAG, SshTarget

CONNECT_TIMEOUT = float(os.environ.get("VMRT_SSH_TIMEOUT", "15") or 15)
USER_TIMEOUT_MS = 45_000  # TCP_USER_TIMEOUT: unacknowledged data this long, and the connection is gone


def ping_every() -> float:
    """VMRT_SSH_PING: seconds between the framed session's pings (its silence for 3 of them: a
    hang-up on the remote side)."""
    try:
        value = float(os.environ.get("VMRT_SSH_PING", "") or 15)
    except ValueError:
        value = 15.0
    return max(0.05, min(value, 3600.0))
CHUNK = 32 * 1024
TAIL = 4096


class RemoteError(VmrtError):
    """The SSH connection failed or was lost (ssh's exit status)."""

    exit_code = 255


class UnknownHostError(RemoteError):
    """The host's key is in no known_hosts file (and nobody accepted it)."""


class NoSession(Exception):
    """The remote command ended without the session's hello: no vmrt there (the shell's 127), or
    one that does not speak the protocol. ``status``: its exit status; ``line``: its last line."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(status, line)
        self.status, self.line = status, line


def no_session(target: SshTarget, status: int, line: str) -> VmrtError:
    """The one line for :class:`NoSession` (exit 125: vmrt's own failure, not the container's)."""
    from ..formatting import inert  # imported on use: a failure only
    host = target.host
    if status == 127:
        return VmrtError(f"vmrt is not installed on {host} (the remote shell found no vmrt on the PATH of "
                         f"{target.user or getpass.getuser()}): install it there, or link it into /usr/local/bin")
    said = f": {inert(line[:200])}" if line else ""
    return VmrtError(f"the vmrt on {host} did not start a remote session (exit {status}): too old for vmrt -H "
                     f"(it must be the same version as this one), or broken{said}")


HOLD_MAX = 1 << 16


@dataclass
class CidWatch:
    """The cid marker an attached ``run --cidfile`` asked the remote for (vmrt/cli/remote.py)."""

    token: str
    found: Callable[[str], object]
    done: bool = False


class _Greeting:
    """The remote session's :data:`~.session.HELLO`: the stream it comes on (stderr; with a pty,
    the pty's one) is held back until it does. What came before it (a login shell's words) is
    passed on, the hello itself dropped; past HOLD_MAX bytes without it, the stream flows as it
    is and nothing is concluded."""

    def __init__(self, cid: CidWatch | None = None) -> None:
        self.waiting = True
        self.greeted = False  # the hello itself came
        self.held = bytearray()
        self.cid = cid
        self.tail = b""  # the end of what came after the hello that may begin the cid marker

    def feed(self, data: bytes) -> bytes:
        if not self.waiting:
            return self._cid(data)
        self.held += data
        i = self.held.find(HELLO)
        if i >= 0:
            out = bytes(self.held[:i] + self.held[i + len(HELLO):])
            self.greeted = True
        elif len(self.held) > HOLD_MAX:
            out = bytes(self.held)
        else:
            return b""
        self.waiting = False
        self.held.clear()
        return self._cid(out)

    def _cid(self, data: bytes) -> bytes:
        """With ``--cid-marker`` (an attached ``run --cidfile``): the remote's
        ``\\0vmrt-cid:TOKEN:ID\\0`` taken out of the stream and its ID told, once; TOKEN is
        the client's secret (a container cannot write a marker that passes)."""
        if self.cid is None or self.cid.done:
            return data
        data = self.tail + data
        self.tail = b""
        head = b"\0vmrt-cid:" + self.cid.token.encode() + b":"
        i = data.find(head)
        if i >= 0:
            end = i + len(head) + 65
            if len(data) < end:  # the rest of it is still on its way
                self.tail = data[i:]
                return data[:i]
            cid = data[i + len(head):end - 1]
            if data[end - 1:end] == b"\0" and re.fullmatch(rb"[0-9a-f]{64}", cid):
                self.cid.done = True
                self.cid.found(cid.decode())
                return data[:i] + data[end:]
            return data
        j = data.rfind(b"\0", max(0, len(data) - len(head) + 1))
        if j >= 0 and head.startswith(data[j:]):
            self.tail = data[j:]
            return data[:j]
        return data

    def flush(self) -> bytes:
        out, self.tail = self.tail, b""
        return out

    def last_line(self) -> str:
        lines = [ln for ln in bytes(self.held).decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else ""


def _ask(target: SshTarget, key: Any) -> bool:
    """On a terminal (stdin and stderr), as ssh does: show the fingerprint, accept on "yes"."""
    if not (os.isatty(0) and os.isatty(2)):
        return False
    sys.stderr.write(f"The authenticity of host '{target.known_hosts_name()}' can't be established.\n"
                     f"{key.get_name()} key fingerprint is {_fingerprint(key).split()[1]}.\n"
                     "Are you sure you want to continue connecting (yes/no)? ")
    sys.stderr.flush()
    for _ in range(3):
        answer = sys.stdin.readline(64).strip().lower()
        if answer in ("yes", "no", ""):
            return answer == "yes"
        sys.stderr.write("Please type 'yes' or 'no': ")
        sys.stderr.flush()
    return False


@dataclass
class Plan:
    """What one remote command needs from this side (vmrt/cli/remote.py makes it)."""

    argv: list[str]
    stdin: bool = False  # forward this stdin (run/exec -i, load, attach, ...)
    stdin_file: Path | None = None  # this file is the remote command's stdin (load -i, import FILE)
    stdin_tar: tuple[Path, str] | None = None  # a tar of this local path, named so (cp LOCAL C:PATH)
    stdin_producer: Callable[[BinaryIO], None] | None = None  # writes the remote's stdin (build CONTEXT)
    stdout_file: Path | None = None  # the remote command's stdout goes to this file (save -o)
    extract: tuple[str, Path] | None = None  # its stdout is a tar of NAME to put at PATH (cp C:PATH LOCAL)
    keep_tail: bool = False  # stdout passed on, its last TAIL bytes kept in ``tail`` (build --iidfile)
    tail: bytes = b""
    iidfile: Path | None = None  # build --iidfile: written here (vmrt/cli/remote.py)
    cidfile: Path | None = None  # run -d / create --cidfile: written here
    cid: CidWatch | None = None  # an attached run --cidfile: the remote's marker, its ID told
    tty: bool = False  # a pty on the remote side (-t)
    globals_: list[str] = field(default_factory=list)  # the main group's flags (--debug)


def _home() -> Path:
    return Path(os.environ.get("HOME") or os.path.expanduser("~"))


def known_hosts_files() -> list[Path]:
    return [_home() / ".ssh" / "known_hosts", Path("/etc/ssh/ssh_known_hosts")]


def _check_owner(path: Path, st: os.stat_result) -> None:
    """As OpenSSH's StrictModes: ~/.ssh files another user (but root) owns or may write are refused."""
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise RemoteError(f"bad owner or permissions on {path}: owned by another user or writable by others")


def known_hosts_text(path: Path) -> tuple[str, set[tuple[str, str]]]:
    """A known_hosts file as paramiko can load it, and the keys it marks ``@revoked`` ((type,
    base64)). paramiko raises on marker lines (``@cert-authority``, ``@revoked``) and on a key it
    cannot decode: those lines are taken out here (a CA vouches for nothing here, as vmrt checks
    no host certificates; a line paramiko cannot read is skipped, as OpenSSH skips it)."""
    import paramiko  # imported on use: a remote host only
    kept: list[str] = []
    revoked: set[tuple[str, str]] = set()
    with open(path, "rb") as f:
        _check_owner(path, os.fstat(f.fileno()))
        data = f.read(16 << 20)
    for line in data.decode(errors="replace").splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0].startswith("@"):
            if fields[0] == "@revoked" and len(fields) >= 4:
                revoked.add((fields[2], fields[3]))
            continue
        try:
            if paramiko.hostkeys.HostKeyEntry.from_line(line) is None:
                continue
        except Exception:  # paramiko's InvalidHostKey, SSHException, binascii's, a key type it lacks
            continue
        kept.append(line)
    return "\n".join(kept) + "\n", revoked


@contextlib.contextmanager
def known_hosts_paths() -> Iterator[tuple[list[str], set[tuple[str, str]]]]:
    """The known_hosts files, filtered (:func:`known_hosts_text`), as paths paramiko can load
    (memfds), and the revoked keys of them all."""
    fds: list[int] = []
    revoked: set[tuple[str, str]] = set()
    try:
        for f in known_hosts_files():
            if not f.is_file():
                continue
            try:
                text, bad = known_hosts_text(f)
            except OSError as e:
                raise RemoteError(f"cannot read {f}: {e.strerror or e}") from None
            revoked |= bad
            fd = os.memfd_create("known_hosts", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, text.encode())
        yield [f"/proc/self/fd/{fd}" for fd in fds], revoked
    finally:
        for fd in fds:
            os.close(fd)


def _fingerprint(key: Any) -> str:
    import base64  # imported on use: only for messages
    import hashlib  # imported on use: only for messages
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def add_known_host(target: SshTarget, key: Any) -> Path:
    """Append ``key`` for ``target`` to ~/.ssh/known_hosts (made 0700/0600 if missing)."""
    d = _home() / ".ssh"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / "known_hosts"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{target.known_hosts_name()} {key.get_name()} {key.get_base64()}\n")
    return path


MAX_JUMPS = 4


def resolve(target: SshTarget) -> tuple[SshTarget, list[str]]:
    """``target`` as ~/.ssh/config names it (HostName, User, Port, IdentityFile of its ``Host``
    block; nothing that runs a command: ProxyCommand and ``Match exec`` are not used), and the
    identity files it names. Values are parsed as strictly as a URL's."""
    effective, keys, _ = _lookup(target)
    return effective, keys


def _without_match(text: str) -> str:
    """~/.ssh/config without its ``Match`` blocks (each up to the next ``Host`` or ``Match``:
    dropping the line alone would give its options to the block before it, or to every host)
    and ``Include`` lines: vmrt neither runs ``Match exec`` nor reads other files."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        word = re.split(r"[\s=]", line.strip(), maxsplit=1)[0].lower()
        if word == "match":
            skipping = True
        elif word == "host":
            skipping = False
        if not skipping and word != "include":
            kept.append(line)
    return "\n".join(kept)


def _lookup(target: SshTarget) -> tuple[SshTarget, list[str], list[SshTarget]]:
    """:func:`resolve`, and the jump hosts of its ``ProxyJump`` (``[user@]host[:port]``, comma
    separated, at most MAX_JUMPS; each parsed as a URL's host, then looked up itself)."""
    import paramiko  # imported on use: ~0.2 s, only for a remote host
    path = _home() / ".ssh" / "config"
    if not path.is_file():
        return target, [], []
    try:
        with open(path, "rb") as f:
            _check_owner(path, os.fstat(f.fileno()))
            text = f.read(1 << 20).decode()
        cfg = paramiko.SSHConfig.from_text(_without_match(text))
        found = cfg.lookup(target.host)
    except (OSError, UnicodeDecodeError, paramiko.SSHException, ValueError) as e:
        raise RemoteError(f"cannot read {path}: {e}") from None
    from .target import parse_host  # imported on use: only with a config file
    host = found.get("hostname", target.host)
    user = target.user or found.get("user")
    port = target.port if target.port != 22 or "port" not in found else found["port"]
    try:
        bracketed = f"[{host}]" if ":" in str(host) else host  # an IPv6 address
        effective = parse_host(f"ssh://{user + '@' if user else ''}{bracketed}:{port}")
    except VmrtError:
        raise RemoteError(f"{path}: the entry for {target.host} names an invalid host, user or port") from None
    keys = [os.path.expanduser(k) for k in found.get("identityfile", []) if os.path.isfile(os.path.expanduser(k))]
    jumps: list[SshTarget] = []
    jump = str(found.get("proxyjump", "")).strip()
    if jump and jump.lower() != "none":
        hops = jump.split(",")
        if len(hops) > MAX_JUMPS:
            raise RemoteError(f"{path}: the ProxyJump of {target.host} has more than {MAX_JUMPS} hosts")
        for hop in hops:
            try:
                jumps.append(parse_host(f"ssh://{hop.strip()}"))
            except VmrtError:
                raise RemoteError(f"{path}: the ProxyJump of {target.host} names an invalid host: "
                                  f"{hop.strip()[:100]!r} (expected [user@]host[:port])") from None
    return effective, keys, jumps


def connect(target: SshTarget, *, accept_new: bool = False) -> Any:
    """A connected, authenticated paramiko SSHClient; RemoteError with a clear line otherwise.
    Through the ProxyJump hosts of ~/.ssh/config, if any (ssh -J): each its own connection, host
    key and authentication, the next one over its ``direct-tcpip`` channel."""
    import logging  # imported on use: paramiko's own lines (a refused channel) are said once, by vmrt
    quiet = logging.getLogger("paramiko")
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
    effective, key_files, jumps = _lookup(target)
    hops = [(*resolve(j), j) for j in jumps]
    opened: list[Any] = []
    sock = None
    try:
        for i, (hop, hop_keys, _) in enumerate(hops):
            client = _connect_one(hop, hop_keys, accept_new=accept_new, sock=sock, role="the jump host")
            opened.append(client)
            nxt = hops[i + 1][0] if i + 1 < len(hops) else effective
            try:
                sock = client.get_transport().open_channel("direct-tcpip", (nxt.host, nxt.port), ("127.0.0.1", 0),
                                                           timeout=CONNECT_TIMEOUT)
            except Exception as e:  # paramiko's ChannelException (refused, prohibited) or SSHException
                raise RemoteError(f"cannot connect to {nxt.url()} through the jump host {hop.url()}: "
                                  f"{getattr(e, 'text', '') or e or type(e).__name__}") from None
        final = _connect_one(effective, key_files, accept_new=accept_new, sock=sock, role="")
    except BaseException:
        for c in reversed(opened):
            c.close()
        raise
    if opened:
        close = final.close

        def close_all() -> None:
            close()
            for c in reversed(opened):
                c.close()
        final.close = close_all
    return final


def _connect_one(target: SshTarget, key_files: list[str], *, accept_new: bool, sock: Any, role: str) -> Any:
    import paramiko  # imported on use: ~0.2 s, only for a remote host
    who = f"{role} {target.url()}" if role else target.url()

    revoked: set[tuple[str, str]] = set()

    def refuse_revoked(key: Any) -> None:
        if (key.get_name(), key.get_base64()) in revoked:
            raise RemoteError(f"{who}: the host key of {target.known_hosts_name()} ({_fingerprint(key)}) is "
                              f"marked @revoked in known_hosts: refusing to connect")

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            refuse_revoked(key)
            if accept_new or _ask(target, key):
                path = add_known_host(target, key)
                print(f"vmrt: added {target.known_hosts_name()} ({_fingerprint(key)}) to {path}", file=sys.stderr)
                return
            port = f"-p {target.port} " if target.port != 22 else ""
            raise UnknownHostError(
                f"{who}: the host key of {target.known_hosts_name()} is not known ({_fingerprint(key)}); "
                f"check that fingerprint with the host's administrator, then add it: "
                f"ssh-keyscan {port}{target.host} >> ~/.ssh/known_hosts, "
                f"or: vmrt context create NAME --host {target.url()} --accept-host-key")

    client = paramiko.SSHClient()
    with known_hosts_paths() as (paths, bad):
        revoked |= bad
        for path in paths:
            try:
                client.load_system_host_keys(path)
            except (OSError, paramiko.SSHException) as e:
                raise RemoteError(f"cannot read the known_hosts files: {e}") from e
    client.set_missing_host_key_policy(Policy())
    user = target.user or getpass.getuser()
    try:
        client.connect(target.host, port=target.port, username=user, timeout=CONNECT_TIMEOUT,
                       key_filename=key_files or None, sock=sock,
                       banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT, channel_timeout=CONNECT_TIMEOUT,
                       allow_agent=True, look_for_keys=True, password=None, passphrase=None)
    except RemoteError:
        client.close()
        raise
    except paramiko.BadHostKeyException as e:
        client.close()
        raise RemoteError(
            f"WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED for {target.known_hosts_name()}"
            f"{' (' + role + ')' if role else ''}: it offered "
            f"{_fingerprint(e.key)}, known_hosts has {_fingerprint(e.expected_key)}; someone could be "
            f"intercepting the connection; refusing to connect (if the host's key really changed, remove the "
            f"old one: ssh-keygen -R '{target.known_hosts_name()}')") from None
    except (paramiko.SSHException, EOFError) as e:
        client.close()
        # paramiko's AuthenticationException, or "No authentication methods available" (no key at all)
        if isinstance(e, paramiko.AuthenticationException) or "authentication" in str(e).lower():
            raise RemoteError(f"{who}: permission denied for {user} (publickey): no key from the ssh-agent "
                              f"or ~/.ssh/id_* was accepted; vmrt never asks for a password ({e})") from None
        raise RemoteError(f"cannot connect to {who}: {e or type(e).__name__}") from None
    except OSError as e:
        client.close()
        raise RemoteError(f"cannot connect to {who}: {e.strerror or e}") from None
    transport = client.get_transport()
    if transport is not None:
        try:
            refuse_revoked(transport.get_remote_server_key())
        except RemoteError:
            client.close()
            raise
        transport.set_keepalive(15)
    return client


def check_host(target: SshTarget, *, accept_new: bool) -> None:
    """Connect once (``vmrt context create --accept-host-key``): the host key learned if asked."""
    connect(target, accept_new=accept_new).close()


def remote_command(tty: bool, token: str) -> str:
    """The command line sshd runs: fixed tokens alone (the arguments go as :func:`first_frame`)."""
    if not re.fullmatch(r"[0-9a-f]{32}", token):
        raise ValueError("bad session token")
    return f"vmrt {SESSION_FLAG}={'pty' if tty else 'framed'}:{token}"


def first_frame(plan: Plan) -> bytes:
    """The remote command's arguments, as the session's ``A`` frame."""
    try:
        return argv_frame([*plan.globals_, *plan.argv])
    except ValueError as e:
        raise VmrtError(f"cannot send the command to the remote host: {e}") from None


def window() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(0 if os.isatty(0) else 1)
        if size.columns > 0 and size.lines > 0:
            return min(size.columns, 9999), min(size.lines, 9999)
    except OSError:
        pass
    return 80, 24


@contextlib.contextmanager
def raw(enabled: bool) -> Iterator[None]:
    if not enabled or not os.isatty(0):
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _Sender:
    """Frames (or raw bytes, with a pty) on the channel, one at a time. Signals never wait behind
    data: they go on a channel of their own."""

    def __init__(self, chan: Any, framed: bool, token: str) -> None:
        self.chan, self.framed, self.token = chan, framed, token
        self.lock = threading.Lock()

    def raw(self, data: bytes) -> None:
        with self.lock:
            self.chan.sendall(data)

    def data(self, chunk: bytes) -> None:
        with self.lock:
            self.chan.sendall(frame(b"D", chunk) if self.framed else chunk)

    def ping(self, every: float) -> bool:
        """A ping frame, unless data is on its way (that says as much); whether sent."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self.chan.sendall(frame(b"P", f"{every:g}".encode()))
        finally:
            self.lock.release()
        return True

    def end(self) -> None:
        with self.lock:
            if self.framed:
                self.chan.sendall(frame(b"E"))
            else:
                self.chan.shutdown_write()

    def signal(self, name: str) -> None:
        # a second channel runs the remote signaller (with a pty, Ctrl-C itself goes as its byte)
        threading.Thread(target=self._signal_channel, args=(name,), daemon=True).start()

    def _signal_channel(self, name: str) -> None:
        try:
            chan = self.chan.get_transport().open_session(timeout=CONNECT_TIMEOUT)
            if re.fullmatch(r"[A-Z0-9]{1,8}", name):
                chan.exec_command(f"vmrt {SIGNAL_FLAG}={self.token}:{name}")
            chan.recv_exit_status()
            chan.close()
        except Exception:  # the connection is going: the main loop reports it
            pass


def _pump(source: BinaryIO | None, sender: _Sender, failed: list[BaseException], stop: threading.Event,
          go: threading.Event, wake: int) -> None:
    """``source`` to the remote until its end (then the end of stdin), or until ``stop`` (``wake``
    readable then); nothing before ``go`` (the arguments sent)."""
    import select  # imported on use: the relay alone
    try:
        while not go.wait(0.5):
            if stop.is_set():
                return
        if source is not None:
            fd = source.fileno()
            while not stop.is_set():
                if not select.select([fd, wake], [], [], 0.5)[0] or stop.is_set():
                    continue
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                sender.data(chunk)
        if not stop.is_set():
            sender.end()
    except (OSError, EOFError) as e:  # the channel went (reported by the main loop) or the source failed
        failed.append(e)


@contextlib.contextmanager
def stdin_source(plan: Plan) -> Iterator[BinaryIO | None]:
    if plan.stdin_file is not None:
        try:
            f = open(plan.stdin_file, "rb")
        except OSError as e:
            raise VmrtError(f"cannot open {plan.stdin_file}: {e.strerror}") from e
        with f:
            yield f
    elif plan.stdin_tar is not None or plan.stdin_producer is not None:
        import tarfile  # imported on use: cp and build alone
        r, w = os.pipe()
        errors: list[BaseException] = []
        write: Callable[[BinaryIO], None]
        if plan.stdin_tar is not None:
            path, name = plan.stdin_tar

            def write_tar(f: BinaryIO) -> None:
                from .localfiles import copy_tar  # imported on use: cp alone
                copy_tar(path, name, f)
            write, what = write_tar, f"copy {path}"
        else:
            assert plan.stdin_producer is not None
            write, what = plan.stdin_producer, "send the build context"

        def produce() -> None:
            try:
                with open(w, "wb") as f:
                    write(f)
            except BrokenPipeError:  # the remote command stopped reading: its status says why
                pass
            except (OSError, tarfile.TarError, VmrtError) as e:
                errors.append(e)
        t = threading.Thread(target=produce, daemon=True)
        t.start()
        with open(r, "rb") as f:
            yield f
        t.join(timeout=5)
        if errors:
            err = errors[0]
            raise VmrtError(f"cannot {what}: {err.strerror if isinstance(err, OSError) and err.strerror else err}")
    elif plan.stdin:
        yield open(0, "rb", buffering=0, closefd=False)
    else:
        yield None


class Output:
    """Where the remote stdout goes: ours, a file (save -o: in place only when all went well), or
    a tar unpacked here (cp C:PATH LOCAL, vmrt/cp.py's checks)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.fd = 1
        self.tmp: Path | None = None
        self.thread: threading.Thread | None = None
        self.status: list[int] = []
        self.done = threading.Event()
        self.error: list[BaseException] = []
        self.tail = b""
        if plan.keep_tail:
            r, self.fd = os.pipe()
            self.thread = threading.Thread(target=self._tee, args=(r,), daemon=True)
            self.thread.start()
        elif plan.stdout_file is not None:
            out = plan.stdout_file
            self.tmp = out.with_name(f".{out.name}.vmrt-{os.getpid()}")
            try:
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                os.fchmod(self.fd, 0o666 & ~fsmode.caller_umask())  # the user's umask, not vmrt's 077
            except OSError as e:
                raise VmrtError(f"cannot write {out}: {e.strerror}") from e
        elif plan.extract is not None:
            from ..cp import host_target  # imported on use: cp alone
            base, dest = plan.extract
            host_target(dest, base)
            r, self.fd = os.pipe()
            self.thread = threading.Thread(target=self._unpack, args=(r, base, dest), daemon=True)
            self.thread.start()

    def _tee(self, r: int) -> None:
        ok = True
        with open(r, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                self.tail = (self.tail + chunk)[-TAIL:]
                if ok:
                    try:
                        _write_all(1, chunk)
                    except BrokenPipeError:  # our reader left: the rest is dropped, as ssh does
                        ok = False

    def _unpack(self, r: int, base: str, dest: Path) -> None:
        from ..cp import unpack_to_host  # imported on use: cp alone

        def done(error: BaseException | None) -> None:
            if error is not None:  # refused: the relay must not block on a full pipe while we wait
                with contextlib.suppress(OSError):
                    while os.read(r, CHUNK):
                        pass
            self.done.wait()
            if self.status and self.status[0] != 0:  # the remote said why on stderr
                raise _Quiet()
            if error is not None:
                raise VmrtError(f"cannot copy {base}: {error}")
        try:
            with open(r, "rb") as f:
                unpack_to_host(f, base, dest, done)
        except _Quiet:
            pass
        except (VmrtError, OSError) as e:
            self.error.append(e)
            with contextlib.suppress(OSError):  # let a blocked writer go
                while os.read(r, CHUNK):
                    pass

    def finish(self, status: int | None) -> None:
        if self.fd != 1:
            os.close(self.fd)
        self.status.append(255 if status is None else status)
        self.done.set()
        if self.thread is not None:
            self.thread.join()
        self.plan.tail = self.tail
        if self.tmp is not None and self.plan.stdout_file is not None:
            if status == 0:
                os.replace(self.tmp, self.plan.stdout_file)
            else:
                self.tmp.unlink(missing_ok=True)
        if self.error and status == 0:
            raise self.error[0] if isinstance(self.error[0], VmrtError) else VmrtError(str(self.error[0]))


class _Quiet(Exception):
    pass


def persist_seconds() -> float:
    """VMRT_SSH_PERSIST: how long a connection master outlives its last command (0: none)."""
    text = os.environ.get("VMRT_SSH_PERSIST", "")
    try:
        value = float(text) if text else 60.0
    except ValueError:
        raise VmrtError(f"VMRT_SSH_PERSIST={text!r}: expected seconds (0: no connection reuse)") from None
    return max(0.0, min(value, 24 * 3600.0))


def run(target: SshTarget, plan: Plan) -> int:
    """Run ``plan`` on ``target`` on a connection of its own; the remote command's exit status
    (vmrt/remote/mux.py runs it through a connection master instead, when it can)."""
    client = connect(target)
    try:
        return _session(client, target, plan)
    finally:
        client.close()


def start_channel(transport: Any, command: str, *, tty: bool, size: tuple[int, int], term: str) -> Any:
    """An exec channel running ``command`` (with a pty of ``size`` for -t)."""
    _tcp_options(transport)
    chan = transport.open_session(timeout=CONNECT_TIMEOUT)
    if tty:
        chan.get_pty(term=term, width=size[0], height=size[1])
    chan.exec_command(command)
    return chan


class ClientGone(Exception):
    """The local vmrt a master serves went away (its control socket closed)."""


Control: TypeAlias = Callable[[], "list[tuple[str, Any]] | None"]  # the control events, None: the client left


def _tcp_options(transport: Any) -> None:
    """Keepalives and TCP_USER_TIMEOUT on the connection's socket (a direct one: through a jump
    host it is a channel), so a dropped connection is noticed within USER_TIMEOUT_MS."""
    import socket  # imported on use: the relay alone
    sock = getattr(transport, "sock", None)
    if not isinstance(sock, socket.socket):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def _session(client: Any, target: SshTarget, plan: Plan) -> int:
    token = os.urandom(16).hex()
    first = first_frame(plan)
    try:
        chan = start_channel(client.get_transport(), remote_command(plan.tty, token), tty=plan.tty, size=window(),
                             term=os.environ.get("TERM", "xterm"))
    except Exception as e:  # paramiko's SSHException, or the transport gone: one line
        raise RemoteError(f"{target.url()}: cannot start the remote command: {e}") from None
    output = Output(plan)
    status: int | None = None
    try:
        with signals(plan.tty) as (wake_r, read_control), raw(plan.tty), stdin_source(plan) as src:
            status = relay(chan, framed=not plan.tty, token=token, first=first, src=src, out_fd=output.fd,
                           err_fd=2, control_fd=wake_r, read_control=read_control, cid=plan.cid)
    except NoSession as e:
        raise no_session(target, e.status, e.line) from None
    finally:
        try:
            output.finish(status)
        finally:
            chan.close()
    if status is None:
        raise lost(target)
    return status


def lost(target: SshTarget) -> RemoteError:
    return RemoteError(f"lost the connection to {target.url()}: the remote command's end is unknown "
                       "(the remote vmrt stops it: SIGHUP, then SIGTERM)")


@contextlib.contextmanager
def signals(tty: bool) -> Iterator[tuple[int, Control]]:
    """The signals this vmrt gets, as control events for :func:`relay` (a wakeup fd and a reader)."""
    pending: list[int] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    handled = [*FORWARDED, signal.SIGWINCH] if tty else list(FORWARDED)
    old_wake = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    old = {s: signal.signal(s, lambda signo, _f: pending.append(signo)) for s in handled}

    def read() -> list[tuple[str, Any]]:
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_r, 256):
                pass
        events: list[tuple[str, Any]] = []
        while pending:
            signo = pending.pop(0)
            events.append(("winch", window()) if signo == signal.SIGWINCH else
                          ("signal", signal.Signals(signo).name[3:]))
        return events
    try:
        yield wake_r, read
    finally:
        signal.set_wakeup_fd(old_wake)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(wake_r)
        os.close(wake_w)


def relay(chan: Any, *, framed: bool, token: str, first: bytes, src: BinaryIO | None, out_fd: int, err_fd: int,
          control_fd: int, read_control: Control, cid: CidWatch | None = None) -> int | None:
    """``first`` (the command's arguments) once the session greets, then stdin (``src``) to the
    channel, its stdout and stderr to ``out_fd`` and ``err_fd``, and the control events (signals,
    window sizes) to the remote, until the command's exit status comes (None: the channel closed
    without one, the connection is gone). :class:`ClientGone` when ``read_control`` says its side
    went away. The stdin pump has ended when this returns (``src`` may be closed then)."""
    import selectors  # imported on use: the relay alone
    sender = _Sender(chan, framed, token)
    failed: list[BaseException] = []
    stop, go = threading.Event(), threading.Event()
    wake_r, wake_w = os.pipe()
    pump = threading.Thread(target=_pump, args=(src, sender, failed, stop, go, wake_r), daemon=True)
    pump.start()
    every = ping_every()
    next_ping = time.monotonic() + every
    sel = selectors.DefaultSelector()
    sel.register(chan, selectors.EVENT_READ)
    sel.register(control_fd, selectors.EVENT_READ)
    out_ok = True
    greeting = _Greeting(cid)
    hello_out = not framed  # with a pty, stderr comes on the stdout stream
    try:
        while True:
            ready = {key.fd for key, _ in sel.select(timeout=min(1.0, every))}
            if framed and go.is_set() and time.monotonic() >= next_ping:
                with contextlib.suppress(Exception):  # the connection is going: seen below
                    if sender.ping(every):
                        next_ping = time.monotonic() + every
            if control_fd in ready:
                events = read_control()
                if events is None:
                    raise ClientGone()
                for kind, value in events:
                    try:
                        if kind == "winch":
                            chan.resize_pty(int(value[0]), int(value[1]))
                        elif kind == "signal":
                            sender.signal(str(value))
                    except Exception:  # paramiko's or the socket's: the connection is going, seen below
                        pass
            while chan.recv_ready():
                data = chan.recv(CHUNK)
                if hello_out:
                    data = greeting.feed(data)
                if out_ok and data:
                    try:
                        _write_all(out_fd, data)
                    except BrokenPipeError:  # our reader left: the rest is dropped, as ssh does
                        out_ok = False
            while chan.recv_stderr_ready():
                data = chan.recv_stderr(CHUNK)
                if not hello_out:
                    data = greeting.feed(data)
                with contextlib.suppress(BrokenPipeError):
                    _write_all(err_fd, data)
            if greeting.greeted and not go.is_set():  # the session waits for its arguments
                with contextlib.suppress(Exception):  # the connection is going: seen below
                    sender.raw(first)
                go.set()
            if chan.exit_status_ready() and (chan.eof_received or chan.closed) \
                    and not chan.recv_ready() and not chan.recv_stderr_ready():
                got = chan.exit_status
                if got >= 0 and greeting.waiting:
                    raise NoSession(int(got), greeting.last_line())
                with contextlib.suppress(OSError):  # what was held as a marker's possible start
                    _write_all(out_fd if hello_out else err_fd, greeting.flush())
                return None if got < 0 else int(got)
            if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
                time.sleep(0.3)  # paramiko closes the channels of a dead transport just before it says so
                if chan.get_transport() is not None and chan.get_transport().is_active():
                    # the connection holds: the remote command ended without a status (sshd sends
                    # exit-signal, which paramiko does not pass on, for a command a signal killed)
                    with contextlib.suppress(OSError):
                        _write_all(err_fd, b"vmrt: the remote command ended without an exit status (killed?)\n")
                    return 255
                return None
    finally:
        stop.set()
        go.set()  # a pump still waiting for the arguments: to its end
        os.write(wake_w, b"x")
        pump.join(0.5)
        if pump.is_alive():  # blocked sending to a remote that reads no more: closing ends that
            chan.close()
            pump.join(5)
        os.close(wake_r)
        os.close(wake_w)
        sel.close()
