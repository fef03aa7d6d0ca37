"""The OCI runtime bundle every isolation driver consumes.

``prepare()`` turns an image config plus ``docker run`` style options into an
OCI runtime-spec ``config.json`` (process, user, env, cwd, hostname, mounts,
namespaces, resources) in a bundle directory. The VM driver translates that
config into an agent RUN message; the process driver (runc) reads it as is.
User and group names are resolved from the image's own /etc/passwd and
/etc/group, read inside the image root (symlinks cannot point outside it) by
:mod:`vmrt.safefs`: only a regular file is opened, and read bounded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from . import cgroups, fsmode, healthstate, kernel, safefs, seccomp
from .errors import ImageError, UsageError
from .network import NetRequest, image_exposed
from .ocispec import Spec
from .volumes import Mount

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
MASKED = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
          "/sys/firmware", "/sys/devices/virtual/powercap"]
CAP_NUMBERS = {name: i for i, name in enumerate((
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"))}


def cap_mask(names: list[str]) -> int:
    mask = 0
    for n in names:
        if n not in CAP_NUMBERS:
            raise UsageError(f"unknown capability {n!r}")
        mask |= 1 << CAP_NUMBERS[n]
    return mask


READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
_ENV_KEY = re.compile(r"^[^=\0]+$")


@dataclasses.dataclass
class RunOptions:
    image: str
    command: list[str] = dataclasses.field(default_factory=list)
    entrypoint: str | None = None
    env: list[str] = dataclasses.field(default_factory=list)
    env_files: list[Path] = dataclasses.field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    interactive: bool = False
    stdin_once: bool = False  # the first attach's EOF closes stdin (Docker's StdinOnce; the API's)
    healthcheck: dict[str, Any] | None = None  # the run's Healthcheck fields, over the image's
    tty: bool = False
    tty_size: tuple[int, int] = (24, 80)
    memory_bytes: int | None = None
    cpus: float | None = None
    name: str | None = None
    rm: bool = False
    readonly: bool = False
    pids_limit: int | None = None
    mounts: list[Mount] = dataclasses.field(default_factory=list)
    pull: str = "missing"          # missing | always | never, as docker run --pull
    platform: str | None = None    # os/arch[/variant] for a pull; config's default otherwise
    net: NetRequest | None = None  # None: the default bridge network
    storage_size: int | None = None  # --storage-opt size= (bytes): a VM's writable layer's disk
    vm_memory: str | None = None     # --vm-memory auto|shared|private (a snapshot clone's RAM)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # --label (the image's first)


def parse_pids(value: str) -> int | None:
    try:
        v = int(value)
    except ValueError:
        raise UsageError(f"invalid value for --pids-limit: {value!r}") from None
    return None if v <= 0 else v  # Docker: 0 or -1 means unlimited


def parse_memory(value: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)b?\s*", value.lower())
    if not m:
        raise UsageError(f"invalid memory size {value!r} (e.g. 512m, 1g)")
    mult = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m[2]]
    n = int(float(m[1]) * mult)
    if n < 6 * (1 << 20):
        raise UsageError(f"minimum memory limit allowed is 6MB (got {value!r})")
    return n


def parse_cpus(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise UsageError(f"invalid value for --cpus: {value!r}") from None
    if not 0.01 <= v <= 1024:
        raise UsageError(f"--cpus must be between 0.01 and 1024 (got {value})")
    return v


def _read_env_file(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"--env-file {path}: {e.strerror}") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def read_env_file(path: Path) -> list[str]:
    """``--env-file``'s items, as :func:`merge_env` reads them (vmrt -H reads a local one)."""
    return _read_env_file(path)


def env_item_ok(item: str) -> bool:
    """An ``-e``/``--env-file`` item as :func:`merge_env` takes it: a key, no NUL."""
    k, _, v = item.partition("=")
    return bool(k) and bool(_ENV_KEY.match(k)) and "\0" not in v


def merge_env(image_env: list[str], opts: RunOptions) -> list[str]:
    env: dict[str, str] = {}
    for e in image_env:
        if "\0" in e:  # execve cannot carry it; the agent protocol and runc would refuse it later
            raise ImageError(f"the image's environment has an entry with a NUL byte: {e!r}")
        k, _, v = e.partition("=")  # an entry without "=" (image data) becomes an empty variable
        env[k] = v
    for item in [*(x for f in opts.env_files for x in _read_env_file(f)), *opts.env]:
        k, sep, v = item.partition("=")
        if not k or not _ENV_KEY.match(k) or "\0" in v:
            raise UsageError(f"invalid environment variable: {item!r}")
        if sep:
            env[k] = v
        elif k in os.environ:
            env[k] = os.environ[k]
    return [f"{k}={v}" for k, v in env.items()]


@dataclasses.dataclass
class User:
    uid: int
    gid: int
    groups: list[int]
    home: str


MAX_DB_BYTES = 4 << 20


