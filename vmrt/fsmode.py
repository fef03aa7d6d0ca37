"""File modes: nothing of a tenant is readable by another local user (issue 14, part 3).

Everything vmrt keeps (state root, run root, cache) is root's alone: the top dirs are
0700, every file holding tenant data (configs with ``-e`` secrets, logs, the state
database, sockets) is created 0600 and every dir 0700. Three layers make that hold:

* :func:`restrict_umask` at the start of every entry point (the CLI, the Python
  monitor; the C monitor calls ``umask(077)`` itself), so a file or socket code forgets
  to make private is private anyway;
* the helpers below, for the files that must be private even where the umask is not
  ours (vmrt's modules used as a library, tests);
* :func:`secure_tops` once per start: a root made before this (0755) is closed with
  one ``chmod``, which makes everything under it unreachable: no walk of the tree.

Files a container must read as any uid (the managed /etc/hosts, /etc/resolv.conf,
/etc/hostname, bind-mounted into it) are 0644 on purpose (:data:`SHARED_FILE`):
the container reaches them through its mounts, never through the 0700 dirs above them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

UMASK = 0o077
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
SHARED_FILE = 0o644    # read inside a container by any uid (bind-mounted /etc files)
PUBLIC_FILE = 0o644    # no tenant data: kernel, initramfs (a jailed VMM may get them by bind mount)


_caller_umask: int | None = None


def restrict_umask() -> int:
    """Make every file and socket this process (and its children) creates private to root;
    returns the umask the caller had."""
    global _caller_umask
    old = os.umask(UMASK)
    if _caller_umask is None:
        _caller_umask = old
    return old


def caller_umask() -> int:
    """The umask vmrt was started with: for what it makes in the user's own dirs at the user's
    request (``vmrt cp`` out of a container), as any command the user runs would."""
    if _caller_umask is not None:
        return _caller_umask
    cur = os.umask(0o022)
    os.umask(cur)
    return cur


def secure_tops(*dirs: Path) -> None:
    """Close the top dirs of an existing install (made 0755 before): cheap, a stat each.

    Only dirs this user owns are changed (a root pointed at a shared dir is not taken
    over); missing ones are left to be created, 0700, when first used."""
    euid = os.geteuid()
    for d in dirs:
        try:
            st = os.stat(d)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == euid and st.st_mode & 0o077:
            os.chmod(d, PRIVATE_DIR)


def make_dirs(path: Path, mode: int) -> Path:
    """``mkdir -p`` whose every new dir, parents included, gets ``mode`` whatever the umask.
    An existing dir is left as it is (no chmod on the hot path)."""
    for attempt in (1, 2):
        try:
            os.mkdir(path, mode)
            break
        except FileExistsError:
            if not path.is_dir():
                raise
            return path
        except FileNotFoundError:
            if path.parent == path or attempt == 2:
                raise
            make_dirs(path.parent, mode)
    if mode & UMASK:  # bits the umask took away
        os.chmod(path, mode)
    return path


def private_dir(path: Path) -> Path:
    """``mkdir -p``, 0700 (parents too)."""
    return make_dirs(path, PRIVATE_DIR)


def opener(path: str | os.PathLike[str], flags: int) -> int:
    """``open(path, mode, opener=fsmode.opener)``: a new file is 0600."""
    return os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE)


def write_private(path: Path, data: bytes | str) -> None:
    """Write a whole file, 0600 (a file left wider by an older vmrt is narrowed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_FILE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, PRIVATE_FILE)
        view = memoryview(data.encode() if isinstance(data, str) else data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def touch_private(path: Path) -> Path:
    """Create ``path`` empty and 0600 if missing, narrow it if wider (SQLite gives its -wal and
    -shm files the database's mode)."""
    # An existing database is never opened here: closing any fd of it drops every POSIX lock this
    # process holds on it, SQLite's too (another State or Store open in this process: WAL
    # corruption, "disk I/O error", "database disk image is malformed"). (Added by helper BOUND.)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISREG(st.st_mode):
            if st.st_mode & 0o077:
                os.chmod(path, PRIVATE_FILE)
            return path
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_FILE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return path
