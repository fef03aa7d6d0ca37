"""What a remote command needs from LOCAL files, read here and never named to the remote host:
``build CONTEXT`` (a tar of the local context, made here), ``run``/``create --env-file`` (its
lines become ``-e`` pairs); vmrt/cli/remote.py makes the argv that carries them.

The build context is walked as Docker's client walks it: ``.dockerignore`` (vmrt's own matcher,
:class:`vmrt.images.dockerfile.Ignore`) decides what goes, so an excluded file never leaves this
host; every entry is opened relative to its directory's fd with ``O_NOFOLLOW`` and type-checked,
so a link is sent as a link and nothing outside the context is read (but the context itself and
a ``-f`` Dockerfile outside it, which the user named). The Dockerfile goes under a name of its own
(``.vmrt-dockerfile-RANDOM/NAME``, excluded by a line added to the sent ``.dockerignore``, as
Docker's ``.dockerfile.RANDOM``), so the remote ``vmrt build -f ... -`` reads the one sent and
never a file of the remote's working directory; COPY never sees it.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import stat
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .. import safefs
from ..errors import UsageError, VmrtError
from ..images.dockerfile import MAX_BYTES, Ignore, locate

MAX_DOCKERFILE = MAX_IGNORE = MAX_BYTES  # as a local build reads them
_ID = re.compile(r"sha256:[0-9a-f]{64}")
_BUILT = re.compile(r"Successfully built ([0-9a-f]{12})")
_CID = re.compile(r"[0-9a-f]{64}")


# --- run / create: --env-file ---------------------------------------------------------------------

def env_pairs(env_files: tuple[Path, ...], env: tuple[str, ...], environ: Mapping[str, str]) -> list[str]:
    """``--env-file`` lines, then ``-e`` items, as ``KEY=VALUE`` (vmrt's local parser: a ``KEY``
    alone takes this process's value, or is left out when unset here, as a local ``vmrt run``
    does; never the remote host's environment)."""
    from ..bundle import env_item_ok, read_env_file  # imported on use: --env-file alone
    out: list[str] = []
    for item in [*(x for f in env_files for x in read_env_file(f)), *env]:
        k, sep, v = item.partition("=")
        if not env_item_ok(item):
            raise UsageError(f"invalid environment variable: {item!r}")
        if sep:
            out.append(item)
        elif k in environ:
            out.append(f"{k}={environ[k]}")
    return out


# --- build: the local context ---------------------------------------------------------------------

@dataclass
class BuildContext:
    """A local build context to send: its directory, the Dockerfile's bytes and the name it goes
    under in the tar."""

    root: Path
    dockerfile: bytes
    dockerfile_name: str  # ".vmrt-dockerfile-RANDOM/NAME"
    ignore_text: str  # the .dockerignore sent: the local one (if a regular file) plus that name
    entries: list[tuple[str, os.stat_result]]  # (relative path, lstat) of what goes, parents first

    def write(self, out: BinaryIO) -> None:
        """The tar (PAX) of the context to ``out``: the walk's entries (owners 0, as Docker's),
        the .dockerignore and the Dockerfile."""
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                for rel, st in self.entries:
                    _add(tf, root_fd, rel, st)
                for name, data in ((".dockerignore", self.ignore_text.encode()),
                                   (self.dockerfile_name, self.dockerfile)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o644, int(self.root.stat().st_mtime)
                    tf.addfile(info, io.BytesIO(data))
        finally:
            os.close(root_fd)


def _open_at(root_fd: int, rel: str, flags: int) -> int:
    """``rel`` under ``root_fd``, no link followed at any step."""
    fd = os.dup(root_fd)
    try:
        *parents, leaf = rel.split("/")
        for part in parents:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(leaf, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _add(tf: tarfile.TarFile, root_fd: int, rel: str, st: os.stat_result, arcname: str | None = None,
         what: str = "the build context") -> None:
    info = tarfile.TarInfo(rel if arcname is None else arcname)
    info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
    elif stat.S_ISLNK(st.st_mode):
        parent, _, leaf = rel.rpartition("/")
        dfd = _open_at(root_fd, parent, os.O_RDONLY | os.O_DIRECTORY) if parent else os.dup(root_fd)
        try:
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(leaf, dir_fd=dfd)
        finally:
            os.close(dfd)
        tf.addfile(info)
    else:
        fd = _open_at(root_fd, rel, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise VmrtError(f"{what} changed while it was sent: {rel}")
            info.size = now.st_size
            tf.addfile(info, f)


def copy_tar(path: Path, name: str, out: BinaryIO) -> None:
    """``cp LOCAL C:PATH``: a tar (PAX) of ``path`` named ``name`` to ``out``, made as the build
    context's: a link sent as a link, every entry opened relative to its directory's fd with
    O_NOFOLLOW and checked to be what lstat saw (a link swapped in meanwhile is refused, never
    read through); sockets, fifos and devices below a directory are left out."""
    full = os.path.normpath(os.path.abspath(path))
    parent, leaf = os.path.dirname(full), os.path.basename(full)
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise VmrtError(f"{path} is not a regular file, a directory or a link")
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            _add(tf, pfd, leaf, st, name, what=str(path))
            if stat.S_ISDIR(st.st_mode):
                dfd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                try:
                    now = os.fstat(dfd)
                    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                        raise VmrtError(f"{path} changed while it was sent")
                    _tree(tf, dfd, "", name, str(path))
                finally:
                    os.close(dfd)
    finally:
        os.close(pfd)


def _tree(tf: tarfile.TarFile, dir_fd: int, prefix: str, name: str, what: str) -> None:
    for entry in sorted(os.listdir(dir_fd)):
        st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
        rel = f"{prefix}{entry}"
        if stat.S_ISDIR(st.st_mode):
            _add(tf, dir_fd, entry, st, f"{name}/{rel}", what)
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                now = os.fstat(fd)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    raise VmrtError(f"{what} changed while it was sent: {rel}")
                _tree(tf, fd, rel + "/", name, what)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            _add(tf, dir_fd, entry, st, f"{name}/{rel}", what)


def _walk(root: Path, ignore: Ignore) -> list[tuple[str, os.stat_result]]:
    """What of ``root`` goes: not excluded, directories, regular files and links (a link is never
    followed; sockets, fifos and devices are left out), each readable, sorted."""
    out: list[tuple[str, os.stat_result]] = []
    exceptions = ignore.may_hold_exceptions()

    def walk(dir_fd: int, prefix: str) -> None:
        for name in sorted(os.listdir(dir_fd)):
            rel = f"{prefix}{name}"
            if rel == ".dockerignore":  # sent as the build needs it (below)
                continue
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            excluded = ignore.excluded(rel)
            if stat.S_ISDIR(st.st_mode):
                if excluded and not exceptions:
                    continue
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                except OSError as e:
                    raise UsageError(f"error checking context: {rel}: {e.strerror}") from None
                try:
                    if not excluded:
                        out.append((rel, st))
                    walk(fd, rel + "/")
                finally:
                    os.close(fd)
            elif excluded:
                continue
            elif stat.S_ISLNK(st.st_mode):
                out.append((rel, st))
            elif stat.S_ISREG(st.st_mode):
                if not os.access(name, os.R_OK, dir_fd=dir_fd, follow_symlinks=False):
                    raise UsageError(f"error checking context: can't read {rel}: permission denied")
                out.append((rel, st))
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        walk(fd, "")
    finally:
        os.close(fd)
    return out


def build_context(context: str, dockerfile: str | None, stdin: BinaryIO | None = None) -> BuildContext:
    """The local ``CONTEXT`` directory and Dockerfile (``-f``, found as a local ``vmrt build``
    finds it; ``-f -``: read from ``stdin``), ready to send. UsageError: one line, as locally."""
    root = Path(context)
    if not root.is_dir():
        raise UsageError(f"unable to prepare context: path {context!r} not found")
    if dockerfile == "-":
        src = stdin if stdin is not None else sys.stdin.buffer
        data = src.read(MAX_DOCKERFILE + 1)
        if len(data) > MAX_DOCKERFILE:
            raise UsageError(f"the Dockerfile on stdin is over {MAX_DOCKERFILE >> 20} MiB")
        name = "Dockerfile"
    else:
        path = locate(root, dockerfile)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_DOCKERFILE + 1)
        except OSError as e:
            raise UsageError(f"unable to read the Dockerfile {str(path)!r}: {e.strerror}") from None
        if len(data) > MAX_DOCKERFILE:
            raise UsageError(f"the Dockerfile {str(path)!r} is over {MAX_DOCKERFILE >> 20} MiB")
        name = path.name
    ignore_text = ""
    if not (root / ".dockerignore").is_symlink():  # as vmrt/build.py reads it
        try:
            raw = safefs.read_regular(root, ".dockerignore", MAX_IGNORE)
        except safefs.FileTooLarge:
            raise UsageError(f".dockerignore: larger than {MAX_IGNORE >> 20} MiB") from None
        ignore_text = raw.decode(errors="replace") if raw is not None else ""
    ignore = Ignore(ignore_text)
    entries = _walk(root, ignore)
    hidden = f".vmrt-dockerfile-{secrets.token_hex(8)}"
    sent = ignore_text if ignore_text else "# made by vmrt -H: the context had none\n.dockerignore\n"
    sent = sent + ("" if sent.endswith("\n") else "\n") + hidden + "\n"
    return BuildContext(root, data, f"{hidden}/{name}", sent, entries)


def image_id(stdout_tail: bytes) -> str | None:
    """The built image's ID from the end of the remote build's stdout: the full ID (-q), or the
    short one of ``Successfully built`` (to be resolved); None if neither is there."""
    for line in reversed(stdout_tail.decode(errors="replace").splitlines()):
        line = line.strip()
        if _ID.fullmatch(line):
            return line
        m = _BUILT.fullmatch(line)
        if m:
            return m.group(1)
    return None


def full_id(text: bytes, short: str) -> str | None:
    line = text.decode(errors="replace").strip()
    return line if _ID.fullmatch(line) and line[len("sha256:"):].startswith(short) else None


def container_id(stdout_tail: bytes) -> str | None:
    """The new container's ID: the last line of a remote ``create`` or ``run -d``."""
    lines = stdout_tail.decode(errors="replace").split()
    return lines[-1] if lines and _CID.fullmatch(lines[-1]) else None
