"""Container endpoints: create, start, stop, restart, kill, wait, logs, attach (output and
stdin), list, inspect, delete, rename, stats, prune, resize.

A create becomes ``vmrt create``'s arguments (:class:`containercmds.RunArgs`), so it is
checked as the CLI checks it; what vmrt cannot honour (privileged, added capabilities,
another runtime) is refused with 400 rather than ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from .. import containercmds, lifecycle, logfile
from .. import proc as proc_mod
from ..config import Config
from ..errors import StateError, VmrtError
from ..layout import ATTACH_NAME, LOG_NAME, container_dir
from ..state import Container, State, Status
from . import events
from .base import ApiError, Request, Routes, in_thread, outcomes, parse_filters, while_connected
from .execs import size_query
from .streams import STDERR, STDOUT, Stdin, frame, hijack

POLL = 0.02  # a wait, a followed log: how often the state and the log are read
# the cancel events of the waits and streams in flight: each runs a thread, which the service's
# stop ends through these (a thread left polling would keep the process from exiting)
_cancels: set[threading.Event] = set()


def _cancel_event() -> threading.Event:
    e = threading.Event()
    _cancels.add(e)
    return e


def cancel_all() -> None:
    for e in list(_cancels):
        e.set()


# --- create ------------------------------------------------------------------------------
def _strings(v: Any, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ApiError(400, f"{what} must be a list of strings")
    return tuple(v)


def _isolation(value: Any) -> str:
    """HostConfig.Isolation: hyperv and vm are a micro-VM, process is namespaces, empty or
    default the configured default."""
    v = (value or "default")
    if not isinstance(v, str):
        raise ApiError(400, "HostConfig.Isolation must be a string")
    v = v.lower()
    if v in ("hyperv", "vm"):
        return "vm"
    if v in ("process", "default"):
        return v
    raise ApiError(400, f"invalid isolation {value!r}: use hyperv (a micro-VM), process or default")


def _publish(bindings: Any) -> tuple[str, ...]:
    """PortBindings {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]} as ``-p`` arguments."""
    if not bindings:
        return ()
    if not isinstance(bindings, dict):
        raise ApiError(400, "HostConfig.PortBindings must be an object")
    out = []
    for port, binds in bindings.items():
        if binds is not None and not isinstance(binds, list):
            raise ApiError(400, "HostConfig.PortBindings: a port's bindings must be a list")
        for b in binds or [{}]:
            if not isinstance(b, dict):
                raise ApiError(400, "a port binding must be an object")
            ip, host = b.get("HostIp") or "", b.get("HostPort") or ""
            if not isinstance(ip, str) or not isinstance(host, str):
                raise ApiError(400, "a port binding's HostIp and HostPort must be strings")
            out.append(f"{ip}:{host}:{port}" if ip else f"{host}:{port}" if host else port)
    return tuple(out)


def _mounts(mounts: Any) -> tuple[str, ...]:
    """HostConfig.Mounts (bind, volume and tmpfs) as ``--mount`` arguments."""
    out = []
    for m in mounts or []:
        if not isinstance(m, dict):
            raise ApiError(400, "a mount must be an object")
        kind = m.get("Type") or "volume"
        if kind not in ("bind", "volume", "tmpfs"):
            raise ApiError(400, f"mount type {kind!r} is not supported (bind, volume or tmpfs)")
        parts = [f"type={kind}", f"target={m.get('Target', '')}"]
        if kind == "bind" or (kind == "volume" and m.get("Source")):
            parts.append(f"source={m.get('Source', '')}")
        if m.get("ReadOnly"):
            parts.append("readonly")
        if kind == "tmpfs" and (size := (m.get("TmpfsOptions") or {}).get("SizeBytes")):
            if not _KINDS["int"][0](size):
                raise ApiError(400, "TmpfsOptions.SizeBytes must be an integer")
            parts.append(f"tmpfs-size={size}")
        out.append(",".join(parts))
    return tuple(out)


def _label_map(v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ApiError(400, "Labels must be an object of strings")
    return dict(v)


def _console_size(v: Any) -> tuple[int, int] | None:
    """HostConfig.ConsoleSize [rows, columns] (the docker CLI's terminal, API 1.42+); 0s: unset."""
    if not v:
        return None
    if (not isinstance(v, list) or len(v) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 0xFFFF for n in v)):
        raise ApiError(400, "HostConfig.ConsoleSize must be [rows, columns]")
    return (v[0], v[1]) if all(v) else None


