"""``vmrt stats`` and ``vmrt top``: what a container costs and runs.

Process mode reads the container's cgroup (memory, CPU time, pids). VM mode
reports the real host cost, the PSS and CPU time of the processes that exist
for the container on the host (QEMU, virtiofsd and its monitor), beside the
guest's own view of its memory (MemTotal - MemAvailable inside the VM, read
through the agent). ``top`` lists the container's processes: from the host for
process mode, and from inside the VM (through the agent) for VM mode, whose
processes the host cannot see.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cgroups
from .errors import VmrtError
from .formatting import inert
from .state import Container

HZ = os.sysconf("SC_CLK_TCK")
TOP_OUTPUT_MAX = 4 << 20  # what of a VM's `ps` output is kept (the image's ps could print forever)
MEMINFO_MAX = 60000       # a guest's /proc/meminfo read at most (less than a pipe holds: never blocks)


def _read_int(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text().strip()
        return None if text == "max" else int(text.split()[0])
    return None


def _controller(name: str, rel: str) -> Path:
    root = cgroups.ROOT
    return root / rel.strip("/") if cgroups.is_v2(root) else root / name / rel.strip("/")


def cgroup_procs(rel: str) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in (_controller("pids", rel) / "cgroup.procs").read_text().split()]
    return []


def pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def cpu_ns(pid: int) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) * 1_000_000_000 // HZ
    return 0


def host_pids(c: Container) -> list[int]:
    """The host processes that exist for a VM container: QEMU, virtiofsd, the monitor."""
    pids = [p for p in (c.pids.get("qemu"), c.pids.get("virtiofsd"), c.monitor_pid) if p]
    return [p for p in pids if Path(f"/proc/{p}").exists()]


def sample(c: Container) -> dict[str, Any]:
    """One reading: cpu_ns (cumulative), mem and limit (bytes), pids, and for VMs the guest's memory."""
    if c.isolation == "process":
        rel = cgroups.runtime_path(c.id)
        if cgroups.is_v2():
            mem = _read_int(_controller("memory", rel) / "memory.current")
            limit = _read_int(_controller("memory", rel) / "memory.max")
            cpu = None
            with contextlib.suppress(OSError, ValueError):
                stat = dict(line.split() for line in (_controller("cpu", rel) / "cpu.stat").read_text().splitlines())
                cpu = int(stat["usage_usec"]) * 1000
        else:
            mem = _read_int(_controller("memory", rel) / "memory.usage_in_bytes")
            limit = _read_int(_controller("memory", rel) / "memory.limit_in_bytes")
            cpu = _read_int(cgroups.ROOT / "cpuacct" / rel.strip("/") / "cpuacct.usage")
        if limit is not None and limit >= 1 << 62:
            limit = None
        return {"cpu_ns": cpu or 0, "mem": mem or 0, "limit": limit, "pids": len(cgroup_procs(rel)),
                "guest_mem": None}
    pids = host_pids(c)
    vmm = f"{cgroups.PARENT}/{c.id}-vmm"
    limit = _read_int(_controller("memory", vmm) / ("memory.max" if cgroups.is_v2() else "memory.limit_in_bytes"))
    return {"cpu_ns": sum(cpu_ns(p) for p in pids), "mem": sum(pss_kib(p) for p in pids) * 1024,
            "limit": limit if limit is not None and limit < 1 << 62 else None, "pids": len(pids),
            "guest_mem": None}  # measure() reads the guest's own figure


def meminfo_used(text: bytes) -> int | None:
    """MemTotal - MemAvailable in bytes from a guest's /proc/meminfo (the guest's text: anything
    else, or nonsense, is None)."""
    info: dict[str, int] = {}
    for line in text.decode("utf-8", "replace").splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if key in ("MemTotal", "MemAvailable") and words and words[0].isascii() and words[0].isdigit() \
                and len(words[0]) <= 20:
            info[key] = int(words[0])
    if "MemTotal" not in info or "MemAvailable" not in info or info["MemAvailable"] > info["MemTotal"]:
        return None
    return (info["MemTotal"] - info["MemAvailable"]) * 1024


def guest_memory(c: Container, timeout: float = 5.0) -> int | None:
    """Memory in use as the guest sees it (MemTotal - MemAvailable of the VM), read through the agent
    within ``timeout`` seconds and less output than the pipe holds (a hung guest: no figure)."""
    r, w = os.pipe()
    try:
        from .agent.exec_client import exec_in_vm  # on use: VM containers only (vm.qemu behind it)
        with open(os.devnull, "wb") as null:
            status = exec_in_vm(Path(c.run_dir), ["cat", "/proc/meminfo"], env=[], cwd="/", uid=0, gid=0,
                                groups=[], tty=None, interactive=False, stdout_fd=w, stderr_fd=null.fileno(),
                                timeout=timeout, max_output=MEMINFO_MAX)
        os.close(w)
        w = -1
        with open(r, "rb") as f:
            r = -1
            text = f.read(1 << 20)
        return meminfo_used(text) if status == 0 else None
    except Exception:  # an exec port busy, the VM going away: no guest figure this time
        return None
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def measure(containers: list[Container], interval: float = 0.5, timeout: float = 5.0) -> list[dict[str, Any]]:
    """CPU % over ``interval`` and the latest memory figures, one dict per container. The guests'
    own figures are read meanwhile, all at once: a hung VM costs ``timeout`` once, not per VM."""
    first = {c.id: sample(c) for c in containers}
    guest: dict[str, int | None] = {}
    readers = [threading.Thread(target=lambda c=c: guest.__setitem__(c.id, guest_memory(c, timeout)), daemon=True)
               for c in containers if c.isolation == "vm"]
    for t in readers:
        t.start()
    t0 = time.monotonic()
    time.sleep(interval)
    rows = []
    for c in containers:
        s = sample(c)
        dt_ns = (time.monotonic() - t0) * 1e9
        cpu = max(0.0, (s["cpu_ns"] - first[c.id]["cpu_ns"]) / dt_ns * 100) if dt_ns else 0.0
        rows.append({"c": c, "cpu": cpu, **s})
    for t in readers:
        t.join(max(0.0, t0 + timeout + 1.0 - time.monotonic()))
    for row in rows:
        row["guest_mem"] = guest.get(row["c"].id)
    return rows


