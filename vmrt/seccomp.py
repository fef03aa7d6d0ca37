"""The default seccomp profile, as an OCI runtime-spec ``linux.seccomp`` object.

The profile is not written here: it is read from ``/usr/share/containers/seccomp.json``,
shipped by Debian's ``golang-github-containers-common``. That file is the Docker/podman
default profile (containers/common keeps it in step with moby's), maintained upstream and
updated through the distribution with the runc and libseccomp it runs against; a hand-kept
list of syscalls would go stale and would have to be reviewed on its own.

The file is in Docker's profile format (``archMap``, per-rule ``includes``/``excludes`` on
capabilities, architectures and kernel version). :func:`default_profile` resolves those
conditions for one container, the way moby's ``profiles/seccomp`` and containers/common's
``pkg/seccomp`` ``setupSeccomp`` do, and returns what runc reads: ``defaultAction``,
``defaultErrnoRet``, ``architectures`` and ``syscalls`` of ``names``/``action``/``errnoRet``/``args``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import LaunchError

DEFAULT_PATH = Path("/usr/share/containers/seccomp.json")
PACKAGE = "golang-github-containers-common"

# uname -m (and Go GOARCH) spellings -> libseccomp's native arch name, which the profile's "arches" use.
_NATIVE = {"x86_64": "amd64", "i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86", "386": "x86",
           "aarch64": "arm64", "armv6l": "arm", "armv7l": "arm", "armv8l": "arm", "mips64le": "mipsel64",
           "mipsle": "mipsel", "riscv64": "riscv64"}
# libseccomp native arch name -> the SCMP_ARCH_* name of archMap and of the OCI spec (moby's nativeToSeccomp).
_SCMP = {"amd64": "SCMP_ARCH_X86_64", "x86": "SCMP_ARCH_X86", "x32": "SCMP_ARCH_X32", "arm": "SCMP_ARCH_ARM",
         "arm64": "SCMP_ARCH_AARCH64", "mips": "SCMP_ARCH_MIPS", "mipsel": "SCMP_ARCH_MIPSEL",
         "mips64": "SCMP_ARCH_MIPS64", "mipsel64": "SCMP_ARCH_MIPSEL64", "mips64n32": "SCMP_ARCH_MIPS64N32",
         "mipsel64n32": "SCMP_ARCH_MIPSEL64N32", "ppc": "SCMP_ARCH_PPC", "ppc64": "SCMP_ARCH_PPC64",
         "ppc64le": "SCMP_ARCH_PPC64LE", "s390": "SCMP_ARCH_S390", "s390x": "SCMP_ARCH_S390X",
         "riscv64": "SCMP_ARCH_RISCV64"}


def native_arch(machine: str | None = None) -> str:
    """libseccomp's name ("amd64", "arm64", ...) for ``machine`` (default: this host's ``uname -m``)."""
    m = machine or os.uname().machine
    name = _NATIVE.get(m, m)
    if machine is None and name in ("mips", "mips64") and sys.byteorder == "little":
        name = name.replace("mips", "mipsel")     # uname -m does not tell the byte order
    return name


def _version(text: object) -> tuple[int, int, int] | None:
    """(major, minor, patch) of "6.1", "6.1.0-18-amd64", "3.12-1-amd64"; None if it starts with no number."""
    m = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", text) if isinstance(text, str) else None
    return (int(m[1]), int(m[2] or 0), int(m[3] or 0)) if m else None


def _malformed(path: Path, why: str) -> LaunchError:
    return LaunchError(f"seccomp profile {path} is malformed ({why}); reinstall the Debian package {PACKAGE}")


def _strings(v: object) -> bool:
    return v is None or isinstance(v, list) and all(isinstance(x, str) for x in v)


def _valid_rule(rule: object) -> bool:
    if not isinstance(rule, dict) or not isinstance(rule.get("action"), str):
        return False
    conds = [rule.get("includes") or {}, rule.get("excludes") or {}]
    args = rule.get("args") or []
    return (_strings(rule.get("names")) and isinstance(rule.get("name", ""), str)
            and not (rule.get("name") and rule.get("names"))
            and isinstance(rule.get("errnoRet", 0), int | None) and isinstance(args, list)
            and all(isinstance(a, dict) and isinstance(a.get("index"), int) and isinstance(a.get("op"), str)
                    and isinstance(a.get("value", 0), int) and isinstance(a.get("valueTwo", 0), int) for a in args)
            and all(isinstance(c, dict) and _strings(c.get("caps")) and _strings(c.get("arches"))
                    and (not c.get("minKernel") or _version(c["minKernel"]) is not None) for c in conds))


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, Any]:
    """The profile at ``path``, parsed and checked once per process."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise LaunchError(f"seccomp profile {path} is missing; install the Debian package {PACKAGE}") from None
    except OSError as e:
        raise LaunchError(f"cannot read seccomp profile {path}: {e.strerror or e}") from None
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
        raise _malformed(path, f"not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("defaultAction"), str):
        raise _malformed(path, "no defaultAction")
    if not isinstance(data.get("defaultErrnoRet", 0), int | None) or not _strings(data.get("architectures")):
        raise _malformed(path, "bad defaultErrnoRet or architectures")
    arch_map = data.get("archMap") or []
    if not isinstance(arch_map, list) or not all(
            isinstance(e, dict) and isinstance(e.get("architecture"), str) and _strings(e.get("subArchitectures"))
            for e in arch_map):
        raise _malformed(path, "bad archMap")
    if arch_map and data.get("architectures"):
        raise _malformed(path, "both archMap and architectures")
    if not isinstance(data.get("syscalls") or [], list):
        raise _malformed(path, "syscalls is not a list")
    for i, rule in enumerate(data.get("syscalls") or []):
        if not _valid_rule(rule):
            raise _malformed(path, f"syscalls[{i}] is not a valid rule")
    return data


def _applies(rule: dict[str, Any], caps: set[str], arch: str, release: str) -> bool:
    """Whether ``rule``'s includes all hold and none of its excludes does (moby's setupSeccomp)."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}

    def kernel_at_least(minimum: str) -> bool:
        kernel = _version(release)
        if kernel is None:
            raise LaunchError(f"cannot parse kernel version {release!r} to apply the seccomp profile's minKernel")
        return kernel >= (_version(minimum) or (0, 0, 0))

    if arch in (exc.get("arches") or []) or caps & set(exc.get("caps") or []):
        return False
    if exc.get("minKernel") and kernel_at_least(exc["minKernel"]):
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if not set(inc.get("caps") or []) <= caps:
        return False
    return not (inc.get("minKernel") and not kernel_at_least(inc["minKernel"]))


def default_profile(caps: list[str], arch: str | None = None, path: Path = DEFAULT_PATH,
                    kernel: str | None = None) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object for a container holding ``caps``.

    ``arch`` is a ``uname -m`` or libseccomp name (default: this host); ``kernel`` a release
    string like "6.1.0-18-amd64" (default: the running kernel). Rules whose ``includes`` are not
    all met, or whose ``excludes`` match any, are left out. Raises LaunchError if the profile file
    is missing or malformed.
    """
    profile = _load(Path(path))
    native = native_arch(arch)
    release = kernel if kernel is not None else os.uname().release
    out: dict[str, Any] = {"defaultAction": profile["defaultAction"]}
    if profile.get("defaultErrnoRet") is not None:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    arches = list(profile.get("architectures") or [])
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == _SCMP.get(native):
            arches += [entry["architecture"], *(entry.get("subArchitectures") or [])]
            break
    if arches:       # none: libseccomp uses the native architecture alone
        out["architectures"] = arches
    syscalls = []
    have = set(caps)
    for rule in profile.get("syscalls") or []:
        names = list(rule.get("names") or ([rule["name"]] if rule.get("name") else []))
        if not names or not _applies(rule, have, native, release):
            continue
        call: dict[str, Any] = {"names": names, "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            call["errnoRet"] = rule["errnoRet"]
        args = [{"index": a["index"], "value": a.get("value", 0), "op": a["op"]}
                | ({"valueTwo": a["valueTwo"]} if a.get("valueTwo") else {}) for a in rule.get("args") or []]
        if args:
            call["args"] = args
        syscalls.append(call)
    if syscalls:
        out["syscalls"] = syscalls
    return out
