"""What vmrt-runtime's two halves share (vmrt/ociruntime.py, the lean entry point; vmrt/ocivm.py,
VM containers): its global flags, its one-line failure, and the bundle's config.json read and
checked as every runtime needs it."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (mypy reads it by name)

if TYPE_CHECKING:  # the runtime's entry point stays lean (vmrt/ociruntime.py)
    from typing import Any

DEFAULT_ROOT = "/run/vmrt-runtime"
MARK = "vmrt.json"  # ROOT/ID/MARK: a VM container's record (runc keeps ROOT/ID/state.json)
SPEC_KEYS = {"ociVersion", "process", "root", "hostname", "domainname", "mounts", "hooks", "annotations",
             "linux", "solaris", "windows", "vm", "zos"}
SPEC_MAX = 16 << 20


class Globals:
    """The global flags as given: ``argv`` is what runc gets (all but ``--isolation``)."""

    def __init__(self) -> None:
        self.root = DEFAULT_ROOT
        self.log: str | None = None
        self.log_format = "text"
        self.debug = False
        self.systemd_cgroup = False
        self.isolation: str | None = None
        self.argv: list[str] = []


class Failure(Exception):
    """One line for stderr and the log; exit status 1."""


def load_spec(bundle: str) -> dict[str, Any]:
    """The bundle's config.json, checked as far as every runtime needs it (both isolations):
    JSON, a known field set, runtime-spec 1.x, a process with args, a rootfs directory."""
    import json  # on use (as re): only create and run read a bundle
    import re
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read(SPEC_MAX + 1)
    except OSError as e:
        raise Failure(f"cannot read {path}: {e.strerror}") from None
    if len(raw) > SPEC_MAX:
        raise Failure(f"{path} is larger than {SPEC_MAX >> 20} MiB")
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise Failure(f"{path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise Failure(f"{path}: not a JSON object")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise Failure(f"{path}: unknown field {unknown[0]!r} (runtime-spec 1.x)")
    version = spec.get("ociVersion")
    if not isinstance(version, str) or not re.match(r"^1\.\d+\.\d+", version):
        raise Failure(f"{path}: ociVersion {version!r} is not 1.x (this runtime implements runtime-spec 1.0)")
    proc = spec.get("process")
    if not isinstance(proc, dict) or not isinstance(proc.get("args"), list) or not proc["args"] or \
            not all(isinstance(a, str) for a in proc["args"]):
        raise Failure(f"{path}: process.args must be a non-empty list of strings")
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str):
        raise Failure(f"{path}: root.path is missing")
    rootfs = os.path.join(bundle, root["path"])
    if not os.path.isdir(rootfs):
        raise Failure(f"the bundle's rootfs {rootfs} is not a directory")
    return spec
