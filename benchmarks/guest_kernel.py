#!/usr/bin/env python3
"""Two guest kernels side by side: cold VM start, the guest's boot to its agent, idle memory.

    python3 benchmarks/guest_kernel.py --old VMLINUX [--new VMLINUX] [--runs 15] [--idle 2] [--write F]

``--new`` defaults to the kernel vmrt builds now (``vmrt kernel build``'s cache). A private
vmrt root runs ``vmrt run --rm --isolation=vm --network none --timings --kernel K busybox true``
for each kernel in turn (interleaved; no snapshot, no pool: every run boots), two warm-up runs
of each discarded: wall time from the host and the ``agent-ready`` phase of ``--timings``
(QEMU started to the agent's HELLO: the guest kernel's boot). Then ``--idle`` detached idle
containers per kernel: PSS of the processes in the container's VMM cgroup, and the guest's own
MemAvailable. A benchmark, never a test.
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

from vmrt import cgroups, kernel  # noqa: E402
from vmrt import config as config_mod  # noqa: E402
from vmrt.vm import accel  # noqa: E402

PHASE = re.compile(r"^\s+agent-ready\s+([\d.]+)\s+\(\+", re.M)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--idle", type=int, default=2)
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmrt-kernel-bench."))
    env = dict(os.environ, VMRT_ROOT=str(base / "root"), VMRT_RUN_ROOT=str(base / "run"), VMRT_POOL="off",
               VMRT_SNAPSHOT="off", VMRT_ACCEL=os.environ.get("VMRT_ACCEL", "tcg"))
    env.pop("VMRT_ISOLATION", None)
    new = a.new or kernel.find(config_mod.load(env))[0]
    kernels = {"old": a.old, "new": new}
    try:
        vmrt(env, "image", "build", str(REPO / "images" / "busybox"))
        wall: dict[str, list[float]] = {k: [] for k in kernels}
        boot: dict[str, list[float]] = {k: [] for k in kernels}
        for i in range(a.runs + 2):
            for name, k in kernels.items():
                t = time.monotonic_ns()
                r = vmrt(env, "run", "--rm", "--timings", "--isolation=vm", "--network", "none", "--kernel", str(k),
                         "busybox", "true")
                if i >= 2:
                    wall[name].append((time.monotonic_ns() - t) / 1e6)
                    if m := PHASE.search(r.stderr):
                        boot[name].append(float(m.group(1)))
        pss: dict[str, list[int]] = {k: [] for k in kernels}
        avail: dict[str, list[int]] = {k: [] for k in kernels}
        for name, k in kernels.items():
            ids = [vmrt(env, "run", "-d", "--isolation=vm", "--network", "none", "--kernel", str(k), "busybox",
                        "sleep", "600").stdout.strip() for _ in range(a.idle)]
            time.sleep(3)
            for cid in ids:
                pss[name].append(sum(pss_kib(p) for p in cgroups.members(f"{cgroups.PARENT}/{cid}-vmm")))
                out = vmrt(env, "exec", cid, "grep", "MemAvailable", "/proc/meminfo").stdout.split()
                avail[name].append(int(out[1]) if len(out) > 1 else 0)
            vmrt(env, "rm", "-f", *ids)
        cfg = config_mod.load(env)
        acc = accel.choose(env["VMRT_ACCEL"], user_kernel=True)
        lines = [f"### Guest kernels side by side, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — "
                 f"accel={acc.name} (host /dev/kvm: {acc.host_kind})", "",
                 f"`python3 benchmarks/guest_kernel.py --old {a.old} --runs {a.runs} --idle {a.idle}` (new: {new}); "
                 f"{os.cpu_count()} cores, machine {cfg.machine}, guest RAM {cfg.memory_mib} MiB, `--network none`, "
                 "no snapshot or pool (every run boots); runs interleaved, 2 warm-up runs of each discarded.", "",
                 "| kernel | start median ms | start p90 ms | agent-ready median ms (boot) | idle VMM PSS MiB | "
                 "guest MemAvailable MiB |", "|---|---|---|---|---|---|"]
        for name in kernels:
            b = f"{statistics.median(boot[name]):.0f}" if boot[name] else "-"
            lines.append(f"| {name} ({kernels[name].parent.name}) | {statistics.median(wall[name]):.0f} | "
                         f"{pct(wall[name], 90):.0f} | {b} | {statistics.median(pss[name]) / 1024:.1f} | "
                         f"{statistics.median(avail[name]) / 1024:.1f} |")
        report(lines, a.write)
    finally:
        clear_root(env, base)


if __name__ == "__main__":
    main()
