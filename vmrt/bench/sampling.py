"""Host-side sampling of what containers cost: /proc/meminfo, the process table and the PSS
of a container's host processes (its runtime, monitor, QEMU, virtiofsd...)."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path

from ..stats import pss_kib


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
    out: dict[str, float] = {}
    for p in pids:
        name = table.get(p, (0, "?"))[1]
        out[name] = out.get(name, 0.0) + pss_kib(p) / 1024
    return out
