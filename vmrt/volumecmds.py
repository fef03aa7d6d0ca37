"""``vmrt volume create|ls|inspect|rm|prune``: named volumes (vmrt/volumes.py), as Docker's
local driver keeps them."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from . import formatting
from . import volumes as volumes_mod
from .config import Config
from .errors import StateError, UsageError, VmrtError
from .layout import container_dir
from .state import State

VOLUME_COLUMNS = [("DRIVER", "Driver", 0), ("VOLUME NAME", "Name", 0)]


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, _, v = p.partition("=")
        if not k:
            raise UsageError(f"invalid label {p!r}: KEY=VALUE")
        out[k] = v
    return out


def create(cfg: Config, name: str | None, labels: tuple[str, ...] = ()) -> str:
    made, _ = volumes_mod.create_volume(cfg, name, _labels(labels))
    return made


def users(cfg: Config) -> dict[str, list[str]]:
    """Each named volume's containers (by name), from their configs."""
    out: dict[str, list[str]] = {}
    st = State(cfg.db_path)
    try:
        cs = st.list()
    finally:
        st.close()
    for c in cs:
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((container_dir(cfg, c.id) / "config.json").read_text())
            for m in config.get("mounts", []):
                if (v := m.get(volumes_mod.VOLUME_KEY)):
                    out.setdefault(v, []).append(c.name)
    return out


def ls(cfg: Config, *, quiet: bool, fmt: str | None, filters: tuple[str, ...] = ()) -> list[str]:
    rows = [{"Driver": "local", "Name": n} for n in volumes_mod.list_volumes(cfg)]
    for f in filters:
        key, _, value = f.partition("=")
        if key == "dangling":
            used = users(cfg)
            rows = [r for r in rows if (r["Name"] not in used) == (value in ("true", "1"))]
        elif key == "name":
            rows = [r for r in rows if value in r["Name"]]
        else:
            raise UsageError(f"invalid filter {key!r}")
    if quiet:
        return [r["Name"] for r in rows]
    return formatting.emit(fmt, rows, VOLUME_COLUMNS)


def inspect(cfg: Config, names: tuple[str, ...], *, fmt: str | None) -> Iterator[str | VmrtError]:
    """``vmrt volume inspect``: Docker's documents; a missing one is an error, the others shown."""
    docs: list[dict[str, Any]] = []
    failed = False
    for n in names:
        try:
            docs.append(volumes_mod.volume_doc(cfg, n))
        except VmrtError as e:
            yield e
            failed = True
    if docs or not failed:
        yield from formatting.documents(fmt, docs)


def rm(cfg: Config, names: tuple[str, ...], *, force: bool) -> Iterator[str | VmrtError]:
    """Each volume removed, unless a container uses it (``force`` removes it anyway, as Docker's
    ``-f`` does only for a missing one: in-use stays refused)."""
    used = users(cfg)
    for n in names:
        try:
            if n in used:
                raise StateError(f"remove {n}: volume is in use - [{', '.join(used[n])}]")
            volumes_mod.remove_volume(cfg, n)
        except StateError as e:
            if not (force and str(e).startswith("No such volume")):
                yield e
            continue
        yield n


def prune(cfg: Config) -> list[str]:
    """Every volume no container uses: removed; their names."""
    used = users(cfg)
    gone = []
    for n in volumes_mod.list_volumes(cfg):
        if n not in used:
            volumes_mod.remove_volume(cfg, n)
            gone.append(n)
    return gone
