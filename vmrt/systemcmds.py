"""What the commands about vmrt itself and this host do: info, check isolation, kernel and
agent builds, setup, the VM sources' commands (the warm pool, snapshots), and disk usage (the
CLI's and the API's ``system df``).

The CLI (:mod:`vmrt.cli.system`) prints what these return. The modules they drive (the
builds, the pool, snapshots, probes) are imported on use: none is on `vmrt run`'s path.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import errno
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__, cgroups, formatting, fsmode
from . import config as config_mod
from .config import Config
from .errors import StateError, UsageError, VmrtError
from .images import mirrors
from .images.store import Store
from .layout import rw_dir
from .paths import source_root
from .proc import connect_unix, vmrt_here
from .state import Container, State


# --- info, check ---------------------------------------------------------------------------
def _runtime_line(cfg: Config) -> str:
    from .drivers.process import choose_runtime  # on use: a VM run never loads the process driver
    try:
        rt = choose_runtime(cfg.runtime)
    except VmrtError as e:
        return f"missing ({e})"
    out = subprocess.run([rt, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    cg = "v2" if cgroups.is_v2() else "v1"
    return f"{rt} ({out[0] if out else 'unknown version'}; setting {cfg.runtime}; cgroup {cg})"


def _clone_memory_line(cfg: Config) -> str:
    mode = config_mod.vm_memory(cfg, None)
    why = f"vm_memory={cfg.vm_memory}" + (", jailed QEMU" if cfg.vmm_jail else ", vmm_jail=false")
    if mode == "private":
        return f"private: each clone copies the snapshot's RAM, no pages shared across containers ({why})"
    return (f"shared: clones map one RAM file copy-on-write, its page cache shared across containers: "
            f"a side channel ({why}; --vm-memory=private per run)")


def info(cfg: Config) -> list[str]:
    """``vmrt info``: the accelerator, component versions, kernel and state directories."""
    # on use: the VM's build modules are not on a process run's path
    from . import agentbuild
    from . import kernel as kernel_mod  # on use: not on a process run's path
    from .vm import accel as accel_mod  # on use: not on a process run's path

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"
    acc = accel_mod.choose(cfg.accel, user_kernel=cfg.kernel is not None)
    try:
        kpath, kid = kernel_mod.find(cfg)
        kline, kidline = str(kpath), kid
    except VmrtError as e:
        kline, kidline = f"missing ({e})", "-"
    try:
        initrd = str(agentbuild.find(cfg))
    except VmrtError as e:
        initrd = f"missing ({e})"
    rows = [
        ("vmrt", __version__),
        ("Default isolation", cfg.isolation),
        ("Accelerator", f"{acc.name} ({acc.reason}; host /dev/kvm: {acc.host_kind})"),
        ("Machine", cfg.machine),
        ("QEMU", f"{shutil.which(cfg.qemu) or cfg.qemu}: {version([cfg.qemu, '--version'])}"),
        ("virtiofsd", f"{cfg.virtiofsd}: {version([cfg.virtiofsd, '--version'])}"),
        ("Process runtime", _runtime_line(cfg)),
        ("Kernel", kline),
        ("Kernel build id", kidline),
        ("Agent initramfs", initrd),
        ("VM cache", f"snapshot={cfg.snapshot}, pool={cfg.pool}"),
        ("Clone memory", _clone_memory_line(cfg)),
        ("State directory", str(cfg.root)),
        ("Run directory", str(cfg.run_root)),
        ("Cache directory", str(cfg.cache)),
        ("Registry mirrors", "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in mirrors.from_config(cfg).items())
         or "none"),
        ("Timeouts (s)", ", ".join(f"{k}={v:g}" for k, v in vars(cfg.timeouts).items())),
    ]
    return [f"{k + ':':<20} {v}" for k, v in rows]


def check_isolation(cfg: Config, image: str, *, fmt: str) -> str:
    """``vmrt check isolation``: the probes' results of both modes, as a table or JSON."""
    from . import probes  # on use: not on `vmrt run`'s path
    if os.geteuid() != 0:
        raise UsageError("vmrt check isolation needs root (it runs containers)")
    from . import agentbuild  # on use: the VM's build modules are not on a process run's path
    result = probes.run_probes(image, None, str(cfg.root), str(cfg.run_root), cfg.jail_uid_base,
                               agentbuild.enosys_probe(cfg))
    result["process"]["vm_driver"] = "-"
    result["vm"]["vm_driver"] = vm_driver_line(cfg)
    return json.dumps(result, indent=1) if fmt == "json" else probes.table(result)


