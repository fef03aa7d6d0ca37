"""System endpoints: ``/_ping``, ``/version``, ``/info``, ``/system/df``."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
from typing import Any

from aiohttp import web

from .. import __version__, imagecmds, systemcmds
from ..config import Config
from ..errors import VmrtError
from ..images import mirrors
from ..images.store import Store
from ..state import State, Status
from .base import MAX_API, MIN_API, ApiError, Request, Routes, api_text, headers


async def ping(req: Request) -> web.StreamResponse:
    """Docker's ``/_ping``: "OK", and the newest API version in ``Api-Version`` (what clients
    negotiate with); HEAD too."""
    h = {**headers(), "Cache-Control": "no-cache, no-store, must-revalidate", "Pragma": "no-cache"}
    return web.Response(text="" if req.http.method == "HEAD" else "OK", headers=h, content_type="text/plain")


def _kernel() -> str:
    return platform.release()


async def version(req: Request) -> web.StreamResponse:
    kernel, arch = _kernel(), "amd64" if platform.machine() == "x86_64" else platform.machine()
    engine = {"Name": "Engine", "Version": __version__,
              "Details": {"ApiVersion": api_text(MAX_API), "MinAPIVersion": api_text(MIN_API), "Os": "linux",
                          "Arch": arch, "KernelVersion": kernel, "GitCommit": "", "GoVersion": ""}}
    return web.json_response({
        "Platform": {"Name": "vmrt"}, "Components": [engine], "Version": __version__,
        "ApiVersion": api_text(MAX_API), "MinAPIVersion": api_text(MIN_API), "GitCommit": "", "GoVersion": "",
        "Os": "linux", "Arch": arch, "KernelVersion": kernel, "BuildTime": ""})


def _info(req: Request) -> dict[str, Any]:
    cfg = req.cfg
    st = State(cfg.db_path)
    try:
        cs = st.list()
    finally:
        st.close()
    store = Store(cfg.root)
    try:
        n_images = len(store.images())
    finally:
        store.close()
    running = sum(1 for c in cs if c.status == Status.RUNNING)
    mem = 0
    for ln in open("/proc/meminfo"):
        if ln.startswith("MemTotal:"):
            mem = int(ln.split()[1]) * 1024
    return {
        "ID": "vmrt", "Containers": len(cs), "ContainersRunning": running, "ContainersPaused": 0,
        "ContainersStopped": len(cs) - running, "Images": n_images, "Driver": "overlay",
        "DriverStatus": [], "Plugins": {"Volume": [], "Network": ["bridge", "null"], "Log": ["json-file"]},
        "MemoryLimit": True, "SwapLimit": False, "CpuCfsPeriod": True, "CpuCfsQuota": True,
        "IPv4Forwarding": True, "Debug": False, "NFd": len(os.listdir("/proc/self/fd")),
        "NGoroutines": 0, "SystemTime": "", "LoggingDriver": "json-file",
        "CgroupDriver": "cgroupfs", "CgroupVersion": "2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        else "1", "KernelVersion": _kernel(), "OperatingSystem": _os_name(), "OSType": "linux",
        "Architecture": platform.machine(), "NCPU": os.cpu_count() or 1, "MemTotal": mem,
        "IndexServerAddress": "https://index.docker.io/v1/", "RegistryConfig": _registry_config(cfg),
        "DockerRootDir": str(cfg.root), "Name": socket.gethostname(), "Labels": [],
        "ExperimentalBuild": False, "ServerVersion": __version__,
        # vmrt's own: the default isolation of a container that asks for none (Docker's
        # Windows daemons report theirs in the same field)
        "Isolation": "hyperv" if cfg.isolation == "vm" else "process",
        "Runtimes": {"runc": {"path": "runc"}}, "DefaultRuntime": "runc",
        "Swarm": {"LocalNodeState": "inactive", "ControlAvailable": False, "NodeID": "", "NodeAddr": ""},
        "LiveRestoreEnabled": True, "SecurityOptions": ["name=seccomp,profile=builtin", "name=cgroupns"],
        "Warnings": [],
    }


def _registry_config(cfg: Config) -> dict[str, Any]:
    """Docker's RegistryConfig: Mirrors are Docker Hub's (URLs ending in "/", as Docker shows them);
    IndexConfigs has docker.io and each registry with mirrors of its own."""
    table = {k: [f"{m}/" for m in v] for k, v in mirrors.from_config(cfg).items()}
    insecure = set(cfg.insecure())
    indexes = {name: {"Name": name, "Mirrors": table.get(name, []), "Official": name == "docker.io",
                      "Secure": name not in insecure and name.rpartition(":")[0] not in insecure}
               for name in ["docker.io", *table]}
    return {"InsecureRegistryCIDRs": [], "IndexConfigs": indexes, "Mirrors": table.get("docker.io", [])}


def _os_name() -> str:
    try:
        for ln in open("/etc/os-release"):
            if ln.startswith("PRETTY_NAME="):
                return ln.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Linux"


async def info(req: Request) -> web.StreamResponse:
    return web.json_response(await asyncio.to_thread(_info, req))


# --- disk usage ------------------------------------------------------------------------------
# computed by the commands layer (the CLI's `vmrt system df` too)
DF_TYPES = systemcmds.DF_TYPES
tree_size = systemcmds.tree_size


async def disk_usage(req: Request) -> web.StreamResponse:
    """``docker system df``: images (their layers' sizes, shared ones, the containers using them),
    containers (their writable layers), volumes (their data, their containers), the build cache;
    ``type`` (API 1.42) picks some."""
    types = set(req.http.query.getall("type", [])) or set(DF_TYPES)
    if unknown := types - set(DF_TYPES):
        raise ApiError(400, f"unknown type {sorted(unknown)[0]!r} (use {', '.join(DF_TYPES)})")
    return web.json_response(await asyncio.to_thread(systemcmds.disk_usage, req.cfg, types))


async def login(req: Request) -> web.StreamResponse:
    """``docker login``: the registry is asked whether it takes the credentials; nothing is
    stored here (the docker CLI keeps them and sends them with each pull: X-Registry-Auth)."""
    body = await req.json()
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    user, password, server = body.get("username"), body.get("password"), body.get("serveraddress")
    if not all(isinstance(v, str) and v for v in (user, password, server)):
        raise ApiError(400, "username, password and serveraddress are required (identity tokens are not supported)")
    try:
        await asyncio.to_thread(imagecmds.check_login, req.cfg, str(server), str(user), str(password))
    except VmrtError as e:
        status = 401 if "unauthorized" in str(e) or "incorrect" in str(e) or "denied" in str(e) else 500
        raise ApiError(status, str(e)) from None
    return web.json_response({"Status": "Login Succeeded", "IdentityToken": ""})


def register(routes: Routes) -> None:
    routes.add("POST", "/auth", login)
    routes.add("GET", "/_ping", ping)
    routes.add("GET", "/version", version)
    routes.add("GET", "/info", info)
    routes.add("GET", "/system/df", disk_usage)
