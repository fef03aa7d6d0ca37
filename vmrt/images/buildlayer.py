"""The layers a Dockerfile build makes: a RUN step's writable layer, and what COPY/ADD copy.

A RUN step's overlay upper dir was written by the build's own (untrusted) code. It is read
through directory fds opened ``O_NOFOLLOW``: a symbolic link is stored as a link and never
followed, a file is opened ``O_NOFOLLOW|O_NONBLOCK`` and stored only if the opened fd is a
regular file, a FIFO is stored as a FIFO (never opened). Overlay whiteouts (0:0 character
devices) become ``.wh.NAME``, opaque directories ``.wh..wh..opq``, hard links stay links; other
device nodes and sockets are left out with a notice; ``user.*`` and ``security.capability``
xattrs of files and directories go into the tar as PAX ``SCHILY.xattr.*`` records (what the
safe unpacker applies again, vmrt/images/unpack.py).

A VM step's writable layer is not read here at all: its guest walks it and streams the entries
(vmrt/agent/walk.py, ``ContentParser``), and :func:`add_upper` turns each into layer entries by
the same rules as :func:`from_upper`.

COPY and ADD read a source tree (the build context, or an earlier stage's root mounted
read-only) the same way below the source path, which itself is resolved inside its root
(``RESOLVE_IN_ROOT``: a link never leads out).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fnmatch
import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from .. import safefs
from ..errors import ImageError, UsageError
from . import store as st

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."
CHUNK = 1 << 20
# what the runtime bind-mounts over (it creates an empty file to mount on where the image has
# none): never the step's own content, as Docker leaves them out
MOUNTPOINTS = {"etc/hostname", "etc/hosts", "etc/resolv.conf"}
MAX_DEPTH = 256  # directory levels a build layer may have (each level holds an fd and a frame)


class LayerTar:
    """A layer tar being written to a temporary file; :meth:`store` gzips it into the store.
    ``digest`` hashes what the entries are (names, types, modes, owners, link targets, file
    contents; not times): the build cache's key of a COPY. Nothing per entry stays in memory
    but a 16-byte digest of its name (:meth:`has`): tarfile's own list of members is emptied
    after each entry (a step's layer may list hundreds of thousands)."""

    def __init__(self, tmp_dir: Path) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=tmp_dir, prefix="build-layer-")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8")
        self.meta = hashlib.sha256()
        self.names: set[bytes] = set()
        self.count = 0

    def has(self, name: str) -> bool:
        """Whether an entry named ``name`` is in the layer."""
        return _name_key(name) in self.names

    def close(self) -> None:
        self.tar.close()
        self.file.close()

    def _note(self, ti: tarfile.TarInfo, content: str = "") -> None:
        fields: tuple[Any, ...] = (ti.name, ti.type, ti.mode, ti.uid, ti.gid, ti.linkname, ti.size, content)
        if ti.pax_headers:
            fields += (sorted(ti.pax_headers.items()),)
        self.meta.update(repr(fields).encode() + b"\n")
        self.names.add(_name_key(ti.name))
        self.count += 1
        self.tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every TarInfo written (as unpack.extract)

    def add(self, ti: tarfile.TarInfo, fd: int | None = None) -> None:
        """An entry; a regular file's content read from ``fd`` (``ti.size`` bytes: the fstat)."""
        ti.uname = ti.gname = ""
        if fd is None:
            self.tar.addfile(ti)
            self._note(ti)
            return
        h = hashlib.sha256()
        with os.fdopen(os.dup(fd), "rb") as f:
            reader = _Hashing(f, h, ti.size)
            self.tar.addfile(ti, reader)
        self._note(ti, h.hexdigest())

    def add_stream(self, ti: tarfile.TarInfo, reader: Any) -> None:
        """A regular file's ``ti.size`` bytes read from ``reader`` (``read(n)``)."""
        ti.uname = ti.gname = ""
        h = hashlib.sha256()
        self.tar.addfile(ti, _Hashing(reader, h, ti.size))
        self._note(ti, h.hexdigest())

    def add_data(self, ti: tarfile.TarInfo, data: bytes) -> None:
        ti.uname = ti.gname = ""
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))
        self._note(ti, hashlib.sha256(data).hexdigest())

    def store(self, store: st.Store) -> tuple[dict[str, Any], str]:
        """The layer gzipped into the store: (its descriptor, its diff id)."""
        self.tar.close()
        self.file.seek(0)
        h = hashlib.sha256()
        with store.blob_writer() as bw:
            with gzip.GzipFile(fileobj=_Sink(bw), mode="wb", mtime=0, compresslevel=6) as gz:
                while chunk := self.file.read(CHUNK):
                    h.update(chunk)
                    gz.write(chunk)
        return {"mediaType": st.MT_OCI_LAYER_GZIP, "digest": bw.digest, "size": bw.size}, "sha256:" + h.hexdigest()


