"""vmrt.seccomp: Debian's default profile converted to OCI ``linux.seccomp``, checked on the installed
file, on synthetic profiles, and end to end under the real runc with a busybox root."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from vmrt import kernel, seccomp
from vmrt.bundle import DEFAULT_CAPS
from vmrt.errors import LaunchError
from vmrt.seccomp import DEFAULT_PATH, default_profile

RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"


def rules_for(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in profile.get("syscalls", []) if name in r["names"]]


def allowed(profile: dict[str, Any], name: str) -> bool:
    """``name`` is allowed whatever its arguments, and no rule denies it."""
    rules = rules_for(profile, name)
    return any(r["action"] == "SCMP_ACT_ALLOW" and "args" not in r for r in rules) and all(
        r["action"] == "SCMP_ACT_ALLOW" for r in rules)


def denied(profile: dict[str, Any], name: str) -> bool:
    """Only EPERM rules name ``name``."""
    rules = rules_for(profile, name)
    return bool(rules) and all(r["action"] == "SCMP_ACT_ERRNO" and r.get("errnoRet") == errno.EPERM for r in rules)


# --- the installed profile ------------------------------------------------------------------------------------------

def test_default_action_is_an_errno_action() -> None:
    assert DEFAULT_PATH == Path("/usr/share/containers/seccomp.json") and DEFAULT_PATH.is_file()
    p = default_profile(DEFAULT_CAPS)
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"
    assert isinstance(p.get("defaultErrnoRet", errno.EPERM), int)


@pytest.mark.parametrize("name", ["read", "write", "execve", "exit_group", "mmap", "openat", "clone", "wait4"])
def test_common_syscalls_are_allowed(name: str) -> None:
    assert allowed(default_profile(DEFAULT_CAPS), name)
    assert allowed(default_profile([]), name)


@pytest.mark.parametrize(("cap", "names"), [
    ("CAP_SYS_PTRACE", ["kcmp", "process_madvise"]),
    ("CAP_SYS_ADMIN", ["sethostname", "setdomainname", "bpf", "perf_event_open", "quotactl"]),
    ("CAP_SYS_MODULE", ["init_module", "finit_module", "delete_module"]),
    ("CAP_SYS_TIME", ["settimeofday", "clock_settime"]),
])
def test_capability_gated_syscalls(cap: str, names: list[str]) -> None:
    assert cap not in DEFAULT_CAPS
    without, with_cap = default_profile(DEFAULT_CAPS), default_profile([*DEFAULT_CAPS, cap])
    for name in names:
        assert denied(without, name), name
        assert allowed(with_cap, name), name


def test_chroot_follows_cap_sys_chroot() -> None:
    assert "CAP_SYS_CHROOT" in DEFAULT_CAPS
    assert allowed(default_profile(DEFAULT_CAPS), "chroot")
    assert denied(default_profile([c for c in DEFAULT_CAPS if c != "CAP_SYS_CHROOT"]), "chroot")


def test_argument_rules_are_carried_in_oci_form() -> None:
    # personality: only a few personas are allowed, each by an argument rule
    p = default_profile(DEFAULT_CAPS)
    personas = {r["args"][0]["value"] for r in rules_for(p, "personality")}
    assert {0, 8} <= personas
    assert all(r["args"] == [{"index": 0, "value": r["args"][0]["value"], "op": "SCMP_CMP_EQ"}]
               for r in rules_for(p, "personality"))
    # socket: without CAP_AUDIT_WRITE, AF_NETLINK/NETLINK_AUDIT is refused with EINVAL by a two-argument rule
    socket_rules = rules_for(default_profile([]), "socket")
    assert {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EINVAL,
            "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"},
                     {"index": 2, "value": 9, "op": "SCMP_CMP_EQ"}]} in socket_rules
    assert allowed(default_profile(["CAP_AUDIT_WRITE"]), "socket")


def test_only_oci_fields_and_nothing_empty() -> None:
    for caps in ([], DEFAULT_CAPS):
        p = default_profile(caps)
        assert json.loads(json.dumps(p)) == p
        assert set(p) <= {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
        for rule in p["syscalls"]:
            assert set(rule) <= {"names", "action", "errnoRet", "args"}
            assert rule["names"] and all(v not in (None, [], {}, "") for v in rule.values())
            for arg in rule.get("args", []):
                assert set(arg) <= {"index", "value", "valueTwo", "op"}


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 host only")
def test_native_architectures_on_x86_64() -> None:
    p = default_profile(DEFAULT_CAPS)
    assert p["architectures"][0] == "SCMP_ARCH_X86_64"
    assert {"SCMP_ARCH_X86", "SCMP_ARCH_X32"} <= set(p["architectures"])
    assert allowed(p, "arch_prctl")


def test_other_architecture_by_name() -> None:
    p = default_profile(DEFAULT_CAPS, arch="aarch64")
    assert p["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert allowed(p, "cacheflush") and not rules_for(p, "arch_prctl")
    assert default_profile(DEFAULT_CAPS, arch="amd64") == default_profile(DEFAULT_CAPS, arch="x86_64")


def test_parsed_once_and_results_independent() -> None:
    seccomp._load.cache_clear()
    first = default_profile(DEFAULT_CAPS)
    first["syscalls"].clear()
    first["syscalls"].append({"names": ["x"], "action": "SCMP_ACT_KILL"})
    second = default_profile(DEFAULT_CAPS)
    assert seccomp._load.cache_info().misses == 1 and seccomp._load.cache_info().hits >= 1
    assert allowed(second, "read") and not rules_for(second, "x")


# --- a synthetic profile --------------------------------------------------------------------------------------------

SYNTHETIC = {
    "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "defaultErrno": "ENOSYS",
    "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
    "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW", "args": [], "comment": "", "includes": {},
         "excludes": {}},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64", "x32"]}},
        {"names": ["cacheflush"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm", "arm64"]}},
        {"names": ["not_arm64"], "action": "SCMP_ACT_ALLOW", "excludes": {"arches": ["arm64"]}},
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "errno": "EPERM",
         "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["two_caps"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]}},
        {"names": ["new_call"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "5.8"}},
        {"names": ["old_call"], "action": "SCMP_ACT_ALLOW", "excludes": {"minKernel": "4.8"}},
        {"name": "single", "action": "SCMP_ACT_LOG", "args": None, "includes": None},
        {"names": [], "action": "SCMP_ACT_KILL"},
        {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22, "comment": "masked",
         "args": [{"index": 0, "value": 16, "valueTwo": 0, "op": "SCMP_CMP_EQ"},
                  {"index": 1, "value": 15, "valueTwo": 3, "op": "SCMP_CMP_MASKED_EQ"}]},
    ],
}
SOCKET = {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22,
          "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"},
                   {"index": 1, "value": 15, "valueTwo": 3, "op": "SCMP_CMP_MASKED_EQ"}]}


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    path = tmp_path / "seccomp.json"
    path.write_text(json.dumps(SYNTHETIC))
    return path


def test_synthetic_x86_64_no_caps_new_kernel(synthetic: Path) -> None:
    assert default_profile([], arch="x86_64", path=synthetic, kernel="6.1.0-18-amd64") == {
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["not_arm64"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["new_call"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["single"], "action": "SCMP_ACT_LOG"},
            SOCKET,
        ]}


@pytest.mark.parametrize(("caps", "arch", "kernel", "arches", "names"), [
    (["CAP_SYS_ADMIN"], "aarch64", "4.19.0-27-arm64", ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
     ["read", "cacheflush", "bpf", "single", "socket"]),
    (["CAP_SYS_ADMIN", "CAP_NET_ADMIN"], "amd64", "4.4", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
     ["read", "arch_prctl", "not_arm64", "bpf", "two_caps", "old_call", "single", "socket"]),
    (["CAP_NET_ADMIN"], "x86_64", "5.8", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
     ["read", "arch_prctl", "not_arm64", "bpf", "new_call", "single", "socket"]),
    ([], "x86_64", "5.7.19", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
     ["read", "arch_prctl", "not_arm64", "bpf", "single", "socket"]),
    ([], "ppc64le", "6.1", None, ["read", "not_arm64", "bpf", "new_call", "single", "socket"]),
])
def test_synthetic_filters(synthetic: Path, caps: list[str], arch: str, kernel: str, arches: list[str] | None,
                           names: list[str]) -> None:
    p = default_profile(caps, arch=arch, path=synthetic, kernel=kernel)
    assert p.get("architectures") == arches
    assert [r["names"][0] for r in p["syscalls"]] == names
    bpf = rules_for(p, "bpf")
    assert bpf == ([{"names": ["bpf"], "action": "SCMP_ACT_ALLOW"}] if "CAP_SYS_ADMIN" in caps
                   else [{"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}])
    assert rules_for(p, "socket") == [SOCKET]


def test_unparsable_kernel_with_min_kernel_rules(synthetic: Path) -> None:
    with pytest.raises(LaunchError, match="kernel version 'weird'"):
        default_profile([], path=synthetic, kernel="weird")


# --- missing and malformed files ------------------------------------------------------------------------------------

def assert_one_line(e: LaunchError, path: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg and "golang-github-containers-common" in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "seccomp.json"
    with pytest.raises(LaunchError, match="missing") as info:
        default_profile(DEFAULT_CAPS, path=path)
    assert_one_line(info.value, path)


@pytest.mark.parametrize("content", [
    b"", b"{not json", b"\x80\x81", b"[]", b'{"syscalls": []}', b'{"defaultAction": 1}',
    b'{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": {"names": ["read"]}}',
    b'{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": "read", "action": "SCMP_ACT_ALLOW"}]}',
    b'{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"]}]}',
    b'{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",'
    b' "includes": {"caps": "CAP_SYS_ADMIN"}}]}',
    b'{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",'
    b' "includes": {"minKernel": "new"}}]}',
    b'{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",'
    b' "args": [{"index": 0, "value": "8", "op": "SCMP_CMP_EQ"}]}]}',
    b'{"defaultAction": "SCMP_ACT_ERRNO", "archMap": [{"architecture": "SCMP_ARCH_X86_64"}],'
    b' "architectures": ["SCMP_ARCH_X86_64"]}',
])
def test_malformed_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "seccomp.json"
    path.write_bytes(content)
    with pytest.raises(LaunchError, match="malformed") as info:
        default_profile(DEFAULT_CAPS, path=path)
    assert_one_line(info.value, path)


# --- end to end: the profile enforced by runc -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in (RUNC, BUSYBOX):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing (Debian packages runc and busybox-static)")
    root = tmp_path_factory.mktemp("seccomp-bundle")
    (root / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "rootfs" / "bin" / "busybox")
    subprocess.run([RUNC, "spec", "--bundle", str(root)], check=True, capture_output=True, timeout=30)
    return root


def runc_run(bundle: Path, args: list[str], profile: dict[str, Any] | None) -> subprocess.CompletedProcess[str]:
    config = json.loads((bundle / "config.json").read_text())
    config["process"].update(args=["/bin/busybox", *args], terminal=False,
                             capabilities={k: list(DEFAULT_CAPS) for k in ("bounding", "effective", "permitted")})
    config["root"]["readonly"] = False
    config["linux"]["namespaces"] = [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")]
    config["linux"].pop("seccomp", None)
    if profile is not None:
        config["linux"]["seccomp"] = profile
    (bundle / "config.json").write_text(json.dumps(config))
    state, cid = bundle.parent / "runc-state", f"vmrt-seccomp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        return subprocess.run([RUNC, "--root", str(state), "run", "--bundle", str(bundle), cid],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run([RUNC, "--root", str(state), "delete", "-f", cid], capture_output=True, timeout=30)


@pytest.mark.root
def test_runc_accepts_profile_and_runs_commands(bundle: Path) -> None:
    profile = default_profile(DEFAULT_CAPS)
    r = runc_run(bundle, ["echo", "ok"], profile)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    r = runc_run(bundle, ["grep", "^Seccomp:", "/proc/self/status"], profile)
    assert (r.returncode, r.stdout.split()) == (0, ["Seccomp:", "2"]), r.stderr   # 2: filter mode
    # personality(PER_LINUX32) is allowed by an argument rule
    r = runc_run(bundle, ["linux32", "/bin/busybox", "true"], profile)
    assert r.returncode == 0, r.stderr


@pytest.mark.root
def test_runc_blocks_unlisted_persona_with_default_errno(bundle: Path) -> None:
    # personality(PER_LINUX32|ADDR_NO_RANDOMIZE) needs no capability, but no rule allows that value
    args = ["linux32", "-R", "/bin/busybox", "true"]
    r = runc_run(bundle, args, default_profile(DEFAULT_CAPS))
    assert r.returncode != 0 and os.strerror(errno.ENOSYS) in r.stderr, r.stderr
    r = runc_run(bundle, args, None)
    assert r.returncode == 0, r.stderr


@pytest.mark.root
def test_runc_cap_gated_rule_follows_caps(bundle: Path) -> None:
    # In a fresh user namespace the process holds CAP_SYS_ADMIN over its own UTS namespace, so only seccomp's
    # CAP_SYS_ADMIN-conditional rule on sethostname stands between it and a new hostname.
    args = ["unshare", "-Ur", "-u", "/bin/busybox", "hostname", "changed"]
    r = runc_run(bundle, args, default_profile(DEFAULT_CAPS))
    assert r.returncode != 0 and os.strerror(errno.EPERM) in r.stderr, r.stderr
    r = runc_run(bundle, args, None)
    assert r.returncode == 0, r.stderr
    r = runc_run(bundle, args, default_profile([*DEFAULT_CAPS, "CAP_SYS_ADMIN"]))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("caps", [[], ["CAP_CHOWN"], list(DEFAULT_CAPS)])
def test_vm_filter_compiles_for_any_capability_set(caps: list[str]) -> None:
    """The guest's filter (libseccomp, VM mode) for a container without CAP_AUDIT_WRITE: the
    profile lists one socket rule twice there, and libseccomp's EEXIST for it is no failure."""
    prog = seccomp.compile_bpf(seccomp.default_profile(caps, kernel=kernel.RELEASE))
    assert prog and len(prog) % 8 == 0
