"""The API service under faults (issue 18): killed in the middle of requests, fed malformed
ones, left by clients in the middle of streams, stopped with streams open.

Each test has its own service (test_api's ``api`` fixture: the real docker CLI against
`vmrt system service` on a private socket). A test that kills the service starts a new one on
the same socket path, which the fixture's teardown then stops with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support import Vmrt, track
from test_api import DOCKER, Api
from test_api import api as api_service  # the fixture, registered here under this name

pytestmark = pytest.mark.vm
assert api_service  # imported for pytest to find
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def api(api_service: Api) -> Api:
    """test_api's service on a private socket, stopped (and checked) at the test's end."""
    return api_service


# --- helpers ---------------------------------------------------------------------------------
def _open(api: Api, head: str, body: bytes = b"") -> socket.socket:
    """A raw connection that sent ``head`` (a request line and headers) and ``body``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(api.sock))
    s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return s


def _head(s: socket.socket) -> bytes:
    """The answer's status line and headers (what follows them stays in the socket, but for
    what came in the same read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(1)
        assert chunk, data
        data += chunk
    return data


def _rest(s: socket.socket, timeout: float = 15) -> bytes:
    """Everything until the other end closes."""
    s.settimeout(timeout)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _exchange(api: Api, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Raw bytes sent, the answer read to the connection's end: status, headers, body."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(api.sock))
    try:
        s.sendall(raw)
        data = _rest(s)
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    hdrs = dict(ln.split(": ", 1) for ln in lines[1:])
    return int(lines[0].split()[1]), hdrs, body


def _is_docker_error(status: int, hdrs: dict[str, str], body: bytes, want: int | tuple[int, ...]) -> None:
    """Docker's error: the status, Content-Type exactly application/json, one line of JSON."""
    assert status in (want if isinstance(want, tuple) else (want,)), (status, body)
    assert hdrs.get("Content-Type") == "application/json", (hdrs, body)
    assert body.count(b"\n") <= 1 and b"Traceback" not in body, body
    doc = json.loads(body)
    assert list(doc) == ["message"] and doc["message"] and "\n" not in doc["message"], doc


def _counts(pid: int) -> tuple[int, int]:
    """The process's open fds (but its state database's: _db_fds) and threads."""
    return len(_fds(pid)) - _db_fds(pid), len(os.listdir(f"/proc/{pid}/task"))


def _db_fds(pid: int) -> int:
    return sum(f.endswith("/state.db") for f in _fds(pid))


