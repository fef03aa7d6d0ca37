"""``GET /events``: Docker's event stream.

Container events come from the state every other vmrt process writes too: the service reads
the containers every half second and turns what changed into Docker's actions (create,
start, die with its exit code, rename, destroy, ``health_status: healthy|unhealthy`` from the
health probes' records), so a container the CLI starts, or one that
exits on its own, is seen as one the API started. Volume, network and image events are the
service's own, published by the endpoints that make them. The last :data:`HISTORY` events
are kept for ``since``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
from collections import deque
from typing import Any

from aiohttp import web

from .. import bundle, healthstate
from ..config import Config
from ..layout import container_dir
from ..state import State, Status
from .base import ApiError, Request, Routes, parse_filters, while_connected

HISTORY = 1000
POLL = 0.5


@dataclasses.dataclass
class _Seen:
    name: str
    image: str
    status: Status
    started: float | None
    finished: float | None
    exit_code: int | None
    labels: dict[str, str]
    health: str | None = None  # a running container's health status, if it has a check


class Bus:
    def __init__(self) -> None:
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        # (container, action) -> what its last event told (a start's or die's time): told once,
        # whether the endpoint that did it or the watcher saw it first
        self.told: dict[tuple[str, str], object] = {}

    def publish(self, kind: str, action: str, actor_id: str, **attributes: str) -> None:
        now = time.time_ns()
        ev = {"Type": kind, "Action": action, "Actor": {"ID": actor_id, "Attributes": attributes},
              "scope": "local", "time": now // 10**9, "timeNano": now}
        if kind == "container":  # the old fields the docker CLI still prints
            ev.update(status=action, id=actor_id, **({"from": attributes["image"]} if "image" in attributes else {}))
        self.history.append(ev)
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(ev)


    def close(self) -> None:
        """The service stops: every stream ends."""
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(END)


END: dict[str, Any] = {"end": True}
BUS = Bus()


def _labels(cfg: Config, cid: str) -> dict[str, str]:
    try:
        return bundle.labels_of(json.loads((container_dir(cfg, cid) / "config.json").read_text()))
    except (OSError, ValueError):
        return {}


def _snapshot(cfg: Config, known: dict[str, _Seen]) -> dict[str, _Seen]:
    st = State(cfg.db_path)
    try:
        cs = st.list()
    finally:
        st.close()
    return {c.id: _Seen(c.name, c.image, c.status, c.started, c.finished, c.exit_code,
                        known[c.id].labels if c.id in known else _labels(cfg, c.id),
                        (healthstate.read(c.run_dir) or {}).get("Status") if c.status == Status.RUNNING else None)
            for c in cs}


def tell(cid: str, action: str, key: object, attrs: dict[str, str]) -> None:
    """A container's event, once per (container, action, key)."""
    if BUS.told.get((cid, action), _NONE) == key:
        return
    BUS.told[(cid, action)] = key
    while len(BUS.told) > 4 * HISTORY:
        BUS.told.pop(next(iter(BUS.told)))
    BUS.publish("container", action, cid, **attrs)


_NONE = object()


def _attrs(cfg: Config, c: Any) -> dict[str, str]:
    return {"name": c.name, "image": c.image, **_labels(cfg, c.id)}


def container_event(cfg: Config, c: Any, action: str) -> None:
    """What an endpoint did to a container (create, start, die, destroy), told now: a container
    that lives less than the watcher's half second is seen all the same."""
    attrs = _attrs(cfg, c)
    if action == "die":
        tell(c.id, "die", c.finished, {**attrs, "exitCode": str(c.exit_code if c.exit_code is not None else 0)})
    else:
        tell(c.id, action, c.started if action == "start" else True, attrs)


async def watch(cfg: Config) -> None:
    """The containers' changes as events, every :data:`POLL` seconds."""
    seen = await asyncio.to_thread(_snapshot, cfg, {})
    while True:
        await asyncio.sleep(POLL)
        try:
            now = await asyncio.to_thread(_snapshot, cfg, seen)
        except Exception:  # the state is being migrated or locked: the next round
            continue
        for cid, c in now.items():
            attrs = {"name": c.name, "image": c.image, **c.labels}
            old = seen.get(cid)
            if old is None:
                tell(cid, "create", True, attrs)
            elif old.name != c.name:
                BUS.publish("container", "rename", cid, oldName="/" + old.name, **attrs)
            if c.started:
                tell(cid, "start", c.started, attrs)
            if c.health in ("healthy", "unhealthy") and (old is None or old.health != c.health):
                BUS.publish("container", f"health_status: {c.health}", cid, **attrs)
            if c.finished and c.status != Status.RUNNING:
                tell(cid, "die", c.finished, {**attrs, "exitCode": str(c.exit_code if c.exit_code is not None else 0)})
        for cid, c in seen.items():
            if cid not in now:
                tell(cid, "destroy", True, {"name": c.name, "image": c.image, **c.labels})
        seen = now


def _keep(ev: dict[str, Any], filters: dict[str, list[str]]) -> bool:
    actor = ev["Actor"]
    attrs = actor["Attributes"]
    for key, values in filters.items():
        if key == "type" and ev["Type"] not in values:
            return False
        if key == "event" and ev["Action"] not in values:
            return False
        if key in ("container", "network", "volume", "image") and (
                ev["Type"] != key or not any(actor["ID"].startswith(v) or attrs.get("name") == v for v in values)):
            return False
        if key == "label" and not all(
                (k := v.partition("=")[0]) in attrs and (not v.partition("=")[1] or attrs[k] == v.partition("=")[2])
                for v in values):
            return False
    return True


def _when(text: str, name: str) -> float | None:
    if not text:
        return None
    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not math.isfinite(t):
        raise ApiError(400, f"invalid {name}: {text[:100]!r} (a Unix time)")
    return t


async def events(req: Request) -> web.StreamResponse:
    filters = parse_filters(req.query("filters"))
    for key in filters:
        if key not in ("type", "event", "container", "network", "volume", "image", "label"):
            raise ApiError(400, f"invalid filter {key!r}")
    since, until = _when(req.query("since"), "since"), _when(req.query("until"), "until")
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(req.http)
    q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=HISTORY)

    def gone() -> None:  # the client went away: the stream ends (else only an event written would tell)
        with contextlib.suppress(asyncio.QueueFull):
            q.put_nowait(END)

    BUS.subscribers.add(q)  # before the history is read: nothing falls between the two
    try:
        async with while_connected(req.http, gone):
            await _stream(resp, q, filters, since, until)
    except ConnectionResetError:
        pass
    finally:
        BUS.subscribers.discard(q)
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def _stream(resp: web.StreamResponse, q: asyncio.Queue[dict[str, Any]], filters: dict[str, list[str]],
                  since: float | None, until: float | None) -> None:
    """The events kept since ``since``, then those published, until ``until`` (or END)."""
    if since is not None:
        for ev in list(BUS.history):
            if ev["timeNano"] / 1e9 >= since and (until is None or ev["timeNano"] / 1e9 <= until) \
                    and _keep(ev, filters):
                await resp.write(json.dumps(ev).encode() + b"\n")
    while until is None or time.time() < until:
        try:
            ev = await asyncio.wait_for(q.get(), None if until is None else max(0.0, until - time.time()))
        except TimeoutError:
            break
        if ev is END:
            break
        if ev["timeNano"] / 1e9 < (since or 0) or not _keep(ev, filters):
            continue
        await resp.write(json.dumps(ev).encode() + b"\n")


def register(routes: Routes) -> None:
    routes.add("GET", "/events", events)
