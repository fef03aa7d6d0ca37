"""The compatibility suite: unmodified Debian programs, both isolations, the same output.

Each case runs one command in ``debian-compat:bookworm`` (images/debian-compat: stock Debian 12
packages, built by mmdebstrap and cached) under ``--isolation=process`` and ``--isolation=vm``,
and asserts the same exit status and the same output once what legitimately differs (times,
pids, ICMP ids, the veth peer's index) is normalised. docs/COMPATIBILITY.md has the results table;
differences that are intended are in docs/ISOLATION.md, pinned by a test there.
"""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from support import REPO, Vmrt

pytestmark = pytest.mark.vm
MODES = ("process", "vm")
IMAGE = "debian-compat:bookworm"


@pytest.fixture(scope="module", autouse=True)
def compat_image(vmrt_session: Vmrt) -> None:
    """The image in the session's store (its root file system from the cache that setup filled; a
    first build takes about a minute)."""
    r = vmrt_session("image", "build", str(REPO / "images" / "debian-compat"), timeout=900)
    assert r.returncode == 0, r.stderr.decode()


def _same(text: str) -> str:
    return text


def both(vmrt: Vmrt, script: str, normalise: Callable[[str], str] = _same, *, args: tuple[str, ...] = (),
         timeout: float = 300) -> tuple[int, str, str]:
    """``bash -c script`` in both modes (``args``: more ``run`` flags); asserts equal (exit status,
    stdout, stderr) after ``normalise``; returns the process mode's."""
    out = {}
    for mode in MODES:
        r = vmrt("run", "--rm", f"--isolation={mode}", *args, IMAGE, "bash", "-c", script, timeout=timeout)
        out[mode] = (r.returncode, normalise(r.stdout.decode(errors="replace")),
                     normalise(r.stderr.decode(errors="replace")))
    assert out["process"] == out["vm"], out
    return out["process"]


def test_nginx_stock_config_serves_ipv4_and_ipv6(vmrt: Vmrt) -> None:
    """Debian's nginx as installed: its default site listens on 0.0.0.0:80 and [::]:80 (a guest
    kernel without IPv6 fails here: 'socket() [::]:80 failed (97)'); epoll, sendfile, a master
    and a worker process, a graceful quit by signal."""
    script = r"""
        nginx || exit 1
        curl -sS http://127.0.0.1/ | grep -o '<title>.*</title>'
        curl -sS -6 'http://[::1]/' | grep -o '<title>.*</title>'
        curl -sS -o /dev/null -w '%{http_code} %{size_download}\n' 'http://[::1]/nope'
        ps -C nginx -o user=,args= | sort -u  # worker_processes auto: one per CPU (ISOLATION.md: nproc)
        nginx -s quit && for i in $(seq 50); do pgrep -x nginx >/dev/null || break; sleep 0.2; done
        pgrep -x nginx || echo stopped
    """
    rc, out, err = both(vmrt, script, lambda s: re.sub(r"^\S+ \S+ \[notice\] \d+#\d+: ", "", s, flags=re.M))
    assert rc == 0, err
    assert out.splitlines() == ["<title>Welcome to nginx!</title>"] * 2 + [
        "404 153", "root     nginx: master process nginx", "www-data nginx: worker process", "stopped"]


def test_redis_server_stock_config(vmrt: Vmrt) -> None:
    """Debian's redis-server with its own /etc/redis/redis.conf (daemonized, bound to 127.0.0.1
    and ::1): epoll, a fork for the background save, fsync, a clean shutdown."""
    script = r"""
        redis-server /etc/redis/redis.conf || exit 1
        for i in $(seq 100); do redis-cli ping 2>/dev/null | grep -q PONG && break; sleep 0.2; done
        redis-cli set k v; redis-cli get k; redis-cli incr n; redis-cli -h ::1 incr n
        redis-cli rpush l a b c; redis-cli lrange l 0 -1
        redis-cli bgsave  # a forked child writes the snapshot
        for i in $(seq 100); do
            redis-cli info persistence | grep -q 'rdb_bgsave_in_progress:0' && break; sleep 0.2
        done
        redis-cli info persistence | grep -o 'rdb_last_bgsave_status:ok'
        redis-cli save; ls /var/lib/redis
        redis-cli shutdown; for i in $(seq 50); do pgrep -x redis-server >/dev/null || break; sleep 0.2; done
        grep -c 'Ready to accept connections' /var/log/redis/redis-server.log
        pgrep -x redis-server || echo stopped
    """
    rc, out, err = both(vmrt, script)
    assert rc == 0, err
    assert out.split() == ["OK", "v", "1", "2", "3", "a", "b", "c", "Background", "saving", "started",
                           "rdb_last_bgsave_status:ok", "OK", "dump.rdb", "1", "stopped"]


