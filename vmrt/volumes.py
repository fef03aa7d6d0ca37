"""``-v``, ``--mount`` and ``--tmpfs``, parsed as Docker does, into OCI mounts; and named
volumes (``-v NAME:/path``, ``vmrt volume``): directories of vmrt's own under
``<root>/volumes/NAME/_data`` (Docker's layout), bound in as a bind volume is.

Both drivers consume the resulting OCI ``mounts`` entries: runc mounts them
itself (resolving each destination inside the container root, so a symlink
there cannot escape it); the VM driver shares bind sources into the guest
over virtio-fs and the agent mounts them, also resolving in the root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from . import fsmode
from .config import Config
from .errors import StateError, UsageError

TMPFS_DEFAULTS = ["nosuid", "nodev", "noexec"]
VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,127}")  # Docker's, with a length cap
VOLUME_KEY = "org.vmrt.volume"  # in an OCI mount: the named volume it binds


@dataclasses.dataclass
class Mount:
    type: str           # bind | tmpfs
    target: str
    source: str = ""
    readonly: bool = False
    options: list[str] = dataclasses.field(default_factory=list)  # tmpfs: size=, mode=
    volume: str = ""    # a named volume's name (its source: resolve_named)

    def oci(self) -> dict[str, Any]:
        if self.type == "bind":
            return {"destination": self.target, "type": "bind", "source": self.source,
                    # rro: read-only recursively (a mount under the source too), as Docker 25+
                    "options": ["rbind", "rprivate", *(["ro", "rro"] if self.readonly else [])],
                    **({VOLUME_KEY: self.volume} if self.volume else {})}
        return {"destination": self.target, "type": "tmpfs", "source": "tmpfs",
                "options": [*TMPFS_DEFAULTS, *(["ro"] if self.readonly else []), *self.options]}


def _target(t: str, what: str) -> str:
    if not t.startswith("/"):
        raise UsageError(f"invalid {what}: the container path {t!r} must be absolute")
    norm = os.path.normpath(t)
    if norm == "/":
        raise UsageError(f"invalid {what}: the container path cannot be '/'")
    if "\0" in t or len(t) > 4096:
        raise UsageError(f"invalid {what}: bad container path")
    return norm


def _source(s: str, what: str, create: bool) -> str:
    if not s.startswith("/"):
        raise UsageError(f"invalid {what}: a bind source must be an absolute host path (a name: type=volume)")
    p = Path(os.path.normpath(s))
    if not p.exists():
        if not create:
            raise UsageError(f"invalid {what}: bind source path does not exist: {p}")
        try:
            fsmode.make_dirs(p, 0o755)  # the user's dir, as Docker makes it (not under vmrt's umask)
        except OSError as e:
            raise UsageError(f"invalid {what}: cannot create {p}: {e.strerror}") from None
    return str(p)


def parse_volume(spec: str) -> Mount:
    """``-v HOST:CTR[:ro|rw]`` (a missing host directory is created, as Docker does)."""
    what = f"volume {spec!r}"
    parts = spec.split(":")
    if len(parts) == 3:
        src, tgt, mode = parts
        modes = set(mode.split(","))
        if not modes <= {"ro", "rw", "z", "Z", "private", "rprivate"} or {"ro", "rw"} <= modes:
            raise UsageError(f"invalid {what}: unknown mode {mode!r}")
        ro = "ro" in modes
    elif len(parts) == 2:
        (src, tgt), ro = parts, False
    else:
        raise UsageError(f"invalid {what}: use HOST:CONTAINER[:ro]")
    if not src.startswith("/"):
        return Mount("bind", _target(tgt, what), "", ro, volume=_volume_name(src, what))
    return Mount("bind", _target(tgt, what), _source(src, what, create=True), ro)


def _volume_name(name: str, what: str) -> str:
    if not VOLUME_NAME.fullmatch(name):
        raise UsageError(f"invalid {what}: {name!r} is neither an absolute host path nor a volume name "
                         "([a-zA-Z0-9][a-zA-Z0-9_.-]+)")
    return name


_SIZE = re.compile(r"^(\d+)([kmg]?)$", re.I)


def _tmpfs_opts(pairs: list[tuple[str, str]], what: str) -> list[str]:
    out = []
    for k, v in pairs:
        if k in ("size", "tmpfs-size"):
            m = _SIZE.match(v)
            if not m:
                raise UsageError(f"invalid {what}: bad size {v!r}")
            out.append(f"size={m[1]}{m[2].lower()}")
        elif k in ("mode", "tmpfs-mode"):
            if not re.fullmatch(r"[0-7]{3,4}", v):
                raise UsageError(f"invalid {what}: bad mode {v!r}")
            out.append(f"mode={v}")
        else:
            raise UsageError(f"invalid {what}: unknown option {k!r}")
    return out


def parse_tmpfs(spec: str) -> Mount:
    """``--tmpfs CTR[:size=64m,mode=1777,ro|rw,exec,...]``."""
    what = f"tmpfs {spec!r}"
    tgt, _, opts = spec.partition(":")
    pairs, ro = [], False
    extra: list[str] = []
    for o in filter(None, opts.split(",")):
        k, sep, v = o.partition("=")
        if not sep:
            if k in ("ro", "rw"):
                ro = k == "ro"
            elif k in ("exec", "noexec", "suid", "nosuid", "dev", "nodev"):
                extra.append(k)
            else:
                raise UsageError(f"invalid {what}: unknown option {k!r}")
        else:
            pairs.append((k, v))
    m = Mount("tmpfs", _target(tgt, what), readonly=ro, options=_tmpfs_opts(pairs, what))
    for flag in extra:  # a later flag wins over the default (exec over noexec)
        m.options.append(flag)
    return m


def parse_mount(spec: str) -> Mount:
    """``--mount type=bind|tmpfs,source=..,target=..[,readonly][,tmpfs-size=..]``."""
    what = f"--mount {spec!r}"
    kv: dict[str, str] = {}
    flags: set[str] = set()
    for item in filter(None, spec.split(",")):
        k, sep, v = item.partition("=")
        k = k.strip().lower()
        if not sep:
            flags.add(k)
        else:
            kv[k] = v
    typ = kv.pop("type", "volume")
    tgt = kv.pop("target", None) or kv.pop("destination", None) or kv.pop("dst", None)
    if tgt is None:
        raise UsageError(f"invalid {what}: target is required")
    ro = bool(flags & {"readonly", "ro"}) or kv.pop("readonly", kv.pop("ro", "false")).lower() in ("1", "true")
    flags -= {"readonly", "ro"}
    if flags:
        raise UsageError(f"invalid {what}: unknown option {sorted(flags)[0]!r}")
    if typ == "bind":
        src = kv.pop("source", None) or kv.pop("src", None)
        kv.pop("bind-propagation", None)
        if src is None:
            raise UsageError(f"invalid {what}: source is required for a bind mount")
        if kv:
            raise UsageError(f"invalid {what}: unknown option {sorted(kv)[0]!r}")
        return Mount("bind", _target(tgt, what), _source(src, what, create=False), ro)
    if typ == "tmpfs":
        return Mount("tmpfs", _target(tgt, what), readonly=ro, options=_tmpfs_opts(list(kv.items()), what))
    if typ == "volume":  # no source: an anonymous volume, a name of its own
        src = kv.pop("source", None) or kv.pop("src", None) or secrets.token_hex(32)
        kv.pop("volume-nocopy", None)
        if kv:
            raise UsageError(f"invalid {what}: unknown option {sorted(kv)[0]!r}")
        return Mount("bind", _target(tgt, what), "", ro, volume=_volume_name(src, what))
    raise UsageError(f"invalid {what}: type {typ!r} is not supported (bind, volume or tmpfs)")


# --- named volumes ------------------------------------------------------------------------
def volumes_dir(cfg: Config) -> Path:
    return cfg.root / "volumes"


def volume_data(cfg: Config, name: str) -> Path:
    return volumes_dir(cfg) / name / "_data"


def create_volume(cfg: Config, name: str | None = None, labels: dict[str, str] | None = None) -> tuple[str, bool]:
    """A named volume (a new random name if none is given): its name, and whether it is new.
    Its ``_data`` is 0755 root's, as Docker's; ``labels`` are kept beside it."""
    name = name or secrets.token_hex(32)
    _volume_name(name, f"volume name {name!r}")
    top = fsmode.private_dir(volumes_dir(cfg))
    d = top / name
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        if not (d / "_data").is_dir() or d.is_symlink():
            raise UsageError(f"volume {name}: its directory is damaged") from None
        return name, False
    (d / "_data").mkdir(mode=0o755)
    os.chmod(d / "_data", 0o755)  # not under vmrt's umask: the container's users reach into it
    fsmode.write_private(d / "volume.json", json.dumps({"Name": name, "Labels": labels or {},
                                                        "CreatedAt": time.time()}))
    return name, True


def volume_doc(cfg: Config, name: str) -> dict[str, Any]:
    """``docker volume inspect``'s shape."""
    d = volumes_dir(cfg) / name
    if not VOLUME_NAME.fullmatch(name) or not (d / "_data").is_dir() or d.is_symlink():
        raise StateError(f"No such volume: {name}")
    try:
        meta = json.loads((d / "volume.json").read_text())
    except (OSError, ValueError):
        meta = {}
    created = meta.get("CreatedAt") or os.stat(d).st_mtime
    return {"Name": name, "Driver": "local", "Mountpoint": str(d / "_data"), "Scope": "local",
            "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            "Labels": meta.get("Labels") or {}, "Options": {}}


def list_volumes(cfg: Config) -> list[str]:
    top = volumes_dir(cfg)
    return sorted(p.name for p in top.iterdir() if VOLUME_NAME.fullmatch(p.name) and (p / "_data").is_dir()) \
        if top.is_dir() else []


def remove_volume(cfg: Config, name: str) -> None:
    """The volume and all it holds (an fd-based walk: nothing the tenant left there is followed)."""
    volume_doc(cfg, name)  # it exists
    shutil.rmtree(volumes_dir(cfg) / name)


def resolve_named(cfg: Config, mounts: list[Mount]) -> None:
    """Each named volume's source: its ``_data``, the volume made if it is not there (as Docker)."""
    for m in mounts:
        if m.volume:
            create_volume(cfg, m.volume)
            m.source = str(volume_data(cfg, m.volume))


def check_unique(mounts: list[Mount]) -> None:
    seen: set[str] = set()
    for m in mounts:
        if m.target in seen:
            raise UsageError(f"duplicate mount point: {m.target}")
        seen.add(m.target)
