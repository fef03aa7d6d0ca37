"""Health checks' configuration and state (Docker's HEALTHCHECK, ``--health-*``,
``Config.Healthcheck``).

The effective check (the image's, overridden field by field by the run's) is kept in the
container's config as the annotation :data:`ANNOTATION` (Docker's Healthcheck object, durations
in nanoseconds). The container's monitor starts :mod:`vmrt.health` every interval; it runs the
check in the container and records the outcome in the run dir's :data:`STATE_NAME`
({Status, FailingStreak, Log}), read by ``ps``, ``inspect`` and the API's events.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import UsageError
from .fsmode import write_private
from .ocispec import Spec

ANNOTATION = "org.vmrt.health"
STATE_NAME = "health.json"
SECOND = 1_000_000_000
DEFAULTS = {"Interval": 30 * SECOND, "Timeout": 30 * SECOND, "StartPeriod": 0, "Retries": 3}
LOG_KEEP = 5          # the last results kept (Docker's)
OUTPUT_MAX = 4096     # bytes of a check's output kept (Docker's)
STATUSES = ("starting", "healthy", "unhealthy")

_UNITS = {"ns": 1, "us": 1000, "µs": 1000, "ms": 1_000_000, "s": SECOND, "m": 60 * SECOND, "h": 3600 * SECOND}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str, what: str) -> int:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) as nanoseconds; ``0`` alone is allowed."""
    t = text.strip()
    if t == "0":
        return 0
    pos, total = 0, 0.0
    while pos < len(t):
        m = _PART.match(t, pos)
        if m is None:
            raise UsageError(f"invalid {what} {text!r}: a duration such as 30s, 1m30s or 500ms")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not t or total > 2**62:
        raise UsageError(f"invalid {what} {text!r}: a duration such as 30s, 1m30s or 500ms")
    return int(total)


def check(hc: Any, where: str) -> dict[str, Any]:
    """A Healthcheck object as given (API, CLI, image), checked strictly."""
    if not isinstance(hc, dict):
        raise UsageError(f"{where} must be an object")
    out: dict[str, Any] = {}
    test = hc.get("Test")
    if test is not None:
        if not isinstance(test, list) or not all(isinstance(x, str) for x in test):
            raise UsageError(f"{where}.Test must be a list of strings")
        if test and test[0] not in ("NONE", "CMD", "CMD-SHELL"):
            raise UsageError(f"{where}.Test must start with NONE, CMD or CMD-SHELL")
        if test and test[0] == "CMD-SHELL" and len(test) != 2:
            raise UsageError(f"{where}.Test: CMD-SHELL takes one command line")
        if test and test[0] == "CMD" and len(test) < 2:
            raise UsageError(f"{where}.Test: CMD needs a command")
        out["Test"] = list(test)
    for key in ("Interval", "Timeout", "StartPeriod", "Retries"):
        v = hc.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UsageError(f"{where}.{key} must be a non-negative integer")
        if key in ("Interval", "Timeout") and 0 < v < 1_000_000:
            raise UsageError(f"{where}.{key} must be 0 or at least 1ms")
        out[key] = v
    return out


def effective(image_hc: Any, run_hc: dict[str, Any] | None) -> dict[str, Any] | None:
    """The check a container runs: the run's fields over the image's (an empty Test or a
    zero: the image's), Docker's defaults under both; None when there is none (or NONE)."""
    base = check(image_hc, "the image's Healthcheck") if image_hc else {}
    over = run_hc or {}
    hc = {**DEFAULTS, **{k: v for k, v in base.items() if v}, **{k: v for k, v in over.items() if v}}
    test = hc.get("Test") or []
    if not test or test[0] == "NONE":
        return None
    return hc


def interval_s(config: Spec) -> float | None:
    """Seconds between checks for a container's config (None: it has none)."""
    hc = of(config)
    return hc["Interval"] / SECOND if hc else None


def of(config: Spec) -> dict[str, Any] | None:
    """A container's effective Healthcheck (from its config's annotation)."""
    text = config.get("annotations", {}).get(ANNOTATION)
    if not text:
        return None
    try:
        hc = json.loads(text)
    except ValueError:
        return None
    return hc if isinstance(hc, dict) and hc.get("Test") else None


def read(run_dir: str | Path | None) -> dict[str, Any] | None:
    """The recorded health of a running container ({Status, FailingStreak, Log}), or None."""
    if not run_dir:
        return None
    try:
        st = json.loads((Path(run_dir) / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(st, dict) or st.get("Status") not in STATUSES:
        return None
    return st


def write(run_dir: str | Path, state: dict[str, Any]) -> None:
    """Replace the recorded health whole (a reader never sees half of it)."""
    tmp = Path(run_dir) / (STATE_NAME + ".tmp")
    write_private(tmp, json.dumps(state))
    os.replace(tmp, Path(run_dir) / STATE_NAME)


def starting() -> dict[str, Any]:
    return {"Status": "starting", "FailingStreak": 0, "Log": []}
