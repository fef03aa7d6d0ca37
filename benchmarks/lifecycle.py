#!/usr/bin/env python3
"""Detached containers: `vmrt exec` round trip and the monitor's memory, both isolation modes.

    python3 benchmarks/lifecycle.py [--runs 20] [--write docs/BENCHMARKS.md]

One detached busybox container per mode (`vmrt run -d ... sleep 600`), then,
interleaved: `vmrt exec C true` (wall time of the whole command, as a user sees
it). Memory: the PSS of each container's monitor process
(/proc/PID/smaps_rollup), and for the VM the host's whole cost (QEMU +
virtiofsd + monitor). Targets (issue 5): VM exec <= 3x process exec; monitor
<= 8 MiB PSS. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmrt.vm import accel  # noqa: E402


def vmrt(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmrt", *args], env=env, capture_output=True, text=True,
                          check=True)


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmrt-lifecycle-bench-"))
    env = dict(os.environ, VMRT_ROOT=str(base / "root"), VMRT_RUN_ROOT=str(base / "run"))
    vmrt(env, "image", "build", str(REPO / "images" / "busybox"))
    ids = {m: vmrt(env, "run", "-d", f"--isolation={m}", "busybox", "sleep", "600").stdout.strip()
           for m in ("process", "vm")}
    try:
        times: dict[str, list[float]] = {m: [] for m in ids}
        for i in range(args.runs + 1):
            for m, cid in ids.items():
                t0 = time.perf_counter()
                vmrt(env, "exec", cid, "true")
                if i:  # run 0 warms caches
                    times[m].append(time.perf_counter() - t0)
        mem = {}
        for m, cid in ids.items():
            doc = json.loads(vmrt(env, "inspect", cid).stdout)[0]
            monitor = doc["State"]["MonitorPid"]
            row = json.loads(vmrt(env, "stats", "--no-stream", "--format", "json", cid).stdout)
            mem[m] = {"monitor_pss_mib": round(pss_kib(monitor) / 1024, 2), "stats_mem": row["MemUsage"],
                      "monitor_exe": os.path.basename(os.readlink(f"/proc/{monitor}/exe")),
                      "guest_mem": row["GuestMem"], "pid": doc["State"]["Pid"]}
    finally:
        subprocess.run([sys.executable, "-m", "vmrt", "rm", "-f", *ids.values()], env=env, capture_output=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "host": platform.node(),
              "accelerator": accel.choose("auto", user_kernel=False).name,
              "runs": args.runs, "exec_median_ms": {m: round(v * 1000, 1) for m, v in med.items()},
              "exec_ratio_vm_to_process": round(med["vm"] / med["process"], 2), "memory": mem}
    print(json.dumps(result, indent=1))
    if args.write:
        with args.write.open("a") as f:
            f.write(f"\n### Detached containers: exec and monitor memory ({result['date']}, {result['cpus']} cores, "
                    f"accelerator {result['accelerator']})\n\n"
                    f"Command: `python3 benchmarks/lifecycle.py --runs {args.runs}`\n\n"
                    "| | process | vm |\n|---|---|---|\n"
                    f"| `vmrt exec C true`, median of {args.runs} (ms) | {result['exec_median_ms']['process']} | "
                    f"{result['exec_median_ms']['vm']} |\n"
                    f"| monitor PSS (MiB) | {mem['process']['monitor_pss_mib']} | {mem['vm']['monitor_pss_mib']} |\n"
                    f"| `vmrt stats` MEM (process: cgroup; vm: PSS of QEMU+virtiofsd+monitor) | "
                    f"{mem['process']['stats_mem']} | {mem['vm']['stats_mem']} |\n"
                    f"| guest's view of the container's memory | - | {mem['vm']['guest_mem']} |\n\n"
                    f"exec VM / process: **{result['exec_ratio_vm_to_process']}x** (target <= 3x: "
                    f"{'met' if result['exec_ratio_vm_to_process'] <= 3 else 'NOT met'}); monitor <= 8 MiB PSS: "
                    f"{'met' if max(v['monitor_pss_mib'] for v in mem.values()) <= 8 else 'NOT met'}.\n")


if __name__ == "__main__":
    main()