def _settles(pid: int, base: tuple[int, int], timeout: float = 15) -> None:
    """Its fds and threads come back to ``base`` (give or take one fd) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        now = _counts(pid)
        if now[0] <= base[0] + 1 and now[1] <= base[1]:
            return
        assert time.monotonic() < deadline, (f"fds, threads: {now} (were {base})", _fds(pid))
        time.sleep(0.2)


def _fds(pid: int) -> list[str]:
    """What the process's fds are open on."""
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def _warm(api: Api) -> tuple[int, int]:
    """The service's fds and threads once its pool of workers is at its largest (a burst of
    requests, more than its workers)."""
    def one() -> None:
        assert api.request("GET", "/containers/json?all=1")[0] == 200
    for _ in range(3):
        burst = [threading.Thread(target=one) for _ in range(40)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
    time.sleep(0.5)
    return _counts(api.proc.pid)


def _kill(api: Api) -> None:
    """SIGKILL of the service (its pid only): what it started goes on without it."""
    os.kill(api.proc.pid, signal.SIGKILL)
    api.proc.wait(30)
    assert api.proc.stderr is not None
    err = api.proc.stderr.read()
    assert b"Traceback" not in err, err


def _restart(api: Api) -> None:
    """A new service on the killed one's socket path (its socket file is still there); the
    fixture stops it at the end."""
    assert api.sock.is_socket()  # the dead service's
    with pytest.raises(ConnectionRefusedError):
        api.request("GET", "/_ping")
    api.proc = api.v.popen("system", "service", "--socket", str(api.sock))
    deadline = time.monotonic() + 60
    while True:
        try:
            if api.request("GET", "/_ping")[0] == 200:
                return
        except OSError:
            pass
        assert api.proc.poll() is None, api.proc.communicate()
        assert time.monotonic() < deadline, "the new service did not come up"
        time.sleep(0.05)


def _state(api: Api, name: str) -> str:
    return api.docker("inspect", "-f", "{{.State.Status}}", name).stdout.decode().strip()


def _vmm_running(v: Vmrt) -> bool:
    """A QEMU of this vmrt runs (a VM is booting or booted)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu" in cmd and str(v.run_root).encode() in cmd:
            return True
    return False


# --- 1. the service killed in the middle of requests ----------------------------------------
def _terminal_exec_hangs_up(api: Api, cid: str) -> None:
    """An exec of a shell with a terminal whose client goes while it runs: the shell gets SIGHUP,
    as at a terminal's end (exit code 129)."""
    status, _, body = api.request("POST", f"/containers/{cid}/exec", json.dumps(
        {"Cmd": ["sh"], "Tty": True, "AttachStdin": True, "AttachStdout": True, "AttachStderr": True}).encode(), JSON)
    assert status == 201, body
    eid = json.loads(body)["Id"]
    s = _open(api, f"POST /exec/{eid}/start HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: 12\n"
                   "Upgrade: tcp\nConnection: Upgrade\n", b'{"Tty":true}')
    assert b" 101 " in _head(s)
    s.sendall(b"echo in-the-exec-$((6*7))\r")
    out = b""
    while b"in-the-exec-42" not in out:
        chunk = s.recv(4096)
        assert chunk, out
        out += chunk
    s.close()
    deadline = time.monotonic() + 30
    while (doc := json.loads(api.request("GET", f"/exec/{eid}/json")[2]))["Running"]:
        assert time.monotonic() < deadline, "the exec's shell did not end when its terminal hung up"
        time.sleep(0.2)
    assert doc["ExitCode"] == 129, doc


def test_a_killed_service_leaves_its_containers_to_their_monitors(api: Api) -> None:
    """SIGKILL of the service while a `docker run` is between its create and its start (the
    container created, its attach and its wait open) and while another container's long wait
    is pending: the clients see their connections end (no exit code made up); a new service
    starts on the stale socket; the running container still runs (its monitor owns it), the
    created one can be started, and `docker rm -f` leaves nothing."""
    r = api.docker("run", "-d", "--name", "kept", "--isolation=process", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    body = json.dumps({"Image": "busybox", "Cmd": ["echo", "half-way"], "AttachStdout": True,
                       "HostConfig": {"Isolation": "process"}}).encode()
    status, _, answer = api.request("POST", "/containers/create?name=half", body, JSON)
    assert status == 201, answer
    half = json.loads(answer)["Id"]
    attach = _open(api, f"POST /containers/{half}/attach?stream=1&stdout=1&stderr=1 HTTP/1.1\nHost: x\n"
                        "Upgrade: tcp\nConnection: Upgrade\n")
    assert b" 101 " in _head(attach)
    waits = [_open(api, f"POST /containers/{ref}/wait?condition=next-exit HTTP/1.1\nHost: x\nContent-Length: 0\n")
             for ref in (half, "kept")]
    for w in waits:
        assert b" 200 " in _head(w)
    time.sleep(0.3)  # the waits poll
    _kill(api)
    for s in (attach, *waits):
        assert b"StatusCode" not in _rest(s)  # the end of the connection, no exit code
        s.close()
    _restart(api)
    assert _state(api, "kept") == "running"
    assert _state(api, "half") == "created"
    names = api.docker("ps", "-a", "--format", "{{.Names}} {{.State}}").stdout.decode().split("\n")
    assert sorted(filter(None, names)) == ["half created", "kept running"], names
    r = api.docker("start", "-a", "half")
    assert (r.returncode, r.stdout) == (0, b"half-way\n"), r.stderr
    r = api.docker("rm", "-f", "kept", "half")
    assert r.returncode == 0, r.stderr
    assert api.v("ps", "-aq").stdout == b""
    api.v.assert_clean()


def test_a_killed_service_mid_vm_start(api: Api) -> None:
    """SIGKILL of the service while a `docker run -d --isolation=hyperv` waits for its VM to
    boot: the client fails; the container's monitor finishes the start on its own, and the new
    service sees it running; `docker rm -f` stops the VM and leaves nothing."""
    r = api.docker("run", "-d", "--name", "before", "--isolation=process", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    run = track(subprocess.Popen([DOCKER, "-H", f"unix://{api.sock}", "run", "-d", "--name", "booting",
                                  "--isolation=hyperv", "busybox", "sleep", "300"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=api.env(),
                                 stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + 60
    while not _vmm_running(api.v):  # the start is in flight: its VM boots
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "no VM started"
        time.sleep(0.05)
    _kill(api)
    _, err = run.communicate(timeout=30)
    assert run.returncode != 0, err  # the client saw its service go
    _restart(api)
    deadline = time.monotonic() + 120
    while (state := _state(api, "booting")) not in ("running", "exited"):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state == "running"
    r = api.docker("exec", "booting", "cat", "/proc/sys/kernel/random/boot_id")  # its VM answers
    assert r.returncode == 0 and len(r.stdout.strip()) == 36, r
    assert _state(api, "before") == "running"
    names = api.docker("ps", "--format", "{{.Names}}").stdout.decode().split()
    assert sorted(names) == ["before", "booting"], names
    r = api.docker("rm", "-f", "booting", "before")
    assert r.returncode == 0, r.stderr
    assert api.v("ps", "-aq").stdout == b""
    api.v.assert_clean()


# --- 2. malformed requests ---------------------------------------------------------------------
CREATE_TYPES: list[dict[str, Any]] = [  # a create's fields of the wrong type: Docker's daemon cannot decode them (400)
    {"Cmd": 5}, {"Cmd": [1]}, {"Entrypoint": {}}, {"Env": [1]}, {"Env": "A=1"}, {"HostConfig": []},
    {"HostConfig": 5}, {"Tty": "yes"}, {"OpenStdin": 1}, {"WorkingDir": 5}, {"User": 0}, {"Hostname": []},
    {"Labels": ["a=b"]}, {"Labels": {"a": 1}}, {"ExposedPorts": ["80/tcp"]}, {"Image": 5}, {"Healthcheck": 5},
    {"NetworkingConfig": 5}, {"NetworkingConfig": {"EndpointsConfig": []}},
    {"NetworkingConfig": {"EndpointsConfig": {"bridge": {"Aliases": "db"}}}},
    {"HostConfig": {"NanoCpus": "2"}}, {"HostConfig": {"Memory": 1.5}}, {"HostConfig": {"Memory": True}},
    {"HostConfig": {"RestartPolicy": "always"}}, {"HostConfig": {"RestartPolicy": {"Name": 1}}},
    {"HostConfig": {"RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": "x"}}},
    {"HostConfig": {"LogConfig": "json-file"}}, {"HostConfig": {"LogConfig": {"Config": {"max-size": 1}}}},
    {"HostConfig": {"Mounts": 5}}, {"HostConfig": {"Mounts": [5]}}, {"HostConfig": {"Mounts": [{"Target": 5}]}},
    {"HostConfig": {"Mounts": [{"Type": "tmpfs", "Target": "/t", "TmpfsOptions": 5}]}},
    {"HostConfig": {"Mounts": [{"Type": "tmpfs", "Target": "/t", "TmpfsOptions": {"SizeBytes": "1m"}}]}},
    {"HostConfig": {"PortBindings": {"80/tcp": 5}}}, {"HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": 80}]}}},
    {"HostConfig": {"PortBindings": []}}, {"HostConfig": {"Binds": "a:/b"}}, {"HostConfig": {"Tmpfs": ["/t"]}},
    {"HostConfig": {"Dns": [1]}}, {"HostConfig": {"AutoRemove": "true"}}, {"HostConfig": {"Privileged": 1}},
    {"HostConfig": {"Isolation": 5}}, {"HostConfig": {"ConsoleSize": "24x80"}}, {"HostConfig": {"PidsLimit": "5"}},
    {"HostConfig": {"Memory": 1 << 64}}, {"Cmd": ["\0"]}, {"HostConfig": {"Binds": ["/tmp\0:/x"]}},
    {"Env": ["A=\0"]}, {"Cmd": [[[["nested"]]]]},
]


def test_malformed_requests_get_dockers_errors(api: Api) -> None:
    """Each bad request is answered with Docker's status and one line of JSON (Content-Type
    exactly application/json), never a traceback (nor one in the service's log: the fixture
    looks); the service answers on, and made nothing of them."""
    def create(body: bytes) -> tuple[int, dict[str, str], bytes]:
        return api.request("POST", "/containers/create", body, JSON)

    # bodies: not JSON, JSON but not an object, fields of the wrong type
    for body in (b"{not json", b"\xff\xfe\x00", b'{"Image": "busybox"', b"[1, 2]", b'"busybox"', b"5", b"null",
                 b"true", b"{}", b"[" * 100000, b'{"Image": ' * 10000):
        _is_docker_error(*create(body), 400)
    for fields in CREATE_TYPES:
        _is_docker_error(*create(json.dumps({"Image": "busybox", **fields}).encode()), 400)
    # of the right types, for an image that is not there: 404 (they were read as they should be)
    right = {"Cmd": "true", "Entrypoint": ["sh", "-c"], "Tty": False, "HostConfig": {
        "Memory": 0, "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 2}, "PidsLimit": None,
        "Mounts": [{"Type": "tmpfs", "Target": "/t", "TmpfsOptions": {"SizeBytes": 1 << 20}}],
        "PortBindings": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}, "LogConfig": {"Type": ""}}}
    _is_docker_error(*create(json.dumps({"Image": "nosuchimage:1", **right}).encode()), 404)
    # fields Docker does not know, or vmrt does not read, are ignored: the create succeeds
    status, _, body = create(json.dumps({"Image": "busybox", "Cmd": ["true"], "NoSuchField": {"x": [1]},
                                         "StopTimeout": 3, "HostConfig": {"NoSuchField": 1, "Isolation": "process"},
                                         "NetworkingConfig": {"EndpointsConfig": {"bridge": {"Unknown": 1}}}}).encode())
    assert status == 201, body
    made = json.loads(body)["Id"]
    # too big: the service's limit (base.MAX_BODY, 1 MiB), as Content-Length and as chunks
    _is_docker_error(*create(b"{" + b" " * (2 << 20) + b"}"), 413)
    chunk = b"100000\r\n" + b" " * 0x100000 + b"\r\n"
    head = (b"POST /containers/create HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json"
            b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    _is_docker_error(*_exchange(api, head + chunk * 2 + b"0\r\n\r\n"), 413)
    # what cannot be read as HTTP: a request line or a header too long, too many headers, garbage
    for raw, want in ((b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", (400, 431)),
                      (b"GET /_ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", (400, 431)),
                      (b"GET /_ping HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(500)) + b"\r\n",
                       (400, 431)),
                      (b"\x00\x01\x02 not http\r\n\r\n", 400),
                      (b"POST /containers/create HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
                      (b"GET /_ping HTTP/9.9\r\nHost: x\r\n\r\n", (400, 505))):
        status, hdrs, body = _exchange(api, raw)
        if status != 505:
            _is_docker_error(status, hdrs, body, want)
    # bad filters, on each list that takes them
    for path in ("/containers/json", "/images/json", "/networks", "/volumes", "/events"):
        for filters in ("%7Bbad", "5", "%5B%5D", "%7B%22label%22%3A5%7D", "%7B%22nosuchfilter%22%3A%5B%22x%22%5D%7D"):
            _is_docker_error(*api.request("GET", f"{path}?filters={filters}"), 400)
    for path in ("/containers/json?filters=%7B%22status%22%3A%5B%22bogus%22%5D%7D",
                 "/images/json?filters=%7B%22dangling%22%3A%5B%22maybe%22%5D%7D", "/events?until=1e400",
                 "/events?since=nan", "/containers/json?all=maybe", "/containers/json?limit=x"):
        _is_docker_error(*api.request("GET", path), 400)
    # other bodies of the wrong shape
    for path, body in (("/networks/create", b'{"Name": "n1", "IPAM": 5}'),
                       ("/networks/create", b'{"Name": "n1", "IPAM": {"Config": [5]}}'),
                       ("/networks/create", b'{"Name": "n1", "Driver": []}'), ("/networks/create", b"[]"),
                       ("/volumes/create", b'{"Name": "v1", "Labels": {"a": 1}}'), ("/volumes/create", b"5"),
                       ("/containers/nosuch/exec", b'{"Cmd": 5}'), ("/auth", b"[]")):
        _is_docker_error(*api.request("POST", path, body, JSON), 400)
    # no such endpoint, a version too old or too new, a method the endpoint does not take
    _is_docker_error(*api.request("GET", "/v1.43/no/such/thing"), 404)
    _is_docker_error(*api.request("GET", "/containers/x/nosuchaction"), 404)
    for path in ("/v1.12/version", "/v9.99/version", "/v1.12/containers/json", "/v9.99/_ping"):
        _is_docker_error(*api.request("GET", path), 400)
    for method, path in (("PUT", "/containers/json"), ("DELETE", "/_ping"), ("GET", "/containers/create"),
                         ("PATCH", "/version")):
        _is_docker_error(*api.request(method, path), (404, 405))
    # a body cut short: more announced than sent, then the client goes
    for _ in range(3):
        s = _open(api, "POST /containers/create HTTP/1.1\nHost: x\nContent-Type: application/json\n"
                       "Content-Length: 1000\n", b'{"Image": "busy')
        time.sleep(0.2)
        s.close()
    # the service answers on, and nothing came of what it refused
    assert api.request("GET", "/_ping")[0] == 200
    assert api.v("ps", "-aq", "--no-trunc").stdout.decode().split() == [made]
    assert api.docker("rm", made).returncode == 0
    assert api.v("volume", "ls", "-q").stdout == b""
    assert "n1" not in api.v("network", "ls", "--format", "{{.Name}}").stdout.decode().split()
    api.v.assert_clean()


# --- 3. clients that go away ---------------------------------------------------------------------
def _go_away(api: Api, cid: str) -> None:
    """One round of clients that leave in the middle of their requests."""
    # more waits at once than the service has workers: it answers others meanwhile
    waits = [_open(api, f"POST /containers/{cid}/wait HTTP/1.1\nHost: x\nContent-Length: 0\n") for _ in range(12)]
    for w in waits:
        assert b" 200 " in _head(w)
    r = api.docker("ps", "-q", "--no-trunc", timeout=20)
    assert r.stdout.decode().split() == [cid], r.stderr
    for w in waits:
        w.close()
    # an attach sending stdin, gone after the 101
    for _ in range(3):
        s = _open(api, f"POST /containers/{cid}/attach?stream=1&stdin=1&stdout=1&stderr=1 HTTP/1.1\nHost: x\n"
                       "Upgrade: tcp\nConnection: Upgrade\n")
        assert b" 101 " in _head(s)
        s.sendall(b"typed in\n" * 100)
        s.close()
    # docker logs -f and docker events, each killed
    clients = [track(subprocess.Popen([DOCKER, "-H", f"unix://{api.sock}", *args], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=api.env()))
               for args in (("logs", "-f", cid), ("events",))]
    time.sleep(1)
    for client in clients:
        assert client.poll() is None
        client.kill()
        client.wait()
    # an exec with a terminal, gone while its shell runs
    _terminal_exec_hangs_up(api, cid)


def test_clients_that_go_away_mid_stream(api: Api) -> None:
    """Clients that go away in the middle of: more waits at once than the service has workers
    (`docker ps` is answered meanwhile), an attach sending stdin (the raw socket closed after
    the 101), `docker logs -f`, `docker events`, an exec with a terminal. The service answers
    on, the container runs on, the exec's terminal hangs up (its shell ends), and the
    service's fds and threads come back to what they were. (SQLite keeps the fds of the
    database connections closed while another holds a lock, for its next ones: those are
    counted apart, and a second round must need about as many, no more.)"""
    r = api.docker("run", "-d", "-i", "--name", "quiet", "--isolation=process", "busybox", "sh", "-c",
                   "exec cat > /dev/null")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    base = _warm(api)
    pid = api.proc.pid
    kept = []
    for _ in range(2):
        _go_away(api, cid)
        assert api.request("GET", "/_ping")[0] == 200
        assert _state(api, "quiet") == "running"
        _settles(pid, base)
        kept.append(_db_fds(pid))
    assert kept[1] <= kept[0] + 3, kept  # (a leak would be one a wait: 12 more)
    assert api.docker("rm", "-f", "quiet").returncode == 0
    api.v.assert_clean()


# --- 4. a stop with streams open ---------------------------------------------------------------
def test_the_service_stops_cleanly_with_streams_open(api: Api) -> None:
    """SIGTERM while an attach (with stdin), a `docker logs -f`, a `docker events`, a wait and
    an exec's terminal are open: the service ends each stream (its clients see the end),
    exits 0 and removes its socket; the container runs on."""
    r = api.docker("run", "-d", "-i", "--name", "up", "--isolation=process", "busybox", "sh", "-c",
                   "echo started; exec cat")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    attach = _open(api, f"POST /containers/{cid}/attach?stream=1&stdin=1&stdout=1&stderr=1 HTTP/1.1\nHost: x\n"
                        "Upgrade: tcp\nConnection: Upgrade\n")
    assert b" 101 " in _head(attach)
    attach.sendall(b"echoed back\n")
    wait = _open(api, f"POST /containers/{cid}/wait HTTP/1.1\nHost: x\nContent-Length: 0\n")
    assert b" 200 " in _head(wait)
    status, _, body = api.request("POST", f"/containers/{cid}/exec", json.dumps(
        {"Cmd": ["sh"], "Tty": True, "AttachStdin": True, "AttachStdout": True}).encode(), JSON)
    assert status == 201, body
    eid = json.loads(body)["Id"]
    exe = _open(api, f"POST /exec/{eid}/start HTTP/1.1\nHost: x\nContent-Type: application/json\n"
                     "Content-Length: 12\nUpgrade: tcp\nConnection: Upgrade\n", b'{"Tty":true}')
    assert b" 101 " in _head(exe)
    clients = [track(subprocess.Popen([DOCKER, "-H", f"unix://{api.sock}", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=api.env()))
               for args in (("logs", "-f", "up"), ("events",))]
    deadline = time.monotonic() + 10
    got = b""
    while b"echoed back" not in got:  # the attach works: its stdin in, its output out
        assert time.monotonic() < deadline, got
        got += attach.recv(4096)
    time.sleep(1)
    assert all(c.poll() is None for c in clients)
    t0 = time.monotonic()
    api.proc.send_signal(signal.SIGTERM)
    _, err = api.proc.communicate(timeout=30)
    assert api.proc.returncode == 0 and b"Traceback" not in err, err
    assert time.monotonic() - t0 < 10, "the streams held the stop"
    assert not api.sock.exists()
    for c in clients:
        c.wait(10)  # each saw its stream end
    for s in (attach, wait, exe):
        assert b"StatusCode" not in _rest(s, 10)
        s.close()
    assert api.v("inspect", "-f", "{{.State.Status}}", "up").stdout.strip() == b"running"
    assert api.v("rm", "-f", "up").returncode == 0
    api.v.assert_clean()


def test_a_vm_exec_terminal_hangs_up_with_its_client(api: Api) -> None:
    """In a micro-VM too, an exec's terminal hangs up when its client goes: the shell gets SIGHUP
    (the resize pipe's end reaches the guest agent as a signal), its exit code is 129."""
    r = api.docker("run", "-d", "--isolation=hyperv", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    _terminal_exec_hangs_up(api, cid)
    assert api.docker("rm", "-f", cid).returncode == 0
    api.v.assert_clean()