def _qemu_driver_only(cfg: Config, what: str) -> None:
    if cfg.vm_driver == "libvirt":
        raise UsageError(f"{what}: qemu driver only (vm_driver is libvirt, which creates every VM itself); "
                         "set VMRT_VM_DRIVER=qemu for it")


def vm_driver_line(cfg: Config) -> str:
    """Who runs VM containers here, and what confines their QEMU."""
    if cfg.vm_driver != "libvirt":
        return ("qemu (vmrt's own QEMU: " + ("jailed: a uid of its own, chroot, namespaces, seccomp, no caps)"
                                              if cfg.vmm_jail else "unjailed, root)"))
    from .drivers import libvirt  # on use: only a libvirt host loads libvirt-python
    try:
        ver, models = libvirt.version(cfg.libvirt_uri)
    except VmrtError as e:
        return f"libvirt ({cfg.libvirt_uri}): {e}"
    return (f"libvirt {ver} ({cfg.libvirt_uri}): security drivers {models}; QEMU as a uid of its own "
            "(static DAC label, relabel=yes), QEMU -sandbox per qemu.conf")


# --- builds ----------------------------------------------------------------------------------
def kernel_build(cfg: Config, *, force: bool, jobs: int | None) -> str:
    """``vmrt kernel build``: the guest kernel's path."""
    from . import kernel as kernel_mod  # on use: the VM's build modules are not on a process run's path
    out = kernel_mod.build(cfg, force=force, jobs=jobs)
    return str(out / "vmlinux")


def agent_build(cfg: Config, *, force: bool) -> str:
    """``vmrt agent build``: the agent initramfs' path."""
    from . import agentbuild  # on use: the VM's build modules are not on a process run's path
    out = agentbuild.build(cfg, force=force)
    return str(out / "initramfs.cpio")


def setup(cfg: Config) -> Iterator[str]:
    """``vmrt setup``: the kernel, the agent and the project's images built (or found in the
    caches); a line for each image as it is built."""
    # on use: the VM's build modules are not on a process run's path
    from . import agentbuild
    from . import kernel as kernel_mod  # on use: not on a process run's path
    from .images import recipe as recipe_mod  # on use: not on `vmrt run`'s path
    kernel_mod.build(cfg)
    agentbuild.build(cfg)
    if cfg.snapshot != "off" and cfg.vm_driver == "qemu":  # the cache a default VM-mode run restores (issue 17)
        yield f"[snapshot] {snapshot_build(cfg, force=False)}"
    store = Store(cfg.root)
    for r in sorted((source_root() / "images").glob("*/recipe.toml")):
        yield f"[image] {recipe_mod.build(r.parent, store, cfg.cache)}"


