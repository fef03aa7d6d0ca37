"""Docker's streams: the multiplexed stdout/stderr frames, and the hijacked connection that
attach and exec start answer with."""

from __future__ import annotations

import asyncio
import contextlib
import struct

from aiohttp import web

from .base import Request

STDOUT, STDERR = 1, 2


def frame(stream: int, data: bytes) -> bytes:
    """Docker's multiplexed stream frame: [stream, 0, 0, 0, size (big-endian u32)] + data."""
    return struct.pack(">BxxxI", stream, len(data)) + data


class Stdin:
    """What the client sends on a hijacked connection after the upgrade: the container's or
    the exec's stdin, for one reader. aiohttp feeds it as an upgraded connection's payload
    parser (``feed_data``/``feed_eof``); bounded: the socket is not read while LIMIT bytes
    wait."""

    LIMIT = 1 << 20

    def __init__(self, transport: asyncio.BaseTransport | None) -> None:
        self.transport = transport
        self.buf = bytearray()
        self.eof = transport is None
        self.paused = False
        self.event = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.buf += data
        self.event.set()
        if len(self.buf) >= self.LIMIT and not self.paused and isinstance(self.transport, asyncio.ReadTransport):
            self.paused = True
            self.transport.pause_reading()
        return False, b""

    def feed_eof(self) -> None:
        self.eof = True
        self.event.set()

    async def read(self) -> bytes:
        """The next bytes the client sent (b"": it half-closed the connection or went away)."""
        while not self.buf and not self.eof:
            self.event.clear()
            await self.event.wait()
        data = bytes(self.buf)
        self.buf.clear()
        if self.paused and isinstance(self.transport, asyncio.ReadTransport):
            self.paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()
        return data


class HalfClosable(asyncio.Protocol):
    """aiohttp's protocol, except that the client's EOF leaves the connection open for our
    writes. A client with no stdin to send half-closes a hijacked connection (docker's
    CloseWrite); asyncio closes a transport whose protocol's ``eof_received`` returns a falsy
    value, as aiohttp's does. The EOF ends the stdin the client sent, if one is read."""

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self.inner = inner
        self.stdin: Stdin | None = None

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
        if self.stdin is not None:
            self.stdin.feed_eof()
        return True


async def hijack(req: Request, tty: bool, stdin: bool = False) -> tuple[web.StreamResponse, Stdin | None]:
    """The response a stream goes out on: with ``Upgrade: tcp``, Docker's hijacked connection
    (101; kept open after the client half-closes it; closed when the stream ends, which is
    how the client learns the end), else a plain streamed 200. With ``stdin``, what the client
    sends after the upgrade is read into the Stdin returned (without an upgrade: an empty one)."""
    upgrade = req.http.headers.get("Upgrade", "").lower() == "tcp"
    wrapper = None
    if upgrade and req.http.transport is not None and req.http.protocol is not None:
        wrapper = HalfClosable(req.http.protocol)
        req.http.transport.set_protocol(wrapper)
    resp = web.StreamResponse(status=101 if upgrade else 200, headers={
        "Content-Type": "application/vnd.docker.raw-stream" if tty else "application/vnd.docker.multiplexed-stream",
        **({"Upgrade": "tcp", "Connection": "Upgrade"} if upgrade else {})})
    resp.force_close()
    await resp.prepare(req.http)
    sink = None
    if stdin:
        sink = Stdin(req.http.transport if wrapper is not None else None)
        if wrapper is not None and req.http.protocol is not None:
            wrapper.stdin = sink
            req.http.protocol.set_parser(sink)  # type: ignore[arg-type]  # what was sent already first
    return resp, sink
