"""Exec endpoints: ``POST /containers/{id}/exec``, ``POST /exec/{id}/start``,
``GET /exec/{id}/json``, ``POST /exec/{id}/resize``.

An exec is ``vmrt exec`` (:func:`vmrt.execs.run_exec`: runc exec, or the guest agent's exec
port in VM mode) with its stdio on pipes the service reads and frames, or with a TTY on a
pseudo-terminal the service holds: its master is the client's raw stream, its slave the
exec's stdio (runc relays it into the container's own terminal; the VM exec client sends it
to the guest's). What the client sends on the hijacked connection is the process's stdin
(``AttachStdin``), ended by the client's half-close. A resize sets the service's terminal's
size and tells the exec (runc: SIGWINCH; the VM client: its resize pipe). The service keeps
each exec's record (its config, whether it runs, its exit code) in memory, as Docker's daemon
does: they go with the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import secrets
import struct
import termios
import threading
import tty as tty_mod
from typing import Any

from aiohttp import web

from ..execs import ExecOptions, run_exec
from ..state import State, Status
from .base import ApiError, Request, Routes, in_thread, while_connected
from .streams import STDERR, STDOUT, Stdin, frame, hijack

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
    stdin: bool = False
    tty: bool = False
    size: tuple[int, int] = (24, 80)     # rows, columns (a resize before the start counts)
    master: int | None = None            # the TTY's master while the exec runs
    winch: int | None = None             # the resize pipe's write end while the exec runs
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
    cid = await asyncio.to_thread(_running, req, req.params["id"])
    while len(_execs) >= MAX_EXECS:  # forget the oldest finished one
        old = next((k for k, e in _execs.items() if not e.running), None)
        if old is None:
            raise ApiError(409, "too many execs running")
        del _execs[old]
    env = _strings(body.get("Env"), "Env")
    if body.get("Tty") and not any(v.startswith("TERM=") for v in env):
        env.insert(0, "TERM=xterm")  # as Docker's daemon gives a TTY
    e = Exec(secrets.token_hex(32), cid, cmd, env, body.get("User") or None,
             body.get("WorkingDir") or None, body.get("AttachStdout", True) is not False,
             body.get("AttachStderr", True) is not False, stdin=bool(body.get("AttachStdin")),
             tty=bool(body.get("Tty")))
    _execs[e.id] = e
    return web.json_response({"Id": e.id}, status=201)


def _get(req: Request) -> Exec:
    e = _execs.get(req.params["id"])
    if e is None:
        raise ApiError(404, f"No such exec instance: {req.params['id']}")
    return e


async def _relay(fd: int, stream: int | None, resp: web.StreamResponse | None) -> None:
    """One of the exec's outputs to the client: framed as ``stream``, raw (a TTY: None), or
    drained (detached). Ends at EOF, or EIO: a terminal's master once its slaves are closed."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    try:
        while data := await reader.read(65536):
            if resp is not None:
                with contextlib.suppress(ConnectionResetError):
                    await resp.write(data if stream is None else frame(stream, data))
    except OSError:  # EIO
        pass
    finally:
        transport.close()


