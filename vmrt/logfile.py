"""Container logs as Docker's json-file driver keeps them: capped and rotated.

A container's stdout and stderr are JSON lines in ``<root>/containers/<id>/container.log``
(written by its monitor, C or Python, or by an attached run's tee). A container
can print without end, so the log is bounded as ``--log-opt max-size=SIZE
--log-opt max-file=N`` say (default: the ``log_max_size`` / ``log_max_file``
settings): when a record would take the file past max-size it is rotated first
(``container.log`` -> ``container.log.1`` -> ... -> ``container.log.<N-1>``, the
oldest dropped), so the container never holds more than N files of max-size on
the host (a single record larger than max-size gets a file of its own). The
limits are fixed when the container is created (``monitor.json``), shown by
``inspect`` as HostConfig.LogConfig.

Readers (``vmrt logs [-f]``) read the rotated files oldest first and follow the
live file across rotations by its inode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .config import Config
from .errors import UsageError

KEY = "log"          # where monitor.json keeps a container's log options (layout.Meta)
MAX_FILES = 1000     # max-file's upper bound: a rotation renames every file
_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?([kmgtp])?i?b?", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


@dataclasses.dataclass(frozen=True)
class Limits:
    max_size: int   # bytes per file
    max_file: int   # files kept, the live one included

    @property
    def total(self) -> int:
        return self.max_size * self.max_file


def parse_size(text: str, what: str = "max-size") -> int:
    """Docker's sizes (go-units RAMInBytes): ``10k``, ``10m``, ``1g``, ``1.5MiB``; binary units."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"invalid {what} {text!r}: use a size such as 10k, 10m or 1g")
    n = int(float(m[1]) * _UNITS[(m[2] or "").lower()])
    if n <= 0:
        raise UsageError(f"invalid {what} {text!r}: it must be a positive size")
    return n


def parse_max_file(text: str, what: str = "max-file") -> int:
    if not re.fullmatch(r"\+?\d{1,9}", text.strip()):
        raise UsageError(f"invalid {what} {text!r}: use a number of files (1 or more)")
    n = int(text)
    if not 1 <= n <= MAX_FILES:
        raise UsageError(f"invalid {what} {text!r}: max-file cannot be less than 1 or more than {MAX_FILES}")
    return n


def options(opts: Iterable[str], cfg: Config) -> dict[str, str]:
    """``--log-opt KEY=VALUE`` flags (json-file's max-size and max-file) over the settings' defaults:
    what is kept with the container and shown by ``inspect`` as LogConfig.Config."""
    out = {"max-size": cfg.log_max_size, "max-file": str(cfg.log_max_file)}
    try:
        parse_size(out["max-size"], "log_max_size setting")
        parse_max_file(out["max-file"], "log_max_file setting")
    except UsageError as e:
        raise UsageError(f"config: {e}") from None
    for o in opts:
        key, sep, value = o.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid --log-opt {o!r}: use KEY=VALUE (max-size=10m, max-file=3)")
        if key not in out:
            raise UsageError(f"unknown log opt {key!r} for json-file log driver (use max-size or max-file)")
        out[key] = value
    try:
        parse_size(out["max-size"])
        parse_max_file(out["max-file"])
    except UsageError as e:
        raise UsageError(f"--log-opt: {e}") from None
    return out


def limits_of(stored: Any, cfg: Config) -> Limits:
    """The limits kept with a container (``monitor.json``'s "log"); the settings' for one made
    before logs were capped, or whose record is damaged."""
    conf = stored if isinstance(stored, dict) else {}
    try:
        return Limits(parse_size(str(conf.get("max-size", cfg.log_max_size))),
                      parse_max_file(str(conf.get("max-file", cfg.log_max_file))))
    except UsageError:
        try:
            return Limits(parse_size(cfg.log_max_size), parse_max_file(str(cfg.log_max_file)))
        except UsageError as e:
            raise UsageError(f"the log_max_size/log_max_file settings: {e}") from None


def container_limits(cdir: Path, cfg: Config) -> Limits:
    """The log limits of the container whose kept dir is ``cdir``."""
    meta: Any = {}
    with contextlib.suppress(OSError, ValueError):
        with open(cdir / "monitor.json", "rb") as f:
            meta = json.loads(f.read(1 << 20))
    return limits_of(meta.get(KEY) if isinstance(meta, dict) else None, cfg)


def rotated(path: Path, i: int) -> Path:
    """The i-th rotated file (``container.log.1`` is the newest); ``i == 0``: the live file."""
    return path if i == 0 else path.with_name(f"{path.name}.{i}")


def files(path: Path) -> list[Path]:
    """The log's files that exist, oldest first, the live file last (even if not there yet)."""
    found = []
    for i in range(1, MAX_FILES):
        p = rotated(path, i)
        if not os.path.lexists(p):
            break
        found.append(p)
    return [*reversed(found), path]


