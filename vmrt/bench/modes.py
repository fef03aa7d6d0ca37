"""The ways of running a container that the bench compares: vmrt's modes (process, vm-cold,
vm-pool, vm-snapshot, vm-default) and the runc and podman baselines, each behind one small interface."""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .. import cgroups
from ..bundle import RunOptions, make_config, write
from ..config import Config
from ..images.store import Store
from ..stats import cgroup_procs
from .errors import BenchError
from .procs import Procs
from .sampling import with_descendants

MODES = ("process", "vm-cold", "vm-pool", "vm-snapshot", "vm-default", "vm-q35", "vm-libvirt", "runc", "podman")
PODMAN_RUN = ["podman", "run", "--runtime", "/usr/sbin/runc", "--ulimit", "nofile=1024:1024",
              "--ulimit", "nproc=1024:1024", "--network", "none"]


class BenchContext(Protocol):
    """What a mode uses of the bench that runs it (metrics.Bench is one): its settings, the
    children it tracks and the container names it made; so modes need not import the bench."""

    cfg: Config
    env: dict[str, str]
    vmrt: list[str]
    image: str
    network: str
    tag: str
    pool_size: int
    procs: Procs
    vmrt_names: set[str]
    runtime: str
    runtime_version: str
    podman_version: str
    vm_setup: dict[str, Any]
    say: Callable[[str], None]


class Mode:
    """One way of running a container. Handles are what ``idle`` returns (an ID or name)."""

    name = ""
    skipped: str | None = None  # why this mode is not measured at all

    def __init__(self, bench: BenchContext) -> None:
        self.b = bench
        self.env = dict(bench.env)

    def setup(self) -> dict[str, Any]:
        return {"isolation": "namespaces", "accelerator": "none (host kernel)"}

    def command(self) -> str:
        """The start command, as recorded."""
        return shlex.join(self.start_cmd(0)[0])

    def start_cmd(self, slot: int) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def script_cmd(self, script: str, args: list[str]) -> list[str]:
        raise NotImplementedError

    def idle(self, n: int) -> str:
        raise NotImplementedError

    def exec_cmd(self, handle: str) -> list[str]:
        raise NotImplementedError

    def host_pids(self, handle: str, table: dict[int, tuple[int, str]]) -> set[int]:
        raise NotImplementedError

    def remove(self, handles: list[str]) -> None:
        raise NotImplementedError

    def before_start(self) -> None:
        """Called (untimed) before every timed start."""

    def close(self) -> None:
        pass


class Skipped(Mode):
    def __init__(self, bench: BenchContext, name: str, reason: str) -> None:
        super().__init__(bench)
        self.name, self.skipped = name, reason


