"""The bench document as tables: on the terminal and as a markdown section (--write-md)."""

from __future__ import annotations

import re
from typing import Any

from .workloads import CPU_ITERS, IO_MIB, META_FILES, NET_FILE_BYTES, REPS, SYSCALL_BYTES


def _f(x: Any, nd: int = 0) -> str:
    if x is None or x == {}:
        return "-"
    if isinstance(x, int | float):
        return f"{x:.{nd}f}"
    return str(x)


def _status(e: dict[str, Any]) -> str | None:
    if "skipped" in e:
        return f"skipped: {e['skipped']}"
    if "error" in e:
        return f"failed: {e['error']}"
    return None


def tables(doc: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per metric, for the terminal and for markdown. Modes skipped
    altogether (listed once below the tables) and metrics that do not apply get no row."""
    skipped = {k for k, v in doc["modes"].items() if v["status"] == "skipped"}
    res = {metric: {k: v for k, v in per.items() if k not in skipped and not v.get("not_applicable")}
           for metric, per in doc["results"].items()}
    out = []
    if "start" in res:
        rows = []
        for name, e in res["start"].items():
            s = e.get("serial", {})
            st = _status(e)
            if st:
                rows.append([name, *["-"] * 7, st])
                continue
            p = e.get("parallel", {})
            pool = e.get("served_from_pool")
            note = ""
            if pool is not None and (name in ("vm-pool", "vm-snapshot", "vm-default") or pool):
                note = f"{'from pool' if name == 'vm-pool' else 'restored'}: {pool}/{s['n']} serial"
                if "served_from_pool" in p:
                    note += f", {p['served_from_pool']}/{p['n']} parallel"
            if isinstance(p, dict) and "error" in p:
                note = (note + " parallel failed").strip()
            rows.append([name, _f(s["p50"]), _f(s["p90"]), _f(s["p99"]), _f(s.get("ratio_p50_to_runc"), 2),
                         _f(p.get("p50")), _f(p.get("p99")), _f(p.get("batch_wall_ms", {}).get("p50")), note])
        P = doc["options"]["parallel"]
        out.append((f"Start latency, `run --rm IMAGE true` (ms; serial n={doc['options']['runs']}, "
                    f"{P} in parallel)", ["mode", "p50", "p90", "p99", "p50/runc", f"par{P} p50", f"par{P} p99",
                                          "batch wall p50", "note"], rows))
    if "exec" in res:
        rows = []
        for name, e in res["exec"].items():
            st = _status(e)
            rows.append([name, "-", "-", "-", "-", st] if st else [name, _f(e["p50"]), _f(e["p90"]), _f(e["p99"]),
                                                                   str(e["n"]), ""])
        out.append(("Exec latency, `exec C true` (ms)", ["mode", "p50", "p90", "p99", "n", "note"], rows))
    if "memory" in res:
        rows = []
        for name, e in res["memory"].items():
            st = _status(e)
            if st:
                rows.append([name, "-", "-", "-", st])
                continue
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(e["pss_mib_by_process"].items(), key=lambda kv: -kv[1]))
            rows.append([name, str(e["containers"]), _f(e["pss_mib_per_container"]["p50"], 1),
                         _f(e["memavailable_drop_mib_per_container"], 1), parts])
        out.append(("Idle memory per container (MiB)", ["mode", "containers", "host PSS", "MemAvailable drop",
                                                        "PSS by process"], rows))
    if "density" in res:
        rows = []
        for name, e in res["density"].items():
            st = _status(e)
            if st:
                rows.append([name, "-", st, "-", "-", "-", "-"])
                continue
            pss = e.get("pss_mib_per_container") or {}
            rows.append([name, f"{e['started']}/{e['max']}", e["stopped_because"], _f(pss.get("mean"), 1),
                         _f(e.get("memavailable_drop_mib_per_container"), 1),
                         _f(e.get("start_ms", {}).get("p50")), _f(e.get("start_ms", {}).get("max"))])
        out.append(("Density: idle containers started one by one",
                    ["mode", "running", "stopped because", "PSS MiB each", "MemAvail drop each",
                     "start p50 ms", "start max ms"], rows))
    if "io" in res:
        rows, rows2 = [], []
        for name, e in res["io"].items():
            st = _status(e)
            if st:
                rows.append([name, *["-"] * 8, st])
                rows2.append([name, *["-"] * 5, st])
                continue
            r, t, im, md = e["rootfs"], e["tmp"], e["image_read"], e["metadata"]
            rows.append([name, r["fs"], _f(r["write_mb_s"].get("p50")), _f(r["read_mb_s"].get("p50")),
                         t["fs"], _f(t["write_mb_s"].get("p50")), _f(t["read_mb_s"].get("p50")),
                         f"{_f(im['mb_s'].get('p50'))} ({im['fs']})",
                         f"{_f(im.get('first_mb_s', {}).get('p50'))} / {_f(im.get('tmpfs_mb_s', {}).get('p50'))}", ""])
            rows2.append([name, r["fs"], _f(md["create_ops_s"].get("p50")), _f(md["stat_ops_s"].get("p50")),
                          _f(md["delete_ops_s"].get("p50")), _f(md["empty_loop_ms_per_1000"].get("p50"), 1), ""])
        out.append((f"Sequential I/O (MB/s, {IO_MIB} MiB dd, p50 of {REPS})",
                    ["where", "/ fs", "/ write", "/ read", "/tmp fs", "/tmp write", "/tmp read", "image read (warm)",
                     "image first / tmpfs", "note"],
                    rows))
        out.append((f"Small files ({META_FILES} files, ops/s, p50 of {REPS})",
                    ["where", "fs", "create", "stat", "delete", "loop ms/1000", "note"], rows2))
    if "cpu" in res:
        rows = []
        for name, e in res["cpu"].items():
            st = _status(e)
            if st:
                rows.append([name, "-", "-", "-", "-", "-", st])
                continue
            rows.append([name, _f(e["cpu_loop_s"]["p50"], 3), _f(e.get("cpu_ratio_to_host"), 2),
                         _f(e["syscall_loop_s"]["p50"], 3), _f(e["syscalls_per_s"]),
                         _f(e.get("syscall_ratio_to_host"), 2), ""])
        out.append((f"CPU loop ({CPU_ITERS} awk iterations) and syscall loop ({2 * SYSCALL_BYTES} syscalls), "
                    f"p50 of {REPS}", ["where", "cpu s", "/host", "syscall s", "syscalls/s", "/host", "note"], rows))
    if "net" in res:
        rows = []
        o = doc["options"]
        for name, e in sorted(res["net"].items(), key=lambda kv: kv[0] != "host-loopback"):
            st = _status(e)
            if st:
                rows.append([name, *["-"] * 6, st])
                continue
            t, lat = e["throughput"]["mib_s"], e["latency_ms"]
            rows.append([name, _f(t["p50"], 1), _f(e.get("throughput_ratio_to_host"), 3), _f(lat["p50"], 2),
                         _f(lat["p90"], 2), _f(lat["p99"], 2), _f(e.get("latency_p50_ratio_to_host"), 2), ""])
        out.append((f"Network through published ports on 127.0.0.1 (default bridge network): TCP throughput "
                    f"({o.get('net_mib')} MiB, p50 of {o.get('net_repetitions', REPS)}) and HTTP GET latency "
                    f"({NET_FILE_BYTES} B file, new connection each, n={o.get('net_requests')})",
                    ["path", "MiB/s", "MiB/s / host", "p50 ms", "p90 ms", "p99 ms", "p50 / host", "note"], rows))
    for i, (title, header, rows) in enumerate(out):  # no empty note column
        if header[-1] == "note" and not any(r[-1] for r in rows):
            out[i] = (title, header[:-1], [r[:-1] for r in rows])
    return out


def setup_line(doc: dict[str, Any]) -> str:
    m, vm = doc["meta"], doc["meta"]["vm"]
    return (f"accel={m['accelerator']} (host /dev/kvm: {m['host_kvm']}), machine {vm['machine']}, guest RAM "
            f"{vm['guest_memory_mib']} MiB, {vm['vcpus']} vCPU, kernel build {vm['kernel_build_id']}, "
            f"virtio-fs cache={vm['virtiofs_cache']} (DAX off), vmrt {m['vmrt_version']}, "
            f"{m['host']['cores']} host cores, {m['host']['mem_total_mib']} MiB host RAM, runtime "
            f"{m['process_runtime']}, vmrt containers' network: {m.get('network', '?')}"
            + (" (net: default bridge)" if "net" in doc.get("options", {}).get("only", []) else ""))


def terminal(doc: dict[str, Any]) -> str:
    out = [f"vmrt bench, {doc['meta']['date']}: {setup_line(doc)}", ""]
    for title, header, rows in tables(doc):
        rows = [[c if len(c) <= 60 else c[:57] + "..." for c in r] for r in rows]
        w = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
        out.append(title)
        out.append("  ".join(h.ljust(w[i]) for i, h in enumerate(header)).rstrip())
        for r in rows:
            out.append("  ".join(str(c).ljust(w[i]) if i == 0 or not _numeric(c) else str(c).rjust(w[i])
                                 for i, c in enumerate(r)).rstrip())
        out.append("")
    skipped = [f"{k}: {v['reason']}" for k, v in doc["modes"].items() if v["status"] == "skipped"]
    if skipped:
        out.append("Skipped modes: " + "; ".join(skipped))
    return "\n".join(out)


def _numeric(s: str) -> bool:
    return bool(re.fullmatch(r"-?[\d.]+", s))


def markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    out = [f"\n### vmrt bench, {m['date']} — accel={m['accelerator']} (host /dev/kvm: {m['host_kvm']})\n",
           f"Command: `{m['command']}`  ",
           setup_line(doc) + ". Runs interleaved mode by mode (rotating order), one warm-up round discarded; "
           "times from the host (CLOCK_MONOTONIC).\n"]
    for title, header, rows in tables(doc):
        out.append(f"{title}:\n")
        out.append("| " + " | ".join(header) + " |")
        numeric = [all(_numeric(r[i]) or r[i] in ("-", "") for r in rows) for i in range(len(header))]
        out.append("|" + "|".join("---:" if i and numeric[i] else "---" for i in range(len(header))) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        out.append("")
    skipped = [f"{k} ({v['reason']})" for k, v in doc["modes"].items() if v["status"] == "skipped"]
    if skipped:
        out.append("Skipped: " + "; ".join(skipped) + ".\n")
    return "\n".join(out)
