"""Connection reuse for ``vmrt -H ssh://...``: a per-user master holding one SSH connection, as
OpenSSH's ControlMaster with ControlPersist.

The first remote command for a host starts the master (``python -m vmrt.remote.mux``, in a
session of its own): it connects (host key check, key authentication: vmrt/remote/client.py) and
listens on a unix socket in a directory of the user's alone (``$XDG_RUNTIME_DIR/vmrt``, else
``/tmp/vmrt-ssh-UID``: 0700, owned by the user, checked before use; the socket's peer must be the
same uid). Each later command connects there instead of to the host, so it imports no paramiko
and makes no key exchange; it hands the master its stdin, stdout and stderr (SCM_RIGHTS), and
the master runs the channel (client.relay) between those fds and the remote command. The local
command keeps its terminal (raw mode), its signals and window changes, which it sends as lines.

    client -> master   {"v": 1}
    master -> client   {"ready": true}, or {"stale": true} (known_hosts no longer vouches for the
                       connection's host key: the master exits, the client connects on its own)
    client -> master   {"argv", "tty", "size", "term", "token", "stdin"} + 3 fds (at most
                       MAX_REQUEST bytes: the arguments, sent as the session's data)
    master -> client   {"ok": true} or {"error": "..."} (a "bad request" the master could not
                       take: the client connects on its own instead)
    client -> master   {"signal": "TERM"} / {"winch": [cols, rows]} lines
    master -> client   {"cid": ID} (an attached run --cidfile: the remote's marker, "cid_token")
    master -> client   {"exit": N}, {"lost": true} (the connection went: exit 255), or
                       {"nosession": [N, "its last line"]} (no vmrt there, or one too old)

A client that goes away closes its channel (the remote session stops the command, as when a
connection drops). The master exits ``VMRT_SSH_PERSIST`` seconds (default 60; 0: no master)
after its last command, or when its connection goes. Authentication happens once per master:
a key removed later is not asked for again until the next master (as ControlMaster).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import re
import select
import socket
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import client as client_mod
from .client import Plan, RemoteError
from .target import SshTarget, parse_host

MAX_LINE = 1 << 16
MAX_REQUEST = 3 << 20  # the arguments (session.MAX_ARGV), as JSON's escapes may grow them


class _Fallback(Exception):
    """The master could not take this request: the command connects on its own."""


def socket_dir() -> Path | None:
    """The user's own directory for master sockets, or None when it is not safely ours."""
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    try:  # the runtime dir must be ours: another user's could swap our dir for theirs after the check
        ours = base.startswith("/") and os.lstat(base).st_uid == uid and stat.S_ISDIR(os.lstat(base).st_mode)
    except OSError:
        ours = False
    d = Path(base) / "vmrt" if ours else Path(f"/tmp/vmrt-ssh-{uid}")
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return None
    return d


def socket_path(target: SshTarget) -> Path | None:
    d = socket_dir()
    if d is None:
        return None
    # one master per host, user and HOME (its known_hosts and keys)
    key = "\0".join((target.url(), target.user or getpass.getuser(), os.environ.get("HOME", "")))
    return d / f"ssh-{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"


