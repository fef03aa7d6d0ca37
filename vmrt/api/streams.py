"""Docker's streams: the multiplexed stdout/stderr frames, and the hijacked connection that
attach and exec start answer with."""

from __future__ import annotations

import asyncio
import struct

from aiohttp import web

from .base import Request

STDOUT, STDERR = 1, 2


def frame(stream: int, data: bytes) -> bytes:
    """Docker's multiplexed stream frame: [stream, 0, 0, 0, size (big-endian u32)] + data."""
    return struct.pack(">BxxxI", stream, len(data)) + data


class HalfClosable(asyncio.Protocol):
    """aiohttp's protocol, except that the client's EOF leaves the connection open for our
    writes. A client with no stdin to send half-closes a hijacked connection (docker's
    CloseWrite); asyncio closes a transport whose protocol's ``eof_received`` returns a falsy
    value, as aiohttp's does."""

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        self.inner.eof_received()  # type: ignore[attr-defined]
        return True


async def hijack(req: Request, tty: bool) -> web.StreamResponse:
    """The response a stream goes out on: with ``Upgrade: tcp``, Docker's hijacked connection
    (101; kept open after the client half-closes it; closed when the stream ends, which is
    how the client learns the end), else a plain streamed 200."""
    upgrade = req.http.headers.get("Upgrade", "").lower() == "tcp"
    if upgrade and req.http.transport is not None and req.http.protocol is not None:
        req.http.transport.set_protocol(HalfClosable(req.http.protocol))
    resp = web.StreamResponse(status=101 if upgrade else 200, headers={
        "Content-Type": "application/vnd.docker.raw-stream" if tty else "application/vnd.docker.multiplexed-stream",
        **({"Upgrade": "tcp", "Connection": "Upgrade"} if upgrade else {})})
    resp.force_close()
    await resp.prepare(req.http)
    return resp
