"""``vmrt cp``: files between the host and a container, both directions.

The copy runs ``tar`` inside the container through ``vmrt exec`` (runc exec, or
the guest agent in VM mode: a VM's writable layer lives in the guest, out of
the host's reach), like ``kubectl cp``; a container that is not running gets
a short tool run of ``tar`` over its files instead, in its isolation
(vmrt/offline.py). So the image needs a ``tar`` (busybox has one). On the
host, archives are read with tarfile's ``data`` filter (no absolute names, no
``..``, no links out of the destination, no device nodes, no setuid bits)
and written with Python's tarfile. Docker's naming rules apply: copying to an
existing directory puts the source inside it; otherwise the copy takes the
destination's name.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from . import fsmode
from .config import Config
from .errors import UsageError, VmrtError
from .execs import run_tool


def split(arg: str) -> tuple[str | None, str]:
    """``CONTAINER:PATH`` -> (container, path); a host path -> (None, path)."""
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None, arg
    ref, _, path = arg.partition(":")
    return ref, path


def _exec(cfg: Config, ref: str, args: list[str], stdin: int | None, stdout: int) -> int:
    """``args`` in the container as its root (as Docker's copies), running or not."""
    with open(os.devnull, "wb") as err:
        return run_tool(cfg, ref, args, (stdin if stdin is not None else stdout, stdout, err.fileno()),
                        stdin=stdin is not None)


def _strict(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's ``data`` filter, except that a symbolic link keeps its target, as ``docker cp``
    copies links (Debian's ``/etc/localtime`` is absolute): the archive comes from inside the
    container, so it is hostile, and instead nothing may be written, linked or have its mode set
    *through* a link: every name's path up to it (and the name itself, unless the entry is a link
    that replaces it) is checked with lstat in the private directory it is extracted to. That holds
    without the data filter's realpath checks, which older Python releases let chains of links
    get past (CVE-2025-4517 and relatives); over-long names and targets are refused as well.
    """
    if len(member.name) > 1024 or len(member.linkname) > 1024:
        raise tarfile.FilterError(f"refusing {member.name[:80]!r}: a name or link over 1024 bytes")
    if member.issym():
        m = tarfile.data_filter(member.replace(linkname=".", deep=False), dest)
        m = None if m is None else m.replace(linkname=member.linkname, deep=False)
    else:
        m = tarfile.data_filter(member, dest)
    if m is None:
        return None
    _through_no_link(dest, m.name, last=not m.issym())
    if m.islnk():
        _through_no_link(dest, m.linkname, last=False)
    if m.isdir() and m.mode is None:  # the data filter leaves dirs to the umask:
        m = m.replace(mode=0o777 & ~fsmode.caller_umask(), deep=False)  # the user's, not vmrt's 077
    return m


def _through_no_link(dest: str, name: str, *, last: bool) -> None:
    """Refuse ``name`` if a component already extracted under ``dest`` on its way (with ``last``:
    or at its end) is a symbolic link."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    path = dest
    for i, part in enumerate(parts if last else parts[:-1]):
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # the rest is still to be made, as directories
        if stat.S_ISLNK(st.st_mode):
            raise tarfile.FilterError(f"refusing {name!r} from the container: it goes through the link "
                                      f"{'/'.join(parts[:i + 1])!r}")


def copy(cfg: Config, src: str, dest: str, *, source_name: str | None = None) -> None:
    """``src`` -> ``dest``, one of them ``CONTAINER:PATH``. As Docker, ``-`` for the host side is a
    tar stream: ``cp - CONTAINER:DIR`` unpacks the tar on stdin into DIR (a directory), ``cp
    CONTAINER:PATH -`` writes a tar of PATH to stdout. ``source_name`` (a remote client's
    ``cp LOCAL CONTAINER:PATH``, vmrt/remote): stdin's tar holds one tree named so, copied with
    the naming rules of ``cp LOCAL CONTAINER:PATH`` as if LOCAL were here."""
    (sref, spath), (dref, dpath) = split(src), split(dest)
    if (sref is None) == (dref is None):
        raise UsageError("copying between containers or between host paths is not supported: "
                         "give exactly one CONTAINER:PATH")
    if source_name is not None and (src != "-" or source_name in ("", ".", "..") or "/" in source_name
                                    or "\0" in source_name):
        raise UsageError("--source-name goes with - as the source, and is one file name")
    if src == "-":
        assert dref is not None
        _stream_to_container(cfg, dref, dpath, source_name)
    elif dest == "-":
        assert sref is not None
        _stream_from_container(cfg, sref, spath)
    elif sref is not None:
        _from_container(cfg, sref, spath, Path(dpath))
    else:
        assert dref is not None
        _to_container(cfg, Path(spath), dref, dpath)


def source_base(path: str) -> tuple[str, str]:
    """A container path -> (its parent, its name): what ``tar -C parent name`` archives."""
    parent, base = posixpath.split(posixpath.normpath(path if path.startswith("/") else "/" + path))
    return (parent, base) if base else ("/", ".")


def host_target(dest: Path, base: str) -> tuple[Path, str]:
    """Docker's naming for a copy out to ``dest``: into it if it is a directory, else as it."""
    target_dir, name = (dest, base) if dest.is_dir() else (dest.parent, dest.name)
    if not target_dir.is_dir():
        raise UsageError(f"destination directory {target_dir} does not exist")
    return target_dir, name


def unpack_to_host(stream: BinaryIO, base: str, dest: Path, done: Callable[[BaseException | None], None]) -> None:
    """The archive of a container's ``base`` (hostile: :func:`_strict`) put at ``dest`` with
    Docker's naming; ``done(error)`` is called once the stream has ended (with the tar error, if
    any): it raises when the producer failed, before anything is moved into place."""
    target_dir, name = host_target(dest, base)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".vmrt-cp-") as tmp:
        error: BaseException | None = None
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                tf.extractall(tmp, filter=_strict)
        except (tarfile.TarError, OSError) as e:
            error = e
        if error is None:  # the archive's end padding, or what a lying tar writes after it: its writer
            with contextlib.suppress(OSError):  # must finish before ``done`` waits for it
                while stream.read(1 << 16):
                    pass
        done(error)
        if error is not None:
            raise VmrtError(f"cannot copy {base}: {error}") from error
        got = Path(tmp) / base
        if not got.exists() and not got.is_symlink():
            raise VmrtError(f"cannot copy {base}: the archive did not hold it")
        final = target_dir / (name if base != "." else dest.name)
        if final.is_dir() and not final.is_symlink() and got.is_dir():
            for child in got.iterdir():
                os.replace(child, final / child.name)
        else:
            os.replace(got, final)


def _from_container(cfg: Config, ref: str, path: str, dest: Path) -> None:
    parent, base = source_base(path)
    host_target(dest, base)  # before anything runs in the container
    r, w = os.pipe()
    result: dict[str, object] = {}

    def produce() -> None:
        try:
            member = f"./{base}" if base.startswith("-") else base  # a name, never a tar option
            result["status"] = _exec(cfg, ref, ["tar", "cf", "-", "-C", parent, member], None, w)
        except VmrtError as e:
            result["status"], result["error"] = e.exit_code, str(e)
        finally:
            os.close(w)  # the end of the archive for the reader
    t = threading.Thread(target=produce)
    t.start()

    try:
        with open(r, "rb") as f:
            def done(error: BaseException | None) -> None:
                closed = False
                if error is not None:  # refused: a container's tar still writing stops on a broken pipe
                    t.join(timeout=1.0)
                    if t.is_alive():
                        f.close()
                        closed = True
                t.join()
                if "error" in result:
                    raise VmrtError(str(result["error"]))
                if result.get("status") and not closed:
                    raise VmrtError(f"cannot copy {ref}:{path}: no such file or directory in the container")
                if error is not None:
                    raise VmrtError(f"cannot copy {ref}:{path}: {error}") from error
            unpack_to_host(f, base, dest, done)
    finally:
        t.join()


def _stream_from_container(cfg: Config, ref: str, path: str) -> None:
    """``cp CONTAINER:PATH -``: the tar of PATH on stdout, as the container's tar writes it."""
    parent, base = source_base(path)
    member = f"./{base}" if base.startswith("-") else base
    if _exec(cfg, ref, ["tar", "cf", "-", "-C", parent, member], None, 1) != 0:
        raise VmrtError(f"cannot copy {ref}:{path}: no such file or directory in the container")


def _renamed(source: BinaryIO, old: str, new: str, out: int) -> None:
    """stdin's tar of one tree ``old`` re-written into ``out`` as ``new`` (every member checked to
    be under ``old``; nothing else gets through)."""
    with open(out, "wb") as f, tarfile.open(fileobj=source, mode="r|") as tin, \
            tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            name = m.name.rstrip("/")
            if name != old and not name.startswith(old + "/"):
                raise tarfile.TarError(f"member {m.name!r} is not under {old!r}")
            m.name = new + name[len(old):]
            if m.islnk():
                if m.linkname != old and not m.linkname.startswith(old + "/"):
                    raise tarfile.TarError(f"hard link {m.name!r} leads out of {old!r}")
                m.linkname = new + m.linkname[len(old):]
            tout.addfile(m, tin.extractfile(m) if m.isreg() else None)


def _stream_to_container(cfg: Config, ref: str, path: str, source_name: str | None) -> None:
    """``cp - CONTAINER:DIR``: stdin's tar unpacked into DIR by the container's tar (as Docker,
    DIR must be a directory); with ``source_name``, ``cp SOURCE CONTAINER:PATH``'s naming."""
    if not path.startswith("/"):
        path = "/" + path
    with open(os.devnull, "wb") as null:
        is_dir = _exec(cfg, ref, ["test", "-d", path], None, null.fileno()) == 0
    if source_name is None:
        if not is_dir:
            raise UsageError(f"destination {ref}:{path} must be a directory")
        with open(os.devnull, "wb") as null:
            status = _exec(cfg, ref, ["tar", "xf", "-", "-C", path], 0, null.fileno())
        if status != 0:
            raise VmrtError(f"cannot copy to {ref}:{path}: tar in the container failed (exit {status})")
        return
    where, name = (path, source_name) if is_dir else posixpath.split(posixpath.normpath(path))

    def produce(w: int) -> None:
        with open(0, "rb", closefd=False) as src:
            _renamed(src, source_name, name, w)
    _untar_in(cfg, ref, path, where, produce, f"cannot copy to {ref}:{path}: the archive on stdin")


def _untar_in(cfg: Config, ref: str, path: str, where: str, produce: Callable[[int], None], failing: str) -> None:
    """The container's tar unpacks into ``where`` what ``produce`` writes (a tar) to the pipe it is
    given; ``failing`` begins the line when ``produce`` fails."""
    r, w = os.pipe()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            produce(w)
        except (OSError, tarfile.TarError) as e:  # unreadable source, or the container's tar gave up
            failed.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        with open(os.devnull, "wb") as null:
            status = _exec(cfg, ref, ["tar", "xf", "-", "-C", where or "/"], r, null.fileno())
    finally:
        os.close(r)
        t.join(timeout=5)
    if failed:
        raise VmrtError(f"{failing}: {failed[0]}")
    if status != 0:
        raise VmrtError(f"cannot copy to {ref}:{path}: tar in the container failed (exit {status}); "
                        "does the directory exist and does the image have tar?")


def _to_container(cfg: Config, src: Path, ref: str, path: str) -> None:
    if not src.exists():
        raise UsageError(f"could not find the file {src} in the host")
    if not path.startswith("/"):
        path = "/" + path
    with open(os.devnull, "wb") as null:
        is_dir = _exec(cfg, ref, ["test", "-d", path], None, null.fileno()) == 0
    where, name = (path, src.name) if is_dir else posixpath.split(posixpath.normpath(path))

    def produce(w: int) -> None:
        with open(w, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            tf.add(src, arcname=name)
    _untar_in(cfg, ref, path, where, produce, f"cannot copy {src} to {ref}:{path}")
