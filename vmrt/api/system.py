"""System endpoints: ``/_ping``, ``/version``, ``/info``."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
from typing import Any

from aiohttp import web

from .. import __version__
from ..images.store import Store
from ..state import State, Status
from .base import MAX_API, MIN_API, Request, Routes, api_text, headers


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
        "IndexServerAddress": "https://index.docker.io/v1/", "RegistryConfig": {
            "InsecureRegistryCIDRs": [], "IndexConfigs": {}, "Mirrors": []},
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


def register(routes: Routes) -> None:
    routes.add("GET", "/_ping", ping)
    routes.add("GET", "/version", version)
    routes.add("GET", "/info", info)
