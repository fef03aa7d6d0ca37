#!/usr/bin/env python3
"""`vmrt build` beside Debian's `buildah bud` (issue 20's targets).

    python3 benchmarks/build.py [--runs 5] [--mib 10] [--snapshot auto|manual|off] [--write docs/BENCHMARKS.md]

One script, one context: a 3-step Dockerfile (FROM busybox, COPY a directory of MIB MiB of
incompressible files, RUN a shell loop of 1000 appends). A private vmrt (its own root and run
dirs in a temp dir, the busybox image built from images/busybox) and a private buildah store
(--root/--runroot in the same temp dir, the overlay driver, else vfs) holding the very same
busybox (`vmrt save` -> `buildah pull docker-archive:`); nothing reaches a network: every RUN
has --network none in both tools (the busybox loop needs none). vmrt runs with its defaults
(a VM restores the snapshot of its shape, made in the background by the warm-up round).

Interleaved, one warm-up round discarded, each timed from the host (CLOCK_MONOTONIC):

  buildah   buildah bud --pull=never --network none --layers=false (no cache)
  process   vmrt build --isolation process --network none --no-cache
  cached    vmrt build --isolation process --network none (every step a cache hit)
  vm        vmrt build --isolation vm --network none --no-cache

Targets (issue 20): process <= 1.5x buildah; cached <= 0.5 s; vm <= 3x process.
A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support import Vmrt, private_vmrt  # noqa: E402

DOCKERFILE = """\
FROM busybox
COPY data /data
RUN i=0; while [ $i -lt 1000 ]; do echo "line $i" >> /loop.txt; i=$((i+1)); done
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic_ns()
    r = subprocess.run(cmd, capture_output=True, env=env)
    dt = (time.monotonic_ns() - t0) / 1e9
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed: {r.stderr.decode()[-800:]}")
    return dt


def context(base: Path, mib: int) -> Path:
    ctx = base / "ctx"
    (ctx / "data").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    for i in range(mib * 10):  # 100 KiB files
        (ctx / "data" / f"f{i:04d}.bin").write_bytes(os.urandom(100 << 10))
    return ctx


def buildah_store(base: Path, v: Vmrt) -> list[str]:
    """buildah's global options for a private store holding vmrt's busybox; the driver that works."""
    archive = base / "busybox.tar"
    r = v("save", "-o", str(archive), "busybox")
    if r.returncode != 0:
        raise SystemExit(f"vmrt save failed: {r.stderr.decode()}")
    for driver in ("overlay", "vfs"):
        opts = ["--root", str(base / f"buildah-{driver}"), "--runroot", str(base / f"buildah-run-{driver}"),
                "--storage-driver", driver]
        r = subprocess.run(["buildah", *opts, "pull", "--quiet", f"docker-archive:{archive}"], capture_output=True)
        if r.returncode == 0:
            subprocess.run(["buildah", *opts, "tag", r.stdout.decode().strip(), "docker.io/library/busybox:latest"],
                           capture_output=True, check=True)
            return opts
        print(f"buildah with {driver}: {r.stderr.decode().strip()[-300:]}", file=sys.stderr)
    raise SystemExit("buildah cannot pull the busybox archive with overlay or vfs")


