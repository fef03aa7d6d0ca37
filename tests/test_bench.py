"""`vmrt bench`: the document it writes, its plots, its clean-up and its option errors.

A small real run (2 runs, process and a cold VM); no figure is compared with a
target: a benchmark reports, a test only checks that the report is whole and sane.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from support import Vmrt, one_line_error

from vmrt import bench

pytestmark = pytest.mark.vm


def check_latency(s: dict, n: int) -> None:  # type: ignore[type-arg]
    assert s["n"] == n and len(s["runs"]) == n
    assert all(x > 0 for x in s["runs"])
    assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]


def test_bench_small_run(vmrt: Vmrt, tmp_path: Path) -> None:
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    r = vmrt("bench", "--runs", "2", "--parallel", "2", "--modes", "process,vm-cold", "--only", "start,exec,cpu",
             "--json", str(out), "--plots", str(plots), timeout=900)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    text = r.stdout.decode()
    for title in ("Start latency", "Exec latency", "CPU loop"):
        assert title in text
    assert "Traceback" not in r.stderr.decode()
    doc = json.loads(out.read_text())

    assert doc["schema"] == "vmrt-bench/1"
    assert set(doc) >= {"meta", "options", "modes", "results", "workloads", "plots"}
    meta = doc["meta"]
    assert meta["accelerator"] in ("kvm", "tcg")
    assert meta["command"].startswith("vmrt bench --runs 2")
    assert meta["host"]["cores"] >= 1 and meta["host"]["mem_total_mib"] > 0
    vm = meta["vm"]
    assert vm["accelerator"] == meta["accelerator"]
    assert vm["machine"] and vm["guest_memory_mib"] > 0 and vm["vcpus"] >= 1
    assert vm["kernel_build_id"] and vm["virtiofs_cache"]
    assert doc["options"]["runs"] == 2 and doc["options"]["parallel"] == 2
    assert doc["options"]["modes"] == ["process", "vm-cold"]
    assert {k: v["status"] for k, v in doc["modes"].items()} == {"process": "ok", "vm-cold": "ok"}
    assert set(doc["results"]) == {"start", "exec", "cpu"}

    for mode in ("process", "vm-cold"):
        start = doc["results"]["start"][mode]
        check_latency(start["serial"], 2)
        assert start["serial"]["warmup_discarded"] == 1
        check_latency(start["parallel"], 2)
        assert start["parallel"]["parallel"] == 2
        check_latency(start["parallel"]["batch_wall_ms"], 1)
        assert start["serial"]["phases_p50_ms"]["teardown-done"] > 0
        check_latency(doc["results"]["exec"][mode], 2)
        cpu = doc["results"]["cpu"][mode]
        assert cpu["repetitions"] == bench.REPS
        assert cpu["cpu_loop_s"]["p50"] > 0 and cpu["syscall_loop_s"]["p50"] > 0 and cpu["syscalls_per_s"] > 0
    assert doc["results"]["cpu"]["host"]["cpu_loop_s"]["p50"] > 0
    # the setup travels with every figure
    for metric in doc["results"].values():
        for mode, entry in metric.items():
            assert "setup" in entry, (mode, entry)
    vm_setup = doc["results"]["start"]["vm-cold"]["setup"]
    assert vm_setup["isolation"] == "vm" and vm_setup["accelerator"] == meta["accelerator"]
    assert {"machine", "guest_memory_mib", "kernel_build_id", "virtiofs_cache"} <= set(vm_setup)
    assert doc["results"]["start"]["vm-cold"]["served_from_pool"] == 0

    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("start_latency.png", "exec_latency.png", "cpu.png"):
            p = plots / name
            assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert sorted(doc["plots"]) == sorted(str(plots / n) for n in ("start_latency.png", "exec_latency.png",
                                                                          "cpu.png"))
    assert vmrt("ps", "-a", "-q").stdout.strip() == b""
    vmrt.assert_clean()


def test_bench_net(vmrt: Vmrt, tmp_path: Path) -> None:
    """net: throughput and HTTP latency through published ports (process, vm-cold) and over the
    host's loopback, all in one run; tiny sizes, structure only (no figure is judged)."""
    out, md = tmp_path / "net.json", tmp_path / "BENCH.md"
    r = vmrt("bench", "--only", "net", "--modes", "process,vm-cold", "--net-mib", "2", "--net-requests", "10",
             "--runs", "1", "--json", str(out), "--plots", str(tmp_path / "plots"), "--write-md", str(md),
             timeout=900)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert "Traceback" not in r.stderr.decode()
    assert "Network through published ports" in r.stdout.decode()
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"net"}
    o = doc["options"]
    assert (o["net_mib"], o["net_requests"], o["network"]) == (2, 10, "none")
    assert doc["meta"]["network"] == "none"
    assert {k: v["status"] for k, v in doc["modes"].items()} == {"process": "ok", "vm-cold": "ok"}
    net = doc["results"]["net"]
    assert list(net) == ["host-loopback", "process", "vm-cold"]
    for name, e in net.items():
        assert "error" not in e and "skipped" not in e, (name, e)
        assert e["setup"] and e["path"] and e["command"]
        assert e["throughput"]["mib"] == 2 and e["throughput"]["repetitions"] == bench.REPS
        check_latency(e["throughput"]["mib_s"], bench.REPS)
        check_latency(e["throughput"]["seconds"], bench.REPS)
        check_latency(e["latency_ms"], 10)
        assert e["latency_ms"]["file_bytes"] == bench.NET_FILE_BYTES
    for name in ("process", "vm-cold"):
        assert net[name]["throughput_ratio_to_host"] > 0 and net[name]["latency_p50_ratio_to_host"] > 0
        assert net[name]["setup"]["network"].startswith("bridge")
        assert "-p 127.0.0.1:" in net[name]["command"]
    assert net["vm-cold"]["setup"]["isolation"] == "vm"
    assert net["vm-cold"]["setup"]["accelerator"] == doc["meta"]["accelerator"]
    text = md.read_text()
    assert "| host-loopback |" in text and "| vm-cold |" in text and "network: none" in text
    assert vmrt("ps", "-a", "-q").stdout.strip() == b""
    vmrt.assert_clean()


