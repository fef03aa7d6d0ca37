"""Safe extraction of OCI layer tars into a directory.

Every path is resolved the way the container will see it (symlinks followed
*inside* the root, ``..`` clamped at the root), so no entry can write outside
the destination. Entries with absolute names or ``..`` components, relative
symlinks that climb out of the root, and hard links to missing or outside
files refuse the whole layer. OCI whiteouts become overlayfs whiteouts
(character device 0/0) and opaque markers (``trusted.overlay.opaque``), so
unpacked layers can be stacked with overlayfs.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import tarfile
from pathlib import Path
from typing import IO

from ..errors import ImageError

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."


MAX_HEADER = 1 << 20  # a PAX/GNU long-name header body held in memory at once


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a PAX or GNU long-name header's body whole: refuse absurd ones.

    A few KB of gzip can otherwise claim a multi-GB extended header (a memory
    bomb), and the bytes are parsed before any digest could be checked.
    """

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and self.size > MAX_HEADER:
            raise ImageError(f"tar header of {self.size} bytes refused (at most {MAX_HEADER})")
        return super()._proc_member(tf)  # type: ignore[misc]


def open_stream(fileobj: IO[bytes]) -> tarfile.TarFile:
    """A streaming tar reader with bounded headers."""
    return tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=BoundedTarInfo)


