"""Process helpers every layer may use (the bottom layer: imports nothing of vmrt's).

A process's identity is its PID and its start time in clock ticks since boot
(:func:`start_ticks`): a reused PID or a stepped wall clock never fools a check that
compares both. :func:`write_all` writes a whole buffer to an fd, blocking or not.
"""

from __future__ import annotations

import os
import select
from pathlib import Path


def start_ticks(pid: int) -> int:
    """A process's start time in clock ticks since boot (0 if it is gone): with the PID, its identity."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return 0 if fields[0] == "Z" else int(fields[19])


def write_all(fd: int, data: bytes) -> bool:
    """Write all of data to fd (waiting out a non-blocking fd); False if the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except OSError:
            return False
        view = view[n:]
    return True
