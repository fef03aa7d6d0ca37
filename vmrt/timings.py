"""Start-up phases measured on the host with CLOCK_BOOTTIME.

T0 is the moment the ``vmrt`` process was created (from /proc/self/stat), so
interpreter start-up is included.
"""

from __future__ import annotations

import os
import sys
import time

PHASES = ("created", "network-ready", "pool-claim", "rootfs-ready", "vmm-spawned", "kernel-up", "agent-ready",
          "disk-ready", "process-started", "first-output", "exit", "teardown-done")


def _process_start_ns() -> int:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19]) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def now() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Timings:
    def __init__(self) -> None:
        self.t0 = _process_start_ns()
        self.marks: dict[str, int] = {}
        self.info: dict[str, str] = {}
        self.on_mark: dict[str, object] = {}  # phase -> callable run when it is first marked

    def mark(self, phase: str, *, once: bool = True) -> None:
        if once and phase in self.marks:
            return
        self.marks[phase] = now()
        callback = self.on_mark.pop(phase, None)
        if callable(callback):
            callback()

    def ms(self, phase: str) -> float | None:
        t = self.marks.get(phase)
        return None if t is None else (t - self.t0) / 1e6

    def report(self, out=sys.stderr) -> None:  # type: ignore[no-untyped-def]
        info = " ".join(f"{k}={v}" for k, v in self.info.items())
        print(f"vmrt timings (ms since the vmrt process started){': ' + info if info else ''}", file=out)
        prev = 0.0
        for p in PHASES:
            v = self.ms(p)
            if v is None:
                continue
            print(f"  {p:<16} {v:9.1f}  (+{v - prev:.1f})", file=out)
            prev = v
        out.flush()
