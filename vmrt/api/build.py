"""``POST /build`` (the classic builder's endpoint: ``DOCKER_BUILDKIT=0 docker build``, docker-py's
``images.build``).

The body, the build context as a tar (maybe compressed), is spooled to an unnamed file in the
store's ``tmp/`` (at most ``api_max_load`` bytes), then built by ``vmrt build -`` in a process
of its own (its RUN steps' containers need a main thread for their signals), the context on its
stdin. Its output lines are the stream's ``{"stream": ...}`` messages, the image ID an
``{"aux": {"ID": ...}}``, its error line the last message. A client that goes away interrupts
the build (SIGINT: it cleans up as after Ctrl-C).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from .. import build as build_mod
from ..errors import VmrtError
from ..proc import vmrt_here
from .base import ApiError, Request, Routes, headers
from .images import receive, spool_file, stream_job

WAIT_AFTER_INTERRUPT = 30  # seconds a cancelled build has to clean up before it is killed


def _args(req: Request, iidfile: Path) -> list[str]:
    args = ["build", "--iidfile", str(iidfile)]
    for t in req.http.query.getall("t", []):
        args += ["-t", t]
    if req.query("dockerfile"):
        args += ["-f", req.query("dockerfile")]
    raw = req.query("buildargs")
    if raw:
        try:
            build_args = json.loads(raw)
        except ValueError:
            raise ApiError(400, "buildargs is not a JSON object") from None
        if not isinstance(build_args, dict):
            raise ApiError(400, "buildargs is not a JSON object")
        for k, v in build_args.items():
            if v is not None:
                args += ["--build-arg", f"{k}={v}"]
    if req.query("target"):
        args += ["--target", req.query("target")]
    if req.flag("nocache"):
        args.append("--no-cache")
    if req.flag("pull"):
        args.append("--pull")
    if req.flag("q"):
        args.append("-q")
    if req.query("platform"):
        args += ["--platform", req.query("platform")]
    net = req.query("networkmode")
    if net and net != "default":
        args += ["--network", net]
    iso = req.query("isolation")
    if iso in ("hyperv", "vm"):
        args += ["--isolation", "vm"]
    elif iso not in ("", "default", "process"):
        raise ApiError(400, f"invalid isolation {iso!r}")
    return [*args, "-"]


def _build(args: list[str], context: IO[bytes], iidfile: Path, cancel: threading.Event,
           progress: Callable[[dict[str, Any]], None]) -> str:
    """``vmrt ARGS`` with ``context`` on stdin, its output lines as progress; the image ID."""
    proc = subprocess.Popen(vmrt_here(*args), stdin=context, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def interrupt() -> None:
        cancel.wait()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(WAIT_AFTER_INTERRUPT)
            except subprocess.TimeoutExpired:
                proc.kill()
    threading.Thread(target=interrupt, daemon=True).start()
    last = ""
    assert proc.stdout is not None
    with proc.stdout:
        for raw in proc.stdout:
            text = raw.decode(errors="replace")
            if last:
                progress({"stream": last})
            last = text
    rc = proc.wait()
    if rc != 0:
        msg = last.strip().removeprefix("vmrt: ") or f"the build failed (exit {rc})"
        raise VmrtError(msg, exit_code=rc)
    image_id = iidfile.read_text().strip()
    progress({"aux": {"ID": image_id}})
    if last:
        progress({"stream": last})
    return image_id


async def build(req: Request) -> web.StreamResponse:
    """``docker build``'s classic endpoint: the context tar as the body; Docker's JSON stream."""
    f = await asyncio.to_thread(spool_file, req.cfg)
    try:
        with tempfile.TemporaryDirectory(prefix="vmrt-api-build-") as tmp:
            iidfile = Path(tmp) / "iid"
            args = _args(req, iidfile)
            size = await receive(req, f, req.cfg.api_max_load)
            if size == 0:
                raise ApiError(400, "the request has no body: send the build context (a tar)")
            resp = web.StreamResponse(headers={**headers(), "Content-Type": "application/json"})
            await resp.prepare(req.http)
            tags = req.http.query.getall("t", [])
            await stream_job(req, resp, "tag", tags[0] if tags else "",
                              lambda cancel, progress: _build(args, f, iidfile, cancel, progress))
            return resp
    finally:
        await asyncio.to_thread(f.close)


async def prune(req: Request) -> web.StreamResponse:
    """``docker builder prune``: {CachesDeleted, SpaceReclaimed}."""
    gone, freed = await asyncio.to_thread(build_mod.prune_cache, req.cfg, prune_all=req.flag("all"))
    return web.json_response({"CachesDeleted": gone, "SpaceReclaimed": freed}, headers=headers())


def register(routes: Routes) -> None:
    routes.add("POST", "/build", build)
    routes.add("POST", "/build/prune", prune)