def _read_db(root: Path, path: str, numeric: tuple[int, ...]) -> list[list[str]]:
    """Lines of an image's passwd/group file, resolved inside the image root (links never
    leave it); a FIFO, device node or anything else not a regular file is never opened and
    counts as missing, as a missing file does for Docker (numeric ids still work, names
    fail); one over MAX_DB_BYTES is refused (ImageError), never read whole."""
    try:
        data = safefs.read_regular(root, path, MAX_DB_BYTES)
    except safefs.FileTooLarge:
        raise ImageError(f"the image's {path} is larger than {MAX_DB_BYTES >> 20} MiB: refused") from None
    except OSError as e:
        raise ImageError(f"cannot read the image's {path}: {e.strerror}") from None
    if data is None:
        return []
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if not line.strip() or line.startswith("#") or len(fields) <= max(numeric):
            continue
        if all(fields[i].isdigit() and int(fields[i]) <= 0xFFFFFFFE for i in numeric):
            rows.append(fields)
    return rows


def resolve_user(root: Path | tuple[Path, Path], spec: str) -> User:
    """Docker's rules for ``-u user[:group]`` against the image's files.

    ``root`` is the image root, or a pair of roots (where /etc/passwd and
    /etc/group are found, for images whose layers split them)."""
    passwd_root, group_root = root if isinstance(root, tuple) else (root, root)
    user, _, group = spec.partition(":")
    passwd = [e for e in _read_db(passwd_root, "/etc/passwd", (2, 3)) if len(e) >= 7]
    groups = [e for e in _read_db(group_root, "/etc/group", (2,))]
    uid, gid, home, uname = 0, 0, "/", None
    if user == "":
        user = "0"
    for part in (user, group):
        if part.isdigit() and int(part) > 0xFFFFFFFE:
            raise UsageError(f"user {spec!r} is out of range")
    if user.isdigit():
        uid = int(user)
        for e in passwd:
            if e[2] == user:
                gid, home, uname = int(e[3]), e[5], e[0]
                break
    else:
        for e in passwd:
            if e[0] == user:
                uid, gid, home, uname = int(e[2]), int(e[3]), e[5], e[0]
                break
        else:
            raise UsageError(f"unable to find user {user}: no matching entries in passwd file")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            for g in groups:
                if g[0] == group:
                    gid = int(g[2])
                    break
            else:
                raise UsageError(f"unable to find group {group}: no matching entries in group file")
    extra: list[int] = []
    if uname is not None and not group:
        for g in groups:
            if uname in g[3].split(",") if len(g) > 3 else False:
                if int(g[2]) != gid and int(g[2]) not in extra:
                    extra.append(int(g[2]))
    if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
        raise UsageError(f"user {spec!r} is out of range")
    return User(uid, gid, extra, home or "/")


def process_args(image_cfg: dict[str, Any], opts: RunOptions) -> list[str]:
    if opts.entrypoint is not None:
        entry = [opts.entrypoint] if opts.entrypoint else []
        cmd = list(opts.command)
    else:
        entry = list(image_cfg.get("Entrypoint") or [])
        cmd = list(opts.command) or list(image_cfg.get("Cmd") or [])
    args = entry + cmd
    if not args:
        raise UsageError("no command specified")
    for a in args:
        if "\0" in a:  # only an image's Entrypoint/Cmd can hold one: execve cannot carry it
            raise ImageError(f"invalid command argument {a!r}: it contains a NUL byte")
    return args


def make_config(image_cfg: dict[str, Any], rootfs: Path | tuple[Path, Path], opts: RunOptions, container_id: str,
                isolation: str) -> Spec:
    args = process_args(image_cfg, opts)
    cwd = opts.workdir or image_cfg.get("WorkingDir") or "/"
    if not cwd.startswith("/") or "\0" in cwd:
        raise UsageError(f"the working directory {cwd!r} is invalid, it needs to be an absolute path")
    user = resolve_user(rootfs, opts.user if opts.user is not None else image_cfg.get("User") or "")
    hostname = opts.hostname or container_id[:12]
    if len(hostname) > 64 or not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", hostname):
        raise UsageError(f"invalid hostname {hostname!r}")
    env = merge_env(list(image_cfg.get("Env") or []), opts)
    keys = {e.partition("=")[0] for e in env}
    if "PATH" not in keys:
        env.insert(0, f"PATH={DEFAULT_PATH}")
    env.append(f"HOSTNAME={hostname}")
    if opts.tty and "TERM" not in keys:
        env.append("TERM=xterm")
    if "HOME" not in keys:
        env.append(f"HOME={user.home}")
    resources: dict[str, Any] = {}
    if opts.memory_bytes:
        resources["memory"] = {"limit": opts.memory_bytes}
    if opts.cpus:
        resources["cpu"] = {"period": 100000, "quota": int(opts.cpus * 100000)}
    if opts.pids_limit:
        resources["pids"] = {"limit": opts.pids_limit}
    resources["devices"] = [{"allow": False, "access": "rwm"}]  # the runtime adds the default devices
    caps = list(DEFAULT_CAPS)
    linux: dict[str, Any] = {
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        "resources": resources,
        "maskedPaths": MASKED,
        "readonlyPaths": READONLY,
    }
    # the same profile in both modes (issue 16): runc loads it, a VM's agent installs it compiled;
    # its minKernel rules are resolved for the kernel the container runs on
    linux["seccomp"] = seccomp.default_profile(caps, kernel=None if isolation == "process" else kernel.RELEASE)
    if isolation == "process":
        linux["cgroupsPath"] = cgroups.runtime_path(container_id)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": opts.tty,
            **({"consoleSize": {"height": opts.tty_size[0], "width": opts.tty_size[1]}} if opts.tty else {}),
            "user": {"uid": user.uid, "gid": user.gid,
                     **({"additionalGids": user.groups} if user.groups else {})},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": opts.readonly},
        "hostname": hostname,
        "mounts": [*DEFAULT_MOUNTS, *(m.oci() for m in opts.mounts)],
        "annotations": {"org.vmrt.isolation": isolation, "org.vmrt.image": opts.image,
                        "org.vmrt.stdin": "true" if opts.interactive else "false",
                        **({"org.vmrt.stdin-once": "true"} if opts.interactive and opts.stdin_once else {}),
                        "org.vmrt.network": _net_request(image_cfg, opts, isolation).to_json(),
                        **_storage(opts, isolation), **_vm_memory(opts, isolation),
                        **_health(image_cfg, opts),
                        LABELS: json.dumps({**(image_cfg.get("Labels") or {}), **opts.labels}, sort_keys=True)},
        "linux": linux,
    }