def _net(text: str) -> str:
    text = re.sub(r"eth0@if\d+", "eth0", text)  # process mode's veth names its peer's index
    text = re.sub(r"\s+tentative", "", text)      # duplicate address detection: timing
    text = re.sub(r"time[=<][\d.]+ ?ms", "time=T", text)
    text = re.sub(r"(time|rtt) .*ms$", r"\1 T", text, flags=re.M)
    text = re.sub(r"^\d\d:\d\d:\d\d\.\d+ ", "", text, flags=re.M)  # tcpdump's timestamps
    return re.sub(r"\bid \d+", "id N", text)


def test_network_tools_ip_ping_tcpdump(vmrt: Vmrt) -> None:
    """iproute2 over rtnetlink (the IPv6 addresses: ::1 and eth0's link-local), ping over ICMP
    sockets (v4 and v6), and tcpdump capturing with AF_PACKET on lo and on eth0 (an echo to the
    network's gateway)."""
    script = r"""
        ip -6 addr show dev lo; ip -o -4 addr show dev eth0 | awk '{print $2, $3, $4}' | sed 's#[0-9.]*/#ADDR/#'
        ping -c 2 -i 0.2 127.0.0.1 | grep -E 'bytes from|transmitted'
        ping -6 -c 2 -i 0.2 ::1 | grep -E 'bytes from|transmitted'
        capture() {  # capture(interface, ping args...): tcpdump's decode of 2 echoes and replies
            dev=$1; shift
            tcpdump -i "$dev" -n -l -c 4 icmp >/tmp/td.out 2>/tmp/td.err & td=$!
            for i in $(seq 100); do grep -q 'listening on' /tmp/td.err && break; sleep 0.1; done
            ping -c 2 -i 0.2 "$@" >/dev/null; wait $td; echo "tcpdump exit $?"
            cat /tmp/td.out; grep -E 'listening|captured' /tmp/td.err
        }
        capture lo 127.0.0.1
        gw=$(ip route | awk '/^default/ {print $3}'); me=$(ip -o -4 addr show dev eth0 | awk '{print $4}')
        capture eth0 "$gw" | sed -e "s/$gw/GW/g" -e "s#${me%/*}#ME#g"
    """
    rc, out, err = both(vmrt, script, _net)
    assert rc == 0, err
    assert "inet6 ::1/128 scope host" in out and "eth0 inet ADDR/24\n" in out
    assert out.count("ICMP echo request") == 4 and out.count("ICMP echo reply") == 4
    assert "ME > GW: ICMP echo request" in out and "listening on eth0, link-type EN10MB" in out
    assert out.count("tcpdump exit 0") == 2 and "64 bytes from ::1" in out


# the guest kernel's link watcher marks eth0's operstate up some ms after the container starts
# (carrier is on at once: packets flow; COMPATIBILITY.md): read it once it is up
UP = "for i in $(seq 100); do [ $(cat /sys/class/net/eth0/operstate) = up ] && break; sleep 0.05; done; "
IP_SHOW = UP + "ip -o addr; ip -o link; ip route; sysctl net.ipv6.conf.eth0.disable_ipv6"


def _device(text: str) -> str:
    """What differs because eth0 is a veth in process mode and a virtio-net device in VM mode."""
    text = re.sub(r"eth0@if\d+", "eth0", text)
    text = re.sub(r"qdisc (noqueue|pfifo_fast)", "qdisc Q", text)
    return text.replace(" link-netnsid 0", "")


def test_ip_addresses_links_and_routes(vmrt: Vmrt) -> None:
    """``ip`` shows the same addresses, links and routes in both modes, but for the device type."""
    rc, out, err = both(vmrt, IP_SHOW, _device)
    assert rc == 0 and "eth0    inet " in out, err


def test_intended_difference_eth0_device(vmrt: Vmrt) -> None:
    """eth0 is one end of a veth pair in process mode (``@ifN``: its peer on the host; qdisc
    noqueue, a link-netnsid) and a virtio-net device in VM mode (no peer, qdisc pfifo_fast)
    (docs/ISOLATION.md)."""
    links = {}
    for mode in MODES:
        r = vmrt("run", "--rm", f"--isolation={mode}", IMAGE, "bash", "-c", UP + "ip -o link show dev eth0")
        assert r.returncode == 0, r.stderr.decode()
        links[mode] = r.stdout.decode()
    assert re.match(r"2: eth0@if\d+: .* qdisc noqueue .* link-netnsid 0", links["process"])
    assert re.match(r"2: eth0: .* qdisc pfifo_fast ", links["vm"]) and "link-netnsid" not in links["vm"]
    assert _device(links["process"]) == _device(links["vm"])


