"""Image endpoints: list, inspect, pull (``POST /images/create``) and push (``POST
/images/{name}/push``), both with ``X-Registry-Auth``,
load (``POST /images/load``), save (``GET /images/{name}/get``, ``GET /images/get``), tag,
history, delete, prune.

A load's body is streamed to an unnamed file in the store's ``tmp/`` (gone with its last fd,
whatever happens), at most ``api_max_load`` bytes (413 beyond), and read from there by
the archive loader, which never extracts it. A save streams the archive as it is written.
A pull's or push's credentials come from the request only, for it alone: never stored, never
logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import tempfile
import threading
from collections.abc import Callable
from typing import IO, Any, BinaryIO, cast

from aiohttp import web

from .. import imagecmds
from ..config import Config
from ..errors import ImageError, VmrtError
from ..images import archive, auth, reference
from ..images.store import Image, Store
from .base import ApiError, Request, Routes, client_gone, headers, outcomes, parse_filters
from .events import BUS

LOG = logging.getLogger(__name__)
CHUNK = 1 << 20          # a save's writes to the client; a load's reads from it
SPOOL_WRITE = 4 << 20    # a load's body is written to its file this many bytes at a time
POLL = 0.25              # how often a pull looks whether its client is still there (seconds)


def image_summary(img: Image) -> dict[str, Any]:
    """An image as ``GET /images/json`` lists it (:func:`vmrt.imagecmds.summary`: system df's too)."""
    return imagecmds.summary(img)


def _tag_matches(tag: str, want: str) -> bool:
    """Docker's ``reference`` filter: a repository, with its tag if one is given."""
    try:
        w = reference.parse(want)
    except VmrtError:
        return False
    r = reference.parse(tag)
    return r.name == w.name and (":" not in want.rpartition("/")[2] or r.tag == w.tag)


def _list(req: Request) -> list[dict[str, Any]]:
    filters = parse_filters(req.query("filters"))
    for key in filters:
        if key not in ("reference", "dangling"):
            raise ApiError(400, f"invalid filter {key!r}")
    if len(set(filters.get("dangling", []))) > 1 or not set(filters.get("dangling", [])) <= {"true", "1", "false", "0"}:
        raise ApiError(400, f"invalid filter 'dangling={'|'.join(filters['dangling'])}'")
    store = Store(req.cfg.root)
    try:
        imgs = store.images()
    finally:
        store.close()
    if dangling := filters.get("dangling"):
        imgs = [i for i in imgs if (not i.tags) == (dangling[0] in ("true", "1"))]
    out = []
    for i in imgs:
        summary = image_summary(i)
        if refs := filters.get("reference"):  # as Docker: the images that match, with only their matching tags
            tags = [t for t in i.tags if any(_tag_matches(t, r) for r in refs)]
            if not tags:
                continue
            summary["RepoTags"] = [reference.parse(t).familiar() for t in tags]
        out.append(summary)
    return out


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


# --- pull ------------------------------------------------------------------------------------
_AUTH_FIELDS = ("username", "password", "auth", "identitytoken", "registrytoken", "serveraddress", "email")


def registry_auth(header: str, domain: str) -> tuple[tuple[str, str] | None, str]:
    """Docker's ``X-Registry-Auth``: base64url JSON ``{"username", "password", "serveraddress"}``
    (or ``"auth"``: base64 ``user:password``), or ``{"identitytoken"}``; keys in any case, as Go
    reads them. Returns (username, password) or None, and the identity token ('' for none).
    Credentials for another registry than ``domain``'s are not sent to it; a malformed header
    is a 400 (whose message never quotes the header)."""
    raw = header.strip()
    if not raw:
        return None, ""

    def bad(why: str) -> ApiError:
        return ApiError(400, f"invalid X-Registry-Auth header: {why}")
    try:
        data = base64.b64decode((raw + "=" * (-len(raw) % 4)).translate(str.maketrans("-_", "+/")), validate=True)
        obj = json.loads(data)
    except (binascii.Error, ValueError, RecursionError):
        raise bad("not base64-encoded JSON") from None
    if not isinstance(obj, dict):
        raise bad("not a JSON object")
    fields = {str(k).lower(): v for k, v in obj.items()}
    for k in _AUTH_FIELDS:
        if not isinstance(fields.get(k) or "", str):
            raise bad(f"{k} is not a string")
    user, password = fields.get("username") or "", fields.get("password") or ""
    token = fields.get("identitytoken") or ""
    if fields.get("auth") and not user:
        try:
            user, sep, password = base64.b64decode(fields["auth"], validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            raise bad("auth is not base64 of user:password") from None
        if not sep:
            raise bad("auth is not base64 of user:password")
    if fields.get("registrytoken"):
        raise ApiError(400, "X-Registry-Auth: a registrytoken is not supported (send a username and password, "
                            "or an identitytoken)")
    server = fields.get("serveraddress") or ""
    if server and auth.server_key(server) != auth.server_key(domain):
        LOG.debug("X-Registry-Auth names another registry than the pull's: not used")
        return None, ""
    if token:
        return None, token
    if user and password:
        return (user, password), ""
    if user or password:
        raise bad("a username needs a password")
    return None, ""


async def pull(req: Request) -> web.StreamResponse:
    """``docker pull``: Docker's JSON progress stream (Pulling from, each layer's Pulling fs layer,
    Downloading with its bytes, Pull complete, the digest and the status); a failure after the
    stream began is its last line (``error``/``errorDetail``). A client that goes away cancels its
    pull (nothing of it is kept)."""
    image, tag = req.query("fromImage"), req.query("tag")
    if not image:
        raise ApiError(400, "fromImage is required (importing from a tar is not supported)")
    ref = image if not tag or "@" in image else f"{image}@{tag}" if tag.startswith("sha256:") else f"{image}:{tag}"
    try:
        parsed = reference.parse(ref)
    except VmrtError as e:
        raise ApiError(400, str(e)) from None
    creds, token = registry_auth(req.http.headers.get("X-Registry-Auth", ""), parsed.domain)
    resp = web.StreamResponse(headers={**headers(), "Content-Type": "application/json"})
    await resp.prepare(req.http)
    await stream_job(req, resp, "pull", parsed.familiar(), lambda cancel, progress: imagecmds.pull(
        req.cfg, ref, platform=req.query("platform") or None, insecure=(), quiet=True, creds=creds,
        identity_token=token, cancel=cancel, progress=progress))
    return resp


# --- push ------------------------------------------------------------------------------------
async def push(req: Request) -> web.StreamResponse:
    """``docker push``: Docker's JSON progress stream (The push refers to repository, each layer's
    Preparing, Pushing with its bytes, Pushed / Layer already exists / Mounted from, the digest
    line, then ``aux`` {Tag, Digest, Size}); a failure after the stream began is its last line.
    ``X-Registry-Auth`` gives this push's credentials; a client that goes away cancels it."""
    name, tag = req.params["name"], req.query("tag")
    ref = name if not tag or "@" in name else f"{name}@{tag}" if tag.startswith("sha256:") else f"{name}:{tag}"
    try:
        parsed = reference.parse(ref)
    except VmrtError as e:
        raise ApiError(400, str(e)) from None
    creds, token = registry_auth(req.http.headers.get("X-Registry-Auth", ""), parsed.domain)
    await asyncio.to_thread(_check_saved, req.cfg, [str(parsed)])  # a 404 before the stream starts
    resp = web.StreamResponse(headers={**headers(), "Content-Type": "application/json"})
    await resp.prepare(req.http)
    await stream_job(req, resp, "push", parsed.familiar(), lambda cancel, progress: imagecmds.push(
        req.cfg, ref, insecure=(), quiet=True, creds=creds, identity_token=token, cancel=cancel, progress=progress))
    return resp


async def stream_job(req: Request, resp: web.StreamResponse, action: str, name: str,
                      run: Callable[[threading.Event, Callable[[dict[str, Any]], None]], object]) -> None:
    """A pull's or push's stream: ``run(cancel, progress)`` in a thread, its progress messages
    streamed as JSON lines, its VmrtError the last line; the image event ``action`` for ``name``
    once it succeeded. A client that goes away cancels it."""
    async def line(obj: dict[str, Any]) -> None:
        await resp.write(json.dumps(obj).encode() + b"\r\n")

    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def progress(message: dict[str, Any]) -> None:  # in the job's thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service stopped
            loop.call_soon_threadsafe(messages.put_nowait, message)

    job = asyncio.ensure_future(asyncio.to_thread(run, cancel, progress))
    try:
        while not job.done():
            await asyncio.wait({job}, timeout=POLL)
            while not messages.empty() and not cancel.is_set():
                try:
                    await line(messages.get_nowait())
                except ConnectionResetError:
                    cancel.set()
            if not job.done() and client_gone(req.http):
                cancel.set()
    except asyncio.CancelledError:  # the service stops
        cancel.set()
        raise
    if cancel.is_set():
        with contextlib.suppress(VmrtError):
            job.result()
        LOG.debug("%s of %s: the client went away; cancelled", action, name)
        return
    await asyncio.sleep(0)  # the last messages the job's thread queued
    while not messages.empty():
        await line(messages.get_nowait())
    try:
        job.result()
    except VmrtError as e:
        await line({"errorDetail": {"message": str(e)}, "error": str(e)})
    else:
        BUS.publish("image", action, name, name=name)
    await resp.write_eof()


# --- load ------------------------------------------------------------------------------------
def spool_file(cfg: Config) -> IO[bytes]:
    """An unnamed file in the store's private ``tmp/`` (O_TMPFILE): nothing to clean up, ever."""
    store = Store(cfg.root)
    store.init()
    return tempfile.TemporaryFile(dir=store.tmp, prefix="api-load-")


async def receive(req: Request, f: IO[bytes], limit: int) -> int:
    """The request's body into ``f``, at most ``limit`` bytes (413 beyond); its size."""
    too_big = ApiError(413, f"the archive is larger than the {limit} bytes this service accepts "
                            "(the api_max_load setting)")
    if (req.http.content_length or 0) > limit:
        raise too_big
    total = 0
    buf = bytearray()
    while chunk := await req.http.content.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise too_big
        buf += chunk
        if len(buf) >= SPOOL_WRITE:
            await asyncio.to_thread(f.write, bytes(buf))
            buf.clear()
    if buf:
        await asyncio.to_thread(f.write, bytes(buf))
    await asyncio.to_thread(f.flush)
    f.seek(0)
    return total


def _load(cfg: Config, f: IO[bytes]) -> list[str]:
    try:
        return imagecmds.load(cfg, cast(BinaryIO, f), quiet=False)
    except ImageError as e:  # the archive's fault: what it is or holds
        raise ApiError(400, str(e)) from None
    except OSError as e:
        raise ApiError(500, f"cannot load the archive: {e.strerror or e}") from None


async def load(req: Request) -> web.StreamResponse:
    """``docker load``: a docker-archive or OCI layout tar (plain, gzip or zstd) as the body;
    Docker's JSON stream of ``Loaded image: ...`` lines. Nothing is answered before the archive
    is in, so a failure is an HTTP error (400 for a bad archive, 413 for one too large)."""
    req.flag("quiet")  # checked: the answer is the same lines either way (there is no progress to show)
    f = await asyncio.to_thread(spool_file, req.cfg)
    try:
        size = await receive(req, f, req.cfg.api_max_load)
        if size == 0:
            raise ApiError(400, "the request has no body: send the archive (a tar) to load")
        lines = await asyncio.to_thread(_load, req.cfg, f)
    finally:
        await asyncio.to_thread(f.close)
    for ln in lines:
        name = ln.partition(": ")[2]
        BUS.publish("image", "load", name, name=name)
    body = b"".join(json.dumps({"stream": ln + "\n"}).encode() + b"\r\n" for ln in lines)
    return web.Response(body=body, content_type="application/json")


# --- save ------------------------------------------------------------------------------------
class _ResponseWriter:
    """A file the save's thread writes the archive to: it reaches the client in CHUNK pieces,
    each written by the event loop; the thread waits for each (the client's pace). A client
    that went away is a ConnectionResetError here (an OSError: the save stops)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resp: web.StreamResponse) -> None:
        self._loop, self._resp = loop, resp
        self._buf = bytearray()
        self.sent = 0

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if not self._buf:
            return
        data = bytes(self._buf)
        self._buf.clear()
        fut = asyncio.run_coroutine_threadsafe(self._resp.write(data), self._loop)
        while True:
            try:
                fut.result(timeout=1.0)
                break
            except TimeoutError:
                if self._loop.is_closed():
                    raise ConnectionResetError("the service stopped") from None
            except concurrent.futures.CancelledError:  # the loop ended without running it
                raise ConnectionResetError("the service stopped") from None
        self.sent += len(data)


def _check_saved(cfg: Config, names: list[str]) -> None:
    """Every image named is here (a 404 before the archive starts, not a broken one)."""
    store = Store(cfg.root)
    try:
        for n in names:
            store.get(n)
    finally:
        store.close()


def _save(cfg: Config, names: list[str], out: _ResponseWriter) -> None:
    store = Store(cfg.root)
    try:
        archive.save(store, names, cast(BinaryIO, out))
        out.flush()
    finally:
        store.close()


async def _save_response(req: Request, names: list[str]) -> web.StreamResponse:
    await asyncio.to_thread(_check_saved, req.cfg, names)
    resp = web.StreamResponse(headers={**headers(), "Content-Type": "application/x-tar"})
    await resp.prepare(req.http)
    out = _ResponseWriter(asyncio.get_running_loop(), resp)
    try:
        await asyncio.to_thread(_save, req.cfg, names, out)
    except VmrtError as e:
        if not client_gone(req.http):
            LOG.warning("saving %s: %s", ", ".join(names), e)
        # the client must see a broken transfer (no last chunk), never a short archive that looks whole
        if (t := req.http.transport) is not None:
            t.abort()
        return resp
    for n in names:
        BUS.publish("image", "save", n, name=n)
    await resp.write_eof()
    return resp


async def save_one(req: Request) -> web.StreamResponse:
    """``GET /images/{name}/get``: the image as a docker-archive (also an OCI layout)."""
    return await _save_response(req, [req.params["name"]])


async def save(req: Request) -> web.StreamResponse:
    """``GET /images/get?names=a&names=b``: ``docker save a b``, one archive."""
    names = req.http.query.getall("names", [])
    if not names or not all(names):
        raise ApiError(400, "names is required: the images to save")
    return await _save_response(req, names)


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
    routes.add("POST", "/images/load", load)
    routes.add("GET", "/images/get", save)
    routes.add("POST", "/images/prune", prune)
    routes.add("GET", "/images/search", search)
    routes.add("GET", "/images/(?P<name>.+)/json", inspect_image)
    routes.add("GET", "/images/(?P<name>.+)/history", history)
    routes.add("GET", "/images/(?P<name>.+)/get", save_one)
    routes.add("POST", "/images/(?P<name>.+)/tag", tag)
    routes.add("POST", "/images/(?P<name>.+)/push", push)
    routes.add("DELETE", "/images/(?P<name>.+)", remove)
