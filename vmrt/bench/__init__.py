"""``vmrt bench`` (issue 15, part 5): the package vmrt/bench.py becomes; metrics.py is that file, moved."""

from .metrics import NET_FILE_BYTES, REPS, fs_of, main, parse_marked, pct, rotate, summary

__all__ = ["NET_FILE_BYTES", "REPS", "fs_of", "main", "parse_marked", "pct", "rotate", "summary"]