class VmrtMode(Mode):
    def __init__(self, bench: BenchContext, name: str) -> None:
        super().__init__(bench)
        self.name = name
        self.iso = "process" if name == "process" else "vm"
        if name == "vm-cold":
            self.env["VMRT_POOL"] = "off"
            self.env["VMRT_SNAPSHOT"] = "off"
        elif name == "vm-snapshot":
            self.env["VMRT_POOL"] = "off"
        elif name == "vm-pool":
            self.env.pop("VMRT_POOL", None)
        elif name == "vm-default":  # what a user gets with no extra command: no pool, the snapshot cache
            self.env.pop("VMRT_POOL", None)
            self.env.pop("VMRT_SNAPSHOT", None)
        elif name in ("vm-q35", "vm-libvirt"):  # cold boots on q35: vmrt's QEMU, and a libvirt domain
            self.env.update(VMRT_POOL="off", VMRT_SNAPSHOT="off", VMRT_MACHINE="q35")
        if self.iso == "vm":  # every VM mode but vm-libvirt is vmrt's own QEMU, whatever vm_driver says
            self.env["VMRT_VM_DRIVER"] = "libvirt" if name == "vm-libvirt" else "qemu"

    def setup(self) -> dict[str, Any]:
        if self.iso == "process":
            return {"isolation": "namespaces", "accelerator": "none (host kernel)", "runtime": self.b.runtime,
                    "network": self.b.network}
        cached = self.name in ("vm-snapshot", "vm-default")
        if self.name in ("vm-q35", "vm-libvirt"):
            return {"isolation": "vm", **self.b.vm_setup, "machine": "q35", "pool": False, "snapshot": False,
                    "share": "virtio-fs", "network": self.b.network,
                    "vm_driver": f"libvirt ({self.b.cfg.libvirt_uri})" if self.name == "vm-libvirt" else "qemu"}
        return {"isolation": "vm", **self.b.vm_setup, "pool": self.name == "vm-pool", "snapshot": cached,
                **({"cache": "default (snapshot = auto, warmed by one run)"} if self.name == "vm-default" else {}),
                "share": "9p" if cached else "virtio-fs", "network": self.b.network}

    def base(self) -> list[str]:
        return [*self.b.vmrt, "run", "--rm", f"--isolation={self.iso}", "--network", self.b.network]

    def start_cmd(self, slot: int) -> tuple[list[str], dict[str, str]]:
        return [*self.base(), "--timings", self.b.image, "true"], self.env

    def script_cmd(self, script: str, args: list[str]) -> list[str]:
        return [*self.base(), self.b.image, "sh", "-c", script, "sh", *args]

    def idle(self, n: int) -> str:
        name = f"{self.b.tag}-{self.name}-{n}"
        self.b.vmrt_names.add(name)
        r = self.b.procs.run([*self.b.vmrt, "run", "-d", "--name", name, f"--isolation={self.iso}",
                              "--network", self.b.network, self.b.image, "sleep", "600"], env=self.env)
        if r.rc != 0:
            raise BenchError(r.error(f"vmrt run -d --isolation={self.iso}"))
        return r.out.strip().splitlines()[-1]

    def exec_cmd(self, handle: str) -> list[str]:
        return [*self.b.vmrt, "exec", handle, "true"]

    def host_pids(self, handle: str, table: dict[int, tuple[int, str]]) -> set[int]:
        # the monitor (and what it runs), and the VM's QEMU: a libvirt domain's is libvirtd's child
        r = self.b.procs.run([*self.b.vmrt, "inspect", "-f", "{{.State.MonitorPid}} {{.State.Pid}}", handle],
                             env=self.env)
        roots = {int(x) for x in r.out.split() if x.isdigit() and x != "0"} if r.rc == 0 else set()
        for rel in (cgroups.runtime_path(handle), f"/{cgroups.PARENT}/{handle}-vmm"):
            roots |= set(cgroup_procs(rel))
        if not roots:
            raise BenchError(f"no host process found for container {handle[:12]}")
        return with_descendants(roots, table)

    def remove(self, handles: list[str]) -> None:
        if handles:
            self.b.procs.run([*self.b.vmrt, "rm", "-f", *handles], env=self.env)


class PoolMode(VmrtMode):
    """vm-pool: `vmrt pool start --size K` before, refilled before every start, stopped after."""

    def __init__(self, bench: BenchContext) -> None:
        super().__init__(bench, "vm-pool")
        self.started = False

    def start_pool(self) -> None:
        if self.started:
            return
        r = self.b.procs.run([*self.b.vmrt, "pool", "start", "--size", str(self.b.pool_size)], env=self.env)
        if r.rc != 0:
            raise BenchError(r.error("vmrt pool start"))
        self.started = True
        self.before_start()

    def before_start(self) -> None:
        r = self.b.procs.run([*self.b.vmrt, "pool", "fill", str(self.b.pool_size), "--wait"], env=self.env)
        if r.rc != 0:
            raise BenchError(r.error("vmrt pool fill --wait"))

    def close(self) -> None:
        if self.started:
            self.started = False
            r = self.b.procs.run([*self.b.vmrt, "pool", "stop"], env=self.env)
            if r.rc != 0:
                self.b.say(f"warning: {r.error('vmrt pool stop')}")


