"""A Debian root file system from Debian's archive, built by mmdebstrap: a recipe's ``[mmdebstrap]``.

The apt sources are the build host's own, found through apt's configuration (``apt-config``:
``Dir::Etc::sourcelist`` and ``Dir::Etc::sourceparts``, one-line and deb822 files), so the
repository names no mirror: only the entries that serve the recipe's suite (``bookworm``,
``bookworm-updates``, ``bookworm-security``) are handed to mmdebstrap, which also writes them into
the image as its apt sources. mmdebstrap writes a tar to a pipe; the files it copies from the build
host that a runtime provides at run time (``/etc/resolv.conf``, ``/etc/hostname``) and ``/dev``'s
nodes are left out, and the rest is stored gzip'd (no timestamp) as
``<cache>/images/<key>/rootfs.tar.gz``, where ``key`` hashes the section, the chosen sources and
BUILDER_VERSION: like the guest kernel, a rootfs is built once per key. With SOURCE_DATE_EPOCH
(the recipe's ``source_date_epoch``, or the environment's) mmdebstrap's output is reproducible for
the same archive content. The tar stays untrusted: the recipe imports it as any rootfs tarball,
through the store's checked unpack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import ImageError
from . import unpack

BUILDER_VERSION = "1"
HOOKS = Path("/usr/share/mmdebstrap/hooks")
VARIANTS = ("extract", "custom", "essential", "apt", "required", "minbase", "buildd", "important",
            "debootstrap", "standard")
KEYS = frozenset({"suite", "variant", "include", "components", "hooks", "source_date_epoch"})
_SUITE = re.compile(r"[a-z][a-z0-9.-]*")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")  # Debian policy 5.6.1
_WORD = re.compile(r"[a-z0-9][a-z0-9-]*")
# what mmdebstrap copies from the build host, or makes, that a runtime provides when a container starts
DROPPED = frozenset({"etc/resolv.conf", "etc/hostname"})
_SOURCE_PART = re.compile(r"[A-Za-z0-9_.-]+\.(list|sources)")  # the names apt reads in sourceparts


@dataclasses.dataclass(frozen=True)
class Section:
    """A recipe's ``[mmdebstrap]`` table, checked."""

    suite: str
    variant: str = "minbase"
    include: tuple[str, ...] = ()
    components: tuple[str, ...] = ()  # empty: the host's entries' own
    hooks: tuple[str, ...] = ()       # mmdebstrap's hook directories (under HOOKS), by name
    source_date_epoch: int | None = None

    def epoch(self) -> int | None:
        """SOURCE_DATE_EPOCH for the build: the environment's (the reproducible-builds convention) or
        the recipe's."""
        env = os.environ.get("SOURCE_DATE_EPOCH", "")
        return int(env) if env.isdigit() else self.source_date_epoch

    def argv(self) -> list[str]:
        """mmdebstrap's options for this section (the suite, target and sources come after)."""
        out = [f"--variant={self.variant}", "--format=tar"]
        if self.include:
            out.append("--include=" + ",".join(self.include))
        out += [f"--hook-dir={HOOKS / h}" for h in self.hooks]
        return out


