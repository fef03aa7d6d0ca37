#!/usr/bin/env python3
"""Start latency and idle VMM memory of this tree beside an older revision, in one run.

    python3 benchmarks/compare_rev.py --rev REV [--runs 15] [--idle 3] [--write docs/BENCHMARKS.md]
    python3 benchmarks/compare_rev.py --rev REV --runs 24 --bench 4   # with `vmrt bench --only start`

REV is checked out in a temporary git worktree and run with this tree's virtualenv (its
``vmrt`` package first on PYTHONPATH, every command started outside both trees so that
``python -m`` never picks the other side's package from its working directory); each side
has its own state root, run root, default bridge and subnet. Interleaved, two warm-up runs
of each discarded: ``vmrt run --rm busybox true`` in process mode and in VM mode cold (no
snapshot) and cached (its own snapshot), all on the default bridge network. Then ``--idle``
detached idle VM containers per side and start path: PSS of the processes in the container's
VMM cgroup. Both trees are byte-compiled first. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))

from jail import pct, pss_kib  # noqa: E402  (benchmarks/jail.py: the same percentile and PSS)

from vmrt import cgroups  # noqa: E402
from vmrt.vm import accel  # noqa: E402

PATHS = {"process": ("--isolation=process",), "vm cold": ("--isolation=vm",), "vm cached": ("--isolation=vm",)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", required=True)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--idle", type=int, default=3)
    ap.add_argument("--write", type=Path)
    ap.add_argument("--bench", type=int, metavar="ROUNDS", default=0,
                    help="measure with `vmrt bench --only start` instead: ROUNDS invocations per side, "
                         "alternating sides (and who goes first), --runs timed runs per side in all")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmrt-rev-bench."))
    old_tree = base / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), a.rev], check=True,
                   capture_output=True)
    sides = {}
    for i, (side, tree) in enumerate((("this tree", REPO), (a.rev, old_tree))):
        env = dict(os.environ, VMRT_ROOT=str(base / f"root{i}"), VMRT_RUN_ROOT=str(base / f"run{i}"),
                   VMRT_POOL="off", VMRT_NETWORK_BRIDGE=f"vmrtb{i}", VMRT_NETWORK_SUBNET=f"10.199.{i}.0/24",
                   PYTHONPATH=str(tree), VMRT_SOURCE_DIR=str(tree))
        env.pop("VMRT_ISOLATION", None)
        sides[side] = env

    def vmrt(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "vmrt", *args], capture_output=True, text=True, env=env,
                           stdin=subprocess.DEVNULL, cwd=base)
        if r.returncode != 0:
            raise SystemExit(f"vmrt {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def detached(env: dict[str, str]) -> str:
        for attempt in (1, 2):  # an old revision's detached start may fail under load: one retry, said
            r = subprocess.run([sys.executable, "-m", "vmrt", "run", "-d", "--isolation=vm", "busybox", "sleep",
                                "600"], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, cwd=base)
            if r.returncode == 0:
                return r.stdout.strip()
            print(f"detached start failed (attempt {attempt}): {r.stderr.strip()}", file=sys.stderr)
            for log in Path(env["VMRT_ROOT"], "containers").glob("*/monitor.log"):
                print(log.read_text()[-2000:], file=sys.stderr)
        raise SystemExit("detached start failed twice")

    try:
        for tree in (REPO, old_tree):  # both byte-compiled (PYTHONDONTWRITEBYTECODE may be set)
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "vmrt")], capture_output=True)
        for env in sides.values():
            vmrt(env, "image", "build", str(REPO / "images" / "busybox"))
            vmrt(env, "snapshot", "build")
        if a.bench:
            text = bench_rounds(a, sides, base, vmrt)
            print(text)
            if a.write:
                with open(a.write, "a") as f:
                    f.write("\n" + text)
            return
        times: dict[tuple[str, str], list[float]] = {(s, p): [] for s in sides for p in PATHS}
        for i in range(a.runs + 2):
            for path, flags in PATHS.items():
                for side, env in sides.items():
                    e = {**env, **({"VMRT_SNAPSHOT": "off"} if path == "vm cold" else {})}
                    t = time.monotonic_ns()
                    vmrt(e, "run", "--rm", *flags, "busybox", "true")
                    if i >= 2:
                        times[(side, path)].append((time.monotonic_ns() - t) / 1e6)
        memory: dict[tuple[str, str], list[int]] = {}
        for side, env in sides.items():
            for path in ("vm cold", "vm cached"):
                e = {**env, **({"VMRT_SNAPSHOT": "off"} if path == "vm cold" else {})}
                ids = [detached(e) for _ in range(a.idle)]
                time.sleep(3)
                memory[(side, path)] = [sum(pss_kib(p) for p in cgroups.members(f"{cgroups.PARENT}/{c}-vmm"))
                                        for c in ids]
                vmrt(env, "rm", "-f", *ids)
        acc = accel.choose(os.environ.get("VMRT_ACCEL", "auto"), user_kernel=False)
        this, old = list(sides)
        lines = [f"### Before and after (this tree vs {a.rev}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                 f" — accel={acc.name} (host /dev/kvm: {acc.host_kind})", "",
                 f"`python3 benchmarks/compare_rev.py --rev {a.rev} --runs {a.runs} --idle {a.idle}`; "
                 f"{os.cpu_count()} cores, microvm, 256 MiB guests, default bridge network, runs interleaved "
                 "(2 warm-up runs each discarded); `vmrt run --rm busybox true` wall time from the host.", "",
                 f"| start path | {old} median ms | this tree median ms | p90 (old / this) | ratio | "
                 "idle VMM PSS MiB (old / this) |", "|---|---|---|---|---|---|"]
        for path in PATHS:
            o, n = times[(old, path)], times[(this, path)]
            mem = (f"{statistics.median(memory[(old, path)]) / 1024:.1f} / "
                   f"{statistics.median(memory[(this, path)]) / 1024:.1f}") if (old, path) in memory else "-"
            lines.append(f"| {path} | {statistics.median(o):.0f} | {statistics.median(n):.0f} | "
                         f"{pct(o, 90):.0f} / {pct(n, 90):.0f} | {statistics.median(n) / statistics.median(o):.3f} | "
                         f"{mem} |")
        text = "\n".join(lines) + "\n"
        print(text)
        if a.write:
            with open(a.write, "a") as f:
                f.write("\n" + text)
    finally:
        for env in sides.values():  # whatever a failed run left: reconciled, removed
            ps = subprocess.run([sys.executable, "-m", "vmrt", "ps", "-aq"], env=env, capture_output=True,
                                text=True, cwd=base)
            if ps.stdout.split():
                subprocess.run([sys.executable, "-m", "vmrt", "rm", "-f", *ps.stdout.split()], env=env,
                               capture_output=True, cwd=base)
            subprocess.run([sys.executable, "-m", "vmrt", "snapshot", "rm"], env=env, capture_output=True, cwd=base)
            subprocess.run([sys.executable, "-m", "vmrt", "network", "prune", "-f"], env=env, capture_output=True,
                           cwd=base)
        for i in range(2):
            subprocess.run(["ip", "link", "del", f"vmrtb{i}"], capture_output=True)
            table = "vmrt_" + hashlib.sha256(str(base / f"root{i}").encode()).hexdigest()[:8]
            for family in ("ip", "inet", "bridge"):
                subprocess.run(["nft", "delete", "table", family, table], capture_output=True)
            subprocess.run(["umount", "-R", "-l", str(base / f"root{i}")], capture_output=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


BENCH_MODES = ("process", "vm-cold", "vm-snapshot")


def bench_rounds(a: argparse.Namespace, sides: dict[str, dict[str, str]], base: Path,
                 vmrt: Callable[..., subprocess.CompletedProcess[str]]) -> str:
    """``vmrt bench --only start`` of each side, ``a.bench`` times, alternating: each side's
    own bench (its warm-up run discarded by it), the timed runs pooled per side and mode."""
    per_round = -(-a.runs // a.bench)
    runs: dict[tuple[str, str], list[float]] = {(s, m): [] for s in sides for m in BENCH_MODES}
    for i in range(a.bench):
        order = list(sides.items()) if i % 2 == 0 else list(reversed(sides.items()))
        for side, env in order:
            out = base / f"bench-{i}-{hashlib.sha256(side.encode()).hexdigest()[:6]}.json"
            vmrt(env, "bench", "--only", "start", "--runs", str(per_round), "--parallel", "1",
                 "--modes", ",".join(BENCH_MODES), "--json", str(out), "--plots", str(base / "plots"))
            results = json.loads(out.read_text())["results"]["start"]
            for m in BENCH_MODES:
                if "serial" not in results.get(m, {}):
                    raise SystemExit(f"{side}: vmrt bench start {m}: {results.get(m)}")
                runs[(side, m)] += results[m]["serial"]["runs"]
    acc = accel.choose(os.environ.get("VMRT_ACCEL", "auto"), user_kernel=False)
    this, old = list(sides)
    lines = [f"### Start time, `vmrt bench --only start` (this tree vs {a.rev}), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — accel={acc.name} "
             f"(host /dev/kvm: {acc.host_kind})",
             "", f"`python3 benchmarks/compare_rev.py --rev {a.rev} --runs {a.runs} --bench {a.bench}`; "
             f"{os.cpu_count()} cores, microvm, 256 MiB guests, no network (bench's default); {a.bench} bench "
             f"invocations per side of {per_round} timed runs each (after the bench's own warm-up run), sides "
             "alternating; wall time of `vmrt run --rm busybox true` as the bench measures it.", "",
             f"| mode | runs per side | {old} median ms | this tree median ms | p90 (old / this) | ratio |",
             "|---|---|---|---|---|---|"]
    for m in BENCH_MODES:
        o, n = runs[(old, m)], runs[(this, m)]
        lines.append(f"| {m} | {len(n)} | {statistics.median(o):.0f} | {statistics.median(n):.0f} | "
                     f"{pct(o, 90):.0f} / {pct(n, 90):.0f} | {statistics.median(n) / statistics.median(o):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
