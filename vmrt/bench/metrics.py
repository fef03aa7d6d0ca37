"""``vmrt bench``: start, exec, memory, density, I/O, CPU and network, every mode side by side.

The benchmark drives the real command line, as a user would, and measures from
the host with CLOCK_MONOTONIC (``time.perf_counter``). Modes:

  process      vmrt run --rm --isolation=process IMAGE true
  vm-cold      vmrt run --rm --isolation=vm IMAGE true, with VMRT_POOL=off
  vm-pool      the same with a warm pool (``vmrt pool start``; refilled between runs)
  vm-snapshot  the same restored from a snapshot (``vmrt snapshot build`` first; VMRT_POOL=off)
  runc         runc run of a bundle with the config.json vmrt writes for the image
  podman       podman run --rm --network none IMAGE true (the image loaded from vmrt's store)

The vmrt modes' containers of start, exec, memory, density, I/O and CPU run with
``--network none`` by default (as the podman baseline does); ``--network bridge``
measures them on the default bridge network instead (veth or tap, nftables
rules). The network used is recorded in the JSON and printed with the tables.

The ``net`` metric always uses the default bridge network: one detached container
per mode (process, vm-cold) publishes a busybox httpd (a 1 KiB file) and a busybox
nc sink on 127.0.0.1 (``-p``: nftables DNAT), and the host measures, through those
ports, TCP throughput (``--net-mib`` MiB sent, from connect to the sink's EOF) and
the latency of HTTP GETs on a new connection each (``--net-requests``). The same
two servers run on the host itself (host busybox, 127.0.0.1) as the
``host-loopback`` baseline, measured in the same run by the same client code.
A pooled or snapshot-restored VM has the same data path as a cold one, so only
vm-cold is measured.

Runs are interleaved mode by mode within each round (the order rotates), one
warm-up round is discarded, and figures are medians with p90/p99. Every
figure carries the setup it was measured with (accelerator, machine, guest
memory, vCPUs, kernel build id, virtio-fs cache mode). Methodology:
shared/reference/benchmarks.md. A benchmark measures and reports; it never
asserts a time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config
from ..errors import UsageError, VmrtError

MODES = ("process", "vm-cold", "vm-pool", "vm-snapshot", "runc", "podman")
METRICS = ("start", "exec", "memory", "density", "io", "cpu", "net")
# which metric makes sense for which mode (a pooled VM is a cold VM once it runs)
def served(timings: str) -> bool:
    """A start (its --timings report) that took a pooled VM or restored a snapshot."""
    return "pool-claim" in timings or re.search(r"snapshot=[0-9a-f]{16}", timings) is not None


APPLIES = {
    "start": set(MODES),
    "exec": {"process", "vm-cold", "vm-snapshot", "runc", "podman"},
    "memory": {"process", "vm-cold", "vm-snapshot", "runc", "podman"},
    "density": {"process", "vm-cold", "vm-snapshot"},
    "io": {"process", "vm-cold", "runc", "podman"},
    "cpu": {"process", "vm-cold", "runc", "podman"},
    # a pooled or snapshot-restored VM has the same data path (veth, tc, tap, virtio-net) as a cold one
    "net": {"process", "vm-cold"},
}
NOT_APPLICABLE = "a VM from the pool is the same VM as vm-cold once it runs: only start differs"
REPS = 3                 # io and cpu: one container per repetition and mode, interleaved; net: transfers
IO_MIB = 64              # sequential write/read size
IMAGE_READS = 16         # sequential reads of a file from the image
META_FILES = 1000        # small-file create / stat / delete
STAT_PASSES = 10         # stat is fast: time 10 passes over the files, so the span dwarfs the timer's jitter
CPU_ITERS = 1_000_000    # awk loop iterations
SYSCALL_BYTES = 200_000  # dd bs=1: one read + one write per byte
SETTLE_S = 3.0           # idle containers: wait this long before reading memory
CMD_TIMEOUT = 300.0
NET_MIB = 64             # net: MiB sent per throughput repetition (--net-mib)
NET_REQUESTS = 200       # net: HTTP GETs per path (--net-requests)
NET_FILE_BYTES = 1024    # net: the file httpd serves
NET_WARMUP_MIB = 8       # net: a discarded transfer (at most this size) and NET_WARMUP_GETS GETs first
NET_WARMUP_GETS = 5
NET_SINK_PORT, NET_HTTP_PORT = 5001, 8080  # in the container
NET_READY_S = 120.0      # net: how long the servers may take to answer
NET_IO_TIMEOUT = 120.0   # net: one socket operation
PODMAN_RUN = ["podman", "run", "--runtime", "/usr/sbin/runc", "--ulimit", "nofile=1024:1024",
              "--ulimit", "nproc=1024:1024", "--network", "none"]
PHASE_RE = re.compile(r"^\s+([a-z][a-z-]*)\s+([\d.]+)\s+\(\+", re.M)

# The I/O script: markers ("@B name" / "@E name") timed on the host as the lines arrive.
IO_SCRIPT = f"""
W=$1; T=$2; IMG=$3
echo "@S imgsize $(wc -c < "$IMG")"
sed 's/^/@M /' /proc/mounts
for d in "$W" "$T"; do
  mkdir -p "$d"
  if [ "$d" = "$W" ]; then k=root; else k=tmp; fi
  echo "@B write_$k"; dd if=/dev/zero of="$d/seq" bs=1M count={IO_MIB} conv=fsync 2>/dev/null; echo "@E write_$k"
  echo "@B read_$k"; dd if="$d/seq" of=/dev/null bs=1M 2>/dev/null; echo "@E read_$k"
  rm -f "$d/seq"
done
echo "@B image_read"
i=0; while [ $i -lt {IMAGE_READS} ]; do dd if="$IMG" bs=1M 2>/dev/null; i=$((i+1)); done >/dev/null
echo "@E image_read"
cd "$W"
echo "@B loop_empty"; i=0; while [ $i -lt {META_FILES * STAT_PASSES} ]; do i=$((i+1)); done; echo "@E loop_empty"
echo "@B create"; i=0; while [ $i -lt {META_FILES} ]; do : > f$i; i=$((i+1)); done; echo "@E create"
echo "@B stat"
p=0; while [ $p -lt {STAT_PASSES} ]; do
  i=0; while [ $i -lt {META_FILES} ]; do [ -e f$i ] || echo "@X missing f$i"; i=$((i+1)); done; p=$((p+1))