def _strings(value: Any, what: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{what} must be a list of strings")
    bad = [v for v in value if not pattern.fullmatch(v)]
    if bad:
        raise ImageError(f"{what}: {bad[0]!r} is not a valid name")
    return tuple(value)


def parse_section(table: Any, where: str) -> Section:
    """The ``[mmdebstrap]`` table checked: one clear error for the first thing wrong."""
    what = f"{where}: [mmdebstrap]"
    if not isinstance(table, dict):
        raise ImageError(f"{what} must be a table")
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise ImageError(f"{what} has unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    suite = table.get("suite")
    if not isinstance(suite, str) or not _SUITE.fullmatch(suite):
        raise ImageError(f"{what} suite must be a release name such as 'bookworm' (got {suite!r})")
    variant = table.get("variant", "minbase")
    if variant not in VARIANTS:
        raise ImageError(f"{what} variant {variant!r} is not one of {', '.join(VARIANTS)}")
    hooks = _strings(table.get("hooks", []), f"{what} hooks", _WORD)
    missing = [h for h in hooks if not (HOOKS / h).is_dir()]
    if missing:
        raise ImageError(f"{what} hooks: mmdebstrap has no hook directory {missing[0]!r} (in {HOOKS})")
    epoch = table.get("source_date_epoch")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0):
        raise ImageError(f"{what} source_date_epoch must be a non-negative integer (got {epoch!r})")
    return Section(suite, variant, _strings(table.get("include", []), f"{what} include", _PACKAGE),
                   _strings(table.get("components", []), f"{what} components", _WORD), hooks, epoch)


# --- the host's apt sources ------------------------------------------------------------------
def source_files() -> list[Path]:
    """The files apt reads its sources from on this host, in apt's order."""
    try:
        out = subprocess.run(["apt-config", "shell", "LIST", "Dir::Etc::sourcelist/f",
                              "PARTS", "Dir::Etc::sourceparts/d"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ImageError(f"cannot read apt's configuration (apt-config): {e}; "
                         "[mmdebstrap] recipes need a Debian host") from e
    found = dict(w.partition("=")[::2] for w in shlex.split(out))  # LIST='...' PARTS='...'
    files = []
    if found.get("LIST") and Path(found["LIST"]).is_file():
        files.append(Path(found["LIST"]))
    parts = Path(found.get("PARTS") or "/nonexistent")
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if _SOURCE_PART.fullmatch(p.name) and p.is_file())
    return files


def _wanted(suites: list[str], suite: str) -> list[str]:
    return [s for s in suites if s == suite or s.startswith(suite + "-")]


def _one_line(text: str, suite: str, components: tuple[str, ...]) -> list[str]:
    """The ``deb`` lines of a sources.list for ``suite`` (and its -updates, -security...)."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.fullmatch(r"deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)(.*)", line)
        if not m or not _wanted([m[3]], suite):
            continue
        comps = " ".join(components) if components else m[4].strip()
        out.append(" ".join(p for p in ("deb", (m[1] or "").strip(), m[2], m[3], comps) if p))
    return out


def _stanzas(text: str) -> Iterator[list[tuple[str, str]]]:
    """deb822 paragraphs as (field, value) pairs, continuation lines kept in the value; comments gone."""
    fields: list[tuple[str, str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields = []
        elif line[0] in " \t" and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + "\n" + line)
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))


def _deb822(text: str, suite: str, components: tuple[str, ...]) -> list[str]:
    """The deb822 paragraphs (``Types: deb``) for ``suite``, with only the suites wanted."""
    out = []
    for fields in _stanzas(text):
        get = {k.lower(): v for k, v in fields}
        if get.get("enabled", "yes").lower() == "no" or "deb" not in get.get("types", "").split():
            continue
        suites = _wanted(get.get("suites", "").split(), suite)
        if not suites:
            continue
        lines = []
        for k, v in fields:
            key = k.lower()
            if key == "types":
                v = "deb"
            elif key == "suites":
                v = " ".join(suites)
            elif key == "components" and components:
                v = " ".join(components)
            elif key == "enabled":
                continue
            lines.append(f"{k}: {v}")
        out.append("\n".join(lines))
    return out


def sources(section: Section, files: list[Path] | None = None) -> tuple[str, str]:
    """(one-line, deb822) text of the host's apt entries for the section's suite."""
    files = source_files() if files is None else files
    one, deb822 = [], []
    for f in files:
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ImageError(f"cannot read apt sources {f}: {e}") from e
        if f.name.endswith(".sources"):
            deb822 += _deb822(text, section.suite, section.components)
        else:
            one += _one_line(text, section.suite, section.components)
    every = "\n".join([*one, *deb822])
    if re.search(r"[a-z+]+://[^/\s@]*@", every):  # user:password@host: mmdebstrap writes it into the image
        raise ImageError(f"an apt source for {section.suite!r} carries credentials in its URI; they would be "
                         "written into the image: give them to apt in /etc/apt/auth.conf.d instead")
    if not re.search(rf"(^deb\s+(\[[^\]]*\]\s+)?\S+\s+|^Suites:(.*\s)?){re.escape(section.suite)}(\s|$)",
                     every, re.MULTILINE):
        raise ImageError(f"no apt source on this host serves {section.suite!r} "
                         f"(looked in {', '.join(map(str, files)) or 'no file'}): add it to apt's sources")
    return "".join(f"{ln}\n" for ln in one), "\n\n".join(deb822) + ("\n" if deb822 else "")


# --- the cache -------------------------------------------------------------------------------
def cache_key(section: Section, one_line: str, deb822: str) -> str:
    spec = {"builder": BUILDER_VERSION, "section": dataclasses.asdict(section), "epoch": section.epoch(),
            "sources": [one_line, deb822]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build per key at a time: a second builder waits, then finds the first's result."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rootfs(cache: Path, section: Section, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The section's rootfs tarball (gzip) in the cache, built first if its key is new; and its
    build record (key, suite, sources, epoch, seconds)."""
    one_line, deb822 = sources(section)
    key = cache_key(section, one_line, deb822)
    base = cache / "images"
    out = base / key
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f"{key}.lock"):
        if (out / "build.json").is_file():
            if progress:
                print(f"[image] cached: {out}", file=sys.stderr)
            return out / "rootfs.tar.gz", json.loads((out / "build.json").read_text())
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f"{key}.tmp-"))
        try:
            record = _build(section, one_line, deb822, tmp, base / f"{key}.build.log", progress)
            record["key"] = key
            shutil.rmtree(tmp / "sources")  # recorded in build.json
            (tmp / "build.json").write_text(json.dumps(record, indent=1))
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[image] built in {record['seconds']:.0f}s: {out}", file=sys.stderr)
    return out / "rootfs.tar.gz", record


