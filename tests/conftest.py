"""Shared fixtures: a private vmrt root per test session, the real CLI, leak checks.

Tests boot real micro-VMs under QEMU (TCG on hosts without usable KVM) and use
the real kernel, agent and image built by `vmrt setup`. They need root.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        pytest.exit("vmrt's tests need root (mounts, QEMU, virtiofsd); run them as root", returncode=4)


# VMRT_TEST_SLOT=N (0-9): a test run of its own beside others on this host (its own cgroup parent,
# bridge names and subnets), so parallel runs never count each other's containers as leftovers
SLOT = os.environ.get("VMRT_TEST_SLOT", "")
if SLOT and not (SLOT.isdigit() and len(SLOT) == 1):
    raise SystemExit("VMRT_TEST_SLOT must be one digit")
CGROUP_PARENT = f"vmrt-t{SLOT}" if SLOT else "vmrt"
if SLOT:
    os.environ["VMRT_CGROUP_PARENT"] = CGROUP_PARENT


def vmrt_cgroups() -> set[str]:
    """Every container cgroup vmrt made (process mode: vmrt/<id>; VM mode: vmrt/<id>-vmm)."""
    root = Path("/sys/fs/cgroup")
    bases = ([root / CGROUP_PARENT] if (root / "cgroup.controllers").exists()
             else list(root.glob(f"*/{CGROUP_PARENT}")))
    return {str(d) for b in bases if b.is_dir() for d in b.iterdir() if d.is_dir()}


_instances = itertools.count(1)
# a container's veth, a user network's bridge (tests remove their networks); the default bridge of
# each private vmrt (vmrttN) stays, as docker0, until the session ends
NET_IFACE = re.compile(r"^(v[0-9a-f]{10}\d|vmbr[0-9a-f]{10})$")
_made: list[Vmrt] = []


def host_interfaces() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def vmm_pids(run_root: Path) -> list[int]:
    """The QEMU processes of the vmrt whose run root this is: a jailed QEMU's root is
    ``<run_root>/jail`` (its command line names no path of vmrt's); an unjailed one names its
    run dir."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            continue
        if cmd.startswith(b"qemu-system") and (root.startswith(str(run_root)) or str(run_root).encode() in cmd):
            out.append(int(pid))
    return out


def nft_table(root: Path) -> str:
    """The nftables table of the vmrt whose state root this is (vmrt/network.py: table_name)."""
    return f"vmrt_{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def port_rules(table: str) -> list[str]:
    r = subprocess.run(["nft", "list", "chain", "inet", table, "ports"], capture_output=True, text=True)
    return [ln.strip() for ln in r.stdout.splitlines() if "dnat" in ln]


def endpoint_rules(table: str) -> list[str]:
    """The per-container anti-spoofing chains and their map elements in vmrt's bridge table."""
    r = subprocess.run(["nft", "list", "table", "bridge", table], capture_output=True, text=True)
    return [*re.findall(r"chain (ep_\w+)", r.stdout), *re.findall(r'"(\w+)" : goto', r.stdout)]


class Vmrt:
    def __init__(self, root: Path, run_root: Path) -> None:
        self.root, self.run_root = root, run_root
        self.cgroups_before = vmrt_cgroups()
        n = next(_instances)
        # each private vmrt has its own default bridge and subnet (and nftables table, by root):
        # nothing it does touches another's or the host's own vmrt
        self.bridge, self.subnet = f"vmrtt{n}", f"10.200.{n % 250}.0/24"
        if SLOT:
            self.bridge, self.subnet = f"vmrtt{SLOT}x{n}", f"10.{210 + int(SLOT)}.{n % 250}.0/24"
        self.env = dict(os.environ, VMRT_ROOT=str(root), VMRT_RUN_ROOT=str(run_root),
                        VMRT_ACCEL=os.environ.get("VMRT_TEST_ACCEL", "tcg"), PYTHONUNBUFFERED="1",
                        VMRT_NETWORK_BRIDGE=self.bridge, VMRT_NETWORK_SUBNET=self.subnet,
                        VMRT_NETWORK_POOL="10.201.0.0/16")
        self.env.pop("VMRT_ISOLATION", None)
        _made.append(self)

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vmrt", *args]

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 180,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.cmd(*args), input=input, capture_output=True, timeout=timeout,
                              env={**self.env, **(env or {})},
                              stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("stdin", subprocess.DEVNULL)
        env = {**self.env, **kw.pop("env", {})}  # type: ignore[dict-item]
        return subprocess.Popen(self.cmd(*args), env=env, **kw)  # type: ignore[call-overload]

    # --- leak checks -----------------------------------------------------------
    def leftovers(self) -> list[str]:
        found = []
        marker = str(self.run_root)
        jailed = set(vmm_pids(self.run_root))
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and ("qemu" in cmdline or "virtiofsd" in cmdline):
                found.append(f"process {pid}: {cmdline[:120]}")
            elif int(pid) in jailed:
                found.append(f"jailed VMM {pid}: {cmdline[:120]}")
            try:
                cg = Path(f"/proc/{pid}/cgroup").read_text()
            except OSError:
                continue
            if f":/{CGROUP_PARENT}/" in cg:  # a container process (process mode) or a VM's host processes
                found.append(f"process {pid} in a vmrt cgroup: {cmdline[:80]}")
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = line.split()[4]
            if mp.startswith(marker):
                found.append(f"mount {mp}")
        cdir = self.run_root / "containers"
        if cdir.exists():
            found += [f"run dir {p}" for p in cdir.iterdir()]
        pdir = self.run_root / "pool"  # the warm pool's VMs (tests stop their pools)
        if pdir.exists():
            found += [f"pool {p}" for p in pdir.iterdir() if p.name != "daemon.log"]
        rdir = self.run_root / "runtime"  # the OCI runtime's per-container state
        if rdir.exists():
            found += [f"runtime state {p}" for p in rdir.iterdir() if p.is_dir()]
        found += [f"cgroup {d}" for d in vmrt_cgroups() - self.cgroups_before]
        tmp = self.root / "tmp"  # the image store's downloads and unpacks in progress
        if tmp.exists():
            found += [f"store temp {p}" for p in tmp.iterdir()]
        ns = self.run_root / "netns"  # network namespaces of containers (and pooled VMs)
        if ns.exists():
            found += [f"netns {p}" for p in ns.iterdir()]
        # veths, bridges, rules: gone with the last container of a network
        found += [f"interface {i}" for i in host_interfaces() if NET_IFACE.match(i) and self._ours(i)]
        found += [f"port rule {r}" for r in port_rules(nft_table(self.root))]
        found += [f"anti-spoofing rule {r}" for r in endpoint_rules(nft_table(self.root))]
        return found

    def _ours(self, iface: str) -> bool:
        """Without a test slot every vmrt interface counts; with one, only those on this vmrt's
        bridges (another slot's containers come and go meanwhile)."""
        if not SLOT:
            return True
        if iface.startswith("vmbr"):  # user networks: counted in a run without a slot only
            return False
        master = Path("/sys/class/net") / iface / "master"
        try:
            name = os.readlink(master).rsplit("/", 1)[-1]
        except OSError:
            return False
        return name == self.bridge

    def assert_clean(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"teardown left: {left}"


@pytest.fixture(scope="session", autouse=True)
def _remove_test_bridges() -> Iterator[None]:
    """At the end of the session: the default bridges and nftables tables of the private vmrts
    (kept between their containers, as docker0 is) go, so the host is as before."""
    yield
    for v in _made:
        subprocess.run(["ip", "link", "del", v.bridge], capture_output=True)
        for family in ("ip", "inet", "bridge"):
            subprocess.run(["nft", "delete", "table", family, nft_table(v.root)], capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def _unmount_test_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session: the nosuid,nodev,noexec binds vmrt made of each private state
    root (vmrt/safefs.py: inert_mount, once per root, kept as long as the host runs) go."""
    yield
    base = str(tmp_path_factory.getbasetemp()) + "/"
    for _ in range(5):  # a stacked mount needs one umount each
        points = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
        ours = sorted({p for p in points if p.startswith(base)}, key=len, reverse=True)
        if not ours:
            break
        for mp in ours:
            subprocess.run(["umount", "-l", mp], capture_output=True)


@pytest.fixture(scope="session")
def built() -> None:
    """Kernel and agent in the shared cache (built once; cached by hash)."""
    r = subprocess.run([sys.executable, "-m", "vmrt", "kernel", "build"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "vmrt", "agent", "build"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def one_line_error(stderr: bytes) -> str:
    """The single ``vmrt: ...`` line a failure must print (no traceback); returns it."""
    text = stderr.decode()
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("vmrt: ")
    return lines[0]


def private_vmrt(base: Path) -> Vmrt:
    """A vmrt with its own store and run dirs under ``base``, holding the busybox image."""
    v = Vmrt(base / "root", base / "run")
    r = v("image", "build", str(REPO / "images" / "busybox"))
    assert r.returncode == 0, r.stderr
    return v


@pytest.fixture(scope="session")
def vmrt_session(tmp_path_factory: pytest.TempPathFactory, built: None) -> Vmrt:
    return private_vmrt(tmp_path_factory.mktemp("vmrt"))


@pytest.fixture
def vmrt(vmrt_session: Vmrt) -> Vmrt:
    yield vmrt_session
    vmrt_session.assert_clean()


@pytest.fixture
def snap(vmrt: Vmrt) -> Iterator[Path]:
    """The default shape's snapshot, built in the test's state root and removed after."""
    r = vmrt("snapshot", "build", timeout=300)
    assert r.returncode == 0, r.stderr
    try:
        yield Path(r.stdout.decode().split()[0])
    finally:
        assert vmrt("snapshot", "rm").returncode == 0
    assert not list((vmrt.root / "snapshots").iterdir())
