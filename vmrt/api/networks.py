"""Network endpoints: list, inspect, create, delete, connect, disconnect, prune (vmrt's user
networks, vmrt/netcmds.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import netcmds
from .base import ApiError, Request, Routes, outcomes, parse_filters
from .events import BUS


def _body(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ApiError(400, "the body must be a JSON object")
    return v


def _list(req: Request) -> list[dict[str, Any]]:
    docs = netcmds.documents(req.cfg)
    for key, values in parse_filters(req.query("filters")).items():
        if key == "name":
            docs = [d for d in docs if any(v in d["Name"] for v in values)]
        elif key == "id":
            docs = [d for d in docs if any(d["Id"].startswith(v) for v in values)]
        elif key == "label":
            docs = [d for d in docs if all(_has_label(d, v) for v in values)]
        elif key == "driver":
            docs = [d for d in docs if d.get("Driver") in values]
        else:
            raise ApiError(400, f"invalid filter {key!r}")
    return docs


def _has_label(doc: dict[str, Any], want: str) -> bool:
    k, sep, v = want.partition("=")
    labels = doc.get("Labels") or {}
    return k in labels and (not sep or labels[k] == v)


async def list_networks(req: Request) -> web.StreamResponse:
    return web.json_response(await asyncio.to_thread(_list, req))


async def inspect(req: Request) -> web.StreamResponse:
    docs = await asyncio.to_thread(netcmds.documents, req.cfg, (req.params["id"],))
    return web.json_response(docs[0])


async def create(req: Request) -> web.StreamResponse:
    body = _body(await req.json())
    name = body.get("Name")
    if not name or not isinstance(name, str):
        raise ApiError(400, "Name is required")
    ipam = body.get("IPAM") or {}
    if not isinstance(ipam, dict):
        raise ApiError(400, "IPAM must be an object")
    configs = ipam.get("Config") or []
    if not isinstance(configs, list) or not all(
            isinstance(c, dict) and all(isinstance(c.get(k) or "", str) for k in ("Subnet", "Gateway", "IPRange"))
            for c in configs):
        raise ApiError(400, "IPAM.Config must be a list of objects (Subnet, Gateway: strings)")
    labels = body.get("Labels") or {}
    if not isinstance(labels, dict):
        raise ApiError(400, "Labels must be an object")
    if body.get("Driver") is not None and not isinstance(body["Driver"], str):
        raise ApiError(400, "Driver must be a string")
    net_id = await asyncio.to_thread(
        netcmds.create, req.cfg, name, driver=body.get("Driver") or "bridge",
        subnets=tuple(c["Subnet"] for c in configs if c.get("Subnet")),
        gateways=tuple(c["Gateway"] for c in configs if c.get("Gateway")),
        internal=bool(body.get("Internal")), labels=tuple(f"{k}={v}" for k, v in labels.items()),
        ipv6=bool(body.get("EnableIPv6")))
    BUS.publish("network", "create", net_id, name=name, type="bridge")
    return web.json_response({"Id": net_id, "Warning": ""}, status=201)


async def remove(req: Request) -> web.StreamResponse:
    await asyncio.to_thread(outcomes, netcmds.rm(req.cfg, (req.params["id"],)))
    BUS.publish("network", "destroy", req.params["id"], name=req.params["id"], type="bridge")
    return web.Response(status=204)


def _container(body: dict[str, Any]) -> str:
    container = body.get("Container")
    if not container or not isinstance(container, str):
        raise ApiError(400, "Container is required")
    return container


async def connect(req: Request) -> web.StreamResponse:
    body = _body(await req.json())
    container = _container(body)
    aliases = (body.get("EndpointConfig") or {}).get("Aliases") or []
    await asyncio.to_thread(netcmds.connect, req.cfg, req.params["id"], container, aliases=tuple(aliases))
    return web.Response(status=200)


async def disconnect(req: Request) -> web.StreamResponse:
    container = _container(_body(await req.json()))
    await asyncio.to_thread(netcmds.disconnect, req.cfg, req.params["id"], container)
    return web.Response(status=200)


async def prune(req: Request) -> web.StreamResponse:
    lines = await asyncio.to_thread(netcmds.prune, req.cfg)
    return web.json_response({"NetworksDeleted": lines[1:]})


def register(routes: Routes) -> None:
    routes.add("GET", "/networks", list_networks)
    routes.add("POST", "/networks/create", create)
    routes.add("POST", "/networks/prune", prune)
    routes.add("GET", "/networks/(?P<id>[^/]+)", inspect)
    routes.add("DELETE", "/networks/(?P<id>[^/]+)", remove)
    routes.add("POST", "/networks/(?P<id>[^/]+)/connect", connect)
    routes.add("POST", "/networks/(?P<id>[^/]+)/disconnect", disconnect)
