"""What the pool keeps on disk, read by its daemon, its client and the lifecycle.

``<run_root>/pool/`` holds ``daemon.pid`` (PID and start ticks: a recycled PID is
never taken for the daemon), ``daemon.log`` and one directory per idle VM, whose
``pids.json`` marks its processes. A claimed VM's directory moves to
``<run dir>/vm`` with its marker, so whoever removes a container whose owner died
can still find and kill them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import cgroups, rootfs
from ..config import Config
from ..proc import kill_if_ours, start_ticks

SOCK_NAME = "pool.sock"
# how long `vmrt run` waits for a claim's reply before it cold-boots; the daemon's part of a claim
# stays well below it (daemon.SWAP_BUDGET), so a VM it hands out has a client waiting for it
CLAIM_TIMEOUT = 5.0


def pool_dir(cfg: Config) -> Path:
    return cfg.run_root / "pool"


def vm_marker_in(d: Path) -> tuple[str, dict[str, int]] | None:
    """The pooled VM whose directory ``d`` is: its id and its processes' PIDs."""
    try:
        rec = json.loads((d / "pids.json").read_text())
        return str(rec["id"]), {k: int(rec[k]) for k in ("qemu", "virtiofsd")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kill_marked(vmid: str, pids: dict[str, int]) -> None:
    """SIGKILL a pooled VM's processes if those PIDs still are theirs (their command lines name the VM)."""
    for pid in pids.values():
        kill_if_ours(pid, marks=[vmid.encode()])


def remove_vm_dir(d: Path, vmid: str) -> None:
    """An idle VM's directory, its mounts and its cgroup: gone."""
    rootfs.umount_all(d)
    shutil.rmtree(d, ignore_errors=True)
    cgroups.remove_tree(f"{cgroups.PARENT}/pool-{vmid}")


def clean_stale(cfg: Config) -> None:
    """Idle VMs a dead daemon left behind (a crash, a reboot): killed and removed."""
    d = pool_dir(cfg)
    if not d.is_dir():
        return
    for sub in d.iterdir():
        if sub.is_dir():
            if (m := vm_marker_in(sub)) is not None:
                kill_marked(*m)
            remove_vm_dir(sub, sub.name)


def daemon_pid(cfg: Config) -> int | None:
    """The running daemon's PID (its record names a live process with the same start ticks)."""
    try:
        rec = json.loads((pool_dir(cfg) / "daemon.pid").read_text())
        pid = int(rec["pid"])
        return pid if start_ticks(pid) == int(rec["ticks"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
