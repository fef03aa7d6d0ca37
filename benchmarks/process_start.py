#!/usr/bin/env python3
"""Process-isolation start latency: vmrt beside a direct `runc run` and `podman run`.

    python3 benchmarks/process_start.py [--runs 30] [--write docs/BENCHMARKS.md]

One script, interleaved, same machine, same image (vmrt's busybox, loaded into
podman's store from vmrt's OCI layout), warm-up runs discarded:

  vmrt     vmrt run --rm --isolation=process busybox true
  runc     runc run of an equivalent bundle (the config.json vmrt makes for the
           same image and flags, rootfs copied out; a fresh container ID per run)
  podman   podman run --rm --runtime /usr/sbin/runc --ulimit nofile=1024:1024
           --ulimit nproc=1024:1024 --network none IMAGE true   (and with its
           default network, for reference)
  python   the interpreter alone and `vmrt --version` (what the CLI's imports cost)

Targets (issue 3): vmrt median <= 1.5x runc's, and below podman's. A benchmark,
never a test; needs root, runc and podman.
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

from coldstart import runc_bundle  # noqa: E402  (same directory)

from vmrt import config as config_mod  # noqa: E402
from vmrt.drivers.process import choose_runtime  # noqa: E402

VMRT = [sys.executable, "-m", "vmrt"]
PODMAN_IMAGE = "localhost/vmrt-busybox:latest"
PODMAN = ["podman", "run", "--rm", "--runtime", "/usr/sbin/runc", "--ulimit", "nofile=1024:1024",
          "--ulimit", "nproc=1024:1024"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def timed(cmd: list[str], **kw: object) -> float:
    t = time.monotonic_ns()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    dt = (time.monotonic_ns() - t) / 1e6
    if r.returncode != 0:
        raise SystemExit(f"benchmark command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return dt


def podman_image(cfg: config_mod.Config) -> bool:
    if shutil.which("podman") is None:
        return False
    if subprocess.run(["podman", "image", "exists", PODMAN_IMAGE]).returncode != 0:
        r = subprocess.run(["podman", "pull", "-q", f"oci:{cfg.root / 'images'}:busybox:latest"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"podman: cannot load the image: {r.stderr.strip()}", file=sys.stderr)
            return False
        subprocess.run(["podman", "tag", r.stdout.strip(), PODMAN_IMAGE], check=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--write", type=Path, help="append the results to this markdown file")
    a = ap.parse_args()
    cfg = config_mod.load()
    runc = choose_runtime("runc")
    tmp = Path(tempfile.mkdtemp(prefix="vmrt-bench-"))
    try:
        b = runc_bundle(cfg, tmp)
        cases: dict[str, list[str] | None] = {
            "vmrt run --isolation=process": [*VMRT, "run", "--rm", "--isolation=process", "busybox", "true"],
            "runc run (same bundle)": None,
            "python3 -c pass": [sys.executable, "-c", "pass"],
            "vmrt --version (CLI start-up)": [*VMRT, "--version"],
        }
        if podman_image(cfg):
            cases["podman run --network none"] = [*PODMAN, "--network", "none", PODMAN_IMAGE, "true"]
            cases["podman run (default network)"] = [*PODMAN, PODMAN_IMAGE, "true"]
        times: dict[str, list[float]] = {k: [] for k in cases}
        for i in range(a.warmup + a.runs):
            for name, cmd in cases.items():
                if cmd is None:
                    cid = f"bench-{os.getpid()}-{i}"
                    dt = timed([runc, "--root", str(tmp / "state"), "run", "--bundle", str(b), cid])
                else:
                    dt = timed(cmd)
                if i >= a.warmup:
                    times[name].append(dt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(times["runc run (same bundle)"])
    rows = []
    for name, xs in times.items():
        med = statistics.median(xs)
        rows.append(f"| {name} | {med:.0f} | {pct(xs, 90):.0f} | {pct(xs, 99):.0f} | {med / base:.2f}x |")
    vm = statistics.median(times["vmrt run --isolation=process"])
    verdict = [f"- vmrt / runc median: {vm / base:.2f}x (target <= 1.5x: {'met' if vm <= 1.5 * base else 'NOT met'})"]
    for case in ("podman run (default network)", "podman run --network none"):
        if case in times:
            pm = statistics.median(times[case])
            verdict.append(f"- vmrt / {case} median: {vm / pm:.2f}x (faster: {'yes' if vm < pm else 'NO'})")
    host = (f"{os.cpu_count()} cores, kernel {os.uname().release}, cgroup "
            f"{'v2' if Path('/sys/fs/cgroup/cgroup.controllers').exists() else 'v1 hybrid'}, runtime {runc}")
    out = "\n".join([
        f"### Process isolation start ({time.strftime('%Y-%m-%d')}, {a.runs} runs each, interleaved, "
        f"{a.warmup} warm-up runs discarded)",
        "",
        f"Command: `python3 benchmarks/process_start.py --runs {a.runs}`. Accelerator: none (namespaces); "
        f"host: {host}.",
        "",
        "| case | median ms | p90 ms | p99 ms | / runc |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *verdict,
        "",
    ])
    print(out)
    if a.write:
        with open(a.write, "a") as f:
            f.write("\n" + out)


if __name__ == "__main__":
    main()
