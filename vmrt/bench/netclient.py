"""The net metric's client: TCP throughput to a sink and HTTP GET latency, through published
ports on 127.0.0.1; the same code for every path (containers and host loopback)."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable

from .errors import BenchError

NET_READY_S = 120.0      # net: how long the servers may take to answer
NET_IO_TIMEOUT = 120.0   # net: one socket operation


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports free on 127.0.0.1 now (the kernel's picks)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def connect(port: int, retry_until: float = 0.0, timeout: float = NET_IO_TIMEOUT) -> tuple[socket.socket, float]:
    """Connect to 127.0.0.1:port; returns the socket and the perf_counter taken just before the
    connect that succeeded. Until ``retry_until`` (perf_counter), a refused connection is tried
    again (the sink listens anew after each connection; the attempts before are not timed)."""
    while True:
        t0 = time.perf_counter()
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            s.settimeout(timeout)
            return s, t0
        except (ConnectionRefusedError, ConnectionResetError):
            if time.perf_counter() >= retry_until:
                raise
            time.sleep(0.002)


def net_transfer(port: int, nbytes: int, retry_s: float = 30.0, timeout: float = NET_IO_TIMEOUT) -> float:
    """Send ``nbytes`` to the sink, shut the sending side, wait for the sink's EOF (it has read
    everything and closed). Seconds from connect to that EOF."""
    chunk = memoryview(bytes(1 << 20))
    s, t0 = connect(port, time.perf_counter() + retry_s, timeout)
    with s:
        left = nbytes
        while left:
            n = min(left, len(chunk))
            s.sendall(chunk[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        return time.perf_counter() - t0


def http_get(port: int, size: int, retry_s: float = 0.0, timeout: float = NET_IO_TIMEOUT) -> float:
    """GET /index.html over a new connection (HTTP/1.0: the server closes it), read to EOF, as
    curl does; seconds from connect to the last byte. The status must be 200 and the body ``size``."""
    s, t0 = connect(port, time.perf_counter() + retry_s, timeout)
    with s:
        s.sendall(b"GET /index.html HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        parts = []
        while d := s.recv(65536):
            parts.append(d)
        t1 = time.perf_counter()
    head, _, body = b"".join(parts).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if not re.match(r"HTTP/1\.[01] 200\b", status) or len(body) != size:
        raise BenchError(f"GET /index.html: {status or 'no response'!r}, {len(body)} bytes of body (want {size})")
    return t1 - t0


def wait_net_ready(sink: int, http: int, size: int, timeout: float = NET_READY_S) -> float:
    """Until both servers answer (an empty transfer to the sink, a good GET); seconds it took."""
    t0 = time.perf_counter()
    deadline = t0 + timeout
    last = ""
    probes: list[tuple[str, Callable[[], float]]] = [("sink", lambda: net_transfer(sink, 0, 0.0, 5.0)),
                                                     ("httpd", lambda: http_get(http, size, 0.0, 5.0))]
    for what, probe in probes:
        while True:
            try:
                probe()
                break
            except (OSError, BenchError) as e:
                last = f"{what}: {e}"
            if time.perf_counter() >= deadline:
                raise BenchError(f"the servers did not answer within {timeout:.0f} s ({last})")
            time.sleep(0.2)
    return time.perf_counter() - t0