def cleanup(base: Path) -> None:
    """buildah's containers and mounts under ``base`` (its overlay store mounts layers), then ``base``."""
    for root in base.glob("buildah-*"):
        if root.name.startswith("buildah-run-"):
            continue
        driver = root.name.removeprefix("buildah-")
        opts = ["--root", str(root), "--runroot", str(base / f"buildah-run-{driver}"), "--storage-driver", driver]
        subprocess.run(["buildah", *opts, "rm", "--all"], capture_output=True)
        subprocess.run(["buildah", *opts, "rmi", "--all", "--force"], capture_output=True)
    with open("/proc/self/mounts") as f:
        mounts = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(base) + "/")]
    for m in reversed(mounts):
        subprocess.run(["umount", "-l", m], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def stats(xs: list[float]) -> tuple[float, float]:
    s = sorted(xs)
    return statistics.median(s), s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=10)
    ap.add_argument("--snapshot", choices=("auto", "manual", "off"), default="auto",
                    help="vmrt's snapshot setting (auto: its default; manual: every VM cold-boots, as in the tests)")
    ap.add_argument("--write", type=Path, help="append the result to this markdown file")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmrt-build-bench-"))
    v = None
    try:
        v = private_vmrt(base)
        v.env["VMRT_SNAPSHOT"] = args.snapshot  # default auto (VMs restore a snapshot), not the tests' manual
        ctx = context(base, args.mib)
        bopts = buildah_store(base, v)
        vm_cmd = v.cmd("build", "--isolation", "vm", "--network", "none", "--no-cache", "-q", str(ctx))
        cmds = {
            "buildah": (["buildah", *bopts, "bud", "--pull=never", "--network", "none", "--layers=false", "-q",
                         "-t", "bench:1", str(ctx)], None),
            "process": (v.cmd("build", "--isolation", "process", "--network", "none", "--no-cache", "-q",
                              "-t", "bench:1", str(ctx)), v.env),
            "cached": (v.cmd("build", "--isolation", "process", "--network", "none", "-q", "-t", "bench:1",
                             str(ctx)), v.env),
            "vm": (vm_cmd, v.env),
        }
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for i in range(args.runs + 1):
            order = list(cmds)[i % len(cmds):] + list(cmds)[:i % len(cmds)]
            for name in order:
                cmd, env = cmds[name]
                dt = timed(cmd, env)
                if i > 0:  # the first round warms caches up
                    times[name].append(dt)
            print(f"round {i}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in cmds if times[k] and i > 0),
                  file=sys.stderr)
        b, p, c, vm = (stats(times[k]) for k in ("buildah", "process", "cached", "vm"))
        accel = v.env["VMRT_ACCEL"]
        buildah_v = subprocess.run(["buildah", "--version"], capture_output=True).stdout.decode().strip()
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        lines = [
            f"### Issue 20: `vmrt build` vs `buildah bud`, {when} — accel={accel}",
            "",
            f"Command: `python3 benchmarks/build.py --runs {args.runs} --mib {args.mib} --snapshot {args.snapshot}`; "
            f"{os.cpu_count()} host cores, {platform.release()}, {buildah_v}, buildah storage "
            f"`{bopts[bopts.index('--storage-driver') + 1]}`; the context: {args.mib} MiB in {args.mib * 10} files; "
            f"{args.runs} interleaved rounds after a warm-up; every RUN with `--network none`.",
            "",
            "| build | median s | p90 s | ratio | target |",
            "|---|---:|---:|---:|---|",
            f"| buildah bud (no cache) | {b[0]:.2f} | {b[1]:.2f} | 1.00 | baseline |",
            f"| vmrt build, process, --no-cache | {p[0]:.2f} | {p[1]:.2f} | {p[0] / b[0]:.2f} x buildah | "
            f"<= 1.5x buildah: {'met' if p[0] <= 1.5 * b[0] else 'MISSED'} |",
            f"| vmrt build, process, all cached | {c[0]:.3f} | {c[1]:.3f} | | <= 0.5 s: "
            f"{'met' if c[0] <= 0.5 else 'MISSED'} |",
            f"| vmrt build, vm, --no-cache | {vm[0]:.2f} | {vm[1]:.2f} | {vm[0] / p[0]:.2f} x process | "
            f"<= 3x process: {'met' if vm[0] <= 3 * p[0] else 'MISSED'} |",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        if args.write:
            with open(args.write, "a") as f:
                f.write("\n" + text)
    finally:
        if v is not None:
            v("builder", "prune", "-a", "-f")
            v.remove_all()
        cleanup(base)


if __name__ == "__main__":
    main()