def _restart(policy: Any) -> str:
    if not policy or not policy.get("Name"):
        return "no"
    name, count = policy["Name"], policy.get("MaximumRetryCount") or 0
    return f"{name}:{count}" if name == "on-failure" and count else str(name)


# the types of the create's fields that vmrt reads, as Docker's daemon decodes them (Go's JSON:
# a field of another type is a 400; null is its zero; fields it does not know are ignored)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and -1 << 63 <= v < 1 << 63,
            "an integer (64 bits)"),
    "obj": (lambda v: isinstance(v, dict), "an object"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "cmd": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
            "a string or a list of strings"),
    "objs": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list of objects"),
    "strmap": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
               "an object of strings"),
}
_CONFIG = {"Hostname": "str", "User": "str", "WorkingDir": "str", "Image": "str", "Tty": "bool",
           "OpenStdin": "bool", "StdinOnce": "bool", "Env": "strs", "Cmd": "cmd", "Entrypoint": "cmd",
           "ExposedPorts": "obj", "Labels": "strmap", "Healthcheck": "obj", "HostConfig": "obj",
           "NetworkingConfig": "obj"}
_HOST_CONFIG = {"Binds": "strs", "NetworkMode": "str", "PortBindings": "obj", "RestartPolicy": "obj",
                "AutoRemove": "bool", "Mounts": "objs", "Dns": "strs", "DnsOptions": "strs", "DnsSearch": "strs",
                "ExtraHosts": "strs", "Privileged": "bool", "PublishAllPorts": "bool", "ReadonlyRootfs": "bool",
                "Tmpfs": "strmap", "Isolation": "str", "Memory": "int", "NanoCpus": "int", "CpuQuota": "int",
                "CpuPeriod": "int", "PidsLimit": "int", "LogConfig": "obj", "Runtime": "str"}
_NESTED = {"RestartPolicy": {"Name": "str", "MaximumRetryCount": "int"},
           "LogConfig": {"Type": "str", "Config": "strmap"}, "NetworkingConfig": {"EndpointsConfig": "obj"}}
_MOUNT = {"Type": "str", "Source": "str", "Target": "str", "ReadOnly": "bool", "TmpfsOptions": "obj"}


def _typed(obj: dict[str, Any], fields: dict[str, str], where: str = "") -> None:
    """Each of ``fields`` in ``obj`` is null or of its kind, else a 400 naming it."""
    for key, kind in fields.items():
        v = obj.get(key)
        test, what = _KINDS[kind]
        if v is not None and not test(v):
            raise ApiError(400, f"{where}{key} must be {what}")
        if v is not None and key in _NESTED:
            _typed(v, _NESTED[key], f"{where}{key}.")


def _no_nul(body: Any) -> None:
    """No string of the body holds a NUL (JSON may carry one; an argument, a path, an
    environment cannot)."""
    todo = [body]
    while todo:
        v = todo.pop()
        if isinstance(v, str) and "\0" in v:
            raise ApiError(400, f"invalid string {v[:100]!r}: it contains a NUL byte")
        if isinstance(v, dict):
            todo += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            todo += v


