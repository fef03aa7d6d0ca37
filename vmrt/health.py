"""The health probe: ``python -m vmrt.health --health ID``, started by the container's C monitor
every interval (``--health``). It runs the container's check once, in the container (``vmrt
exec``'s path: runc exec, or the guest agent's exec port), bounded by the check's timeout, and
records the outcome in the run dir (:mod:`vmrt.healthstate`): healthy on exit 0; a failure
after the start period adds to the failing streak, which at Retries makes it unhealthy.

Output is kept as Docker keeps it (the first 4 KiB); the rest is read and dropped, so a
container cannot make the probe hold more.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
import time
from typing import Any

from . import config as config_mod
from . import fsmode, healthstate
from .errors import VmrtError
from .execs import ExecOptions, run_exec
from .layout import container_dir
from .lifecycle import owner_alive
from .state import State, Status


def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def _collect(fd: int, into: bytearray) -> None:
    """Read fd to its end, keeping the first OUTPUT_MAX bytes."""
    with os.fdopen(fd, "rb", 0) as f:
        while data := f.read(65536):
            room = healthstate.OUTPUT_MAX - len(into)
            if room > 0:
                into += data[:room]


def run_check(cfg: config_mod.Config, cid: str, hc: dict[str, Any]) -> tuple[int, str]:
    """The check's exit code and output (-1 and why, when it could not run or timed out)."""
    test = hc["Test"]
    args = list(test[1:]) if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
    timeout = (hc.get("Timeout") or healthstate.DEFAULTS["Timeout"]) / healthstate.SECOND
    r, w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    out = bytearray()
    reader = threading.Thread(target=_collect, args=(r, out), daemon=True)
    reader.start()
    try:
        code = run_exec(cfg, cid, ExecOptions(args, stdio=(null, w, w), timeout=timeout))
    except TimeoutError:
        return -1, f"Health check exceeded timeout ({timeout:g}s)"
    except VmrtError as e:
        code = e.exit_code
        out += f"{e}\n".encode()[:max(0, healthstate.OUTPUT_MAX - len(out))]
    finally:
        os.close(w)
        os.close(null)
    reader.join(2.0)  # a process the check left behind may hold the pipe: not waited for
    return code, bytes(out).decode("utf-8", "replace")


def probe(cfg: config_mod.Config, cid: str) -> int:
    st = State(cfg.db_path)
    try:
        c = st.get(cid)
    finally:
        st.close()
    if c.status != Status.RUNNING or not owner_alive(c) or not c.run_dir:
        return 0
    config = json.loads((container_dir(cfg, c.id) / "config.json").read_text())
    hc = healthstate.of(config)
    if hc is None:
        return 0
    start = time.time()
    code, output = run_check(cfg, c.id, hc)
    end = time.time()
    health = healthstate.read(c.run_dir) or healthstate.starting()
    in_start_period = c.started is not None and start < c.started + hc.get("StartPeriod", 0) / healthstate.SECOND
    if code == 0:
        health["Status"], health["FailingStreak"] = "healthy", 0
    elif not in_start_period:
        health["FailingStreak"] = int(health.get("FailingStreak", 0)) + 1
        if health["FailingStreak"] >= (hc.get("Retries") or healthstate.DEFAULTS["Retries"]):
            health["Status"] = "unhealthy"
    log = [*list(health.get("Log") or []), {"Start": _rfc3339(start), "End": _rfc3339(end), "ExitCode": code,
                                             "Output": output}]
    health["Log"] = log[-healthstate.LOG_KEEP:]
    if os.path.isdir(c.run_dir):  # else the container ended meanwhile
        healthstate.write(c.run_dir, health)
    return 0


def main(argv: list[str]) -> int:
    """``--health ID``."""
    fsmode.restrict_umask()
    if len(argv) != 2 or argv[0] != "--health":
        print("usage: python -m vmrt.health --health ID", file=sys.stderr)
        return 2
    try:
        return probe(config_mod.load(), argv[1])
    except (VmrtError, OSError, ValueError) as e:
        print(f"vmrt health probe: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
