"""VM snapshots: boot once to the agent's HELLO, save the VM's state, start new VMs from it.

``vmrt snapshot build`` boots a VM of the default shape whose share is a virtio-9p
device (not yet mounted by the guest: vhost-user-fs blocks migration, an unmounted
9p device does not) and whose RAM is a file, ``<root>/snapshots/<key>/ram``, mapped
shared. Once the agent said HELLO it stops the VM and saves the device state with
QEMU's migration to a file (``state``, ~230 KB: with ``x-ignore-shared`` the RAM
stays in its file), beside ``meta.json``: the shape, QEMU's version, the HELLO,
the state's size and SHA-256, the RAM file's identity. Clones map the RAM file
private (copy-on-write): its page cache is shared by all of them. The key hashes
the shape (kernel, initramfs, memory, vCPUs, machine, accelerator, kernel command
line), QEMU's version and this module's format version, so a rebuilt kernel or agent
or another QEMU never restores an old state.

A VM-mode ``vmrt run`` that gets no pooled VM restores one when a snapshot of its
shape exists: the state file is checked against its SHA-256 and the RAM file against
its identity first (a corrupt or mismatched snapshot is refused with a notice and the
run cold-boots), QEMU starts with the same devices and ``-incoming defer`` (then
``x-ignore-shared`` and the state), its 9p device now exporting the container's
share (a read-only overlay of the image, nosuid, nodev), and once the state is
loaded the VM continues. The RUN it gets carries SHARE_9P and SEED (64 bytes from the host),
and the agent reseeds the guest's RNG before anything reads from it and sets the
clock and hostname, so clones differ (boot id, random numbers, time, hostname).
The export is read-only, unless a writable bind volume is in the share: then the proxy helper
writes it (as the guest's users, under the file servers' seccomp filter), and what is read-only
there is so by its mounts. With bind volumes or on a user network the clone mounts the share
uncached (RUN SHARE_FRESH), so host-side changes are seen.

The snapshot's VM has the disk device every VM has (vm/disk.py), backed by an empty
placeholder; a clone's QEMU opens the container's own disk there instead, and once the VM
runs, ``block_resize`` tells the guest its capacity (the guest saw the placeholder's 0 bytes).

The cache is always there (issue 17): ``vmrt setup`` builds the default shape's snapshot, and
with ``snapshot = "auto"`` (the default) a run that finds none for its shape cold-boots and
starts ``vmrt snapshot build`` for that shape in the background (:func:`build_in_background`:
its output in ``build.log``), so the next run is restored. Every build of a shape holds an flock
on ``<key>.building`` while it builds: a second one waits and then keeps the first one's, and a
run that finds the lock held starts none. A shape is built when it is the default VM with
other memory or vCPUs (``-m``, ``--cpus``); a ``--kernel`` of the user's or another command line
is not. Each build prunes what no run can restore any more (:func:`prune`): snapshots whose
kernel, initramfs, QEMU or format changed, and leftovers of builds that died.
``snapshot = "manual"`` restores what ``vmrt snapshot build`` made and builds nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from . import fsmode, network
from .agent import protocol as P
from .agent.hello import read_hello
from .config import Config
from .errors import LaunchError, ProtocolError, VmrtError
from .proc import vmrt_here
from .vm import disk as vmdisk
from .vm.qemu import QemuVM, VMSpec
from .vm.shape import Shape, default_spec
from .vm.virtiofsd import P9Proxy

# 3: guest RAM in its own file, mapped private by the clones; 4: no free page reporting; 5: a NIC;
# 6: built by a jailed QEMU (9p through the proxy helper); 7: a disk (vm/disk.py: an empty placeholder)
FORMAT = 7
MIGRATE_TIMEOUT = 120.0


def snapshots_dir(cfg: Config) -> Path:
    return cfg.root / "snapshots"  # per state root (like images): a private root has its own


def qemu_version(cfg: Config) -> str:
    try:
        out = subprocess.run([cfg.qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def _qemu_identity(cfg: Config) -> str:
    """Which QEMU binary (path, size, mtime): another build never restores an old state.
    A stat, not ``qemu --version``: this is on every VM start's path."""
    path = shutil.which(cfg.qemu) or cfg.qemu
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def key(cfg: Config, shape: Shape) -> str:
    h = hashlib.sha256(f"vmrt snapshot {FORMAT}\n{_qemu_identity(cfg)}\njail={cfg.vmm_jail}\n".encode())
    h.update(json.dumps(dataclasses.asdict(shape), sort_keys=True).encode())
    for f in (shape.kernel, shape.initrd):  # contents, not only names: a rebuilt file is another VM
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class Snapshot:
    dir: Path
    meta: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def ram(self) -> Path:
        return self.dir / "ram"

    @property
    def hello(self) -> P.Hello:
        return P.Hello.from_record(self.meta["hello"])

    def verify(self) -> str | None:
        """None if the snapshot is the one saved; else why it is refused. The device state is
        checked against its SHA-256 (small); the RAM file (the size of the guest's memory,
        mostly holes) against the identity it had when saved (size, inode, mtime): it is
        mapped read-only by QEMU and any write to it changes its mtime."""
        try:
            st, ram = self.state.stat(), self.ram.stat()
        except OSError as e:
            return f"{Path(e.filename or '').name} file: {e.strerror}"
        if st.st_size != self.meta.get("size"):
            return f"state file is {st.st_size} bytes, {self.meta.get('size')} were saved"
        if [ram.st_size, ram.st_ino, ram.st_mtime_ns] != self.meta.get("ram"):
            return "RAM file changed since it was saved"
        h = hashlib.sha256()
        with open(self.state, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != self.meta.get("sha256"):
            return "state file does not match its checksum"
        try:
            self.hello  # noqa: B018 -- checked here, so a restore never meets a bad record
        except ProtocolError as e:
            return f"meta.json: {e}"
        return None


def find(cfg: Config, shape: Shape) -> Snapshot | None:
    """The snapshot of ``shape``, if one was built (not yet verified)."""
    if cfg.snapshot == "off" or not snapshots_dir(cfg).is_dir():
        return None
    try:
        d = snapshots_dir(cfg) / key(cfg, shape)
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or meta.get("shape") != dataclasses.asdict(shape):
        return None
    return Snapshot(d, meta)


def restore_spec(spec: VMSpec, snap: Snapshot, share: Path, writable: bool = False, private: bool = True) -> VMSpec:
    """``writable``: a writable volume is in the share (its 9p export is not read-only then);
    ``private``: the clone copies the RAM file (else it maps it: pages shared with other clones)."""
    return dataclasses.replace(spec, share_9p=share, share_9p_writable=writable, ram_file=snap.ram,
                               ram_private=private, incoming="defer")


IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


async def _pass_fd(vm: QemuVM, fd: int, name: str) -> None:
    """``fd`` to QEMU over QMP (SCM_RIGHTS + ``getfd``): a jailed QEMU opens no file and spawns
    no process (``spawn=deny``), so migration streams reach it as fds, never as ``exec:``."""
    assert vm.qmp is not None
    vm.qmp.send_fd_scm(fd)
    await vm.qmp.execute("getfd", {"fdname": name})


async def restore(vm: QemuVM, snap: Snapshot, timeout: float) -> None:
    """Load the snapshot's device state into a QEMU started with ``-incoming defer``; once
    loaded, the VM continues (its RAM: jailed, its own copy of the snapshot's; else the
    snapshot's file, mapped private) and learns its disk's capacity."""
    assert vm.qmp is not None
    await vm.qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
    fd = os.open(snap.state, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await _pass_fd(vm, fd, "state")
    finally:
        os.close(fd)
    await vm.qmp.execute("migrate-incoming", {"uri": "fd:state"})
    deadline = time.monotonic() + timeout
    while True:
        reply: Any = await vm.qmp.execute("query-status")
        status = reply["status"]
        if status != "inmigrate":
            break
        if time.monotonic() > deadline:
            raise LaunchError(f"restoring the snapshot took more than {timeout:g}s")
        await asyncio.sleep(0.005)
    if status != "paused":
        raise LaunchError(f"restoring the snapshot failed (QEMU state {status})")
    await vm.qmp.execute("cont")
    if vm.spec.disk_size:  # after cont: the config interrupt must reach a running guest
        await vmdisk.resize(vm.qmp, vm.spec.disk_size)


def build(cfg: Config, force: bool = False, *, memory_mib: int | None = None, cpus: int | None = None) -> Snapshot:
    """``vmrt snapshot build``: the default shape's snapshot, or of the default VM with this memory
    and these vCPUs (cached: an existing valid one is kept); then :func:`prune`."""
    spec = _spec(cfg, memory_mib, cpus)
    fd = _lock_file(cfg, key(cfg, Shape.of(spec)))
    try:  # one build of a shape at a time: a second one waits, then finds the first one's snapshot
        fcntl.flock(fd, fcntl.LOCK_EX)
        snap = asyncio.run(_build(cfg, force, spec))
    finally:
        os.close(fd)
    prune(cfg)
    return snap


def _lock_file(cfg: Config, k: str) -> int:
    d = fsmode.private_dir(snapshots_dir(cfg))
    return os.open(d / f"{k}.building", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, fsmode.PRIVATE_FILE)


def _spec(cfg: Config, memory_mib: int | None, cpus: int | None) -> VMSpec:
    spec = default_spec(cfg, Path("unused.sock"), "vmrt-snapshot")
    return dataclasses.replace(spec, memory_mib=memory_mib or spec.memory_mib, cpus=cpus or spec.cpus)


def buildable(cfg: Config, shape: Shape, default: Shape | None = None) -> bool:
    """Whether ``vmrt snapshot build`` can make ``shape``'s snapshot: the default VM (``default``,
    else found now), maybe with other memory or vCPUs (not a kernel of the user's, another
    machine or command line)."""
    default = default or Shape.of(_spec(cfg, None, None))
    return dataclasses.replace(default, memory_mib=shape.memory_mib, vcpus=shape.vcpus) == shape


def build_in_background(cfg: Config, shape: Shape) -> str:
    """Start ``vmrt snapshot build`` for ``shape`` on its own (a new session, no terminal, output
    to ``build.log``) unless one is building it; a word for ``--timings``: ``building`` (started
    now), ``being-built`` (another run started it) or ``not-buildable``."""
    if not buildable(cfg, shape):
        return "not-buildable"
    fd = _lock_file(cfg, key(cfg, shape))
    try:
        try:  # a builder holds it while it builds (build())
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "being-built"
        # the builder takes the lock once this run lets it go; a second run that starts another
        # in between has it wait, find this one's snapshot and end
        with open(snapshots_dir(cfg) / "build.log", "ab", opener=fsmode.opener) as log:
            subprocess.Popen(vmrt_here("snapshot", "build", "--memory", str(shape.memory_mib),
                                        "--cpus", str(shape.vcpus)), stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        return "building"
    finally:
        os.close(fd)


def prune(cfg: Config) -> int:
    """Remove what no run can restore: snapshots of another format, kernel, initramfs or QEMU
    (their key is not the one their shape has now, jailed or not, or their shape is not the
    default VM's with some memory and vCPUs), builds that died, unheld build locks.
    Returns how many snapshots went."""
    d = snapshots_dir(cfg)
    other = dataclasses.replace(cfg, vmm_jail=not cfg.vmm_jail)  # its snapshots are kept too
    n = 0
    default: Shape | None = None  # the default VM's shape: found once, for every snapshot
    for sub in sorted(d.iterdir()) if d.is_dir() else []:
        if sub.name.endswith(".building"):
            with contextlib.suppress(OSError):
                fd = os.open(sub, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no builder holds it
                    sub.unlink()
                except BlockingIOError:
                    pass
                finally:
                    os.close(fd)
            continue
        if not sub.is_dir() or sub.is_symlink():
            continue
        if ".tmp" in sub.name:  # <key>.tmp<pid>: a build's, removed once its builder is gone
            pid = sub.name.rsplit(".tmp", 1)[1]
            if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
                shutil.rmtree(sub, ignore_errors=True)
            continue
        try:
            meta = json.loads((sub / "meta.json").read_text())
            shape = Shape(**meta["shape"])
            default = default or Shape.of(_spec(cfg, None, None))
            # not what this vmrt builds now (another kernel or agent build: never restored again)
            stale = (meta.get("format") != FORMAT or sub.name not in (key(cfg, shape), key(other, shape))
                     or not buildable(cfg, shape, default))
        except (OSError, ValueError, TypeError, KeyError, VmrtError):
            stale = True  # unreadable, or its kernel or initramfs is gone
        if stale:
            shutil.rmtree(sub, ignore_errors=True)
            n += 1
    return n


async def _build(cfg: Config, force: bool, spec: VMSpec) -> Snapshot:
    shape = Shape.of(spec)
    k = key(cfg, shape)
    out = snapshots_dir(cfg) / k
    if not force and (snap := find(cfg, shape)) is not None and snap.verify() is None:
        return snap
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "share").mkdir(parents=True)
    os.close(os.open(tmp / "ram", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))  # the jail binds it
    spec = dataclasses.replace(spec, virtiofs_socket=tmp / "unused.sock", share_9p=tmp / "share", ram_file=tmp / "ram")
    proxy = None
    if cfg.vmm_jail:  # the same devices as a clone's: a 9p share served by the proxy helper
        proxy = P9Proxy(cfg, tmp / "share", tmp / "virtiofsd.log")
        proxy.start()
    vm = QemuVM(cfg, dataclasses.replace(spec, tap_fd=network.open_tap_detached(), disk_fd=vmdisk.placeholder()),
                tmp / "qemu.log", fs_fd=proxy.qemu_fd if proxy is not None else None)
    try:
        try:
            vm.launch()
        finally:
            assert vm.spec.tap_fd is not None and vm.spec.disk_fd is not None
            os.close(vm.spec.tap_fd)
            os.close(vm.spec.disk_fd)
            if proxy is not None:
                proxy.handed()
        await vm.connect_qmp()
        assert vm.agent_sock is not None and vm.qmp is not None
        hello = await asyncio.wait_for(read_hello(vm.agent_sock), cfg.timeouts.agent_ready)
        await vm.qmp.execute("stop")
        await vm.qmp.execute("migrate-set-capabilities", IGNORE_SHARED)  # the RAM stays in its file
        fd = os.open(tmp / "state", os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await _pass_fd(vm, fd, "state")
        finally:
            os.close(fd)
        await vm.qmp.execute("migrate", {"uri": "fd:state"})
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            st: Any = await vm.qmp.execute("query-migrate")
            if st.get("status") in ("completed", "failed"):
                break
            if time.monotonic() > deadline:
                raise VmrtError(f"saving the VM state took more than {MIGRATE_TIMEOUT:g}s")
            await asyncio.sleep(0.05)
        if st.get("status") != "completed":
            raise VmrtError(f"saving the VM state failed: {st.get('error-desc', st.get('status'))}")
    except (TimeoutError, OSError) as e:
        raise VmrtError(f"building the snapshot: {e or type(e).__name__}") from e
    finally:
        await vm.shutdown()
        if proxy is not None:
            proxy.stop()
    os.chown(tmp / "ram", 0, 0)  # the jailed QEMU owned it while it wrote it
    punch_zero_pages(tmp / "ram")
    h = hashlib.sha256()
    with open(tmp / "state", "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    meta = {"format": FORMAT, "key": k, "shape": dataclasses.asdict(shape), "qemu": qemu_version(cfg),
            "hello": hello.record(), "size": (tmp / "state").stat().st_size, "sha256": h.hexdigest(),
            "created": time.time()}
    os.chmod(tmp / "ram", 0o400)
    ram = (tmp / "ram").stat()
    meta["ram"] = [ram.st_size, ram.st_ino, ram.st_mtime_ns]  # rename keeps all three
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for p in tmp.iterdir():  # only the state, the RAM and their description are kept
        if p.name not in ("state", "ram", "meta.json"):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return Snapshot(out, meta)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
PAGE = 4096


def punch_zero_pages(path: Path) -> int:
    """Turn the RAM file's all-zero pages into holes (a booted guest leaves most of its touched
    memory zeroed): each clone copies only the rest into its own RAM, and the page cache holds
    less. Returns the bytes punched."""
    punched = 0
    zero = bytes(1 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole after off
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                buf = os.pread(fd, min(hole - pos, len(zero)), pos)
                if not buf:
                    break
                run = -1  # start of the current run of zero pages in buf
                for i in range(0, len(buf) + PAGE, PAGE):
                    page_zero = i < len(buf) and buf[i:i + PAGE] == zero[:len(buf[i:i + PAGE])]
                    if page_zero and run < 0:
                        run = i
                    elif not page_zero and run >= 0:
                        end = min(i, len(buf))
                        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos + run, end - run) == 0:
                            punched += end - run
                        run = -1
                pos += len(buf)
            off = hole
    finally:
        os.close(fd)
    return punched


def listing(cfg: Config) -> list[Snapshot]:
    d = snapshots_dir(cfg)
    found = []
    for sub in sorted(d.iterdir()) if d.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            found.append(Snapshot(sub, json.loads((sub / "meta.json").read_text())))
    return found


def remove_all(cfg: Config) -> int:
    """``vmrt snapshot rm``: every snapshot, the last background build's log, and (:func:`prune`)
    what dead builds left; a build that still runs keeps its lock and finishes."""
    n = 0
    for s in listing(cfg):
        shutil.rmtree(s.dir, ignore_errors=True)
        n += 1
    (snapshots_dir(cfg) / "build.log").unlink(missing_ok=True)
    prune(cfg)
    return n