def run_args(body: Any, name: str | None) -> containercmds.RunArgs:
    """A create's body as ``vmrt create``'s flags."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object (the container's config)")
    _typed(body, _CONFIG)
    _no_nul(body)
    image = body.get("Image")
    if not image:
        raise ApiError(400, "config: Image is required")
    hc = body.get("HostConfig") or {}
    _typed(hc, _HOST_CONFIG, "HostConfig.")
    for i, m in enumerate(hc.get("Mounts") or []):
        _typed(m, _MOUNT, f"HostConfig.Mounts[{i}].")
    if hc.get("Privileged"):
        raise ApiError(400, "privileged containers are not supported by vmrt (a tenant never gets the host's devices)")
    for key in ("CapAdd", "Devices", "SecurityOpt", "VolumesFrom", "Links"):
        if hc.get(key):
            raise ApiError(400, f"HostConfig.{key} is not supported by vmrt")
    if hc.get("Runtime") not in (None, "", "runc"):
        raise ApiError(400, f"runtime {hc['Runtime']!r} is not supported (choose the isolation instead)")
    entry = body.get("Entrypoint")
    entrypoint = None
    if isinstance(entry, list):
        if len(entry) > 1:  # `docker run --entrypoint` gives one; the rest goes before Cmd
            body = {**body, "Cmd": [*entry[1:], *(body.get("Cmd") or [])]}
        entrypoint = entry[0] if entry else ""
    elif isinstance(entry, str):
        entrypoint = entry
    elif entry is not None:
        raise ApiError(400, "Entrypoint must be a string or a list")
    cmd = body.get("Cmd")
    nano = hc.get("NanoCpus") or 0
    quota, period = hc.get("CpuQuota") or 0, hc.get("CpuPeriod") or 100000
    cpus = str(nano / 1e9) if nano else str(quota / period) if quota else None
    mem = hc.get("Memory") or 0
    log = hc.get("LogConfig") or {}
    if log.get("Type") not in (None, "", "json-file"):
        raise ApiError(400, f"log driver {log['Type']!r} is not supported (json-file)")
    network = hc.get("NetworkMode") or "default"
    endpoints = (body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {}
    if not isinstance(endpoints, dict):
        raise ApiError(400, "NetworkingConfig.EndpointsConfig must be an object")
    aliases = [a for ep in endpoints.values() if isinstance(ep, dict)
               for a in _strings(ep.get("Aliases") or [], "EndpointsConfig.Aliases")]
    exposed = body.get("ExposedPorts") or {}
    env = _strings(body.get("Env"), "Env")
    if body.get("Tty") and not any(v.startswith("TERM=") for v in env):
        env = ("TERM=xterm", *env)  # as Docker's daemon gives a TTY
    return containercmds.RunArgs(
        image=image, command=_strings(cmd, "Cmd"), name=name or None, env=env,
        workdir=body.get("WorkingDir") or None, user=body.get("User") or None,
        hostname=body.get("Hostname") or None, entrypoint=entrypoint,
        interactive=bool(body.get("OpenStdin")), stdin_once=bool(body.get("StdinOnce")), tty=bool(body.get("Tty")),
        tty_size=_console_size(hc.get("ConsoleSize")), healthcheck=body.get("Healthcheck"),
        memory=str(mem) if mem else None, cpus=cpus,
        pids_limit=str(hc["PidsLimit"]) if hc.get("PidsLimit") else None,
        volumes=_strings(hc.get("Binds"), "HostConfig.Binds"), mounts=_mounts(hc.get("Mounts")),
        tmpfs=tuple(f"{k}:{v}" if v else k for k, v in (hc.get("Tmpfs") or {}).items()),
        isolation=_isolation(hc.get("Isolation")), read_only=bool(hc.get("ReadonlyRootfs")),
        pull_policy="never",  # as Docker's daemon: a client pulls (POST /images/create) on a 404
        restart=_restart(hc.get("RestartPolicy")), rm_deferred=bool(hc.get("AutoRemove")),
        network="bridge" if network == "default" else network, network_aliases=_strings(aliases, "Aliases"),
        publish=_publish(hc.get("PortBindings")), publish_all=bool(hc.get("PublishAllPorts")),
        expose=tuple(exposed), dns=_strings(hc.get("Dns"), "HostConfig.Dns"),
        dns_search=_strings(hc.get("DnsSearch"), "HostConfig.DnsSearch"),
        dns_options=_strings(hc.get("DnsOptions"), "HostConfig.DnsOptions"),
        add_hosts=_strings(hc.get("ExtraHosts"), "HostConfig.ExtraHosts"),
        log_opts=tuple(f"{k}={v}" for k, v in (log.get("Config") or {}).items()),
        labels=tuple(f"{k}={v}" for k, v in _label_map(body.get("Labels")).items()))


async def create(req: Request) -> web.StreamResponse:
    args = run_args(await req.json(), req.query("name"))
    _status, cid = await asyncio.to_thread(containercmds.run, req.cfg, args, create=True)
    if cid:
        events.container_event(req.cfg, await asyncio.to_thread(_get, req, cid), "create")
    return web.json_response({"Id": cid, "Warnings": []}, status=201)


# --- one container -------------------------------------------------------------------------
def _get(req: Request, ref: str | None = None) -> Container:
    st = State(req.cfg.db_path)
    try:
        return st.get(ref or req.params["id"])
    finally:
        st.close()


async def start(req: Request) -> web.StreamResponse:
    c = await asyncio.to_thread(_get, req)
    if c.status == Status.RUNNING and lifecycle.owner_alive(c):
        return web.Response(status=304)
    await asyncio.to_thread(outcomes, containercmds.start(req.cfg, (c.id,)))
    with contextlib.suppress(StateError):  # (an AutoRemove one may be gone already)
        cur = await asyncio.to_thread(_get, req, c.id)
        events.container_event(req.cfg, cur, "start")
        if cur.status != Status.RUNNING and cur.finished:
            events.container_event(req.cfg, cur, "die")
    return web.Response(status=204)


async def stop(req: Request) -> web.StreamResponse:
    c = await asyncio.to_thread(_get, req)
    if c.status != Status.RUNNING:
        return web.Response(status=304)
    t = req.int_query("t", 10)
    await asyncio.to_thread(outcomes, containercmds.stop(req.cfg, (c.id,), timeout=float(t or 0)))
    return web.Response(status=204)


async def restart(req: Request) -> web.StreamResponse:
    c = await asyncio.to_thread(_get, req)
    t = req.int_query("t", 10)
    await asyncio.to_thread(outcomes, containercmds.restart(req.cfg, (c.id,), timeout=float(t or 0)))
    return web.Response(status=204)


async def kill(req: Request) -> web.StreamResponse:
    c = await asyncio.to_thread(_get, req)
    if c.status != Status.RUNNING:
        raise ApiError(409, f"Cannot kill container: {c.name}: container is not running")
    sig = req.query("signal") or "KILL"
    await asyncio.to_thread(outcomes, containercmds.kill(req.cfg, (c.id,), sig=sig))  # SIGKILL: waited for
    return web.Response(status=204)


async def remove(req: Request) -> web.StreamResponse:
    c = await asyncio.to_thread(_get, req)
    force = req.flag("force")
    if c.status == Status.RUNNING and not force:
        raise ApiError(409, f"You cannot remove a running container {c.id}. Stop the container before "
                            "attempting removal or force remove")
    await asyncio.to_thread(outcomes, containercmds.rm(req.cfg, (c.id,), force=force))
    events.container_event(req.cfg, c, "destroy")
    return web.Response(status=204)


async def inspect(req: Request) -> web.StreamResponse:
    c = await asyncio.to_thread(_get, req)
    return web.json_response(await asyncio.to_thread(containercmds.inspect_doc, req.cfg, c))


def _summary(req: Request, c: Container, doc: dict[str, Any]) -> dict[str, Any]:
    ports = []
    for port, binds in ((doc.get("NetworkSettings") or {}).get("Ports") or {}).items():
        num, _, proto = port.partition("/")
        for b in binds or [{}]:
            p: dict[str, Any] = {"PrivatePort": int(num), "Type": proto or "tcp"}
            if b.get("HostPort"):
                p.update(IP=b.get("HostIp") or "0.0.0.0", PublicPort=int(b["HostPort"]))
            ports.append(p)
    return {"Id": c.id, "Names": ["/" + c.name], "Image": c.image, "ImageID": c.image_id,
            "Command": " ".join(c.command), "Created": int(c.created), "Ports": ports,
            "Labels": doc["Config"].get("Labels") or {},
            "State": c.status.value, "Status": containercmds.status_text(c),
            "HostConfig": {"NetworkMode": doc["HostConfig"]["NetworkMode"], "Isolation": c.isolation},
            "NetworkSettings": {"Networks": (doc.get("NetworkSettings") or {}).get("Networks") or {}},
            "Mounts": doc.get("Mounts") or []}


STATUSES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")


def _filters(text: str) -> tuple[str, ...]:
    """Docker's ``filters`` as vmrt's ``key=value``."""
    filters = parse_filters(text)
    for v in filters.get("status", []):
        if v not in STATUSES:
            raise ApiError(400, f"invalid filter 'status={v[:100]}'")
    return tuple(f"{k}={v}" for k, vs in filters.items() for v in vs)


def _list(req: Request) -> list[dict[str, Any]]:
    shown = containercmds.matching(req.cfg, show_all=req.flag("all"), filters=_filters(req.query("filters")))
    limit = req.int_query("limit", -1)
    if limit is not None and limit > 0:
        shown = sorted(shown, key=lambda c: c.created, reverse=True)[:limit]
    return [_summary(req, c, containercmds.inspect_doc(req.cfg, c)) for c in shown]


async def list_containers(req: Request) -> web.StreamResponse:
    return web.json_response(await asyncio.to_thread(_list, req))


# --- wait --------------------------------------------------------------------------------
def _wait(req: Request, c: Container, condition: str, cancel: threading.Event,
          died: Callable[[Container], None]) -> int | None:
    """The exit code once ``condition`` holds: not-running (now, or once it stops), next-exit
    (an exit after this call), removed (gone; an AutoRemove container is removed here, once
    its exit code is known); None if ``cancel`` came first."""
    asked = time.time()
    st = State(req.cfg.db_path)
    try:
        while not cancel.is_set():
            try:
                cur = st.get(c.id)
            except StateError:
                return c.exit_code or 0  # removed by someone else: the last code seen
            c = cur
            stopped = cur.status != Status.RUNNING and not lifecycle.owner_alive(cur)
            if cur.status == Status.RUNNING and not lifecycle.owner_alive(cur):
                lifecycle.reconcile(req.cfg, st)  # its owner died: the record catches up
                continue
            exited_since = cur.finished is not None and cur.finished >= asked
            if condition == "not-running" and stopped:
                return cur.exit_code or 0
            if condition in ("next-exit", "removed") and stopped and (exited_since or cur.status == Status.EXITED
                                                                      and condition == "removed"):
                if condition == "removed" and containercmds.removes_when_waited(req.cfg, cur):
                    died(cur)  # its die event, before it is gone (the watcher could miss it)
                    lifecycle.remove(req.cfg, cur.id, True)
                    return cur.exit_code or 0
                if condition == "next-exit":
                    return cur.exit_code or 0
            time.sleep(POLL)
    finally:
        st.close()
    return None


async def wait(req: Request) -> web.StreamResponse:
    condition = req.query("condition") or "not-running"
    if condition not in ("not-running", "next-exit", "removed"):
        raise ApiError(400, f"invalid condition {condition!r}: not-running, next-exit or removed")
    c = await asyncio.to_thread(_get, req)
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(req.http)  # the headers now: a client starts the container once it has them
    cancel = _cancel_event()
    loop = asyncio.get_running_loop()

    def died(cur: Container) -> None:
        loop.call_soon_threadsafe(events.container_event, req.cfg, cur, "die")
        loop.call_soon_threadsafe(events.container_event, req.cfg, cur, "destroy")

    try:
        async with while_connected(req.http, cancel.set):
            code = await in_thread(lambda: _wait(req, c, condition, cancel, died))
    finally:
        cancel.set()
        _cancels.discard(cancel)
    if code is not None:  # else the client is gone, or the service stops: no exit code to tell
        await resp.write(json.dumps({"StatusCode": code, "Error": None}).encode() + b"\n")
    await resp.write_eof()
    return resp


# --- logs and attach ---------------------------------------------------------------------
def _log_records(req: Request, c: Container, follow: bool, cancel: threading.Event,
                 skip_old: bool = False) -> Iterator[dict[str, Any]]:
    """The container's log records (from its json-file log); with ``follow``, until its owner is
    gone or ``cancel`` is set; ``skip_old``: only what is logged from now on."""
    st = State(req.cfg.db_path)

    def done() -> bool:
        if cancel.is_set():
            return True
        try:
            return not lifecycle.owner_alive(st.get(c.id))
        except StateError:
            return True

    try:
        old = True
        for rec in logfile.records(container_dir(req.cfg, c.id) / LOG_NAME, follow, done, poll=POLL):
            if rec is None:
                old = False
                continue
            if old and skip_old:
                continue
            yield rec
    finally:
        st.close()


async def _pump(req: Request, resp: web.StreamResponse, records: Iterator[dict[str, Any]],
                cancel: threading.Event, *, tty: bool, stdout: bool, stderr: bool, timestamps: bool) -> None:
    """Log records to the client: raw for a TTY container, else in Docker's frames."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=256)

    def produce() -> None:
        try:
            for rec in records:
                if cancel.is_set():
                    break
                asyncio.run_coroutine_threadsafe(q.put(rec), loop).result()
        finally:
            close = getattr(records, "close", None)
            if close is not None:  # a generator left half-way: its finally (a State's close) runs in this thread
                close()
            asyncio.run_coroutine_threadsafe(q.put(None), loop).result()

    producer = in_thread(produce)
    try:
        while (rec := await q.get()) is not None:
            stream = STDERR if rec.get("stream") == "stderr" else STDOUT
            if (stream == STDOUT and not stdout) or (stream == STDERR and not stderr):
                continue
            data = str(rec.get("log", "")).encode()
            if timestamps:
                data = str(rec.get("time", "")).encode() + b" " + data
            await resp.write(data if tty else frame(stream, data))
    finally:
        cancel.set()
        _cancels.discard(cancel)
        while not producer.done():  # let it finish its put (the queue may be full)
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()
            await asyncio.sleep(0.01)


