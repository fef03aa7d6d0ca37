"""The first frame of a booting VM: the agent's HELLO, read alone.

Whoever boots a VM up to its agent (the pool daemon, ``vmrt snapshot build``) waits
for exactly one frame, HELLO of this protocol version, and nothing after it: the
channel must be idle when the VM is handed on (a claim, a saved state).
"""

from __future__ import annotations

import asyncio
import socket

from ..errors import AgentError
from . import protocol as P


async def read_hello(sock: socket.socket) -> P.Hello:
    """The agent's HELLO on ``sock`` (non-blocking); AgentError on anything else."""
    loop = asyncio.get_running_loop()
    decoder = P.FrameDecoder(P.FROM_AGENT)
    while True:
        data = await loop.sock_recv(sock, 4096)
        if not data:
            raise AgentError("the guest agent channel closed during boot")
        for fr in decoder.feed(data):
            if fr.type != P.Msg.HELLO:
                raise AgentError(f"the guest agent sent {fr.type.name} before HELLO")
            h = P.decode_hello(fr.payload)
            if h.version != P.VERSION:
                raise AgentError(f"agent speaks protocol {h.version}, host speaks {P.VERSION}")
            if decoder.pending:
                raise AgentError("the guest agent sent more than HELLO")
            return h
