"""What the commands about vmrt itself and this host do: info, check isolation, kernel and
agent builds, setup, and the VM sources' commands (the warm pool, snapshots).

The CLI (:mod:`vmrt.cli.system`) prints what these return. The modules they drive (the
builds, the pool, snapshots, probes) are imported on use: none is on `vmrt run`'s path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from . import __version__, cgroups, formatting, fsmode
from . import config as config_mod
from .config import Config
from .errors import StateError, UsageError, VmrtError
from .images import mirrors
from .images.store import Store
from .paths import source_root
from .proc import connect_unix


# --- info, check ---------------------------------------------------------------------------
def _runtime_line(cfg: Config) -> str:
    from .drivers.process import choose_runtime  # on use: a VM run never loads the process driver
    try:
        rt = choose_runtime(cfg.runtime)
    except VmrtError as e:
        return f"missing ({e})"
    out = subprocess.run([rt, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    cg = "v2" if cgroups.is_v2() else "v1"
    return f"{rt} ({out[0] if out else 'unknown version'}; setting {cfg.runtime}; cgroup {cg})"


def _clone_memory_line(cfg: Config) -> str:
    mode = config_mod.vm_memory(cfg, None)
    why = f"vm_memory={cfg.vm_memory}" + (", jailed QEMU" if cfg.vmm_jail else ", vmm_jail=false")
    if mode == "private":
        return f"private: each clone copies the snapshot's RAM, no pages shared across containers ({why})"
    return (f"shared: clones map one RAM file copy-on-write, its page cache shared across containers: "
            f"a side channel ({why}; --vm-memory=private per run)")


def info(cfg: Config) -> list[str]:
    """``vmrt info``: the accelerator, component versions, kernel and state directories."""
    # on use: the VM's build modules are not on a process run's path
    from . import agentbuild
    from . import kernel as kernel_mod  # on use: not on a process run's path
    from .vm import accel as accel_mod  # on use: not on a process run's path

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"
    acc = accel_mod.choose(cfg.accel, user_kernel=cfg.kernel is not None)
    try:
        kpath, kid = kernel_mod.find(cfg)
        kline, kidline = str(kpath), kid
    except VmrtError as e:
        kline, kidline = f"missing ({e})", "-"
    try:
        initrd = str(agentbuild.find(cfg))
    except VmrtError as e:
        initrd = f"missing ({e})"
    rows = [
        ("vmrt", __version__),
        ("Default isolation", cfg.isolation),
        ("Accelerator", f"{acc.name} ({acc.reason}; host /dev/kvm: {acc.host_kind})"),
        ("Machine", cfg.machine),
        ("QEMU", f"{shutil.which(cfg.qemu) or cfg.qemu}: {version([cfg.qemu, '--version'])}"),
        ("virtiofsd", f"{cfg.virtiofsd}: {version([cfg.virtiofsd, '--version'])}"),
        ("Process runtime", _runtime_line(cfg)),
        ("Kernel", kline),
        ("Kernel build id", kidline),
        ("Agent initramfs", initrd),
        ("VM cache", f"snapshot={cfg.snapshot}, pool={cfg.pool}"),
        ("Clone memory", _clone_memory_line(cfg)),
        ("State directory", str(cfg.root)),
        ("Run directory", str(cfg.run_root)),
        ("Cache directory", str(cfg.cache)),
        ("Registry mirrors", "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in mirrors.from_config(cfg).items())
         or "none"),
        ("Timeouts (s)", ", ".join(f"{k}={v:g}" for k, v in vars(cfg.timeouts).items())),
    ]
    return [f"{k + ':':<20} {v}" for k, v in rows]


def check_isolation(cfg: Config, image: str, *, fmt: str) -> str:
    """``vmrt check isolation``: the probes' results of both modes, as a table or JSON."""
    from . import probes  # on use: not on `vmrt run`'s path
    if os.geteuid() != 0:
        raise UsageError("vmrt check isolation needs root (it runs containers)")
    from . import agentbuild  # on use: the VM's build modules are not on a process run's path
    result = probes.run_probes(image, None, str(cfg.root), str(cfg.run_root), cfg.jail_uid_base,
                               agentbuild.enosys_probe(cfg))
    return json.dumps(result, indent=1) if fmt == "json" else probes.table(result)


# --- builds ----------------------------------------------------------------------------------
def kernel_build(cfg: Config, *, force: bool, jobs: int | None) -> str:
    """``vmrt kernel build``: the guest kernel's path."""
    from . import kernel as kernel_mod  # on use: the VM's build modules are not on a process run's path
    out = kernel_mod.build(cfg, force=force, jobs=jobs)
    return str(out / "vmlinux")