async def logs(req: Request) -> web.StreamResponse:
    c = await asyncio.to_thread(_get, req)
    stdout, stderr = req.flag("stdout"), req.flag("stderr")
    if not (stdout or stderr):
        raise ApiError(400, "you must choose at least one stream")
    tail = req.query("tail") or "all"
    if tail != "all" and not tail.isdigit():
        raise ApiError(400, f"invalid tail {tail!r}: a number or all")
    since = lifecycle.parse_since(req.query("since")) if req.query("since") not in ("", "0") else None
    until = lifecycle.parse_since(req.query("until")) if req.query("until") not in ("", "0") else None
    tty = bool(json.loads((container_dir(req.cfg, c.id) / "config.json").read_text())
               .get("process", {}).get("terminal"))
    cancel = _cancel_event()
    records = _select(_log_records(req, c, req.flag("follow"), cancel), tail, since, until)
    resp = web.StreamResponse(headers={"Content-Type": "application/vnd.docker.raw-stream" if tty
                                       else "application/vnd.docker.multiplexed-stream"})
    await resp.prepare(req.http)
    async with while_connected(req.http, cancel.set):
        await _pump(req, resp, records, cancel, tty=tty, stdout=stdout, stderr=stderr,
                    timestamps=req.flag("timestamps"))
    await resp.write_eof()
    return resp


