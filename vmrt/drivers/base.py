"""What every isolation driver is given and must do."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

from ..config import Config
from ..images.store import Image
from ..network import Attached
from ..ocispec import Spec
from ..state import Container, State
from ..timings import Timings

Option = int | float | str | bool | None
Tee = Callable[[str, bytes], None]  # ("stdout" or "stderr", what the container wrote): a copy for its log


@dataclasses.dataclass
class Handoff:
    """A detached run, handed to the C monitor (monitor/monitor.c) once its process runs: the
    mode, the fds it inherits by option (``--stdout``, ``--agent``...) and its other options
    (True: a flag; False or None: left out)."""

    mode: Literal["process", "vm"]
    fds: dict[str, int]
    options: dict[str, Option]


HandOver = Callable[[Handoff], NoReturn]  # the caller's: this process becomes the C monitor


class Recorder(Protocol):
    """Where a run records its container's PIDs and OOM kill: vmrt's state, or an OCI
    container's own record (vmrt/ocivm.py)."""

    def set_fields(self, c: Container, **fields: Any) -> None: ...


@dataclasses.dataclass
class RunContext:
    cfg: Config
    state: State | Recorder | None  # None: a tool run over the container (offline.py), its record untouched
    container: Container
    image: Image | None             # None: an OCI engine's bundle (its rootfs is the one layer)
    layers: list[Path]          # the image's unpacked layers, lowest first
    bundle_dir: Path            # per-container runtime dir holding config.json
    config: Spec                # the bundle's OCI config
    timings: Timings
    stdin_fd: int = 0
    stdout_fd: int = 1
    stderr_fd: int = 2
    log_dir: Path | None = None  # where console/VMM logs are kept after the run
    rw_dir: Path | None = None   # the container's writable layer (process mode), kept until rm
    scratch: bool = False        # run --rm: the writable layer is discarded when this run ends
    # detached runs: once the process runs (VM: once the agent is ready), the driver hands
    # the container over (its fds and PIDs) to the small C monitor; this call never returns
    handoff: HandOver | None = None
    # attached runs of kept containers: what goes to stdout/stderr is also logged here
    tee: Tee | None = None
    net: Attached | None = None  # the container's namespace, endpoints and managed /etc files
    # VM mode: awaited once the VM is ready, before its process starts (an OCI create's holder
    # waits there for `start`); what it raises ends the run
    gate: Callable[[], Awaitable[None]] | None = None
    # VM mode, a build's RUN step: once its process exits 0, the guest agent's walk of its writable
    # layer with contents (WALK_AFTER, vmrt/agent/walk.py ContentParser) is written here
    walk_fd: int | None = None


class Driver(Protocol):
    name: str

    def run(self, ctx: RunContext) -> int:
        """Run the container attached; return its exit status (Docker convention)."""
        ...