def distinct(store: st.Store, layer: tuple[dict[str, Any], str], note: str) -> tuple[dict[str, Any], str]:
    """``layer`` again with a PAX global header (a ``comment``) in front: the same entries,
    another diff ID, for a stage that has the very same layer below (overlayfs refuses a lower
    dir twice; each diff ID is one unpacked dir)."""
    desc, _ = layer
    head = tarfile.TarInfo.create_pax_global_header({"comment": f"vmrt: {note}"[:200]})
    h = hashlib.sha256(head)
    with gzip.open(store.blob_path(desc["digest"]), "rb") as src, store.blob_writer() as bw:
        with gzip.GzipFile(fileobj=_Sink(bw), mode="wb", mtime=0, compresslevel=6) as gz:
            gz.write(head)
            while chunk := src.read(CHUNK):
                h.update(chunk)
                gz.write(chunk)
    return {"mediaType": st.MT_OCI_LAYER_GZIP, "digest": bw.digest, "size": bw.size}, "sha256:" + h.hexdigest()


def _name_key(name: str) -> bytes:
    return hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=16).digest()


class _Sink:
    """A blob writer as a file gzip writes to."""

    def __init__(self, w: st.BlobWriter) -> None:
        self.w = w

    def write(self, data: bytes) -> int:
        return self.w.write(data)

    def flush(self) -> None:
        pass


class _Hashing:
    """A file read for tarfile (at most ``size`` bytes: a file that grew adds nothing, one that
    shrank is padded by tarfile's own check failing: an error)."""

    def __init__(self, f: IO[bytes], h: Any, size: int) -> None:
        self.f, self.h, self.left = f, h, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        b = self.f.read(n)
        self.left -= len(b)
        self.h.update(b)
        return b


