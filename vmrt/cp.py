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

import os
import posixpath
import tarfile
import tempfile
import threading
from pathlib import Path

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
    """tarfile's ``data`` filter, after refusing every link that could lead out at all.

    The archive comes from inside the container, so it is hostile; the data filter
    of older Python releases has known bypasses through chains of links
    (CVE-2025-4517 and relatives), so absolute or ``..`` link targets and over-long
    names are refused before it sees them.
    """
    if len(member.name) > 1024 or (member.islnk() or member.issym()) and (
            member.linkname.startswith("/") or ".." in member.linkname.split("/") or len(member.linkname) > 1024):
        raise tarfile.FilterError(f"refusing {member.name!r} -> {member.linkname!r} from the container")
    m = tarfile.data_filter(member, dest)
    if m is not None and m.isdir() and m.mode is None:  # the data filter leaves dirs to the umask:
        m = m.replace(mode=0o777 & ~fsmode.caller_umask(), deep=False)  # the user's, not vmrt's 077
    return m


def copy(cfg: Config, src: str, dest: str) -> None:
    (sref, spath), (dref, dpath) = split(src), split(dest)
    if (sref is None) == (dref is None):
        raise UsageError("copying between containers or between host paths is not supported: "
                         "give exactly one CONTAINER:PATH")
    if sref is not None:
        _from_container(cfg, sref, spath, Path(dpath))
    else:
        assert dref is not None
        _to_container(cfg, Path(spath), dref, dpath)


def _from_container(cfg: Config, ref: str, path: str, dest: Path) -> None:
    if not path.startswith("/"):
        path = "/" + path
    parent, base = posixpath.split(posixpath.normpath(path))
    if not base:
        parent, base = "/", "."
    target_dir, name = (dest, base) if dest.is_dir() else (dest.parent, dest.name)
    if not target_dir.is_dir():
        raise UsageError(f"destination directory {target_dir} does not exist")
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
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".vmrt-cp-") as tmp:
        try:
            with open(r, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
                tf.extractall(tmp, filter=_strict)
        except (tarfile.TarError, OSError) as e:
            t.join()
            if result.get("status"):
                raise VmrtError(f"cannot copy {ref}:{path}: no such file or directory in the container") from None
            raise VmrtError(f"cannot copy {ref}:{path}: {e}") from e
        finally:
            t.join()
        if "error" in result:
            raise VmrtError(str(result["error"]))
        if result.get("status"):
            raise VmrtError(f"cannot copy {ref}:{path}: no such file or directory in the container")
        got = Path(tmp) / base
        final = target_dir / (name if base != "." else dest.name)
        if final.is_dir() and not final.is_symlink() and got.is_dir():
            for child in got.iterdir():
                os.replace(child, final / child.name)
        else:
            os.replace(got, final)


def _to_container(cfg: Config, src: Path, ref: str, path: str) -> None:
    if not src.exists():
        raise UsageError(f"could not find the file {src} in the host")
    if not path.startswith("/"):
        path = "/" + path
    with open(os.devnull, "wb") as null:
        is_dir = _exec(cfg, ref, ["test", "-d", path], None, null.fileno()) == 0
    where, name = (path, src.name) if is_dir else posixpath.split(posixpath.normpath(path))
    r, w = os.pipe()

    failed: list[BaseException] = []

    def produce() -> None:
        try:
            with open(w, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                tf.add(src, arcname=name)
        except (OSError, tarfile.TarError) as e:  # unreadable source, or the container's tar gave up
            failed.append(e)
    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        with open(os.devnull, "wb") as null:
            status = _exec(cfg, ref, ["tar", "xf", "-", "-C", where or "/"], r, null.fileno())
    finally:
        os.close(r)
        t.join(timeout=5)
    if failed:
        raise VmrtError(f"cannot copy {src} to {ref}:{path}: {failed[0]}")
    if status != 0:
        raise VmrtError(f"cannot copy to {ref}:{path}: tar in the container failed (exit {status}); "
                        "does the directory exist and does the image have tar?")
