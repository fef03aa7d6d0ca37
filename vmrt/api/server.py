"""The service's socket, routing, version negotiation and errors (aiohttp over a unix socket).

Routing is a table of (method, pattern) here rather than aiohttp's router: every path may
carry Docker's ``/vX.Y`` prefix, which is checked against the supported range before the
endpoint runs (Docker's daemon answers 400 to a client that is too old or too new).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import grp
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from .. import monitor, systemcmds
from ..config import Config
from ..errors import UsageError, VmrtError
from . import archive, build, containers, events, execs, images, networks, system, volumes
from .base import (
    MAX_API,
    MAX_BODY,
    MIN_API,
    STOPPING,
    ApiError,
    Request,
    Routes,
    api_text,
    error_response,
    error_status,
    headers,
    split_version,
)

LOG = logging.getLogger(__name__)
TRIM_AFTER = 5.0  # seconds without a request: the heap is trimmed
_LIBC = ctypes.CDLL(None)
M_ARENA_MAX = -8


class Service:
    """The running service: its routes, the requests in flight (for ``--time``), its stop."""

    def __init__(self, cfg: Config, routes: Routes) -> None:
        self.cfg, self.routes = cfg, routes
        self.active = 0
        self.last = time.monotonic()
        self.stopping = asyncio.Event()

    async def handle(self, http: web.Request) -> web.StreamResponse:
        self.active += 1
        try:
            return await self._handle(http)
        finally:
            self.active -= 1
            self.last = time.monotonic()

    async def _handle(self, http: web.Request) -> web.StreamResponse:
        try:
            version, path = split_version(http.path)
            found = self.routes.find(http.method, path)
            if found is None:
                raise ApiError(404, f"page not found: {http.method} {path}")
            handler, params = found
            resp = await handler(Request(http, params, version, self.cfg))
        except ApiError as e:
            return error_response(e.status, e.message)
        except VmrtError as e:
            return error_response(error_status(e), str(e))
        except ConnectionResetError:  # the client went away mid-answer (a wait, a stream)
            LOG.debug("%s %s: the client went away", http.method, http.path)
            return web.Response(status=499)  # written nowhere: aiohttp drops it with the connection
        except Exception as e:  # a bug: one line in the answer, the details in the log
            LOG.error("%s %s: %s", http.method, http.path, e, exc_info=True)
            return error_response(500, f"internal error: {type(e).__name__}: {e}")
        if not resp.prepared:
            for k, v in headers().items():
                resp.headers.setdefault(k, v)
        return resp

    async def trim(self) -> None:
        """Idle memory back to the system: glibc keeps what requests freed (malloc_trim) once the
        service has been quiet a while."""
        trimmed = self.last
        while True:
            await asyncio.sleep(TRIM_AFTER)
            if self.active == 0 and self.last != trimmed and time.monotonic() - self.last >= TRIM_AFTER:
                trimmed = self.last
                _LIBC.malloc_trim(0)

    async def idle_watch(self, limit: float) -> None:
        """``--time N``: stop once no request has been in flight for N seconds."""
        while True:
            await asyncio.sleep(min(limit, 1.0))
            if self.active == 0 and time.monotonic() - self.last >= limit:
                self.stopping.set()
                return


class _Connection(web.RequestHandler):
    """aiohttp's connection, except for a request it cannot parse (a request line or a header
    too long, too many headers, bytes that are not HTTP): answered as the service's other
    errors are, Docker's status (431 for headers too large, else 400) and one line of JSON,
    and logged in one line, not with a traceback."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # a bug of ours: aiohttp's 500, with its traceback logged
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:  # (as aiohttp: too late for an answer)
            raise ConnectionError("the answer was sent already")
        if isinstance(exc, LineTooLong) or "Too many headers" in exc.message:
            status, text = 431, "request header fields too large"
        else:
            status = exc.code if 400 <= exc.code < 500 else 400
            text = "bad request: " + (exc.message.strip().splitlines() or ["not HTTP"])[0].rstrip(":")[:200]
        LOG.debug("a request that could not be read: %s", text)
        resp = error_response(status, text)
        resp.force_close()
        return resp


def _bind(path: Path, group: str | None) -> None:
    """The socket's mode: root's, and a group's where one is named (0660), as docker.sock."""
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise UsageError(f"group {group!r} does not exist") from None
    os.chown(path, 0, gid)
    os.chmod(path, 0o660 if group else 0o600)


async def _serve(cfg: Config, routes: Routes, path: Path, idle: float, group: str | None,
                 background: list[Callable[[Config], Awaitable[None]]]) -> None:
    service = Service(cfg, routes)
    STOPPING.clear()
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", service.handle)
    access: Any = logging.getLogger("vmrt.api.access") if os.environ.get("VMRT_API_LOG") else None  # with --debug
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    server = runner.server
    assert server is not None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_socket():
        path.unlink()  # a dead service's: a live one would have answered (checked by the caller)
    elif os.path.lexists(path):
        raise UsageError(f"{path} exists and is not a socket")
    loop = asyncio.get_running_loop()
    # the listening socket is ours rather than a web.UnixSite's: its connections are _Connection's
    listener = await loop.create_unix_server(
        lambda: _Connection(server, loop=loop, max_field_size=16384, access_log=access), str(path))
    try:
        _bind(path, group)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(s, service.stopping.set)
        print(f"vmrt system service: API {api_text(MIN_API)}-{api_text(MAX_API)} on unix://{path}",
              file=sys.stderr, flush=True)
        tasks = [asyncio.ensure_future(job(cfg)) for job in background]
        tasks.append(asyncio.ensure_future(service.trim()))
        if idle > 0:
            tasks.append(asyncio.ensure_future(service.idle_watch(idle)))
        await service.stopping.wait()
        STOPPING.set()
        containers.cancel_all()  # the waits and streams in flight end (their clients see EOF)
        events.BUS.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        pid_file = cfg.run_root / "api.pid"  # `vmrt compose` started this one: its record goes with it
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        await runner.cleanup()


def serve(cfg: Config, path: Path, idle: float = 0.0, group: str | None = None,
          forks: monitor.ForkServer | None = None) -> int:
    """``vmrt system service``: serve until SIGTERM/SIGINT (or ``idle`` seconds without a request)."""
    routes = Routes()
    for mod in (system, containers, archive, events, execs, images, build, networks, volumes):
        mod.register(routes)
    if path.exists() and systemcmds.socket_answers(path):
        raise UsageError(f"a service already answers on {path}")
    monitor.FORK_SERVER = forks  # containers' monitors are forked from it (made before any thread)
    _LIBC.mallopt(M_ARENA_MAX, 1)  # the worker threads share one heap (each would get its own arena)
    try:
        asyncio.run(_serve(cfg, routes, path, idle, group, [containers.reaper, events.watch]))
    finally:
        monitor.FORK_SERVER = None
    return 0
