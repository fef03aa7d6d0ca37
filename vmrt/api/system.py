"""System endpoints: ``/_ping``, ``/version``, ``/info``, ``/system/df``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import platform
import socket
import stat
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__, build, containercmds, imagecmds, volumecmds
from .. import volumes as volumes_mod
from ..config import Config
from ..errors import VmrtError
from ..images import mirrors
from ..images.store import Store
from ..layout import rw_dir
from ..state import Container, State, Status
from .base import MAX_API, MIN_API, ApiError, Request, Routes, api_text, headers
from .images import image_summary


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
DF_TYPES = ("container", "image", "volume", "build-cache")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _scan(fd: int, seen: set[tuple[int, int]]) -> tuple[list[str], int]:
    """One directory (an fd): its subdirectories' names, and the bytes of its regular files (a
    hard link's once; a sparse file's allocated blocks: a VM's disk image)."""
    size, subdirs = 0, []
    with os.scandir(fd) as it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:  # gone meanwhile
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(e.name)
            elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += min(st.st_size, st.st_blocks * 512)
    return subdirs, size


def tree_size(path: Path) -> int:
    """The bytes a tenant's tree holds (a container's writable layer, a volume's data), or -1 if
    it cannot be read. Walked by directory fds opened O_NOFOLLOW, one level at a time, so a link
    the tenant puts anywhere in it (now or while it is walked) is never followed."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return 0
    except OSError:
        return -1
    if stat.S_ISREG(top.st_mode):
        return min(top.st_size, top.st_blocks * 512)
    if not stat.S_ISDIR(top.st_mode):
        return 0
    seen: set[tuple[int, int]] = set()
    frames: list[tuple[int, list[str]]] = []  # the open directories, outermost first; their subdirs left
    total = 0

    def enter(fd: int) -> None:
        nonlocal total
        frames.append((fd, []))
        subdirs, size = _scan(fd, seen)
        frames[-1] = (fd, subdirs)
        total += size

    try:
        enter(os.open(path, _DIR_FLAGS))
        while frames:
            fd, subdirs = frames[-1]
            if not subdirs:
                os.close(fd)
                frames.pop()
                continue
            try:
                child = os.open(subdirs.pop(), _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # changed meanwhile
                    continue
                raise
            enter(child)
    except OSError:  # unreadable, or deeper than this process has fds
        return -1
    finally:
        for fd, _ in frames:
            os.close(fd)
    return total


def _df_images(cfg: Config, users: collections.Counter[str]) -> tuple[int, list[dict[str, Any]]]:
    """(LayersSize, the images with SharedSize and Containers): a layer two images hold is shared."""
    store = Store(cfg.root)
    try:
        imgs = store.images()
        holders = collections.Counter(d for i in imgs for d in set(i.diff_ids))
        sizes = {d: store.layer_size(d) for d in holders}
    finally:
        store.close()
    out = []
    for img in imgs:
        shared = sum(sizes[d] for d in set(img.diff_ids) if holders[d] > 1)
        out.append({**image_summary(img), "SharedSize": shared, "Containers": users[img.id]})
    return sum(sizes.values()), out


def _df_container(cfg: Config, c: Container, image_sizes: dict[str, int]) -> dict[str, Any]:
    doc = containercmds.inspect_doc(cfg, c)
    rw = tree_size(rw_dir(cfg, c.id))
    return {"Id": c.id, "Names": ["/" + c.name], "Image": c.image, "ImageID": c.image_id,
            "Command": " ".join(c.command), "Created": int(c.created), "Ports": [],
            "SizeRw": rw, "SizeRootFs": rw + image_sizes.get(c.image_id, 0) if rw >= 0 else -1,
            "Labels": doc["Config"].get("Labels") or {}, "State": c.status.value,
            "Status": containercmds.status_text(c),
            "HostConfig": {"NetworkMode": doc["HostConfig"]["NetworkMode"], "Isolation": c.isolation},
            "NetworkSettings": {"Networks": {}}, "Mounts": doc.get("Mounts") or []}


def _df(cfg: Config, types: set[str]) -> dict[str, Any]:
    st = State(cfg.db_path)
    try:
        cs = st.list()
    finally:
        st.close()
    out: dict[str, Any] = {}
    users = collections.Counter(c.image_id for c in cs)
    layers, imgs = _df_images(cfg, users) if types & {"image", "container"} else (0, [])
    if "image" in types:
        out.update(LayersSize=layers, Images=imgs)
    if "container" in types:
        sizes = {i["Id"]: i["Size"] for i in imgs}
        out["Containers"] = [_df_container(cfg, c, sizes) for c in cs]
    if "volume" in types:
        refs = volumecmds.users(cfg)
        vols = []
        for name in volumes_mod.list_volumes(cfg):
            with contextlib.suppress(VmrtError):  # removed meanwhile
                doc = volumes_mod.volume_doc(cfg, name)
                vols.append({**doc, "UsageData": {"Size": tree_size(volumes_mod.volume_data(cfg, name)),
                                                  "RefCount": len(refs.get(name, []))}})
        out["Volumes"] = vols
    if "build-cache" in types:
        out["BuildCache"] = build.cache_records(cfg)
    return out


async def disk_usage(req: Request) -> web.StreamResponse:
    """``docker system df``: images (their layers' sizes, shared ones, the containers using them),
    containers (their writable layers), volumes (their data, their containers), the build cache;
    ``type`` (API 1.42) picks some."""
    types = set(req.http.query.getall("type", [])) or set(DF_TYPES)
    if unknown := types - set(DF_TYPES):
        raise ApiError(400, f"unknown type {sorted(unknown)[0]!r} (use {', '.join(DF_TYPES)})")
    return web.json_response(await asyncio.to_thread(_df, req.cfg, types))


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