def _select(records: Iterator[dict[str, Any]], tail: str, since: float | None,
            until: float | None) -> Iterator[dict[str, Any]]:
    """since/until (record times) and the last ``tail`` records of what was logged so far."""
    def when(rec: dict[str, Any]) -> float | None:
        return lifecycle.record_time(rec)

    kept: list[dict[str, Any]] = []
    for rec in records:
        t = when(rec)
        if since is not None and t is not None and t < since:
            continue
        if until is not None and t is not None and t > until:
            continue
        if tail == "all":
            yield rec
        else:
            kept.append(rec)
            if len(kept) > int(tail):
                kept.pop(0)
    yield from kept


async def attach(req: Request) -> web.StreamResponse:
    """``docker attach`` / a foreground ``docker run``: the hijacked connection (``Upgrade:
    tcp``, 101), then the container's output from now on (its log, followed) until it stops.
    With ``stdin=1`` on a container created with OpenStdin, what the client sends goes to its
    stdin through its monitor's attach socket (once it runs: a client attaches before it starts
    it); the client's half-close is the end of it (the container's stdin closes if it was
    created StdinOnce). On a TTY container, Ctrl-P Ctrl-Q detaches."""
    c = await asyncio.to_thread(_get, req)
    config = json.loads((container_dir(req.cfg, c.id) / "config.json").read_text())
    tty = bool(config.get("process", {}).get("terminal"))
    open_stdin = config.get("annotations", {}).get("org.vmrt.stdin") == "true"
    resp, stdin = await hijack(req, tty, stdin=req.flag("stdin") and open_stdin)
    tasks: list[asyncio.Future[Any]] = []
    cancel = _cancel_event()
    # where the output starts: before any stdin goes in (what it makes the container print is new)
    old = await asyncio.to_thread(_logged, req, c, cancel) if req.flag("stream") else 0
    if stdin is not None:
        tasks.append(asyncio.ensure_future(_attach_stdin(req, c, stdin, tty)))
    if req.flag("stream"):
        records = _after_start(req, c, cancel, old)
        tasks.append(asyncio.ensure_future(_pump(req, resp, records, cancel, tty=tty, stdout=req.flag("stdout"),
                                                 stderr=req.flag("stderr"), timestamps=False)))
    try:
        async with while_connected(req.http, cancel.set):  # a client gone: its output ends
            if tasks:  # the output ends, or the client detaches
                _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if tasks[0] in _done and stdin is not None and not tasks[0].result() and len(tasks) > 1:
                    await tasks[1]  # stdin ended without a detach: the output goes on to its end
    finally:
        cancel.set()
        _cancels.discard(cancel)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def _attach_stdin(req: Request, c: Container, stdin: Stdin, tty: bool) -> bool:
    """The client's bytes to the container's attach socket; True when the client detached
    (Ctrl-P Ctrl-Q, on a TTY), False when its stdin ended (or the container did)."""
    sock = None
    while sock is None:  # the socket is there once the container runs (its monitor made it)
        cur = await asyncio.to_thread(_get, req, c.id)
        if cur.status == Status.RUNNING and cur.run_dir:
            with contextlib.suppress(OSError):
                sock = proc_mod.connect_unix(cur.run_dir, ATTACH_NAME)
        if sock is None and (cur.started or 0) > (c.started or 0) and not lifecycle.owner_alive(cur):
            return False  # it started and ended meanwhile
        if sock is None:
            await asyncio.sleep(POLL)
    sock.setblocking(False)
    _reader, writer = await asyncio.open_unix_connection(sock=sock)
    prev = b""
    try:
        while data := await stdin.read():
            if tty and lifecycle.DETACH_KEYS in prev[-1:] + data:
                cut = (prev[-1:] + data).index(lifecycle.DETACH_KEYS) - len(prev[-1:])
                if cut > 0:
                    writer.write(data[:cut])
                    await writer.drain()
                return True
            prev = data
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()  # the monitor closes the container's stdin if it was created StdinOnce
            await writer.drain()
        return False
    except OSError:
        return False
    finally:
        writer.close()


