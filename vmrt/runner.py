"""``vmrt run``: image -> container record -> bundle -> driver -> cleanup."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import bundle, fsmode, network
from .bundle import RunOptions
from .config import Config
from .drivers.base import Driver, HandOver, RunContext, Tee
from .errors import ImageError, StateError, UsageError, VmrtError
from .formatting import inert
from .images import mirrors, reference
from .images.store import Image, Store
from .layout import LOG_NAME, META_NAME, Meta, container_dir, rw_dir, write_meta
from .lifecycle import owner_alive, remove_run_dir
from .logfile import LogWriter, container_limits
from .ocispec import Spec
from .proc import start_ticks
from .rootfs import LayeredRoot
from .state import Container, State, Status
from .timings import Timings

LOG = logging.getLogger(__name__)


def make_driver(isolation: str, *, accel: str | None, kernel: Path | None, runtime: str = "auto",
                vm_driver: str = "qemu") -> Driver:
    """The driver of an isolation mode (imported on use: a process run never loads the VM
    driver's modules, nor a VM run runc's); VM mode's through libvirt with ``vm_driver`` libvirt."""
    if isolation == "vm" and vm_driver == "libvirt":
        from .drivers.libvirt import LibvirtDriver  # on use: only a libvirt run loads libvirt-python
        return LibvirtDriver(accel=accel, kernel_path=kernel)
    if isolation == "vm":
        from .drivers.vm import VMDriver  # on use: a process run never loads QEMU, pool and agent modules
        return VMDriver(accel=accel, kernel_path=kernel)
    from .drivers.process import ProcessDriver  # on use: a VM run never loads runc's driver
    return ProcessDriver(runtime)


def find_image(cfg: Config, store: Store, ref: str, pull: str = "missing", platform: str | None = None) -> Image:
    """The image ``ref`` names, pulled first as ``docker run --pull=POLICY`` would."""
    if pull not in ("missing", "always", "never"):
        raise UsageError(f"invalid --pull {pull!r}: use missing, always or never")
    if pull != "always":
        try:
            return store.get(ref)
        except ImageError:
            if pull == "never" or reference.looks_like_id(ref) and len(ref) >= 12:
                raise
    from .images import registry  # on use: requests costs over 100 ms, and most runs find the image locally
    tty = sys.stderr.isatty()  # progress bars on a terminal; otherwise one line, after the pull
    missing = f"Unable to find image '{ref}' locally" if pull == "missing" else f"Pulling {ref}"
    if tty:
        print(inert(missing), file=sys.stderr)
    try:
        image = registry.pull(store, ref, platform=platform or cfg.platform, insecure_registries=cfg.insecure(),
                              quiet=not tty, auth_file=cfg.auth_file, mirrors=mirrors.from_config(cfg))
    except VmrtError as e:
        raise ImageError(f"{missing}, and pulling it failed: {e}") from e
    if not tty:
        print(inert(f"{missing}: pulled {image.id}"), file=sys.stderr)
    return store.get(ref)


def create(cfg: Config, opts: RunOptions, isolation: str, state: State, *,
           persist: bool) -> tuple[Container, Image, list[Path], Spec]:
    """``vmrt create``: the image (pulled if need be), a container record and its OCI config.

    With ``persist`` the config is also kept in ``<root>/containers/<id>`` (what a
    detached container's monitor, ``start`` and ``logs`` read); a plain ``run --rm``
    keeps nothing on disk.
    """
    network.preload(opts.net)
    _check_networks(cfg, opts)
    store = Store(cfg.root)
    with store.writing():  # no image prune between finding the image and recording its user
        image = find_image(cfg, store, opts.image, opts.pull, opts.platform)
        layers = image.layer_dirs()
        lookup = LayeredRoot(layers)
        user_root = (lookup.pick("/etc/passwd"), lookup.pick("/etc/group"))
        args = bundle.process_args(image.runtime_config, opts)
        c = state.create(opts.image, isolation, args, opts.name, image_id=image.id)
    try:
        config = bundle.make_config(image.runtime_config, user_root, opts, c.id, isolation)
        if persist:
            bundle.write(container_dir(cfg, c.id), config)
    except BaseException:
        discard(cfg, state, c)
        raise
    return c, image, layers, config


def _check_networks(cfg: Config, opts: RunOptions) -> None:
    """A user network named by --network must exist when the container is created (as Docker)."""
    if opts.net is not None and opts.net.network not in network.BUILTIN:
        with network.Store(cfg) as s:
            s.get(opts.net.network)