def _info(name: str, s: os.stat_result, *, uid: int | None = None, gid: int | None = None,
          mode: int | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = stat.S_IMODE(s.st_mode) if mode is None else mode
    ti.uid = s.st_uid if uid is None else uid
    ti.gid = s.st_gid if gid is None else gid
    ti.mtime = int(s.st_mtime)
    return ti


def _entries(dfd: int) -> list[tuple[str, os.stat_result]]:
    out = []
    for name in sorted(os.listdir(dfd)):
        try:
            out.append((name, os.stat(name, dir_fd=dfd, follow_symlinks=False)))
        except FileNotFoundError:
            continue
    return out


def _open_dir(name: str, dfd: int) -> int:
    return os.open(name, DIR_FLAGS, dir_fd=dfd)


# --- a RUN step's writable layer ---------------------------------------------------------------
def from_upper(upper: Path, layer: LayerTar, notice: Callable[[str], None], stubs: set[str] | None = None) -> None:
    """The overlay upper dir ``upper`` (untrusted) as layer entries; ``stubs`` (relative paths):
    mount points the step's mounts made, left out where the step left them empty."""
    try:
        top = os.open(upper, DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        links: dict[tuple[int, int], str] = {}
        _walk_upper(top, "", layer, links, notice, stubs or set())
    except OSError as e:
        raise ImageError(f"cannot read the step's writable layer: {e}") from e
    finally:
        os.close(top)


def _walk_upper(dfd: int, prefix: str, layer: LayerTar, links: dict[tuple[int, int], str],
                notice: Callable[[str], None], stubs: set[str]) -> None:
    _check_depth(prefix)
    if prefix and _xattr(dfd, "trusted.overlay.opaque") == b"y":
        layer.add_data(_plain(prefix + OPAQUE), b"")
    for name, s in _entries(dfd):
        path = prefix + name
        if stat.S_ISCHR(s.st_mode) and s.st_rdev == 0:  # an overlay whiteout: the lower path is deleted
            layer.add_data(_plain(prefix + WHITEOUT + name), b"")
        elif stat.S_ISDIR(s.st_mode):
            sub = _open_dir(name, dfd)
            try:
                if path in stubs and _only_stubs(sub, path + "/", stubs):
                    continue
                if _xattr(sub, "trusted.overlay.redirect") is not None:
                    raise ImageError(f"the build step renamed the directory /{path} of a lower layer: "
                                     "overlayfs redirect_dir is not supported in builds")
                ds = os.fstat(sub)
                ti = _info(path, ds)
                ti.type = tarfile.DIRTYPE
                set_xattrs(ti, _kept_xattrs(sub), notice)
                layer.add(ti)
                _walk_upper(sub, path + "/", layer, links, notice, stubs)
            finally:
                os.close(sub)
        elif stat.S_ISLNK(s.st_mode):
            ti = _info(path, s)
            ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dfd)
            layer.add(ti)
        elif stat.S_ISREG(s.st_mode):
            if (path in MOUNTPOINTS or path in stubs) and s.st_size == 0:
                continue
            _add_file(dfd, name, path, s, layer, links, notice, xattrs=True)
        elif stat.S_ISFIFO(s.st_mode):
            ti = _info(path, s)
            ti.type = tarfile.FIFOTYPE
            layer.add(ti)
        else:
            what = "socket" if stat.S_ISSOCK(s.st_mode) else "device node"
            notice(f"skipping the {what} /{path} the step left: a build layer holds no {what}s")


def _only_stubs(dfd: int, prefix: str, stubs: set[str]) -> bool:
    """Whether the directory holds nothing but empty mount stubs (and is no opaque one)."""
    _check_depth(prefix)
    if _xattr(dfd, "trusted.overlay.opaque") == b"y":
        return False
    for name, s in _entries(dfd):
        path = prefix + name
        if path not in stubs:
            return False
        if stat.S_ISREG(s.st_mode) and s.st_size == 0:
            continue
        if not stat.S_ISDIR(s.st_mode):
            return False
        sub = _open_dir(name, dfd)
        try:
            if not _only_stubs(sub, path + "/", stubs):
                return False
        finally:
            os.close(sub)
    return True


def _add_file(dfd: int, name: str, path: str, s: os.stat_result, layer: LayerTar,
              links: dict[tuple[int, int], str], notice: Callable[[str], None], xattrs: bool = False,
              **owner: int | None) -> None:
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
            notice(f"skipping /{path}: it changed while it was read")
            return
        raise
    try:
        fs = os.fstat(fd)
        if not stat.S_ISREG(fs.st_mode):
            notice(f"skipping /{path}: not a regular file when opened")
            return
        key = (fs.st_dev, fs.st_ino)
        ti = _info(path, fs, **owner)
        if fs.st_nlink > 1 and key in links:
            ti.type, ti.linkname = tarfile.LNKTYPE, links[key]
            layer.add(ti)
            return
        if fs.st_nlink > 1:
            links[key] = path
        ti.size = fs.st_size
        if xattrs:
            set_xattrs(ti, _kept_xattrs(fd), notice)
        layer.add(ti, fd)
    finally:
        os.close(fd)


def _check_depth(prefix: str) -> None:
    if prefix.count("/") > MAX_DEPTH:
        raise ImageError(f"directory tree deeper than {MAX_DEPTH} levels at /{prefix[:200]}...: refused")


def _plain(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime = 0o644, 0
    return ti


def _kept_xattrs(fd: int) -> dict[str, bytes]:
    """The xattrs of ``fd`` a layer carries: ``user.*`` and ``security.capability``."""
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(fd)
    except OSError:
        return out
    for n in sorted(names):
        if n.startswith("user.") or n == "security.capability":
            v = _xattr(fd, n)
            if v is not None:
                out[n] = v
    return out


def xattr_name_ok(name: str) -> bool:
    """Whether a PAX record can carry the xattr name: UTF-8 (tarfile encodes keywords strictly:
    ``user.\\xff`` raised UnicodeEncodeError) without ``=`` (it ends a PAX keyword: the name
    would come back cut there, the rest in its value)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "=" not in name


def set_xattrs(ti: tarfile.TarInfo, xattrs: dict[str, bytes], notice: Callable[[str], None]) -> None:
    """``xattrs`` as the entry's PAX ``SCHILY.xattr.NAME`` records (a binary value, a file
    capability, kept byte for byte: tarfile writes it back with surrogateescape); a name a PAX
    record cannot carry (:func:`xattr_name_ok`) is left out with a notice."""
    if not xattrs:
        return
    pax = dict(ti.pax_headers)
    for n, v in sorted(xattrs.items()):
        if not xattr_name_ok(n):
            notice(f"skipping the xattr {n.encode('utf-8', 'surrogateescape')[:100]!r} of /{ti.name[:200]}: "
                   "a layer carries only UTF-8 xattr names without '='")
            continue
        pax[XATTR_PREFIX + n] = v.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax


# --- a VM step's writable layer, as its guest streamed it -------------------------------------
# what the guest agent itself writes into a VM container's root before its process runs (the
# managed names, vmrt's and Docker's bind mounts in process mode): never a step's content
VM_WRITTEN = frozenset(MOUNTPOINTS)


def add_upper(layer: LayerTar, path: str, mode: int, *, uid: int, gid: int, mtime: int, rdev: int = 0,
              opaque: bool = False, link: str = "", hardlink: bool = False, xattrs: dict[str, bytes] | None = None,
              size: int = 0, data: IO[bytes] | Any = None, notice: Callable[[str], None],
              skipped: set[str] | None = None) -> None:
    """One entry of a writable layer as the guest listed it (already checked: a relative path of
    clean components, its directory listed before it) into the layer, by :func:`from_upper`'s
    rules: a 0:0 character device is a whiteout, an opaque directory gets its marker, a hard
    link names the path listed first, other devices and sockets are left out with a notice,
    and what the agent wrote itself (:data:`VM_WRITTEN`) is no content, nor a hard link of that
    name. ``data``: a regular file's ``size`` bytes (a reader). ``skipped``: the regular files
    left out so far (the caller's too: empty mount stubs), added to here; a hard link to one is
    left out with a notice (its target is in no layer)."""
    skipped = set() if skipped is None else skipped
    prefix, _, name = path.rpartition("/")
    prefix = prefix + "/" if prefix else ""
    ti = tarfile.TarInfo(path)
    ti.mode, ti.uid, ti.gid, ti.mtime = stat.S_IMODE(mode), uid, gid, max(0, min(mtime, 1 << 33))
    if stat.S_ISCHR(mode) and rdev == 0:
        layer.add_data(_plain(prefix + WHITEOUT + name), b"")
    elif stat.S_ISDIR(mode):
        ti.type = tarfile.DIRTYPE
        set_xattrs(ti, xattrs or {}, notice)
        layer.add(ti)
        if opaque:
            layer.add_data(_plain(path + "/" + OPAQUE), b"")
    elif hardlink:
        if path in VM_WRITTEN or link in skipped:
            notice(f"skipping the hard link /{path} to /{link}: " +
                   ("a name the runtime writes" if path in VM_WRITTEN else "its target is not in the layer"))
            skipped.add(path)
            return
        ti.type, ti.linkname = tarfile.LNKTYPE, link
        layer.add(ti)
    elif stat.S_ISLNK(mode):
        ti.type, ti.linkname = tarfile.SYMTYPE, link
        layer.add(ti)
    elif stat.S_ISREG(mode):
        if path in VM_WRITTEN:
            skipped.add(path)
            return
        ti.size = size
        set_xattrs(ti, xattrs or {}, notice)
        layer.add_stream(ti, data)
    elif stat.S_ISFIFO(mode):
        ti.type = tarfile.FIFOTYPE
        layer.add(ti)
    else:
        what = "socket" if stat.S_ISSOCK(mode) else "device node"
        notice(f"skipping the {what} /{path} the step left: a build layer holds no {what}s")


def _xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


# --- COPY / ADD sources -----------------------------------------------------------------------
def glob(root_fd: int, pattern: str, keep: Callable[[str], bool]) -> list[str]:
    """The paths (relative, ``/``-separated) that ``pattern`` matches under ``root_fd``, a
    component at a time as Go's filepath.Glob; ``keep`` filters (``.dockerignore``)."""
    parts = [p for p in os.path.normpath("/" + pattern).split("/") if p]
    found = [""]
    for i, part in enumerate(parts):
        nxt = []
        for base in found:
            if not any(c in part for c in "*?["):
                cand = [part]
            else:
                try:
                    dfd = safefs.open_in_root(root_fd, base or ".", os.O_RDONLY | os.O_DIRECTORY)
                except OSError:
                    continue
                try:
                    cand = sorted(n for n in os.listdir(dfd) if fnmatch.fnmatchcase(n, part))
                finally:
                    os.close(dfd)
            for c in cand:
                rel = f"{base}/{c}" if base else c
                if i == len(parts) - 1 and (safefs.stat_in_root(root_fd, rel, follow=False) is None or not keep(rel)):
                    continue
                nxt.append(rel)
        found = nxt
    return found


def tree_digest(root_fd: int, rel: str, keep: Callable[[str], bool]) -> tuple[str, bool]:
    """What ``rel`` under ``root_fd`` holds (resolved inside it), hashed as COPY's cache key
    hashes (names, types, modes, owners, link targets, contents; not times) without writing a
    layer: a ``RUN --mount=type=bind`` step's key. And whether ``keep`` left anything out."""
    h = hashlib.sha256()
    left_out = [False]
    try:
        fd = safefs.open_in_root(root_fd, rel or ".", os.O_PATH)
    except OSError as e:
        raise UsageError(f"--mount: source /{rel}: {e.strerror}") from None
    try:
        s = os.fstat(fd)
        if stat.S_ISDIR(s.st_mode):
            dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _digest_tree(dfd, rel, "", h, keep, left_out)
            finally:
                os.close(dfd)
        elif stat.S_ISREG(s.st_mode):
            rfd = safefs.open_regular(root_fd, rel)
            if rfd is None:
                raise UsageError(f"--mount: source /{rel}: not a regular file")
            try:
                _digest_file(rfd, h)
            finally:
                os.close(rfd)
        else:
            raise UsageError(f"--mount: source /{rel} is not a file or directory")
    finally:
        os.close(fd)
    return h.hexdigest(), left_out[0]


def _digest_file(fd: int, h: Any) -> None:
    while chunk := os.read(fd, CHUNK):
        h.update(chunk)


def _digest_tree(dfd: int, src_prefix: str, prefix: str, h: Any, keep: Callable[[str], bool],
                 left_out: list[bool]) -> None:
    _check_depth(prefix)
    for name, s in _entries(dfd):
        src = f"{src_prefix}/{name}" if src_prefix else name
        if not keep(src):
            left_out[0] = True
            continue
        path = prefix + name
        link = os.readlink(name, dir_fd=dfd) if stat.S_ISLNK(s.st_mode) else ""
        h.update(repr((path, stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, link,
                       s.st_size if stat.S_ISREG(s.st_mode) else 0)).encode() + b"\n")
        if stat.S_ISDIR(s.st_mode):
            sub = _open_dir(name, dfd)
            try:
                _digest_tree(sub, src, path + "/", h, keep, left_out)
            finally:
                os.close(sub)
        elif stat.S_ISREG(s.st_mode):
            try:
                fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
                    continue
                raise
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    _digest_file(fd, h)
            finally:
                os.close(fd)


def copy_source(root_fd: int, rel: str, dest: str, layer: LayerTar, *, into_dir: bool, uid: int | None,
                gid: int | None, chmod: int | None, keep: Callable[[str], bool],
                notice: Callable[[str], None], dest_exists: bool = False) -> None:
    """``rel`` (a file, link or directory under ``root_fd``) copied to ``dest`` (absolute):
    a directory's contents go into ``dest``; a file becomes ``dest`` or, with ``into_dir``,
    ``dest/NAME``. ``uid``/``gid`` None keep the source's owner (an earlier stage's files).
    ``dest_exists``: a directory ``dest`` already in the image keeps its own metadata."""
    dest_rel = dest.strip("/")
    try:
        s = safefs.stat_in_root(root_fd, rel or ".", follow=True)
    except OSError as e:
        raise UsageError(f"{rel}: {e.strerror}") from e
    if s is None:
        raise UsageError(f"{rel}: no such file or directory")
    if stat.S_ISDIR(s.st_mode):
        dfd = safefs.open_in_root(root_fd, rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            if dest_rel and not layer.has(dest_rel) and not dest_exists:
                ti = _info(dest_rel, os.fstat(dfd), uid=uid, gid=gid, mode=chmod)
                ti.type = tarfile.DIRTYPE
                layer.add(ti)
            _copy_tree(dfd, rel, dest_rel + "/" if dest_rel else "", layer, uid, gid, chmod, keep, {}, notice)
        finally:
            os.close(dfd)
        return
    name = rel.rsplit("/", 1)[-1]
    target = f"{dest_rel}/{name}" if into_dir else dest_rel
    if not target:
        raise UsageError(f"cannot copy {rel} onto /")
    parent, _, base = rel.rpartition("/")
    if stat.S_ISREG(s.st_mode):  # the source path itself is followed, inside its root (as buildkit)
        fd = safefs.open_regular(root_fd, rel)
        if fd is None:
            raise UsageError(f"{rel}: not a regular file")
        try:
            fs = os.fstat(fd)
            ti = _info(target.lstrip("/"), fs, uid=uid, gid=gid, mode=chmod)
            ti.size = fs.st_size
            layer.add(ti, fd)
        finally:
            os.close(fd)
        return
    pfd = safefs.open_in_root(root_fd, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        ls = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        _copy_entry(pfd, base, ls, target.lstrip("/"), layer, uid, gid, chmod, {}, notice)
    finally:
        os.close(pfd)


def _copy_tree(dfd: int, src_prefix: str, prefix: str, layer: LayerTar, uid: int | None, gid: int | None,
               chmod: int | None, keep: Callable[[str], bool], links: dict[tuple[int, int], str],
               notice: Callable[[str], None]) -> None:
    _check_depth(prefix)
    for name, s in _entries(dfd):
        src = f"{src_prefix}/{name}" if src_prefix else name
        if not keep(src):
            continue
        path = prefix + name
        if stat.S_ISDIR(s.st_mode):
            sub = _open_dir(name, dfd)
            try:
                ti = _info(path, os.fstat(sub), uid=uid, gid=gid, mode=chmod)
                ti.type = tarfile.DIRTYPE
                layer.add(ti)
                _copy_tree(sub, src, path + "/", layer, uid, gid, chmod, keep, links, notice)
            finally:
                os.close(sub)
        else:
            _copy_entry(dfd, name, s, path, layer, uid, gid, chmod, links, notice)


def _copy_entry(dfd: int, name: str, s: os.stat_result, path: str, layer: LayerTar, uid: int | None,
                gid: int | None, chmod: int | None, links: dict[tuple[int, int], str],
                notice: Callable[[str], None]) -> None:
    if stat.S_ISLNK(s.st_mode):
        ti = _info(path, s, uid=uid, gid=gid)
        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dfd)
        layer.add(ti)
    elif stat.S_ISREG(s.st_mode):
        _add_file(dfd, name, path, s, layer, links, notice, uid=uid, gid=gid, mode=chmod)
    elif stat.S_ISFIFO(s.st_mode):
        ti = _info(path, s, uid=uid, gid=gid, mode=chmod)
        ti.type = tarfile.FIFOTYPE
        layer.add(ti)
    else:
        notice(f"skipping /{path}: a device node or socket is not copied")


def parents(layer: LayerTar, dest: str, uid: int, gid: int) -> None:
    """The directories above ``dest`` (absolute), as COPY creates missing ones (0755)."""
    parts = [p for p in dest.split("/") if p]
    for k in range(1, len(parts)):
        name = "/".join(parts[:k])
        if layer.has(name):
            continue
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = tarfile.DIRTYPE, 0o755, uid, gid, 0
        layer.add(ti)


# --- ADD of a local archive ---------------------------------------------------------------------
def is_archive(root_fd: int, rel: str) -> bool:
    fd = safefs.open_regular(root_fd, rel)
    if fd is None:
        return False
    try:
        with os.fdopen(fd, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return True
    return len(head) == 512 and head[257:262] == b"ustar"


def extract_archive(root_fd: int, rel: str, dest: str, layer: LayerTar, uid: int | None = None,
                    gid: int | None = None) -> None:
    """ADD's local tar archive (gzip, bzip2, xz or plain), its entries moved under ``dest``:
    names are cleaned (no ``..`` above ``dest``), hard links must point inside it; devices
    are left out. Owners are the archive's, as Docker keeps them, unless ``uid``/``gid`` (--chown)."""
    fd = safefs.open_regular(root_fd, rel)
    if fd is None:
        raise UsageError(f"{rel}: not a regular file")
    base = dest.strip("/")
    with os.fdopen(fd, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tf:
                for ti in tf:
                    name = _clean(ti.name)
                    if name is None or ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                        continue
                    out = tarfile.TarInfo(f"{base}/{name}" if base else name)
                    out.type, out.mode, out.mtime = ti.type, ti.mode, int(ti.mtime)
                    out.uid = ti.uid if uid is None else uid
                    out.gid = ti.gid if gid is None else gid
                    if ti.issym():
                        out.linkname = ti.linkname
                    if ti.islnk():
                        target = _clean(ti.linkname)
                        if target is None:
                            continue
                        out.linkname = f"{base}/{target}" if base else target
                    if ti.isreg():
                        src = tf.extractfile(ti)
                        layer.add_data(out, src.read() if src is not None else b"")
                    elif ti.isdir() or ti.issym() or ti.islnk() or ti.isfifo():
                        layer.add(out)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UsageError(f"{rel}: cannot extract the archive: {e}") from e


def _clean(name: str) -> str | None:
    parts: list[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                continue
            parts.pop()
            continue
        parts.append(p)
    return "/".join(parts) or None


# --- ADD of a URL ------------------------------------------------------------------------------------
MAX_DOWNLOAD = 8 << 30  # bytes an ADD may download


def download(url: str, name: str, layer: LayerTar, *, uid: int, gid: int, mode: int | None,
             checksum: str | None, tmp_dir: Path) -> None:
    """ADD's URL (http or https) as the file ``name`` (relative): mode 0600 unless ``--chmod``,
    its time the Last-Modified header's; at most :data:`MAX_DOWNLOAD` bytes; with ``checksum``
    (``sha256:HEX``) the content must hash to it."""
    import requests  # on use: only an ADD of a URL needs it

    if checksum is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", checksum):
        raise UsageError(f"invalid --checksum {checksum!r}: use sha256:<64 hex digits>")
    h = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=(30, 120)) as r, \
                tempfile.TemporaryFile(dir=tmp_dir, prefix="build-download-") as f:
            if r.status_code != 200:
                raise UsageError(f"failed to GET {url} with status {r.status_code} {r.reason}")
            size = 0
            for chunk in r.iter_content(CHUNK):
                size += len(chunk)
                if size > MAX_DOWNLOAD:
                    raise UsageError(f"{url}: larger than {MAX_DOWNLOAD} bytes: refused")
                h.update(chunk)
                f.write(chunk)
            if checksum is not None and "sha256:" + h.hexdigest() != checksum:
                raise UsageError(f"digest mismatch for {url}: expected {checksum}, got sha256:{h.hexdigest()}")
            when = 0
            with contextlib.suppress(TypeError, ValueError):
                when = int(email.utils.parsedate_to_datetime(r.headers.get("Last-Modified", "")).timestamp())
            f.seek(0)
            ti = tarfile.TarInfo(name)
            ti.mode, ti.uid, ti.gid, ti.mtime, ti.size = 0o600 if mode is None else mode, uid, gid, when, size
            layer.add(ti, f.fileno())
    except requests.RequestException as e:
        raise UsageError(f"failed to GET {url}: {e}") from e


def url_name(url: str) -> str:
    """The file name an ADD of ``url`` into a directory gets: its path's last component."""
    name = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"cannot determine a file name from the URL {url!r}: give one in the destination")
    return name