def _read_capped(fd: int, into: bytearray) -> None:
    with open(fd, "rb", buffering=0) as f:
        while chunk := f.read(65536):
            into += chunk[:max(0, TOP_OUTPUT_MAX - len(into))]


def inert_exec(run: Callable[[int, int], int]) -> int:
    """``run(stdout_fd, stderr_fd)``, an exec whose output is the image's text but which vmrt
    prints as its own (``top``: the image's ``ps``): read through pipes (at most
    TOP_OUTPUT_MAX bytes each) and printed with terminal controls escaped."""
    outs = [bytearray(), bytearray()]
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in outs]
    readers = [threading.Thread(target=_read_capped, args=(r, buf), daemon=True)
               for (r, _), buf in zip(pipes, outs, strict=True)]
    for t in readers:
        t.start()
    try:
        status = run(pipes[0][1], pipes[1][1])
    finally:
        for _, w in pipes:
            os.close(w)
        for t in readers:
            t.join()
    for stream, buf in zip((sys.stdout, sys.stderr), outs, strict=True):
        stream.write(inert(bytes(buf), block=True))
        stream.flush()
    return status


def top(c: Container, ps_args: list[str], timeout: float = 5.0) -> int:
    """``docker top``: ``ps`` of the container's processes; in a VM, run inside it (the image's
    own ``ps``, so its output is escaped like any guest text)."""
    if c.isolation == "vm":
        from .agent.exec_client import exec_in_vm  # on use: VM containers only (vm.qemu behind it)
        return inert_exec(lambda out, err: exec_in_vm(
            Path(c.run_dir), ["ps", *ps_args], env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], cwd="/", uid=0, gid=0,
            groups=[], tty=None, interactive=False, stdout_fd=out, stderr_fd=err, timeout=timeout,
            max_output=TOP_OUTPUT_MAX))
    pids = cgroup_procs(cgroups.runtime_path(c.id))
    if not pids:
        return 0
    try:  # the host's ps: bounded all the same
        return subprocess.run(["ps", *(ps_args or ["-f"]), "-p", ",".join(map(str, pids))], check=False,
                              timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        raise VmrtError(f"ps did not finish within {timeout:g}s") from None


def ps_table(c: Container, ps_args: list[str], timeout: float = 5.0) -> tuple[list[str], list[list[str]]]:
    """``top`` as data (the API's ``GET /containers/{id}/top``): ps's column titles and one row
    per process, the last column taking the rest of the line (a command with spaces), as
    Docker's daemon splits it. ``ps_args`` default to ``-ef``. Process mode runs the host's
    ``ps`` and keeps the rows whose PID is in the container's cgroup (a PID column is needed);
    VM mode runs the image's ``ps`` inside the VM (every process there is the container's). The
    output is bounded and its terminal controls are escaped (it is printed by the client)."""
    args = list(ps_args) or ["-ef"]
    out, err = bytearray(), bytearray()
    if c.isolation == "vm":
        from .agent.exec_client import exec_in_vm  # on use: VM containers only (vm.qemu behind it)
        r, w = os.pipe2(os.O_CLOEXEC)
        reader = threading.Thread(target=_read_capped, args=(r, err), daemon=True)
        reader.start()
        try:
            status = exec_in_vm(Path(c.run_dir), ["ps", *args], env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], cwd="/",
                                uid=0, gid=0, groups=[], tty=None, interactive=False, stdout_fd=-1, stderr_fd=w,
                                timeout=timeout, max_output=TOP_OUTPUT_MAX, capture=out)
        finally:
            os.close(w)
            reader.join()
        pids = None
    else:
        pids = set(cgroup_procs(cgroups.runtime_path(c.id)))
        if not pids:
            return [], []
        try:  # the host's ps: bounded all the same
            done = subprocess.run(["ps", *args, "-p", ",".join(map(str, sorted(pids)))], capture_output=True,
                                  check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmrtError(f"ps did not finish within {timeout:g}s") from None
        status = done.returncode
        out[:], err[:] = done.stdout[:TOP_OUTPUT_MAX], done.stderr[:TOP_OUTPUT_MAX]
    if status != 0:
        why = inert(bytes(err[:300])).strip() or f"exit status {status}"
        raise VmrtError(f"ps {' '.join(inert(a) for a in args)} failed: {why}")
    return parse_ps(inert(bytes(out), block=True), pids)


def parse_ps(text: str, pids: set[int] | None) -> tuple[list[str], list[list[str]]]:
    """ps's output as (titles, rows); with ``pids``, only the rows whose PID column names one."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise VmrtError("ps printed nothing")
    titles = lines[0].split()
    col = titles.index("PID") if "PID" in titles else None
    if pids is not None and col is None:
        raise VmrtError("Couldn't find PID field in ps output")
    rows = []
    for line in lines[1:]:
        fields = line.split()
        row = [*fields[:len(titles) - 1], " ".join(fields[len(titles) - 1:])]
        if pids is not None and col is not None and not (
                col < len(row) and row[col].isdigit() and int(row[col]) in pids):
            continue
        rows.append(row)
    return titles, rows