# --- pool ------------------------------------------------------------------------------------
def pool_status(cfg: Config, *, fmt: str | None) -> list[str]:
    """``vmrt pool``: the pool daemon's status, one row."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    if pool_mod.daemon_pid(cfg) is None:
        row = {"Running": False, "Pid": 0, "Size": 0, "Ready": 0, "Booting": 0, "Served": 0, "Shape": "",
               "LastError": ""}
    else:
        st, _ = pool_mod.request(cfg, {"op": "status"}, timeout=10.0)
        shape = st.get("shape") or {}
        row = {"Running": True, "Pid": st.get("pid"), "Size": st.get("size"), "Ready": st.get("ready"),
               "Booting": st.get("booting"), "Served": st.get("served"),
               "Shape": f"{shape.get('memory_mib')}MiB {shape.get('vcpus')}vcpu {shape.get('machine')} "
                        f"{shape.get('accel')}" if shape else "", "LastError": st.get("last_error", "")}
    return formatting.emit(fmt, [row], [("RUNNING", "Running", 7), ("PID", "Pid", 3), ("SIZE", "Size", 4),
                                        ("READY", "Ready", 5), ("BOOTING", "Booting", 7),
                                        ("SERVED", "Served", 6), ("SHAPE", "Shape", 5)])


def pool_start(cfg: Config, *, size: int | None) -> str:
    """``vmrt pool start``: the daemon started in the background, keeping ``size`` VMs booted."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    _qemu_driver_only(cfg, "the warm VM pool")
    pid = pool_mod.start(cfg, cfg.pool_size if size is None else size)
    return f"pool daemon started (pid {pid}, size {cfg.pool_size if size is None else size})"


def pool_serve(cfg: Config, *, size: int | None) -> int:
    """``vmrt pool serve``: the pool daemon, in this process; its exit status."""
    from .pool.daemon import Daemon  # on use: the daemon's modules are on no other command's path
    return Daemon(cfg, cfg.pool_size if size is None else size).serve()


def pool_fill(cfg: Config, *, size: int | None, wait: bool, timeout: float) -> str:
    """``vmrt pool fill``: set the pool's size (if given), and wait until that many VMs are ready."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    if pool_mod.daemon_pid(cfg) is None:
        raise StateError("the pool daemon is not running: start it with `vmrt pool start`")
    st, _ = pool_mod.request(cfg, {"op": "fill", "size": size, "wait": wait, "timeout": timeout},
                             timeout=timeout + 10)
    if wait and not st.get("ok"):
        raise VmrtError(f"the pool has {st.get('ready')} of {st.get('size')} VMs ready"
                        + (f": {st['last_error']}" if st.get("last_error") else ""))
    return f"{st.get('ready')} of {st.get('size')} VMs ready"


def pool_drain(cfg: Config) -> str:
    """``vmrt pool drain``: the idle VMs killed, no refill (size 0)."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    if pool_mod.daemon_pid(cfg) is None:
        raise StateError("the pool daemon is not running")
    pool_mod.request(cfg, {"op": "drain"})
    return "pool drained"


def pool_stop(cfg: Config) -> str:
    """``vmrt pool stop``."""
    from .pool import client as pool_mod  # on use: the pool's modules are not on a process run's path
    return "pool daemon stopped" if pool_mod.stop(cfg) else "the pool daemon was not running"


# --- snapshot --------------------------------------------------------------------------------
def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512  # a sparse file: what it holds, not its length
    except OSError:
        return 0


def snapshot_build(cfg: Config, *, force: bool, memory_mib: int | None = None, cpus: int | None = None) -> str:
    """``vmrt snapshot build``: the snapshot's directory and size."""
    from . import snapshot as snap_mod  # on use: the snapshot modules are not on a process run's path
    _qemu_driver_only(cfg, "VM snapshots")
    snap = snap_mod.build(cfg, force=force, memory_mib=memory_mib, cpus=cpus)
    return f"{snap.dir} ({(snap.meta['size'] + _allocated(snap.ram)) >> 20} MiB)"


def snapshot_ls(cfg: Config, *, fmt: str | None) -> list[str]:
    """``vmrt snapshot ls``' lines."""
    from . import snapshot as snap_mod  # on use: the snapshot modules are not on a process run's path
    rows = [{"Key": s.dir.name, "Shape": f"{s.meta['shape']['memory_mib']}MiB {s.meta['shape']['vcpus']}vcpu "
                                         f"{s.meta['shape']['machine']} {s.meta['shape']['accel']}",
             "Size": f"{(s.meta['size'] + _allocated(s.ram)) / 2 ** 20:.1f}MiB", "Qemu": s.meta.get("qemu", ""),
             "Created": formatting.ago(time.time() - s.meta.get("created", 0))}
            for s in snap_mod.listing(cfg)]
    return formatting.emit(fmt, rows, [("KEY", "Key", 16), ("SHAPE", "Shape", 5), ("SIZE", "Size", 4),
                                       ("CREATED", "Created", 7)])