def _logged(req: Request, c: Container, cancel: threading.Event) -> int:
    """How many records the container's log holds now."""
    return sum(1 for rec in _log_records(req, c, False, cancel) if rec)


def _after_start(req: Request, c: Container, cancel: threading.Event, old: int) -> Iterator[dict[str, Any]]:
    """What the container logs after its first ``old`` records; a container not running yet is
    waited for (a client attaches before it starts it), then its log is followed until it
    stops."""
    st = State(req.cfg.db_path)
    try:
        while not cancel.is_set():
            try:
                cur = st.get(c.id)
            except StateError:
                return
            if lifecycle.owner_alive(cur) or (cur.started or 0) > (c.started or 0):
                break
            time.sleep(POLL)
    finally:
        st.close()
    for i, rec in enumerate(_log_records(req, c, True, cancel)):
        if i >= old:
            yield rec


async def resize(req: Request) -> web.StreamResponse:
    """The container's terminal takes the client's size (its monitor applies it)."""
    rows, cols = size_query(req)
    c = await asyncio.to_thread(_get, req)
    await asyncio.to_thread(lifecycle.resize, c, rows, cols)
    return web.Response(status=200)


async def rename(req: Request) -> web.StreamResponse:
    name = req.query("name")
    if not name:
        raise ApiError(400, "name is required")
    await asyncio.to_thread(containercmds.rename, req.cfg, req.params["id"], name)
    return web.Response(status=204)


