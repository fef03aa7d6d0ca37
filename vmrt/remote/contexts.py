"""``vmrt context``: named remote hosts, as Docker's contexts.

Stored in the user's config dir (``$XDG_CONFIG_HOME/vmrt/contexts``, else
``~/.config/vmrt/contexts``), readable by the user alone: the dir 0700, each context a
``NAME.json`` file 0600 (``{"Name", "Description", "Host"}``) and ``current`` naming the context
``vmrt context use`` chose. ``default`` is this host and is not stored. Files are opened with
O_NOFOLLOW, read bounded and parsed strictly: a planted link or junk is an error, never followed;
a file or store dir owned by another user (but root) or writable by group or others is refused,
as OpenSSH's StrictModes refuses such a config.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError, VmrtError
from .target import parse_host

DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_MAX = 64 * 1024


@dataclass(frozen=True)
class Context:
    name: str
    host: str | None  # None: this host (the default context)
    description: str = ""


def store_dir(environ: Mapping[str, str] = os.environ) -> Path:
    base = environ.get("XDG_CONFIG_HOME", "")
    if not base.startswith("/"):
        home = environ.get("HOME", "") or pwd.getpwuid(os.getuid()).pw_dir
        base = os.path.join(home, ".config")
    return Path(base) / "vmrt" / "contexts"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(f"invalid context name {name!r}: letters, digits and _.+- (not first), 64 at most")
    return name


def trusted(st: os.stat_result) -> bool:
    """Owned by this user or root, and writable by neither group nor others."""
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def _read(path: Path) -> str | None:
    try:
        dst = os.stat(path.parent)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise VmrtError(f"cannot read {path.parent}: {e.strerror}") from e
    if not trusted(dst):
        raise VmrtError(f"{path.parent} is owned by another user or writable by others: not trusted")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise VmrtError(f"cannot read {path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VmrtError(f"{path} is not a regular file")
        if not trusted(st):
            raise VmrtError(f"{path} is owned by another user or writable by others: not trusted")
        data = f.read(_MAX + 1)
    if len(data) > _MAX:
        raise VmrtError(f"{path} is over {_MAX} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise VmrtError(f"{path} is not UTF-8") from None


def _write(path: Path, text: str) -> None:
    d = path.parent
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(d)
    if not os.path.isdir(d) or os.path.islink(d) or st.st_uid != os.getuid():
        raise VmrtError(f"{d} is not a directory of this user")
    os.chmod(d, 0o700)
    tmp = d / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _parse(name: str, text: str, path: Path) -> Context:
    try:
        doc = json.loads(text)
    except ValueError:
        raise VmrtError(f"{path}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("Name") != name or not isinstance(doc.get("Host"), str) \
            or not isinstance(doc.get("Description", ""), str):
        raise VmrtError(f"{path}: not a vmrt context (Name, Host, Description)")
    parse_host(doc["Host"])
    return Context(name, doc["Host"], doc.get("Description", ""))


def load(name: str, environ: Mapping[str, str] = os.environ) -> Context:
    if name == DEFAULT:
        return Context(DEFAULT, None, "Current vmrt host (this machine)")
    path = store_dir(environ) / f"{check_name(name)}.json"
    text = _read(path)
    if text is None:
        raise UsageError(f"context {name!r} does not exist (vmrt context ls)")
    return _parse(name, text, path)


def get_host(name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    return load(name, environ).host


def current(environ: Mapping[str, str] = os.environ) -> str:
    text = _read(store_dir(environ) / "current")
    name = (text or "").strip() or DEFAULT
    return check_name(name)


def names(environ: Mapping[str, str] = os.environ) -> Iterator[str]:
    yield DEFAULT
    d = store_dir(environ)
    try:
        entries = sorted(os.listdir(d))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.endswith(".json") and _NAME.fullmatch(entry[:-5]) and entry[:-5] != DEFAULT:
            yield entry[:-5]


def create(name: str, host: str, description: str = "", environ: Mapping[str, str] = os.environ) -> Context:
    check_name(name)
    if name == DEFAULT:
        raise UsageError("the default context is this host: it cannot be created")
    parse_host(host)
    path = store_dir(environ) / f"{name}.json"
    if _read(path) is not None:
        raise UsageError(f"context {name!r} already exists")
    _write(path, json.dumps({"Name": name, "Description": description, "Host": host}, indent=1) + "\n")
    return Context(name, host, description)


def use(name: str, environ: Mapping[str, str] = os.environ) -> None:
    load(name, environ)  # it exists
    _write(store_dir(environ) / "current", name + "\n")


def remove(name: str, environ: Mapping[str, str] = os.environ, *, force: bool = False) -> None:
    if name == DEFAULT:
        raise UsageError("the default context cannot be removed")
    load(name, environ)
    if current(environ) == name:
        if not force:
            raise UsageError(f"context {name!r} is in use: 'vmrt context use default' first, or rm -f")
        _write(store_dir(environ) / "current", DEFAULT + "\n")
    (store_dir(environ) / f"{name}.json").unlink()
