"""The everyday examples (examples/, issue 20 part 5) in both isolations: Debian's Tomcat answers on
a published port; Debian's MariaDB serves a client container on a user network, keeps its rows on
a named volume across a new server container, and refuses a first start without a password.

The images are big and their RUN steps download Debian's packages, so scripts/test.sh builds them
(process isolation, before pytest) into the host's store; this module copies them into the test's
private store (save, load) and sends traffic only to 127.0.0.1 and between its own containers.
Run outside scripts/test.sh without those images, it skips and says how to build them; under
scripts/test.sh (VMRT_EXAMPLES_BUILT=1) a missing image fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt

MODES = ["process", pytest.param("vm", marks=pytest.mark.vm)]
TOMCAT = "vmrt-examples/tomcat:latest"
MARIADB = "vmrt-examples/mariadb:latest"
TOMCAT_MEMORY = "768m"   # a VM's: the JVM's heap (-Xmx192m), its code cache and Tomcat
MARIADB_MEMORY = "512m"  # a VM's: InnoDB's 128 MiB buffer pool and the server
START_TIMEOUT = 420.0    # a JVM or mariadbd starting under TCG (a VM without KVM): minutes (Tomcat ~2.5)
NO_PASSWORD = ("error: database is uninitialized and password option is not specified: set one of "
               "MARIADB_ROOT_PASSWORD, MARIADB_ALLOW_EMPTY_ROOT_PASSWORD, MARIADB_RANDOM_ROOT_PASSWORD "
               "(or their MYSQL_ names)")


def _host_vmrt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
    """vmrt on the host's own store (where scripts/test.sh built the examples)."""
    return subprocess.run([sys.executable, "-m", "vmrt", *args], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def examples(vmrt_session: Vmrt, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Both examples' images in the session's store (removed at the module's end)."""
    missing = [ref for ref in (TOMCAT, MARIADB) if _host_vmrt("image", "inspect", ref).returncode != 0]
    if missing:
        how = ("scripts/test.sh builds them: vmrt image build images/debian; "
               "vmrt build --isolation=process -t vmrt-examples/NAME:latest examples/NAME")
        if os.environ.get("VMRT_EXAMPLES_BUILT"):
            pytest.fail(f"VMRT_EXAMPLES_BUILT is set but {', '.join(missing)} is not in vmrt's store ({how})")
        pytest.skip(f"{', '.join(missing)} not built ({how})")
    archive = tmp_path_factory.mktemp("examples") / "examples.tar"
    r = _host_vmrt("save", "-o", str(archive), TOMCAT, MARIADB)
    assert r.returncode == 0, r.stderr.decode()
    try:
        r = vmrt_session("load", "-q", "-i", str(archive), timeout=600)
        assert r.returncode == 0, r.stderr.decode()
    finally:
        archive.unlink()
    yield
    vmrt_session("rmi", TOMCAT, MARIADB)


@pytest.fixture
def vmrt(vmrt: Vmrt) -> Iterator[Vmrt]:
    """conftest's, plus: a failed test's containers and networks are removed before the leak check."""
    yield vmrt
    vmrt.remove_all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _running(v: Vmrt, cid: str) -> bool:
    r = v("inspect", "--format", "{{.State.Running}}", cid)
    return r.stdout.strip() == b"true"


def _logs(v: Vmrt, cid: str) -> str:
    r = v("logs", cid)
    return (r.stdout + r.stderr).decode(errors="replace")[-4000:]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _wait_http(v: Vmrt, cid: str, url: str) -> str:
    """The page at url, polled while the server starts (at most START_TIMEOUT); fails at once with
    the container's log if the container ends."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            status, body = _get(url)
            if status == 200:
                return body
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        assert _running(v, cid), f"the container ended:\n{_logs(v, cid)}"
        assert time.monotonic() < deadline, f"no page after {START_TIMEOUT:.0f} s:\n{_logs(v, cid)}"
        time.sleep(2)


def _wait_log(v: Vmrt, cid: str, text: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while text not in (out := _logs(v, cid)):
        assert _running(v, cid), f"the container ended:\n{out}"
        assert time.monotonic() < deadline, f"no {text!r} after {START_TIMEOUT:.0f} s:\n{out}"
        time.sleep(2)


def _memory(mode: str, size: str) -> tuple[str, ...]:
    return ("-m", size) if mode == "vm" else ()


@pytest.mark.parametrize("mode", MODES)
def test_tomcat_serves_its_page_on_a_published_port(vmrt: Vmrt, examples: None, mode: str) -> None:
    """`run -d -p 127.0.0.1:PORT:8080`: Tomcat (Debian's tomcat10, catalina.sh run, as the user
    tomcat) serves the ROOT webapp's page; an unknown path is Tomcat's own 404."""
    port = _free_port()
    r = vmrt("run", "-d", f"--isolation={mode}", *_memory(mode, TOMCAT_MEMORY), "-p", f"127.0.0.1:{port}:8080",
             TOMCAT)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        page = _wait_http(vmrt, cid, f"http://127.0.0.1:{port}/")
        assert "<h1>Hello from Tomcat on vmrt</h1>" in page, page
        status, body = _get(f"http://127.0.0.1:{port}/nope")
        assert status == 404 and "Apache Tomcat" in body, (status, body)
        # the server's owner (minbase has no ps: /proc; the pattern does not match its own shell)
        r = vmrt("exec", cid, "bash", "-c", "for d in /proc/[0-9]*; do tr '\\0' ' ' <$d/cmdline 2>/dev/null | "
                 "grep -q 'catalina[.]startup[.]Bootstrap' && stat -c %U $d; done; true")
        assert r.returncode == 0 and r.stdout == b"tomcat\n", (r.stdout, r.stderr)
        r = vmrt("stop", "-t", "60", cid, timeout=120)
        assert r.returncode == 0, r.stderr
        # the JVM ended by SIGTERM after its shutdown hooks (Tomcat's stop), not killed
        assert json.loads(vmrt("inspect", cid).stdout)[0]["State"]["ExitCode"] == 143, _logs(vmrt, cid)
    finally:
        vmrt("rm", "-f", cid)
    vmrt.assert_clean()


WRITES = ("touch /var/lib/tomcat10/logs/access.txt && mkdir -p /var/lib/tomcat10/work/Catalina/localhost "
          "&& mkdir /var/lib/tomcat10/conf/Catalina/localhost && echo written")


@pytest.mark.parametrize("mode", MODES)
def test_tomcat_user_writes_its_logs_work_and_conf_dirs(vmrt: Vmrt, examples: None, mode: str) -> None:
    """What Tomcat writes as the user tomcat (Debian's layout: the access log in /var/log/tomcat10,
    compiled pages in /var/cache/tomcat10, deployment descriptors in /etc/tomcat10/Catalina), in
    directories the apt RUN layer made (a VM copies them up into its own upper layer)."""
    r = vmrt("run", "--rm", f"--isolation={mode}", TOMCAT, "sh", "-c", WRITES)
    assert (r.returncode, r.stdout) == (0, b"written\n"), r.stderr


@pytest.mark.vm
def test_tomcat_user_writes_its_dirs_in_a_restored_vm(vmrt: Vmrt, examples: None, snap: Path) -> None:
    """The same in a VM restored from the default shape's snapshot (the default for a VM run):
    its share is 9p, whose helper once handed the guest an empty xattr name for a directory
    opaque in a layer (Debian's /var/log/tomcat10), and the copy-up failed (EOPNOTSUPP)."""
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", TOMCAT, "sh", "-c", WRITES)
    assert f"snapshot={snap.name}".encode() in r.stderr, r.stderr  # restored, not booted
    assert (r.returncode, r.stdout) == (0, b"written\n"), r.stderr


def _client(v: Vmrt, mode: str, net: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The mariadb client in a container of its own (the example's image) on the network ``net``."""
    return v("run", "--rm", f"--isolation={mode}", "--network", net, MARIADB, "mariadb", "-h", "db", *args,
             timeout=START_TIMEOUT)


@pytest.mark.parametrize("mode", MODES)
def test_mariadb_serves_a_client_and_keeps_its_data_on_a_volume(vmrt: Vmrt, examples: None, mode: str) -> None:
    """A first start without a password variable: one clear line, exit 1. A server with
    MARIADB_ROOT_PASSWORD, MYSQL_DATABASE, MYSQL_USER and MYSQL_PASSWORD (with quotes and a
    backslash) on a named volume: a client container on the user network (the server's alias db)
    creates a table and a row as that user; the server is removed and a new one, given no
    password, starts on the same volume: the row is there for root."""
    net, vol = f"exnet-{mode}", f"exdata-{mode}"
    r = vmrt("run", "--rm", f"--isolation={mode}", *_memory(mode, MARIADB_MEMORY), MARIADB, timeout=START_TIMEOUT)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.decode().strip().splitlines()[-1] == NO_PASSWORD, r.stderr

    assert vmrt("network", "create", net).returncode == 0
    app_password = "pa'ss\"w\\rd"
    server = ("run", "-d", f"--isolation={mode}", *_memory(mode, MARIADB_MEMORY), "--network", net,
              "--network-alias", "db", "-v", f"{vol}:/var/lib/mysql")
    try:
        r = vmrt(*server, "-e", "MARIADB_ROOT_PASSWORD=r00t", "-e", "MYSQL_DATABASE=appdb", "-e", "MYSQL_USER=app",
                 "-e", f"MYSQL_PASSWORD={app_password}", MARIADB)
        assert r.returncode == 0, r.stderr
        first = r.stdout.decode().strip()
        _wait_log(vmrt, first, "port: 3306")
        r = _client(vmrt, mode, net, "-uapp", f"-p{app_password}", "appdb", "-e",
                    "CREATE TABLE kept (id INT PRIMARY KEY, what VARCHAR(40)); "
                    "INSERT INTO kept VALUES (1, 'written before the restart');")
        assert r.returncode == 0, (r.stderr, _logs(vmrt, first))
        r = vmrt("stop", "-t", "120", first, timeout=180)
        assert r.returncode == 0, r.stderr
        assert vmrt("rm", first).returncode == 0

        r = vmrt(*server, MARIADB)  # no password: the data directory is set up already
        assert r.returncode == 0, r.stderr
        second = r.stdout.decode().strip()
        _wait_log(vmrt, second, "port: 3306")
        assert "is set up already" in _logs(vmrt, second)
        r = _client(vmrt, mode, net, "-uroot", "-pr00t", "--batch", "--skip-column-names", "-e",
                    "SELECT id, what FROM appdb.kept; SELECT CURRENT_USER();")
        assert r.returncode == 0, (r.stderr, _logs(vmrt, second))
        assert r.stdout.decode().splitlines() == ["1\twritten before the restart", "root@%"], r.stdout
        r = _client(vmrt, mode, net, "-uroot", "-pwrong", "-e", "SELECT 1")
        assert r.returncode == 1 and b"Access denied for user 'root'" in r.stderr, r.stderr
        assert vmrt("rm", "-f", second).returncode == 0
    finally:  # what a failure left (the fixture removes the containers and the network too)
        vmrt.remove_all()
        vmrt("volume", "rm", "-f", vol)
    assert vol not in vmrt("volume", "ls", "-q").stdout.decode().split()
    assert net not in vmrt("network", "ls", "--format", "{{.Name}}").stdout.decode().split()
    vmrt.assert_clean()