async def prune(req: Request) -> web.StreamResponse:
    lines = await asyncio.to_thread(containercmds.prune, req.cfg)
    ids = [ln for ln in lines if len(ln) == 64 and all(ch in "0123456789abcdef" for ch in ln)]
    return web.json_response({"ContainersDeleted": ids, "SpaceReclaimed": 0})


def _stats_doc(c: Container, row: dict[str, Any] | None) -> dict[str, Any]:
    """Docker's stats document, enough for `docker stats` (it computes CPU % from the deltas:
    here over one second of one CPU) and the SDK."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
    cpu = row["cpu"] if row else 0.0
    mem, limit = (row.get("mem") or 0, row.get("limit") or 0) if row else (0, 0)
    cpu_stats = {"cpu_usage": {"total_usage": int(cpu * 1e7), "usage_in_kernelmode": 0, "usage_in_usermode": 0},
                 "system_cpu_usage": int(1e9), "online_cpus": 1, "throttling_data": {}}
    pre = {"cpu_usage": {"total_usage": 0}, "system_cpu_usage": 0, "online_cpus": 1, "throttling_data": {}}
    return {"read": now, "preread": now, "id": c.id, "name": "/" + c.name,
            "pids_stats": {"current": row["pids"] if row else 0}, "cpu_stats": cpu_stats, "precpu_stats": pre,
            "memory_stats": {"usage": mem, "limit": limit, "stats": {}}, "blkio_stats": {}, "networks": {}}


def _measure(req: Request, c: Container) -> dict[str, Any]:
    from .. import stats as stats_mod  # on use: the first stats request loads it
    cur = _get(req, c.id)
    rows = stats_mod.measure([cur], timeout=req.cfg.timeouts.probe_exec) if cur.status == Status.RUNNING else []
    return _stats_doc(cur, rows[0] if rows else None)


async def stats(req: Request) -> web.StreamResponse:
    c = await asyncio.to_thread(_get, req)
    if not req.flag("stream", True) or req.flag("one-shot"):
        return web.json_response(await asyncio.to_thread(_measure, req, c))
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(req.http)
    cancel = _cancel_event()
    try:
        while not cancel.is_set():
            doc = await asyncio.to_thread(_measure, req, c)
            await resp.write(json.dumps(doc).encode() + b"\n")
            if doc["pids_stats"]["current"] == 0 and _get(req, c.id).status != Status.RUNNING:
                break
            await asyncio.sleep(0.5)
    except StateError:
        pass  # removed meanwhile: the stream ends
    finally:
        _cancels.discard(cancel)
    await resp.write_eof()
    return resp


REAP_EVERY, REAP_AFTER = 2.0, 5.0


def _reap(cfg: Config) -> None:
    """AutoRemove containers that exited with nobody waiting: removed (a waiter, polling every
    50 ms, has read the exit code long before; Docker's daemon removes them at exit)."""
    now = time.time()
    for c in containercmds.matching(cfg, show_all=True, filters=("status=exited",)):
        if (c.finished or now) <= now - REAP_AFTER and not lifecycle.owner_alive(c) \
                and containercmds.removes_when_waited(cfg, c):
            with contextlib.suppress(VmrtError):
                lifecycle.remove(cfg, c.id, True)


async def reaper(cfg: Config) -> None:
    while True:
        await asyncio.sleep(REAP_EVERY)
        await asyncio.to_thread(_reap, cfg)


def register(routes: Routes) -> None:
    cid = "/containers/(?P<id>[^/]+)"
    routes.add("GET", "/containers/json", list_containers)
    routes.add("POST", "/containers/create", create)
    routes.add("POST", "/containers/prune", prune)
    routes.add("GET", cid + "/json", inspect)
    routes.add("POST", cid + "/start", start)
    routes.add("POST", cid + "/stop", stop)
    routes.add("POST", cid + "/restart", restart)
    routes.add("POST", cid + "/kill", kill)
    routes.add("POST", cid + "/wait", wait)
    routes.add("GET", cid + "/logs", logs)
    routes.add("POST", cid + "/attach", attach)
    routes.add("POST", cid + "/resize", resize)
    routes.add("POST", cid + "/rename", rename)
    routes.add("GET", cid + "/stats", stats)
    routes.add("DELETE", cid, remove)
