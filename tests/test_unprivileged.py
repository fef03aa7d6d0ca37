"""The tests that need no root pass without it: `pytest -m 'not root'` as user nobody.

Codecs, parsers, config, formatting and lint must not need root (issue 15, part 6): conftest marks
``root`` every test that uses a private vmrt or boots a VM, modules and tests that need root for
other reasons carry the marker themselves, and this test keeps the rest honest by running them as
uid 65534 with no capabilities. It switches user, so it is itself a root test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import REPO, SLOT

pytestmark = pytest.mark.root
NOBODY = 65534
# the fuzz targets run for a fixed time each (about a minute together, as root in this same suite):
# the unprivileged run keeps to the quick tests
SLOW = ["--ignore", "tests/test_fuzz.py"]


def _closed(path: Path) -> bool:
    return not os.stat(path).st_mode & 0o001


def _closed_dir_above(path: Path, overlaid: list[Path]) -> Path | None:
    """The highest directory above ``path`` that other users cannot enter (e.g. a 0700 home holding
    the interpreter the venv was made from) and that is not one of the ``overlaid``, or None."""
    for d in reversed(path.parents):
        if _closed(d) and d not in overlaid:
            return d
    return None


def _exposing(paths: list[Path], aside: Path) -> str:
    """Shell lines for a private mount namespace in which ``paths`` are reachable by any user: each
    closed directory above them is covered with an empty tmpfs (mode 755) into which they are bound
    back, and a path that is itself closed (a checkout made in a 0700 ``mktemp -d``) is covered by
    an overlay of itself whose (empty, 755) upper layer gives the merged root an open mode. Nothing
    of the host's mounts or modes changes; an empty string where nothing is closed."""
    lines = []
    shut = [p for p in paths if _closed(p)]
    for closed in sorted({c for p in paths if (c := _closed_dir_above(p, shut)) is not None}):
        inside = [p for p in paths if closed in p.parents]
        for i, p in enumerate(inside):
            lines.append(f"mkdir -p {aside}/{i} && mount --bind {p} {aside}/{i}")
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs {closed}")
        for i, p in enumerate(inside):
            lines.append(f"mkdir -p {p} && mount --move {aside}/{i} {p}")
    if shut:
        lines.append(f"mkdir -p {aside}/ov && mount -t tmpfs -o mode=755 tmpfs {aside}/ov")
    for i, p in enumerate(shut):
        up, work = f"{aside}/ov/up{i}", f"{aside}/ov/work{i}"
        lines.append(f"mkdir -m 755 {up} {work} && chmod 755 {up}")
        lines.append(f"mount -t overlay overlay -o lowerdir={p},upperdir={up},workdir={work} {p}")
    return "\n".join(["mount --make-rprivate /", *lines]) if lines else ""


def test_the_tests_that_need_no_root_pass_as_nobody(tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix=f"vmrt-unpriv{SLOT}-", dir="/tmp"))  # reachable by nobody
    try:
        os.chown(home, NOBODY, NOBODY)
        env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
               "LANG": "C.UTF-8", **({"VMRT_TEST_SLOT": SLOT} if SLOT else {})}
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "env", "-i",
               *(f"{k}={v}" for k, v in env.items()),
               os.path.abspath(sys.executable), "-m", "pytest", "-m", "not root", "-p", "no:cacheprovider", "-q",
               "--basetemp", str(home / "basetemp"), *SLOW]
        script = _exposing([Path(sys.base_prefix), Path(sys.prefix), REPO], tmp_path)
        if script:
            # cd again: the shell's working directory is the checkout as it was before the mounts
            cmd = ["unshare", "--mount", "sh", "-euc", script + f'\ncd {REPO}\nexec "$@"', "sh", *cmd]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    summary = r.stdout.strip().splitlines()[-1:] or [""]
    passed = re.search(r"(\d+) passed", summary[0])
    assert r.returncode == 0 and passed and int(passed.group(1)) > 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert not re.search(r"\d+ (failed|error)", summary[0]), summary