@pytest.mark.parametrize("args,needle", [
    (["--modes", "process,bogus"], "bogus"),
    (["--only", "start,speed"], "speed"),
    (["--runs", "0"], "--runs"),
    (["--net-mib", "0"], "--net-mib"),
    (["--network", " "], "--network"),
])
def test_bench_bad_option(vmrt: Vmrt, tmp_path: Path, args: list[str], needle: str) -> None:
    r = vmrt("bench", *args, "--json", str(tmp_path / "x.json"))
    assert r.returncode == 125
    assert needle in one_line_error(r.stderr)
    assert not (tmp_path / "x.json").exists()


def test_bench_helpers() -> None:
    assert bench.pct([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench.pct([5.0], 99) == 5.0
    s = bench.summary([3.0, 1.0, 2.0])
    assert s["p50"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["p50"] <= s["p99"]
    parsed = bench.parse_marked([(1.0, "@B x"), (1.5, "@M overlay / overlay rw 0 0"), (3.0, "@E x"),
                                 (3.1, "@S imgsize 42"), (3.2, "@D")])
    assert parsed["t"] == {"x": 2.0} and parsed["done"] and parsed["info"]["imgsize"] == "42"
    assert bench.fs_of("/tmp/a", [("/", "overlay"), ("/tmp", "tmpfs")]) == "tmpfs"
    assert bench.fs_of("/tmpx", [("/", "overlay"), ("/tmp", "tmpfs")]) == "overlay"
    assert bench.rotate([1, 2, 3], 4) == [2, 3, 1]


def test_bench_without_matplotlib(vmrt: Vmrt, tmp_path: Path) -> None:
    """No matplotlib: one line says so; the table and the JSON are still written."""
    hide = tmp_path / "hide" / "matplotlib"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out, plots = tmp_path / "b.json", tmp_path / "plots"
    r = vmrt("bench", "--runs", "1", "--modes", "process", "--only", "cpu", "--json", str(out), "--plots", str(plots),
             env={"PYTHONPATH": str(hide.parent)}, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert [ln for ln in r.stderr.decode().splitlines() if "matplotlib" in ln] == [
        "vmrt bench: matplotlib is not installed: no plots (pip install 'vmrt[bench]')"]
    assert "CPU loop" in r.stdout.decode()
    doc = json.loads(out.read_text())
    assert doc["plots"] == [] and doc["results"]["cpu"]["process"]["cpu_loop_s"]["p50"] > 0
    assert not plots.exists()
    vmrt.assert_clean()


def test_bench_default_path_is_the_warm_snapshot_cache(vmrt: Vmrt, tmp_path: Path) -> None:
    """Issue 17: vm-default is what a user gets with no extra command (no pool, VMRT_SNAPSHOT
    unset: auto) once one run has warmed the cache: every measured start is a restore."""
    out = tmp_path / "bench.json"
    r = vmrt("bench", "--runs", "2", "--parallel", "1", "--modes", "process,vm-default", "--only", "start",
             "--json", str(out), "--plots", str(tmp_path / "plots"), timeout=900)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    vmrt.wait_for_snapshot_builds()
    doc = json.loads(out.read_text())
    assert {k: v["status"] for k, v in doc["modes"].items()} == {"process": "ok", "vm-default": "ok"}
    start = doc["results"]["start"]["vm-default"]
    check_latency(start["serial"], 2)
    assert start["served_from_pool"] == 2  # restored, not booted
    assert start["setup"]["snapshot"] is True and "default" in start["setup"]["cache"]
    assert re.search(r"^vm-default .*restored: 2/2 serial", r.stdout.decode(), re.M), r.stdout.decode()
    assert vmrt("snapshot", "rm").returncode == 0
    vmrt.assert_clean()


def test_bench_io_reports_first_warm_and_tmpfs_image_reads(vmrt: Vmrt, tmp_path: Path) -> None:
    """Issue 17, part 5: an image file's first read, its warm reads and the same file read from
    the container's tmpfs (the baseline), for each mode (process here: quick)."""
    out = tmp_path / "bench.json"
    r = vmrt("bench", "--runs", "1", "--modes", "process", "--only", "io", "--json", str(out),
             "--plots", str(tmp_path / "plots"), timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    im = json.loads(out.read_text())["results"]["io"]["process"]["image_read"]
    for key in ("first_mb_s", "mb_s", "tmpfs_mb_s"):
        assert im[key]["p50"] > 0, (key, im)
    assert "image first / tmpfs" in r.stdout.decode()