async def feed(stdin: Stdin, fd: int, close: bool) -> None:
    """What the client sends to fd (owned: closed at the end, which is the process's EOF when
    ``close``, else it is kept open until the exec ends: a terminal has no EOF to pass on)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", 0))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        while data := await stdin.read():
            writer.write(data)
            await writer.drain()
        if not close:
            await asyncio.Event().wait()  # until cancelled
    except OSError:  # the process closed its stdin, or ended
        pass
    finally:
        transport.close()


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def start(req: Request) -> web.StreamResponse:
    e = _get(req)
    body = await req.json() or {}
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if e.started:
        raise ApiError(409, f"exec {e.id} has already been started")
    e.tty = e.tty or bool(body.get("Tty"))
    e.started = e.running = True
    detach = bool(body.get("Detach"))
    resp, stdin = (None, None) if detach else await hijack(req, tty=e.tty, stdin=e.stdin)
    mine: list[int] = []  # this side's copies of the exec's stdio, closed once it ended
    relays, feeders = [], []
    winch_r, e.winch = os.pipe2(os.O_CLOEXEC)
    mine.append(winch_r)
    if e.tty:
        master, slave = os.openpty()
        os.set_inheritable(master, False)
        tty_mod.setraw(slave)  # bytes pass as they are: the container's terminal does the rest
        set_size(master, *e.size)
        e.master = master
        mine.append(slave)
        stdio = (slave, slave, slave)
        relays.append(asyncio.ensure_future(_relay(master, None, resp)))
        if stdin is not None:
            feeders.append(asyncio.ensure_future(feed(stdin, os.dup(master), close=False)))
    else:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        if stdin is not None:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            feeders.append(asyncio.ensure_future(feed(stdin, in_w, close=True)))
        else:
            in_r = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        mine += [in_r, out_w, err_w]
        stdio = (in_r, out_w, err_w)
        relays += [asyncio.ensure_future(_relay(out_r, STDOUT, resp if e.stdout else None)),
                   asyncio.ensure_future(_relay(err_r, STDERR, resp if e.stderr else None))]
    eo = ExecOptions(e.cmd, e.env, e.user, e.workdir, interactive=stdin is not None, tty=e.tty, stdio=stdio,
                     winch=winch_r)
    done = threading.Event()

    def run() -> int:
        try:
            return run_exec(req.cfg, e.container, eo)
        finally:
            for fd in mine:  # the readers see EOF (or EIO) once the process's copies close too
                os.close(fd)
            done.set()

    def hang_up() -> None:  # the client went away: the exec's terminal hangs up, its pipes close
        e.master = None
        for t in (*relays, *feeders):
            t.cancel()
        if e.winch is not None:  # the resize pipe's end is the terminal's hang-up (SIGHUP to the process)
            os.close(e.winch)
            e.winch = None

    try:
        async with while_connected(req.http, hang_up) if resp is not None else contextlib.nullcontext():
            e.exit_code = await in_thread(run)
    except Exception as err:  # the exec could not start (the container stopped): the client's stream says so
        e.exit_code = getattr(err, "exit_code", 126)
        if resp is not None:
            with contextlib.suppress(ConnectionResetError):
                await resp.write(f"{err}\n".encode() if e.tty else frame(STDERR, f"{err}\n".encode()))
    finally:
        e.running = False
        if e.winch is not None:
            os.close(e.winch)
        e.winch = e.master = None
        for t in feeders:  # the process is gone
            t.cancel()
        await asyncio.gather(*relays, *feeders, return_exceptions=True)
    if resp is None:
        return web.Response(status=200)
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def inspect(req: Request) -> web.StreamResponse:
    e = _get(req)
    return web.json_response({
        "ID": e.id, "Running": e.running, "ExitCode": e.exit_code, "ContainerID": e.container,
        "OpenStdin": e.stdin, "OpenStdout": e.stdout, "OpenStderr": e.stderr, "CanRemove": False,
        "DetachKeys": "", "Pid": 0,
        "ProcessConfig": {"tty": e.tty, "entrypoint": e.cmd[0], "arguments": e.cmd[1:], "privileged": False,
                          "user": e.user or ""}})


def size_query(req: Request) -> tuple[int, int]:
    """``?h=ROWS&w=COLUMNS`` of a resize (Docker: both required, unsigned)."""
    try:
        rows, cols = int(req.query("h") or ""), int(req.query("w") or "")
    except ValueError:
        raise ApiError(400, "h and w must be numbers") from None
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ApiError(400, "h and w are out of range")
    return rows, cols


async def resize(req: Request) -> web.StreamResponse:
    e = _get(req)
    rows, cols = size_query(req)
    e.size = (rows, cols)
    if e.tty and e.master is not None and e.winch is not None:
        with contextlib.suppress(OSError):
            set_size(e.master, rows, cols)
            os.write(e.winch, b"w")
    return web.Response(status=200)


def register(routes: Routes) -> None:
    routes.add("POST", "/containers/(?P<id>[^/]+)/exec", create)
    routes.add("POST", "/exec/(?P<id>[^/]+)/start", start)
    routes.add("GET", "/exec/(?P<id>[^/]+)/json", inspect)
    routes.add("POST", "/exec/(?P<id>[^/]+)/resize", resize)
