"""Image endpoints: list, inspect, pull (``POST /images/create``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

from aiohttp import web

from .. import imagecmds
from ..errors import VmrtError
from ..images import reference
from ..images.store import Image, Store
from .base import ApiError, Request, Routes, outcomes, parse_filters
from .events import BUS


def _created(img: Image) -> int:
    when = imagecmds.created_at(img)
    return int(when.timestamp()) if when else 0


def _summary(img: Image) -> dict[str, Any]:
    return {"Id": img.id, "ParentId": "", "RepoTags": [reference.parse(t).familiar() for t in img.tags],
            "RepoDigests": [reference.parse(d).familiar() for d in img.repo_digests], "Created": _created(img),
            "Size": img.size, "SharedSize": -1, "VirtualSize": img.size,
            "Labels": (img.runtime_config.get("Labels") or {}), "Containers": -1}


def _matches(img: Image, want: str) -> bool:
    """Docker's ``reference`` filter: a repository, with its tag if one is given."""
    try:
        w = reference.parse(want)
    except VmrtError:
        return False
    has_tag = ":" in want.rpartition("/")[2]
    return any((r := reference.parse(t)).name == w.name and (not has_tag or r.tag == w.tag) for t in img.tags)


def _list(req: Request) -> list[dict[str, Any]]:
    filters = parse_filters(req.query("filters"))
    for key in filters:
        if key not in ("reference", "dangling"):
            raise ApiError(400, f"invalid filter {key!r}")
    store = Store(req.cfg.root)
    try:
        imgs = store.images()
    finally:
        store.close()
    if refs := filters.get("reference"):
        imgs = [i for i in imgs if any(_matches(i, r) for r in refs)]
    if dangling := filters.get("dangling"):
        imgs = [i for i in imgs if (not i.tags) == (dangling[0] in ("true", "1"))]
    return [_summary(i) for i in imgs]


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
        BUS.publish("image", "pull", parsed.familiar(), name=parsed.familiar())
    await resp.write_eof()
    return resp


def _remove(req: Request, name: str) -> list[dict[str, str]]:
    return [{kind: what} for line in outcomes(imagecmds.rmi(req.cfg, (name,), force=req.flag("force")))
            for kind, _, what in [line.partition(": ")]]


async def remove(req: Request) -> web.StreamResponse:
    return web.json_response(await asyncio.to_thread(_remove, req, req.params["name"]))


async def tag(req: Request) -> web.StreamResponse:
    repo, t = req.query("repo"), req.query("tag")
    if not repo:
        raise ApiError(400, "repo is required")
    await asyncio.to_thread(imagecmds.tag, req.cfg, req.params["name"], f"{repo}:{t}" if t else repo)
    return web.Response(status=201)


def _history(req: Request, name: str) -> list[dict[str, Any]]:
    store = Store(req.cfg.root)
    try:
        img = store.get(name)
    finally:
        store.close()
    hist = img.config.get("history") or []
    out = []
    for i, h in enumerate(reversed(hist)):
        out.append({"Id": img.id if i == 0 else "<missing>", "Created": _parse_time(h.get("created", "")),
                    "CreatedBy": h.get("created_by", ""), "Tags": [reference.parse(t).familiar() for t in img.tags]
                    if i == 0 else None, "Size": 0, "Comment": h.get("comment", "")})
    return out


def _parse_time(text: str) -> int:
    try:
        return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")[:26] + "+00:00").timestamp())
    except ValueError:
        return 0


async def history(req: Request) -> web.StreamResponse:
    return web.json_response(await asyncio.to_thread(_history, req, req.params["name"]))


async def prune(req: Request) -> web.StreamResponse:
    dangling = parse_filters(req.query("filters")).get("dangling") or ["true"]
    lines = await asyncio.to_thread(imagecmds.prune, req.cfg, prune_all="false" in dangling)
    deleted = [{"Deleted": ln.split(": ", 1)[1]} for ln in lines if ln.startswith("deleted: ")]
    return web.json_response({"ImagesDeleted": deleted, "SpaceReclaimed": 0})


async def search(req: Request) -> web.StreamResponse:
    raise ApiError(501, "image search is not supported by vmrt (registries' v2 API has no search)")


def register(routes: Routes) -> None:
    routes.add("GET", "/images/json", list_images)
    routes.add("POST", "/images/create", pull)
    routes.add("POST", "/images/prune", prune)
    routes.add("GET", "/images/search", search)
    routes.add("GET", "/images/(?P<name>.+)/json", inspect_image)
    routes.add("GET", "/images/(?P<name>.+)/history", history)
    routes.add("POST", "/images/(?P<name>.+)/tag", tag)
    routes.add("DELETE", "/images/(?P<name>.+)", remove)