def agent_build(cfg: Config, *, force: bool) -> str:
    """``vmrt agent build``: the agent initramfs' path."""
    from . import agentbuild  # on use: the VM's build modules are not on a process run's path
    out = agentbuild.build(cfg, force=force)
    return str(out / "initramfs.cpio")


def setup(cfg: Config) -> Iterator[str]:
    """``vmrt setup``: the kernel, the agent and the project's images built (or found in the
    caches); a line for each image as it is built."""
    # on use: the VM's build modules are not on a process run's path
    from . import agentbuild
    from . import kernel as kernel_mod  # on use: not on a process run's path
    from .images import recipe as recipe_mod  # on use: not on `vmrt run`'s path
    kernel_mod.build(cfg)
    agentbuild.build(cfg)
    if cfg.snapshot != "off":  # the cache a default VM-mode run restores (issue 17)
        yield f"[snapshot] {snapshot_build(cfg, force=False)}"
    store = Store(cfg.root)
    for r in sorted((source_root() / "images").glob("*/recipe.toml")):
        yield f"[image] {recipe_mod.build(r.parent, store, cfg.cache)}"


# --- pool ------------------------------------------------------------------------------------
def pool_status(cfg: Config, *, fmt: str | None) -> list[str]:
    """``vmrt pool``: the pool daemon's status, one row."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    if pool_mod.daemon_pid(cfg) is None:
        row = {"Running": False, "Pid": 0, "Size": 0, "Ready": 0, "Booting": 0, "Served": 0, "Shape": "",
               "LastError": ""}
    else:
        st, _ = pool_mod.request(cfg, {"op": "status"}, timeout=10.0)
        shape = st.get("shape") or {}
        row = {"Running": True, "Pid": st.get("pid"), "Size": st.get("size"), "Ready": st.get("ready"),
               "Booting": st.get("booting"), "Served": st.get("served"),
               "Shape": f"{shape.get('memory_mib')}MiB {shape.get('vcpus')}vcpu {shape.get('machine')} "
                        f"{shape.get('accel')}" if shape else "", "LastError": st.get("last_error", "")}
    return formatting.emit(fmt, [row], [("RUNNING", "Running", 7), ("PID", "Pid", 3), ("SIZE", "Size", 4),
                                        ("READY", "Ready", 5), ("BOOTING", "Booting", 7),
                                        ("SERVED", "Served", 6), ("SHAPE", "Shape", 5)])


def pool_start(cfg: Config, *, size: int | None) -> str:
    """``vmrt pool start``: the daemon started in the background, keeping ``size`` VMs booted."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    pid = pool_mod.start(cfg, cfg.pool_size if size is None else size)
    return f"pool daemon started (pid {pid}, size {cfg.pool_size if size is None else size})"


def pool_serve(cfg: Config, *, size: int | None) -> int:
    """``vmrt pool serve``: the pool daemon, in this process; its exit status."""
    from .pool.daemon import Daemon  # on use: the daemon's modules are on no other command's path
    return Daemon(cfg, cfg.pool_size if size is None else size).serve()


def pool_fill(cfg: Config, *, size: int | None, wait: bool, timeout: float) -> str:
    """``vmrt pool fill``: set the pool's size (if given), and wait until that many VMs are ready."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    if pool_mod.daemon_pid(cfg) is None:
        raise StateError("the pool daemon is not running: start it with `vmrt pool start`")
    st, _ = pool_mod.request(cfg, {"op": "fill", "size": size, "wait": wait, "timeout": timeout},
                             timeout=timeout + 10)
    if wait and not st.get("ok"):
        raise VmrtError(f"the pool has {st.get('ready')} of {st.get('size')} VMs ready"
                        + (f": {st['last_error']}" if st.get("last_error") else ""))
    return f"{st.get('ready')} of {st.get('size')} VMs ready"


def pool_drain(cfg: Config) -> str:
    """``vmrt pool drain``: the idle VMs killed, no refill (size 0)."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    if pool_mod.daemon_pid(cfg) is None:
        raise StateError("the pool daemon is not running")
    pool_mod.request(cfg, {"op": "drain"})
    return "pool drained"


