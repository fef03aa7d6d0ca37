#!/usr/bin/env python3
"""What the VMM jail costs: VM starts and idle host memory with the jail on and off, side by side.

    python3 benchmarks/jail.py [--runs 20] [--idle 3] [--write docs/BENCHMARKS.md]

A private vmrt root (its own store, snapshots, bridge-less runs with ``--network none``)
runs ``vmrt run --rm --isolation=vm busybox true`` in five interleaved variants: cold boot
(no snapshot, no pool) and cached (restored from the snapshot of its shape), each with
``VMRT_VMM_JAIL=1`` (the default) and ``=0`` (QEMU as root in the host's root, as before
issue 14); unjailed clones once with the snapshot's RAM pages shared
(``VMRT_VM_MEMORY=shared``) and once with a private copy (``=private``), which is what a
jailed clone always gets. Two warm-up runs of each are discarded; wall time is taken from
the host with time.monotonic_ns(). Then ``--idle`` detached idle containers per variant:
the PSS of every process in the container's VMM cgroup (QEMU, virtiofsd or the 9p proxy
helper) from /proc/PID/smaps_rollup. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmrt import cgroups, kernel  # noqa: E402
from vmrt import config as config_mod  # noqa: E402
from vmrt.vm import accel  # noqa: E402

VMRT = [sys.executable, "-m", "vmrt"]
VARIANTS = {  # name -> environment
    "cold, jailed": {"VMRT_VMM_JAIL": "1", "VMRT_SNAPSHOT": "off"},
    "cold, unjailed": {"VMRT_VMM_JAIL": "0", "VMRT_SNAPSHOT": "off"},
    "cached, jailed": {"VMRT_VMM_JAIL": "1"},  # its RAM a private copy (the only mode jailed)
    "cached, unjailed, shared RAM": {"VMRT_VMM_JAIL": "0", "VMRT_VM_MEMORY": "shared"},
    "cached, unjailed, private RAM": {"VMRT_VMM_JAIL": "0", "VMRT_VM_MEMORY": "private"},
}
BASELINE = {  # each variant's ratio is to the one that differs from it in one thing only
    "cold, jailed": "cold, unjailed",
    "cached, jailed": "cached, unjailed, private RAM",             # the jail
    "cached, unjailed, private RAM": "cached, unjailed, shared RAM",  # the RAM copy
}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def vmrt(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*VMRT, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise SystemExit(f"vmrt {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def report(lines: list[str], write: Path | None) -> None:
    """A benchmark's markdown section: printed, and appended to ``write`` if given."""
    text = "\n".join([*lines, ""])
    print(text)
    if write:
        with open(write, "a") as f:
            f.write("\n" + text)


def clear_root(env: dict[str, str], base: Path) -> None:
    """A benchmark's private vmrt gone: its containers removed, its state root unmounted, ``base``
    deleted (the ``finally`` of every benchmark that makes one under ``base/root``)."""
    ps = subprocess.run([*VMRT, "ps", "-aq"], env=env, capture_output=True, text=True)
    if ps.stdout.split():
        subprocess.run([*VMRT, "rm", "-f", *ps.stdout.split()], env=env, capture_output=True)
    subprocess.run(["umount", "-R", "-l", str(base / "root")], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def pss_kib(pid: int) -> int:
    try:
        for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if ln.startswith("Pss:"):
                return int(ln.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--idle", type=int, default=3)
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmrt-jail-bench."))
    env = dict(os.environ, VMRT_ROOT=str(base / "root"), VMRT_RUN_ROOT=str(base / "run"), VMRT_POOL="off")
    env.pop("VMRT_ISOLATION", None)
    try:
        vmrt(env, "image", "build", str(REPO / "images" / "busybox"))
        for jail in ("1", "0"):  # each variant has its own snapshot (the key names the jail)
            vmrt({**env, "VMRT_VMM_JAIL": jail}, "snapshot", "build")
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for i in range(a.runs + 2):
            for name, extra in VARIANTS.items():
                t = time.monotonic_ns()
                r = vmrt({**env, **extra}, "run", "--rm", "--timings", "--isolation=vm", "--network", "none",
                         "busybox", "true")
                dt = (time.monotonic_ns() - t) / 1e6
                want = "snapshot=none" if "cold" in name else "snapshot="
                if want not in r.stderr or ("cached" in name and "snapshot=none" in r.stderr):
                    raise SystemExit(f"{name}: not the intended start path: {r.stderr}")
                if i >= 2:
                    times[name].append(dt)
        memory: dict[str, list[int]] = {k: [] for k in VARIANTS}
        for name, extra in VARIANTS.items():
            ids = [vmrt({**env, **extra}, "run", "-d", "--isolation=vm", "--network", "none", "busybox",
                        "sleep", "600").stdout.strip() for _ in range(a.idle)]
            time.sleep(3)
            for cid in ids:
                memory[name].append(sum(pss_kib(p) for p in cgroups.members(f"{cgroups.PARENT}/{cid}-vmm")))
            vmrt(env, "rm", "-f", *ids)
        cfg = config_mod.load(env)
        acc = accel.choose(os.environ.get("VMRT_ACCEL", "auto"), user_kernel=False)
        _, build_id = kernel.find(cfg)
        lines = [f"### VMM jail cost, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — accel={acc.name} "
                 f"(host /dev/kvm: {acc.host_kind})", "",
                 f"`python3 benchmarks/jail.py --runs {a.runs} --idle {a.idle}`; {os.cpu_count()} cores, "
                 f"machine {cfg.machine}, guest RAM {cfg.memory_mib} MiB, kernel {build_id}, virtio-fs "
                 f"cache={cfg.virtiofs_cache}, `--network none`; runs interleaved, 2 warm-up runs of each "
                 "discarded; wall time of `vmrt run --rm --isolation=vm busybox true` from the host.", "",
                 "| variant | median ms | p90 ms | p99 ms | median vs | idle VMM PSS MiB (median) | PSS vs |",
                 "|---|---|---|---|---|---|---|"]
        for name in VARIANTS:
            xs, ref = times[name], BASELINE.get(name)
            ratio = f"{statistics.median(xs) / statistics.median(times[ref]):.3f}x {ref}" if ref else "-"
            mib = statistics.median(memory[name]) / 1024
            more = f"{mib - statistics.median(memory[ref]) / 1024:+.1f} MiB" if ref else "-"
            lines.append(f"| {name} | {statistics.median(xs):.0f} | {pct(xs, 90):.0f} | {pct(xs, 99):.0f} | "
                         f"{ratio} | {mib:.1f} | {more} |")
        report(lines, a.write)
    finally:
        subprocess.run([*VMRT, "snapshot", "rm"], env=env, capture_output=True)
        subprocess.run(["umount", "-R", "-l", str(base / "root")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Milliseconds ``cmd`` took, wall time; a failure ends the benchmark with its stderr."""
    t = time.monotonic_ns()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    dt = (time.monotonic_ns() - t) / 1e6
    if r.returncode != 0:
        raise SystemExit(f"benchmark command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return dt
