"""The bench document as PNG plots (matplotlib, the optional `vmrt[bench]` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import setup_line
from .workloads import META_FILES


def plots(doc: dict[str, Any], outdir: Path) -> list[str]:
    """PNG plots; raises ImportError when matplotlib is missing."""
    # on use: matplotlib is optional (vmrt[bench]) and only the plots need it (~0.5 s to import)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # on use, after the backend is chosen (see above)
    outdir.mkdir(parents=True, exist_ok=True)
    res, made = doc["results"], []
    sub = setup_line(doc)
    sub = sub[:sub.index(", vmrt")] if ", vmrt" in sub else sub

    def bars(ax: Any, labels: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False) -> None:
        n = max(1, len(series))
        width = 0.8 / n
        for i, (k, vals) in enumerate(series.items()):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
            b = ax.bar(xs, vals, width, label=k)
            ax.bar_label(b, fmt=lambda v: f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}", fontsize=6, rotation=90,
                         padding=2)
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * 2.5)  # room for the value labels
        else:
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(0, lo), hi * 1.15)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)

    def save(fig: Any, name: str, title: str) -> None:
        fig.suptitle(f"{title}\n{sub}", fontsize=8)
        fig.tight_layout()
        p = outdir / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(str(p))

    start = {k: v for k, v in res.get("start", {}).items() if "serial" in v}
    if start:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        labels = list(start)
        bars(axes[0], labels, {q: [start[k]["serial"][q] for k in labels] for q in ("p50", "p90", "p99")},
             "ms (log)", log=True)
        axes[0].set_title("serial", fontsize=9)
        par = [k for k in labels if isinstance(start[k].get("parallel"), dict) and "p50" in start[k]["parallel"]]
        if par:
            bars(axes[1], par, {q: [start[k]["parallel"][q] for k in par] for q in ("p50", "p90", "p99")},
                 "ms (log)", log=True)
            axes[1].set_title(f"{doc['options']['parallel']} in parallel (latency per run)", fontsize=9)
        else:
            axes[1].axis("off")
        save(fig, "start_latency.png", "Start latency: run --rm IMAGE true")
    ex = {k: v for k, v in res.get("exec", {}).items() if "p50" in v}
    if ex:
        fig, ax = plt.subplots(figsize=(7, 4))
        bars(ax, list(ex), {q: [ex[k][q] for k in ex] for q in ("p50", "p90", "p99")}, "ms")
        save(fig, "exec_latency.png", "Exec latency: exec C true")
    mem = {k: v for k, v in res.get("memory", {}).items() if "pss_mib_per_container" in v}
    dens = {k: v for k, v in res.get("density", {}).items() if "started" in v}
    if mem or dens:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        if mem:
            bars(axes[0], list(mem), {"host PSS": [mem[k]["pss_mib_per_container"]["p50"] for k in mem],
                                      "MemAvailable drop": [mem[k]["memavailable_drop_mib_per_container"]
                                                            for k in mem]}, "MiB per idle container")
            axes[0].set_title("idle memory", fontsize=9)
        else:
            axes[0].axis("off")
        if dens:
            bars(axes[1], list(dens), {"running": [dens[k]["started"] for k in dens],
                                       "PSS MiB each": [(dens[k].get("pss_mib_per_container") or {}).get("mean", 0)
                                                        for k in dens]}, "")
            axes[1].set_title(f"density (max {doc['options']['density_max']})", fontsize=9)
        else:
            axes[1].axis("off")
        save(fig, "memory.png", "Memory per container and density")
    io = {k: v for k, v in res.get("io", {}).items() if "rootfs" in v}
    if io:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        keys = [("rootfs", "write_mb_s", "/ write"), ("rootfs", "read_mb_s", "/ read"),
                ("tmp", "write_mb_s", "/tmp write"), ("tmp", "read_mb_s", "/tmp read")]
        series = {lab: [io[k][a][b].get("p50", 0) for k in io] for a, b, lab in keys}
        series["image read"] = [io[k]["image_read"]["mb_s"].get("p50", 0) for k in io]
        bars(axes[0], list(io), series, "MB/s (log)", log=True)
        axes[0].set_title("sequential", fontsize=9)
        bars(axes[1], list(io), {op: [io[k]["metadata"][f"{op}_ops_s"].get("p50", 0) for k in io]
                                 for op in ("create", "stat", "delete")}, "ops/s (log)", log=True)
        axes[1].set_title(f"{META_FILES} small files", fontsize=9)
        save(fig, "io.png", "Rootfs I/O vs the host's file system")
    cpu = {k: v for k, v in res.get("cpu", {}).items() if "cpu_loop_s" in v}
    if cpu:
        fig, ax = plt.subplots(figsize=(7, 4))
        bars(ax, list(cpu), {"cpu loop": [cpu[k]["cpu_loop_s"]["p50"] for k in cpu],
                             "syscall loop": [cpu[k]["syscall_loop_s"]["p50"] for k in cpu]}, "s (log)", log=True)
        save(fig, "cpu.png", "CPU loop and syscall loop (time, lower is better)")
    net = dict(sorted(((k, v) for k, v in res.get("net", {}).items() if "throughput" in v),
                      key=lambda kv: kv[0] != "host-loopback"))
    if net:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        bars(axes[0], list(net), {"MiB/s": [net[k]["throughput"]["mib_s"]["p50"] for k in net]}, "MiB/s")
        axes[0].set_title(f"TCP throughput, {doc['options'].get('net_mib')} MiB (p50)", fontsize=9)
        bars(axes[1], list(net), {q: [net[k]["latency_ms"][q] for k in net] for q in ("p50", "p90", "p99")},
             "ms (log)", log=True)
        axes[1].set_title(f"HTTP GET, new connection each (n={doc['options'].get('net_requests')})", fontsize=9)
        save(fig, "net.png", "Network through published ports (default bridge) vs host loopback")
    return made
