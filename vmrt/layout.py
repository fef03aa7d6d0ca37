"""Where a container's things live on disk (one owner for the names every layer uses).

Kept until ``vmrt rm``: ``<root>/containers/<id>/`` (:func:`container_dir`) holds its
config, the monitor's meta (:data:`META_NAME`, written by :func:`write_meta`), its json-file
log (:data:`LOG_NAME`, rotated beside it) and the VMM/console logs; a container's writable
layer is ``<root>/rw/<id>/`` (:func:`rw_dir`: a process container's upper dir, a VM
container's ``disk.img``, vm/disk.py). While it runs, its run
dir holds the attach socket (:data:`ATTACH_NAME`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

from . import fsmode
from .config import Config

LOG_NAME = "container.log"
META_NAME = "monitor.json"
VM_INFO_NAME = "vm.json"  # in a running VM container's run dir: its VM's source and RAM mode (inspect)
ATTACH_NAME = "attach.sock"
TTY_SIZE_NAME = "tty-size"  # a run dir's: the terminal size its monitor applies at SIGWINCH


def container_dir(cfg: Config, container_id: str) -> Path:
    """What is kept of a container until ``vmrt rm``: its config, logs, VMM/console logs."""
    return cfg.root / "containers" / container_id


def rw_dir(cfg: Config, container_id: str) -> Path:
    """A container's writable layer (on disk, like Docker's): a process container's upper and
    work dirs, a VM container's disk image (vm/disk.py)."""
    return cfg.root / "rw" / container_id


class Meta(TypedDict, total=False):
    """The monitor's meta (monitor.json): how a kept container is run again."""

    accel: str | None
    kernel: str | None
    runtime: str | None
    vm_driver: str              # VM mode: qemu or libvirt (drivers/libvirt.py); absent: qemu
    restart: str                # Docker's restart policy: no, on-failure[:N], always, unless-stopped
    rm: bool
    rm_deferred: bool           # AutoRemove through the API: its waiter removes it (containercmds.RunArgs)
    log: dict[str, str]         # json-file's options (vmrt/logfile.py: max-size, max-file)


def write_meta(cfg: Config, container_id: str, meta: Meta) -> None:
    """How to run the container again (accelerator, kernel, runtime, restart policy, --rm)."""
    cdir = container_dir(cfg, container_id)
    fsmode.private_dir(cdir)
    fsmode.write_private(cdir / META_NAME, json.dumps(meta))
