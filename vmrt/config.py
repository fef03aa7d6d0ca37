"""Where vmrt keeps things, and the knobs a user can turn.

Values come from, in increasing priority: built-in defaults, the TOML file
``/etc/vmrt/config.toml`` (or ``$VMRT_CONFIG``), ``VMRT_*`` environment
variables, and command-line flags (applied by the CLI).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

from .errors import UsageError

ISOLATIONS = ("vm", "process")
ISOLATION_ALIASES = {"vm": "vm", "hyperv": "vm", "process": "process"}


@dataclasses.dataclass
class Timeouts:
    """Seconds; every wait vmrt does is bounded by one of these."""

    agent_ready: float = 60.0     # QEMU spawned -> agent HELLO (slow under TCG)
    qmp_connect: float = 10.0     # QEMU spawned -> QMP greeting
    virtiofsd_ready: float = 10.0  # virtiofsd spawned -> its socket exists
    start: float = 60.0           # RUN sent -> STARTED/ERROR
    shutdown: float = 5.0         # QMP quit -> QEMU gone, before SIGKILL
    stop_grace: float = 10.0      # forwarded stop signal -> forced kill
    agent_ping: float = 5.0       # VM mode, container running: host PINGs the agent this often
    agent_dead: float = 20.0      # ... and nothing heard from it this long: the VM is hung (137)
    probe_exec: float = 5.0       # stats/top: an exec inside the container, start to end (a hung guest)


@dataclasses.dataclass
class Config:
    root: Path = Path("/var/lib/vmrt")      # images, state database
    run_root: Path = Path("/run/vmrt")       # per-container runtime dirs
    cache: Path = Path("/var/cache/vmrt")    # kernel and agent builds
    isolation: str = "vm"
    accel: str = "auto"
    machine: str = "microvm"
    memory_mib: int = 256
    tcg_tb_size_mib: int = 16                # TCG translation cache (MiB); 0 = QEMU default (1 GiB)
    cpus: float = 1.0
    qemu: str = "qemu-system-x86_64"
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"
    # virtiofsd's cache policy (always, none, auto); vmrt's auto is virtiofsd's always for a cold VM
    # whose share does not change while it runs (no bind volume, no user network), else auto
    virtiofs_cache: str = "auto"
    kernel: Path | None = None               # overrides the built kernel
    initrd: Path | None = None               # overrides the built agent initramfs
    kernel_cmdline: str = ""                 # appended to the guest kernel command line
    kernel_source: Path = Path("/usr/src/linux-source-6.1.tar.xz")
    runtime: str = "auto"                    # process mode OCI runtime: auto, runc, crun or a path
    vm_host_overhead_mib: int = 256          # host cgroup memory for QEMU+virtiofsd beyond guest RAM
    vm_storage_size: str = "10g"             # a VM container's disk without --storage-opt size= (0: a tmpfs in RAM)
    insecure_registries: str = ""            # comma-separated hosts pulled over plain HTTP
    # comma-separated mirror URLs tried in order for Docker Hub pulls (daemon.json registry-mirrors);
    # both checked by vmrt/images/mirrors.py where they are used (a pull, info)
    registry_mirrors: str = ""
    # any registry's mirrors, a TOML table: [mirrors] "registry.example:5000" = ["http://127.0.0.1:5001"]
    mirrors: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    push_chunk_size: int = 0                 # a push sends blobs larger than this in PATCH chunks of it (0: 16 MiB)
    platform: str = "linux/amd64"            # default platform picked from multi-arch images
    pool: str = "auto"                       # warm VM pool: auto (use it when `vmrt pool` runs) or off
    pool_size: int = 2                       # ready VMs the pool daemon keeps (`vmrt pool start --size`)
    # VM starts restore a snapshot of their shape: auto (and a run that finds none builds it in the
    # background), manual (only what `vmrt snapshot build` made) or off (every VM boots)
    snapshot: str = "auto"
    # a snapshot clone's guest RAM: shared (clones map the snapshot's RAM file copy-on-write, one
    # page cache for all: a cross-tenant side channel), private (each clone copies it) or auto
    # (shared where the QEMU can map it so: unjailed; a jailed QEMU 7.2 cannot, so private)
    vm_memory: str = "auto"
    network_subnet: str = "10.66.0.0/16"     # the default `bridge` network's addresses
    network_bridge: str = "vmrt0"            # ... and its bridge (made on first use, kept, as docker0)
    network_pool: str = "10.67.0.0/16"       # user networks get a /24 of this unless --subnet is given
    log_max_size: str = "20m"                # container logs: rotated at this size (--log-opt max-size)
    log_max_file: int = 5                    # ... keeping this many files (--log-opt max-file): bounded
    api_max_load: int = 16 << 30             # the API's POST /images/load: the largest archive (bytes)
    build_context_max: int = 16 << 30        # vmrt build - / POST /build: the context archive's files' sizes together
    vmm_jail: bool = True                    # QEMU unprivileged, sandboxed, chrooted (vm/jail.py); off: root
    jail_uid_base: int = 0x40000000          # a jailed QEMU's uid/gid: this + its PID (a reserved range)
    # who runs a container's VM: qemu (vmrt's own QEMU, jailed) or libvirt (a transient libvirt
    # domain through libvirt_uri: vmrt/drivers/libvirt.py); `vmrt run --vm-driver`, VMRT_VM_DRIVER
    vm_driver: str = "qemu"
    libvirt_uri: str = "qemu:///system"
    # the libvirt driver's per-domain dirs (kernel, initrd, disk link, channel sockets), each owned
    # by its domain's own QEMU uid; this dir is root's, searchable only (0711), on root's file system
    libvirt_dir: Path = Path("/var/lib/vmrt-libvirt")
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)

    @property
    def db_path(self) -> Path:
        return self.root / "state.db"

    @property
    def auth_file(self) -> Path:
        """Registry credentials (Docker's config.json "auths" format, mode 0600)."""
        env = os.environ.get("REGISTRY_AUTH_FILE")
        return Path(env) if env else self.root / "auth.json"

    def insecure(self, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
        return [h.strip() for h in [*self.insecure_registries.split(","), *extra] if h.strip()]


def normalize_isolation(value: str) -> str:
    v = value.strip().lower()
    if v in ("", "default"):
        return ""
    if v not in ISOLATION_ALIASES:
        raise UsageError(f"invalid isolation {value!r}: use vm, hyperv, process or default")
    return ISOLATION_ALIASES[v]


def _apply(cfg: Config, key: str, value: object) -> None:
    if key == "timeouts":
        if not isinstance(value, dict):
            raise UsageError("config: [timeouts] must be a table")
        for k, v in value.items():
            if not hasattr(cfg.timeouts, k):
                raise UsageError(f"config: unknown timeout {k!r}")
            setattr(cfg.timeouts, k, float(v))
        return
    if key == "mirrors":
        if not isinstance(value, dict) or not all(isinstance(v, list) and all(isinstance(u, str) for u in v)
                                                  for v in value.values()):
            raise UsageError('config: [mirrors] must be a table of URL lists: "host:port" = ["https://..."]')
        cfg.mirrors = {str(k): list(v) for k, v in value.items()}
        return
    field_types = {f.name: f.type for f in dataclasses.fields(Config)}
    if key not in field_types:
        raise UsageError(f"config: unknown setting {key!r}")
    cur = getattr(cfg, key)
    if key in ("kernel", "initrd"):
        setattr(cfg, key, Path(str(value)) if value else None)
    elif isinstance(cur, Path):
        setattr(cfg, key, Path(str(value)))
    elif isinstance(cur, bool):
        setattr(cfg, key, str(value).lower() in ("1", "true", "yes"))
    elif isinstance(cur, int):
        setattr(cfg, key, int(str(value)))
    elif isinstance(cur, float):
        setattr(cfg, key, float(str(value)))
    elif isinstance(value, list):
        setattr(cfg, key, ",".join(str(v) for v in value))
    else:
        setattr(cfg, key, str(value))


def load(env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ if env is None else env)
    cfg = Config()
    path = Path(env.get("VMRT_CONFIG", "/etc/vmrt/config.toml"))
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"config {path}: {e}") from e
        for k, v in data.items():
            _apply(cfg, k, v)
    for f in dataclasses.fields(Config):
        if f.name in ("timeouts", "mirrors"):  # tables: the file only
            continue
        v = env.get("VMRT_" + f.name.upper())
        if v is not None:
            try:
                _apply(cfg, f.name, v)
            except ValueError as e:
                raise UsageError(f"VMRT_{f.name.upper()}: {e}") from e
    for t in dataclasses.fields(Timeouts):
        v = env.get("VMRT_TIMEOUT_" + t.name.upper())
        if v is not None:
            try:
                setattr(cfg.timeouts, t.name, float(v))
            except ValueError as e:
                raise UsageError(f"VMRT_TIMEOUT_{t.name.upper()}: {e}") from e
    iso = normalize_isolation(cfg.isolation)
    cfg.isolation = iso or "vm"
    if cfg.snapshot not in ("auto", "manual", "off"):
        raise UsageError(f"snapshot {cfg.snapshot!r}: use auto, manual or off")
    check_vm_memory(cfg, cfg.vm_memory, "vm_memory")
    check_vm_driver(cfg.vm_driver, "vm_driver")
    check_paths(cfg)
    return cfg


VM_MEMORY = ("auto", "shared", "private")
VM_DRIVERS = ("qemu", "libvirt")


def check_vm_driver(value: str, what: str) -> None:
    """``vm_driver`` (or ``--vm-driver``): one of :data:`VM_DRIVERS`."""
    if value not in VM_DRIVERS:
        raise UsageError(f"{what} {value!r}: use qemu or libvirt")


def check_vm_memory(cfg: Config, value: str, what: str) -> None:
    """``vm_memory`` (or ``--vm-memory``): one of :data:`VM_MEMORY`; ``shared`` only unjailed."""
    if value not in VM_MEMORY:
        raise UsageError(f"{what} {value!r}: use auto, shared or private")
    if value == "shared" and cfg.vmm_jail:
        raise UsageError(f"{what} shared needs vmm_jail = false: a jailed QEMU cannot map a snapshot's RAM file "
                         "shared (QEMU 7.2 opens it read-write; its jail holds a private copy instead)")


def vm_memory(cfg: Config, requested: str | None) -> str:
    """What a snapshot clone gets: ``shared`` or ``private`` (``requested``: the run's
    ``--vm-memory``, else the setting; auto is shared unjailed, private jailed)."""
    want = requested or cfg.vm_memory
    if want == "auto":
        return "private" if cfg.vmm_jail else "shared"
    return want


# characters that would split or escape an option list these dirs' paths are put in: overlayfs's
# lowerdir=a:b,upperdir=, QEMU's -fsdev path=/mem-path= and virtiofsd's -o source= (commas),
# and /proc/self/mountinfo's escapes (whitespace, backslash), which vmrt compares mount points by
_OPTION_UNSAFE = frozenset(",:\\\x7f") | frozenset(map(chr, range(33)))


def check_paths(cfg: Config) -> None:
    """Refuse a state, run or cache dir whose path would break the option strings it is put in
    (one line, exit 125) rather than let it add or split options there."""
    for name in ("root", "run_root", "cache"):
        value = str(getattr(cfg, name))
        bad = sorted(set(value) & _OPTION_UNSAFE)
        if bad:
            raise UsageError(f"{name} {value!r} contains {bad[0]!r}: vmrt puts this path in mount and "
                             "QEMU/virtiofsd option lists, so it cannot hold whitespace, controls, ',', ':' or '\\'")
    if not cfg.virtiofs_cache.isalpha():
        raise UsageError(f"virtiofs_cache {cfg.virtiofs_cache!r}: use auto, always or none")
