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

import ctypes
import errno
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


# --- the profile as a BPF program, for a VM's agent to install (issue 16, part 2) -----------------
#
# The guest agent has no libseccomp: the host compiles the same OCI object runc would load into the
# classic BPF program libseccomp generates for it (seccomp_export_bpf), with runc's translation rules,
# and the agent installs those bytes with seccomp(SECCOMP_SET_MODE_FILTER) just before execve. The
# library is the one runc links (Debian's libseccomp2), reached through ctypes.

# libseccomp's action values (seccomp.h) and comparison operators (enum scmp_compare)
_ACTIONS = {"SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000, "SCMP_ACT_KILL_PROCESS": 0x80000000,
            "SCMP_ACT_TRAP": 0x00030000, "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
            "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000}
_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
        "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
EPERM = 1
MAX_INSNS = 4096        # BPF_MAXINSNS: the kernel refuses a longer classic BPF program
LIBRARY = "libseccomp.so.2"


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


@functools.cache
def _libseccomp() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError:
        raise LaunchError(f"{LIBRARY} is missing; install the Debian package libseccomp2") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _action(name: str, errno_ret: int | None) -> int:
    """libseccomp's value of an OCI action (runc's: SCMP_ACT_ERRNO without errnoRet is EPERM)."""
    if name not in _ACTIONS:
        raise LaunchError(f"seccomp: action {name!r} cannot be compiled for a VM's guest")
    if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        return _ACTIONS[name] | ((EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    return _ACTIONS[name]


def compile_bpf(profile: dict[str, Any]) -> bytes:
    """The classic BPF program (struct sock_filter[]) libseccomp makes of an OCI ``linux.seccomp``
    object, for this host's architecture (the guest's). Raises LaunchError if it cannot be built."""
    return _compile(json.dumps(profile, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _compile(text: str) -> bytes:
    profile = json.loads(text)
    lib = _libseccomp()
    ctx = lib.seccomp_init(_action(profile["defaultAction"], profile.get("defaultErrnoRet")))
    if not ctx:
        raise LaunchError("seccomp: libseccomp could not start a filter")
    try:
        native = lib.seccomp_arch_native()
        for arch in profile.get("architectures") or []:
            token = lib.seccomp_arch_resolve_name(arch.removeprefix("SCMP_ARCH_").lower().encode())
            # EEXIST: the native one, there from the start
            if token and token != native and lib.seccomp_arch_add(ctx, token) not in (0, -errno.EEXIST):
                raise LaunchError(f"seccomp: libseccomp cannot add architecture {arch}")
        for rule in profile.get("syscalls") or []:
            action = _action(rule["action"], rule.get("errnoRet"))
            if action == _ACTIONS["SCMP_ACT_ALLOW"] and profile["defaultAction"] == "SCMP_ACT_ALLOW":
                continue
            conds = [_ArgCmp(a["index"], _OPS[a["op"]], a.get("value", 0), a.get("valueTwo", 0))
                     for a in rule.get("args") or []]
            # runc: conditions on distinct arguments are one rule (all must hold); several on the same
            # argument are a rule each (any may)
            groups = [conds] if len({c.arg for c in conds}) == len(conds) else [[c] for c in conds]
            for name in rule["names"]:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr < 0:      # not a syscall of this architecture (runc skips it too)
                    continue
                for group in groups:
                    arr = (_ArgCmp * len(group))(*group)
                    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(group), arr)
                    # EEXIST: the same rule again (the profile lists socket's arg-2 rule twice for
                    # a container without CAP_AUDIT_WRITE): the filter already has it
                    if rc < 0 and rc != -errno.EEXIST:
                        raise LaunchError(f"seccomp: libseccomp refused the rule for {name}: "
                                          f"{os.strerror(-rc)}")
        fd = os.memfd_create("vmrt-seccomp", os.MFD_CLOEXEC)
        try:
            if lib.seccomp_export_bpf(ctx, fd) < 0:
                raise LaunchError("seccomp: libseccomp could not export the filter")
            os.lseek(fd, 0, os.SEEK_SET)
            prog = b""
            while chunk := os.read(fd, 65536):
                prog += chunk
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    if not prog or len(prog) % 8 or len(prog) // 8 > MAX_INSNS:
        raise LaunchError(f"seccomp: the compiled filter has {len(prog) / 8:g} instructions (at most {MAX_INSNS})")
    return prog


# --- the host's file servers (virtiofsd, virtfs-proxy-helper) -----------------------------------
#
# Both run as root on the host and write what a guest asks into the host's directories: a writable
# bind volume. Whatever their own capability sets keep (the proxy helper keeps CAP_MKNOD and
# CAP_FSETID, and no capability set stops an owner's chmod u+s), this filter, loaded before they
# start, refuses the requests that would leave a privileged file on the host: setuid/setgid bits
# (chmod, or a create with such a mode), device nodes, and extended attributes (file capabilities,
# security.*). A VM's writable layer is its own disk: inside the container these work as usual.

_S_IFMT, _S_IFCHR, _S_IFBLK, _S_ISUID, _S_ISGID = 0o170000, 0o020000, 0o060000, 0o4000, 0o2000


def _masked(index: int, mask: int, value: int | None = None) -> dict[str, Any]:
    """OCI's SCMP_CMP_MASKED_EQ: (arg & value) == valueTwo."""
    return {"index": index, "op": "SCMP_CMP_MASKED_EQ", "value": mask, "valueTwo": mask if value is None else value}


def file_server_profile() -> dict[str, Any]:
    rules: list[dict[str, Any]] = []

    def deny(names: list[str], *args: dict[str, Any], err: int = EPERM) -> None:
        rules.append({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": err, "args": list(args)})

    for bit in (_S_ISUID, _S_ISGID):
        deny(["chmod", "fchmod", "creat", "mknod"], _masked(1, bit))
        deny(["fchmodat", "mknodat"], _masked(2, bit))
        deny(["open"], _masked(1, os.O_CREAT), _masked(2, bit))
        deny(["openat"], _masked(2, os.O_CREAT), _masked(3, bit))
    for kind in (_S_IFCHR, _S_IFBLK):
        deny(["mknod"], _masked(1, _S_IFMT, kind))
        deny(["mknodat"], _masked(2, _S_IFMT, kind))
    deny(["setxattr", "lsetxattr", "fsetxattr"], err=errno.EOPNOTSUPP)
    # nor read: a guest sees no xattr through either server (virtiofsd runs without -o xattr).
    # A clone's 9p helper asking the host's overlay got an inconsistent list: for a directory
    # that is opaque in a layer, overlayfs counts its hidden trusted.overlay.opaque when asked
    # for the size (23) and lists nothing after; QEMU hands the guest that size zero-filled, an
    # empty name, and the guest's copy-up of the directory failed (EOPNOTSUPP)
    deny(["getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr"], err=errno.EOPNOTSUPP)
    deny(["openat2", "fchmodat2"], err=errno.ENOSYS)  # a mode the filter cannot see: the callers fall back
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}


def file_server_bpf() -> bytes:
    """:func:`file_server_profile` compiled (cached): what ``procs.spawn(seccomp=...)`` loads."""
    return compile_bpf(file_server_profile())