def test_threads_and_async(vmrt: Vmrt) -> None:
    """pigz compressing with 4 threads (no name or time stored, its output does not depend on
    scheduling), and a Python
    asyncio TCP server with 64 concurrent clients over IPv4 and IPv6 next to a thread pool."""
    program = r"""
import asyncio, concurrent.futures, hashlib, threading
async def echo(r, w):
    w.write((await r.readline()).upper()); await w.drain(); w.close()
async def client(host, port, i):
    r, w = await asyncio.open_connection(host, port)
    w.write(b"msg %d\n" % i); await w.drain()
    line = await r.readline(); w.close(); return line
async def main():
    out = []
    for host in ("127.0.0.1", "::1"):
        srv = await asyncio.start_server(echo, host, 0)
        port = srv.sockets[0].getsockname()[1]
        out += await asyncio.gather(*(client(host, port, i) for i in range(64)))
        srv.close(); await srv.wait_closed()
    return out
lines = asyncio.run(main())
print(len(lines), hashlib.sha256(b"".join(sorted(lines))).hexdigest()[:16])
def work(n): return hashlib.sha256(str(n).encode() * 1000).hexdigest()[:8], threading.get_ident()
with concurrent.futures.ThreadPoolExecutor(8) as ex:
    res = list(ex.map(work, range(200)))
print(len(res), hashlib.sha256("".join(h for h, _ in res).encode()).hexdigest()[:16], len({t for _, t in res}) > 1)
"""
    script = f"""
        seq 1 2000000 > /tmp/in; pigz -n -p 4 -b 128 -c /tmp/in > /tmp/in.gz; echo pigz $?
        sha256sum < /tmp/in.gz | cut -c1-16; pigz -d -c /tmp/in.gz | cmp - /tmp/in && echo round-trip
        python3 -c '{program}'
    """
    rc, out, err = both(vmrt, script)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "pigz 0" and lines[2] == "round-trip"
    assert lines[3].startswith("128 ") and lines[4].startswith("200 ") and lines[4].endswith("True")


def test_file_notifications_and_inode_numbers(vmrt: Vmrt, tmp_path: Path) -> None:
    """dnotify (fcntl F_NOTIFY and SIGIO), inotify (the libc calls, by ctypes), fanotify (refused
    without CAP_SYS_ADMIN in both), and readdir's inode numbers equal to stat's on the image's
    files, the writable layer and a volume (tools that match files by inode: find -inum, rsync,
    Python's os.scandir): a VM's root file system used to differ."""
    program = r"""
import ctypes, errno, fcntl, os, signal, struct, time
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/w/d", exist_ok=True)
got = []
signal.signal(signal.SIGIO, lambda *a: got.append("SIGIO"))
fd = os.open("/w/d", os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_MULTISHOT)
open("/w/d/new", "w").close()
for _ in range(100):
    if got: break
    time.sleep(0.01)
print("dnotify", got[:1])
ino = libc.inotify_init1(os.O_NONBLOCK)
wd = libc.inotify_add_watch(ino, b"/w/d", 0x100 | 0x200)  # IN_CREATE | IN_DELETE
open("/w/d/second", "w").close(); os.unlink("/w/d/second")
time.sleep(0.1)
buf = os.read(ino, 4096); events = []
while buf:
    _, mask, _, n = struct.unpack_from("iIII", buf); events.append((hex(mask), buf[16:16 + n].rstrip(b"\0").decode()))
    buf = buf[16 + n:]
print("inotify", wd, events)
r = libc.syscall(300, 0, os.O_RDONLY)  # fanotify_init
print("fanotify", r, errno.errorcode.get(ctypes.get_errno()))
for d in ("/", "/etc", "/usr/bin", "/usr/lib/python3.11", "/w/d", "/tmp", "/vol"):
    es = list(os.scandir(d))
    bad = [e.name for e in es if e.inode() != os.stat(e.path, follow_symlinks=False).st_ino]
    print(d, len(es) > 0, sorted(bad))
"""
    (tmp_path / "v" / "sub").mkdir(parents=True)
    (tmp_path / "v" / "f").write_text("x")
    rc, out, err = both(vmrt, f"touch /tmp/t; python3 -c '{program}'", args=("-v", f"{tmp_path / 'v'}:/vol"))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["dnotify ['SIGIO']", "inotify 1 [('0x100', 'second'), ('0x200', 'second')]"]
    assert lines[2] == "fanotify -1 EPERM"
    # mount points excepted (readdir sees the directory under the mount, as on any Linux)
    assert lines[3:5] == ["/ True ['dev', 'proc', 'sys', 'vol']", "/etc True ['hostname', 'hosts', 'resolv.conf']"]
    assert all(ln.endswith(" True []") for ln in lines[5:]) and len(lines) == 10, out