def snapshot_rm(cfg: Config) -> str:
    """``vmrt snapshot rm``: every snapshot removed."""
    from . import snapshot as snap_mod  # on use: the snapshot modules are not on a process run's path
    return f"removed {snap_mod.remove_all(cfg)} snapshot(s)"


# --- disk usage (docker system df) -----------------------------------------------------------
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
    from . import imagecmds  # on use: not on `vmrt run`'s path
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
        out.append({**imagecmds.summary(img), "SharedSize": shared, "Containers": users[img.id]})
    return sum(sizes.values()), out


def _df_container(cfg: Config, c: Container, image_sizes: dict[str, int]) -> dict[str, Any]:
    from . import containercmds  # on use: not on `vmrt run`'s path
    doc = containercmds.inspect_doc(cfg, c)
    rw = tree_size(rw_dir(cfg, c.id))
    return {"Id": c.id, "Names": ["/" + c.name], "Image": c.image, "ImageID": c.image_id,
            "Command": " ".join(c.command), "Created": int(c.created), "Ports": [],
            "SizeRw": rw, "SizeRootFs": rw + image_sizes.get(c.image_id, 0) if rw >= 0 else -1,
            "Labels": doc["Config"].get("Labels") or {}, "State": c.status.value,
            "Status": containercmds.status_text(c),
            "HostConfig": {"NetworkMode": doc["HostConfig"]["NetworkMode"], "Isolation": c.isolation},
            "NetworkSettings": {"Networks": {}}, "Mounts": doc.get("Mounts") or []}


def disk_usage(cfg: Config, types: set[str] | None = None) -> dict[str, Any]:
    """Docker's ``GET /system/df`` document (the API's, and `vmrt system df`'s): images (their
    layers' sizes, shared ones, the containers using them), containers (their writable layers),
    volumes (their data, their containers), the build cache; ``types`` (of DF_TYPES) picks some."""
    from . import build, volumecmds  # on use: not on `vmrt run`'s path
    from . import volumes as volumes_mod
    types = set(DF_TYPES) if types is None else types
    if unknown := types - set(DF_TYPES):
        raise UsageError(f"unknown type {sorted(unknown)[0]!r} (use {', '.join(DF_TYPES)})")
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


def _size(n: float) -> str:
    """Docker's sizes (go-units HumanSize): decimal units, 4 significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.4g}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _part(part: int, whole: int) -> str:
    return f"{_size(part)} ({part * 100 // whole}%)" if whole > 0 else _size(part)


DF_COLUMNS = [("TYPE", "Type", 0), ("TOTAL", "TotalCount", 0), ("ACTIVE", "Active", 0), ("SIZE", "Size", 0),
              ("RECLAIMABLE", "Reclaimable", 0)]
_ACTIVE_STATES = ("running", "paused", "restarting")


def df_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """``docker system df``'s summary rows (its columns, its sums) of a disk_usage document."""
    imgs, cs, vols, cache = doc["Images"], doc["Containers"], doc["Volumes"], doc["BuildCache"]
    layers = int(doc["LayersSize"])
    used = sum(i["Size"] - i["SharedSize"] for i in imgs if i["Containers"] > 0 and i["Size"] >= 0 <= i["SharedSize"])
    c_size = sum(c["SizeRw"] for c in cs if c["SizeRw"] > 0)
    c_free = sum(c["SizeRw"] for c in cs if c["SizeRw"] > 0 and c["State"] not in _ACTIVE_STATES)
    v_size = sum(v["UsageData"]["Size"] for v in vols if v["UsageData"]["Size"] > 0)
    v_free = sum(v["UsageData"]["Size"] for v in vols if v["UsageData"]["Size"] > 0 and not v["UsageData"]["RefCount"])
    rows = [("Images", len(imgs), sum(1 for i in imgs if i["Containers"] > 0), _size(layers),
             _part(max(0, layers - used), layers)),
            ("Containers", len(cs), sum(1 for c in cs if c["State"] in _ACTIVE_STATES), _size(c_size),
             _part(c_free, c_size)),
            ("Local Volumes", len(vols), sum(1 for v in vols if v["UsageData"]["RefCount"] > 0), _size(v_size),
             _part(v_free, v_size)),
            ("Build Cache", len(cache), sum(1 for b in cache if b["InUse"]),
             _size(sum(b["Size"] for b in cache if not b["Shared"])),
             _size(sum(b["Size"] for b in cache if not b["Shared"] and not b["InUse"])))]
    return [{"Type": t, "TotalCount": str(n), "Active": str(a), "Size": sz, "Reclaimable": r}
            for t, n, a, sz, r in rows]