def pool_stop(cfg: Config) -> str:
    """``vmrt pool stop``."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    return "pool daemon stopped" if pool_mod.stop(cfg) else "the pool daemon was not running"


# --- snapshot --------------------------------------------------------------------------------
def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512  # a sparse file: what it holds, not its length
    except OSError:
        return 0


def snapshot_build(cfg: Config, *, force: bool, memory_mib: int | None = None, cpus: int | None = None) -> str:
    """``vmrt snapshot build``: the snapshot's directory and size."""
    from . import snapshot as snap_mod  # on use: the snapshot modules are not on a process run's path
    snap = snap_mod.build(cfg, force=force, memory_mib=memory_mib, cpus=cpus)
    return f"{snap.dir} ({(snap.meta['size'] + _allocated(snap.ram)) >> 20} MiB)"


def snapshot_ls(cfg: Config, *, fmt: str | None) -> list[str]:
    """``vmrt snapshot ls``' lines."""
    from . import snapshot as snap_mod  # on use: the snapshot modules are not on a process run's path
    rows = [{"Key": s.dir.name, "Shape": f"{s.meta['shape']['memory_mib']}MiB {s.meta['shape']['vcpus']}vcpu "
                                         f"{s.meta['shape']['machine']} {s.meta['shape']['accel']}",
             "Size": f"{(s.meta['size'] + _allocated(s.ram)) / 2 ** 20:.1f}MiB", "Qemu": s.meta.get("qemu", ""),
             "Created": formatting.ago(time.time() - s.meta.get("created", 0))}
            for s in snap_mod.listing(cfg)]
    return formatting.emit(fmt, rows, [("KEY", "Key", 16), ("SHAPE", "Shape", 5), ("SIZE", "Size", 4),
                                       ("CREATED", "Created", 7)])


def snapshot_rm(cfg: Config) -> str:
    """``vmrt snapshot rm``: every snapshot removed."""
    from . import snapshot as snap_mod  # on use: the snapshot modules are not on a process run's path
    return f"removed {snap_mod.remove_all(cfg)} snapshot(s)"


# --- the API service and Compose ------------------------------------------------------------
SERVICE_IDLE = 600  # seconds: a service `vmrt compose` started stops after so long without a request
COMPOSE = "docker-compose"


def api_socket(cfg: Config) -> Path:
    """The API service's default socket: ``<run root>/docker.sock`` (/run/vmrt/docker.sock)."""
    return cfg.run_root / "docker.sock"


def socket_answers(path: Path) -> bool:
    """Whether a service accepts connections on the unix socket ``path``."""
    try:
        connect_unix(path.parent, path.name, timeout=1.0).close()
    except (OSError, ValueError):  # ValueError: no file name in it
        return False
    return True


def ensure_service(cfg: Config, timeout: float = 30.0) -> Path:
    """The socket of a running API service: the one answering on the default socket, else one
    started now in the background (its own session; it stops after SERVICE_IDLE seconds without
    a request; its output in ``<run root>/api.log``)."""
    sock = api_socket(cfg)
    if socket_answers(sock):
        return sock
    if os.geteuid() != 0:
        raise UsageError("no vmrt API service answers on " + str(sock) + ", and starting one needs root")
    cfg.run_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = cfg.run_root / "api.log"
    with open(log, "ab", opener=fsmode.opener) as out:
        proc = subprocess.Popen([sys.executable, "-m", "vmrt", "system", "service", "--socket", str(sock),
                                 "--time", str(SERVICE_IDLE)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True)
    fsmode.write_private(cfg.run_root / "api.pid", f"{proc.pid}\n")  # who started it, for its stop
    deadline = time.monotonic() + timeout
    while not socket_answers(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            tail = log.read_bytes()[-2000:].decode(errors="replace").strip().splitlines()
            raise VmrtError(f"the API service did not start ({tail[-1] if tail else 'see ' + str(log)})")
        time.sleep(0.05)
    return sock


def compose(cfg: Config, args: tuple[str, ...]) -> int:
    """``vmrt compose ARGS``: Debian's docker-compose against vmrt's API service (started if none
    answers). Returns only if docker-compose cannot be run (it replaces this process)."""
    binary = shutil.which(COMPOSE)
    if binary is None:
        raise VmrtError(f"{COMPOSE} is not installed (setup.sh installs Debian's docker-compose)", exit_code=127)
    sock = ensure_service(cfg)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    for key in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"):  # vmrt's socket, nothing else
        env.pop(key, None)
    try:
        os.execve(binary, [binary, *args], env)
    except OSError as e:
        raise VmrtError(f"cannot run {binary}: {e.strerror}", exit_code=126) from None