def _peer_ok(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        if not _peer_ok(s):
            raise OSError("the master socket's peer is another user")
    except OSError:
        s.close()
        return None
    return s


class _Lines:
    """JSON objects, one a line, from a socket; bounded."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""
        self.docs: list[dict[str, Any]] = []

    def fill(self) -> bool:
        """One recv's complete lines queued; False at EOF."""
        data = self.sock.recv(MAX_LINE)
        if not data:
            return False
        self.buf += data
        if len(self.buf) > MAX_LINE:
            raise ValueError("line too long")
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            self.docs.append(doc)
        return True

    def take(self) -> list[dict[str, Any]]:
        docs, self.docs = self.docs, []
        return docs

    def one(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while not self.docs:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0] or not self.fill():
                return None
        return self.docs.pop(0)


def _send(sock: socket.socket, doc: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(doc).encode() + b"\n"
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


# --- the client side ------------------------------------------------------------------------------

def run(target: SshTarget, plan: Plan, persist: float) -> int | None:
    """``plan`` through the master for ``target`` (started if none runs); None: no master can
    serve it (the caller connects on its own). RemoteError when starting one fails for a reason a
    connection of its own would meet too (the host key, authentication)."""
    path = socket_path(target)
    if path is None:
        return None
    sock = _connect(path)
    if sock is None:
        sock = _start_master(path, target, persist)
        if sock is None:
            return None
    with sock:
        lines = _Lines(sock)
        try:
            _send(sock, {"v": 1})
            reply = lines.one(client_mod.CONNECT_TIMEOUT)
        except (OSError, ValueError):
            return None
        if not reply or not reply.get("ready"):
            return None
        try:
            return _session(sock, lines, target, plan)
        except _Fallback:
            return None


def _start_master(path: Path, target: SshTarget, persist: float) -> socket.socket | None:
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        sock = _connect(path)  # another command started one meanwhile
        if sock is not None:
            return sock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead master's
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a session of its own, reparented to init: it outlives this command
            try:
                os.setsid()
                if os.fork() == 0:
                    null = os.open(os.devnull, os.O_RDWR)
                    for fd in (0, 1, 2):
                        os.dup2(null, fd)
                    os.set_inheritable(w, True)
                    os.execv(sys.executable, [sys.executable, "-m", "vmrt.remote.mux", str(path), target.url(),
                                              str(persist), str(w)])
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        line = b""
        deadline = time.monotonic() + 3 * client_mod.CONNECT_TIMEOUT
        with open(r, "rb", buffering=0) as f:
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                if not select.select([f], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    break
                chunk = f.read(4096)
                if not chunk:
                    break
                line += chunk
        text = line.decode(errors="replace").strip()
        if text.startswith("unknown "):
            if os.isatty(0) and os.isatty(2):
                return None  # the command connects on its own and asks, as ssh does
            raise client_mod.UnknownHostError(text[len("unknown "):])
        if text.startswith("error "):
            raise RemoteError(text[len("error "):])
        return _connect(path) if text == "ok" else None
    finally:
        os.close(lock_fd)


def _session(sock: socket.socket, lines: _Lines, target: SshTarget, plan: Plan) -> int:
    token = os.urandom(16).hex()
    output = client_mod.Output(plan)
    status: int | None = None
    try:
        with client_mod.signals(plan.tty) as (wake_r, read_signals), client_mod.raw(plan.tty), \
                client_mod.stdin_source(plan) as src, open(os.devnull, "rb") as null:
            request = {"argv": [*plan.globals_, *plan.argv], "tty": plan.tty,
                       "size": list(client_mod.window()), "term": os.environ.get("TERM", "xterm"), "token": token,
                       "stdin": src is not None, "cid_token": plan.cid.token if plan.cid else None}
            _send(sock, request, [src.fileno() if src is not None else null.fileno(), output.fd, 2])
            reply = lines.one(client_mod.CONNECT_TIMEOUT)
            if reply is None:
                raise client_mod.lost(target)
            if reply.get("error") == "bad request":  # one this master cannot take (too big, too old)
                raise _Fallback()
            if not reply.get("ok"):
                raise RemoteError(f"{target.url()}: {str(reply.get('error', 'the connection master failed'))[:500]}")
            status = _wait(sock, lines, wake_r, read_signals, target, plan.cid)
    finally:
        output.finish(status)
    return status


def _wait(sock: socket.socket, lines: _Lines, wake_r: int, read_signals: Any, target: SshTarget,
          cid: client_mod.CidWatch | None) -> int:
    while True:
        for doc in lines.take():
            got = doc.get("cid")
            if cid is not None and not cid.done and isinstance(got, str) and re.fullmatch(r"[0-9a-f]{64}", got):
                cid.done = True
                cid.found(got)
            if isinstance(doc.get("exit"), int) and not isinstance(doc["exit"], bool):
                return int(doc["exit"])
            if doc.get("lost"):
                raise client_mod.lost(target)
            got = doc.get("nosession")
            if isinstance(got, list) and len(got) == 2 and type(got[0]) is int and isinstance(got[1], str):
                raise client_mod.no_session(target, got[0], got[1])
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            for kind, value in read_signals():
                with contextlib.suppress(OSError):
                    _send(sock, {kind: value})
        if sock.fileno() in ready:
            try:
                alive = lines.fill()
            except (OSError, ValueError):
                alive = False
            if not alive and not lines.docs:
                raise client_mod.lost(target)


# --- the master ------------------------------------------------------------------------------------

class _Master:
    def __init__(self, target: SshTarget, ssh: Any, path: Path, persist: float) -> None:
        self.target, self.ssh, self.path, self.persist = target, ssh, path, persist
        self.active = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.stop = False

    def trusted(self) -> bool:
        """known_hosts still holds the key this connection was made with."""
        import paramiko  # imported on use: loaded by the connection already
        key = self.ssh.get_transport().get_remote_server_key()
        keys = paramiko.HostKeys()
        try:
            with client_mod.known_hosts_paths() as (paths, revoked):
                for path in paths:
                    with contextlib.suppress(OSError, paramiko.SSHException):
                        keys.load(path)
        except RemoteError:
            return False
        if (key.get_name(), key.get_base64()) in revoked:
            return False
        entry = keys.lookup(self.target.known_hosts_name())
        return entry is not None and entry.get(key.get_name()) == key

    def serve(self, listener: socket.socket) -> None:
        listener.settimeout(0.5)
        transport = self.ssh.get_transport()
        while not self.stop and transport.is_active():
            with self.lock:
                if self.active == 0 and time.monotonic() - self.last > self.persist:
                    return
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            if not _peer_ok(conn):
                conn.close()
                continue
            with self.lock:
                self.active += 1
            threading.Thread(target=self.one, args=(conn,), daemon=True).start()

    def one(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            with conn:
                self._one(conn, fds)
        except Exception:  # a broken client, or the connection going: that command's end
            pass
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with self.lock:
                self.active -= 1
                self.last = time.monotonic()

    def _one(self, conn: socket.socket, fds: list[int]) -> None:
        lines = _Lines(conn)
        hello = lines.one(30)
        if not hello or hello.get("v") != 1:
            return
        if not self.trusted():
            self.stop = True
            _send(conn, {"stale": True})
            return
        _send(conn, {"ready": True})
        conn.settimeout(30)
        msg, anc, _flags, _addr = conn.recvmsg(MAX_LINE, socket.CMSG_SPACE(3 * 4))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(data[:len(data) - len(data) % 4])
                fds.extend(got)
        while msg and not msg.endswith(b"\n") and len(msg) <= MAX_REQUEST:  # the rest of a long one
            more = conn.recv(MAX_LINE)
            if not more:
                break
            msg += more
        conn.settimeout(None)
        req = json.loads(msg) if msg.endswith(b"\n") and msg.count(b"\n") == 1 else None
        if not isinstance(req, dict) or len(fds) != 3 or not _valid(req):
            _send(conn, {"error": "bad request"})
            return
        try:
            first = client_mod.first_frame(Plan(argv=req["argv"]))
            command = client_mod.remote_command(req["tty"], req["token"])
            chan = client_mod.start_channel(self.ssh.get_transport(), command, tty=req["tty"],
                                            size=(req["size"][0], req["size"][1]), term=req["term"])
        except Exception as e:
            _send(conn, {"error": f"cannot start the remote command: {e}"})
            return
        _send(conn, {"ok": True})
        src = open(fds[0], "rb", buffering=0, closefd=False) if req["stdin"] else None
        events = _Lines(conn)

        def control() -> list[tuple[str, Any]] | None:
            if not events.fill():
                return None
            out: list[tuple[str, Any]] = []
            for doc in events.take():
                if isinstance(doc.get("signal"), str):
                    out.append(("signal", doc["signal"]))
                elif isinstance(doc.get("winch"), list) and len(doc["winch"]) == 2 \
                        and all(isinstance(n, int) and 0 < n < 10000 for n in doc["winch"]):
                    out.append(("winch", tuple(doc["winch"])))
            return out
        try:
            watch = None if req.get("cid_token") is None else \
                client_mod.CidWatch(req["cid_token"], lambda got: _send(conn, {"cid": got}))
            status = client_mod.relay(chan, framed=not req["tty"], token=req["token"], first=first, src=src,
                                      out_fd=fds[1],
                                      err_fd=fds[2], control_fd=conn.fileno(), read_control=control, cid=watch)
        except client_mod.ClientGone:
            return
        except client_mod.NoSession as e:
            _send(conn, {"nosession": [e.status, e.line[:1000]]})
            return
        finally:
            chan.close()
        _send(conn, {"lost": True} if status is None else {"exit": status})


def _valid(req: dict[str, Any]) -> bool:
    size = req.get("size")
    argv = req.get("argv")
    return (isinstance(argv, list) and all(isinstance(a, str) for a in argv)
            and isinstance(req.get("tty"), bool)
            and isinstance(req.get("stdin"), bool) and isinstance(req.get("term"), str)
            and len(req["term"]) < 64 and req["term"].isprintable()
            and isinstance(req.get("token"), str) and re.fullmatch(r"[0-9a-f]{32}", req["token"]) is not None
            and (req.get("cid_token") is None
                 or isinstance(req["cid_token"], str) and re.fullmatch(r"[0-9a-f]{32}", req["cid_token"]) is not None)
            and isinstance(size, list) and len(size) == 2
            and all(isinstance(n, int) and 0 < n < 10000 for n in size))


def main(argv: list[str]) -> int:
    path, url, persist, ready = Path(argv[0]), argv[1], float(argv[2]), int(argv[3])
    target = parse_host(url)
    os.chdir("/")  # it outlives the command: no directory of the caller's held busy
    try:
        ssh = client_mod.connect(target)
    except RemoteError as e:
        kind = "unknown" if isinstance(e, client_mod.UnknownHostError) else "error"
        os.write(ready, f"{kind} {e}\n".encode())
        return 255
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError:
        os.write(ready, b"busy\n")
        return 1
    ino = os.stat(path).st_ino
    listener.listen(16)
    os.write(ready, b"ok\n")
    os.close(ready)
    master = _Master(client_mod.resolve(target)[0], ssh, path, persist)  # known_hosts names the real host
    try:
        master.serve(listener)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ino:
                os.unlink(path)
        listener.close()
        deadline = time.monotonic() + 5
        while master.active and time.monotonic() < deadline:  # those still running learn the end
            time.sleep(0.05)
        ssh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