done
echo "@E stat"
echo "@B delete"; rm -f f*; echo "@E delete"
echo "@D"
"""
CPU_SCRIPT = f"""
echo "@B cpu"; awk 'BEGIN {{ s = 0; for (i = 0; i < {CPU_ITERS}; i++) s += i % 7; print s }}' >/dev/null; echo "@E cpu"
echo "@B syscall"; dd if=/dev/zero of=/dev/null bs=1 count={SYSCALL_BYTES} 2>/dev/null; echo "@E syscall"
echo "@D"
"""
# net: the TCP sink, accepting one connection after another. Its stdin is a FIFO held open
# read-write (never readable, never EOF): busybox nc shuts its sending side down as soon as its
# stdin reaches EOF (at once with /dev/null), and the client would see EOF before the sink had
# read everything. With the FIFO, nc exits (closing the connection) only when it reads EOF from
# the client, so the client's EOF marks the end of the transfer. Args: FIFO PORT [LISTEN-ADDRESS].
NET_SINK = 'rm -f "$1"; mkfifo "$1" && exec 3<>"$1" || exit 1\nwhile true; do nc -l -p "$2" $3 <&3 >/dev/null; done'
NET_SERVE = (f"mkdir -p /www && dd if=/dev/zero of=/www/index.html bs={NET_FILE_BYTES} count=1 2>/dev/null "
             f"|| exit 1\nhttpd -f -p {NET_HTTP_PORT} -h /www &\n{NET_SINK}")
HOST_APPLETS = ("sh", "awk", "dd", "cat", "rm", "mkdir", "sed", "wc", "sleep", "nc", "mkfifo", "httpd")


class BenchError(Exception):
    """A mode failed to do something; recorded with the mode, the rest of the bench goes on."""


# --- small helpers ---------------------------------------------------------------------------

def pct(xs: list[float], p: float) -> float:
    """Percentile with linear interpolation (p50 is the median)."""
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def summary(xs: list[float], nd: int = 1) -> dict[str, Any]:
    return {"n": len(xs), "p50": round(pct(xs, 50), nd), "p90": round(pct(xs, 90), nd),
            "p99": round(pct(xs, 99), nd), "mean": round(statistics.fmean(xs), nd),
            "min": round(min(xs), nd), "max": round(max(xs), nd), "runs": [round(x, nd) for x in xs]}


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "notice:" not in ln]
    return lines[-1][:300] if lines else ""


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        with contextlib.suppress(ValueError, IndexError):
            out[k] = int(v.split()[0])
    return out


def mem_available_kib(samples: int = 3) -> float:
    vals = []
    for i in range(samples):
        if i:
            time.sleep(0.2)
        vals.append(meminfo()["MemAvailable"])
    return statistics.median(vals)


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, comm) of every process on the host."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{d}/stat").read_text()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            out[int(d)] = (int(stat.rsplit(")", 1)[1].split()[1]), comm)
    return out


def with_descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found = {p for p in roots if p in table}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def pss_breakdown(pids: set[int], table: dict[int, tuple[int, str]]) -> dict[str, float]:
    """PSS (MiB) of ``pids``, summed per process name."""
    from ..stats import pss_kib
    out: dict[str, float] = {}
    for p in pids:
        name = table.get(p, (0, "?"))[1]
        out[name] = out.get(name, 0.0) + pss_kib(p) / 1024
    return out


def fs_of(path: str, mounts: list[tuple[str, str]]) -> str:
    """The file system type of the mount ``path`` is on, from (mount point, type) pairs."""
    best, kind = "", "?"
    for mp, fstype in mounts:
        prefix = mp.rstrip("/") + "/"
        if (path + "/").startswith(prefix) and len(mp) >= len(best):
            best, kind = mp, fstype
    return kind


# --- the net client (the same code for every path) -------------------------------------------

def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports free on 127.0.0.1 now (the kernel's picks)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def connect(port: int, retry_until: float = 0.0, timeout: float = NET_IO_TIMEOUT) -> tuple[socket.socket, float]:
    """Connect to 127.0.0.1:port; returns the socket and the perf_counter taken just before the
    connect that succeeded. Until ``retry_until`` (perf_counter), a refused connection is tried
    again (the sink listens anew after each connection; the attempts before are not timed)."""
    while True:
        t0 = time.perf_counter()
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            s.settimeout(timeout)
            return s, t0
        except (ConnectionRefusedError, ConnectionResetError):
            if time.perf_counter() >= retry_until:
                raise
            time.sleep(0.002)


def net_transfer(port: int, nbytes: int, retry_s: float = 30.0, timeout: float = NET_IO_TIMEOUT) -> float:
    """Send ``nbytes`` to the sink, shut the sending side, wait for the sink's EOF (it has read
    everything and closed). Seconds from connect to that EOF."""
    chunk = memoryview(bytes(1 << 20))
    s, t0 = connect(port, time.perf_counter() + retry_s, timeout)
    with s:
        left = nbytes
        while left:
            n = min(left, len(chunk))
            s.sendall(chunk[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        return time.perf_counter() - t0


def http_get(port: int, size: int, retry_s: float = 0.0, timeout: float = NET_IO_TIMEOUT) -> float:
    """GET /index.html over a new connection (HTTP/1.0: the server closes it), read to EOF, as
    curl does; seconds from connect to the last byte. The status must be 200 and the body ``size``."""
    s, t0 = connect(port, time.perf_counter() + retry_s, timeout)
    with s:
        s.sendall(b"GET /index.html HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        parts = []
        while d := s.recv(65536):
            parts.append(d)
        t1 = time.perf_counter()
    head, _, body = b"".join(parts).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if not re.match(r"HTTP/1\.[01] 200\b", status) or len(body) != size:
        raise BenchError(f"GET /index.html: {status or 'no response'!r}, {len(body)} bytes of body (want {size})")
    return t1 - t0


def wait_net_ready(sink: int, http: int, size: int, timeout: float = NET_READY_S) -> float:
    """Until both servers answer (an empty transfer to the sink, a good GET); seconds it took."""
    t0 = time.perf_counter()
    deadline = t0 + timeout
    last = ""
    probes: list[tuple[str, Callable[[], float]]] = [("sink", lambda: net_transfer(sink, 0, 0.0, 5.0)),
                                                     ("httpd", lambda: http_get(http, size, 0.0, 5.0))]
    for what, probe in probes:
        while True:
            try:
                probe()
                break
            except (OSError, BenchError) as e:
                last = f"{what}: {e}"
            if time.perf_counter() >= deadline:
                raise BenchError(f"the servers did not answer within {timeout:.0f} s ({last})")
            time.sleep(0.2)
    return time.perf_counter() - t0


# --- child processes ----------------------------------------------------------------------------

class Result:
    def __init__(self, rc: int, out: str, err: str, ms: float, t0: float = 0.0, t1: float = 0.0) -> None:
        self.rc, self.out, self.err, self.ms, self.t0, self.t1 = rc, out, err, ms, t0, t1

    def error(self, what: str) -> str:
        return f"{what}: exit {self.rc}: {last_line(self.err) or last_line(self.out) or 'no output'}"


class Procs:
    """Every child runs in its own session and is tracked while it runs, so that an
    interrupt stops it the way a user would (SIGTERM, which vmrt forwards; a second
    SIGTERM kills the container) and its teardown still happens."""

    def __init__(self) -> None:
        self.live: set[subprocess.Popen[Any]] = set()
        self.servers: set[subprocess.Popen[Any]] = set()  # spawn(): stopped as a process group
        self.lock = threading.Lock()

    def _track(self, p: subprocess.Popen[Any]) -> None:
        with self.lock:
            self.live.add(p)

    def _untrack(self, p: subprocess.Popen[Any]) -> None:
        with self.lock:
            self.live.discard(p)

    def run(self, cmd: list[str], env: dict[str, str] | None = None, timeout: float = CMD_TIMEOUT,
            detach_stdio: bool = False) -> Result:
        """Run to completion; wall time in ms. ``detach_stdio``: the child's stdout goes to
        /dev/null and stderr to a file (for `runc run -d`, whose container keeps them)."""
        errf = tempfile.TemporaryFile("w+") if detach_stdio else None
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL if detach_stdio else subprocess.PIPE,
                             stderr=errf if errf else subprocess.PIPE, text=True, start_new_session=True)
        self._track(p)
        try:
            out, err = p.communicate(timeout=timeout)
            t1 = time.perf_counter()
        except subprocess.TimeoutExpired:
            self.stop(p)
            out, err = p.communicate()
            t1 = time.perf_counter()
            err = (err or "") + f"\ntimed out after {timeout:.0f} s"
        self._untrack(p)
        if errf:
            errf.seek(0)
            err = errf.read()
            errf.close()
        rc = p.returncode if p.returncode is not None else 124
        return Result(rc, out or "", err or "", (t1 - t0) * 1000, t0, t1)

    def run_marked(self, cmd: list[str], env: dict[str, str] | None = None,
                   timeout: float = CMD_TIMEOUT) -> tuple[Result, list[tuple[float, str]]]:
        """Run; timestamp (host monotonic, s) every stdout line as it arrives."""
        errf = tempfile.TemporaryFile("w+")
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                             start_new_session=True)
        self._track(p)
        timer = threading.Timer(timeout, self.stop, (p,))
        timer.start()
        lines = []
        assert p.stdout is not None
        try:
            for raw in iter(p.stdout.readline, b""):
                lines.append((time.perf_counter(), raw.decode(errors="replace").rstrip("\n")))
            p.wait()
        finally:
            timer.cancel()
        self._untrack(p)
        errf.seek(0)
        err = errf.read()
        errf.close()
        t1 = time.perf_counter()
        return Result(p.returncode, "\n".join(x for _, x in lines), err, (t1 - t0) * 1000, t0, t1), lines

    def spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        """Start a server in a session (and process group) of its own, stdio to /dev/null;
        ``stop_group`` (or ``stop_all``) ends it and every process it started."""
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        with self.lock:
            self.servers.add(p)
        return p

    def stop_group(self, p: subprocess.Popen[Any]) -> None:
        """SIGTERM to the process group of a spawned server (a shell's loop and the child it waits
        for), SIGKILL if its leader outlives 3 s; the group is signalled before the leader is reaped."""
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)  # its own session, started by us
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(wait)
                break
        with self.lock:
            self.servers.discard(p)

    def stop(self, p: subprocess.Popen[Any]) -> None:
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGTERM, 30.0)):
            if p.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(wait)
                return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # its own session, started by us
        p.wait()

    def stop_all(self) -> None:
        with self.lock:
            live, servers = list(self.live), list(self.servers)
        threads = [threading.Thread(target=self.stop, args=(p,)) for p in live]
        threads += [threading.Thread(target=self.stop_group, args=(p,)) for p in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


# --- modes ----------------------------------------------------------------------------------------

class Mode:
    """One way of running a container. Handles are what ``idle`` returns (an ID or name)."""

    name = ""
    skipped: str | None = None  # why this mode is not measured at all

    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.env = dict(bench.env)

    def setup(self) -> dict[str, Any]:
        return {"isolation": "namespaces", "accelerator": "none (host kernel)"}

    def command(self) -> str:
        """The start command, as recorded."""
        return shlex.join(self.start_cmd(0)[0])

    def start_cmd(self, slot: int) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def script_cmd(self, script: str, args: list[str]) -> list[str]:
        raise NotImplementedError

    def idle(self, n: int) -> str:
        raise NotImplementedError

    def exec_cmd(self, handle: str) -> list[str]:
        raise NotImplementedError

    def host_pids(self, handle: str, table: dict[int, tuple[int, str]]) -> set[int]:
        raise NotImplementedError

    def remove(self, handles: list[str]) -> None:
        raise NotImplementedError

    def before_start(self) -> None:
        """Called (untimed) before every timed start."""

    def close(self) -> None:
        pass


class Skipped(Mode):
    def __init__(self, bench: Bench, name: str, reason: str) -> None:
        super().__init__(bench)
        self.name, self.skipped = name, reason


class VmrtMode(Mode):
    def __init__(self, bench: Bench, name: str) -> None:
        super().__init__(bench)
        self.name = name
        self.iso = "process" if name == "process" else "vm"
        if name == "vm-cold":
            self.env["VMRT_POOL"] = "off"
            self.env["VMRT_SNAPSHOT"] = "off"
        elif name == "vm-snapshot":
            self.env["VMRT_POOL"] = "off"
        elif name == "vm-pool":
            self.env.pop("VMRT_POOL", None)

    def setup(self) -> dict[str, Any]:
        if self.iso == "process":
            return {"isolation": "namespaces", "accelerator": "none (host kernel)", "runtime": self.b.runtime,
                    "network": self.b.network}
        return {"isolation": "vm", **self.b.vm_setup, "pool": self.name == "vm-pool",
                "snapshot": self.name == "vm-snapshot", "share": "9p" if self.name == "vm-snapshot" else "virtio-fs",
                "network": self.b.network}

    def base(self) -> list[str]:
        return [*self.b.vmrt, "run", "--rm", f"--isolation={self.iso}", "--network", self.b.network]

    def start_cmd(self, slot: int) -> tuple[list[str], dict[str, str]]:
        return [*self.base(), "--timings", self.b.image, "true"], self.env

    def script_cmd(self, script: str, args: list[str]) -> list[str]:
        return [*self.base(), self.b.image, "sh", "-c", script, "sh", *args]

    def idle(self, n: int) -> str:
        name = f"{self.b.tag}-{self.name}-{n}"
        self.b.vmrt_names.add(name)
        r = self.b.procs.run([*self.b.vmrt, "run", "-d", "--name", name, f"--isolation={self.iso}",
                              "--network", self.b.network, self.b.image, "sleep", "600"], env=self.env)
        if r.rc != 0:
            raise BenchError(r.error(f"vmrt run -d --isolation={self.iso}"))
        return r.out.strip().splitlines()[-1]

    def exec_cmd(self, handle: str) -> list[str]:
        return [*self.b.vmrt, "exec", handle, "true"]

    def host_pids(self, handle: str, table: dict[int, tuple[int, str]]) -> set[int]:
        from .. import cgroups
        from ..stats import cgroup_procs
        r = self.b.procs.run([*self.b.vmrt, "inspect", "-f", "{{.State.MonitorPid}}", handle], env=self.env)
        roots = {int(r.out.strip())} if r.rc == 0 and r.out.strip().isdigit() else set()
        for rel in (cgroups.runtime_path(handle), f"/{cgroups.PARENT}/{handle}-vmm"):
            roots |= set(cgroup_procs(rel))
        if not roots:
            raise BenchError(f"no host process found for container {handle[:12]}")
        return with_descendants(roots, table)

    def remove(self, handles: list[str]) -> None:
        if handles:
            self.b.procs.run([*self.b.vmrt, "rm", "-f", *handles], env=self.env)


class PoolMode(VmrtMode):
    """vm-pool: `vmrt pool start --size K` before, refilled before every start, stopped after."""

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench, "vm-pool")
        self.started = False

    def start_pool(self) -> None:
        if self.started:
            return
        r = self.b.procs.run([*self.b.vmrt, "pool", "start", "--size", str(self.b.pool_size)], env=self.env)
        if r.rc != 0:
            raise BenchError(r.error("vmrt pool start"))
        self.started = True
        self.before_start()

    def before_start(self) -> None:
        r = self.b.procs.run([*self.b.vmrt, "pool", "fill", str(self.b.pool_size), "--wait"], env=self.env)
        if r.rc != 0:
            raise BenchError(r.error("vmrt pool fill --wait"))

    def close(self) -> None:
        if self.started:
            self.started = False
            r = self.b.procs.run([*self.b.vmrt, "pool", "stop"], env=self.env)
            if r.rc != 0:
                self.b.say(f"warning: {r.error('vmrt pool stop')}")


class RuncMode(Mode):
    """runc run of the config.json vmrt writes for the image (rootfs copied out; no vmrt involved)."""

    name = "runc"

    def __init__(self, bench: Bench, runc: str) -> None:
        super().__init__(bench)
        self.runc = runc
        self.dir = Path(tempfile.mkdtemp(prefix="vmrt-bench-runc-"))
        self.state = self.dir / "state"
        self.rootfs = self.dir / "rootfs"
        self.bundles: dict[tuple[tuple[str, ...], int], Path] = {}
        self.counter = 0
        self.lock = threading.Lock()
        self.image_cfg: dict[str, Any] = {}

    def prepare(self) -> None:
        from ..images.store import Store
        img = Store(self.b.cfg.root).get(self.b.image)
        for layer in img.layer_dirs():  # whiteouts are not applied: fine for single-layer images
            shutil.copytree(layer, self.rootfs, symlinks=True, dirs_exist_ok=True)
        self.image_cfg = img.runtime_config

    def setup(self) -> dict[str, Any]:
        return {"isolation": "namespaces", "accelerator": "none (host kernel)", "runtime": self.b.runtime_version,
                "rootfs": "plain directory (no overlay)"}

    def bundle(self, args: list[str], slot: int) -> Path:
        from ..bundle import RunOptions, make_config, write
        key = (tuple(args), slot)
        with self.lock:
            if key not in self.bundles:
                d = self.dir / f"bundle-{len(self.bundles)}"
                conf = make_config(self.image_cfg, self.rootfs, RunOptions(image=self.b.image, command=args),
                                   "0" * 64, "process")
                conf["root"]["path"] = str(self.rootfs)
                conf["linux"]["cgroupsPath"] = f"/{self.b.tag}-runc-{len(self.bundles)}"
                write(d, conf)
                self.bundles[key] = d
            return self.bundles[key]

    def new_id(self) -> str:
        with self.lock:
            self.counter += 1
            return f"{self.b.tag}-{self.counter}"

    def start_cmd(self, slot: int) -> tuple[list[str], dict[str, str]]:
        return [self.runc, "--root", str(self.state), "run", "--bundle", str(self.bundle(["true"], slot)),
                self.new_id()], self.env

    def command(self) -> str:
        return f"{self.runc} run --bundle B ID (B: the config.json vmrt writes for {self.b.image})"

    def script_cmd(self, script: str, args: list[str]) -> list[str]:
        return [self.runc, "--root", str(self.state), "run", "--bundle",
                str(self.bundle(["sh", "-c", script, "sh", *args], 0)), self.new_id()]

    def idle(self, n: int) -> str:
        cid = self.new_id()
        r = self.b.procs.run([self.runc, "--root", str(self.state), "run", "-d", "--bundle",
                              str(self.bundle(["sleep", "600"], n)), cid], env=self.env, detach_stdio=True)
        if r.rc != 0:
            raise BenchError(r.error("runc run -d"))
        return cid

    def exec_cmd(self, handle: str) -> list[str]:
        return [self.runc, "--root", str(self.state), "exec", handle, "true"]

    def host_pids(self, handle: str, table: dict[int, tuple[int, str]]) -> set[int]:
        r = self.b.procs.run([self.runc, "--root", str(self.state), "state", handle])
        if r.rc != 0:
            raise BenchError(r.error("runc state"))
        return with_descendants({int(json.loads(r.out)["pid"])}, table)

    def remove(self, handles: list[str]) -> None:
        for h in handles:
            self.b.procs.run([self.runc, "--root", str(self.state), "delete", "-f", h])

    def close(self) -> None:
        if self.state.is_dir():
            left = [p.name for p in self.state.iterdir() if p.is_dir()]
            self.remove(left)
        shutil.rmtree(self.dir, ignore_errors=True)


class PodmanMode(Mode):
    name = "podman"

    def __init__(self, bench: Bench, image: str) -> None:
        super().__init__(bench)
        self.image = image
        self.names: list[str] = []

    def setup(self) -> dict[str, Any]:
        return {"isolation": "namespaces", "accelerator": "none (host kernel)", "runtime": "podman + runc",
                "podman": self.b.podman_version, "network": "none"}

    def start_cmd(self, slot: int) -> tuple[list[str], dict[str, str]]:
        return [*PODMAN_RUN, "--rm", self.image, "true"], self.env

    def script_cmd(self, script: str, args: list[str]) -> list[str]:
        return [*PODMAN_RUN, "--rm", self.image, "sh", "-c", script, "sh", *args]

    def idle(self, n: int) -> str:
        name = f"{self.b.tag}-podman-{n}"
        self.names.append(name)
        r = self.b.procs.run([*PODMAN_RUN, "-d", "--name", name, self.image, "sleep", "600"], env=self.env)
        if r.rc != 0:
            raise BenchError(r.error("podman run -d"))
        return name

    def exec_cmd(self, handle: str) -> list[str]:
        return ["podman", "exec", handle, "true"]

    def host_pids(self, handle: str, table: dict[int, tuple[int, str]]) -> set[int]:
        r = self.b.procs.run(["podman", "inspect", "-f", "{{.State.ConmonPid}} {{.State.Pid}}", handle])
        if r.rc != 0:
            raise BenchError(r.error("podman inspect"))
        return with_descendants({int(x) for x in r.out.split() if x.isdigit() and x != "0"}, table)

    def remove(self, handles: list[str]) -> None:
        if handles:
            self.b.procs.run(["podman", "rm", "-f", "-t", "0", *handles])
            self.names = [n for n in self.names if n not in handles]

    def close(self) -> None:
        self.remove(list(self.names))


# --- the bench ------------------------------------------------------------------------------------

class Bench:
    def __init__(self, cfg: Config, *, runs: int, parallel: int, density_max: int, modes: list[str],
                 only: list[str], image: str, idle: int, pool_size: int, argv: list[str],
                 say: Callable[[str], None], network: str = "none", net_mib: int = NET_MIB,
                 net_requests: int = NET_REQUESTS) -> None:
        self.cfg, self.runs, self.parallel, self.density_max = cfg, runs, parallel, density_max
        self.network, self.net_mib, self.net_requests = network, net_mib, net_requests
        self.mode_names, self.only, self.image, self.idle_n, self.pool_size = modes, only, image, idle, pool_size
        self.argv, self.say = argv, say
        self.vmrt = [sys.executable, "-m", "vmrt"]
        self.env = dict(os.environ)
        self.tag = f"vmrt-bench-{os.getpid()}"
        self.procs = Procs()
        self.vmrt_names: set[str] = set()
        self.modes: dict[str, Mode] = {}
        self.results: dict[str, dict[str, Any]] = {m: {} for m in only}
        self.runtime = "?"
        self.runtime_version = "?"
        self.podman_version = "?"
        self.vm_setup: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.workloads: dict[str, Any] = {}

    # --- set-up ---
    def collect_meta(self) -> None:
        from .. import kernel
        from ..vm import accel as accel_mod
        cfg = self.cfg
        try:
            acc = accel_mod.choose(cfg.accel, user_kernel=cfg.kernel is not None)
            accel, host_kvm, reason = acc.name, acc.host_kind, acc.reason
        except Exception as e:  # an accelerator that cannot be used is itself the result
            accel, host_kvm, reason = "unusable", "?", str(e)
        try:
            kid = kernel.find(cfg)[1]
        except Exception as e:
            kid = f"missing ({e})"
        vcpus = max(1, min(math.ceil(cfg.cpus), os.cpu_count() or 1, 64))
        self.vm_setup = {"accelerator": accel, "host_kvm": host_kvm, "machine": cfg.machine,
                         "guest_memory_mib": cfg.memory_mib, "vcpus": vcpus, "kernel_build_id": kid,
                         "virtiofs_cache": cfg.virtiofs_cache, "virtiofs_dax": False}
        if accel == "tcg":
            self.vm_setup["tcg_tb_size_mib"] = cfg.tcg_tb_size_mib
        with contextlib.suppress(Exception):
            from ..drivers.process import choose_runtime
            self.runtime = choose_runtime(cfg.runtime)
            out = subprocess.run([self.runtime, "--version"], capture_output=True, text=True, timeout=10).stdout
            self.runtime_version = f"{self.runtime} ({out.splitlines()[0]})"
        mi = meminfo()
        self.meta = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "vmrt " + shlex.join(self.argv),
            "vmrt_version": __version__,
            "python": platform.python_version(),
            "host": {"cores": os.cpu_count(), "mem_total_mib": round(mi.get("MemTotal", 0) / 1024),
                     "kernel": os.uname().release, "machine": platform.machine(),
                     "cgroup": "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"},
            "accelerator": accel, "accelerator_reason": reason, "host_kvm": host_kvm,
            "vm": self.vm_setup, "process_runtime": self.runtime_version,
            "image": self.image, "clock": "host CLOCK_MONOTONIC (time.perf_counter)",
            "network": self.network, "net_network": "bridge",
        }

    def make_modes(self) -> None:
        for name in self.mode_names:
            self.modes[name] = self.make_mode(name)

    def make_mode(self, name: str) -> Mode:
        if name in ("process", "vm-cold"):
            return VmrtMode(self, name)
        if name == "vm-pool":
            if "start" not in self.only:
                return Skipped(self, name, "only start is measured for vm-pool")
            return PoolMode(self)
        if name == "vm-snapshot":
            snap = VmrtMode(self, name)
            r = self.procs.run([*self.vmrt, "snapshot", "build"], env=snap.env)
            if r.rc != 0:
                return Skipped(self, name, r.error("vmrt snapshot build"))
            return snap
        if name == "runc":
            from ..drivers.process import choose_runtime
            try:
                runc = choose_runtime("runc")
            except Exception as e:
                return Skipped(self, name, f"runc not available: {e}")
            m = RuncMode(self, runc)
            try:
                m.prepare()
            except Exception as e:
                m.close()
                return Skipped(self, name, f"cannot make a runc bundle of {self.image}: {e}")
            return m
        if name == "podman":
            if shutil.which("podman") is None:
                return Skipped(self, name, "podman is not installed")
            v = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip()
            self.podman_version = v
            img = self.podman_image()
            if isinstance(img, Skipped):
                return img
            return PodmanMode(self, img)
        raise AssertionError(name)

    def podman_image(self) -> str | Skipped:
        """vmrt's image in podman's store (loaded from vmrt's OCI layout once, tagged localhost/vmrt-NAME)."""
        safe = re.sub(r"[^a-z0-9_.-]+", "-", self.image.lower()).strip("-") or "image"
        tag = f"localhost/vmrt-{safe}:latest"
        if subprocess.run(["podman", "image", "exists", tag], capture_output=True).returncode == 0:
            return tag
        ref = self.image if ":" in self.image.rsplit("/", 1)[-1] else f"{self.image}:latest"
        r = subprocess.run(["podman", "pull", "-q", f"oci:{self.cfg.root / 'images'}:{ref}"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return Skipped(self, "podman", f"cannot load {self.image} into podman: {last_line(r.stderr)}")
        subprocess.run(["podman", "tag", r.stdout.strip(), tag], capture_output=True)
        return tag

    def active(self, metric: str) -> list[Mode]:
        out = []
        for name, m in self.modes.items():
            if m.skipped:
                self.results[metric][name] = {"skipped": m.skipped}
            elif name not in APPLIES[metric]:
                self.results[metric][name] = {"skipped": NOT_APPLICABLE if name == "vm-pool" else "not applicable",
                                              "not_applicable": True}
            else:
                out.append(m)
        return out

    def fail(self, metric: str, m: Mode, err: str) -> None:
        self.say(f"{metric}: {m.name}: {err}")
        self.results[metric][m.name] = {"error": err, "setup": m.setup()}

    # --- start ---
    def bench_start(self) -> None:
        modes = self.active("start")
        pool = self.modes.get("vm-pool")
        if isinstance(pool, PoolMode) and pool in modes:
            self.say(f"start: vmrt pool start --size {self.pool_size}")
            try:
                pool.start_pool()
            except BenchError as e:
                pool.skipped = f"vmrt pool not available: {e}"
                self.results["start"]["vm-pool"] = {"skipped": pool.skipped}
                modes.remove(pool)
        try:
            serial = self.start_serial(modes)
            parallel = self.start_parallel(modes) if self.parallel >= 2 else {}
        finally:
            if isinstance(pool, PoolMode):
                pool.close()
        for m in modes:
            if m.name in self.results["start"]:
                continue  # failed
            entry: dict[str, Any] = {"setup": m.setup(), "command": m.command()}
            s = serial[m.name]
            entry["serial"] = {"warmup_discarded": 1, **summary(s["ms"])}
            if s["phases"]:
                entry["serial"]["phases_p50_ms"] = {k: round(statistics.median(v), 1) for k, v in s["phases"].items()}
            if isinstance(m, VmrtMode) and m.iso == "vm":
                entry["served_from_pool"] = s["pool"]
            if m.name in parallel:
                entry["parallel"] = parallel[m.name]
            self.results["start"][m.name] = entry
        base = self.results["start"].get("runc", {}).get("serial", {}).get("p50")
        for entry in self.results["start"].values():
            if base and "serial" in entry:
                entry["serial"]["ratio_p50_to_runc"] = round(entry["serial"]["p50"] / base, 2)

    def timed_start(self, m: Mode, slot: int) -> Result:
        cmd, env = m.start_cmd(slot)
        return self.procs.run(cmd, env=env)

    def start_serial(self, modes: list[Mode]) -> dict[str, dict[str, Any]]:
        data: dict[str, dict[str, Any]] = {m.name: {"ms": [], "phases": {}, "pool": 0} for m in modes}
        for i in range(self.runs + 1):
            self.say(f"start: serial round {i}/{self.runs}" + (" (warm-up, discarded)" if i == 0 else ""))
            for m in rotate(modes, i):
                if m.name in self.results["start"]:
                    continue
                try:
                    m.before_start()
                except BenchError as e:
                    self.fail("start", m, str(e))
                    continue
                r = self.timed_start(m, 0)
                if r.rc != 0:
                    self.fail("start", m, r.error(f"round {i}"))
                    continue
                if i == 0:
                    continue
                d = data[m.name]
                d["ms"].append(r.ms)
                for k, v in PHASE_RE.findall(r.err):
                    d["phases"].setdefault(k, []).append(float(v))
                if served(r.err):
                    d["pool"] += 1
        return data

    def start_parallel(self, modes: list[Mode]) -> dict[str, dict[str, Any]]:
        p = self.parallel
        batches = max(1, math.ceil(self.runs / p))
        data: dict[str, dict[str, list[float]]] = {m.name: {"ms": [], "wall": [], "pool": []} for m in modes}
        errors: dict[str, str] = {}
        for b in range(batches):
            self.say(f"start: {p} in parallel, batch {b + 1}/{batches}")
            for m in rotate(modes, b):
                if m.name in self.results["start"] or m.name in errors:
                    continue
                try:
                    m.before_start()
                except BenchError as e:
                    errors[m.name] = str(e)
                    continue
                res = self.batch(m, p)
                bad = [r for r in res if r.rc != 0]
                if bad:
                    errors[m.name] = bad[0].error(f"parallel batch {b + 1}")
                    self.say(f"start: {m.name}: {errors[m.name]}")
                    continue
                data[m.name]["ms"] += [r.ms for r in res]
                data[m.name]["pool"].append(sum(served(r.err) for r in res))
                data[m.name]["wall"].append((max(r.t1 for r in res) - min(r.t0 for r in res)) * 1000)
        out: dict[str, dict[str, Any]] = {name: {"parallel": p, "error": e} for name, e in errors.items()}
        for name, d in data.items():
            if d["ms"] and name not in errors:
                out[name] = {"parallel": p, "batches": len(d["wall"]), **summary(d["ms"]),
                             "batch_wall_ms": summary(d["wall"])}
                if self.modes[name].name != "process" and isinstance(self.modes[name], VmrtMode):
                    out[name]["served_from_pool"] = int(sum(d["pool"]))
        return out

    def batch(self, m: Mode, p: int) -> list[Result]:
        barrier = threading.Barrier(p)
        results: list[Result | None] = [None] * p

        def one(k: int) -> None:
            cmd, env = m.start_cmd(k)
            barrier.wait()
            results[k] = self.procs.run(cmd, env=env)
        threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(p)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r if r is not None else Result(1, "", "worker failed", 0.0) for r in results]

    # --- exec ---
    def bench_exec(self) -> None:
        modes = self.active("exec")
        handles: dict[str, str] = {}
        try:
            for m in modes:
                self.say(f"exec: starting an idle {m.name} container")
                try:
                    handles[m.name] = m.idle(0)
                except BenchError as e:
                    self.fail("exec", m, str(e))
            data: dict[str, list[float]] = {n: [] for n in handles}
            live = [m for m in modes if m.name in handles]
            for i in range(self.runs + 1):
                self.say(f"exec: round {i}/{self.runs}" + (" (warm-up, discarded)" if i == 0 else ""))
                for m in rotate(live, i):
                    if m.name in self.results["exec"]:
                        continue
                    r = self.procs.run(m.exec_cmd(handles[m.name]), env=m.env)
                    if r.rc != 0:
                        self.fail("exec", m, r.error(f"round {i}"))
                    elif i:
                        data[m.name].append(r.ms)
            for m in live:
                if m.name not in self.results["exec"]:
                    self.results["exec"][m.name] = {"setup": m.setup(), "command": shlex.join(m.exec_cmd("C")),
                                                    "warmup_discarded": 1, **summary(data[m.name])}
        finally:
            for m in modes:
                if m.name in handles:
                    m.remove([handles[m.name]])

    # --- memory ---
    def measure_idle(self, m: Mode, handles: list[str]) -> dict[str, Any]:
        table = proc_table()
        per: list[float] = []
        parts: dict[str, float] = {}
        for h in handles:
            pids = m.host_pids(h, table)
            bd = pss_breakdown(pids, table)
            per.append(sum(bd.values()))
            for k, v in bd.items():
                parts[k] = parts.get(k, 0.0) + v
        n = len(handles)
        return {"pss_mib_per_container": summary(per, 2) if per else None,
                "pss_mib_by_process": {k: round(v / n, 2) for k, v in sorted(parts.items())}}

    def bench_memory(self) -> None:
        for m in self.active("memory"):
            handles: list[str] = []
            try:
                time.sleep(1.0)
                before = mem_available_kib()
                self.say(f"memory: {self.idle_n} idle {m.name} containers")
                for k in range(self.idle_n):
                    handles.append(m.idle(100 + k))
                time.sleep(SETTLE_S)
                after = mem_available_kib()
                res = self.measure_idle(m, handles)
                self.results["memory"][m.name] = {
                    "setup": m.setup(), "containers": len(handles), "settle_s": SETTLE_S, **res,
                    "memavailable_drop_mib_per_container": round((before - after) / 1024 / len(handles), 2)}
            except BenchError as e:
                self.fail("memory", m, str(e))
            finally:
                m.remove(handles)

    # --- density ---
    def bench_density(self) -> None:
        for m in self.active("density"):
            handles: list[str] = []
            total = meminfo()["MemTotal"]
            start_ms: list[float] = []
            reason = f"reached --density-max {self.density_max}"
            try:
                time.sleep(1.0)
                before = mem_available_kib()
                for k in range(self.density_max):
                    avail = meminfo()["MemAvailable"]
                    if avail < total * 0.10:
                        reason = f"MemAvailable {avail // 1024} MiB < 10% of MemTotal"
                        break
                    t0 = time.perf_counter()
                    try:
                        handles.append(m.idle(200 + k))
                    except BenchError as e:
                        reason = f"start {k + 1} failed: {e}"
                        break
                    start_ms.append((time.perf_counter() - t0) * 1000)
                    self.say(f"density: {m.name}: {len(handles)} running ({start_ms[-1]:.0f} ms)")
                entry: dict[str, Any] = {"setup": m.setup(), "max": self.density_max, "started": len(handles),
                                         "stopped_because": reason}
                if handles:
                    time.sleep(SETTLE_S)
                    after = mem_available_kib()
                    res = self.measure_idle(m, handles)
                    entry.update(res)
                    entry["memavailable_drop_mib_per_container"] = round((before - after) / 1024 / len(handles), 2)
                    entry["memavailable_end_pct"] = round(after / total * 100, 1)
                    entry["start_ms"] = summary(start_ms)
                self.results["density"][m.name] = entry
            except BenchError as e:
                self.fail("density", m, str(e))
            finally:
                self.say(f"density: removing {len(handles)} {m.name} containers")
                m.remove(handles)

    # --- io and cpu ---
    def host_runner(self, tmp: Path) -> Callable[[str, list[str]], list[str]] | None:
        bb = shutil.which("busybox")
        if bb is None:
            return None
        bindir = tmp / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        for a in HOST_APPLETS:
            with contextlib.suppress(FileExistsError):
                (bindir / a).symlink_to(bb)
        return lambda script, args: [str(bindir / "sh"), "-c", script, "sh", *args]

    def run_scripts(self, metric: str, script: str, args_in: list[str], args_host: list[str],
                    host: Callable[[str, list[str]], list[str]] | None, tmp: Path) -> dict[str, list[dict[str, Any]]]:
        modes = self.active(metric)
        who: list[tuple[str, Mode | None]] = [(m.name, m) for m in modes]
        if host is not None:
            who.append(("host", None))
        else:
            self.results[metric]["host"] = {"skipped": "no busybox on the host"}
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n, _ in who}
        env = dict(self.env, PATH=str(tmp / "bin"))
        for rep in range(REPS):
            for name, m in rotate(who, rep):
                if name in self.results[metric]:
                    continue
                self.say(f"{metric}: {name}, repetition {rep + 1}/{REPS}")
                cmd = m.script_cmd(script, args_in) if m else host(script, args_host)  # type: ignore[misc]
                r, lines = self.procs.run_marked(cmd, env=m.env if m else env)
                parsed = parse_marked(lines)
                if r.rc != 0 or not parsed["done"]:
                    err = r.error(f"repetition {rep + 1}") if r.rc else \
                        f"repetition {rep + 1}: the script stopped early"
                    if m:
                        self.fail(metric, m, err)
                    else:
                        self.results[metric]["host"] = {"error": err}
                    continue
                runs[name].append(parsed)
        return runs

    def bench_io(self, tmp: Path) -> None:
        host = self.host_runner(tmp)
        hostdir = Path(tempfile.mkdtemp(prefix="vmrt-bench-io-"))
        try:
            runs = self.run_scripts("io", IO_SCRIPT, ["/bench-io", "/tmp/bench-io", "/bin/busybox"],
                                    [str(hostdir / "w"), str(hostdir / "t"), "/bin/busybox"], host, tmp)
        finally:
            shutil.rmtree(hostdir, ignore_errors=True)
        host_mounts = [(ln.split()[1], ln.split()[2]) for ln in Path("/proc/mounts").read_text().splitlines()]
        for name, reps in runs.items():
            if not reps or name in self.results["io"]:
                continue
            m = self.modes.get(name)
            mounts = reps[0]["mounts"] if name != "host" else host_mounts
            paths = (["/bench-io", "/tmp/bench-io"] if name != "host" else [str(hostdir / "w"), str(hostdir / "t")])
            size = int(reps[0]["info"].get("imgsize", "0") or 0)

            def rate(key: str, nbytes: float, reps: list[dict[str, Any]] = reps) -> dict[str, Any]:
                xs = [nbytes / 1e6 / r["t"][key] for r in reps if r["t"].get(key)]
                return summary(xs) if xs else {}

            def ops(key: str, reps: list[dict[str, Any]] = reps) -> dict[str, Any]:
                n = META_FILES * (STAT_PASSES if key == "stat" else 1)
                xs = [n / r["t"][key] for r in reps if r["t"].get(key)]
                return summary(xs, 0) if xs else {}
            nb = IO_MIB * 1024 * 1024
            vm = isinstance(m, VmrtMode) and m.iso == "vm"
            root_fs = "overlay (upper: guest tmpfs)" if vm else fs_of(paths[0], mounts)
            tmp_fs = "overlay (upper: guest tmpfs)" if vm and fs_of(paths[1], mounts) == "overlay" \
                else fs_of(paths[1], mounts)
            img_fs = "virtio-fs" if vm else fs_of("/bin/busybox", mounts)
            entry: dict[str, Any] = {
                "setup": m.setup() if m else {"isolation": "none (the host itself)"},
                "repetitions": len(reps),
                "rootfs": {"path": paths[0], "fs": root_fs, "write_mb_s": rate("write_root", nb),
                           "read_mb_s": rate("read_root", nb)},
                "tmp": {"path": paths[1], "fs": tmp_fs, "write_mb_s": rate("write_tmp", nb),
                        "read_mb_s": rate("read_tmp", nb)},
                "image_read": {"path": "/bin/busybox", "fs": img_fs, "bytes": size,
                               "reads": IMAGE_READS, "mb_s": rate("image_read", size * IMAGE_READS)},
                "metadata": {"files": META_FILES, "dir": paths[0], "create_ops_s": ops("create"),
                             "stat_ops_s": ops("stat"), "delete_ops_s": ops("delete"),
                             "stat_passes": STAT_PASSES,
                             "empty_loop_ms_per_1000": summary([r["t"]["loop_empty"] * 1000 / STAT_PASSES
                                                                for r in reps], 2)},
            }
            if vm:
                entry["note"] = ("writable layer: overlayfs in the guest, upper on guest tmpfs; image (lower) over "
                                 f"virtio-fs cache={self.cfg.virtiofs_cache}, no DAX")
            self.results["io"][name] = entry
        self.workloads["io"] = {
            "write": f"dd if=/dev/zero bs=1M count={IO_MIB} conv=fsync", "read": "dd bs=1M of the file just written "
            "(page cache warm)", "image_read": f"dd if=IMG bs=1M x{IMAGE_READS} (a file of the image: the lower layer)",
            "metadata": f"busybox sh loops over {META_FILES} files: create (: > f$i), stat ([ -e f$i ], "
            f"{STAT_PASSES} passes), delete (one rm -f f*); rates include the shell loop, whose cost per "
            "1000 iterations is reported",
            "timing": "host-side timestamps of marker lines printed by the script"}

    def bench_cpu(self, tmp: Path) -> None:
        host = self.host_runner(tmp)
        runs = self.run_scripts("cpu", CPU_SCRIPT, [], [], host, tmp)
        for name, reps in runs.items():
            if not reps or name in self.results["cpu"]:
                continue
            m = self.modes.get(name)
            cpu = [r["t"]["cpu"] for r in reps]
            sc = [r["t"]["syscall"] for r in reps]
            self.results["cpu"][name] = {
                "setup": m.setup() if m else {"isolation": "none (the host itself)"}, "repetitions": len(reps),
                "cpu_loop_s": summary(cpu, 3), "syscall_loop_s": summary(sc, 3),
                "syscalls_per_s": round(2 * SYSCALL_BYTES / statistics.median(sc))}
        h = self.results["cpu"].get("host", {})
        for e in self.results["cpu"].values():
            if "cpu_loop_s" in e and "cpu_loop_s" in h:
                e["cpu_ratio_to_host"] = round(e["cpu_loop_s"]["p50"] / h["cpu_loop_s"]["p50"], 2)
                e["syscall_ratio_to_host"] = round(e["syscall_loop_s"]["p50"] / h["syscall_loop_s"]["p50"], 2)
        self.workloads["cpu"] = {
            "cpu": f"busybox awk loop of {CPU_ITERS} iterations", "syscall":
            f"dd if=/dev/zero of=/dev/null bs=1 count={SYSCALL_BYTES} (one read + one write per byte)",
            "timing": "host-side timestamps of marker lines printed by the script"}

    # --- net ---
    def bench_net(self, tmp: Path) -> None:
        """TCP throughput and HTTP latency from the host through published ports (default bridge
        network), and over loopback to the same servers on the host (host-loopback)."""
        res = self.results["net"]
        modes = self.active("net")
        nbytes = self.net_mib * 1024 * 1024
        host = self.host_runner(tmp)
        host_setup = {"isolation": "none (the host itself)", "network": "loopback", "servers": "host busybox"}
        ports: dict[str, tuple[int, int]] = {}   # path -> (sink, http) on 127.0.0.1
        commands: dict[str, str] = {}
        ready_s: dict[str, float] = {}
        handles: list[tuple[Mode, str]] = []
        servers: list[subprocess.Popen[Any]] = []
        live: list[str] = []  # the paths still measured

        def lost(name: str, err: str) -> None:
            if name == "host-loopback":
                self.say(f"net: host-loopback: {err}")
                res[name] = {"error": err, "setup": host_setup}
            else:
                self.fail("net", self.modes[name], err)
            if name in live:
                live.remove(name)
        try:
            if host is None:
                res["host-loopback"] = {"skipped": "no busybox on the host", "setup": host_setup}
            else:
                sink, http = free_ports(2)
                bindir, www = tmp / "bin", tmp / "net-www"
                www.mkdir(exist_ok=True)
                (www / "index.html").write_bytes(bytes(NET_FILE_BYTES))
                env = dict(self.env, PATH=str(bindir))
                hcmd = [str(bindir / "httpd"), "-f", "-p", f"127.0.0.1:{http}", "-h", str(www)]
                scmd = [str(bindir / "sh"), "-c", NET_SINK, "sh", str(tmp / "net-sink.fifo"), str(sink), "127.0.0.1"]
                self.say("net: host-loopback: busybox httpd and nc sink on the host")
                servers += [self.procs.spawn(hcmd, env), self.procs.spawn(scmd, env)]
                ports["host-loopback"] = (sink, http)
                commands["host-loopback"] = f"{shlex.join(hcmd)}; sh -c NET_SINK sh FIFO {sink} 127.0.0.1"
                live.append("host-loopback")
            for m in modes:
                assert isinstance(m, VmrtMode)
                sink, http = free_ports(2)
                name = f"{self.tag}-{m.name}-net"
                self.vmrt_names.add(name)
                cmd = [*self.vmrt, "run", "-d", "--name", name, f"--isolation={m.iso}", "--network", "bridge",
                       "-p", f"127.0.0.1:{sink}:{NET_SINK_PORT}", "-p", f"127.0.0.1:{http}:{NET_HTTP_PORT}",
                       self.image, "sh", "-c", NET_SERVE, "sh", "/tmp/bench-net-sink.fifo", str(NET_SINK_PORT)]
                self.say(f"net: {m.name}: a detached container with httpd and an nc sink, ports published")
                r = self.procs.run(cmd, env=m.env)
                if r.rc != 0:
                    self.fail("net", m, r.error(f"vmrt run -d --isolation={m.iso} -p"))
                    continue
                handles.append((m, r.out.strip().splitlines()[-1]))
                ports[m.name] = (sink, http)
                commands[m.name] = shlex.join(["vmrt", *cmd[len(self.vmrt):]])
                live.append(m.name)
            for name in list(live):
                try:
                    ready_s[name] = wait_net_ready(*ports[name], NET_FILE_BYTES)
                    self.say(f"net: {name}: servers answer after {ready_s[name]:.1f} s; warm-up")
                    net_transfer(ports[name][0], min(NET_WARMUP_MIB, self.net_mib) * 1024 * 1024)
                    for _ in range(NET_WARMUP_GETS):
                        http_get(ports[name][1], NET_FILE_BYTES)
                except (OSError, BenchError) as e:
                    lost(name, f"before timing: {e}")
            rates: dict[str, list[float]] = {n: [] for n in live}
            secs: dict[str, list[float]] = {n: [] for n in live}
            for rep in range(REPS):
                for name in rotate(list(live), rep):
                    self.say(f"net: {name}: {self.net_mib} MiB, repetition {rep + 1}/{REPS}")
                    try:
                        t = net_transfer(ports[name][0], nbytes)
                    except (OSError, BenchError) as e:
                        lost(name, f"throughput, repetition {rep + 1}: {e}")
                        continue
                    secs[name].append(t)
                    rates[name].append(self.net_mib / t)
            lat: dict[str, list[float]] = {n: [] for n in live}
            self.say(f"net: {self.net_requests} GETs per path, interleaved: {', '.join(live)}")
            for i in range(self.net_requests):
                for name in rotate(list(live), i):
                    try:
                        lat[name].append(http_get(ports[name][1], NET_FILE_BYTES) * 1000)
                    except (OSError, BenchError) as e:
                        lost(name, f"request {i + 1}: {e}")
        finally:
            for vm_mode, handle in handles:
                vm_mode.remove([handle])
            for p in servers:
                self.procs.stop_group(p)
        paths = {"host-loopback": "127.0.0.1 -> the host's own servers (loopback)",
                 "process": "127.0.0.1 -> nftables DNAT (route_localnet) -> bridge -> veth -> the container's "
                            "network namespace",
                 "vm-cold": "127.0.0.1 -> nftables DNAT (route_localnet) -> bridge -> veth -> tc redirect -> tap "
                            "-> virtio-net (QEMU) -> the guest"}
        out: dict[str, dict[str, Any]] = {}
        for name in ["host-loopback", *(m.name for m in modes)]:
            if name in res:  # skipped or failed: as it is, in this order
                out[name] = res.pop(name)
                continue
            mode = self.modes.get(name)
            out[name] = {
                "setup": {**mode.setup(), "network": "bridge (default), ports published on 127.0.0.1"} if mode
                else host_setup,
                "command": commands[name], "path": paths[name], "ready_s": round(ready_s[name], 2),
                "throughput": {"mib": self.net_mib, "repetitions": len(rates[name]),
                               "mib_s": summary(rates[name], 1), "seconds": summary(secs[name], 3)},
                "latency_ms": {"requests": len(lat[name]), "file_bytes": NET_FILE_BYTES, **summary(lat[name], 3)},
            }
        out.update(res)  # the modes it does not apply to
        hb = out.get("host-loopback", {})
        for name, entry in out.items():
            if name != "host-loopback" and "throughput" in entry and "throughput" in hb:
                base = hb["throughput"]["mib_s"]["p50"]
                entry["throughput_ratio_to_host"] = round(entry["throughput"]["mib_s"]["p50"] / base, 3)
                entry["latency_p50_ratio_to_host"] = round(entry["latency_ms"]["p50"] / hb["latency_ms"]["p50"], 2)
        self.results["net"] = out
        self.workloads["net"] = {
            "network": "the default bridge network (whatever --network says); ports published on 127.0.0.1 with -p",
            "servers": f"busybox httpd -f (GET /index.html, {NET_FILE_BYTES} bytes) and a TCP sink: a shell loop of "
                       "busybox 'nc -l -p PORT' (stdin a FIFO held open, output to /dev/null), in one detached "
                       "container per mode; the same on the host for host-loopback",
            "throughput": f"{self.net_mib} MiB sent over a new connection, then shutdown(SHUT_WR); timed from "
                          f"connect to the sink's EOF (it has read everything and exited); {REPS} repetitions, "
                          "interleaved; MiB/s",
            "latency": f"{self.net_requests} sequential HTTP/1.0 GETs per path, a new TCP connection each (as curl), "
                       "timed from connect to the last byte; interleaved path by path; ms",
            "warmup": f"readiness probes, then a transfer of {min(NET_WARMUP_MIB, self.net_mib)} MiB and "
                      f"{NET_WARMUP_GETS} GETs per path, discarded",
            "client": "Python sockets on the host, the same code for every path",
            "timing": "host CLOCK_MONOTONIC (time.perf_counter)"}

    # --- driver ---
    def run(self) -> dict[str, Any]:
        self.collect_meta()
        tmp = Path(tempfile.mkdtemp(prefix="vmrt-bench-"))
        try:
            self.make_modes()
            for metric in METRICS:
                if metric not in self.only:
                    continue
                if metric in ("io", "cpu", "net"):
                    getattr(self, f"bench_{metric}")(tmp)
                else:
                    getattr(self, f"bench_{metric}")()
        finally:
            self.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
        return self.document()

    def cleanup(self) -> None:
        """Stop what runs, remove every container this bench made (also after Ctrl-C)."""
        main = threading.current_thread() is threading.main_thread()
        old = [(s, signal.signal(s, signal.SIG_IGN)) for s in (signal.SIGINT, signal.SIGTERM)] if main else []
        try:
            self.procs.stop_all()
            for m in self.modes.values():
                with contextlib.suppress(Exception):
                    m.close()
            if self.vmrt_names:
                r = self.procs.run([*self.vmrt, "ps", "-a", "--format", "{{.Names}}"])
                left = sorted(set(r.out.split()) & self.vmrt_names)
                if left:
                    self.procs.run([*self.vmrt, "rm", "-f", *left])
        finally:
            for sig, handler in old:
                signal.signal(sig, handler)

    def document(self) -> dict[str, Any]:
        modes: dict[str, dict[str, Any]] = {}
        for name, m in self.modes.items():
            if m.skipped:
                modes[name] = {"status": "skipped", "reason": m.skipped}
                continue
            entries = {k: v[name] for k, v in self.results.items() if isinstance(v.get(name), dict)}
            errs = {k: str(e["error"]) for k, e in entries.items() if "error" in e}
            ok = [k for k, e in entries.items() if "error" not in e and "skipped" not in e]
            status = "ok" if not errs else "partial" if ok else "failed"
            modes[name] = {"status": status, "setup": m.setup(), "command": m.command(),
                           **({"errors": errs} if errs else {})}
        return {"schema": "vmrt-bench/1", "meta": self.meta,
                "options": {"runs": self.runs, "parallel": self.parallel, "density_max": self.density_max,
                            "modes": self.mode_names, "only": self.only, "image": self.image, "idle": self.idle_n,
                            "pool_size": self.pool_size, "io_cpu_repetitions": REPS, "network": self.network,
                            "net_mib": self.net_mib, "net_requests": self.net_requests,
                            "net_repetitions": REPS},
                "modes": modes, "results": self.results, "workloads": self.workloads}


def rotate(xs: list[Any], i: int) -> list[Any]:
    if not xs:
        return xs
    k = i % len(xs)
    return xs[k:] + xs[:k]


def parse_marked(lines: list[tuple[float, str]]) -> dict[str, Any]:
    begin: dict[str, float] = {}
    out: dict[str, Any] = {"t": {}, "mounts": [], "info": {}, "done": False, "problems": []}
    for t, line in lines:
        if line.startswith("@B "):
            begin[line[3:]] = t
        elif line.startswith("@E ") and line[3:] in begin:
            out["t"][line[3:]] = t - begin[line[3:]]
        elif line.startswith("@M "):
            f = line.split()
            if len(f) >= 4:
                out["mounts"].append((f[2], f[3]))
        elif line.startswith("@S "):
            _, k, v = (line.split(maxsplit=2) + ["", ""])[:3]
            out["info"][k] = v.strip()
        elif line.startswith("@X "):
            out["problems"].append(line[3:])
        elif line == "@D":
            out["done"] = True
    return out


# --- output ---------------------------------------------------------------------------------------

def _f(x: Any, nd: int = 0) -> str:
    if x is None or x == {}:
        return "-"
    if isinstance(x, int | float):
        return f"{x:.{nd}f}"
    return str(x)


def _status(e: dict[str, Any]) -> str | None:
    if "skipped" in e:
        return f"skipped: {e['skipped']}"
    if "error" in e:
        return f"failed: {e['error']}"
    return None


def tables(doc: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per metric, for the terminal and for markdown. Modes skipped
    altogether (listed once below the tables) and metrics that do not apply get no row."""
    skipped = {k for k, v in doc["modes"].items() if v["status"] == "skipped"}
    res = {metric: {k: v for k, v in per.items() if k not in skipped and not v.get("not_applicable")}
           for metric, per in doc["results"].items()}
    out = []
    if "start" in res:
        rows = []
        for name, e in res["start"].items():
            s = e.get("serial", {})
            st = _status(e)
            if st:
                rows.append([name, *["-"] * 7, st])
                continue
            p = e.get("parallel", {})
            pool = e.get("served_from_pool")
            note = ""
            if pool is not None and (name in ("vm-pool", "vm-snapshot") or pool):
                note = f"{'restored' if name == 'vm-snapshot' else 'from pool'}: {pool}/{s['n']} serial"
                if "served_from_pool" in p:
                    note += f", {p['served_from_pool']}/{p['n']} parallel"
            if isinstance(p, dict) and "error" in p:
                note = (note + " parallel failed").strip()
            rows.append([name, _f(s["p50"]), _f(s["p90"]), _f(s["p99"]), _f(s.get("ratio_p50_to_runc"), 2),
                         _f(p.get("p50")), _f(p.get("p99")), _f(p.get("batch_wall_ms", {}).get("p50")), note])
        P = doc["options"]["parallel"]
        out.append((f"Start latency, `run --rm IMAGE true` (ms; serial n={doc['options']['runs']}, "
                    f"{P} in parallel)", ["mode", "p50", "p90", "p99", "p50/runc", f"par{P} p50", f"par{P} p99",
                                          "batch wall p50", "note"], rows))
    if "exec" in res:
        rows = []
        for name, e in res["exec"].items():
            st = _status(e)
            rows.append([name, "-", "-", "-", "-", st] if st else [name, _f(e["p50"]), _f(e["p90"]), _f(e["p99"]),
                                                                   str(e["n"]), ""])
        out.append(("Exec latency, `exec C true` (ms)", ["mode", "p50", "p90", "p99", "n", "note"], rows))
    if "memory" in res:
        rows = []
        for name, e in res["memory"].items():
            st = _status(e)
            if st:
                rows.append([name, "-", "-", "-", st])
                continue
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(e["pss_mib_by_process"].items(), key=lambda kv: -kv[1]))
            rows.append([name, str(e["containers"]), _f(e["pss_mib_per_container"]["p50"], 1),
                         _f(e["memavailable_drop_mib_per_container"], 1), parts])
        out.append(("Idle memory per container (MiB)", ["mode", "containers", "host PSS", "MemAvailable drop",
                                                        "PSS by process"], rows))
    if "density" in res:
        rows = []
        for name, e in res["density"].items():
            st = _status(e)
            if st:
                rows.append([name, "-", st, "-", "-", "-", "-"])
                continue
            pss = e.get("pss_mib_per_container") or {}
            rows.append([name, f"{e['started']}/{e['max']}", e["stopped_because"], _f(pss.get("mean"), 1),
                         _f(e.get("memavailable_drop_mib_per_container"), 1),
                         _f(e.get("start_ms", {}).get("p50")), _f(e.get("start_ms", {}).get("max"))])
        out.append(("Density: idle containers started one by one",
                    ["mode", "running", "stopped because", "PSS MiB each", "MemAvail drop each",
                     "start p50 ms", "start max ms"], rows))
    if "io" in res:
        rows, rows2 = [], []
        for name, e in res["io"].items():
            st = _status(e)
            if st:
                rows.append([name, *["-"] * 7, st])
                rows2.append([name, *["-"] * 5, st])
                continue
            r, t, im, md = e["rootfs"], e["tmp"], e["image_read"], e["metadata"]
            rows.append([name, r["fs"], _f(r["write_mb_s"].get("p50")), _f(r["read_mb_s"].get("p50")),
                         t["fs"], _f(t["write_mb_s"].get("p50")), _f(t["read_mb_s"].get("p50")),
                         f"{_f(im['mb_s'].get('p50'))} ({im['fs']})", ""])
            rows2.append([name, r["fs"], _f(md["create_ops_s"].get("p50")), _f(md["stat_ops_s"].get("p50")),
                          _f(md["delete_ops_s"].get("p50")), _f(md["empty_loop_ms_per_1000"].get("p50"), 1), ""])
        out.append((f"Sequential I/O (MB/s, {IO_MIB} MiB dd, p50 of {REPS})",
                    ["where", "/ fs", "/ write", "/ read", "/tmp fs", "/tmp write", "/tmp read", "image read", "note"],
                    rows))
        out.append((f"Small files ({META_FILES} files, ops/s, p50 of {REPS})",
                    ["where", "fs", "create", "stat", "delete", "loop ms/1000", "note"], rows2))
    if "cpu" in res:
        rows = []
        for name, e in res["cpu"].items():
            st = _status(e)
            if st:
                rows.append([name, "-", "-", "-", "-", "-", st])
                continue
            rows.append([name, _f(e["cpu_loop_s"]["p50"], 3), _f(e.get("cpu_ratio_to_host"), 2),
                         _f(e["syscall_loop_s"]["p50"], 3), _f(e["syscalls_per_s"]),
                         _f(e.get("syscall_ratio_to_host"), 2), ""])
        out.append((f"CPU loop ({CPU_ITERS} awk iterations) and syscall loop ({2 * SYSCALL_BYTES} syscalls), "
                    f"p50 of {REPS}", ["where", "cpu s", "/host", "syscall s", "syscalls/s", "/host", "note"], rows))
    if "net" in res:
        rows = []
        o = doc["options"]
        for name, e in sorted(res["net"].items(), key=lambda kv: kv[0] != "host-loopback"):
            st = _status(e)
            if st:
                rows.append([name, *["-"] * 6, st])
                continue
            t, lat = e["throughput"]["mib_s"], e["latency_ms"]
            rows.append([name, _f(t["p50"], 1), _f(e.get("throughput_ratio_to_host"), 3), _f(lat["p50"], 2),
                         _f(lat["p90"], 2), _f(lat["p99"], 2), _f(e.get("latency_p50_ratio_to_host"), 2), ""])
        out.append((f"Network through published ports on 127.0.0.1 (default bridge network): TCP throughput "
                    f"({o.get('net_mib')} MiB, p50 of {o.get('net_repetitions', REPS)}) and HTTP GET latency "
                    f"({NET_FILE_BYTES} B file, new connection each, n={o.get('net_requests')})",
                    ["path", "MiB/s", "MiB/s / host", "p50 ms", "p90 ms", "p99 ms", "p50 / host", "note"], rows))
    for i, (title, header, rows) in enumerate(out):  # no empty note column
        if header[-1] == "note" and not any(r[-1] for r in rows):
            out[i] = (title, header[:-1], [r[:-1] for r in rows])
    return out


def setup_line(doc: dict[str, Any]) -> str:
    m, vm = doc["meta"], doc["meta"]["vm"]
    return (f"accel={m['accelerator']} (host /dev/kvm: {m['host_kvm']}), machine {vm['machine']}, guest RAM "
            f"{vm['guest_memory_mib']} MiB, {vm['vcpus']} vCPU, kernel build {vm['kernel_build_id']}, "
            f"virtio-fs cache={vm['virtiofs_cache']} (DAX off), vmrt {m['vmrt_version']}, "
            f"{m['host']['cores']} host cores, {m['host']['mem_total_mib']} MiB host RAM, runtime "
            f"{m['process_runtime']}, vmrt containers' network: {m.get('network', '?')}"
            + (" (net: default bridge)" if "net" in doc.get("options", {}).get("only", []) else ""))


def terminal(doc: dict[str, Any]) -> str:
    out = [f"vmrt bench, {doc['meta']['date']}: {setup_line(doc)}", ""]
    for title, header, rows in tables(doc):
        rows = [[c if len(c) <= 60 else c[:57] + "..." for c in r] for r in rows]
        w = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
        out.append(title)
        out.append("  ".join(h.ljust(w[i]) for i, h in enumerate(header)).rstrip())
        for r in rows:
            out.append("  ".join(str(c).ljust(w[i]) if i == 0 or not _numeric(c) else str(c).rjust(w[i])
                                 for i, c in enumerate(r)).rstrip())
        out.append("")
    skipped = [f"{k}: {v['reason']}" for k, v in doc["modes"].items() if v["status"] == "skipped"]
    if skipped:
        out.append("Skipped modes: " + "; ".join(skipped))
    return "\n".join(out)


def _numeric(s: str) -> bool:
    return bool(re.fullmatch(r"-?[\d.]+", s))


def markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    out = [f"\n### vmrt bench, {m['date']} — accel={m['accelerator']} (host /dev/kvm: {m['host_kvm']})\n",
           f"Command: `{m['command']}`  ",
           setup_line(doc) + ". Runs interleaved mode by mode (rotating order), one warm-up round discarded; "
           "times from the host (CLOCK_MONOTONIC).\n"]
    for title, header, rows in tables(doc):
        out.append(f"{title}:\n")
        out.append("| " + " | ".join(header) + " |")
        numeric = [all(_numeric(r[i]) or r[i] in ("-", "") for r in rows) for i in range(len(header))]
        out.append("|" + "|".join("---:" if i and numeric[i] else "---" for i in range(len(header))) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        out.append("")
    skipped = [f"{k} ({v['reason']})" for k, v in doc["modes"].items() if v["status"] == "skipped"]
    if skipped:
        out.append("Skipped: " + "; ".join(skipped) + ".\n")
    return "\n".join(out)


def plots(doc: dict[str, Any], outdir: Path) -> list[str]:
    """PNG plots; raises ImportError when matplotlib is missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    outdir.mkdir(parents=True, exist_ok=True)
    res, made = doc["results"], []
    sub = setup_line(doc)
    sub = sub[:sub.index(", vmrt")] if ", vmrt" in sub else sub

    def bars(ax: Any, labels: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False) -> None:
        n = max(1, len(series))
        width = 0.8 / n
        for i, (k, vals) in enumerate(series.items()):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
            b = ax.bar(xs, vals, width, label=k)
            ax.bar_label(b, fmt=lambda v: f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}", fontsize=6, rotation=90,
                         padding=2)
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * 2.5)  # room for the value labels
        else:
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(0, lo), hi * 1.15)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)

    def save(fig: Any, name: str, title: str) -> None:
        fig.suptitle(f"{title}\n{sub}", fontsize=8)
        fig.tight_layout()
        p = outdir / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(str(p))

    start = {k: v for k, v in res.get("start", {}).items() if "serial" in v}
    if start:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        labels = list(start)
        bars(axes[0], labels, {q: [start[k]["serial"][q] for k in labels] for q in ("p50", "p90", "p99")},
             "ms (log)", log=True)
        axes[0].set_title("serial", fontsize=9)
        par = [k for k in labels if isinstance(start[k].get("parallel"), dict) and "p50" in start[k]["parallel"]]
        if par:
            bars(axes[1], par, {q: [start[k]["parallel"][q] for k in par] for q in ("p50", "p90", "p99")},
                 "ms (log)", log=True)
            axes[1].set_title(f"{doc['options']['parallel']} in parallel (latency per run)", fontsize=9)
        else:
            axes[1].axis("off")
        save(fig, "start_latency.png", "Start latency: run --rm IMAGE true")
    ex = {k: v for k, v in res.get("exec", {}).items() if "p50" in v}
    if ex:
        fig, ax = plt.subplots(figsize=(7, 4))
        bars(ax, list(ex), {q: [ex[k][q] for k in ex] for q in ("p50", "p90", "p99")}, "ms")
        save(fig, "exec_latency.png", "Exec latency: exec C true")
    mem = {k: v for k, v in res.get("memory", {}).items() if "pss_mib_per_container" in v}
    dens = {k: v for k, v in res.get("density", {}).items() if "started" in v}
    if mem or dens:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        if mem:
            bars(axes[0], list(mem), {"host PSS": [mem[k]["pss_mib_per_container"]["p50"] for k in mem],
                                      "MemAvailable drop": [mem[k]["memavailable_drop_mib_per_container"]
                                                            for k in mem]}, "MiB per idle container")
            axes[0].set_title("idle memory", fontsize=9)
        else:
            axes[0].axis("off")
        if dens:
            bars(axes[1], list(dens), {"running": [dens[k]["started"] for k in dens],
                                       "PSS MiB each": [(dens[k].get("pss_mib_per_container") or {}).get("mean", 0)
                                                        for k in dens]}, "")
            axes[1].set_title(f"density (max {doc['options']['density_max']})", fontsize=9)
        else:
            axes[1].axis("off")
        save(fig, "memory.png", "Memory per container and density")
    io = {k: v for k, v in res.get("io", {}).items() if "rootfs" in v}
    if io:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        keys = [("rootfs", "write_mb_s", "/ write"), ("rootfs", "read_mb_s", "/ read"),
                ("tmp", "write_mb_s", "/tmp write"), ("tmp", "read_mb_s", "/tmp read")]
        series = {lab: [io[k][a][b].get("p50", 0) for k in io] for a, b, lab in keys}
        series["image read"] = [io[k]["image_read"]["mb_s"].get("p50", 0) for k in io]
        bars(axes[0], list(io), series, "MB/s (log)", log=True)
        axes[0].set_title("sequential", fontsize=9)
        bars(axes[1], list(io), {op: [io[k]["metadata"][f"{op}_ops_s"].get("p50", 0) for k in io]
                                 for op in ("create", "stat", "delete")}, "ops/s (log)", log=True)
        axes[1].set_title(f"{META_FILES} small files", fontsize=9)
        save(fig, "io.png", "Rootfs I/O vs the host's file system")
    cpu = {k: v for k, v in res.get("cpu", {}).items() if "cpu_loop_s" in v}
    if cpu:
        fig, ax = plt.subplots(figsize=(7, 4))
        bars(ax, list(cpu), {"cpu loop": [cpu[k]["cpu_loop_s"]["p50"] for k in cpu],
                             "syscall loop": [cpu[k]["syscall_loop_s"]["p50"] for k in cpu]}, "s (log)", log=True)
        save(fig, "cpu.png", "CPU loop and syscall loop (time, lower is better)")
    net = dict(sorted(((k, v) for k, v in res.get("net", {}).items() if "throughput" in v),
                      key=lambda kv: kv[0] != "host-loopback"))
    if net:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        bars(axes[0], list(net), {"MiB/s": [net[k]["throughput"]["mib_s"]["p50"] for k in net]}, "MiB/s")
        axes[0].set_title(f"TCP throughput, {doc['options'].get('net_mib')} MiB (p50)", fontsize=9)
        bars(axes[1], list(net), {q: [net[k]["latency_ms"][q] for k in net] for q in ("p50", "p90", "p99")},
             "ms (log)", log=True)
        axes[1].set_title(f"HTTP GET, new connection each (n={doc['options'].get('net_requests')})", fontsize=9)
        save(fig, "net.png", "Network through published ports (default bridge) vs host loopback")
    return made