def test_strace_ptrace(vmrt: Vmrt) -> None:
    """strace (ptrace) of a small program: the same system calls with the same results in both
    modes (pointers aside)."""
    script = "strace -qq -e trace=execve,openat,fstat,read,close,exit_group cat /etc/debian_version"
    rc, out, err = both(vmrt, script, lambda s: re.sub(r"0x[0-9a-f]+", "0xP", s))
    assert rc == 0 and re.fullmatch(r"12\.\d+\n", out), (out, err)
    assert 'execve("/usr/bin/cat", ["cat", "/etc/debian_version"], 0xP /* ' in err
    assert 'openat(AT_FDCWD, "/etc/debian_version", O_RDONLY) = 3' in err and "exit_group(0)" in err


# CPython's own regression tests (Debian's libpython3.11-testsuite): the os, the file system, sockets
# (TCP, UDP, UDP-Lite, Unix, v4 and v6, ancillary data, sendfile), threads' locks, select and epoll,
# signals and timers, subprocesses (sessions, process groups, signals, stop/continue, fds), fcntl,
# mmap, ptys. Whole modules, less the test classes that mostly start interpreters or sleep (each
# interpreter start is seconds under TCG): about a minute per mode there (COMPATIBILITY.md).
PY_MODULES = ["test_fcntl", "test_select", "test_epoll", "test_pty", "test_mmap", "test_glob", "test_shutil",
              "test_socket", "test_os", "test_posix", "test_signal", "test_threading"]
PY_SUBPROCESS = [f"test.test_subprocess.POSIXProcessTestCase.{t}" for t in (
    "test_close_fds_after_preexec", "test_exception_bad_executable", "test_extra_groups", "test_kill",
    "test_preexec", "test_process_group_0", "test_restore_signals", "test_run_abort", "test_send_signal",
    "test_start_new_session", "test_stopped", "test_terminate", "test_umask")] + [
    f"test.test_subprocess.ProcessTestCase.{t}" for t in (
        "test_communicate", "test_communicate_epipe", "test_pipesizes", "test_wait_timeout")]
PY_IGNORE = ["SpawnTests", "ForkTests", "EnvironTests", "PidTests", "*WalkTests", "URandomTests",
             "PosixUidGidTests", "TestSendfile", "TestPosixSpawn*", "SiginterruptTest", "PendingSignalsTests",
             "Wakeup*SignalTests", "StressTest", "test_interprocess_signal", "ThreadTests", "ThreadJoinOnShutdown",
             "ThreadingExceptionTests", "AtexitTests", "SubinterpThreadingTests", "NetworkConnectionBehaviourTest",
             "*TimeoutTest", "SendfileUsingSendTest", "*FileObjectClass*TestCase", "TestArchives"]


def _outcomes(xml: str) -> dict[str, str]:
    """Each test case's outcome from regrtest's JUnit XML: ok, skipped: reason, failure, error."""
    out = {}
    for case in ET.fromstring(xml).iter("testcase"):
        name = case.get("name", "?")
        verdict = "ok"
        for child in case:
            if child.tag in ("skipped", "failure", "error"):
                verdict = child.tag + (": " + (child.get("message") or "") if child.tag == "skipped" else "")
        out[name] = verdict
    return out


def test_python_regression_tests(vmrt: Vmrt) -> None:
    """The same tests pass, skip (for the same reasons) or fail in both modes."""
    argv = ["python3", "-m", "test", "--junit-xml", "/tmp/junit.xml", *PY_MODULES, "test_subprocess",
            *(f"--match={m}" for m in [*PY_MODULES, *PY_SUBPROCESS]), *(f"--ignore={i}" for i in PY_IGNORE)]
    script = (f"{shlex.join(argv)} >/tmp/regrtest.log 2>&1; rc=$?; cat /tmp/junit.xml;"
              " [ $rc = 0 ] || tail -40 /tmp/regrtest.log >&2")
    results = {}
    for mode in MODES:
        r = vmrt("run", "--rm", f"--isolation={mode}", IMAGE, "bash", "-c", script, timeout=900)
        assert r.returncode == 0, (mode, r.stderr.decode())
        results[mode] = _outcomes(r.stdout.decode())
    p, v = results["process"], results["vm"]
    assert len(p) > 500 and sum(o == "ok" for o in p.values()) > 400
    differ = {k: (p.get(k), v.get(k)) for k in sorted(set(p) | set(v)) if p.get(k) != v.get(k)}
    assert not differ, differ
