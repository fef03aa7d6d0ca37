"""Container records in SQLite (``<root>/state.db``).

Lifecycle is an explicit state machine; every transition goes through
:meth:`State.transition`, which refuses an illegal one with StateError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from . import fsmode
from .errors import StateError, UsageError


class Status(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


ALLOWED = {
    Status.CREATED: {Status.RUNNING, Status.EXITED},
    Status.RUNNING: {Status.EXITED},
    Status.EXITED: {Status.RUNNING},  # start, restart, a restart policy
}

_ADJ = ["brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid", "merry",
        "nifty", "proud", "quiet", "sharp", "tender", "vivid", "witty", "zesty", "bold", "swift"]
_NOUN = ["turing", "hopper", "lovelace", "ritchie", "thompson", "knuth", "dijkstra", "liskov",
         "torvalds", "bellard", "popek", "goldberg", "kay", "lamport", "hamilton", "noether"]


@dataclasses.dataclass
class Container:
    id: str
    name: str
    image: str
    isolation: str
    status: Status
    created: float
    command: list[str]
    exit_code: int | None = None
    finished: float | None = None
    pids: dict[str, int] = dataclasses.field(default_factory=dict)
    run_dir: str = ""
    oom_killed: bool = False
    image_id: str = ""
    monitor_pid: int = 0          # the detached container's monitor (0: attached, or none yet)
    started: float | None = None
    restart_count: int = 0
    stop_requested: bool = False  # `vmrt stop`/`kill`: a restart policy must not bring it back
    owner_ticks: int = 0          # the owner's start time (/proc/PID/stat field 22): tells a reused PID


class State:
    def __init__(self, db_path: Path) -> None:
        fsmode.private_dir(db_path.parent)
        # 0600 before SQLite opens it: its -wal and -shm files take the database's mode
        self.db = sqlite3.connect(fsmode.touch_private(db_path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # commits reach the WAL without an fsync each (a run makes ~6): a power cut may lose the
        # last few, which describe containers that died with the host anyway; never corrupts it
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("""CREATE TABLE IF NOT EXISTS containers (
            id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, image TEXT NOT NULL,
            isolation TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,
            command TEXT NOT NULL, exit_code INTEGER, finished REAL,
            pids TEXT NOT NULL DEFAULT '{}', run_dir TEXT NOT NULL DEFAULT '')""")
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(containers)")}
        for col, decl in (("oom_killed", "INTEGER NOT NULL DEFAULT 0"),  # added with process isolation
                          ("image_id", "TEXT NOT NULL DEFAULT ''"),      # added with the image store
                          ("monitor_pid", "INTEGER NOT NULL DEFAULT 0"),  # added with detached containers
                          ("started", "REAL"),
                          ("restart_count", "INTEGER NOT NULL DEFAULT 0"),
                          ("stop_requested", "INTEGER NOT NULL DEFAULT 0"),
                          ("owner_ticks", "INTEGER NOT NULL DEFAULT 0")):
            if col not in cols:
                with contextlib.suppress(sqlite3.OperationalError):  # a concurrent vmrt added it
                    self.db.execute(f"ALTER TABLE containers ADD COLUMN {col} {decl}")

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def create(self, image: str, isolation: str, command: list[str], name: str | None,
               image_id: str = "") -> Container:
        if name is not None and not _valid_name(name):
            raise UsageError(f"invalid container name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        cid = secrets.token_hex(32)
        for _ in range(20):
            n = name or f"{secrets.choice(_ADJ)}_{secrets.choice(_NOUN)}_{secrets.token_hex(2)}"
            c = Container(cid, n, image, isolation, Status.CREATED, time.time(), command, image_id=image_id)
            try:
                with self._tx() as db:
                    db.execute("INSERT INTO containers (id,name,image,isolation,status,created,command,image_id) "
                               "VALUES (?,?,?,?,?,?,?,?)",
                               (c.id, c.name, image, isolation, c.status.value, c.created, json.dumps(command),
                                image_id))
                return c
            except sqlite3.IntegrityError:
                if name is not None:
                    other = self.get(name)
                    raise StateError(f'Conflict. The container name "/{name}" is already in use by '
                                     f'container "{other.id}". You have to remove (or rename) that '
                                     "container to be able to reuse that name.") from None
        raise StateError("could not allocate a container name")

    def _row(self, r: tuple) -> Container:
        return Container(r[0], r[1], r[2], r[3], Status(r[4]), r[5], json.loads(r[6]), r[7], r[8],
                         json.loads(r[9]), r[10], bool(r[11]), r[12], r[13], r[14], r[15], bool(r[16]), r[17])

    def get(self, ref: str) -> Container:
        rows = self.db.execute("SELECT * FROM containers WHERE name=? OR id=?", (ref, ref)).fetchall()
        if not rows and len(ref) >= 3 and all(c in "0123456789abcdef" for c in ref):
            rows = self.db.execute("SELECT * FROM containers WHERE substr(id, 1, ?) = ?",
                                   (len(ref), ref)).fetchall()
        if not rows:
            raise StateError(f"No such container: {ref}")
        if len(rows) > 1:
            raise StateError(f"multiple containers match {ref!r}; use more of the id")
        return self._row(rows[0])

    def list(self) -> list[Container]:
        return [self._row(r) for r in self.db.execute("SELECT * FROM containers ORDER BY created DESC")]

    def transition(self, c: Container, new: Status, **fields: object) -> None:
        with self._tx() as db:
            row = db.execute("SELECT status FROM containers WHERE id=?", (c.id,)).fetchone()
            if row is None:
                raise StateError(f"No such container: {c.id}")
            cur = Status(row[0])
            if new not in ALLOWED[cur]:
                raise StateError(f"container {c.name}: cannot go from {cur.value} to {new.value}")
            sets: dict[str, object] = {"status": new.value}
            for k, v in fields.items():
                if k not in ("exit_code", "finished", "pids", "started", "monitor_pid", "oom_killed",
                             "restart_count", "owner_ticks"):
                    raise StateError(f"field {k} is not settable")
                sets[k] = json.dumps(v) if k == "pids" else v
            db.execute(f"UPDATE containers SET {', '.join(k + '=?' for k in sets)} WHERE id=?",
                       (*sets.values(), c.id))
            c.status = new
            for k, v in fields.items():
                setattr(c, k, v)

    def set_fields(self, c: Container, **fields: object) -> None:
        with self._tx() as db:
            for k, v in fields.items():
                if k not in ("pids", "run_dir", "oom_killed", "monitor_pid", "started", "restart_count",
                             "stop_requested", "exit_code", "finished", "owner_ticks"):
                    raise StateError(f"field {k} is not settable")
                db.execute(f"UPDATE containers SET {k}=? WHERE id=?",
                           (json.dumps(v) if k == "pids" else v, c.id))
                setattr(c, k, v)

    def rename(self, c: Container, name: str) -> None:
        if not _valid_name(name):
            raise UsageError(f"invalid container name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        try:
            with self._tx() as db:
                db.execute("UPDATE containers SET name=? WHERE id=?", (name, c.id))
        except sqlite3.IntegrityError:
            raise StateError(f'Conflict. The container name "/{name}" is already in use') from None
        c.name = name

    def remove(self, c: Container) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM containers WHERE id=?", (c.id,))


def _valid_name(name: str) -> bool:
    return bool(re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}", name))
