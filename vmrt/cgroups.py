"""Host cgroups, v1 (per-controller hierarchies, incl. "hybrid") and v2.

Process mode hands its limits to the OCI runtime (runc creates and removes
``<hierarchy>/vmrt/<id>``); vmrt only reads the OOM count from there. VM mode
has no runtime to do it: :class:`HostGroup` creates ``vmrt/<id>-vmm`` with the
limits that bound QEMU and virtiofsd on the host, and removes it at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from .errors import LaunchError

ROOT = Path("/sys/fs/cgroup")
# the parent of every container cgroup; VMRT_CGROUP_PARENT (letters, digits, '-', '_') moves it,
# so that test runs side by side never see each other's cgroups
PARENT = os.environ.get("VMRT_CGROUP_PARENT", "vmrt")
if not PARENT or not all(c.isalnum() or c in "-_" for c in PARENT):
    PARENT = "vmrt"
CONTROLLERS = ("memory", "cpu", "pids")


def is_v2(root: Path = ROOT) -> bool:
    """True on a pure cgroup v2 host (unified hierarchy mounted at the root)."""
    return (root / "cgroup.controllers").exists()


def runtime_path(container_id: str) -> str:
    """The OCI ``linux.cgroupsPath`` of a process-mode container."""
    return f"/{PARENT}/{container_id}"


def dirs(rel: str, root: Path = ROOT) -> list[Path]:
    """Every directory a cgroup path names (one on v2, one per controller on v1)."""
    rel = rel.strip("/")
    if is_v2(root):
        return [root / rel]
    return [root / c / rel for c in CONTROLLERS if (root / c).is_dir()]


def oom_kills(rel: str, root: Path = ROOT) -> int:
    """The OOM-kill count of a cgroup's memory controller (0 if unknown)."""
    rel = rel.strip("/")
    f = root / rel / "memory.events" if is_v2(root) else root / "memory" / rel / "memory.oom_control"
    try:
        text = f.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == "oom_kill" and v.strip().isdigit():
            return int(v)
    return 0


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise LaunchError(f"cgroup {path}: {e.strerror}") from None


class HostGroup:
    """A cgroup for the host processes that serve one VM container."""

    def __init__(self, name: str, *, memory_bytes: int | None, cpus: float | None,
                 pids: int | None, root: Path = ROOT) -> None:
        self.rel = f"{PARENT}/{name}"
        self.root = root
        self.v2 = is_v2(root)
        self.memory_bytes, self.cpus, self.pids = memory_bytes, cpus, pids
        self.created: list[Path] = []

    def create(self) -> None:
        if self.v2:
            parent = self.root / PARENT
            parent.mkdir(exist_ok=True)
            avail = set((self.root / "cgroup.controllers").read_text().split())
            want = " ".join(f"+{c}" for c in CONTROLLERS if c in avail)
            for d in (self.root, parent):
                _write(d / "cgroup.subtree_control", want)
        for d in dirs(self.rel, self.root):
            d.mkdir(parents=True, exist_ok=True)
            self.created.append(d)
        self._limits()

    def _limits(self) -> None:
        mem, period = self.memory_bytes, 100000
        quota = int(self.cpus * period) if self.cpus else None
        if self.v2:
            d = self.root / self.rel
            if mem:
                _write(d / "memory.max", str(mem))
            if quota:
                _write(d / "cpu.max", f"{quota} {period}")
            if self.pids:
                _write(d / "pids.max", str(self.pids))
            return
        for d in self.created:
            ctrl = d.relative_to(self.root).parts[0]
            if ctrl == "memory" and mem:
                _write(d / "memory.limit_in_bytes", str(mem))
            elif ctrl == "cpu" and quota:
                _write(d / "cpu.cfs_period_us", str(period))
                _write(d / "cpu.cfs_quota_us", str(quota))
            elif ctrl == "pids" and self.pids:
                _write(d / "pids.max", str(self.pids))

    def add(self, pid: int) -> None:
        for d in self.created:
            _write(d / "cgroup.procs", str(pid))

    def procs_files(self) -> list[Path]:
        """Where a process writes its PID to join (a jailed VMM does, before it charges anything)."""
        return [d / "cgroup.procs" for d in self.created]

    def take_over(self, old: str) -> None:
        """The cgroup ``PARENT/old`` (a pooled VM's) becomes this one: renamed, so that its
        processes and the memory they charged stay in it (a process moved to another cgroup
        leaves its charges behind), then given this group's limits. This group's own (empty)
        directories, if created, make room first."""
        for d in self.created:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d)
        self.created = []
        for d in dirs(f"{PARENT}/{old}", self.root):
            target = d.parent / Path(self.rel).name
            try:
                os.rename(d, target)
            except OSError as e:
                raise LaunchError(f"cgroup {d}: {e.strerror}") from None
            self.created.append(target)
        self._limits()

    def oom_kills(self) -> int:
        return oom_kills(self.rel, self.root)

    def remove(self) -> None:
        """rmdir every directory; waits (bounded) for exiting members to leave."""
        for d in self.created:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    _kill_members(d)
                    time.sleep(0.02)
        self.created = [d for d in self.created if d.exists()]


def members(rel: str, root: Path = ROOT) -> set[int]:
    """The PIDs in a cgroup (every hierarchy it exists in, on v1)."""
    rel = rel.strip("/")
    found = [root / rel] if is_v2(root) else [h / rel for h in root.iterdir() if h.is_dir() and not h.is_symlink()]
    pids: set[int] = set()
    for d in found:
        with contextlib.suppress(OSError):
            pids |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
    return pids


def _kill_members(d: Path) -> None:
    with contextlib.suppress(OSError):
        for line in (d / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line), signal.SIGKILL)


def remove_tree(rel: str, root: Path = ROOT) -> None:
    """Best-effort removal of a container's leftover cgroup dirs (``vmrt rm``, reconciliation).

    On v1 every mounted hierarchy is searched, not only the controllers vmrt
    sets limits with: the OCI runtime creates the container's cgroup in all of
    them (blkio, cpuset, devices, freezer, ...), and if its state is lost (a
    reboot, a killed runtime) nobody else removes them.
    """
    rel = rel.strip("/")
    found = [root / rel] if is_v2(root) else [h / rel for h in root.iterdir() if h.is_dir() and not h.is_symlink()]
    for d in found:
        for _ in range(100):  # bounded: killed members take a moment to leave
            if not d.is_dir():
                break
            _kill_members(d)
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
