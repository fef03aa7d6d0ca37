#!/usr/bin/env python3
"""Cold start latency and idle memory of VM containers, with runc beside them.

    python3 benchmarks/coldstart.py [--runs 20] [--write docs/BENCHMARKS.md]

Interleaves `vmrt run --rm --isolation=vm busybox true` with `runc run` of the
same image (the process-isolation anchor), discards warm-up runs, and reports
median/p90/p99 wall time and the per-phase medians from `--timings`. Then
measures the host memory of idle VM containers: PSS of QEMU + virtiofsd + the
vmrt process, summed from /proc/PID/smaps_rollup. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmrt import bundle, kernel  # noqa: E402
from vmrt import config as config_mod  # noqa: E402
from vmrt.bundle import RunOptions  # noqa: E402
from vmrt.images.store import Store  # noqa: E402
from vmrt.vm import accel  # noqa: E402

VMRT = [sys.executable, "-m", "vmrt"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def runc_bundle(cfg: config_mod.Config, tmp: Path) -> Path:
    img = Store(cfg.root).get("busybox")
    (layer,) = img.layer_dirs()
    b = tmp / "runc-bundle"
    shutil.copytree(layer, b / "rootfs", symlinks=True)
    conf = bundle.make_config(img.runtime_config, b / "rootfs", RunOptions(image="busybox", command=["true"]),
                              "0" * 64, "process")
    bundle.write(b, conf)
    return b


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t = time.monotonic_ns()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = (time.monotonic_ns() - t) / 1e6
    if r.returncode != 0:
        raise SystemExit(f"benchmark command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return dt, r.stderr


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def idle_memory(cfg: config_mod.Config, n: int, accel_name: str) -> list[dict[str, float]]:
    out = []
    for _ in range(n):
        p = subprocess.Popen([*VMRT, "run", "--rm", "--isolation=vm", f"--accel={accel_name}", "busybox",
                              "sh", "-c", "echo ready; exec sleep 600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None
        p.stdout.readline()
        time.sleep(2)
        pids = {"vmrt": p.pid}
        procs = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            procs[int(pid)] = (ppid, cmd)
        for pid, (ppid, cmd) in procs.items():  # QEMU and virtiofsd are vmrt's children;
            if ppid == p.pid:                     # virtiofsd forks a sandboxed child
                pids["qemu" if "qemu-system" in cmd else "virtiofsd"] = pid
        for pid, (ppid, cmd) in procs.items():
            if "virtiofsd" in cmd and ppid in pids.values() and pid not in pids.values():
                pids["virtiofsd-sandbox"] = pid
        row = {k: pss_kib(v) / 1024 for k, v in pids.items()}
        out.append(row)
        p.terminate()          # forwarded; sleep as PID 1 ignores it (as in Docker)
        time.sleep(0.5)
        p.send_signal(2)       # a second stop signal kills the container
        p.wait(timeout=60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mem-samples", type=int, default=3)
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    cfg = config_mod.load()
    acc = accel.choose(a.accel, user_kernel=False)
    kpath, build_id = kernel.find(cfg)
    vm_cmd = [*VMRT, "run", "--rm", "--isolation=vm", f"--accel={acc.name}", "--timings", "busybox", "true"]
    with tempfile.TemporaryDirectory() as td:
        rb = runc_bundle(cfg, Path(td)) if shutil.which("runc") else None
        vm_t: list[float] = []
        runc_t: list[float] = []
        phases: dict[str, list[float]] = {}
        for i in range(a.warmup + a.runs):
            dt, err = timed(vm_cmd)
            rdt = timed(["runc", "run", "--bundle", str(rb), f"bench-{os.getpid()}-{i}"])[0] if rb else float("nan")
            if i < a.warmup:
                continue
            vm_t.append(dt)
            runc_t.append(rdt)
            for m in re.finditer(r"^\s+(\S+)\s+([\d.]+)\s+\(", err, re.M):
                phases.setdefault(m[1], []).append(float(m[2]))
    mem = idle_memory(cfg, a.mem_samples, acc.name)
    totals = [sum(r.values()) for r in mem]
    vmm_only = [sum(v for k, v in r.items() if k != "vmrt") for r in mem]
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "accel": acc.name, "host_kvm": acc.host_kind, "machine": cfg.machine,
        "guest_memory_mib": cfg.memory_mib, "kernel_build_id": build_id,
        "virtiofs_cache": cfg.virtiofs_cache, "cores": os.cpu_count(), "runs": a.runs,
        "vm_ms": {"median": statistics.median(vm_t), "p90": pct(vm_t, 90), "p99": pct(vm_t, 99)},
        "runc_ms": {"median": statistics.median(runc_t), "p90": pct(runc_t, 90), "p99": pct(runc_t, 99)},
        "phases_median_ms": {k: statistics.median(v) for k, v in phases.items()},
        "idle_pss_mib": {"samples": mem, "median_total": statistics.median(totals),
                         "median_qemu_plus_virtiofsd": statistics.median(vmm_only)},
    }
    res["ratio_vm_over_runc"] = res["vm_ms"]["median"] / res["runc_ms"]["median"]
    print(json.dumps(res, indent=1))
    if a.write:
        write(a.write, res, " ".join(["python3", "benchmarks/coldstart.py", *sys.argv[1:]]))


def row(what: str, d: dict[str, float]) -> str:
    return f"| {what} | {d['median']:.0f} | {d['p90']:.0f} | {d['p99']:.0f} |"


def write(path: Path, r: dict, cmd: str) -> None:  # type: ignore[type-arg]
    ph = r["phases_median_ms"]
    lines = [
        f"\n### Cold start, {r['date']} — accel={r['accel']} (host /dev/kvm: {r['host_kvm']})\n",
        f"Command: `{cmd}`  ",
        f"Machine {r['machine']}, guest RAM {r['guest_memory_mib']} MiB, kernel build {r['kernel_build_id']}, "
        f"virtio-fs cache={r['virtiofs_cache']}, {r['cores']} host cores, {r['runs']} runs after warm-up.\n",
        "| what | median ms | p90 | p99 |", "|---|---:|---:|---:|",
        row("`vmrt run --rm --isolation=vm busybox true`", r["vm_ms"]),
        row("`runc run` (same image, baseline)", r["runc_ms"]),
        f"\nRatio vm/runc (medians): {r['ratio_vm_over_runc']:.1f}x\n",
        "Phase medians (ms since the vmrt process started): " +
        ", ".join(f"{k} {v:.0f}" for k, v in ph.items()) + "\n",
        f"Idle VM container host memory (PSS): QEMU + virtiofsd median "
        f"{r['idle_pss_mib']['median_qemu_plus_virtiofsd']:.1f} MiB; with the vmrt monitor process "
        f"{r['idle_pss_mib']['median_total']:.1f} MiB. Samples: " +
        "; ".join(", ".join(f"{k} {v:.1f}" for k, v in s.items()) for s in r["idle_pss_mib"]["samples"]) + "\n",
    ]
    with open(path, "a") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
