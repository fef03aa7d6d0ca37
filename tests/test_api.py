"""The Docker Engine API (issue 18): `vmrt system service` on a private socket, driven by the
real `docker` CLI (Debian's docker.io; no dockerd runs) and the Docker SDK for Python.

Each test starts its own service on a socket under its tmp dir, for the test's private vmrt,
and stops it with SIGTERM at its end: the service must exit 0 and remove its socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import platform
import select
import shutil
import signal
import socket
import struct
import subprocess
import termios
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt

pytestmark = pytest.mark.vm
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker") or "docker"
COMPOSE = "/usr/bin/docker-compose" if os.path.exists("/usr/bin/docker-compose") else shutil.which("docker-compose")
COMPOSE_FILE = """
version: "2.4"
services:
  web:
    image: busybox
    isolation: hyperv
    command: ["sh", "-c", "echo hello-from-web > /data/index.html && exec httpd -f -p 80 -h /data"]
    volumes:
      - webdata:/data
    ports:
      - "127.0.0.1::80"
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/"]
      interval: 1s
      timeout: 20s
      retries: 60
  client:
    image: busybox
    isolation: process
    depends_on:
      web:
        condition: service_healthy
    command: ["sh", "-c", "wget -q -O - http://web/ && exec sleep 300"]
volumes:
  webdata: {}