def execute(cfg: Config, state: State, c: Container, image: Image, layers: list[Path], config: Spec,
            driver: Driver, timings: Timings, *, log_dir: Path | None, stdio: tuple[int, int, int] = (0, 1, 2),
            handoff: HandOver | None = None, tee: Tee | None = None, scratch: bool = False,
            walk_fd: int | None = None) -> int:
    """Run a created (or exited) container once, attached to ``stdio``; returns its exit status.
    ``scratch``: the caller discards the container when this run ends (``run --rm``). ``walk_fd``
    (VM mode, a build step): where its writable layer's walk goes once it exits 0.

    The bundle lives in ``<run_root>/containers/<id>`` for the run only; the record
    ends EXITED with the status whatever happens.
    """
    run_dir = cfg.run_root / "containers" / c.id
    try:  # exists while the container runs: a second start of it stops here, touching nothing
        fsmode.private_dir(run_dir.parent)
        run_dir.mkdir(mode=fsmode.PRIVATE_DIR)
    except FileExistsError:
        raise StateError(f"container {c.name} is already running or being started") from None
    status: int = 125
    net = None
    try:
        state.set_fields(c, run_dir=str(run_dir))
        config = copy.deepcopy(config)  # the run's own: its network adds namespace and mounts
        net = network.attach(cfg, c.id, c.name, c.isolation, config, run_dir)  # the drivers plumb it
        timings.mark("network-ready")
        bundle.write(run_dir, config)
        state.transition(c, Status.RUNNING, started=time.time(), monitor_pid=os.getpid(),
                         owner_ticks=start_ticks(os.getpid()), oom_killed=False)
        ctx = RunContext(cfg, state, c, image, layers, run_dir, config, timings, *stdio, log_dir=log_dir,
                         rw_dir=rw_dir(cfg, c.id), handoff=handoff, tee=tee, net=net, scratch=scratch,
                         walk_fd=walk_fd)
        status = driver.run(ctx)
        return status
    except VmrtError as e:
        status = e.exit_code
        raise
    finally:
        try:
            if net is not None:
                net.wait(quiet=True)  # no plumbing thread still at work while it is taken down
            network.detach(cfg, c.id)
        finally:
            with contextlib.suppress(StateError):
                state.transition(c, Status.EXITED, exit_code=status, finished=time.time())
            remove_run_dir(run_dir)


def execute_logged(cfg: Config, state: State, c: Container, image: Image, layers: list[Path],
                   config: Spec, driver: Driver, timings: Timings) -> int:
    """An attached run of a kept container: its output on this terminal and, as Docker does, in its
    log (``vmrt logs``), with a terminal (-t) too: the drivers pass what they write on (``tee``)."""
    cdir = container_dir(cfg, c.id)
    logs = LogWriter(cdir / LOG_NAME, container_limits(cdir, cfg))
    try:
        return execute(cfg, state, c, image, layers, config, driver, timings, log_dir=cdir, tee=logs.feed)
    finally:
        logs.close()


def discard(cfg: Config, state: State, c: Container) -> None:
    """Forget a container that never ran or ran with --rm: its writable layer, kept files, record."""
    shutil.rmtree(rw_dir(cfg, c.id), ignore_errors=True)
    shutil.rmtree(container_dir(cfg, c.id), ignore_errors=True)
    with contextlib.suppress(StateError):
        state.remove(c)


def create_detached(cfg: Config, opts: RunOptions, isolation: str, meta: Meta) -> str:
    """``vmrt create`` (and the first half of ``run -d``): the container, ready for its monitor."""
    state = State(cfg.db_path)
    try:
        c, _, _, _ = create(cfg, opts, isolation, state, persist=True)
        write_meta(cfg, c.id, meta)
        return c.id
    finally:
        state.close()


def kept(cfg: Config, c: Container) -> tuple[Spec, Image, Driver]:
    """How a kept container runs again: its saved OCI config, its image, and the driver its
    meta names (accelerator, kernel, runtime; vmrt's defaults where it has none)."""
    cdir = container_dir(cfg, c.id)
    try:
        meta = json.loads((cdir / META_NAME).read_text()) if (cdir / META_NAME).exists() else {}
        config = json.loads((cdir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise StateError(f"container {c.name} cannot be run again: its configuration is unreadable: {e}") from e
    driver = make_driver(c.isolation, accel=meta.get("accel"),
                         kernel=Path(meta["kernel"]) if meta.get("kernel") else None,
                         runtime=meta.get("runtime") or cfg.runtime, vm_driver=meta.get("vm_driver", "qemu"))
    return config, Store(cfg.root).get(c.image_id), driver


def start_attached(cfg: Config, container_id: str) -> int:
    """``vmrt start -a``: run a created or exited container again, attached to this terminal."""
    state = State(cfg.db_path)
    try:
        c = state.get(container_id)
        if owner_alive(c):
            raise UsageError(f"container {c.name} is already running")
        config, image, driver = kept(cfg, c)
        state.set_fields(c, stop_requested=False, restart_count=0)
        return execute_logged(cfg, state, c, image, image.layer_dirs(), config, driver, Timings())
    finally:
        state.close()


def run(cfg: Config, opts: RunOptions, isolation: str, *, accel: str | None = None,
        kernel: Path | None = None, timings: Timings | None = None, runtime: str | None = None,
        meta: Meta | None = None, on_created: Callable[[str], object] | None = None) -> int:
    """``vmrt run`` attached: create, execute once, and with --rm forget it. ``on_created``: told
    the container's ID once it exists (``--cidfile``)."""
    timings = timings or Timings()
    driver = make_driver(isolation, accel=accel, kernel=kernel, runtime=runtime or cfg.runtime,
                         vm_driver=(meta or {}).get("vm_driver", cfg.vm_driver))
    state = State(cfg.db_path)
    try:
        c, image, layers, config = create(cfg, opts, isolation, state, persist=not opts.rm)
        timings.mark("created")
        if meta is not None and not opts.rm:  # how `vmrt start` runs it again
            write_meta(cfg, c.id, meta)
        try:
            if on_created is not None:
                on_created(c.id)
            if opts.rm:
                return execute(cfg, state, c, image, layers, config, driver, timings, log_dir=None, scratch=True)
            return execute_logged(cfg, state, c, image, layers, config, driver, timings)
        finally:
            if opts.rm:
                discard(cfg, state, c)
    finally:
        state.close()
