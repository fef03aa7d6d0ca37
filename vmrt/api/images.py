"""Image endpoints: list, inspect, pull (``POST /images/create``)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .. import imagecmds
from ..errors import VmrtError
from ..images import reference
from ..images.store import Image, Store
from .base import ApiError, Request, Routes


def _created(img: Image) -> int:
    when = imagecmds.created_at(img)
    return int(when.timestamp()) if when else 0


def _summary(img: Image) -> dict[str, Any]:
    return {"Id": img.id, "ParentId": "", "RepoTags": [reference.parse(t).familiar() for t in img.tags],
            "RepoDigests": [reference.parse(d).familiar() for d in img.repo_digests], "Created": _created(img),
            "Size": img.size, "SharedSize": -1, "VirtualSize": img.size,
            "Labels": (img.runtime_config.get("Labels") or {}), "Containers": -1}


def _list(req: Request) -> list[dict[str, Any]]:
    store = Store(req.cfg.root)
    try:
        return [_summary(i) for i in store.images()]
    finally:
        store.close()


async def list_images(req: Request) -> web.StreamResponse:
    return web.json_response(await asyncio.to_thread(_list, req))


def _inspect(req: Request, name: str) -> dict[str, Any]:
    store = Store(req.cfg.root)
    try:
        return imagecmds.inspect_doc(store.get(name))
    finally:
        store.close()


async def inspect_image(req: Request) -> web.StreamResponse:
    return web.json_response(await asyncio.to_thread(_inspect, req, req.params["name"]))


async def pull(req: Request) -> web.StreamResponse:
    """``docker pull``: Docker's JSON progress stream (a line as the pull starts, one at its
    end); a failure after the stream began is its last line (``error``/``errorDetail``)."""
    image, tag = req.query("fromImage"), req.query("tag")
    if not image:
        raise ApiError(400, "fromImage is required (importing from a tar is not supported)")
    ref = image if not tag or "@" in image else f"{image}@{tag}" if tag.startswith("sha256:") else f"{image}:{tag}"
    try:
        parsed = reference.parse(ref)
    except VmrtError as e:
        raise ApiError(400, str(e)) from None
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(req.http)

    async def line(obj: dict[str, Any]) -> None:
        await resp.write(json.dumps(obj).encode() + b"\r\n")

    await line({"status": f"Pulling from {parsed.familiar_name}", "id": parsed.tag or parsed.digest or "latest"})
    cfg = req.cfg
    try:
        await asyncio.to_thread(imagecmds.pull, cfg, ref, platform=req.query("platform") or None, insecure=(),
                                quiet=True)
    except VmrtError as e:
        await line({"errorDetail": {"message": str(e)}, "error": str(e)})
    else:
        await line({"status": f"Status: Downloaded newer image for {parsed.familiar()}"})
    await resp.write_eof()
    return resp


def register(routes: Routes) -> None:
    routes.add("GET", "/images/json", list_images)
    routes.add("POST", "/images/create", pull)
    routes.add("GET", "/images/(?P<name>.+)/json", inspect_image)
