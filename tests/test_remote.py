"""vmrt -H ssh://... against a real sshd (issue 21 parts 3-4).

The fixture starts Debian's OpenSSH server (/usr/sbin/sshd -D -e -f CONFIG) on a free loopback
port with its own generated host key, sshd_config, PidFile and AuthorizedKeysFile in the test's
temp dir (root login by key only, no PAM), and ``SetEnv`` of the private vmrt's environment, so
the remote ``vmrt`` works in the test's own state root, and a PATH whose first ``vmrt`` is this
checkout's (``/usr/local/bin/vmrt`` names whichever checkout ran setup.sh last). The client side is the real CLI with a
HOME of its own (a generated key, a known_hosts the test writes, no ssh-agent, no VMRT_* of its
own). sshd and its per-connection children are stopped after. sshd needs /run/sshd (its
privilege separation dir): made if missing, as Debian's unit does. A few tests start a second
sshd of the same kind for themselves: one whose PATH has no vmrt (or a vmrt from before the
session protocol), and one as a ProxyJump host (PermitOpen to the first, ForceCommand /bin/false).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt, one_line_error, track

from vmrt.errors import UsageError, VmrtError
from vmrt.remote import contexts
from vmrt.remote.routing import route
from vmrt.remote.target import SshTarget, parse_host

SSHD = Path("/usr/sbin/sshd")


# --- parsing and routing: no sshd, no root --------------------------------------------------------

@pytest.mark.parametrize("url, want", [
    ("ssh://h", SshTarget("h", 22, None)),
    ("ssh://u@h.example:2222", SshTarget("h.example", 2222, "u")),
    ("ssh://root@127.0.0.1:22/", SshTarget("127.0.0.1", 22, "root")),
    ("ssh://[::1]:2200", SshTarget("::1", 2200, None)),
])
def test_parse_host(url: str, want: SshTarget) -> None:
    assert parse_host(url) == want
    assert parse_host(want.url()) == want


@pytest.mark.parametrize("url", [
    "h", "tcp://h:2375", "unix:///run/vmrt.sock", "ssh://", "ssh://-oProxyCommand=x", "ssh://h:0", "ssh://h:65536",
    "ssh://h:22x", "ssh://u;id@h", "ssh://h/path", "ssh://[::1", "ssh://[nothost]:22", "ssh://h h", "ssh://-u@h",
    "ssh://h:-1", "ssh://$(id)", "ssh://h\n", "ssh://" + "a" * 300,
])
def test_parse_host_refuses(url: str) -> None:
    with pytest.raises(UsageError):
        parse_host(url)


def test_route_precedence(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert route(["ps"], env).target is None
    r = route(["--debug", "-H", "ssh://a", "ps", "-a"], env)
    assert r.target == SshTarget("a") and r.argv == ["ps", "-a"] and r.globals_ == ["--debug"]
    assert route(["--host=ssh://b:2", "ps"], {**env, "VMRT_HOST": "ssh://c"}).target == SshTarget("b", 2)
    assert route(["ps"], {**env, "VMRT_HOST": "ssh://c"}).target == SshTarget("c")
    contexts.create("far", "ssh://u@far:2022", "d", env)
    assert route(["--context", "far", "ps"], env).target == SshTarget("far", 2022, "u")
    assert route(["ps"], {**env, "VMRT_CONTEXT": "far"}).target == SshTarget("far", 2022, "u")
    contexts.use("far", env)
    assert route(["ps"], env).target == SshTarget("far", 2022, "u")
    assert route(["ps"], {**env, "VMRT_HOST": "ssh://c"}).target == SshTarget("c")  # VMRT_HOST wins
    assert route(["-c", "default", "ps"], env).target is None
    assert route(["context", "ls"], env).target is None  # contexts are managed here
    assert route(["ps", "-H", "ssh://x"], env).target == SshTarget("far", 2022, "u")  # after the command: its own
    with pytest.raises(UsageError):
        route(["-H", "ssh://a", "-c", "far", "ps"], env)
    with pytest.raises(UsageError):
        route(["--remote-session=pty:; rm -rf /", "ps"], env)
    d = contexts.store_dir(env)
    assert d.stat().st_mode & 0o777 == 0o700 and (d / "far.json").stat().st_mode & 0o777 == 0o600


def test_context_files_are_data(tmp_path: Path) -> None:
    """A planted link or junk in the context store is an error, never followed."""
    env = {"HOME": str(tmp_path)}
    d = contexts.store_dir(env)
    d.mkdir(parents=True)
    (tmp_path / "elsewhere.json").write_text('{"Name": "x", "Host": "ssh://evil"}')
    (d / "x.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(Exception, match="x.json"):
        contexts.load("x", env)
    (d / "y.json").write_text('{"Name": "y", "Host": "ssh://-oProxyCommand=sh"}')
    with pytest.raises(UsageError):
        contexts.load("y", env)
    with pytest.raises(UsageError):
        contexts.load("../../etc/passwd", env)


def test_internal_children_never_route(tmp_path: Path) -> None:
    """vmrt's own children (vmrt.proc.vmrt_here: a service's builds, the pool daemon, the snapshot
    builder, probes) run here whatever VMRT_HOST or the current context says."""
    from vmrt.proc import HERE, vmrt_here
    env = {"HOME": str(tmp_path), "VMRT_HOST": "ssh://far"}
    contexts.create("far", "ssh://u@far:2022", "d", env)
    contexts.use("far", env)
    argv = vmrt_here("build", "-q", "-")
    assert argv[3] == HERE
    r = route(argv[3:], env)
    assert r.target is None and r.session is None and r.argv == ["build", "-q", "-"]
    assert route(["build", "-q", "-"], env).target == SshTarget("far")


def test_ssh_config_match_blocks_are_dropped_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Match block's options (up to the next Host or Match) never reach the block before it or
    every host; Include lines are not read."""
    from vmrt.remote import client
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        "Host a\n  HostName 127.0.0.2\n"
        "Match exec \"touch /tmp/x\"\n  User nobody\n  Port 2222\n  IdentityFile /etc/hostname\n"
        "Match = all\n  ProxyJump evil\n"
        "Include /etc/passwd\n"
        "Host b\n  User bee\n"
        "Host *\n  Port 2200\n")
    assert client.resolve(SshTarget("a")) == (SshTarget("127.0.0.2", 2200, None), [])
    assert client._lookup(SshTarget("a"))[2] == []
    assert client.resolve(SshTarget("b"))[0] == SshTarget("b", 2200, "bee")
    # an IPv6 HostName (bracketed for the URL parser)
    (tmp_path / ".ssh" / "config").write_text("Host six\n  HostName ::1\n  Port 2201\n")
    assert client.resolve(SshTarget("six"))[0] == SshTarget("::1", 2201, None)


