"""`vmrt bench` itself: its options checked, the bench run, the document written and shown."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError, VmrtError
from .metrics import METRICS, Bench
from .modes import MODES
from .plots import plots
from .report import markdown, terminal
from .workloads import NET_MIB, NET_REQUESTS


def parse_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """A comma-separated --modes or --only, checked against ``allowed``, in its order."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"--{what}: empty list (use {','.join(allowed)})")
    for v in items:
        if v not in allowed:
            raise UsageError(f"--{what}: unknown {what.rstrip('s')} {v!r} (use {','.join(allowed)})")
    return [v for v in allowed if v in items]  # canonical order, no duplicates


def main(cfg: Config, *, runs: int, parallel: int, density_max: int, modes: str, only: str,
         json_path: Path | None, plots_dir: Path | None, write_md: Path | None, image: str,
         idle: int | None, pool_size: int | None, argv: list[str], network: str = "none",
         net_mib: int = NET_MIB, net_requests: int = NET_REQUESTS) -> int:
    """`vmrt bench`: the bench run, its JSON, plots and tables written; an interrupt removes its
    containers and ends in a VmrtError (exit 130) with no results written."""
    mode_list = parse_list(modes, MODES, "modes")
    only_list = parse_list(only, METRICS, "only")
    if not network.strip():
        raise UsageError("--network: empty (use none, bridge or a network's name)")
    if os.geteuid() != 0:
        raise UsageError("vmrt bench needs root (it runs containers)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = json_path or Path(f"vmrt-bench-{stamp}.json")
    plots_dir = plots_dir or Path("vmrt-bench-plots")
    if write_md is not None and not write_md.parent.is_dir():
        raise UsageError(f"--write-md: no directory {write_md.parent}")

    def say(msg: str) -> None:
        print(f"vmrt bench: {msg}", file=sys.stderr, flush=True)
    bench = Bench(cfg, runs=runs, parallel=parallel, density_max=density_max, modes=mode_list, only=only_list,
                  image=image, idle=idle or parallel, pool_size=pool_size or max(1, parallel), argv=argv, say=say,
                  network=network.strip(), net_mib=net_mib, net_requests=net_requests)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        doc = bench.run()
    except KeyboardInterrupt:
        raise VmrtError("bench interrupted (its containers were removed); no results written",
                        exit_code=130) from None
    finally:
        signal.signal(signal.SIGTERM, old)
    try:
        doc["plots"] = plots(doc, plots_dir)
    except ImportError:
        doc["plots"] = []
        say("matplotlib is not installed: no plots (pip install 'vmrt[bench]')")
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(terminal(doc))
    print(f"\nJSON: {json_path}" + (f"; plots: {plots_dir}/" if doc["plots"] else ""))
    if write_md is not None:
        with write_md.open("a") as f:
            f.write(markdown(doc))
        print(f"Appended to {write_md}")
    return 0