def _df_verbose(doc: dict[str, Any]) -> list[str]:
    """``docker system df -v``: a table per type."""
    from . import imagecmds  # on use: not on `vmrt run`'s path
    now = time.time()
    irows = []
    for i in doc["Images"]:
        for tag in i["RepoTags"] or ["<none>:<none>"]:
            repo, _, t = tag.rpartition(":")
            irows.append({"Repository": repo, "Tag": t, "ID": imagecmds.short_id(i["Id"]),
                          "CreatedSince": formatting.ago(now - i["Created"]) if i["Created"] else "N/A",
                          "Size": _size(i["Size"]), "SharedSize": _size(i["SharedSize"]),
                          "UniqueSize": _size(i["Size"] - i["SharedSize"]), "Containers": str(i["Containers"])})
    crows = [{"ID": c["Id"][:12], "Image": c["Image"], "Command": json.dumps(c["Command"][:20]
                                                                             + ("…" if len(c["Command"]) > 20 else "")),
              "LocalVolumes": str(sum(1 for m in c["Mounts"] if m.get("Type") == "volume")),
              "Size": _size(c["SizeRw"]) if c["SizeRw"] >= 0 else "N/A",
              "CreatedSince": formatting.ago(now - c["Created"]), "Status": c["Status"],
              "Names": ",".join(n.lstrip("/") for n in c["Names"])} for c in doc["Containers"]]
    vrows = [{"Name": v["Name"], "Links": str(v["UsageData"]["RefCount"]),
              "Size": _size(v["UsageData"]["Size"]) if v["UsageData"]["Size"] >= 0 else "N/A"} for v in doc["Volumes"]]
    def since(when: str) -> str:
        try:
            t = dt.datetime.fromisoformat(when)
        except ValueError:
            return "N/A"
        return formatting.ago(now - (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp())
    brows = [{"ID": b["ID"][:12], "CacheType": b["Type"], "Size": _size(b["Size"]),
              "CreatedSince": since(b["CreatedAt"]), "LastUsedSince": since(b["LastUsedAt"]),
              "UsageCount": str(b["UsageCount"]), "Shared": str(b["Shared"]).lower()} for b in doc["BuildCache"]]
    cache_total = sum(b["Size"] for b in doc["BuildCache"] if not b["Shared"])
    return ["Images space usage:", "",
            *formatting.emit(None, irows, [("REPOSITORY", "Repository", 0), ("TAG", "Tag", 0), ("IMAGE ID", "ID", 0),
                                           ("CREATED", "CreatedSince", 0), ("SIZE", "Size", 0),
                                           ("SHARED SIZE", "SharedSize", 0), ("UNIQUE SIZE", "UniqueSize", 0),
                                           ("CONTAINERS", "Containers", 0)]),
            "", "Containers space usage:", "",
            *formatting.emit(None, crows, [("CONTAINER ID", "ID", 0), ("IMAGE", "Image", 0), ("COMMAND", "Command", 0),
                                           ("LOCAL VOLUMES", "LocalVolumes", 0), ("SIZE", "Size", 0),
                                           ("CREATED", "CreatedSince", 0), ("STATUS", "Status", 0),
                                           ("NAMES", "Names", 0)]),
            "", "Local Volumes space usage:", "",
            *formatting.emit(None, vrows, [("VOLUME NAME", "Name", 0), ("LINKS", "Links", 0), ("SIZE", "Size", 0)]),
            "", f"Build cache usage: {_size(cache_total)}", "",
            *formatting.emit(None, brows, [("CACHE ID", "ID", 0), ("CACHE TYPE", "CacheType", 0), ("SIZE", "Size", 0),
                                           ("CREATED", "CreatedSince", 0), ("LAST USED", "LastUsedSince", 0),
                                           ("USAGE", "UsageCount", 0), ("SHARED", "Shared", 0)])]


def df(cfg: Config, *, verbose: bool, fmt: str | None) -> list[str]:
    """``vmrt system df``: Docker's table (TYPE TOTAL ACTIVE SIZE RECLAIMABLE), a JSON line a type
    (``--format json``) or a template's; ``-v``: a table per type (with ``--format json``: the
    whole document, as the API's ``/system/df``)."""
    doc = disk_usage(cfg)
    if verbose:
        if fmt == "json":
            return [json.dumps(doc, separators=(",", ":"))]
        if fmt not in (None, "", "table"):
            raise UsageError("--format with -v takes json or table only")
        return _df_verbose(doc)
    return formatting.emit(fmt, df_rows(doc), DF_COLUMNS)


# --- the API service and Compose ------------------------------------------------------------
SERVICE_IDLE = 600  # seconds: a service `vmrt compose` started stops after so long without a request
COMPOSE = "docker-compose"


def api_socket(cfg: Config) -> Path:
    """The API service's default socket: ``<run root>/docker.sock`` (/run/vmrt/docker.sock)."""
    return cfg.run_root / "docker.sock"


def socket_answers(path: Path) -> bool:
    """Whether a service accepts connections on the unix socket ``path``."""
    try:
        connect_unix(path.parent, path.name, timeout=1.0).close()
    except (OSError, ValueError):  # ValueError: no file name in it
        return False
    return True


def ensure_service(cfg: Config, timeout: float = 30.0) -> Path:
    """The socket of a running API service: the one answering on the default socket, else one
    started now in the background (its own session; it stops after SERVICE_IDLE seconds without
    a request; its output in ``<run root>/api.log``)."""
    sock = api_socket(cfg)
    if socket_answers(sock):
        return sock
    if os.geteuid() != 0:
        raise UsageError("no vmrt API service answers on " + str(sock) + ", and starting one needs root")
    cfg.run_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = cfg.run_root / "api.log"
    with open(log, "ab", opener=fsmode.opener) as out:
        proc = subprocess.Popen(vmrt_here("system", "service", "--socket", str(sock), "--time", str(SERVICE_IDLE)),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True)
    fsmode.write_private(cfg.run_root / "api.pid", f"{proc.pid}\n")  # who started it, for its stop
    deadline = time.monotonic() + timeout
    while not socket_answers(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            tail = log.read_bytes()[-2000:].decode(errors="replace").strip().splitlines()
            raise VmrtError(f"the API service did not start ({tail[-1] if tail else 'see ' + str(log)})")
        time.sleep(0.05)
    return sock


def compose(cfg: Config, args: tuple[str, ...]) -> int:
    """``vmrt compose ARGS``: Debian's docker-compose against vmrt's API service (started if none
    answers). Returns only if docker-compose cannot be run (it replaces this process)."""
    binary = shutil.which(COMPOSE)
    if binary is None:
        raise VmrtError(f"{COMPOSE} is not installed (setup.sh installs Debian's docker-compose)", exit_code=127)
    sock = ensure_service(cfg)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    for key in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"):  # vmrt's socket, nothing else
        env.pop(key, None)
    try:
        os.execve(binary, [binary, *args], env)
    except OSError as e:
        raise VmrtError(f"cannot run {binary}: {e.strerror}", exit_code=126) from None
