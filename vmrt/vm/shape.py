"""A VM's shape: what it is booted with, the key of the warm pool and of snapshots.

A container takes a pooled VM, or restores a snapshot, only of exactly its shape. Both
the pool (vmrt/pool/) and the snapshots (vmrt/snapshot.py) use it; the pool restores its
VMs from the snapshot of their shape where there is one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import agentbuild, kernel
from ..config import Config
from . import accel as accel_mod
from .qemu import VMSpec


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a VM is booted with (memory, vCPUs, machine, kernel, initramfs, accelerator, command line)."""

    memory_mib: int
    vcpus: int
    machine: str
    kernel: str
    initrd: str
    accel: str
    cmdline: str
    nic: bool = True   # a virtio-net NIC backed by a tap (every vmrt VM has one)
    disk: bool = True  # a virtio-blk disk, the writable layer (vm/disk.py; every vmrt VM has one)

    @classmethod
    def of(cls, spec: VMSpec) -> Shape:
        return cls(spec.memory_mib, spec.vcpus, spec.machine, str(spec.kernel), str(spec.initrd),
                   spec.accel.name, spec.extra_cmdline)


def default_spec(cfg: Config, share_socket: Path, name: str) -> VMSpec:
    """The VM a container without -m/--cpus/--kernel gets: what the pool boots and snapshots save."""
    kernel_path, _ = kernel.find(cfg)
    acc = accel_mod.choose(cfg.accel, user_kernel=cfg.kernel is not None)
    return VMSpec(kernel=kernel_path, initrd=agentbuild.find(cfg), virtiofs_socket=share_socket,
                  memory_mib=cfg.memory_mib, cpus=cfg.cpus, accel=acc, machine=cfg.machine, name=name,
                  extra_cmdline=cfg.kernel_cmdline)
