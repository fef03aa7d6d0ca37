"""Volume endpoints: list, create, inspect, delete, prune (named volumes, vmrt/volumes.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import volumecmds
from .. import volumes as volumes_mod
from .base import ApiError, Request, Routes, outcomes, parse_filters
from .events import BUS


def _list(req: Request) -> dict[str, Any]:
    docs = [volumes_mod.volume_doc(req.cfg, n) for n in volumes_mod.list_volumes(req.cfg)]
    for key, values in parse_filters(req.query("filters")).items():
        if key == "name":
            docs = [d for d in docs if any(v in d["Name"] for v in values)]
        elif key == "driver":
            docs = [d for d in docs if d["Driver"] in values]
        elif key == "label":
            docs = [d for d in docs if all(_has_label(d, v) for v in values)]
        elif key == "dangling" and set(values) <= {"true", "1", "false", "0"} and len(set(values)) == 1:
            used = volumecmds.users(req.cfg)
            docs = [d for d in docs if (d["Name"] not in used) == (values[0] in ("true", "1"))]
        else:
            raise ApiError(400, f"invalid filter {key!r}")
    return {"Volumes": docs, "Warnings": []}


def _has_label(doc: dict[str, Any], want: str) -> bool:
    k, sep, v = want.partition("=")
    labels = doc.get("Labels") or {}
    return k in labels and (not sep or labels[k] == v)


async def list_volumes(req: Request) -> web.StreamResponse:
    return web.json_response(await asyncio.to_thread(_list, req))


async def create(req: Request) -> web.StreamResponse:
    body = await req.json() or {}
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if body.get("Driver") not in (None, "", "local"):
        raise ApiError(400, f"volume driver {body['Driver']!r} is not supported (local)")
    if body.get("DriverOpts"):
        raise ApiError(400, "volume driver options are not supported")
    labels = body.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ApiError(400, "Labels must be an object of strings")
    name = body.get("Name") or None
    made, new = await asyncio.to_thread(volumes_mod.create_volume, req.cfg, name, labels)
    if new:
        BUS.publish("volume", "create", made, driver="local")
    return web.json_response(await asyncio.to_thread(volumes_mod.volume_doc, req.cfg, made), status=201)


async def inspect(req: Request) -> web.StreamResponse:
    return web.json_response(await asyncio.to_thread(volumes_mod.volume_doc, req.cfg, req.params["name"]))


async def remove(req: Request) -> web.StreamResponse:
    await asyncio.to_thread(outcomes, volumecmds.rm(req.cfg, (req.params["name"],), force=False))
    BUS.publish("volume", "destroy", req.params["name"], driver="local")
    return web.Response(status=204)


async def prune(req: Request) -> web.StreamResponse:
    gone = await asyncio.to_thread(volumecmds.prune, req.cfg)
    return web.json_response({"VolumesDeleted": gone, "SpaceReclaimed": 0})


def register(routes: Routes) -> None:
    routes.add("GET", "/volumes", list_volumes)
    routes.add("POST", "/volumes/create", create)
    routes.add("POST", "/volumes/prune", prune)
    routes.add("GET", "/volumes/(?P<name>[^/]+)", inspect)
    routes.add("DELETE", "/volumes/(?P<name>[^/]+)", remove)