def test_the_remote_command_line_holds_no_argument() -> None:
    """What sshd runs (and every user of the remote host reads in /proc/PID/cmdline) is fixed
    tokens; the arguments are the session's first frame, bounded."""
    from vmrt.remote import client, session
    token = "ab" * 16
    plan = client.Plan(argv=["run", "--env=SECRET=hunter2", "busybox", "a b;$(x)"], globals_=["--debug"])
    assert client.remote_command(False, token) == f"vmrt --remote-session=framed:{token}"
    assert client.remote_command(True, token) == f"vmrt --remote-session=pty:{token}"
    with pytest.raises(ValueError):
        client.remote_command(False, "; rm -rf /")
    r, w = os.pipe()
    os.write(w, client.first_frame(plan) + b"D\0\0\0\1x")
    assert session.read_argv(r) == ["--debug", *plan.argv]
    assert os.read(r, 100) == b"D\0\0\0\1x"  # nothing past the frame read
    os.close(w)
    os.close(r)
    for bad in (session.frame(b"D", b"run"), session.HEADER.pack(b"A", session.MAX_ARGV + 1), b"A\0"):
        r, w = os.pipe()
        os.write(w, bad)
        os.close(w)
        with pytest.raises(UsageError):
            session.read_argv(r)
        os.close(r)
    with pytest.raises(VmrtError, match="NUL"):
        client.first_frame(client.Plan(argv=["run", "a\0b"]))
    with pytest.raises(VmrtError):
        client.first_frame(client.Plan(argv=["x" * (session.MAX_ARGV + 1)]))
    assert route([f"--remote-session=framed:{token}"], {}).session == f"framed:{token}"
    with pytest.raises(UsageError):
        route(["--remote-session=framed", "run", "x"], {})


def test_cp_tar_is_made_without_following_links(tmp_path: Path) -> None:
    """cp LOCAL C:PATH's tar: links go as links, fifos are left out, and a file swapped for a link
    between its lstat and its open is refused, never read through."""
    import io
    import tarfile

    from vmrt.remote import localfiles
    secret = tmp_path / "secret"
    secret.write_text("not to be sent")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("data")
    (src / "out").symlink_to(secret)
    os.mkfifo(src / "fifo")
    buf = io.BytesIO()
    localfiles.copy_tar(src, "src", buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        got = {m.name: m for m in tf.getmembers()}
        assert set(got) == {"src", "src/sub", "src/sub/f", "src/out"}
        assert got["src/out"].issym() and got["src/out"].linkname == str(secret)
        assert tf.extractfile("src/sub/f").read() == b"data"  # type: ignore[union-attr]
    assert b"not to be sent" not in buf.getvalue()
    buf = io.BytesIO()
    localfiles.copy_tar(src / "out", "out", buf)  # a link named itself: sent as the link
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert [m.name for m in tf.getmembers() if m.issym()] == ["out"]
    # the race: lstat saw a file, a link to the secret is there by the open
    victim = src / "sub" / "f"
    st = os.lstat(victim)
    victim.unlink()
    victim.symlink_to(secret)
    dfd = os.open(src / "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with tarfile.open(fileobj=io.BytesIO(), mode="w|") as tf, pytest.raises(OSError):
            localfiles._add(tf, dfd, "f", st, "src/sub/f")  # O_NOFOLLOW: ELOOP
    finally:
        os.close(dfd)


def test_known_hosts_markers(tmp_path: Path) -> None:
    """@cert-authority and @revoked lines (paramiko raises on them) and an undecodable key are
    taken out; @revoked keys are told."""
    from vmrt.remote import client
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "k"], check=True)
    typ, b64 = (tmp_path / "k.pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"# c\n@cert-authority *.example {typ} {b64}\n@revoked * {typ} {b64}\n"
                  f"bad ssh-ed25519 !!notbase64!!\nh1 {typ} {b64}\n\n")
    text, revoked = client.known_hosts_text(kh)
    assert text == f"h1 {typ} {b64}\n" and revoked == {(typ, b64)}


@pytest.mark.root  # chown to another user
def test_files_others_may_write_are_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A context file or store dir, ~/.ssh/config or known_hosts that group or others may write (or
    another user owns) is refused, as OpenSSH's StrictModes."""
    from vmrt.remote import client
    env = {"HOME": str(tmp_path)}
    contexts.create("c", "ssh://h", "", env)
    d = contexts.store_dir(env)
    assert contexts.load("c", env).host == "ssh://h"
    for path, mode in ((d / "c.json", 0o620), (d, 0o777)):
        old = path.stat().st_mode & 0o777
        os.chmod(path, mode)
        with pytest.raises(VmrtError, match="not trusted"):
            contexts.load("c", env)
        os.chmod(path, old)
    os.chown(d / "c.json", 12345, 12345)
    with pytest.raises(VmrtError, match="not trusted"):
        contexts.load("c", env)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    for name in ("config", "known_hosts"):
        f = tmp_path / ".ssh" / name
        f.write_text("Host h\n  Port 2200\n" if name == "config" else "")
        os.chmod(f, 0o666)
        with pytest.raises(client.RemoteError, match="bad owner or permissions"):
            if name == "config":
                client.resolve(SshTarget("h"))
            else:
                client.known_hosts_text(f)
        os.chmod(f, 0o600)
    assert client.resolve(SshTarget("h"))[0] == SshTarget("h", 2200)


# --- a real sshd ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(entry))
    return kids