# --- entry point ----------------------------------------------------------------------------------

def parse_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"--{what}: empty list (use {','.join(allowed)})")
    for v in items:
        if v not in allowed:
            raise UsageError(f"--{what}: unknown {what.rstrip('s')} {v!r} (use {','.join(allowed)})")
    return [v for v in allowed if v in items]  # canonical order, no duplicates


def main(cfg: Config, *, runs: int, parallel: int, density_max: int, modes: str, only: str,
         json_path: Path | None, plots_dir: Path | None, write_md: Path | None, image: str,
         idle: int | None, pool_size: int | None, argv: list[str], network: str = "none",
         net_mib: int = NET_MIB, net_requests: int = NET_REQUESTS) -> int:
    mode_list = parse_list(modes, MODES, "modes")
    only_list = parse_list(only, METRICS, "only")
    if not network.strip():
        raise UsageError("--network: empty (use none, bridge or a network's name)")
    if os.geteuid() != 0:
        raise UsageError("vmrt bench needs root (it runs containers)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = json_path or Path(f"vmrt-bench-{stamp}.json")
    plots_dir = plots_dir or Path("vmrt-bench-plots")
    if write_md is not None and not write_md.parent.is_dir():
        raise UsageError(f"--write-md: no directory {write_md.parent}")

    def say(msg: str) -> None:
        print(f"vmrt bench: {msg}", file=sys.stderr, flush=True)
    bench = Bench(cfg, runs=runs, parallel=parallel, density_max=density_max, modes=mode_list, only=only_list,
                  image=image, idle=idle or parallel, pool_size=pool_size or max(1, parallel), argv=argv, say=say,
                  network=network.strip(), net_mib=net_mib, net_requests=net_requests)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        doc = bench.run()
    except KeyboardInterrupt:
        raise VmrtError("bench interrupted (its containers were removed); no results written",
                        exit_code=130) from None
    finally:
        signal.signal(signal.SIGTERM, old)
    try:
        doc["plots"] = plots(doc, plots_dir)
    except ImportError:
        doc["plots"] = []
        say("matplotlib is not installed: no plots (pip install 'vmrt[bench]')")
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(terminal(doc))
    print(f"\nJSON: {json_path}" + (f"; plots: {plots_dir}/" if doc["plots"] else ""))
    if write_md is not None:
        with write_md.open("a") as f:
            f.write(markdown(doc))
        print(f"Appended to {write_md}")
    return 0