def _build(section: Section, one_line: str, deb822: str, tmp: Path, logpath: Path,
           progress: bool) -> dict[str, Any]:
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise ImageError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    srcdir = tmp / "sources"
    srcdir.mkdir()
    mirrors = []
    for name, text in (("debian.list", one_line), ("debian.sources", deb822)):
        if text:
            (srcdir / name).write_text(text)
            mirrors.append(str(srcdir / name))
    env = dict(os.environ)
    epoch = section.epoch()
    if epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(epoch)
    argv = [exe, *section.argv(), section.suite, "-", *mirrors]
    if progress:
        print(f"[image] mmdebstrap {section.variant} {section.suite} (+{len(section.include)} packages; "
              f"log: {logpath})", file=sys.stderr, flush=True)
    start = time.monotonic()
    with open(logpath, "wb") as log:
        log.write(f"{shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env)
        assert proc.stdout is not None
        bad: ImageError | None = None
        try:
            _filtered(proc.stdout, tmp / "rootfs.tar.gz")
        except ImageError as e:  # mmdebstrap's own failure (no tar) is the better message, if it failed
            bad = e
        except BaseException:
            proc.terminate()  # not kill: mmdebstrap unmounts what it mounted in its chroot on SIGTERM
            raise
        finally:
            proc.stdout.close()  # a writer still running ends on EPIPE
            rc = proc.wait()
    if rc != 0:  # apt's first error says why ("E: Unable to locate package x"); the last, only that it failed
        lines = logpath.read_text(errors="replace").strip().splitlines()
        why = next((ln for ln in lines if ln.startswith("E: ")), lines[-1] if lines else "?")
        raise ImageError(f"mmdebstrap failed (exit {rc}): {why[:300]} (see {logpath})")
    if bad is not None:
        raise bad
    return {"suite": section.suite, "variant": section.variant, "include": list(section.include),
            "sources": [one_line, deb822], "source_date_epoch": epoch, "built": int(time.time()),
            "seconds": round(time.monotonic() - start, 1)}


def _filtered(stream: IO[bytes], dest: Path) -> None:
    """mmdebstrap's tar from ``stream`` to ``dest`` (gzip, mtime 0), without DROPPED and /dev's nodes.

    Read with the store's bounded-header reader: the packages' content is the archive's, not ours.
    """
    try:
        with open(dest, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=6) as gz, \
                unpack.open_stream(stream) as src, \
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as out:
            for m in src:
                src.members.clear()  # type: ignore[attr-defined]  # a stream reader keeps every entry otherwise
                name = m.name.removeprefix("./").rstrip("/")
                if name in DROPPED or (name.startswith("dev/") and not m.isdir()):
                    continue
                out.addfile(m, src.extractfile(m) if m.isreg() else None)
    except (tarfile.TarError, EOFError) as e:
        raise ImageError(f"mmdebstrap's output is not a tar archive: {e}") from e
