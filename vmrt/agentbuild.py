"""Build the static guest agent and the initramfs it is PID 1 of, and the host-side
container monitor (monitor/, which shares the agent's protocol code).

Cached under ``<cache>/agent/<key>/`` and ``<cache>/monitor/<key>/``, keyed by a hash of
the sources (guest-agent/; monitor/ plus the protocol parser; both plus common/, the C
they share) and the compiler version.
The initramfs is an uncompressed newc cpio written here (a few dozen lines,
deterministic, no root-owned staging directory).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from . import fsmode
from .config import Config
from .errors import KernelError
from .paths import source_root

MONITOR = "vmrt-monitor"
ENOSYS_PROBE = "vmrt-enosys"
INODES_PROBE = "vmrt-inodes"


def _sources(name: str) -> list[Path]:
    d = source_root() / name
    if not (d / "Makefile").is_file():
        raise KernelError(f"{name} sources missing in {d}")
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in (".c", ".h", "")
                  and "fuzz" not in p.parts and p.name != "README.md" and p.name != MONITOR)


def _common() -> list[Path]:
    """common/: the C compiled into both the agent and the monitor (clock, log-line format)."""
    d = source_root() / "common"
    files = sorted(p for p in d.glob("*") if p.is_file() and p.suffix in (".c", ".h"))
    if not files:
        raise KernelError(f"common sources missing in {d}")
    return files


@functools.cache
def _compiler() -> str:
    """gcc's version line, once per process (the agent's and the monitor's keys both need it)."""
    try:
        return subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def _key(tag: bytes, files: list[Path]) -> str:
    h = hashlib.sha256(tag)
    h.update(_compiler().encode() + b"\n")
    root = source_root()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_key() -> str:
    """The agent's (and so the initramfs's) key: guest-agent/ and common/."""
    return _key(b"agentbuild 1\n", _sources("guest-agent") + _common())


def monitor_key() -> str:
    """The host monitor's key: monitor/, and the protocol parser and common/ it shares with the agent."""
    proto = [source_root() / "guest-agent" / n for n in ("proto.c", "proto.h")]
    return _key(b"monitorbuild 1\n", _sources("monitor") + proto + _common())


def probes_key() -> str:
    """probes/: the static programs `vmrt check isolation` runs inside containers."""
    return _key(b"probebuild 1\n", _sources("probes"))


def agent_dir(cfg: Config) -> Path:
    return cfg.cache / "agent" / cache_key()


def monitor_dir(cfg: Config) -> Path:
    return cfg.cache / "monitor" / monitor_key()


def find(cfg: Config) -> Path:
    if cfg.initrd is not None:
        if not cfg.initrd.is_file():
            raise KernelError(f"initramfs {cfg.initrd} not found")
        return cfg.initrd
    p = agent_dir(cfg) / "initramfs.cpio"
    if not p.is_file():
        raise KernelError(f"guest agent not built: run `vmrt agent build` (looked for {p})")
    return p


def probes_dir(cfg: Config) -> Path:
    return cfg.cache / "probes" / probes_key()


def enosys_probe(cfg: Config) -> Path:
    """The built ENOSYS probe (probes/enosys.c), building it first if it is not there."""
    return build_probes(cfg, progress=False) / ENOSYS_PROBE


def inodes_probe(cfg: Config) -> Path:
    """The built inode probe (probes/inodes.c): readdir's d_ino against lstat's st_ino."""
    return build_probes(cfg, progress=False) / INODES_PROBE


def monitor_binary(cfg: Config) -> Path | None:
    """The built C monitor of detached containers, or None (then a Python monitor stays resident)."""
    p = monitor_dir(cfg) / MONITOR
    return p if os.access(p, os.X_OK) else None


class Cpio:
    """Writer for the newc cpio format the kernel unpacks into its rootfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nb)
        self.buf.write(b"\0" * (-(110 + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self.ino = 0
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def initramfs(agent_binary: bytes) -> bytes:
    c = Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "root", "etc"):
        c.dir(d, 0o1777 if d == "tmp" else 0o755)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("init", agent_binary)
    return c.finish()


def build(cfg: Config, *, force: bool = False, progress: bool = True) -> Path:
    """The agent's initramfs (and the host monitor and the probes beside it, each cached on its own key)."""
    _build_monitor(cfg, force=force, progress=progress)
    build_probes(cfg, force=force, progress=progress)
    out = agent_dir(cfg)
    if (out / "initramfs.cpio").is_file() and not force:
        if progress:
            print(f"[agent] cached: {out}", file=sys.stderr)
        return out
    tmp = _make("guest-agent", out, "vmrt-agent", progress)
    (tmp / "initramfs.cpio").write_bytes(initramfs((tmp / "vmrt-agent").read_bytes()))
    os.chmod(tmp / "initramfs.cpio", fsmode.PUBLIC_FILE)  # as the kernel: a jailed VMM may get it bound in
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    if progress:
        print(f"[agent] done: {out}/initramfs.cpio", file=sys.stderr)
    return out


def _build_monitor(cfg: Config, *, force: bool, progress: bool) -> Path:
    out = monitor_dir(cfg)
    if (out / MONITOR).is_file() and not force:
        return out
    tmp = _make("monitor", out, MONITOR, progress)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def build_probes(cfg: Config, *, force: bool = False, progress: bool = True) -> Path:
    out = probes_dir(cfg)
    if (out / ENOSYS_PROBE).is_file() and (out / INODES_PROBE).is_file() and not force:
        return out
    tmp = _make("probes", out, ENOSYS_PROBE, progress)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def _make(name: str, out: Path, binary: str, progress: bool) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = source_root() / name
    if progress:
        print(f"[agent] compiling {src} (static)", file=sys.stderr, flush=True)
    r = subprocess.run(["make", "-s", "-C", str(src), f"O={tmp}"], capture_output=True, text=True)
    if r.returncode != 0 or not (tmp / binary).is_file():
        raise KernelError(f"{name} build failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    return tmp
