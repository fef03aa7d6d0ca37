"""A tool run over a container that is not running: ``docker cp`` to or from a created or
stopped container (and ``docker diff`` of a stopped VM container), which Docker allows.

The host never reads or writes a container's files itself (a VM container's writable layer
is an ext4 image only its guest may parse, vm/disk.py), so the tool runs where the
container's own process would: its image and writable layer, its volumes, its resources
and seccomp profile, in its isolation (runc, or a micro-VM booted for it), but with the
tool as its process, as root with only the capabilities a copy needs
(:data:`TOOL_CAPS`), no terminal, no network (a namespace of its own, nothing in it) and no
restart policy. The container's record is not touched: it stays Created or Exited with its
status. While the tool runs it holds the container's run dir, as a start does: a start
meanwhile fails as "already running or being started", and a tool run never starts over a
running (or restarting) container, and ``rm`` refuses the container meanwhile (its run dir's
``tool.pid``).

The run is a child process (``python -m vmrt.offline REQUEST``), since the drivers take
signals and a subreaper role that belong to a main thread of their own (the API service
calls this from worker threads); its stdio are the caller's ``stdio``, its own errors one
line on that stderr.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from typing import Any

from . import bundle, fsmode
from . import config as config_mod
from .config import Config
from .drivers.base import RunContext
from .errors import StateError, VmrtError
from .formatting import inert
from .layout import rw_dir
from .lifecycle import TOOL_PID_NAME, owner_alive, remove_run_dir
from .ocispec import Spec
from .proc import start_ticks
from .state import Container, State, Status
from .timings import Timings

TOOL_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID"]
STDIN = "org.vmrt.stdin"
# the container's own: what this run leaves out (its terminal, health checks, stdin-once)
DROPPED_ANNOTATIONS = ("org.vmrt.stdin-once", "org.vmrt.health")


def run_offline(cfg: Config, c: Container, argv: list[str], stdio: tuple[int, int, int], *, stdin: bool,
                annotations: dict[str, str] | None = None) -> int:
    """``argv`` as the process of container ``c`` (not running), attached to ``stdio``; its
    exit status (125 with one line on stdio's stderr when the run itself failed)."""
    request = json.dumps({"id": c.id, "argv": argv, "stdin": stdin, "annotations": annotations or {}})
    proc = subprocess.Popen([sys.executable, "-m", "vmrt.offline", request],
                            stdin=stdio[0] if stdin else subprocess.DEVNULL, stdout=stdio[1], stderr=stdio[2],
                            close_fds=True, start_new_session=True)
    return proc.wait()


def tool_config(config: Spec, argv: list[str], *, stdin: bool, annotations: dict[str, str]) -> Spec:
    """The container's OCI config with ``argv`` as its process (see the module's doc)."""
    spec = copy.deepcopy(config)
    proc = spec["process"]
    proc.update(args=list(argv), terminal=False, cwd="/", user={"uid": 0, "gid": 0})
    proc.pop("consoleSize", None)
    proc["capabilities"] = {k: list(TOOL_CAPS) for k in ("bounding", "effective", "permitted")}
    notes: dict[str, str] = {k: v for k, v in spec.get("annotations", {}).items()
                             if k not in DROPPED_ANNOTATIONS and k != STDIN}
    if stdin:
        notes[STDIN] = "true"
    notes.update(annotations)
    spec["annotations"] = notes
    spaces = [ns for ns in spec["linux"].get("namespaces", []) if ns.get("type") != "network"]
    spec["linux"]["namespaces"] = [*spaces, {"type": "network"}]  # a new one, with nothing in it
    return spec


def _run(request: dict[str, Any]) -> int:
    from .runner import kept  # on use: the run's own process only
    cfg = config_mod.load()
    state = State(cfg.db_path)
    try:
        c = state.get(str(request["id"]))
    finally:
        state.close()
    if c.status == Status.RUNNING or owner_alive(c):
        raise StateError(f"container {c.id[:12]} is running or restarting")
    saved, image, driver = kept(cfg, c)
    if hasattr(driver, "notice"):
        driver.notice = False  # the TCG notice is no tool's output
    spec = tool_config(saved, [str(a) for a in request["argv"]], stdin=bool(request["stdin"]),
                       annotations={str(k): str(v) for k, v in dict(request["annotations"]).items()})
    run_dir = cfg.run_root / "containers" / c.id
    try:  # held as a start holds it: a start meanwhile fails, touching nothing of this run
        run_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        run_dir.mkdir(mode=0o700)
    except FileExistsError:
        raise StateError(f"container {c.id[:12]} is running or being started") from None
    try:
        # rm refuses the container while this names a live process
        fsmode.write_private(run_dir / TOOL_PID_NAME, f"{os.getpid()} {start_ticks(os.getpid())}\n")
        bundle.write(run_dir, spec)
        ctx = RunContext(cfg, None, c, image, image.layer_dirs(), run_dir, spec, Timings(),
                         rw_dir=rw_dir(cfg, c.id))
        return driver.run(ctx)
    finally:
        remove_run_dir(run_dir)


def main(argv: list[str]) -> int:
    try:
        return _run(json.loads(argv[0]))
    except VmrtError as e:
        print(f"vmrt: {inert(str(e))}", file=sys.stderr)
        return e.exit_code
    except (KeyError, ValueError, IndexError, TypeError) as e:
        print(f"vmrt: a bad tool request: {e}", file=sys.stderr)
        return 125


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