"""


class Api:
    """A running service and its clients."""

    def __init__(self, v: Vmrt, sock: Path, home: Path, proc: subprocess.Popen[bytes]) -> None:
        self.v, self.sock, self.home, self.proc = v, sock, home, proc

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "HOME": str(self.home), "DOCKER_CONFIG": str(self.home / ".docker")}

    def docker(self, *args: str, timeout: float = 180,
               input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        return subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *args], capture_output=True, timeout=timeout,
                              env=self.env(), **stdin)

    def terminal(self, *args: str, steps: list[tuple[bytes | tuple[int, int], bytes] | tuple[bytes, bytes, float]],
                 size: tuple[int, int] = (33, 101), timeout: float = 60) -> tuple[int, bytes]:
        """`docker ARGS` on a pseudo-terminal of ``size`` (a user at a terminal), driven by steps:
        each sends its keys (or resizes the terminal to (rows, columns), with the SIGWINCH a
        terminal sends) and then waits for its expected bytes in the output (a third item: the
        keys are sent again every that many seconds until then); then the exit status and all
        output."""
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
        proc = subprocess.Popen([DOCKER, "-H", f"unix://{self.sock}", *args], stdin=slave, stdout=slave,
                                stderr=slave, env=self.env(), start_new_session=True)
        os.close(slave)
        out = b""
        try:
            for keys, expect, *again in steps:
                if isinstance(keys, tuple):
                    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", *keys, 0, 0))
                    proc.send_signal(signal.SIGWINCH)
                else:
                    os.write(master, keys)
                deadline = time.monotonic() + timeout
                resend = time.monotonic() + again[0] if again else None
                start = len(out)
                while expect not in out[start:]:
                    assert time.monotonic() < deadline, (expect, out)
                    if resend is not None and time.monotonic() > resend and isinstance(keys, bytes):
                        os.write(master, keys)
                        resend = time.monotonic() + again[0]
                    if select.select([master], [], [], 0.2)[0]:
                        try:
                            out += os.read(master, 65536)
                        except OSError:  # EIO: the client ended
                            break
            status = proc.wait(timeout)
            with contextlib.suppress(OSError):
                while select.select([master], [], [], 0.1)[0] and (data := os.read(master, 65536)):
                    out += data
            return status, out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)

    def compose(self, project_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        assert COMPOSE, "docker-compose is missing (setup.sh installs Debian's)"
        env = {"PATH": os.environ["PATH"], "HOME": str(self.home), "DOCKER_HOST": f"unix://{self.sock}"}
        return subprocess.run([COMPOSE, "--no-ansi", "-p", "demo", *args], capture_output=True, timeout=timeout,
                              env=env, cwd=project_dir, stdin=subprocess.DEVNULL)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = UnixHTTP(self.sock)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=120)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(120)
        self.sock.connect(self.path)


@pytest.fixture
def api(vmrt: Vmrt, tmp_path: Path) -> Iterator[Api]:
    sock = tmp_path / "docker.sock"
    proc = vmrt.popen("system", "service", "--socket", str(sock))
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the service did not come up"
        time.sleep(0.05)
    (tmp_path / "home").mkdir()
    a = Api(vmrt, sock, tmp_path / "home", proc)
    try:
        yield a
    finally:
        for cid in vmrt("ps", "-aq").stdout.decode().split():
            vmrt("rm", "-f", cid)
        proc = a.proc  # (a test that killed the service started another: that one)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not sock.exists()  # the service removed its socket
        assert b"Traceback" not in err, err


def test_versions_are_negotiated_and_errors_are_dockers(api: Api) -> None:
    status, headers, body = api.request("GET", "/_ping")
    assert (status, body) == (200, b"OK") and headers["Api-Version"] == "1.43"
    assert api.request("HEAD", "/_ping")[0] == 200
    status, _, body = api.request("GET", "/v1.41/version")
    assert status == 200 and json.loads(body)["MinAPIVersion"] == "1.24"
    for path, want in (("/v1.12/version", b"is too old"), ("/v1.99/version", b"is too new")):
        status, _, body = api.request("GET", path)
        assert status == 400 and want in json.loads(body)["message"].encode(), body
    status, _, body = api.request("GET", "/v1.43/no/such/thing")
    assert status == 404 and "message" in json.loads(body)
    assert api.request("DELETE", "/_ping")[0] == 405
    # a container that is not there, a bad body, a huge body, what vmrt refuses, a missing image
    status, _, body = api.request("GET", "/containers/nosuch/json")
    assert status == 404 and json.loads(body)["message"] == "No such container: nosuch"
    hdr = {"Content-Type": "application/json"}
    for body, want in ((b"{not json", 400), (b"[1, 2]", 400), (b"{}", 400), (b"x" * (2 << 20), 413),
                       (json.dumps({"Image": "busybox", "HostConfig": {"Privileged": True}}).encode(), 400),
                       (json.dumps({"Image": "busybox", "HostConfig": {"Isolation": "hyperx"}}).encode(), 400),
                       (json.dumps({"Image": "nosuchimage:1"}).encode(), 404)):
        status, _, answer = api.request("POST", "/containers/create", body, hdr)
        assert status == want and json.loads(answer)["message"], (body[:60], status, answer)
    status, _, body = api.request("GET", "/containers/json?filters=%7Bbad")
    assert status == 400, body
    assert api.request("GET", "/containers/json?all=maybe")[0] == 400
    # the service still answers, and created nothing
    assert api.request("GET", "/_ping")[0] == 200
    assert api.v("ps", "-aq").stdout == b""


def test_docker_run_chooses_the_isolation(api: Api) -> None:
    """`docker run --isolation=hyperv` boots a micro-VM (the guest's kernel answers), `process`
    runs under runc (the host's); output, streams and the exit code come through."""
    guest = api.v("run", "--rm", "--isolation=vm", "busybox", "uname", "-r").stdout
    assert guest and guest.decode().strip() != platform.release()
    r = api.docker("run", "--rm", "--isolation=hyperv", "busybox", "uname", "-r")
    assert (r.returncode, r.stdout) == (0, guest), r.stderr
    r = api.docker("run", "--rm", "--isolation=process", "busybox", "uname", "-r")
    assert (r.returncode, r.stdout.decode().strip()) == (0, platform.release()), r.stderr
    r = api.docker("run", "--rm", "--isolation=process", "busybox", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (r.returncode, r.stdout, r.stderr) == (4, b"out\n", b"err\n")
    assert api.v("ps", "-aq").stdout == b""  # --rm: removed once its exit code was read


def test_detached_containers_are_vmrts_own(api: Api) -> None:
    """One state: what docker starts `vmrt ps` shows, and the other way round; logs, inspect,
    stop, start and rm work across both."""
    r = api.docker("run", "-d", "--name", "web", "--isolation=process", "-e", "GREETING=hi", "busybox", "sh", "-c",
                   'echo "$GREETING"; echo oops >&2; exec sleep 300')
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    assert api.v("ps", "-q", "--no-trunc").stdout.decode().split() == [cid]
    r = api.v("run", "-d", "--name", "own", "--isolation=process", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    names = api.docker("ps", "--format", "{{.Names}}").stdout.decode().split()
    assert sorted(names) == ["own", "web"]
    deadline = time.monotonic() + 30
    while b"hi" not in (r := api.docker("logs", "web")).stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (r.stdout, r.stderr) == (b"hi\n", b"oops\n"), r
    doc = json.loads(api.docker("inspect", "web").stdout)[0]
    assert doc["Id"] == cid and doc["State"]["Running"] and "GREETING=hi" in doc["Config"]["Env"]
    r = api.docker("stop", "-t", "1", "web")
    assert r.returncode == 0, r.stderr
    assert api.v("inspect", "-f", "{{.State.Status}}", "web").stdout.strip() == b"exited"
    assert api.docker("start", "web").returncode == 0
    assert api.v("inspect", "-f", "{{.State.Status}}", "web").stdout.strip() == b"running"
    r = api.docker("rm", "own")  # running: refused without -f, as Docker
    assert r.returncode != 0 and b"cannot remove a running container" in r.stderr.lower(), r.stderr
    assert api.docker("rm", "-f", "own", "web").returncode == 0
    assert api.v("ps", "-aq").stdout == b""
    api.v.assert_clean()


@pytest.mark.parametrize("isolation", ["process", "hyperv"])
def test_docker_exec_in_either_isolation(api: Api, isolation: str) -> None:
    """`docker exec`: output on its streams, the exit code (from the exec's inspect), a
    detached exec's effect, stdin (-i), and a terminal (-it) that follows the client's size."""
    r = api.docker("run", "-d", "--name", "ex", f"--isolation={isolation}", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    r = api.docker("exec", "ex", "sh", "-c", "echo in-exec; echo err >&2; exit 5")
    assert (r.returncode, r.stdout, r.stderr) == (5, b"in-exec\n", b"err\n")
    assert api.docker("exec", "-d", "ex", "sh", "-c", "echo left > /tmp/mark").returncode == 0
    deadline = time.monotonic() + 30
    while (r := api.docker("exec", "ex", "cat", "/tmp/mark")).stdout != b"left\n" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.stdout == b"left\n", r.stderr
    r = api.docker("exec", "ex", "nosuchcommand")
    assert r.returncode in (126, 127), r
    r = api.docker("exec", "-i", "ex", "sh", "-c", "tr a-z A-Z; exit 4", input=b"piped to the exec\n" * 1000)
    assert (r.returncode, r.stdout) == (4, b"PIPED TO THE EXEC\n" * 1000), r.stderr
    status, out = api.terminal("exec", "-it", "ex", "sh", steps=[
        (b"", b"# "), (b"stty size\r", b"33 101", 1.0), (b"echo $TERM; tty\r", b"/dev/pts/"),
        ((40, 120), b""), (b"stty size\r", b"40 120"), (b"exit 6\r", b"")])
    assert status == 6 and b"xterm\r\n/dev/pts/" in out, out
    assert api.docker("rm", "-f", "ex").returncode == 0
    status, _, body = api.request("POST", "/containers/ex/exec", json.dumps({"Cmd": ["true"]}).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 404, body
    api.v.assert_clean()


@pytest.mark.parametrize("isolation", ["process", "hyperv"])
def test_docker_run_interactive_and_terminals(api: Api, isolation: str) -> None:
    """`docker run -i` feeds the container's stdin and ends it at the client's EOF (StdinOnce);
    `docker run -it` is a terminal of the client's size; `docker attach` to a `-dit` container
    types into it, and Ctrl-P Ctrl-Q detaches, leaving it running."""
    r = api.docker("run", "-i", "--rm", f"--isolation={isolation}", "busybox", "sh", "-c", "wc -l; exit 3",
                   input=b"line\n" * 500)
    assert (r.returncode, r.stdout.strip()) == (3, b"500"), r.stderr
    status, out = api.terminal("run", "-it", "--rm", f"--isolation={isolation}", "busybox", "sh", steps=[
        (b"", b"# "), (b"stty size\r", b"33 101", 1.0), (b"echo $TERM; tty\r", b"/dev/"),
        ((40, 120), b""), (b"stty size\r", b"40 120"),
        (b"exit 7\r", b"")])
    assert status == 7 and b"xterm\r\n/dev/" in out, out
    r = api.docker("run", "-dit", "--name", "term", f"--isolation={isolation}", "busybox", "sh")
    assert r.returncode == 0, r.stderr
    status, out = api.terminal("attach", "term", steps=[(b"echo typed-$((6*7))\r", b"typed-42"),
                                                        (b"\x10\x11", b"read escape sequence")])
    assert status in (0, 1), out  # docker 20.10's attach exits 1 after the escape
    assert api.v("inspect", "-f", "{{.State.Status}}", "term").stdout.strip() == b"running"
    assert b"typed-42" in api.docker("logs", "term").stdout
    assert api.docker("rm", "-f", "term").returncode == 0
    api.v.assert_clean()


def test_docker_volumes_are_vmrts_named_volumes(api: Api) -> None:
    assert api.docker("volume", "create", "web-data").stdout == b"web-data\n"
    r = api.docker("run", "--rm", "--isolation=hyperv", "-v", "web-data:/data", "busybox", "sh", "-c",
                   "echo persisted > /data/f")
    assert r.returncode == 0, r.stderr
    r = api.docker("run", "--rm", "--isolation=process", "--mount", "type=volume,source=web-data,target=/data",
                   "busybox", "cat", "/data/f")
    assert (r.returncode, r.stdout) == (0, b"persisted\n"), r.stderr
    assert api.v("volume", "ls", "-q").stdout == b"web-data\n"
    doc = json.loads(api.docker("volume", "inspect", "web-data").stdout)[0]
    assert doc["Mountpoint"].endswith("/volumes/web-data/_data")
    r = api.docker("run", "-d", "--name", "holder", "--isolation=process", "-v", "web-data:/d", "busybox", "sleep",
                   "300")
    assert r.returncode == 0, r.stderr
    r = api.docker("volume", "rm", "web-data")
    assert r.returncode != 0 and b"in use" in r.stderr, r.stderr
    assert api.docker("rm", "-f", "holder").returncode == 0
    assert api.docker("volume", "rm", "web-data").returncode == 0
    status, _, body = api.request("GET", "/volumes/web-data")
    assert status == 404, body
    api.v.assert_clean()


def test_networks_aliases_and_labels_through_docker(api: Api) -> None:
    """A user network made through the API, a container found there by its alias from a VM, and
    labels kept and filtered on (Compose finds its containers so)."""
    assert api.docker("network", "create", "appnet").returncode == 0
    assert "appnet" in api.v("network", "ls", "--format", "{{.Name}}").stdout.decode().split()
    r = api.docker("run", "-d", "--name", "srv", "--network", "appnet", "--network-alias", "db", "-l", "app=web",
                   "--isolation=process", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    r = api.docker("run", "--rm", "--network", "appnet", "--isolation=hyperv", "busybox", "sh", "-c",
                   "ping -c1 -W5 db >/dev/null && echo reached")
    assert (r.returncode, r.stdout) == (0, b"reached\n"), r.stderr
    assert api.docker("ps", "-q", "--filter", "label=app=web").stdout.strip() == \
        api.v("ps", "-q", "--filter", "label=app").stdout.strip() != b""
    assert api.docker("ps", "-q", "--filter", "label=app=db").stdout == b""
    doc = json.loads(api.docker("network", "inspect", "appnet").stdout)[0]
    assert [c["Name"] for c in doc["Containers"].values()] == ["srv"]
    r = api.docker("network", "rm", "appnet")  # a running container on it
    assert r.returncode != 0, r.stderr
    assert api.docker("rm", "-f", "srv").returncode == 0
    assert api.docker("network", "rm", "appnet").returncode == 0
    assert api.request("GET", "/networks/appnet")[0] == 404
    api.v.assert_clean()


def test_a_compose_project_with_a_vm_service(api: Api, tmp_path: Path) -> None:
    """Debian's docker-compose against the service: a web server in a micro-VM on a named volume,
    with a health check and a published port; a client in process mode, started once the server
    is healthy (depends_on: service_healthy), finding it by its service name on the project's
    network; logs, exec, and `down -v` leave no container, network or volume behind."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "docker-compose.yml").write_text(COMPOSE_FILE)
    r = api.compose(proj, "up", "-d")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    while b"hello-from-web" not in (r := api.compose(proj, "logs", "--no-color", "client")).stdout:
        assert time.monotonic() < deadline, (r.stdout, r.stderr)
        time.sleep(1)
    states = api.docker("ps", "--format", "{{.Names}} {{.State}}").stdout.decode().split("\n")
    assert sorted(filter(None, states)) == ["demo_client_1 running", "demo_web_1 running"], states
    # the client started once the web server was healthy; the server's published port answers
    assert b"(healthy)" in api.docker("ps", "--filter", "name=demo_web_1", "--format", "{{.Status}}").stdout
    port = api.compose(proj, "port", "web", "80").stdout.decode().strip()
    assert port.startswith("127.0.0.1:"), port
    with urllib.request.urlopen(f"http://{port}/", timeout=30) as resp:
        assert resp.read() == b"hello-from-web\n"
    guest = api.v("run", "--rm", "--isolation=vm", "busybox", "uname", "-r").stdout
    r = api.compose(proj, "exec", "-T", "web", "uname", "-r")
    assert (r.returncode, r.stdout) == (0, guest), r.stderr
    assert "demo_webdata" in api.v("volume", "ls", "-q").stdout.decode().split()
    r = api.compose(proj, "down", "-v")
    assert r.returncode == 0, r.stderr
    assert api.v("ps", "-aq").stdout == b"" and api.v("volume", "ls", "-q").stdout == b""
    assert "demo_default" not in api.v("network", "ls", "--format", "{{.Name}}").stdout.decode().split()
    api.v.assert_clean()


def test_stats_rename_images_and_prune_through_docker(api: Api) -> None:
    r = api.docker("run", "-d", "--name", "busy", "--isolation=process", "busybox", "sh", "-c", "while :; do :; done")
    assert r.returncode == 0, r.stderr
    r = api.docker("stats", "--no-stream", "--format", "{{.Name}} {{.CPUPerc}} {{.PIDs}}")
    name, cpu, pids = r.stdout.decode().split()
    assert name == "busy" and float(cpu.rstrip("%")) > 10 and int(pids) >= 1, r
    assert api.docker("rename", "busy", "spinner").returncode == 0
    assert api.v("ps", "--format", "{{.Names}}").stdout == b"spinner\n"
    assert api.docker("tag", "busybox", "mybox:v1").returncode == 0
    assert api.docker("images", "-q", "mybox").stdout.strip() == api.docker("images", "-q", "busybox").stdout.strip()
    assert b"mybox:v1" not in api.docker("images", "--filter", "reference=busybox").stdout
    r = api.docker("images", "mybox", "--format", "{{.Repository}}:{{.Tag}}")  # its matching tags only
    assert r.stdout == b"mybox:v1\n", r
    r = api.docker("rmi", "mybox:v1")
    assert (r.returncode, r.stdout) == (0, b"Untagged: mybox:v1\n"), r.stderr
    r = api.docker("kill", "spinner")  # returns once it is stopped: a remove right after it works
    assert r.returncode == 0 and api.docker("rm", "spinner").returncode == 0, r
    assert api.docker("run", "--isolation=process", "--name", "done", "busybox", "true").returncode == 0
    r = api.docker("container", "prune", "-f")
    assert r.returncode == 0 and api.v("ps", "-aq").stdout == b"", r
    r = api.docker("search", "busybox")
    assert r.returncode != 0 and b"not supported" in r.stderr
    api.v.assert_clean()


def test_events_cover_the_api_and_the_cli(api: Api) -> None:
    """`docker events`: what the API did and what vmrt's own CLI did (one state), with a --rm
    container's die (its exit code) before its destroy, a health check's status; filters by
    event and label."""
    t0 = int(time.time())
    r = api.docker("run", "--rm", "--isolation=process", "--name", "evt", "-l", "team=a", "busybox", "sh", "-c",
                   "exit 3")
    assert r.returncode == 3, r.stderr
    assert api.v("run", "-d", "--name", "clirun", "--isolation=process", "--health-cmd", "true",
                 "--health-interval", "300ms", "busybox", "sleep", "300").returncode == 0
    assert api.docker("volume", "create", "evvol").returncode == 0
    deadline = time.monotonic() + 30
    while b"healthy" not in api.docker("inspect", "-f", "{{.State.Health.Status}}", "clirun").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.5)  # the service reads the state every half second
    fmt = "{{.Type}} {{.Action}} {{.Actor.Attributes.name}} {{.Actor.Attributes.exitCode}}"
    r = api.docker("events", "--since", str(t0), "--until", str(int(time.time()) + 1), "--format", fmt)
    lines = [ln.split() for ln in r.stdout.decode().splitlines()]
    evt = [ln[1:] for ln in lines if ln[0] == "container" and ln[2] == "evt"]
    assert [e[0] for e in evt] == ["create", "start", "die", "destroy"] and evt[2][2] == "3", lines
    assert [ln[1] for ln in lines if ln[2:3] == ["clirun"]] == ["create", "start"], lines
    assert ["container", "health_status:", "healthy", "clirun"] in [ln[:4] for ln in lines], lines
    assert ["volume", "create"] in [ln[:2] for ln in lines]
    r = api.docker("events", "--since", str(t0), "--until", str(int(time.time()) + 1), "--filter", "event=die",
                   "--filter", "label=team=a", "--format", fmt)
    assert r.stdout.decode().split() == ["container", "die", "evt", "3"], r
    assert api.request("GET", "/events?filters=%7B%22bogus%22%3A%5B%22x%22%5D%7D")[0] == 400
    assert api.v("rm", "-f", "clirun").returncode == 0 and api.v("volume", "rm", "evvol").returncode == 0
    api.v.assert_clean()


def test_the_docker_sdk_drives_both_isolations(api: Api) -> None:
    docker = pytest.importorskip("docker")
    client = docker.DockerClient(base_url=f"unix://{api.sock}")
    try:
        assert client.ping()
        assert client.containers.run("busybox", ["echo", "from-vm"], remove=True, isolation="hyperv") == b"from-vm\n"
        c = client.containers.run("busybox", ["sleep", "300"], detach=True, name="sdk", isolation="process")
        c.reload()
        assert c.status == "running" and [x.name for x in client.containers.list()] == ["sdk"]
        c.kill()
        assert c.wait()["StatusCode"] == 137
        c.remove()
        assert any("busybox:latest" in i.tags for i in client.images.list())
        with pytest.raises(docker.errors.NotFound):
            client.containers.get("sdk")
    finally:
        client.close()
    api.v.assert_clean()


def test_clients_that_go_away_and_autoremove_leave_nothing(api: Api) -> None:
    """A client that disconnects while it waits or attaches does not take the service down; the
    service's stop leaves the containers it started running (their monitors own them); a
    detached AutoRemove container is removed once it exited, with nobody waiting."""
    r = api.docker("run", "-d", "--isolation=process", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    for path in (f"/containers/{cid}/wait", f"/containers/{cid}/attach?stream=1&stdout=1"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(api.sock))
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nUpgrade: tcp\r\nConnection: Upgrade\r\n\r\n".encode())
        time.sleep(0.5)
        s.close()
    assert api.request("GET", "/_ping")[0] == 200
    r = api.docker("run", "-d", "--rm", "--isolation=process", "busybox", "true")
    assert r.returncode == 0, r.stderr
    gone = r.stdout.decode().strip()
    deadline = time.monotonic() + 30
    while gone in api.v("ps", "-aq", "--no-trunc").stdout.decode() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert gone not in api.v("ps", "-aq", "--no-trunc").stdout.decode()
    # the service ends; the container it started runs on
    api.proc.send_signal(signal.SIGTERM)
    api.proc.wait(30)
    assert api.v("inspect", "-f", "{{.State.Status}}", cid).stdout.strip() == b"running"
    assert api.v("rm", "-f", cid).returncode == 0
    api.v.assert_clean()


def test_vmrt_compose_starts_the_service_it_needs(vmrt: Vmrt, tmp_path: Path) -> None:
    """`vmrt compose ARGS` is Debian's docker-compose against vmrt: with no service running, it
    starts one on the default socket (<run root>/docker.sock) and leaves it serving."""
    proj = tmp_path / "solo"
    proj.mkdir()
    (proj / "docker-compose.yml").write_text(
        'version: "2.4"\nservices:\n  app:\n    image: busybox\n    isolation: process\n'
        '    command: ["sleep", "300"]\n')
    sock = vmrt.run_root / "docker.sock"
    assert not sock.exists()
    compose = ["compose", "--no-ansi", "-p", "solo", "-f", str(proj / "docker-compose.yml")]
    try:
        r = vmrt(*compose, "up", "-d")
        assert r.returncode == 0, r.stderr
        assert sock.is_socket()
        assert vmrt("ps", "--format", "{{.Names}} {{.State}}").stdout == b"solo_app_1 running\n"
        r = vmrt(*compose, "ps")
        assert r.returncode == 0 and b"solo_app_1" in r.stdout and b"Up" in r.stdout, r
        r = vmrt(*compose, "down")
        assert r.returncode == 0, r.stderr
        assert vmrt("ps", "-aq").stdout == b""
    finally:
        pid = int((vmrt.run_root / "api.pid").read_text())  # the service it started: stopped as its user would
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not sock.exists() and not (vmrt.run_root / "api.pid").exists()
    vmrt.assert_clean()


def test_restarts_and_failed_starts_through_the_service(api: Api) -> None:
    """The service's containers end through its fork server (the C monitor asks it for the
    finish): a restart policy still restarts, a start that fails still says why (Docker's
    exit codes), and exits are recorded with their status."""
    r = api.docker("run", "-d", "--name", "flaky", "--isolation=process", "--restart", "on-failure:2", "busybox",
                   "sh", "-c", "exit 3")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    while (api.docker("inspect", "-f", "{{.RestartCount}} {{.State.Status}}", "flaky").stdout.split()
           != [b"2", b"exited"]):
        assert time.monotonic() < deadline, api.docker("inspect", "flaky").stdout
        time.sleep(0.2)
    assert api.docker("wait", "flaky").stdout.strip() == b"3"
    for isolation in ("process", "hyperv"):
        r = api.docker("run", "--rm", f"--isolation={isolation}", "busybox", "nosuchcommand")
        assert r.returncode == 127 and b"nosuchcommand" in r.stderr, r
        r = api.docker("run", "--rm", f"--isolation={isolation}", "busybox", "sh", "-c", "echo out; exit 9")
        assert (r.returncode, r.stdout) == (9, b"out\n"), r
    assert api.docker("rm", "flaky").returncode == 0
    api.v.assert_clean()