class Sshd:
    def __init__(self, base: Path, v: Vmrt, path: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.base, self.port = base, _free_port()
        self.url = f"ssh://root@127.0.0.1:{self.port}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", base / "host_key"], check=True)
        self.home = base / "home"
        (self.home / ".ssh").mkdir(parents=True, mode=0o700)
        self.runtime = base / "run"  # XDG_RUNTIME_DIR: the connection masters' sockets
        self.runtime.mkdir(mode=0o700)
        key = self.home / ".ssh" / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        (base / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        self.host_key_line = f"[127.0.0.1]:{self.port} " + " ".join((base / "host_key.pub").read_text().split()[:2])
        self.trust()
        env = {k: val for k, val in v.env.items() if k.startswith("VMRT_")}
        env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        if path is None:  # this checkout's vmrt first (/usr/local/bin/vmrt is whichever ran setup.sh last)
            (base / "bin").mkdir()
            (base / "bin" / "vmrt").write_text(f'#!/bin/sh\nexec {sys.executable} -m vmrt "$@"\n')
            (base / "bin" / "vmrt").chmod(0o755)
            path = f"{base / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env["PATH"] = path  # the remote shell's PATH (a host without vmrt, or with another one)
        (base / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {base / 'host_key'}",
            f"PidFile {base / 'sshd.pid'}", f"AuthorizedKeysFile {base / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "PrintMotd no", "LogLevel VERBOSE",
            "SetEnv " + " ".join(f"{k}={val}" for k, val in sorted(env.items())), *extra, ""]))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.log = open(base / "sshd.log", "wb")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", base / "sshd_config"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, (base / "sshd.log").read_text()
                time.sleep(0.05)

    def trust(self, line: str | None = None) -> None:
        (self.home / ".ssh" / "known_hosts").write_text((line or self.host_key_line) + "\n")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: val for k, val in os.environ.items()
               if not k.startswith(("VMRT_", "SSH_AUTH_SOCK", "XDG_CONFIG_HOME"))}
        return {**env, "HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.runtime), "PYTHONUNBUFFERED": "1", **extra}

    def cmd(self, *args: str, host: bool = True) -> list[str]:
        return [sys.executable, "-m", "vmrt", *(["-H", self.url] if host else []), *args]

    def __call__(self, *args: str, input: bytes | None = None, host: bool = True, timeout: float = 180,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.cmd(*args, host=host), input=input, capture_output=True, timeout=timeout,
                              env=self.env(**(env or {})), stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return track(subprocess.Popen(self.cmd(*args), env=self.env(), **kw))  # type: ignore[call-overload]

    def connections(self) -> list[int]:
        """sshd's per-connection children (each the privileged monitor of one client)."""
        return _children(self.proc.pid)

    def masters(self) -> list[int]:
        """The connection masters of this sshd's clients (vmrt/remote/mux.py)."""
        return [pid for pid, args in _processes() if b"vmrt.remote.mux" in args[:3]
                and any(a.startswith(str(self.runtime).encode()) for a in args)]

    def close(self) -> None:
        kids = self.connections()
        self.proc.terminate()
        self.proc.wait(10)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.log.close()


@pytest.fixture(scope="module")
def sshd(vmrt_session: Vmrt, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed (setup.sh installs it)")
    s = Sshd(tmp_path_factory.mktemp("sshd"), vmrt_session)
    yield s
    s.close()
    deadline = time.monotonic() + 10
    while (s.masters() or _sessions()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = s.masters()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "connection masters outlived their connection"
    assert not _sessions(), "remote sessions left running"


def _processes() -> Iterator[tuple[int, list[bytes]]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue


def _sessions() -> list[int]:
    """vmrt processes serving a remote session (their first argument says so)."""
    return [pid for pid, args in _processes() if any(a.startswith(b"--remote-session") for a in args[:4])]


def _read_until(f: object, want: bytes, timeout: float = 60) -> bytes:
    """Read a pipe (a Popen's stdout) or a pty master fd until ``want`` shows up."""
    fd = f if isinstance(f, int) else f.fileno()  # type: ignore[attr-defined]
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {want!r} in {got!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # a pty master whose other side is closed
                chunk = b""
            assert chunk, f"EOF before {want!r}: {got!r}"
            got += chunk
    return got


def test_run_exit_codes_and_streams(vmrt: Vmrt, sshd: Sshd) -> None:
    r = sshd("run", "--rm", "--isolation=process", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = sshd("run", "--rm", "--isolation=process", "busybox", "true")
    assert r.returncode == 0, r.stderr
    r = sshd("run", "--rm", "--isolation=process", "busybox", "no-such-command")
    assert r.returncode == 127 and "no-such-command" in one_line_error(r.stderr)
    r = sshd("run", "--no-such-flag", "busybox")
    assert r.returncode == 125 and "--no-such-flag" in one_line_error(r.stderr)
    # an argument the remote shell would split or expand arrives as it is
    tricky = "a b;$(echo no)'\"`x`*\\"
    r = sshd("run", "--rm", "--isolation=process", "busybox", "echo", tricky)
    assert r.returncode == 0 and r.stdout == tricky.encode() + b"\n", r.stderr
    # it ran in the private vmrt the remote session's environment names: nothing left there
    assert vmrt("ps", "-aq").stdout == b""


def test_stdin_piped(vmrt: Vmrt, sshd: Sshd) -> None:
    data = os.urandom(300_000)  # several frames
    r = sshd("run", "--rm", "-i", "--isolation=process", "busybox", "md5sum", input=data)
    assert r.returncode == 0, r.stderr
    import hashlib
    assert r.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()
    # without -i the container's stdin is empty, as Docker's
    r = sshd("run", "--rm", "--isolation=process", "busybox", "wc", "-c", input=b"not for it")
    assert r.returncode == 0 and r.stdout.split()[0] == b"0", r.stderr


def _winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_tty_window_size_and_ctrl_c(vmrt: Vmrt, sshd: Sshd) -> None:
    master, slave = os.openpty()
    _winsize(slave, 33, 101)

    def controlling_tty() -> None:  # the pty is the local vmrt's terminal: SIGWINCH comes to it
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    script = ("stty size; echo ready; read x; stty size; trap 'echo got INT; exit 7' INT; echo armed; "
              "while :; do sleep 0.2; done")
    p = track(subprocess.Popen(sshd.cmd("run", "-it", "--rm", "--isolation=process", "busybox", "sh", "-c", script),
                               stdin=slave, stdout=slave, stderr=slave, env=sshd.env(TERM="xterm"),
                               start_new_session=True, preexec_fn=controlling_tty))
    os.close(slave)
    try:
        got = _read_until(master, b"ready")
        assert b"33 101" in got
        _winsize(master, 40, 120)  # the terminal resized: SIGWINCH to the local vmrt
        time.sleep(1.0)
        os.write(master, b"go\r")
        got = _read_until(master, b"armed")
        assert b"40 120" in got
        os.write(master, b"\x03")  # Ctrl-C: the byte, the container's terminal makes it SIGINT
        got = _read_until(master, b"got INT")
        assert p.wait(60) == 7
    finally:
        os.close(master)


def test_signals_reach_the_container(vmrt: Vmrt, sshd: Sshd) -> None:
    for sig, code in ((signal.SIGTERM, 42), (signal.SIGINT, 43)):
        name = signal.Signals(sig).name[3:]
        p = sshd.popen("run", "--rm", "--isolation=process", "busybox", "sh", "-c",
                       f"trap 'echo got {name}; exit {code}' {name}; echo ready; sleep 100 & wait")
        _read_until(p.stdout, b"ready")
        p.send_signal(sig)  # to the local vmrt
        assert p.wait(60) == code
        assert p.stdout is not None and b"got " + name.encode() in p.stdout.read()


def test_cp_both_ways(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "f").write_bytes(b"nested\n")
    (tmp_path / "one.txt").write_bytes(b"one\n")
    r = sshd("run", "-d", "--name", "rcp", "--isolation=process", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    try:
        # LOCAL -> container: the local file is read here (the remote host has no such path)
        assert sshd("cp", str(tmp_path / "one.txt"), "rcp:/tmp/").returncode == 0
        assert sshd("cp", str(tmp_path / "one.txt"), "rcp:/tmp/renamed").returncode == 0
        assert sshd("cp", str(local), "rcp:/tmp/").returncode == 0
        r = vmrt("exec", "rcp", "cat", "/tmp/one.txt", "/tmp/renamed", "/tmp/local/sub/f")
        assert r.stdout == b"one\none\nnested\n", r.stderr
        r = sshd("cp", str(tmp_path / "missing"), "rcp:/tmp/")
        assert r.returncode == 125 and "could not find" in one_line_error(r.stderr)
        # container -> LOCAL
        out = tmp_path / "out"
        out.mkdir()
        assert sshd("cp", "rcp:/tmp/one.txt", str(out)).returncode == 0
        assert sshd("cp", "rcp:/tmp/local", str(out / "tree")).returncode == 0
        assert (out / "one.txt").read_bytes() == b"one\n"
        assert (out / "tree" / "sub" / "f").read_bytes() == b"nested\n"
        r = sshd("cp", "rcp:/no/such", str(out))
        assert r.returncode != 0 and "no such file" in one_line_error(r.stderr)
        assert sorted(p.name for p in out.iterdir()) == ["one.txt", "tree"]  # no temporary left
        # a tar stream, as Docker's cp -
        r = sshd("cp", "rcp:/tmp/one.txt", "-")
        assert r.returncode == 0 and b"one\n" in r.stdout
        # exec -i: stdin through to a running container
        r = sshd("exec", "-i", "rcp", "sh", "-c", "cat > /tmp/piped; wc -c < /tmp/piped", input=b"x" * 70000)
        assert r.returncode == 0 and r.stdout.strip() == b"70000", r.stderr
    finally:
        assert vmrt("rm", "-f", "rcp").returncode == 0


def test_save_and_load_through_the_remote(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    tar = tmp_path / "busybox.tar"
    r = sshd("save", "-o", str(tar), "busybox")
    assert r.returncode == 0, r.stderr
    piped = sshd("save", "busybox")
    assert piped.returncode == 0 and piped.stdout == tar.read_bytes()
    assert vmrt("tag", "busybox", "remote-test:one").returncode == 0
    r = sshd("save", "-o", str(tmp_path / "x.tar"), "remote-test:one")
    assert r.returncode == 0
    assert vmrt("rmi", "remote-test:one").returncode == 0
    r = sshd("load", "-i", str(tmp_path / "x.tar"))
    assert r.returncode == 0 and b"remote-test:one" in r.stdout, r.stderr
    assert vmrt("rmi", "remote-test:one").returncode == 0
    r = sshd("load", input=(tmp_path / "x.tar").read_bytes())
    assert r.returncode == 0 and b"remote-test:one" in r.stdout, r.stderr
    assert vmrt("rmi", "remote-test:one").returncode == 0
    r = sshd("save", "-o", str(tmp_path / "none.tar"), "no-such-image")
    assert r.returncode == 125 and not (tmp_path / "none.tar").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_contexts_and_vmrt_host(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    cfg = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    r = sshd("context", "create", "far", "--host", sshd.url, "--description", "the test's sshd", host=False, env=cfg)
    assert r.returncode == 0, r.stderr
    r = sshd("context", "ls", host=False, env=cfg)
    assert b"far" in r.stdout and sshd.url.encode() in r.stdout and b"default *" in r.stdout
    marker = str(vmrt.root).encode()
    # through the context: `info` names the remote's (the private vmrt's) state root
    assert marker in sshd("--context", "far", "info", host=False, env=cfg).stdout
    assert sshd("context", "use", "far", host=False, env=cfg).returncode == 0
    assert marker in sshd("info", host=False, env=cfg).stdout
    r = sshd("context", "rm", "far", host=False, env=cfg)
    assert r.returncode == 125 and "in use" in one_line_error(r.stderr)
    assert sshd("context", "use", "default", host=False, env=cfg).returncode == 0
    assert marker not in sshd("info", host=False, env=cfg).stdout
    assert sshd("context", "rm", "far", host=False, env=cfg).returncode == 0
    assert b"far" not in sshd("context", "ls", host=False, env=cfg).stdout
    # VMRT_HOST
    assert marker in sshd("info", host=False, env={**cfg, "VMRT_HOST": sshd.url}).stdout
    r = sshd("info", host=False, env={**cfg, "VMRT_HOST": "tcp://127.0.0.1:2375"})
    assert r.returncode == 125 and "ssh://" in one_line_error(r.stderr)


def test_host_keys(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    try:
        # a changed key: refused loudly
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "other"], check=True)
        other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
        sshd.trust(f"[127.0.0.1]:{sshd.port} {other}")
        r = sshd("ps")
        assert r.returncode == 255 and "CHANGED" in one_line_error(r.stderr)
        cfg = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
        r = sshd("context", "create", "x", "--host", sshd.url, "--accept-host-key", host=False, env=cfg)
        assert r.returncode == 255 and "CHANGED" in one_line_error(r.stderr)
        # an unknown host: refused, with how to accept it
        sshd.trust("# nothing known")
        r = sshd("ps")
        line = one_line_error(r.stderr)
        assert r.returncode == 255 and "not known" in line and "ssh-keyscan" in line and "SHA256:" in line
        # accepted on request: the key learned, then used
        r = sshd("context", "create", "x", "--host", sshd.url, "--accept-host-key", host=False, env=cfg)
        assert r.returncode == 0, r.stderr
        assert sshd.host_key_line.split()[2] in (sshd.home / ".ssh" / "known_hosts").read_text()
        assert sshd("ps").returncode == 0
        # no key the server takes: refused, never a password prompt
        key = sshd.home / ".ssh" / "id_ed25519"
        key.rename(tmp_path / "key")
        try:  # (a connection master authenticated once, as ssh's ControlMaster: none for this one)
            r = sshd("ps", env={"VMRT_SSH_PERSIST": "0"})
            assert r.returncode == 255 and "permission denied" in one_line_error(r.stderr)
        finally:
            (tmp_path / "key").rename(key)
        # nothing listening
        r = subprocess.run([sys.executable, "-m", "vmrt", "-H", f"ssh://127.0.0.1:{_free_port()}", "ps"],
                           capture_output=True, env=sshd.env(), timeout=60)
        assert r.returncode == 255 and "cannot connect" in one_line_error(r.stderr)
    finally:
        sshd.trust()


@pytest.mark.parametrize("answer", [b"no", b"yes"])
def test_unknown_host_asks_on_a_terminal(vmrt: Vmrt, sshd: Sshd, answer: bytes) -> None:
    """As ssh: on a terminal an unknown host's fingerprint is shown and "yes" accepts it."""
    master, slave = os.openpty()
    sshd.trust("# nothing known")
    try:
        p = track(subprocess.Popen(sshd.cmd("ps", "-q"), stdin=slave, stdout=slave, stderr=slave, env=sshd.env(),
                                   start_new_session=True))
        os.close(slave)
        got = _read_until(master, b"(yes/no)?")
        assert b"SHA256:" in got and f"[127.0.0.1]:{sshd.port}".encode() in got
        os.write(master, answer + b"\n")
        assert p.wait(60) == (0 if answer == b"yes" else 255)
        known = (sshd.home / ".ssh" / "known_hosts").read_text()
        assert (sshd.host_key_line.split()[2] in known) == (answer == b"yes")
    finally:
        os.close(master)
        sshd.trust()


@pytest.mark.parametrize("persist, tty", [("60", False), ("0", False), ("60", True)],
                         ids=["master", "own-connection", "master-tty"])
def test_dropped_connection(vmrt: Vmrt, sshd: Sshd, persist: str, tty: bool) -> None:
    """(-t: sshd's pty hangs up, and the container's PID 1, a shell, ignores the SIGHUP: the remote
    session goes on to SIGTERM and the container's stop grace)"""
    p = track(subprocess.Popen(sshd.cmd("run", "--rm", *(["-t"] if tty else []), "--name", "dropped",
                                        "--isolation=process", "busybox", "sh", "-c", "echo ready; sleep 300"),
                               env=sshd.env(VMRT_SSH_PERSIST=persist), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    _read_until(p.stdout, b"ready")
    conns = sshd.connections()
    assert conns
    for pid in conns:  # the connection goes (sshd's per-connection processes killed)
        os.kill(pid, signal.SIGKILL)
    assert p.wait(60) == 255
    assert p.stderr is not None
    assert "lost the connection" in one_line_error(p.stderr.read())
    # the remote vmrt sees the end of its session: the container is stopped and --rm removes it
    deadline = time.monotonic() + 60
    while b"dropped" in vmrt("ps", "-a", "--format", "{{.Names}}").stdout or _sessions():
        assert time.monotonic() < deadline, "the remote container is still there"
        time.sleep(0.5)


def test_connection_reuse(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    """One connection master per host and user: later commands reuse its connection."""
    assert sshd("ps").returncode == 0
    masters = sshd.masters()
    assert masters
    conns = sshd.connections()
    for _ in range(2):
        r = sshd("run", "--rm", "--isolation=process", "busybox", "sh", "-c", "exit 6")
        assert r.returncode == 6, r.stderr
    assert sshd.connections() == conns and sshd.masters() == masters
    d = sshd.runtime / "vmrt"
    assert d.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o077 == 0 for p in d.iterdir())
    # a socket dir that is not safely ours is not used: the command makes its own connection
    for hostile in ("mode", "link"):
        runtime = tmp_path / hostile
        runtime.mkdir()
        if hostile == "mode":
            (runtime / "vmrt").mkdir(mode=0o777)
            os.chmod(runtime / "vmrt", 0o777)
        else:
            (tmp_path / "elsewhere").mkdir(mode=0o700)
            (runtime / "vmrt").symlink_to(tmp_path / "elsewhere")
        r = sshd("ps", env={"XDG_RUNTIME_DIR": str(runtime)})
        assert r.returncode == 0, r.stderr
        assert not list((tmp_path / "elsewhere").iterdir()) if hostile == "link" else \
            not list((runtime / "vmrt").iterdir())
    assert sshd.masters() == masters


def test_ssh_config_names_the_host(vmrt: Vmrt, sshd: Sshd) -> None:
    """~/.ssh/config's HostName, Port and User of a Host block; nothing that runs a command."""
    cfg = sshd.home / ".ssh" / "config"
    cfg.write_text(f"Host far-alias\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
                   f"  ProxyCommand touch {sshd.base}/proxy-ran\n"
                   f"Match exec \"touch {sshd.base}/match-ran\"\n  User nobody\n")
    try:
        for persist in ("60", "0"):
            r = sshd("run", "--rm", "--isolation=process", "busybox", "echo", "via alias", host=False,
                     env={"VMRT_HOST": "ssh://far-alias", "VMRT_SSH_PERSIST": persist})
            assert (r.returncode, r.stdout) == (0, b"via alias\n"), r.stderr
        assert not (sshd.base / "proxy-ran").exists() and not (sshd.base / "match-ran").exists()
    finally:
        cfg.unlink()


@pytest.mark.parametrize("junk, said", [
    (b"D\xff\xff\xff\xff", b"bad frame"), (b"X\x00\x00\x00\x00", b"bad frame"),
    (b"S\x00\x00\x00\x04KILL", b"bad frame"), (b"P\x00\x00\x00\x030.2", b"no word from the client")],
    ids=["oversized", "unknown-type", "signal-not-forwarded", "ping-then-silence"])
def test_bad_frames_stop_the_session(vmrt: Vmrt, sshd: Sshd, junk: bytes, said: bytes,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The remote session's parent parses the client's frames with bounds: junk is one line and the
    end of the command (as a hang-up), never a signal it does not forward or a huge buffer. A
    client that said it pings and then falls silent for 3 intervals (a connection dropped without
    a FIN) is a hang-up too."""
    from vmrt.remote import client, session
    monkeypatch.setenv("HOME", str(sshd.home))
    ssh = client.connect(parse_host(sshd.url))
    try:
        chan = ssh.get_transport().open_session()
        chan.exec_command(client.remote_command(False, os.urandom(16).hex()))
        err = b""
        deadline = time.monotonic() + 60
        while session.HELLO not in err and time.monotonic() < deadline:
            err += chan.recv_stderr(4096)
        chan.sendall(session.argv_frame(["run", "--rm", "--isolation=process", "busybox", "sh", "-c",
                                         'trap "echo got HUP; exit 9" HUP; echo ready; sleep 100 & wait']))
        got = b""
        while b"ready" not in got and time.monotonic() < deadline:
            got += chan.recv(4096)
        chan.sendall(junk)
        assert chan.recv_exit_status() == 9
        err = b""
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(4096)
        assert said in err
    finally:
        ssh.close()


def test_vm_isolation(vmrt: Vmrt, sshd: Sshd) -> None:
    r = sshd("run", "--rm", "--isolation=vm", "busybox", "sh", "-c", "echo in a vm; exit 5", timeout=300)
    assert (r.returncode, r.stdout) == (5, b"in a vm\n"), r.stderr


# --- local files: build contexts, --env-file (issue 21 part 3) ------------------------------------

def _context(tmp_path: Path) -> Path:
    """A build context with files .dockerignore keeps out (one let back in by an exception), a link
    inside it and a link out of it, and a secret outside it."""
    ctx = tmp_path / "ctx"
    for rel, data in (("a.txt", "a\n"), ("sub/b.txt", "b\n"), ("secret.txt", "s3cr3t value\n"), ("logs/x.log", "x\n"),
                      ("logs/keep.txt", "keep\n")):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(data)
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY . /ctx/\n")
    (ctx / ".dockerignore").write_text("secret.txt\nlogs\n!logs/keep.txt\n")
    (ctx / "link").symlink_to("a.txt")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "key").write_text("not for the remote\n")
    return ctx


def test_build_context_tar_is_made_here(tmp_path: Path) -> None:
    """The tar of a local context: what .dockerignore excludes never goes, a link goes as a link
    (one out of the context is never followed: what it names is not read), the Dockerfile goes
    under a name of its own that the sent .dockerignore keeps from COPY."""
    import io
    import tarfile

    from vmrt.images.dockerfile import Ignore
    from vmrt.remote import localfiles
    ctx = _context(tmp_path)
    (ctx / "out").symlink_to("../outside")
    (ctx / "keyfile").symlink_to(tmp_path / "outside" / "key")
    os.mkfifo(ctx / "fifo")  # never opened (a reader would block)
    made = localfiles.build_context(str(ctx), None)
    buf = io.BytesIO()
    made.write(buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        members = {m.name: m for m in tf.getmembers()}
        data = {n: tf.extractfile(m).read() for n, m in members.items() if m.isfile()}  # type: ignore[union-attr]
    hidden = made.dockerfile_name
    assert hidden.startswith(".vmrt-dockerfile-") and hidden.endswith("/Dockerfile")
    assert sorted(members) == sorted(["Dockerfile", "a.txt", "sub", "sub/b.txt", "logs/keep.txt", "link", "out",
                                      "keyfile", ".dockerignore", hidden])
    assert members["out"].issym() and members["out"].linkname == "../outside"
    assert members["keyfile"].issym()
    assert all(b"not for the remote" not in d and b"s3cr3t" not in d for d in data.values())
    assert data[hidden] == (ctx / "Dockerfile").read_bytes()
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    sent = Ignore(data[".dockerignore"].decode())
    assert sent.excluded(hidden) and sent.excluded("secret.txt") and not sent.excluded("logs/keep.txt")
    # unreadable: one line before anything is sent (root reads all: a directory it cannot enter
    # is a file where a directory was)
    with pytest.raises(UsageError, match="unable to prepare context"):
        localfiles.build_context(str(tmp_path / "nope"), None)
    with pytest.raises(UsageError, match="unable to read the Dockerfile"):
        localfiles.build_context(str(ctx), str(tmp_path / "no.Dockerfile"))


def test_remote_argv_names_no_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What goes to the remote for build CONTEXT, --iidfile and --env-file: no local path."""
    from vmrt.cli import main
    from vmrt.cli.remote import plan
    ctx = _context(tmp_path)
    envf = tmp_path / "env"
    envf.write_text("A=1\n# a comment\n  FROM_HERE  \nC=x y\n")
    monkeypatch.setenv("FROM_HERE", "local value")
    monkeypatch.setenv("ARG_HERE", "arg value")
    monkeypatch.delenv("UNSET_HERE", raising=False)

    def sent(*argv: str) -> list[str]:
        return plan(main, route(["-H", "ssh://h", *argv], os.environ)).argv
    got = sent("build", "-t", "x:1", "--iidfile", str(tmp_path / "iid"), "--build-arg", "ARG_HERE",
               "--build-arg", "UNSET_HERE", "-f", str(tmp_path / "ctx" / "Dockerfile"), str(ctx))
    assert got[-1] == "-" and not any(str(tmp_path) in a for a in got), got
    assert "--build-arg=ARG_HERE=arg value" in got and not any("UNSET_HERE" in a for a in got)
    assert any(a.startswith("--file=.vmrt-dockerfile-") for a in got)
    assert sent("build", "-") == ["build", "-"]  # a tar on stdin: as it is
    got = sent("run", "--rm", "-it", "--env-file", str(envf), "-e", "B=2", "-e", "UNSET_HERE", "busybox", "env")
    assert got == ["run", "--rm", "--env=A=1", "--env=FROM_HERE=local value", "--env=C=x y", "--env=B=2",
                   "--interactive", "--tty", "busybox", "env"]
    assert sent("create", "--name", "n", "-e", "A=1", "busybox") == ["create", "--name", "n", "-e", "A=1", "busybox"]
    assert sent("exec", "-i", "-e", "FROM_HERE", "-e", "UNSET_HERE", "c1", "sh", "-c", "echo $FROM_HERE") == \
        ["exec", "--interactive", "--env=FROM_HERE=local value", "c1", "sh", "-c", "echo $FROM_HERE"]
    labels = tmp_path / "labels"
    labels.write_text("a=1\n# no\nb\n")
    assert sent("create", "--label-file", str(labels), "-l", "c=3", "busybox") == \
        ["create", "--label=a=1", "--label=b", "--label=c=3", "busybox"]
    assert sent("create", "--cidfile", str(tmp_path / "cid"), "busybox") == ["create", "busybox"]
    # an option click does not know: the argv goes as it is (the remote says what is wrong),
    # never cut at that option with the rest dropped
    odd = ["run", "-e", "FROM_HERE", "--no-such-flag", "--env-file", str(envf), "busybox", "env"]
    assert sent(*odd) == odd
    envf.write_text("=nokey\n")
    with pytest.raises(UsageError, match="invalid environment variable"):
        sent("run", "--env-file", str(envf), "busybox")
    with pytest.raises(UsageError, match="--env-file"):
        sent("create", "--env-file", str(tmp_path / "missing"), "busybox")


def test_build_with_a_local_context(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    iid = tmp_path / "iid"
    try:
        r = sshd("build", "-t", "remote-built:1", "--iidfile", str(iid), str(ctx))
        assert r.returncode == 0, r.stderr
        assert b"Step 2/2 : COPY . /ctx/" in r.stdout and b"Successfully tagged remote-built:1" in r.stdout
        want = vmrt("image", "inspect", "--format", "{{.Id}}", "remote-built:1").stdout.decode().strip()
        assert want.startswith("sha256:") and iid.read_text() == want
        # the image holds what a local build of the same context holds
        assert vmrt("build", "-q", "-t", "remote-built:local", str(ctx)).returncode == 0
        trees = [vmrt("run", "--rm", "--isolation=process", ref, "sh", "-c",
                      "cd /ctx && find . | sort && readlink link && cat a.txt").stdout.decode().split()
                 for ref in ("remote-built:1", "remote-built:local")]
        assert trees[0] == trees[1] and {"./a.txt", "./sub/b.txt", "./.dockerignore"} <= set(trees[0]), trees
        assert not {"./secret.txt", "./logs/x.log"} & set(trees[0])
        assert not any("vmrt-dockerfile" in t for t in trees[0])
        # -f outside the context, -q: the ID on stdout and in the local iidfile
        outside = tmp_path / "elsewhere" / "Build.file"
        outside.parent.mkdir()
        outside.write_text("FROM busybox\nCOPY a.txt /from-outside\n")
        r = sshd("build", "-q", "-f", str(outside), "-t", "remote-built:2", "--iidfile", str(iid), str(ctx))
        assert r.returncode == 0 and r.stdout.decode().strip() == iid.read_text(), r.stderr
        # -f -: the Dockerfile from stdin, the context from here
        r = sshd("build", "-f", "-", "-t", "remote-built:3", str(ctx), input=b"FROM busybox\nCOPY sub /s\n")
        assert r.returncode == 0, r.stderr
        assert vmrt("run", "--rm", "--isolation=process", "remote-built:3", "cat", "/s/b.txt").stdout == b"b\n"
        # a tar on stdin goes as it is
        import io
        import tarfile
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            tf.add(ctx / "Dockerfile", "Dockerfile")
            tf.add(ctx / "a.txt", "a.txt")
        r = sshd("build", "-t", "remote-built:4", "--iidfile", str(iid), "-", input=buf.getvalue())
        assert r.returncode == 0, r.stderr
        want = vmrt("image", "inspect", "--format", "{{.Id}}", "remote-built:4").stdout.decode().strip()
        assert iid.read_text() == want
        # failures: one line and the status of a local build, the Dockerfile named as the user named it
        bad = tmp_path / "bad.Dockerfile"
        bad.write_text("FROM busybox\nNOSUCH x\n")
        r = sshd("build", "-f", str(bad), str(ctx))
        assert r.returncode == vmrt("build", "-f", str(bad), str(ctx)).returncode != 0
        assert "bad.Dockerfile:2" in one_line_error(r.stderr)
        big = tmp_path / "big"  # more than the pipe and the channel's window hold
        big.mkdir()
        (big / "Dockerfile").write_text("FROM busybox\n")
        (big / "blob").write_bytes(os.urandom(8 << 20))
        r = sshd("build", "-t", "Bad:Tag!", str(big))  # refused before the context is read: no second line
        assert r.returncode == vmrt("build", "-t", "Bad:Tag!", str(ctx)).returncode != 0
        assert "Bad:Tag!" in one_line_error(r.stderr)
        r = sshd("build", str(tmp_path / "nope"))
        assert r.returncode == 125 and "unable to prepare context" in one_line_error(r.stderr)
        r = sshd("build", "--iidfile", str(tmp_path / "no" / "dir"), str(ctx))
        assert r.returncode == 125 and "does not exist" in one_line_error(r.stderr)
    finally:
        for n in ("1", "2", "3", "4", "local"):
            vmrt("rmi", f"remote-built:{n}")


def test_env_and_label_files_are_read_here(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    """--env-file names a LOCAL file, its KEY-alone lines (and -e KEY) take this side's values;
    --label-file names a LOCAL file too."""
    envf = tmp_path / "env"
    envf.write_text("A=1\n# a comment\nFROM_HERE\nC=x y\n")
    r = sshd("run", "--rm", "--isolation=process", "--env-file", str(envf), "-e", "ALSO_HERE", "busybox", "env",
             env={"FROM_HERE": "local", "ALSO_HERE": "too"})
    assert r.returncode == 0, r.stderr
    env = r.stdout.decode().splitlines()
    assert {"A=1", "FROM_HERE=local", "C=x y", "ALSO_HERE=too"} <= set(env), env
    r = sshd("run", "--rm", "--env-file", str(tmp_path / "missing"), "busybox", "true")
    assert r.returncode == 125 and "--env-file" in one_line_error(r.stderr)
    # --label-file: read here, its lines sent as --label (the given ones win); as a local create
    labels = tmp_path / "labels"
    labels.write_text("# labels\na=1\nb=from file\nempty\n")
    try:
        r = sshd("create", "--name", "rlabels", "--label-file", str(labels), "-l", "b=given", "busybox")
        assert r.returncode == 0, r.stderr
        r = vmrt("create", "--name", "llabels", "--label-file", str(labels), "-l", "b=given", "busybox")
        assert r.returncode == 0, r.stderr
        got = [vmrt("inspect", "--format", "{{json .Config.Labels}}", n).stdout for n in ("rlabels", "llabels")]
        assert got[0] == got[1] and json.loads(got[0]) == {"a": "1", "b": "given", "empty": ""}, got
    finally:
        vmrt("rm", "-f", "rlabels", "llabels")
    r = sshd("create", "--label-file", str(tmp_path / "missing"), "busybox")
    assert r.returncode == 125 and "--label-file" in one_line_error(r.stderr)


# --- a host without vmrt, or with one too old ----------------------------------------------------

def _old_vmrt(base: Path) -> Path | None:
    """A ``vmrt`` from before the remote session protocol (git archive of the commit before it)."""
    repo = Path(__file__).resolve().parent.parent
    old = base / "old"
    old.mkdir()
    before = "e5591ac56dfd58d47c88a7c30a60554fda549c4f"  # the commit before vmrt -H
    r = subprocess.run(["git", "-C", repo, "archive", "-o", base / "old.tar", before, "vmrt"], capture_output=True)
    if r.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", old, "-f", base / "old.tar"], check=True)
    bindir = base / "oldbin"
    bindir.mkdir()
    (bindir / "vmrt").write_text(f"#!/bin/sh\nPYTHONPATH={old} exec {sys.executable} -m vmrt \"$@\"\n")
    (bindir / "vmrt").chmod(0o755)
    return bindir


@pytest.mark.parametrize("remote", ["missing", "old"])
def test_remote_without_vmrt(vmrt: Vmrt, tmp_path: Path, remote: str) -> None:
    """No vmrt on the remote PATH, or one that predates the session protocol: one line, exit 125,
    never the shell's "command not found" and 127 (which a container could have given)."""
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed (setup.sh installs it)")
    path = "/usr/bin:/bin"
    if remote == "old":
        bindir = _old_vmrt(tmp_path)
        if bindir is None:
            pytest.skip("not a git checkout: no old vmrt to install")
        path = f"{bindir}:{path}"
    (tmp_path / "sshd").mkdir()
    s = Sshd(tmp_path / "sshd", vmrt, path=path)
    try:
        for persist, tty in (("0", False), ("60", False), ("0", True)):
            r = s("run", "--rm", *(["-t"] if tty else []), "busybox", "true", env={"VMRT_SSH_PERSIST": persist})
            line = one_line_error(r.stderr)
            assert r.returncode == 125 and r.stdout == b"", (persist, tty, r)
            if remote == "missing":
                assert "vmrt is not installed on 127.0.0.1" in line and "not found" not in line
            else:
                assert "did not start a remote session" in line and "too old" in line
    finally:
        s.close()
        deadline = time.monotonic() + 10
        while s.masters() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not s.masters()


def test_proxy_jump(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    """~/.ssh/config's ProxyJump (ssh -J): the target reached over the jump host's direct-tcpip
    channel, each host's key checked against known_hosts, each connection authenticated."""
    (tmp_path / "jump").mkdir()
    jump = Sshd(tmp_path / "jump", vmrt, extra=(f"PermitOpen 127.0.0.1:{sshd.port}", "ForceCommand /bin/false"))
    cfg = sshd.home / ".ssh" / "config"
    masters = set(sshd.masters())
    try:
        (jump.base / "authorized_keys").write_text((sshd.home / ".ssh" / "id_ed25519.pub").read_text())
        cfg.write_text(f"Host behind\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n  ProxyJump jumpbox\n"
                       f"Host elsewhere\n  HostName 127.0.0.1\n  Port {_free_port()}\n  User root\n"
                       f"  ProxyJump root@127.0.0.1:{jump.port}\n"
                       f"Host jumpbox\n  HostName 127.0.0.1\n  Port {jump.port}\n  User root\n")
        behind = {"VMRT_HOST": "ssh://behind"}
        # the jump host's key is not known: refused, naming it
        r = sshd("ps", host=False, env={**behind, "VMRT_SSH_PERSIST": "0"})
        line = one_line_error(r.stderr)
        assert r.returncode == 255 and "the jump host" in line and "not known" in line, line
        sshd.trust(f"{sshd.host_key_line}\n{jump.host_key_line}")
        for persist in ("0", "60"):
            r = sshd("run", "--rm", "--isolation=process", "busybox", "echo", "behind", host=False,
                     env={**behind, "VMRT_SSH_PERSIST": persist})
            assert (r.returncode, r.stdout) == (0, b"behind\n"), r.stderr
        assert jump.connections()  # the master's way in: a connection of the jump host's
        # the target's key changed: refused loudly, through the jump host too
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "other"], check=True)
        other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
        sshd.trust(f"[127.0.0.1]:{sshd.port} {other}\n{jump.host_key_line}")
        r = sshd("ps", host=False, env={**behind, "VMRT_SSH_PERSIST": "0"})
        assert r.returncode == 255 and "CHANGED" in one_line_error(r.stderr)
        sshd.trust(f"{sshd.host_key_line}\n{jump.host_key_line}")
        # where the jump host does not forward: one line
        r = sshd("ps", host=False, env={"VMRT_HOST": "ssh://elsewhere", "VMRT_SSH_PERSIST": "0"})
        line = one_line_error(r.stderr)
        assert r.returncode == 255 and "through the jump host" in line, line
    finally:
        cfg.unlink(missing_ok=True)
        sshd.trust()
        jump.close()
        deadline = time.monotonic() + 10
        while set(sshd.masters()) - masters and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not set(sshd.masters()) - masters, "the master through the jump host outlived it"


def test_cidfile(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    """--cidfile, as Docker's: the new container's ID written there, refused if it exists, removed
    if no container came to be; through vmrt -H written here (create, run -d)."""
    made: list[str] = []
    try:
        for n, (run, args) in enumerate(((vmrt, ["create"]), (sshd, ["create"]), (vmrt, ["run", "-d"]),
                                         (sshd, ["run", "-d"]))):
            f = tmp_path / f"cid{n}"
            r = run(*args, "--cidfile", str(f), "--isolation=process", "busybox", "sleep", "30")
            assert r.returncode == 0, r.stderr
            made.append(r.stdout.decode().strip())
            assert f.read_text() == made[-1] and len(made[-1]) == 64
            r = run(*args, "--cidfile", str(f), "busybox", "true")  # it exists: refused, nothing made
            assert r.returncode == 125 and "container ID file found" in one_line_error(r.stderr)
        f = tmp_path / "attached"
        r = vmrt("run", "--rm", "--cidfile", str(f), "--isolation=process", "busybox", "true")
        assert r.returncode == 0 and len(f.read_text()) == 64, r.stderr
        for run in (vmrt, sshd):  # no container: no file left
            f = tmp_path / "none"
            r = run("create", "--cidfile", str(f), "--pull=never", "no-such-image:1")
            assert r.returncode == 125 and not f.exists(), r.stderr
        # an attached remote run prints no ID: the remote marks it on stderr with the client's token,
        # the client takes the mark out and writes the file at once (with a master, without, with -t)
        for n, (persist, tty) in enumerate((("60", False), ("0", False), ("0", True))):
            f = tmp_path / f"attached{n}"
            p = track(subprocess.Popen(sshd.cmd("run", "--rm", *(["-t"] if tty else []), "--cidfile", str(f),
                                                "--isolation=process", "busybox", "sh", "-c",
                                                "echo ready; echo err >&2; sleep 60"),
                                       env=sshd.env(VMRT_SSH_PERSIST=persist), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            first = _read_until(p.stdout, b"ready")
            deadline = time.monotonic() + 30
            while not (f.exists() and len(f.read_text()) == 64):
                assert time.monotonic() < deadline and p.poll() is None, "no cidfile while the run runs"
                time.sleep(0.1)
            cid = f.read_text()  # the running container's
            assert vmrt("inspect", "--format", "{{.Id}}", cid).stdout.decode().strip() == cid
            vmrt("kill", cid)  # (its status not asserted: the --rm run may remove it before kill looks again)
            out, err = p.communicate(timeout=60)
            out = first + out
            assert p.returncode != 0
            assert b"vmrt-cid" not in out + err and (b"err" in (out if tty else err)), (out, err)
        # a container that writes a marker of its own (it cannot know the token): passed on as it
        # wrote it, the file still gets the real ID
        f = tmp_path / "forged"
        fake = "\\000vmrt-cid:" + "0" * 32 + ":" + "0" * 64 + "\\000"
        r = sshd("run", "--rm", "--cidfile", str(f), "--isolation=process", "busybox", "sh", "-c",
                 f"printf '{fake}' >&2")
        assert r.returncode == 0 and r.stderr == b"\0vmrt-cid:" + b"0" * 32 + b":" + b"0" * 64 + b"\0", r.stderr
        assert len(f.read_text()) == 64 and f.read_text() != "0" * 64
    finally:
        if made:
            vmrt("rm", "-f", *made)


# --- review findings: secrets off the remote command line, signals out of band, stdin ends ---------

def _cmdlines_with(needles: list[bytes]) -> list[tuple[int, list[bytes]]]:
    return [(pid, args) for pid, args in _processes() if any(n in a for a in args for n in needles)]


@pytest.mark.parametrize("persist, tty", [("60", False), ("0", False), ("60", True)],
                         ids=["master", "own-connection", "master-tty"])
def test_secrets_are_on_no_command_line(vmrt: Vmrt, sshd: Sshd, tmp_path: Path, persist: str, tty: bool) -> None:
    """-e NAME (this side's value) and --env-file values reach the container and no process's
    argv on the remote host (sshd's is local here: all of /proc is scanned while it runs); a
    SIGTERM to the local vmrt reaches the container (out of band, framed or pty)."""
    a, b = os.urandom(12).hex(), os.urandom(12).hex()
    envf = tmp_path / "env"
    envf.write_text(f"SB={b}\n")
    p = track(subprocess.Popen(
        sshd.cmd("run", "--rm", *(["-t"] if tty else []), "-e", "SA", "--env-file", str(envf), "--isolation=process",
                 "busybox", "sh", "-c", 'trap "exit 3" TERM; echo "$SA $SB"; echo ready; sleep 100 & wait'),
        env=sshd.env(VMRT_SSH_PERSIST=persist, SA=a), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE))
    got = _read_until(p.stdout, b"ready")
    assert f"{a} {b}".encode() in got
    assert _sessions(), "no remote session seen"
    assert _cmdlines_with([a.encode(), b.encode()]) == []
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 3


def test_build_arg_is_on_no_command_line(vmrt: Vmrt, sshd: Sshd, tmp_path: Path) -> None:
    secret = os.urandom(12).hex()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    import hashlib
    digest = hashlib.md5(secret.encode()).hexdigest()  # the RUN checks the value without naming it
    (ctx / "Dockerfile").write_text(f'FROM busybox\nARG BA\nRUN sleep 3 && test "$(printf %s "$BA" | md5sum)" '
                                    f'= "{digest}  -"\n')
    p = track(subprocess.Popen(sshd.cmd("build", "-q", "-t", "remote-ba:1", "--build-arg", "BA", str(ctx)),
                               env=sshd.env(BA=secret), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE))
    try:
        seen = []
        while p.poll() is None:
            seen += _cmdlines_with([secret.encode()])
            time.sleep(0.1)
        out, err = p.communicate()
        assert p.returncode == 0, err  # the RUN saw the value
        assert seen == []
    finally:
        vmrt("rmi", "remote-ba:1")


def test_signal_does_not_wait_behind_stdin(vmrt: Vmrt, sshd: Sshd) -> None:
    """producer | vmrt -H run -i IMG a-command-that-never-reads: the session's stdin queue and the
    channel's window fill; SIGTERM still stops it promptly."""
    import threading
    p = track(subprocess.Popen(
        sshd.cmd("run", "--rm", "-i", "--isolation=process", "busybox", "sh", "-c",
                 'trap "exit 4" TERM; echo ready; sleep 100 & wait'),
        env=sshd.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert p.stdin is not None

    def produce() -> None:
        chunk = b"x" * 65536
        try:
            for _ in range(200):  # 12.5 MiB, far past what the session queues
                p.stdin.write(chunk)  # type: ignore[union-attr]
        except (BrokenPipeError, ValueError, OSError):
            pass
    t = threading.Thread(target=produce, daemon=True)
    t.start()
    _read_until(p.stdout, b"ready")
    time.sleep(3)  # the queues fill
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 4
    assert time.monotonic() - t0 < 30
    p.stdin.close()
    t.join(10)


def test_sequential_stdin_through_the_master(vmrt: Vmrt, sshd: Sshd) -> None:
    """Each command through the connection master gets exactly its own stdin (no pump of an
    earlier command left reading a later one's)."""
    for data in (b"first\n" * 1000, b"second\n" * 3, b""):
        r = sshd("run", "--rm", "-i", "--isolation=process", "busybox", "cat", input=data)
        assert (r.returncode, r.stdout) == (0, data), r.stderr
    assert sshd.masters()


def test_service_builds_stay_local(vmrt: Vmrt, tmp_path: Path) -> None:
    """With VMRT_HOST and a remote context in the service's environment, `vmrt system service`'s
    builds (its own `python -m vmrt build` children) still run on this host."""
    import io
    import tarfile

    from test_api import Api
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "VMRT_HOST": "ssh://127.0.0.1:1",
           "VMRT_SSH_TIMEOUT": "2"}
    contexts.create("far", "ssh://127.0.0.1:1", "", env)
    contexts.use("far", env)
    sock = tmp_path / "docker.sock"
    proc = vmrt.popen("-c", "default", "system", "service", "--socket", str(sock), env=env)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the service did not come up"
            time.sleep(0.05)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            df = b"FROM busybox\nLABEL built=here\n"
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(df)
            tf.addfile(info, io.BytesIO(df))
        api = Api(vmrt, sock, home, proc)
        status, _, out = api.request("POST", "/build?q=1&t=local-built:1", buf.getvalue(),
                                     {"Content-Type": "application/x-tar"})
        assert status == 200 and b"errorDetail" not in out, out
        r = vmrt("image", "inspect", "--format", "{{json .Config.Labels}}", "local-built:1")
        assert r.returncode == 0 and json.loads(r.stdout) == {"built": "here"}, r
    finally:
        vmrt("rmi", "local-built:1")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_revoked_host_key_is_refused(vmrt: Vmrt, sshd: Sshd) -> None:
    """A host key known_hosts marks @revoked is refused even beside a line that trusts it; a
    @cert-authority line does not break the file."""
    typ, b64 = sshd.host_key_line.split()[1:3]
    try:
        sshd.trust(f"@cert-authority *.example {typ} {b64}\n{sshd.host_key_line}")
        r = sshd("ps", env={"VMRT_SSH_PERSIST": "0"})
        assert r.returncode == 0, r.stderr
        sshd.trust(f"@revoked * {typ} {b64}\n{sshd.host_key_line}")
        for persist in ("0", "60"):
            r = sshd("ps", env={"VMRT_SSH_PERSIST": persist})
            assert r.returncode == 255 and "@revoked" in one_line_error(r.stderr), r
    finally:
        sshd.trust()
