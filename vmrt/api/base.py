"""What the service's parts share: the API versions, errors, a request, the routing table."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import select
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from aiohttp import web

from .. import __version__
from ..config import Config
from ..errors import ImageError, NetworkError, StateError, UsageError, VmrtError

MIN_API = (1, 24)
MAX_API = (1, 43)
MAX_BODY = 1 << 20  # a create's JSON: Docker's are a few KiB

GONE_POLL = 0.2  # a stream's client: how often it is checked for being gone
STOPPING = threading.Event()  # the service stops: every request that lasts ends, as if its client had gone
Handler = Callable[["Request"], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def api_text(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


class ApiError(Exception):
    """An answer other than success: Docker's status code and ``{"message": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_status(e: VmrtError) -> int:
    """Docker's status code for a vmrt error: 404 for what does not exist, 409 for a conflict
    with a container's state or name, 400 for a bad parameter, else 500."""
    text = str(e)
    if text.startswith(("No such container", "No such image", "No such network", "No such volume")) or (
            isinstance(e, ImageError) and "No such image" in text) or (
            isinstance(e, NetworkError) and text.endswith(" not found")):
        return 404
    if text.startswith("Conflict.") or "is not running" in text or "is running" in text or "already" in text \
            or "is in use" in text:
        return 409
    if isinstance(e, UsageError):
        return 400
    if isinstance(e, StateError) and "cannot go from" in text:
        return 409
    return 500


@dataclasses.dataclass
class Request:
    """What an endpoint gets: the aiohttp request, the path's groups, the API version asked for."""

    http: web.Request
    params: dict[str, str]
    version: tuple[int, int]
    cfg: Config

    def query(self, name: str, default: str = "") -> str:
        return self.http.query.get(name, default)

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean query parameter as Docker reads one: 1/true/True (and, as Go's
        strconv.ParseBool, t/T/TRUE); 0/false/empty is false."""
        v = self.http.query.get(name)
        if v is None:
            return default
        if v in ("1", "t", "T", "true", "True", "TRUE"):
            return True
        if v in ("", "0", "f", "F", "false", "False", "FALSE"):
            return False
        raise ApiError(400, f"invalid value for {name}: {v!r}")

    def int_query(self, name: str, default: int | None = None) -> int | None:
        v = self.http.query.get(name)
        if v is None or v == "":
            return default
        try:
            return int(v)
        except ValueError:
            raise ApiError(400, f"invalid value for {name}: {v!r}") from None

    async def json(self) -> Any:
        """The request's JSON body (an empty body is null), at most :data:`MAX_BODY` bytes."""
        too_big = ApiError(413, f"request body larger than {MAX_BODY} bytes")
        if (self.http.content_length or 0) > MAX_BODY:
            raise too_big
        body = b""
        while chunk := await self.http.content.read(65536):
            body += chunk
            if len(body) > MAX_BODY:
                raise too_big
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError as e:
            raise ApiError(400, f"invalid JSON: {e}") from None
        except RecursionError:  # arrays in arrays... deeper than Python's stack
            raise ApiError(400, "invalid JSON: nested too deeply") from None


class Routes:
    def __init__(self) -> None:
        self.table: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self.table.append((method, re.compile(pattern + r"\Z"), handler))

    def find(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        """The endpoint of ``method path`` (HEAD is GET's), or None; 405 if only the method differs."""
        other = False
        for m, pat, handler in self.table:
            if (match := pat.match(path)) is not None:
                if m == method or (method == "HEAD" and m == "GET"):
                    return handler, match.groupdict()
                other = True
        if other:
            raise ApiError(405, f"method {method} not allowed on {path}")
        return None


_VERSIONED = re.compile(r"/v(\d{1,3})\.(\d{1,3})(/.*)\Z")


def split_version(path: str) -> tuple[tuple[int, int], str]:
    """Docker's ``/vX.Y/...``: the version asked for (none: the newest) and the path without it."""
    m = _VERSIONED.match(path)
    if m is None:
        return MAX_API, path
    v = (int(m.group(1)), int(m.group(2)))
    if v > MAX_API:
        raise ApiError(400, f"client version {api_text(v)} is too new. Maximum supported API version is "
                            f"{api_text(MAX_API)}")
    if v < MIN_API:
        raise ApiError(400, f"client version {api_text(v)} is too old. Minimum supported API version is "
                            f"{api_text(MIN_API)}, please upgrade your client to a newer version")
    return v, m.group(3)


def headers() -> dict[str, str]:
    return {"Api-Version": api_text(MAX_API), "Docker-Experimental": "false", "Ostype": "linux",
            "Server": f"vmrt/{__version__} (linux)"}


def error_response(status: int, message: str) -> web.Response:
    """Docker's error body. Its Content-Type is exactly ``application/json`` (no charset): the
    docker CLI reads the message only then, else it prints the raw body."""
    return web.Response(body=json.dumps({"message": message}).encode(), status=status,
                        content_type="application/json", headers=headers())


def parse_filters(text: str) -> dict[str, list[str]]:
    """Docker's ``filters`` query: ``{"status": ["running"]}``, or the older
    ``{"status": {"running": true}}``; anything else is a 400."""
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        raise ApiError(400, f"invalid filters: {text[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "invalid filters: not an object")
    out: dict[str, list[str]] = {}
    for k, vs in obj.items():
        values = list(vs) if isinstance(vs, (list, dict)) else None
        if values is None or not all(isinstance(v, str) for v in values):
            raise ApiError(400, f"invalid filter {k!r}")
        out[k] = values
    return out


def outcomes(items: Iterable[str | VmrtError]) -> list[str]:
    """A command's lines over several objects (``rm a b``: a line or an error each), for one
    object: its lines, or its first error raised."""
    lines = []
    try:
        for item in items:
            if isinstance(item, VmrtError):
                raise item
            lines.append(item)
    finally:  # a generator left at its error ends here, in this thread (its State is this thread's)
        close = getattr(items, "close", None)
        if close is not None:
            close()
    return lines


# --- long requests ---------------------------------------------------------------------------
def in_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """``fn()`` in a daemon thread of its own, for what blocks as long as a container or a
    client wishes (a wait, a followed log, an exec): asyncio.to_thread's few shared workers
    would be taken by them, and the service would then answer nothing else; nor must the
    service's stop wait for them."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def run() -> None:
        try:
            value: Any = fn()
            ok = True
        except Exception as e:
            value, ok = e, False
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=run, daemon=True, name="vmrt-api").start()
    return fut


def client_gone(http: web.BaseRequest) -> bool:
    """The client closed its connection. A hijacked one's EOF may be a half-close (the client
    has no more stdin), which leaves it open: there, the unix socket's hang-up (POLLHUP: the
    peer closed both ways) tells that the client is gone."""
    t = http.transport
    if t is None or t.is_closing():
        return True
    sock = t.get_extra_info("socket")
    if sock is None:
        return False
    p = select.poll()
    p.register(sock.fileno(), 0)  # POLLHUP and POLLERR are reported whatever is asked
    return bool(p.poll(0))


@contextlib.asynccontextmanager
async def while_connected(http: web.BaseRequest, on_gone: Callable[[], None]) -> AsyncIterator[None]:
    """For a request that lasts (a wait, a stream): ``on_gone()`` once its client is gone (or
    the service stops), which ends it (nothing else tells: aiohttp cancels no handler, and a
    quiet stream never writes to learn it)."""
    async def watch() -> None:
        while not (STOPPING.is_set() or client_gone(http)):
            await asyncio.sleep(GONE_POLL)
        on_gone()

    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
