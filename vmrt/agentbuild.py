"""Build the static guest agent and the initramfs it is PID 1 of, and the host-side
container monitor (monitor/, which shares the agent's protocol code).

Cached under ``<cache>/agent/<key>/`` keyed by a hash of guest-agent/'s and monitor/'s
sources and the compiler version. The initramfs is an uncompressed newc cpio written
here (a few dozen lines, deterministic, no root-owned staging directory).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .config import Config
from .errors import KernelError
from .paths import source_root

SOURCE_DIRS = ("guest-agent", "monitor")
MONITOR = "vmrt-monitor"


def _sources() -> list[Path]:
    files: list[Path] = []
    for name in SOURCE_DIRS:
        d = source_root() / name
        if not (d / "Makefile").is_file():
            raise KernelError(f"{name} sources missing in {d}")
        files += sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in (".c", ".h", "")
                        and "fuzz" not in p.parts and p.name != "README.md")
    return files


def cache_key() -> str:
    h = hashlib.sha256(b"agentbuild 2\n")
    try:
        cc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        cc = "unknown"
    h.update(cc.encode() + b"\n")
    root = source_root()
    for f in _sources():
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def agent_dir(cfg: Config) -> Path:
    return cfg.cache / "agent" / cache_key()


def find(cfg: Config) -> Path:
    if cfg.initrd is not None:
        if not cfg.initrd.is_file():
            raise KernelError(f"initramfs {cfg.initrd} not found")
        return cfg.initrd
    p = agent_dir(cfg) / "initramfs.cpio"
    if not p.is_file():
        raise KernelError(f"guest agent not built: run `vmrt agent build` (looked for {p})")
    return p


def monitor_binary(cfg: Config) -> Path | None:
    """The built C monitor of detached containers, or None (then a Python monitor stays resident)."""
    p = agent_dir(cfg) / MONITOR
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
    out = agent_dir(cfg)
    if (out / "initramfs.cpio").is_file() and not force:
        if progress:
            print(f"[agent] cached: {out}", file=sys.stderr)
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = source_root() / "guest-agent"
    if progress:
        print(f"[agent] compiling {src} (static)", file=sys.stderr, flush=True)
    r = subprocess.run(["make", "-s", "-C", str(src), f"O={tmp}"], capture_output=True, text=True)
    if r.returncode != 0 or not (tmp / "vmrt-agent").is_file():
        raise KernelError(f"guest agent build failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    r = subprocess.run(["make", "-s", "-C", str(source_root() / "monitor"), f"O={tmp}"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not (tmp / MONITOR).is_file():
        raise KernelError(f"container monitor build failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    (tmp / "initramfs.cpio").write_bytes(initramfs((tmp / "vmrt-agent").read_bytes()))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    if progress:
        print(f"[agent] done: {out}/initramfs.cpio", file=sys.stderr)
    return out
