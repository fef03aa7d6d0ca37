#!/usr/bin/env python3
"""podman with vmrt-runtime as its OCI runtime (issue 19), beside podman with runc.

    python3 benchmarks/oci.py [--runs 15] [--write docs/BENCHMARKS.md]

A private vmrt root and a private podman (its own storage, run root and containers.conf, on a
short temporary dir); busybox saved from vmrt and loaded into podman. Interleaved, 2 warm-up
runs of each discarded, wall time from the host, `--network none` throughout:

  podman runc          podman --runtime runc run --rm busybox true
  podman vmrt process  the same with --runtime vmrt-runtime, annotation io.vmrt.isolation=process
  podman vmrt vm       ... io.vmrt.isolation=vm: a cold boot (an engine's bundle is never restored
                       from a 9p snapshot clone)
  podman vmrt vm pool  ... with vmrt's warm pool running: a pre-booted VM (virtio-fs)

Targets (issue 19): vmrt process <= 1.5x runc; vm from a cached VM <= 3x vmrt process. A
benchmark, never a test; needs root, runc, podman and conmon.
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

from jail import clear_root, pct, pss_kib, report, timed, vmrt  # noqa: E402

from vmrt.vm import accel  # noqa: E402

IMAGE = "docker.io/library/busybox:latest"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmrt-oci-bench."))
    pm = Path(tempfile.mkdtemp(prefix="vmrt-pmb-"))  # podman: a run root of at most 50 characters
    env = dict(os.environ, VMRT_ROOT=str(base / "root"), VMRT_RUN_ROOT=str(base / "run"), VMRT_POOL="off")
    env.pop("VMRT_ISOLATION", None)
    exe = shutil.which("vmrt-runtime") or str(REPO / ".venv" / "bin" / "vmrt-runtime")
    podman = ["podman", "--root", str(pm / "storage"), "--runroot", str(pm / "run"), "--tmpdir", str(pm / "tmp"),
              "--storage-driver", "overlay"]
    (pm / "containers.conf").write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
                                        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    penv = dict(os.environ, CONTAINERS_CONF=str(pm / "containers.conf"))
    pool_started = False
    try:
        vmrt(env, "image", "build", str(REPO / "images" / "busybox"))
        vmrt(env, "save", "busybox", "-o", str(base / "busybox.tar"))
        subprocess.run([*podman, "load", "-i", str(base / "busybox.tar")], env=penv, check=True, capture_output=True)
        wrappers = {}
        for name, extra in (("cold", {"VMRT_POOL": "off"}), ("pool", {"VMRT_POOL": "auto"})):
            w = base / f"vmrt-runtime-{name}"
            exports = "".join(f"export {k}='{v}'\n" for k, v in {**env, **extra}.items() if k.startswith("VMRT_"))
            w.write_text(f"#!/bin/sh\n{exports}exec {exe} --root {base / 'rt'} \"$@\"\n")
            w.chmod(0o755)
            wrappers[name] = str(w)
        run = ["run", "--rm", "--network", "none"]
        variants: dict[str, list[str]] = {
            "podman runc": [*podman, "--runtime", "runc", *run, IMAGE, "true"],
            "podman vmrt process": [*podman, "--runtime", wrappers["cold"], *run, "--annotation",
                                    "io.vmrt.isolation=process", IMAGE, "true"],
            "podman vmrt vm": [*podman, "--runtime", wrappers["cold"], *run, "--annotation", "io.vmrt.isolation=vm",
                               IMAGE, "true"],
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(a.runs + 2):
            for name, cmd in variants.items():
                dt = timed(cmd, penv)
                if i >= 2:
                    times[name].append(dt)
        # the warm pool: pre-booted VMs of the default shape, which an engine's bundle can claim
        vmrt({**env, "VMRT_POOL": "auto"}, "pool", "start")
        pool_started = True
        time.sleep(5)
        pooled = [*podman, "--runtime", wrappers["pool"], *run, "--annotation", "io.vmrt.isolation=vm", IMAGE, "true"]
        times["podman vmrt vm pool"] = []
        for i in range(a.runs + 2):
            dt = timed(pooled, penv)
            if i >= 2:
                times["podman vmrt vm pool"].append(dt)
            time.sleep(1.0)  # the pool boots the next VM (TCG: its boot competes with the run)
        # the holder's memory: a VM container left running (its PSS; the VM's own is QEMU's)
        subprocess.run([*podman, "--runtime", wrappers["cold"], "run", "-d", "--name", "held", "--network", "none",
                        "--annotation", "io.vmrt.isolation=vm", IMAGE, "sleep", "60"], env=penv, check=True,
                       capture_output=True)
        time.sleep(3)
        holder = int(subprocess.run([*podman, "inspect", "-f", "{{.State.Pid}}", "held"], env=penv, check=True,
                                    capture_output=True, text=True).stdout)
        held_mib = pss_kib(holder) / 1024
        subprocess.run([*podman, "rm", "-f", "-t", "0", "held"], env=penv, capture_output=True)
        acc = accel.choose(os.environ.get("VMRT_ACCEL", "auto"), user_kernel=False)
        med = {k: statistics.median(v) for k, v in times.items()}
        lines = [f"### podman with vmrt-runtime, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — "
                 f"accel={acc.name} (host /dev/kvm: {acc.host_kind})", "",
                 f"`python3 benchmarks/oci.py --runs {a.runs}`; {os.cpu_count()} cores; Debian's podman 4.3 with "
                 "conmon on private roots; `--network none`; runs interleaved (the pool's after the others, 1 s "
                 "apart), 2 warm-up runs of each discarded; wall time from the host.", "",
                 "| variant | median ms | p90 ms | vs podman runc | vs vmrt process |", "|---|---|---|---|---|"]
        for name, xs in times.items():
            lines.append(f"| {name} | {med[name]:.0f} | {pct(xs, 90):.0f} | {med[name] / med['podman runc']:.2f}x | "
                         f"{med[name] / med['podman vmrt process']:.2f}x |")
        proc_x = med["podman vmrt process"] / med["podman runc"]
        vm_x = med["podman vmrt vm pool"] / med["podman vmrt process"]
        lines += ["", f"Targets: vmrt process <= 1.5x runc: {'met' if proc_x <= 1.5 else 'missed'} ({proc_x:.2f}x); "
                      f"vm from a cached VM <= 3x vmrt process: {'met' if vm_x <= 3 else 'missed'} ({vm_x:.2f}x, "
                      f"the warm pool; cold: {med['podman vmrt vm'] / med['podman vmrt process']:.2f}x).", "",
                  f"A running VM container's holder (the pid the engine waits on): {held_mib:.1f} MiB PSS."]
        report(lines, a.write)
    finally:
        if pool_started:
            subprocess.run([sys.executable, "-m", "vmrt", "pool", "stop"], env=env, capture_output=True)
        subprocess.run([*podman, "rm", "-af"], env=penv, capture_output=True)
        subprocess.run([*podman, "rmi", "-af"], env=penv, capture_output=True)
        subprocess.run(["umount", "-R", "-l", str(pm)], capture_output=True)
        shutil.rmtree(pm, ignore_errors=True)
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True)
        clear_root(env, base)


if __name__ == "__main__":
    main()