def _clean_name(name: str) -> str:
    if name.startswith("/"):
        raise ImageError(f"layer entry has an absolute path: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ImageError(f"layer entry escapes the root: {name!r}")
    return "/".join(parts)


def resolve_in_root(root: str, rel: str, *, follow_last: bool = True, strict: bool = False,
                    _depth: int = 0) -> str:
    """Resolve ``rel`` inside ``root`` as chroot(root) would; returns a host path.

    ``strict`` (used while unpacking) refuses a path that passes through a symlink
    with an absolute target: extracted naively, that entry would land outside the
    root, and no layer made from a real file system diff contains one.
    """
    if _depth > 40:
        raise ImageError(f"too many levels of symbolic links resolving {rel!r}")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    cur: list[str] = []
    for i, part in enumerate(parts):
        if part == "..":
            if cur:
                cur.pop()
            continue
        candidate = os.path.join(root, *cur, part)
        last = i == len(parts) - 1
        if os.path.islink(candidate) and (follow_last or not last):
            target = os.readlink(candidate)
            if strict and target.startswith("/"):
                raise ImageError(f"layer entry {rel!r} passes through symlink {'/'.join([*cur, part])!r} "
                                 f"-> {target!r} (outside the root)")
            base = "" if target.startswith("/") else "/".join(cur)
            rest = "/".join(parts[i + 1:])
            joined = posixpath.join(base, target, rest) if rest else posixpath.join(base, target)
            return resolve_in_root(root, joined, follow_last=follow_last, strict=strict, _depth=_depth + 1)
        cur.append(part)
    return os.path.join(root, *cur)


def _check_symlink(name: str, target: str) -> None:
    if target.startswith("/"):
        return  # absolute targets are interpreted inside the container root
    depth = len(name.split("/")) - 1
    for p in target.split("/"):
        if p == "..":
            depth -= 1
            if depth < 0:
                raise ImageError(f"symlink {name!r} -> {target!r} points outside the root")
        elif p not in ("", "."):
            depth += 1


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def remove_tree(path: Path | str) -> None:
    """Remove an unpacked tree (never following symlinks); a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The entry's PAX ``SCHILY.xattr.*`` records vmrt applies.

    ``user.*`` and file capabilities are kept; ``trusted.*`` (overlayfs reads its
    own metadata there: a forged ``trusted.overlay.*`` could redirect lookups) and
    other namespaces are dropped, as container engines do for rootless stores.
    """
    out = []
    for key, value in m.pax_headers.items():
        if not key.startswith(XATTR_PREFIX):
            continue
        name = key[len(XATTR_PREFIX):]
        if name.startswith("user.") or name == "security.capability":
            out.append((name, value.encode("utf-8", "surrogateescape")))
    return out


def _make_parents(root: str, path: str) -> None:
    """Create the directories up to ``path`` (inside ``root``) that the layer left out.

    Mode 0755, as containerd and Docker make them, never vmrt's umask: in an overlay the
    topmost layer holding a directory gives its mode, so a 0700 parent made here would
    hide the lower layers' ``/usr`` or ``/var/lib`` from the image's non-root users.
    """
    if path == root or os.path.isdir(path):
        return
    _make_parents(root, os.path.dirname(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o755)
        os.chmod(path, 0o755)  # mkdir's mode passes through the umask


def extract(fileobj: IO[bytes], dest: Path) -> None:
    """Extract the (possibly compressed) layer tar in ``fileobj`` into ``dest``."""
    root = str(dest)
    dirs: list[tuple[str, tarfile.TarInfo]] = []
    try:
        tf = open_stream(fileobj)
    except tarfile.TarError as e:
        raise ImageError(f"layer is not a tar archive: {e}") from e
    try:
        for m in tf:
            tf.members.clear()  # type: ignore[attr-defined]  # stream mode keeps every TarInfo otherwise: memory grows per entry
            name = _clean_name(m.name)
            if not name:
                continue
            parent_rel, base = posixpath.split(name)
            parent = resolve_in_root(root, parent_rel, strict=True)
            _make_parents(root, parent)
            if not os.path.isdir(parent):
                raise ImageError(f"layer entry {name!r}: parent is not a directory")
            path = os.path.join(parent, base)
            if base == WH_OPAQUE:
                os.setxattr(parent, "trusted.overlay.opaque", b"y")
                continue
            if base.startswith(WH_PREFIX):
                if base[len(WH_PREFIX):] in ("", ".", ".."):
                    raise ImageError(f"layer entry {name!r} is a whiteout of nothing (or of its own directory)")
                victim = os.path.join(parent, base[len(WH_PREFIX):])
                _remove(victim)
                os.mknod(victim, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                continue
            if m.isdir():
                if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                    _remove(path)
                os.makedirs(path, exist_ok=True)
                dirs.append((path, m))
                continue
            if os.path.lexists(path):
                _remove(path)
            if m.isreg():
                src = tf.extractfile(m)
                assert src is not None
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
            elif m.issym():
                _check_symlink(os.path.relpath(path, root), m.linkname)
                os.symlink(m.linkname, path)
            elif m.islnk():
                target = resolve_in_root(root, _clean_name(m.linkname), follow_last=False, strict=True)
                if not os.path.isfile(target) or os.path.islink(target):
                    raise ImageError(f"hard link {name!r} -> {m.linkname!r} has no target in the layer")
                os.link(target, path)
            elif m.ischr() or m.isblk():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(path, kind | (m.mode & 0o7777), os.makedev(m.devmajor, m.devminor))
            elif m.isfifo():
                os.mkfifo(path, m.mode & 0o7777)
            else:
                raise ImageError(f"layer entry {name!r} has an unsupported type")
            if m.islnk():  # the entry's metadata belongs to the target's inode, already set
                continue
            os.lchown(path, m.uid, m.gid)
            for xname, xvalue in _xattrs(m):
                os.setxattr(path, xname, xvalue, follow_symlinks=False)
            if not m.issym():
                os.chmod(path, m.mode & 0o7777)
                os.utime(path, (m.mtime, m.mtime))
    except (tarfile.TarError, EOFError, OSError, OverflowError, ValueError) as e:
        raise ImageError(f"cannot extract layer: {e}") from e
    finally:
        tf.close()
    for path, m in reversed(dirs):  # a later entry may have replaced it: never follow a link
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            os.fchown(fd, m.uid, m.gid)
            for xname, xvalue in _xattrs(m):
                os.setxattr(fd, xname, xvalue)
            os.fchmod(fd, m.mode & 0o7777)
            os.utime(fd, (m.mtime, m.mtime))
        except (OSError, OverflowError, ValueError) as e:
            raise ImageError(f"cannot extract layer: directory {m.name!r}: {e}") from e
        finally:
            os.close(fd)
