#!/usr/bin/env python3
"""Starts through the Docker Engine API (issue 18), side by side with the CLI and runc.

    python3 benchmarks/api.py [--runs 15] [--write docs/BENCHMARKS.md]

A private vmrt root (its own store, snapshot, run root) and a `vmrt system service` on a
private socket; Debian's docker CLI (20.10) against it. Interleaved, 2 warm-up runs of each
discarded, wall time from the host, `--network none` throughout:

  runc            runc run of an equivalent bundle (coldstart.runc_bundle; a fresh ID per run)
  vmrt process    vmrt run --rm --isolation=process busybox true
  docker process  docker run --rm --isolation=process busybox true
  vmrt vm         vmrt run --rm --isolation=vm busybox true        (cached: from the snapshot)
  docker hyperv   docker run --rm --isolation=hyperv busybox true  (cached)

Then the idle service's memory: the PSS of the service and of its fork server, after the runs
(from /proc/PID/smaps_rollup). Targets (issue 18): docker process <= 2x runc and faster than
vmrt process; docker hyperv <= 2x docker process; idle service <= 40 MiB. A benchmark, never a
test; needs root, runc and the docker CLI.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from coldstart import runc_bundle  # noqa: E402  (same directory)
from jail import clear_root, pct, pss_kib, report, timed, vmrt  # noqa: E402

from vmrt import config as config_mod  # noqa: E402
from vmrt.drivers.process import choose_runtime  # noqa: E402
from vmrt.vm import accel  # noqa: E402

DOCKER = "/usr/bin/docker"


def memory(pid: int) -> dict[str, float]:
    """MiB of PSS: the service's, and its fork server's (its child)."""
    children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return {"service": pss_kib(pid) / 1024, "fork server": sum(pss_kib(p) for p in children) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmrt-api-bench."))
    env = dict(os.environ, VMRT_ROOT=str(base / "root"), VMRT_RUN_ROOT=str(base / "run"), VMRT_POOL="off")
    env.pop("VMRT_ISOLATION", None)
    sock = base / "docker.sock"
    service = None
    try:
        vmrt(env, "image", "build", str(REPO / "images" / "busybox"))
        vmrt(env, "snapshot", "build")
        cfg = config_mod.load(env)
        b = runc_bundle(cfg, base)
        runc = choose_runtime(cfg.runtime)
        service = subprocess.Popen([sys.executable, "-m", "vmrt", "system", "service", "--socket", str(sock)],
                                   env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not sock.exists():
            if service.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the service did not start")
            time.sleep(0.05)
        denv = {"PATH": os.environ["PATH"], "HOME": str(base), "DOCKER_HOST": f"unix://{sock}"}
        time.sleep(2)
        fresh = memory(service.pid)
        variants: dict[str, tuple[list[str], dict[str, str]]] = {
            "runc": ([runc, "--root", str(base / "runc-state"), "run", "--bundle", str(b), "ID"], env),
            "vmrt process": ([sys.executable, "-m", "vmrt", "run", "--rm", "--isolation=process", "--network",
                              "none", "busybox", "true"], env),
            "docker process": ([DOCKER, "run", "--rm", "--isolation=process", "--network", "none", "busybox",
                                "true"], denv),
            "vmrt vm": ([sys.executable, "-m", "vmrt", "run", "--rm", "--isolation=vm", "--network", "none",
                         "busybox", "true"], env),
            "docker hyperv": ([DOCKER, "run", "--rm", "--isolation=hyperv", "--network", "none", "busybox",
                               "true"], denv),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(a.runs + 2):
            for name, (cmd, e) in variants.items():
                cmd = [c if c != "ID" else f"bench-{i}" for c in cmd]
                dt = timed(cmd, e)
                if i >= 2:
                    times[name].append(dt)
        time.sleep(12)  # the service trims its heap after 5 to 10 quiet seconds
        pss = memory(service.pid)
        acc = accel.choose(os.environ.get("VMRT_ACCEL", "auto"), user_kernel=False)
        med = {k: statistics.median(v) for k, v in times.items()}
        lines = [f"### Starts through the Docker API, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — "
                 f"accel={acc.name} (host /dev/kvm: {acc.host_kind})", "",
                 f"`python3 benchmarks/api.py --runs {a.runs}`; {os.cpu_count()} cores; Debian's docker CLI "
                 "against `vmrt system service` on a private socket; `--network none`; runs interleaved, 2 "
                 "warm-up runs of each discarded; wall time from the host.", "",
                 "| variant | median ms | p90 ms | median vs runc | vs docker process |", "|---|---|---|---|---|"]
        for name, xs in times.items():
            lines.append(f"| {name} | {med[name]:.0f} | {pct(xs, 90):.0f} | {med[name] / med['runc']:.2f}x | "
                         f"{med[name] / med['docker process']:.2f}x |")
        lines += ["", f"Idle service after the runs: {pss['service']:.1f} MiB PSS, its fork server "
                      f"{pss['fork server']:.1f} MiB: {pss['service'] + pss['fork server']:.1f} MiB in all "
                      f"(just started: {fresh['service']:.1f} + {fresh['fork server']:.1f} = "
                      f"{fresh['service'] + fresh['fork server']:.1f} MiB).", "",
                  "Targets: docker process <= 2x runc: "
                  f"{'met' if med['docker process'] <= 2 * med['runc'] else 'missed'} "
                  f"({med['docker process'] / med['runc']:.2f}x); faster than vmrt process: "
                  f"{'met' if med['docker process'] < med['vmrt process'] else 'missed'}; docker hyperv <= 2x "
                  f"docker process: {'met' if med['docker hyperv'] <= 2 * med['docker process'] else 'missed'} "
                  f"({med['docker hyperv'] / med['docker process']:.2f}x); idle service <= 40 MiB: "
                  f"{'met' if pss['service'] + pss['fork server'] <= 40 else 'missed'}."]
        report(lines, a.write)
    finally:
        if service is not None and service.poll() is None:
            service.send_signal(signal.SIGTERM)
            service.wait(30)
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True)
        clear_root(env, base)


if __name__ == "__main__":
    main()
