"""Figures from runs: the percentiles and summary every figure is given as, and the rotating
order that interleaves the modes round by round."""

from __future__ import annotations

import math
import statistics
from typing import Any


def pct(xs: list[float], p: float) -> float:
    """Percentile with linear interpolation (p50 is the median)."""
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def summary(xs: list[float], nd: int = 1) -> dict[str, Any]:
    """The form of every figure in the document: n, percentiles, mean, range and the runs."""
    return {"n": len(xs), "p50": round(pct(xs, 50), nd), "p90": round(pct(xs, 90), nd),
            "p99": round(pct(xs, 99), nd), "mean": round(statistics.fmean(xs), nd),
            "min": round(min(xs), nd), "max": round(max(xs), nd), "runs": [round(x, nd) for x in xs]}


def rotate(xs: list[Any], i: int) -> list[Any]:
    """``xs`` from its ``i``-th item on, wrapping: round ``i`` puts another mode first."""
    if not xs:
        return xs
    k = i % len(xs)
    return xs[k:] + xs[:k]