class RuncMode(Mode):
    """runc run of the config.json vmrt writes for the image (rootfs copied out; no vmrt involved)."""

    name = "runc"

    def __init__(self, bench: BenchContext, runc: str) -> None:
        super().__init__(bench)
        self.runc = runc
        self.dir = Path(tempfile.mkdtemp(prefix="vmrt-bench-runc-"))
        self.state = self.dir / "state"
        self.rootfs = self.dir / "rootfs"
        self.bundles: dict[tuple[tuple[str, ...], int], Path] = {}
        self.counter = 0
        self.lock = threading.Lock()
        self.image_cfg: dict[str, Any] = {}

    def prepare(self) -> None:
        img = Store(self.b.cfg.root).get(self.b.image)
        for layer in img.layer_dirs():  # whiteouts are not applied: fine for single-layer images
            shutil.copytree(layer, self.rootfs, symlinks=True, dirs_exist_ok=True)
        self.image_cfg = img.runtime_config

    def setup(self) -> dict[str, Any]:
        return {"isolation": "namespaces", "accelerator": "none (host kernel)", "runtime": self.b.runtime_version,
                "rootfs": "plain directory (no overlay)"}

    def bundle(self, args: list[str], slot: int) -> Path:
        key = (tuple(args), slot)
        with self.lock:
            if key not in self.bundles:
                d = self.dir / f"bundle-{len(self.bundles)}"
                conf = make_config(self.image_cfg, self.rootfs, RunOptions(image=self.b.image, command=args),
                                   "0" * 64, "process")
                conf["root"]["path"] = str(self.rootfs)
                conf["linux"]["cgroupsPath"] = f"/{self.b.tag}-runc-{len(self.bundles)}"
                write(d, conf)
                self.bundles[key] = d
            return self.bundles[key]

    def new_id(self) -> str:
        with self.lock:
            self.counter += 1
            return f"{self.b.tag}-{self.counter}"

    def start_cmd(self, slot: int) -> tuple[list[str], dict[str, str]]:
        return [self.runc, "--root", str(self.state), "run", "--bundle", str(self.bundle(["true"], slot)),
                self.new_id()], self.env

    def command(self) -> str:
        return f"{self.runc} run --bundle B ID (B: the config.json vmrt writes for {self.b.image})"

    def script_cmd(self, script: str, args: list[str]) -> list[str]:
        return [self.runc, "--root", str(self.state), "run", "--bundle",
                str(self.bundle(["sh", "-c", script, "sh", *args], 0)), self.new_id()]

    def idle(self, n: int) -> str:
        cid = self.new_id()
        r = self.b.procs.run([self.runc, "--root", str(self.state), "run", "-d", "--bundle",
                              str(self.bundle(["sleep", "600"], n)), cid], env=self.env, detach_stdio=True)
        if r.rc != 0:
            raise BenchError(r.error("runc run -d"))
        return cid

    def exec_cmd(self, handle: str) -> list[str]:
        return [self.runc, "--root", str(self.state), "exec", handle, "true"]

    def host_pids(self, handle: str, table: dict[int, tuple[int, str]]) -> set[int]:
        r = self.b.procs.run([self.runc, "--root", str(self.state), "state", handle])
        if r.rc != 0:
            raise BenchError(r.error("runc state"))
        return with_descendants({int(json.loads(r.out)["pid"])}, table)

    def remove(self, handles: list[str]) -> None:
        for h in handles:
            self.b.procs.run([self.runc, "--root", str(self.state), "delete", "-f", h])

    def close(self) -> None:
        if self.state.is_dir():
            left = [p.name for p in self.state.iterdir() if p.is_dir()]
            self.remove(left)
        shutil.rmtree(self.dir, ignore_errors=True)


class PodmanMode(Mode):
    name = "podman"

    def __init__(self, bench: BenchContext, image: str) -> None:
        super().__init__(bench)
        self.image = image
        self.names: list[str] = []

    def setup(self) -> dict[str, Any]:
        return {"isolation": "namespaces", "accelerator": "none (host kernel)", "runtime": "podman + runc",
                "podman": self.b.podman_version, "network": "none"}

    def start_cmd(self, slot: int) -> tuple[list[str], dict[str, str]]:
        return [*PODMAN_RUN, "--rm", self.image, "true"], self.env

    def script_cmd(self, script: str, args: list[str]) -> list[str]:
        return [*PODMAN_RUN, "--rm", self.image, "sh", "-c", script, "sh", *args]

    def idle(self, n: int) -> str:
        name = f"{self.b.tag}-podman-{n}"
        self.names.append(name)
        r = self.b.procs.run([*PODMAN_RUN, "-d", "--name", name, self.image, "sleep", "600"], env=self.env)
        if r.rc != 0:
            raise BenchError(r.error("podman run -d"))
        return name

    def exec_cmd(self, handle: str) -> list[str]:
        return ["podman", "exec", handle, "true"]

    def host_pids(self, handle: str, table: dict[int, tuple[int, str]]) -> set[int]:
        r = self.b.procs.run(["podman", "inspect", "-f", "{{.State.ConmonPid}} {{.State.Pid}}", handle])
        if r.rc != 0:
            raise BenchError(r.error("podman inspect"))
        return with_descendants({int(x) for x in r.out.split() if x.isdigit() and x != "0"}, table)

    def remove(self, handles: list[str]) -> None:
        if handles:
            self.b.procs.run(["podman", "rm", "-f", "-t", "0", *handles])
            self.names = [n for n in self.names if n not in handles]

    def close(self) -> None:
        self.remove(list(self.names))
