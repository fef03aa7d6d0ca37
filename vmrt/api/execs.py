"""Exec endpoints: ``POST /containers/{id}/exec``, ``POST /exec/{id}/start``,
``GET /exec/{id}/json``, ``POST /exec/{id}/resize``. No TTY yet, and the process's stdin is
empty (what a client sends is not forwarded).

An exec is ``vmrt exec`` (:func:`vmrt.execs.run_exec`: runc exec, or the guest agent's exec
port in VM mode) with its stdout and stderr on pipes the service reads and frames. The
service keeps each exec's record (its config, whether it runs, its exit code) in memory, as
Docker's daemon does: they go with the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import threading
from typing import Any

from aiohttp import web

from ..execs import ExecOptions, run_exec
from ..state import State, Status
from .base import ApiError, Request, Routes
from .streams import STDERR, STDOUT, frame, hijack

MAX_EXECS = 1024  # records kept (the oldest finished ones go first)


@dataclasses.dataclass
class Exec:
    id: str
    container: str
    cmd: list[str]
    env: list[str]
    user: str | None
    workdir: str | None
    stdout: bool
    stderr: bool
    running: bool = False
    started: bool = False
    exit_code: int | None = None


_execs: dict[str, Exec] = {}


def _strings(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ApiError(400, f"{what} must be a list of strings")
    return list(v)


def _running(req: Request, ref: str) -> str:
    st = State(req.cfg.db_path)
    try:
        c = st.get(ref)
    finally:
        st.close()
    if c.status != Status.RUNNING:
        raise ApiError(409, f"Container {c.id} is not running")
    return c.id


async def create(req: Request) -> web.StreamResponse:
    body = await req.json()
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    cmd = _strings(body.get("Cmd"), "Cmd")
    if not cmd:
        raise ApiError(400, "No exec command specified")
    if body.get("Privileged"):
        raise ApiError(400, "privileged execs are not supported by vmrt")
    if body.get("Tty"):
        raise ApiError(400, "an exec with a TTY is not supported through the API yet (use `vmrt exec -it`)")
    # AttachStdin (docker-compose exec sets it): the process's stdin is empty for now
    cid = await asyncio.to_thread(_running, req, req.params["id"])
    while len(_execs) >= MAX_EXECS:  # forget the oldest finished one
        old = next((k for k, e in _execs.items() if not e.running), None)
        if old is None:
            raise ApiError(409, "too many execs running")
        del _execs[old]
    e = Exec(secrets.token_hex(32), cid, cmd, _strings(body.get("Env"), "Env"), body.get("User") or None,
             body.get("WorkingDir") or None, body.get("AttachStdout", True) is not False,
             body.get("AttachStderr", True) is not False)
    _execs[e.id] = e
    return web.json_response({"Id": e.id}, status=201)


def _get(req: Request) -> Exec:
    e = _execs.get(req.params["id"])
    if e is None:
        raise ApiError(404, f"No such exec instance: {req.params['id']}")
    return e


async def _relay(fd: int, stream: int, resp: web.StreamResponse | None) -> None:
    """One of the exec's output pipes to the client, framed (or drained, detached)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    try:
        while data := await reader.read(65536):
            if resp is not None:
                with contextlib.suppress(ConnectionResetError):
                    await resp.write(frame(stream, data))
    finally:
        transport.close()


async def start(req: Request) -> web.StreamResponse:
    e = _get(req)
    body = await req.json() or {}
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if e.started:
        raise ApiError(409, f"exec {e.id} has already been started")
    if body.get("Tty"):
        raise ApiError(400, "an exec with a TTY is not supported through the API yet")
    e.started = e.running = True
    detach = bool(body.get("Detach"))
    resp = None if detach else await hijack(req, tty=False)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    eo = ExecOptions(e.cmd, e.env, e.user, e.workdir, stdio=(null, out_w, err_w))
    done = threading.Event()

    def run() -> int:
        try:
            return run_exec(req.cfg, e.container, eo)
        finally:
            for fd in (null, out_w, err_w):  # the readers see EOF once the process's copies close too
                os.close(fd)
            done.set()

    relays = [asyncio.ensure_future(_relay(out_r, STDOUT, resp if e.stdout else None)),
              asyncio.ensure_future(_relay(err_r, STDERR, resp if e.stderr else None))]
    try:
        e.exit_code = await asyncio.to_thread(run)
    except Exception as err:  # the exec could not start (the container stopped): the client's stream says so
        e.exit_code = getattr(err, "exit_code", 126)
        if resp is not None:
            with contextlib.suppress(ConnectionResetError):
                await resp.write(frame(STDERR, f"{err}\n".encode()))
    finally:
        e.running = False
        await asyncio.gather(*relays, return_exceptions=True)
    if resp is None:
        return web.Response(status=200)
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def inspect(req: Request) -> web.StreamResponse:
    e = _get(req)
    return web.json_response({
        "ID": e.id, "Running": e.running, "ExitCode": e.exit_code, "ContainerID": e.container,
        "OpenStdin": False, "OpenStdout": e.stdout, "OpenStderr": e.stderr, "CanRemove": False,
        "DetachKeys": "", "Pid": 0,
        "ProcessConfig": {"tty": False, "entrypoint": e.cmd[0], "arguments": e.cmd[1:], "privileged": False,
                          "user": e.user or ""}})


async def resize(req: Request) -> web.StreamResponse:
    _get(req)
    return web.Response(status=201)


def register(routes: Routes) -> None:
    routes.add("POST", "/containers/(?P<id>[^/]+)/exec", create)
    routes.add("POST", "/exec/(?P<id>[^/]+)/start", start)
    routes.add("GET", "/exec/(?P<id>[^/]+)/json", inspect)
    routes.add("POST", "/exec/(?P<id>[^/]+)/resize", resize)
