"""Build and locate the trimmed guest kernel.

``make tinyconfig`` on Debian's linux-source-6.1, with the project's patches
in ``kernels/patches/*.patch`` applied, plus the fragments in
``kernels/*.config``, merged with the kernel's own ``merge_config.sh``. Every
option a fragment sets is checked in the final .config. The result is cached
under ``<cache>/kernels/<key>/`` where ``key`` hashes the fragments, the
patches, the source package version and this builder's version, so a kernel
is built once per config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from . import fsmode
from .config import Config
from .errors import KernelError
from .paths import source_root

BUILDER_VERSION = "1"
SOURCE_PACKAGE = "linux-source-6.1"
# the release the built guest kernel reports (its seccomp profile's minKernel rules are resolved for it)
RELEASE = SOURCE_PACKAGE.removeprefix("linux-source-")


def fragments() -> list[Path]:
    d = source_root() / "kernels"
    frags = sorted(d.glob("*.config"))
    if not frags:
        raise KernelError(f"no kernel config fragments in {d}")
    return frags


def patches() -> list[Path]:
    """The project's kernel patches, applied in name order (``patch -p1``)."""
    return sorted((source_root() / "kernels" / "patches").glob("*.patch"))


def patches_key(ps: list[Path]) -> str:
    h = hashlib.sha256()
    for p in ps:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def source_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise KernelError(f"{SOURCE_PACKAGE} is not installed (apt-get install {SOURCE_PACKAGE})") from None


def cache_key(version: str) -> str:
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION}\n{SOURCE_PACKAGE} {version}\n".encode())
    for f in fragments():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    if ps := patches():  # read once: kernel.find hashes this on every VM start
        h.update(b"patches " + patches_key(ps).encode())
    return h.hexdigest()[:16]


def kernel_dir(cfg: Config, version: str | None = None) -> Path:
    return cfg.cache / "kernels" / cache_key(version or source_version())


def find(cfg: Config) -> tuple[Path, str]:
    """Return (vmlinux path, build id) of the kernel to boot."""
    if cfg.kernel is not None:
        if not cfg.kernel.is_file():
            raise KernelError(f"kernel {cfg.kernel} not found")
        built = cfg.kernel.parent / "build.json"
        return cfg.kernel, cfg.kernel.parent.name if built.is_file() else "user-supplied"
    d = kernel_dir(cfg)
    vmlinux = d / "vmlinux"
    if not vmlinux.is_file():
        raise KernelError("guest kernel not built: run `vmrt kernel build` "
                          f"(looked for {vmlinux})")
    return vmlinux, d.name


def _expected_options() -> dict[str, str]:
    want: dict[str, str] = {}
    for f in fragments():
        for line in f.read_text().splitlines():
            line = line.strip()
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
                want[k] = v
    return want


def _check_config(dotconfig: Path) -> None:
    have: dict[str, str] = {}
    for line in dotconfig.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            have[k] = v
    bad = [f"{k}={v} (got {have.get(k, 'n')})" for k, v in _expected_options().items()
           if (have.get(k, "n") if v == "n" else have.get(k)) != v]
    if bad:
        raise KernelError("kernel config did not take: " + ", ".join(bad))


def _run(cmd: list[str], cwd: Path, log: IO[str], progress: bool, label: str) -> None:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    n = 0
    for line in proc.stdout:
        log.write(line)
        n += 1
        if progress and (line.lstrip().startswith(("CC", "LD", "AR", "AS")) and n % 50 == 0):
            print(f"[kernel] {label}: {n} steps, {time.monotonic() - start:.0f}s  {line.strip()[:60]}",
                  file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise KernelError(f"kernel build step failed: {' '.join(cmd)} (see {log.name})")


def build(cfg: Config, *, force: bool = False, progress: bool = True, jobs: int | None = None) -> Path:
    version = source_version()
    out = kernel_dir(cfg, version)
    if (out / "vmlinux").is_file() and not force:
        if progress:
            print(f"[kernel] cached: {out}", file=sys.stderr)
        return out
    tarball = cfg.kernel_source
    if not tarball.is_file():
        raise KernelError(f"kernel source {tarball} missing (apt-get install {SOURCE_PACKAGE})")
    # one source tree per patch set: an unpatched tree is never patched in place
    ps = patches()
    src = cfg.cache / "src" / (f"{SOURCE_PACKAGE}_{version}" + (f"+{patches_key(ps)}" if ps else ""))
    if not (src / "Makefile").is_file():
        for old in src.parent.glob(f"{SOURCE_PACKAGE}_*"):  # another version's or patch set's: 1.6 GB each
            if old != src:
                shutil.rmtree(old, ignore_errors=True)
        if progress:
            print(f"[kernel] extracting {tarball}", file=sys.stderr, flush=True)
        tmp = src.with_name(src.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(tmp), "--strip-components=1"], check=True)
        for p in ps:
            r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(p)], cwd=tmp,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise KernelError(f"kernel patch {p.name} does not apply to {SOURCE_PACKAGE} {version}: "
                                  f"{(r.stdout + r.stderr).strip().splitlines()[-1:]}")
        os.rename(tmp, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or (os.cpu_count() or 1) + 1
    logpath = out.parent / f"{out.name}.build.log"
    with open(logpath, "w") as log:
        if progress:
            print(f"[kernel] configuring (tinyconfig + {', '.join(f.name for f in fragments())})",
                  file=sys.stderr, flush=True)
        _run(["make", "tinyconfig"], src, log, False, "config")
        _run(["./scripts/kconfig/merge_config.sh", "-m", ".config", *map(str, fragments())],
             src, log, False, "config")
        _run(["make", "olddefconfig"], src, log, False, "config")
        _check_config(src / ".config")
        if progress:
            print(f"[kernel] building vmlinux and bzImage with {jobs} jobs (log: {logpath})",
                  file=sys.stderr, flush=True)
        _run(["make", f"-j{jobs}", "vmlinux", "bzImage"], src, log, progress, "build")
    tmp_out = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir()
    shutil.copy2(src / "vmlinux", tmp_out / "vmlinux")
    shutil.copy2(src / "arch/x86/boot/bzImage", tmp_out / "bzImage")
    shutil.copy2(src / ".config", tmp_out / "config")
    for n in ("vmlinux", "bzImage"):  # no tenant data: readable where a jailed VMM gets them bound in
        os.chmod(tmp_out / n, fsmode.PUBLIC_FILE)
    (tmp_out / "build.json").write_text(json.dumps(
        {"key": out.name, "source": f"{SOURCE_PACKAGE} {version}", "fragments": [f.name for f in fragments()],
         "patches": [p.name for p in ps], "built": int(time.time())}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp_out, out)
    if progress:
        print(f"[kernel] done: {out}/vmlinux", file=sys.stderr)
    return out
