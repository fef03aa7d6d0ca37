#!/usr/bin/env python3
"""Registry pull: `vmrt pull` beside `skopeo copy ... dir:` of the same image.

    python3 benchmarks/pull.py [--runs 5] [--layers 5] [--mib 50] [--write docs/BENCHMARKS.md]

One script, one local registry (Debian's docker-registry on 127.0.0.1, plain
HTTP), one image of LAYERS gzip layers totalling ~MIB MiB of incompressible
data, pushed once with skopeo. Then, interleaved and each into an empty
destination (nothing cached between runs):

  skopeo   skopeo copy --src-tls-verify=false docker://HOST/bench:1 dir:TMP
           (downloads and verifies the blobs; does not unpack)
  vmrt     vmrt pull --insecure-registry HOST HOST/bench:1 into an empty store
           (downloads, verifies, unpacks every layer, records the image)
  engine   vmrt.images.registry.pull() called in this process (the same work
           without the interpreter start and imports of a fresh `vmrt` process)

Each run's output is removed and the page cache flushed (sync) before the next
run, so no tool pays for another's writeback. Target (issue 4): vmrt median
<= 1.2x skopeo's. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
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

from ocibuild import OciLayout, big_layer  # noqa: E402
from registry import Registry  # noqa: E402

from vmrt.images import registry as vmrt_registry  # noqa: E402
from vmrt.images.store import Store  # noqa: E402


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr.decode()[-500:]}")
    return dt


def clean_after(path: Path, seconds: float) -> float:
    """Remove a run's output and flush the page cache's dirty data, so the next run (of any
    tool) starts without another's writeback competing with it; passes ``seconds`` through."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--mib", type=int, default=50)
    ap.add_argument("--write", type=Path, help="append the result to this markdown file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmrt-pull-bench-"))
    try:
        layout = OciLayout(work / "layout")
        per = args.mib * 1024 * 1024 // args.layers
        layout.add_image([big_layer(per, seed, f"data/layer{seed}.bin") for seed in range(args.layers)],
                         {"Cmd": ["true"]}, ref="1", level=1)
        with Registry(work / "registry") as reg:
            reg.push(layout.ref("1"), "bench", "1")
            ref = f"{reg.host}/bench:1"
            times: dict[str, list[float]] = {"skopeo": [], "vmrt": [], "engine": []}
            for i in range(args.runs + 1):  # run 0 warms the registry's and the page cache
                dest, root = work / f"skopeo-{i}", work / f"vmrt-{i}"
                env = dict(os.environ, VMRT_ROOT=str(root), VMRT_RUN_ROOT=str(work / "run"))
                t_s = clean_after(dest, timed(["skopeo", "copy", "--insecure-policy", "--src-tls-verify=false",
                                               f"docker://{ref}", f"dir:{dest}"]))
                t_v = clean_after(root, timed([sys.executable, "-m", "vmrt", "pull", "-q", "--insecure-registry",
                                               reg.host, ref], env))
                t0 = time.perf_counter()
                vmrt_registry.pull(Store(root), ref, insecure_registries=[reg.host], quiet=True,
                                   auth_file=work / "auth.json")
                t_e = clean_after(root, time.perf_counter() - t0)
                if i:
                    times["skopeo"].append(t_s)
                    times["vmrt"].append(t_v)
                    times["engine"].append(t_e)
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
            "accelerator": "n/a (no VM involved; the host CPU does the work)",
            "image": f"{args.layers} gzip layers, {args.mib} MiB incompressible", "runs": args.runs,
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "ratio_vmrt_to_skopeo": round(med["vmrt"] / med["skopeo"], 2),
            "skopeo": subprocess.run(["skopeo", "--version"], capture_output=True, text=True).stdout.strip(),
        }
        print(json.dumps(result, indent=1))
        if args.write:
            cmd = f"python3 benchmarks/pull.py --runs {args.runs} --layers {args.layers} --mib {args.mib}"
            with args.write.open("a") as f:
                f.write(f"\n### Registry pull ({result['date']}, {result['cpus']} cores, {result['accelerator']})\n\n"
                        f"Command: `{cmd}`\n\nImage: {result['image']}, from docker-registry on 127.0.0.1; "
                        f"{result['skopeo']}; {args.runs} interleaved runs, each into an empty destination, "
                        "output removed and `sync` between runs.\n\n"
                        "| tool | what it does | median (s) | runs (s) |\n|---|---|---|---|\n"
                        f"| skopeo copy docker:// dir: | download + verify | {result['median_s']['skopeo']} | "
                        f"{result['all_s']['skopeo']} |\n"
                        f"| vmrt pull | download + verify + unpack + record | {result['median_s']['vmrt']} | "
                        f"{result['all_s']['vmrt']} |\n"
                        f"| registry.pull() in-process | the same, without interpreter start + imports | "
                        f"{result['median_s']['engine']} | {result['all_s']['engine']} |\n\n"
                        f"Ratio vmrt / skopeo: **{result['ratio_vmrt_to_skopeo']}x** (target <= 1.2x: "
                        f"{'met' if result['ratio_vmrt_to_skopeo'] <= 1.2 else 'NOT met'}).\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
