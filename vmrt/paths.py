"""Where the project's own sources live (guest-agent/, kernels/, images/)."""

from __future__ import annotations

import os
from pathlib import Path


def source_root() -> Path:
    env = os.environ.get("VMRT_SOURCE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent
