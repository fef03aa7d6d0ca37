"""This host's syscall numbers by name, from the kernel headers (``asm/unistd_64.h``).

The ENOSYS probe (probes/enosys.c) takes numbers; `vmrt check isolation` and the tests name the
syscalls of the seccomp profile. The table is the one the C library is built against (Debian's
linux-libc-dev, there wherever gcc is), so a name the headers do not know is a syscall newer than
them and is left out.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from .errors import VmrtError

HEADERS = (Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"), Path("/usr/include/asm/unistd_64.h"))
_DEFINE = re.compile(r"^#define __NR_([a-z0-9_]+)\s+(\d+)\s*$", re.M)


@functools.cache
def numbers() -> dict[str, int]:
    """{name: number} of every syscall the headers define."""
    for h in HEADERS:
        if h.is_file():
            table = {m[1]: int(m[2]) for m in _DEFINE.finditer(h.read_text())}
            if table:
                return table
    raise VmrtError("no syscall table: install the Debian package linux-libc-dev (asm/unistd_64.h)")


def allowed(profile: dict[str, Any]) -> list[str]:
    """The syscalls an OCI ``linux.seccomp`` object allows outright (an ALLOW rule without argument
    conditions), sorted, that the headers know."""
    table = numbers()
    names = {n for r in profile.get("syscalls") or [] if r.get("action") == "SCMP_ACT_ALLOW" and not r.get("args")
             for n in r.get("names") or []}
    return sorted(n for n in names if n in table)
