"""The Bench: each metric (start, exec, memory, density, io, cpu, net) measured over the modes,
interleaved, and the JSON document of it all."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__, kernel
from ..config import Config
from ..drivers.process import choose_runtime
from ..errors import VmrtError
from ..vm import accel as accel_mod
from ..vm import disk as vmdisk
from .errors import BenchError
from .figures import rotate, summary
from .modes import MODES, Mode, PodmanMode, PoolMode, RuncMode, Skipped, VmrtMode
from .netclient import free_ports, http_get, net_transfer, wait_net_ready
from .procs import Procs, Result, last_line
from .sampling import mem_available_kib, meminfo, proc_table, pss_breakdown
from .workloads import (
    CPU_ITERS,
    CPU_SCRIPT,
    HOST_APPLETS,
    IMAGE_READS,
    IO_MIB,
    IO_SCRIPT,
    META_FILES,
    NET_FILE_BYTES,
    NET_HTTP_PORT,
    NET_MIB,
    NET_REQUESTS,
    NET_SERVE,
    NET_SINK,
    NET_SINK_PORT,
    NET_WARMUP_GETS,
    NET_WARMUP_MIB,
    REPS,
    STAT_PASSES,
    SYSCALL_BYTES,
    fs_of,
    parse_marked,
)

METRICS = ("start", "exec", "memory", "density", "io", "cpu", "net")


def served(timings: str) -> bool:
    """A start (its --timings report) that took a pooled VM or restored a snapshot."""
    return "pool-claim" in timings or re.search(r"snapshot=[0-9a-f]{16}", timings) is not None


# which metric makes sense for which mode (a pooled VM is a cold VM once it runs)
APPLIES = {
    "start": set(MODES),
    "exec": {"process", "vm-cold", "vm-snapshot", "vm-default", "runc", "podman"},
    "memory": {"process", "vm-cold", "vm-snapshot", "vm-default", "vm-q35", "vm-libvirt", "runc", "podman"},
    "density": {"process", "vm-cold", "vm-snapshot", "vm-default"},
    "io": {"process", "vm-cold", "vm-default", "runc", "podman"},  # vm-default: the image over 9p
    "cpu": {"process", "vm-cold", "runc", "podman"},
    # a pooled or snapshot-restored VM has the same data path (veth, tc, tap, virtio-net) as a cold one
    "net": {"process", "vm-cold"},
}
NOT_APPLICABLE = "a VM from the pool is the same VM as vm-cold once it runs: only start differs"
SETTLE_S = 3.0           # idle containers: wait this long before reading memory
PHASE_RE = re.compile(r"^\s+([a-z][a-z-]*)\s+([\d.]+)\s+\(\+", re.M)


class Bench:
    """One `vmrt bench`: the modes it made, the results per metric, and the clean-up of all it
    started (also after an interrupt)."""

    def __init__(self, cfg: Config, *, runs: int, parallel: int, density_max: int, modes: list[str],
                 only: list[str], image: str, idle: int, pool_size: int, argv: list[str],
                 say: Callable[[str], None], network: str = "none", net_mib: int = NET_MIB,
                 net_requests: int = NET_REQUESTS) -> None:
        self.cfg, self.runs, self.parallel, self.density_max = cfg, runs, parallel, density_max
        self.network, self.net_mib, self.net_requests = network, net_mib, net_requests
        self.mode_names, self.only, self.image, self.idle_n, self.pool_size = modes, only, image, idle, pool_size
        self.argv, self.say = argv, say
        self.vmrt = [sys.executable, "-m", "vmrt"]
        self.env = dict(os.environ)
        self.tag = f"vmrt-bench-{os.getpid()}"
        self.procs = Procs()
        self.vmrt_names: set[str] = set()
        self.modes: dict[str, Mode] = {}
        self.results: dict[str, dict[str, Any]] = {m: {} for m in only}
        self.runtime = "?"
        self.runtime_version = "?"
        self.podman_version = "?"
        self.vm_setup: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.workloads: dict[str, Any] = {}

    # --- set-up ---
    def collect_meta(self) -> None:
        cfg = self.cfg
        try:
            acc = accel_mod.choose(cfg.accel, user_kernel=cfg.kernel is not None)
            accel, host_kvm, reason = acc.name, acc.host_kind, acc.reason
        except Exception as e:  # an accelerator that cannot be used is itself the result
            accel, host_kvm, reason = "unusable", "?", str(e)
        try:
            kid = kernel.find(cfg)[1]
        except Exception as e:
            kid = f"missing ({e})"
        vcpus = max(1, min(math.ceil(cfg.cpus), os.cpu_count() or 1, 64))
        self.vm_setup = {"accelerator": accel, "host_kvm": host_kvm, "machine": cfg.machine,
                         "guest_memory_mib": cfg.memory_mib, "vcpus": vcpus, "kernel_build_id": kid,
                         "virtiofs_cache": cfg.virtiofs_cache, "virtiofs_dax": False}
        if accel == "tcg":
            self.vm_setup["tcg_tb_size_mib"] = cfg.tcg_tb_size_mib
        with contextlib.suppress(Exception):
            self.runtime = choose_runtime(cfg.runtime)
            out = subprocess.run([self.runtime, "--version"], capture_output=True, text=True, timeout=10).stdout
            self.runtime_version = f"{self.runtime} ({out.splitlines()[0]})"
        mi = meminfo()
        self.meta = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "vmrt " + shlex.join(self.argv),
            "vmrt_version": __version__,
            "python": platform.python_version(),
            "host": {"cores": os.cpu_count(), "mem_total_mib": round(mi.get("MemTotal", 0) / 1024),
                     "kernel": os.uname().release, "machine": platform.machine(),
                     "cgroup": "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"},
            "accelerator": accel, "accelerator_reason": reason, "host_kvm": host_kvm,
            "vm": self.vm_setup, "process_runtime": self.runtime_version,
            "image": self.image, "clock": "host CLOCK_MONOTONIC (time.perf_counter)",
            "network": self.network, "net_network": "bridge",
        }

    def make_modes(self) -> None:
        for name in self.mode_names:
            self.modes[name] = self.make_mode(name)

    def make_mode(self, name: str) -> Mode:
        if name in ("process", "vm-cold", "vm-q35"):
            return VmrtMode(self, name)
        if name == "vm-libvirt":
            from ..drivers import libvirt  # on use: only this mode loads libvirt-python
            try:
                libvirt.version(self.cfg.libvirt_uri)
            except VmrtError as e:
                return Skipped(self, name, str(e))
            return VmrtMode(self, name)
        if name == "vm-pool":
            if "start" not in self.only:
                return Skipped(self, name, "only start is measured for vm-pool")
            return PoolMode(self)
        if name == "vm-snapshot":
            snap = VmrtMode(self, name)
            r = self.procs.run([*self.vmrt, "snapshot", "build"], env=snap.env)
            if r.rc != 0:
                return Skipped(self, name, r.error("vmrt snapshot build"))
            return snap
        if name == "vm-default":
            # a warm cache as a user's second run finds it: one run (which starts the background
            # build), then `snapshot build`, which waits for that build and keeps its snapshot
            mode = VmrtMode(self, name)
            r = self.procs.run(mode.start_cmd(0)[0], env=mode.env)
            if r.rc == 0:
                r = self.procs.run([*self.vmrt, "snapshot", "build"], env=mode.env)
            if r.rc != 0:
                return Skipped(self, name, r.error("warming the snapshot cache"))
            return mode
        if name == "runc":
            try:
                runc = choose_runtime("runc")
            except Exception as e:
                return Skipped(self, name, f"runc not available: {e}")
            m = RuncMode(self, runc)
            try:
                m.prepare()
            except Exception as e:
                m.close()
                return Skipped(self, name, f"cannot make a runc bundle of {self.image}: {e}")
            return m
        if name == "podman":
            if shutil.which("podman") is None:
                return Skipped(self, name, "podman is not installed")
            v = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip()
            self.podman_version = v
            img = self.podman_image()
            if isinstance(img, Skipped):
                return img
            return PodmanMode(self, img)
        raise AssertionError(name)

    def podman_image(self) -> str | Skipped:
        """vmrt's image in podman's store (loaded from vmrt's OCI layout once, tagged localhost/vmrt-NAME)."""
        safe = re.sub(r"[^a-z0-9_.-]+", "-", self.image.lower()).strip("-") or "image"
        tag = f"localhost/vmrt-{safe}:latest"
        if subprocess.run(["podman", "image", "exists", tag], capture_output=True).returncode == 0:
            return tag
        ref = self.image if ":" in self.image.rsplit("/", 1)[-1] else f"{self.image}:latest"
        r = subprocess.run(["podman", "pull", "-q", f"oci:{self.cfg.root / 'images'}:{ref}"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return Skipped(self, "podman", f"cannot load {self.image} into podman: {last_line(r.stderr)}")
        subprocess.run(["podman", "tag", r.stdout.strip(), tag], capture_output=True)
        return tag

    def active(self, metric: str) -> list[Mode]:
        out = []
        for name, m in self.modes.items():
            if m.skipped:
                self.results[metric][name] = {"skipped": m.skipped}
            elif name not in APPLIES[metric]:
                self.results[metric][name] = {"skipped": NOT_APPLICABLE if name == "vm-pool" else "not applicable",
                                              "not_applicable": True}
            else:
                out.append(m)
        return out

    def fail(self, metric: str, m: Mode, err: str) -> None:
        self.say(f"{metric}: {m.name}: {err}")
        self.results[metric][m.name] = {"error": err, "setup": m.setup()}

    # --- start ---
    def bench_start(self) -> None:
        modes = self.active("start")
        pool = self.modes.get("vm-pool")
        if isinstance(pool, PoolMode) and pool in modes:
            self.say(f"start: vmrt pool start --size {self.pool_size}")
            try:
                pool.start_pool()
            except BenchError as e:
                pool.skipped = f"vmrt pool not available: {e}"
                self.results["start"]["vm-pool"] = {"skipped": pool.skipped}
                modes.remove(pool)
        try:
            serial = self.start_serial(modes)
            parallel = self.start_parallel(modes) if self.parallel >= 2 else {}
        finally:
            if isinstance(pool, PoolMode):
                pool.close()
        for m in modes:
            if m.name in self.results["start"]:
                continue  # failed
            entry: dict[str, Any] = {"setup": m.setup(), "command": m.command()}
            s = serial[m.name]
            entry["serial"] = {"warmup_discarded": 1, **summary(s["ms"])}
            if s["phases"]:
                entry["serial"]["phases_p50_ms"] = {k: round(statistics.median(v), 1) for k, v in s["phases"].items()}
            if isinstance(m, VmrtMode) and m.iso == "vm":
                entry["served_from_pool"] = s["pool"]
            if m.name in parallel:
                entry["parallel"] = parallel[m.name]
            self.results["start"][m.name] = entry
        base = self.results["start"].get("runc", {}).get("serial", {}).get("p50")
        for entry in self.results["start"].values():
            if base and "serial" in entry:
                entry["serial"]["ratio_p50_to_runc"] = round(entry["serial"]["p50"] / base, 2)

    def timed_start(self, m: Mode, slot: int) -> Result:
        cmd, env = m.start_cmd(slot)
        return self.procs.run(cmd, env=env)

    def start_serial(self, modes: list[Mode]) -> dict[str, dict[str, Any]]:
        data: dict[str, dict[str, Any]] = {m.name: {"ms": [], "phases": {}, "pool": 0} for m in modes}
        for i in range(self.runs + 1):
            self.say(f"start: serial round {i}/{self.runs}" + (" (warm-up, discarded)" if i == 0 else ""))
            for m in rotate(modes, i):
                if m.name in self.results["start"]:
                    continue
                try:
                    m.before_start()
                except BenchError as e:
                    self.fail("start", m, str(e))
                    continue
                r = self.timed_start(m, 0)
                if r.rc != 0:
                    self.fail("start", m, r.error(f"round {i}"))
                    continue
                if i == 0:
                    continue
                d = data[m.name]
                d["ms"].append(r.ms)
                for k, v in PHASE_RE.findall(r.err):
                    d["phases"].setdefault(k, []).append(float(v))
                if served(r.err):
                    d["pool"] += 1
        return data

    def start_parallel(self, modes: list[Mode]) -> dict[str, dict[str, Any]]:
        p = self.parallel
        batches = max(1, math.ceil(self.runs / p))
        data: dict[str, dict[str, list[float]]] = {m.name: {"ms": [], "wall": [], "pool": []} for m in modes}
        errors: dict[str, str] = {}
        for b in range(batches):
            self.say(f"start: {p} in parallel, batch {b + 1}/{batches}")
            for m in rotate(modes, b):
                if m.name in self.results["start"] or m.name in errors:
                    continue
                try:
                    m.before_start()
                except BenchError as e:
                    errors[m.name] = str(e)
                    continue
                res = self.batch(m, p)
                bad = [r for r in res if r.rc != 0]
                if bad:
                    errors[m.name] = bad[0].error(f"parallel batch {b + 1}")
                    self.say(f"start: {m.name}: {errors[m.name]}")
                    continue
                data[m.name]["ms"] += [r.ms for r in res]
                data[m.name]["pool"].append(sum(served(r.err) for r in res))
                data[m.name]["wall"].append((max(r.t1 for r in res) - min(r.t0 for r in res)) * 1000)
        out: dict[str, dict[str, Any]] = {name: {"parallel": p, "error": e} for name, e in errors.items()}
        for name, d in data.items():
            if d["ms"] and name not in errors:
                out[name] = {"parallel": p, "batches": len(d["wall"]), **summary(d["ms"]),
                             "batch_wall_ms": summary(d["wall"])}
                if self.modes[name].name != "process" and isinstance(self.modes[name], VmrtMode):
                    out[name]["served_from_pool"] = int(sum(d["pool"]))
        return out

    def batch(self, m: Mode, p: int) -> list[Result]:
        barrier = threading.Barrier(p)
        results: list[Result | None] = [None] * p

        def one(k: int) -> None:
            cmd, env = m.start_cmd(k)
            barrier.wait()
            results[k] = self.procs.run(cmd, env=env)
        threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(p)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r if r is not None else Result(1, "", "worker failed", 0.0) for r in results]

    # --- exec ---
    def bench_exec(self) -> None:
        modes = self.active("exec")
        handles: dict[str, str] = {}
        try:
            for m in modes:
                self.say(f"exec: starting an idle {m.name} container")
                try:
                    handles[m.name] = m.idle(0)
                except BenchError as e:
                    self.fail("exec", m, str(e))
            data: dict[str, list[float]] = {n: [] for n in handles}
            live = [m for m in modes if m.name in handles]
            for i in range(self.runs + 1):
                self.say(f"exec: round {i}/{self.runs}" + (" (warm-up, discarded)" if i == 0 else ""))
                for m in rotate(live, i):
                    if m.name in self.results["exec"]:
                        continue
                    r = self.procs.run(m.exec_cmd(handles[m.name]), env=m.env)
                    if r.rc != 0:
                        self.fail("exec", m, r.error(f"round {i}"))
                    elif i:
                        data[m.name].append(r.ms)
            for m in live:
                if m.name not in self.results["exec"]:
                    self.results["exec"][m.name] = {"setup": m.setup(), "command": shlex.join(m.exec_cmd("C")),
                                                    "warmup_discarded": 1, **summary(data[m.name])}
        finally:
            for m in modes:
                if m.name in handles:
                    m.remove([handles[m.name]])

    # --- memory ---
    def measure_idle(self, m: Mode, handles: list[str]) -> dict[str, Any]:
        table = proc_table()
        per: list[float] = []
        parts: dict[str, float] = {}
        for h in handles:
            pids = m.host_pids(h, table)
            bd = pss_breakdown(pids, table)
            per.append(sum(bd.values()))
            for k, v in bd.items():
                parts[k] = parts.get(k, 0.0) + v
        n = len(handles)
        return {"pss_mib_per_container": summary(per, 2) if per else None,
                "pss_mib_by_process": {k: round(v / n, 2) for k, v in sorted(parts.items())}}

    def bench_memory(self) -> None:
        for m in self.active("memory"):
            handles: list[str] = []
            try:
                time.sleep(1.0)
                before = mem_available_kib()
                self.say(f"memory: {self.idle_n} idle {m.name} containers")
                for k in range(self.idle_n):
                    handles.append(m.idle(100 + k))
                time.sleep(SETTLE_S)
                after = mem_available_kib()
                res = self.measure_idle(m, handles)
                self.results["memory"][m.name] = {
                    "setup": m.setup(), "containers": len(handles), "settle_s": SETTLE_S, **res,
                    "memavailable_drop_mib_per_container": round((before - after) / 1024 / len(handles), 2)}
            except BenchError as e:
                self.fail("memory", m, str(e))
            finally:
                m.remove(handles)

    # --- density ---
    def bench_density(self) -> None:
        for m in self.active("density"):
            handles: list[str] = []
            total = meminfo()["MemTotal"]
            start_ms: list[float] = []
            reason = f"reached --density-max {self.density_max}"
            try:
                time.sleep(1.0)
                before = mem_available_kib()
                for k in range(self.density_max):
                    avail = meminfo()["MemAvailable"]
                    if avail < total * 0.10:
                        reason = f"MemAvailable {avail // 1024} MiB < 10% of MemTotal"
                        break
                    t0 = time.perf_counter()
                    try:
                        handles.append(m.idle(200 + k))
                    except BenchError as e:
                        reason = f"start {k + 1} failed: {e}"
                        break
                    start_ms.append((time.perf_counter() - t0) * 1000)
                    self.say(f"density: {m.name}: {len(handles)} running ({start_ms[-1]:.0f} ms)")
                entry: dict[str, Any] = {"setup": m.setup(), "max": self.density_max, "started": len(handles),
                                         "stopped_because": reason}
                if handles:
                    time.sleep(SETTLE_S)
                    after = mem_available_kib()
                    res = self.measure_idle(m, handles)
                    entry.update(res)
                    entry["memavailable_drop_mib_per_container"] = round((before - after) / 1024 / len(handles), 2)
                    entry["memavailable_end_pct"] = round(after / total * 100, 1)
                    entry["start_ms"] = summary(start_ms)
                self.results["density"][m.name] = entry
            except BenchError as e:
                self.fail("density", m, str(e))
            finally:
                self.say(f"density: removing {len(handles)} {m.name} containers")
                m.remove(handles)

    # --- io and cpu ---
    def host_runner(self, tmp: Path) -> Callable[[str, list[str]], list[str]] | None:
        bb = shutil.which("busybox")
        if bb is None:
            return None
        bindir = tmp / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        for a in HOST_APPLETS:
            with contextlib.suppress(FileExistsError):
                (bindir / a).symlink_to(bb)
        return lambda script, args: [str(bindir / "sh"), "-c", script, "sh", *args]

    def run_scripts(self, metric: str, script: str, args_in: list[str], args_host: list[str],
                    host: Callable[[str, list[str]], list[str]] | None, tmp: Path) -> dict[str, list[dict[str, Any]]]:
        modes = self.active(metric)
        who: list[tuple[str, Mode | None]] = [(m.name, m) for m in modes]
        if host is not None:
            who.append(("host", None))
        else:
            self.results[metric]["host"] = {"skipped": "no busybox on the host"}
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n, _ in who}
        env = dict(self.env, PATH=str(tmp / "bin"))
        for rep in range(REPS):
            for name, m in rotate(who, rep):
                if name in self.results[metric]:
                    continue
                self.say(f"{metric}: {name}, repetition {rep + 1}/{REPS}")
                cmd = m.script_cmd(script, args_in) if m else host(script, args_host)  # type: ignore[misc]
                r, lines = self.procs.run_marked(cmd, env=m.env if m else env)
                parsed = parse_marked(lines)
                if r.rc != 0 or not parsed["done"]:
                    err = r.error(f"repetition {rep + 1}") if r.rc else \
                        f"repetition {rep + 1}: the script stopped early"
                    if m:
                        self.fail(metric, m, err)
                    else:
                        self.results[metric]["host"] = {"error": err}
                    continue
                runs[name].append(parsed)
        return runs

    def bench_io(self, tmp: Path) -> None:
        host = self.host_runner(tmp)
        hostdir = Path(tempfile.mkdtemp(prefix="vmrt-bench-io-"))
        try:
            runs = self.run_scripts("io", IO_SCRIPT, ["/bench-io", "/tmp/bench-io", "/bin/busybox"],
                                    [str(hostdir / "w"), str(hostdir / "t"), "/bin/busybox"], host, tmp)
        finally:
            shutil.rmtree(hostdir, ignore_errors=True)
        host_mounts = [(ln.split()[1], ln.split()[2]) for ln in Path("/proc/mounts").read_text().splitlines()]
        for name, reps in runs.items():
            if not reps or name in self.results["io"]:
                continue
            m = self.modes.get(name)
            mounts = reps[0]["mounts"] if name != "host" else host_mounts
            paths = (["/bench-io", "/tmp/bench-io"] if name != "host" else [str(hostdir / "w"), str(hostdir / "t")])
            size = int(reps[0]["info"].get("imgsize", "0") or 0)

            def rate(key: str, nbytes: float, reps: list[dict[str, Any]] = reps) -> dict[str, Any]:
                xs = [nbytes / 1e6 / r["t"][key] for r in reps if r["t"].get(key)]
                return summary(xs) if xs else {}

            def ops(key: str, reps: list[dict[str, Any]] = reps) -> dict[str, Any]:
                n = META_FILES * (STAT_PASSES if key == "stat" else 1)
                xs = [n / r["t"][key] for r in reps if r["t"].get(key)]
                return summary(xs, 0) if xs else {}
            nb = IO_MIB * 1024 * 1024
            vm = isinstance(m, VmrtMode) and m.iso == "vm"
            upper = "guest tmpfs" if vmdisk.parse_size(self.cfg.vm_storage_size) == 0 else "ext4 on its disk"
            root_fs = f"overlay (upper: {upper})" if vm else fs_of(paths[0], mounts)
            tmp_fs = f"overlay (upper: {upper})" if vm and fs_of(paths[1], mounts) == "overlay" \
                else fs_of(paths[1], mounts)
            img_fs = ("9p" if name in ("vm-snapshot", "vm-default") else "virtio-fs") if vm \
                else fs_of("/bin/busybox", mounts)
            entry: dict[str, Any] = {
                "setup": m.setup() if m else {"isolation": "none (the host itself)"},
                "repetitions": len(reps),
                "rootfs": {"path": paths[0], "fs": root_fs, "write_mb_s": rate("write_root", nb),
                           "read_mb_s": rate("read_root", nb)},
                "tmp": {"path": paths[1], "fs": tmp_fs, "write_mb_s": rate("write_tmp", nb),
                        "read_mb_s": rate("read_tmp", nb)},
                # issue 17: the first read (cold), the next ones (page cache warm, "mb_s"), and the same
                # file read from the same container's tmpfs (/dev/shm) as the baseline
                "image_read": {"path": "/bin/busybox", "fs": img_fs, "bytes": size,
                               "reads": IMAGE_READS, "mb_s": rate("image_read", size * IMAGE_READS),
                               "first_mb_s": rate("image_first", size),
                               "tmpfs_mb_s": rate("shm_read", size * IMAGE_READS)},
                "metadata": {"files": META_FILES, "dir": paths[0], "create_ops_s": ops("create"),
                             "stat_ops_s": ops("stat"), "delete_ops_s": ops("delete"),
                             "stat_passes": STAT_PASSES,
                             "empty_loop_ms_per_1000": summary([r["t"]["loop_empty"] * 1000 / STAT_PASSES
                                                                for r in reps], 2)},
            }
            if vm:
                vfs = ("always (vmrt's auto: nothing in the share changes)" if self.cfg.virtiofs_cache == "auto"
                       else self.cfg.virtiofs_cache)
                share = "9p cache=loose (a snapshot clone)" if img_fs == "9p" else f"virtio-fs cache={vfs}, no DAX"
                entry["note"] = f"writable layer: overlayfs in the guest, upper: {upper}; image (lower) over {share}"
            self.results["io"][name] = entry
        self.workloads["io"] = {
            "write": f"dd if=/dev/zero bs=1M count={IO_MIB} conv=fsync", "read": "dd bs=1M of the file just written "
            "(page cache warm)", "image_read": f"dd if=IMG bs=1M once (first), then x{IMAGE_READS} (warm; a file of "
            f"the image: the lower layer), then x{IMAGE_READS} of its copy in /dev/shm (tmpfs, the baseline)",
            "metadata": f"busybox sh loops over {META_FILES} files: create (: > f$i), stat ([ -e f$i ], "
            f"{STAT_PASSES} passes), delete (one rm -f f*); rates include the shell loop, whose cost per "
            "1000 iterations is reported",
            "timing": "host-side timestamps of marker lines printed by the script"}

    def bench_cpu(self, tmp: Path) -> None:
        host = self.host_runner(tmp)
        runs = self.run_scripts("cpu", CPU_SCRIPT, [], [], host, tmp)
        for name, reps in runs.items():
            if not reps or name in self.results["cpu"]:
                continue
            m = self.modes.get(name)
            cpu = [r["t"]["cpu"] for r in reps]
            sc = [r["t"]["syscall"] for r in reps]
            self.results["cpu"][name] = {
                "setup": m.setup() if m else {"isolation": "none (the host itself)"}, "repetitions": len(reps),
                "cpu_loop_s": summary(cpu, 3), "syscall_loop_s": summary(sc, 3),
                "syscalls_per_s": round(2 * SYSCALL_BYTES / statistics.median(sc))}
        h = self.results["cpu"].get("host", {})
        for e in self.results["cpu"].values():
            if "cpu_loop_s" in e and "cpu_loop_s" in h:
                e["cpu_ratio_to_host"] = round(e["cpu_loop_s"]["p50"] / h["cpu_loop_s"]["p50"], 2)
                e["syscall_ratio_to_host"] = round(e["syscall_loop_s"]["p50"] / h["syscall_loop_s"]["p50"], 2)
        self.workloads["cpu"] = {
            "cpu": f"busybox awk loop of {CPU_ITERS} iterations", "syscall":
            f"dd if=/dev/zero of=/dev/null bs=1 count={SYSCALL_BYTES} (one read + one write per byte)",
            "timing": "host-side timestamps of marker lines printed by the script"}

    # --- net ---
    def bench_net(self, tmp: Path) -> None:
        """TCP throughput and HTTP latency from the host through published ports (default bridge
        network), and over loopback to the same servers on the host (host-loopback)."""
        res = self.results["net"]
        modes = self.active("net")
        nbytes = self.net_mib * 1024 * 1024
        host = self.host_runner(tmp)
        host_setup = {"isolation": "none (the host itself)", "network": "loopback", "servers": "host busybox"}
        ports: dict[str, tuple[int, int]] = {}   # path -> (sink, http) on 127.0.0.1
        commands: dict[str, str] = {}
        ready_s: dict[str, float] = {}
        handles: list[tuple[Mode, str]] = []
        servers: list[subprocess.Popen[Any]] = []
        live: list[str] = []  # the paths still measured

        def lost(name: str, err: str) -> None:
            if name == "host-loopback":
                self.say(f"net: host-loopback: {err}")
                res[name] = {"error": err, "setup": host_setup}
            else:
                self.fail("net", self.modes[name], err)
            if name in live:
                live.remove(name)
        try:
            if host is None:
                res["host-loopback"] = {"skipped": "no busybox on the host", "setup": host_setup}
            else:
                sink, http = free_ports(2)
                bindir, www = tmp / "bin", tmp / "net-www"
                www.mkdir(exist_ok=True)
                (www / "index.html").write_bytes(bytes(NET_FILE_BYTES))
                env = dict(self.env, PATH=str(bindir))
                hcmd = [str(bindir / "httpd"), "-f", "-p", f"127.0.0.1:{http}", "-h", str(www)]
                scmd = [str(bindir / "sh"), "-c", NET_SINK, "sh", str(tmp / "net-sink.fifo"), str(sink), "127.0.0.1"]
                self.say("net: host-loopback: busybox httpd and nc sink on the host")
                servers += [self.procs.spawn(hcmd, env), self.procs.spawn(scmd, env)]
                ports["host-loopback"] = (sink, http)
                commands["host-loopback"] = f"{shlex.join(hcmd)}; sh -c NET_SINK sh FIFO {sink} 127.0.0.1"
                live.append("host-loopback")
            for m in modes:
                assert isinstance(m, VmrtMode)
                sink, http = free_ports(2)
                name = f"{self.tag}-{m.name}-net"
                self.vmrt_names.add(name)
                cmd = [*self.vmrt, "run", "-d", "--name", name, f"--isolation={m.iso}", "--network", "bridge",
                       "-p", f"127.0.0.1:{sink}:{NET_SINK_PORT}", "-p", f"127.0.0.1:{http}:{NET_HTTP_PORT}",
                       self.image, "sh", "-c", NET_SERVE, "sh", "/tmp/bench-net-sink.fifo", str(NET_SINK_PORT)]
                self.say(f"net: {m.name}: a detached container with httpd and an nc sink, ports published")
                r = self.procs.run(cmd, env=m.env)
                if r.rc != 0:
                    self.fail("net", m, r.error(f"vmrt run -d --isolation={m.iso} -p"))
                    continue
                handles.append((m, r.out.strip().splitlines()[-1]))
                ports[m.name] = (sink, http)
                commands[m.name] = shlex.join(["vmrt", *cmd[len(self.vmrt):]])
                live.append(m.name)
            for name in list(live):
                try:
                    ready_s[name] = wait_net_ready(*ports[name], NET_FILE_BYTES)
                    self.say(f"net: {name}: servers answer after {ready_s[name]:.1f} s; warm-up")
                    net_transfer(ports[name][0], min(NET_WARMUP_MIB, self.net_mib) * 1024 * 1024)
                    for _ in range(NET_WARMUP_GETS):
                        http_get(ports[name][1], NET_FILE_BYTES)
                except (OSError, BenchError) as e:
                    lost(name, f"before timing: {e}")
            rates: dict[str, list[float]] = {n: [] for n in live}
            secs: dict[str, list[float]] = {n: [] for n in live}
            for rep in range(REPS):
                for name in rotate(list(live), rep):
                    self.say(f"net: {name}: {self.net_mib} MiB, repetition {rep + 1}/{REPS}")
                    try:
                        t = net_transfer(ports[name][0], nbytes)
                    except (OSError, BenchError) as e:
                        lost(name, f"throughput, repetition {rep + 1}: {e}")
                        continue
                    secs[name].append(t)
                    rates[name].append(self.net_mib / t)
            lat: dict[str, list[float]] = {n: [] for n in live}
            self.say(f"net: {self.net_requests} GETs per path, interleaved: {', '.join(live)}")
            for i in range(self.net_requests):
                for name in rotate(list(live), i):
                    try:
                        lat[name].append(http_get(ports[name][1], NET_FILE_BYTES) * 1000)
                    except (OSError, BenchError) as e:
                        lost(name, f"request {i + 1}: {e}")
        finally:
            for vm_mode, handle in handles:
                vm_mode.remove([handle])
            for p in servers:
                self.procs.stop_group(p)
        paths = {"host-loopback": "127.0.0.1 -> the host's own servers (loopback)",
                 "process": "127.0.0.1 -> nftables DNAT (route_localnet) -> bridge -> veth -> the container's "
                            "network namespace",
                 "vm-cold": "127.0.0.1 -> nftables DNAT (route_localnet) -> bridge -> veth -> tc redirect -> tap "
                            "-> virtio-net (QEMU) -> the guest"}
        out: dict[str, dict[str, Any]] = {}
        for name in ["host-loopback", *(m.name for m in modes)]:
            if name in res:  # skipped or failed: as it is, in this order
                out[name] = res.pop(name)
                continue
            mode = self.modes.get(name)
            out[name] = {
                "setup": {**mode.setup(), "network": "bridge (default), ports published on 127.0.0.1"} if mode
                else host_setup,
                "command": commands[name], "path": paths[name], "ready_s": round(ready_s[name], 2),
                "throughput": {"mib": self.net_mib, "repetitions": len(rates[name]),
                               "mib_s": summary(rates[name], 1), "seconds": summary(secs[name], 3)},
                "latency_ms": {"requests": len(lat[name]), "file_bytes": NET_FILE_BYTES, **summary(lat[name], 3)},
            }
        out.update(res)  # the modes it does not apply to
        hb = out.get("host-loopback", {})
        for name, entry in out.items():
            if name != "host-loopback" and "throughput" in entry and "throughput" in hb:
                base = hb["throughput"]["mib_s"]["p50"]
                entry["throughput_ratio_to_host"] = round(entry["throughput"]["mib_s"]["p50"] / base, 3)
                entry["latency_p50_ratio_to_host"] = round(entry["latency_ms"]["p50"] / hb["latency_ms"]["p50"], 2)
        self.results["net"] = out
        self.workloads["net"] = {
            "network": "the default bridge network (whatever --network says); ports published on 127.0.0.1 with -p",
            "servers": f"busybox httpd -f (GET /index.html, {NET_FILE_BYTES} bytes) and a TCP sink: a shell loop of "
                       "busybox 'nc -l -p PORT' (stdin a FIFO held open, output to /dev/null), in one detached "
                       "container per mode; the same on the host for host-loopback",
            "throughput": f"{self.net_mib} MiB sent over a new connection, then shutdown(SHUT_WR); timed from "
                          f"connect to the sink's EOF (it has read everything and exited); {REPS} repetitions, "
                          "interleaved; MiB/s",
            "latency": f"{self.net_requests} sequential HTTP/1.0 GETs per path, a new TCP connection each (as curl), "
                       "timed from connect to the last byte; interleaved path by path; ms",
            "warmup": f"readiness probes, then a transfer of {min(NET_WARMUP_MIB, self.net_mib)} MiB and "
                      f"{NET_WARMUP_GETS} GETs per path, discarded",
            "client": "Python sockets on the host, the same code for every path",
            "timing": "host CLOCK_MONOTONIC (time.perf_counter)"}

    # --- driver ---
    def run(self) -> dict[str, Any]:
        self.collect_meta()
        tmp = Path(tempfile.mkdtemp(prefix="vmrt-bench-"))
        try:
            self.make_modes()
            for metric in METRICS:
                if metric not in self.only:
                    continue
                if metric in ("io", "cpu", "net"):
                    getattr(self, f"bench_{metric}")(tmp)
                else:
                    getattr(self, f"bench_{metric}")()
        finally:
            self.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
        return self.document()

    def cleanup(self) -> None:
        """Stop what runs, remove every container this bench made (also after Ctrl-C)."""
        main = threading.current_thread() is threading.main_thread()
        old = [(s, signal.signal(s, signal.SIG_IGN)) for s in (signal.SIGINT, signal.SIGTERM)] if main else []
        try:
            self.procs.stop_all()
            for m in self.modes.values():
                with contextlib.suppress(Exception):
                    m.close()
            if self.vmrt_names:
                r = self.procs.run([*self.vmrt, "ps", "-a", "--format", "{{.Names}}"])
                left = sorted(set(r.out.split()) & self.vmrt_names)
                if left:
                    self.procs.run([*self.vmrt, "rm", "-f", *left])
        finally:
            for sig, handler in old:
                signal.signal(sig, handler)

    def document(self) -> dict[str, Any]:
        modes: dict[str, dict[str, Any]] = {}
        for name, m in self.modes.items():
            if m.skipped:
                modes[name] = {"status": "skipped", "reason": m.skipped}
                continue
            entries = {k: v[name] for k, v in self.results.items() if isinstance(v.get(name), dict)}
            errs = {k: str(e["error"]) for k, e in entries.items() if "error" in e}
            ok = [k for k, e in entries.items() if "error" not in e and "skipped" not in e]
            status = "ok" if not errs else "partial" if ok else "failed"
            modes[name] = {"status": status, "setup": m.setup(), "command": m.command(),
                           **({"errors": errs} if errs else {})}
        return {"schema": "vmrt-bench/1", "meta": self.meta,
                "options": {"runs": self.runs, "parallel": self.parallel, "density_max": self.density_max,
                            "modes": self.mode_names, "only": self.only, "image": self.image, "idle": self.idle_n,
                            "pool_size": self.pool_size, "io_cpu_repetitions": REPS, "network": self.network,
                            "net_mib": self.net_mib, "net_requests": self.net_requests,
                            "net_repetitions": REPS},
                "modes": modes, "results": self.results, "workloads": self.workloads}
