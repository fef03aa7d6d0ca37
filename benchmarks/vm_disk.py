#!/usr/bin/env python3
"""A VM container's writable layer on its disk (issue 16) against the tmpfs it replaced.

    python3 benchmarks/vm_disk.py [--runs 10] [--idle 3] [--settle 10] [--write F]

A private vmrt root runs ``vmrt run --rm --isolation=vm --network none --timings busybox true``
with the default disk (``vm_storage_size`` 10g: a new sparse file, mkfs.ext4 while the VM boots,
mounted by the agent) and with ``VMRT_VM_STORAGE_SIZE=0`` (the overlay's upper on a tmpfs in
guest RAM, as before; the VM still has the disk device, with its empty placeholder), runs
interleaved, no snapshot or pool (every run boots), two warm-up runs of each discarded: wall
time from the host, and the time from the agent's HELLO to the container's start (where the
disk is waited for and mounted). Then ``--idle`` detached idle containers of each, ``--settle``
seconds after they started: PSS of QEMU and of everything in the container's VMM cgroup, and
the blocks the disk file holds on the host. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from jail import clear_root, pct, pss_kib, report, vmrt  # noqa: E402  (benchmarks/jail.py: the same helpers)

from vmrt import cgroups  # noqa: E402
from vmrt import config as config_mod  # noqa: E402
from vmrt.vm import accel  # noqa: E402

READY = re.compile(r"^\s+agent-ready\s+([\d.]+)\s+\(\+", re.M)
STARTED = re.compile(r"^\s+process-started\s+([\d.]+)\s+\(\+", re.M)
VARIANTS = {"tmpfs (vm_storage_size 0)": "0", "disk (10g)": "10g"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--idle", type=int, default=3)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds the idle containers settle first")
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmrt-disk-bench."))
    env = dict(os.environ, VMRT_ROOT=str(base / "root"), VMRT_RUN_ROOT=str(base / "run"), VMRT_POOL="off",
               VMRT_SNAPSHOT="off", VMRT_ACCEL=os.environ.get("VMRT_ACCEL", "tcg"))
    env.pop("VMRT_ISOLATION", None)
    envs = {name: dict(env, VMRT_VM_STORAGE_SIZE=size) for name, size in VARIANTS.items()}
    try:
        vmrt(env, "image", "build", str(REPO / "images" / "busybox"))
        wall: dict[str, list[float]] = {k: [] for k in VARIANTS}
        start: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for i in range(a.runs + 2):
            for name, e in envs.items():
                t = time.monotonic_ns()
                r = vmrt(e, "run", "--rm", "--timings", "--isolation=vm", "--network", "none", "busybox", "true")
                if i >= 2:
                    wall[name].append((time.monotonic_ns() - t) / 1e6)
                    if (m := READY.search(r.stderr)) and (n := STARTED.search(r.stderr)):
                        start[name].append(float(n.group(1)) - float(m.group(1)))
        qemu: dict[str, list[int]] = {k: [] for k in VARIANTS}
        vmm: dict[str, list[int]] = {k: [] for k in VARIANTS}
        held: dict[str, list[int]] = {k: [] for k in VARIANTS}
        for name, e in envs.items():
            ids = [vmrt(e, "run", "-d", "--isolation=vm", "--network", "none", "busybox", "sleep", "600").stdout.strip()
                   for _ in range(a.idle)]
            time.sleep(a.settle)  # free page reporting hands the boot's freed pages back meanwhile
            for cid in ids:
                pids = cgroups.members(f"{cgroups.PARENT}/{cid}-vmm")
                vmm[name].append(sum(pss_kib(p) for p in pids))
                qemu[name].append(sum(pss_kib(p) for p in pids
                                      if Path(f"/proc/{p}/comm").read_text().startswith("qemu")))
                disk = base / "root" / "rw" / cid / "disk.img"
                held[name].append(os.stat(disk).st_blocks * 512 if disk.exists() else 0)
            vmrt(e, "rm", "-f", *ids)
        cfg = config_mod.load(env)
        acc = accel.choose(env["VMRT_ACCEL"], user_kernel=False)
        lines = [f"### The writable layer on a disk vs the tmpfs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                 f" — accel={acc.name} (host /dev/kvm: {acc.host_kind})", "",
                 f"`python3 benchmarks/vm_disk.py --runs {a.runs} --idle {a.idle} --settle {a.settle:g}`; "
                 f"{os.cpu_count()} cores, machine {cfg.machine}, guest RAM {cfg.memory_mib} MiB, `--network none`, "
                 "no snapshot or pool (every run boots, and `--rm` makes and formats a new disk each time); runs "
                 "interleaved, 2 warm-up runs of each discarded. HELLO->start: `process-started` - `agent-ready` "
                 "of `--timings`.", "",
                 "| writable layer | start median ms | start p90 ms | HELLO->start median ms | idle QEMU PSS MiB | "
                 "idle VMM cgroup PSS MiB | disk blocks held MiB |", "|---|---|---|---|---|---|---|"]
        for name in VARIANTS:
            s = f"{statistics.median(start[name]):.0f}" if start[name] else "-"
            lines.append(f"| {name} | {statistics.median(wall[name]):.0f} | {pct(wall[name], 90):.0f} | {s} | "
                         f"{statistics.median(qemu[name]) / 1024:.1f} | {statistics.median(vmm[name]) / 1024:.1f} | "
                         f"{statistics.median(held[name]) / (1 << 20):.1f} |")
        report(lines, a.write)
    finally:
        clear_root(env, base)


if __name__ == "__main__":
    main()