def remove(path: Path) -> None:
    for p in files(path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


class RotatingFile:
    """The live log file, rotated before a write would take it past ``limits.max_size``.
    Not thread-safe: its user serialises writes."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path, self.limits = path, limits
        self._fd = self._open()
        self.size = os.fstat(self._fd).st_size

    def _open(self, trunc: int = 0) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | trunc,
                       0o600)

    def write(self, data: bytes) -> None:
        if self.size > 0 and self.size + len(data) > self.limits.max_size:
            self.rotate()
        os.write(self._fd, data)  # one record, one write: a reader never sees half of one
        self.size += len(data)

    def rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        n = self.limits.max_file
        if n == 1:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for i in range(n - 1, 0, -1):  # .N-2 -> .N-1 (the oldest goes), ..., live -> .1
            with contextlib.suppress(FileNotFoundError):
                os.rename(rotated(self.path, i - 1), rotated(self.path, i))
        self._fd = self._open(os.O_TRUNC)  # if a rename failed, the cap still holds
        self.size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- reading --------------------------------------------------------------------------------

def _open(path: Path) -> IO[bytes] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    return os.fdopen(fd, "rb")


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _newer(path: Path, live: IO[bytes] | None) -> list[IO[bytes]]:
    """If the live file was rotated away: the files written since, oldest first (opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []  # being rotated (or nothing logged yet): look again later
    if live is not None and _same(st, os.fstat(live.fileno())):
        return []
    mine = os.fstat(live.fileno()) if live is not None else None
    index = None
    for i in range(1, MAX_FILES):
        try:
            s = os.stat(rotated(path, i))
        except FileNotFoundError:
            break
        if mine is not None and _same(s, mine):
            index = i
            break
    if live is None:  # nothing was open (no log yet): the live file is new
        newer = []
    elif index is None:  # it was dropped already: every file there is newer
        newer = files(path)[:-1]
    else:
        newer = [rotated(path, i) for i in range(index - 1, 0, -1)]
    return [f for p in [*newer, path] if (f := _open(p)) is not None]


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def records(path: Path, follow: bool, done: Callable[[], bool],
            poll: float = 0.1) -> Iterator[dict[str, Any] | None]:
    """The log's records, oldest first, through its rotated files; then ``None`` once, when all
    that was logged has been read; with ``follow``, then what comes (across rotations) until
    ``done()`` says the writer is gone."""
    opened = [f for p in files(path)[:-1] if (f := _open(p)) is not None]
    live = _open(path)
    pending = b""

    def drain(f: IO[bytes]) -> Iterator[dict[str, Any]]:
        nonlocal pending
        while chunk := f.readline():
            pending += chunk
            if pending.endswith(b"\n"):
                if (rec := _parse(pending)) is not None:
                    yield rec
                pending = b""

    for f in opened:
        with f:
            yield from drain(f)
        pending = b""
    if live is not None:
        yield from drain(live)
    yield None
    if not follow:
        if live is not None:
            live.close()
        return
    try:
        while True:
            if live is not None:
                yield from drain(live)
            finished = done()
            newer = _newer(path, live)
            if newer:
                if live is not None:
                    yield from drain(live)  # what it got before it was rotated away
                    live.close()
                pending = b""
                for f in newer[:-1]:
                    with f:
                        yield from drain(f)
                    pending = b""
                live = newer[-1]
                continue
            if finished:
                if live is not None:
                    yield from drain(live)
                    if pending and (rec := _parse(pending)) is not None:
                        yield rec
                return
            time.sleep(poll)
    finally:
        if live is not None:
            live.close()


class LogWriter:
    """Docker json-file lines from a container's stdout/stderr: fed by a driver's ``tee`` (an
    attached run: the output also goes to the terminal) or read from pipes (:meth:`pipe`)."""

    PIECE = 16384  # as Docker: a long line without a newline is logged in pieces

    def __init__(self, path: Path, limits: Limits) -> None:
        self._f = RotatingFile(path, limits)  # capped and rotated as json-file's max-size/max-file
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pending: dict[str, bytes] = {}

    def pipe(self, stream: str) -> int:
        """The write end of a pipe whose bytes are logged as ``stream``."""
        r, w = os.pipe()
        t = threading.Thread(target=self._pump, args=(r, stream), daemon=True)
        t.start()
        self._threads.append(t)
        return w

    def line(self, stream: str, text: bytes) -> None:
        rec = {"log": text.decode("utf-8", "replace"), "stream": stream,
               "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        with self._lock:
            self._f.write(json.dumps(rec, separators=(",", ":")).encode() + b"\n")

    def feed(self, stream: str, chunk: bytes) -> None:
        """Log what of ``chunk`` completes lines of ``stream``; keep the rest for later."""
        pending = self._pending.get(stream, b"") + chunk
        *lines, pending = pending.split(b"\n")
        for ln in lines:  # a record holds at most PIECE bytes (so one fits in a capped log file)
            ln += b"\n"
            for i in range(0, len(ln), self.PIECE):
                self.line(stream, ln[i:i + self.PIECE])
        while len(pending) >= self.PIECE:
            self.line(stream, pending[:self.PIECE])
            pending = pending[self.PIECE:]
        self._pending[stream] = pending

    def flush(self, stream: str) -> None:
        if pending := self._pending.pop(stream, b""):
            self.line(stream, pending)

    def _pump(self, fd: int, stream: str) -> None:
        with open(fd, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                self.feed(stream, chunk)
        self.flush(stream)

    def close(self) -> None:
        for t in self._threads:
            t.join(timeout=5)
        for stream in list(self._pending):
            self.flush(stream)
        self._f.close()