def _net_request(image_cfg: dict[str, Any], opts: RunOptions, isolation: str) -> NetRequest:
    """The run's network flags, with the image's EXPOSE ports (for -P); checked here, at create."""
    req = dataclasses.replace(opts.net) if opts.net is not None else NetRequest()
    # the image's keys are parsed (a key that is not a port refuses the run): they may reach nft
    req.exposed = list(dict.fromkeys([*image_exposed(image_cfg.get("ExposedPorts")), *req.exposed]))
    if req.network == "host" and isolation == "vm":
        raise UsageError("--network host is for --isolation=process only: a VM has its own network stack")
    if req.network in ("none", "host") and (req.ports or req.publish_all or req.aliases):
        raise UsageError(f"--network {req.network}: published ports and aliases need a bridge network")
    if req.aliases and req.network == "bridge":
        raise UsageError("network-scoped aliases are only supported for user-defined networks")
    return req


STORAGE_SIZE = "org.vmrt.storage.size"  # annotation: --storage-opt size= in bytes (VM mode)


def _storage(opts: RunOptions, isolation: str) -> dict[str, str]:
    """``--storage-opt size=``: the size of a VM container's disk (vm/disk.py). A process
    container's writable layer is a directory on the host's file system, which sets no size
    (Docker's overlay2 needs xfs with project quotas for one): refused there."""
    if opts.storage_size is None:
        return {}
    if isolation != "vm":
        raise UsageError("--storage-opt size is supported for --isolation=vm only (a process container's "
                         "writable layer is a directory on the host's file system)")
    return {STORAGE_SIZE: str(opts.storage_size)}


VM_MEMORY = "org.vmrt.vm.memory"  # annotation: --vm-memory (VM mode)
LABELS = "org.vmrt.labels"  # annotation: the container's labels (the image's, then --label), a JSON object


def _health(image_cfg: dict[str, Any], opts: RunOptions) -> dict[str, str]:
    hc = healthstate.effective(image_cfg.get("Healthcheck"), opts.healthcheck)
    return {healthstate.ANNOTATION: json.dumps(hc, sort_keys=True)} if hc else {}


def labels_of(config: Spec) -> dict[str, str]:
    try:
        v = json.loads(config.get("annotations", {}).get(LABELS) or "{}")
    except ValueError:
        return {}
    return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else {}


def _vm_memory(opts: RunOptions, isolation: str) -> dict[str, str]:
    if opts.vm_memory is None:
        return {}
    if isolation != "vm":
        raise UsageError("--vm-memory is supported for --isolation=vm only")
    return {VM_MEMORY: opts.vm_memory}


# the mounts every container gets; user mounts (volumes) follow them in config.json
DEFAULT_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs",
     "options": ["nosuid", "noexec", "nodev", "ro"]},
]


def user_mounts(config: Spec) -> list[dict[str, Any]]:
    return list(config.get("mounts", [])[len(DEFAULT_MOUNTS):])


def write(bundle_dir: Path, config: Spec) -> Path:
    """config.json, 0600 in a 0700 dir: it holds the container's environment (``-e`` secrets)."""
    fsmode.private_dir(bundle_dir)
    p = bundle_dir / "config.json"
    fsmode.write_private(p, json.dumps(config, indent=1))
    return p


def load(bundle_dir: Path) -> dict[str, Any]:
    return dict(json.loads((bundle_dir / "config.json").read_text()))
