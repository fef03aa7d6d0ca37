"""What tests share: a private vmrt driven through its real CLI, its leak audit, and the
processes tests start, stopped by their pids when a test is over.

A plain module (tests/ is on sys.path through pyproject's pytest ``pythonpath``), imported by
conftest.py for its fixtures and by test modules for the names; conftest itself is never
imported. Nothing here needs root until a `Vmrt` is made or used: `pytest -m 'not root'`
imports it as any user.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent

# VMRT_TEST_SLOT=N (0-9): a test run of its own beside others on this host (its own cgroup parent,
# bridge names and subnets), so parallel runs never count each other's containers as leftovers
SLOT = os.environ.get("VMRT_TEST_SLOT", "")
if SLOT and not (SLOT.isdigit() and len(SLOT) == 1):
    raise SystemExit("VMRT_TEST_SLOT must be one digit")
CGROUP_PARENT = f"vmrt-t{SLOT}" if SLOT else "vmrt"
if SLOT:
    os.environ["VMRT_CGROUP_PARENT"] = CGROUP_PARENT

# the names of vmrt's default networks: every other one is a user network a test made
DEFAULT_NETWORKS = ("bridge", "host", "none")


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
made: list[Vmrt] = []  # every private vmrt of this session (conftest removes their bridges at its end)


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
    """The nftables table of the vmrt whose state root this is (vmrt/network/nft.py: table_name)."""
    return f"vmrt_{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def port_rules(table: str) -> list[str]:
    r = subprocess.run(["nft", "list", "chain", "inet", table, "ports"], capture_output=True, text=True)
    return [ln.strip() for ln in r.stdout.splitlines() if "dnat" in ln]


def endpoint_rules(table: str) -> list[str]:
    """The per-container anti-spoofing chains and their map elements in vmrt's bridge table."""
    r = subprocess.run(["nft", "list", "table", "bridge", table], capture_output=True, text=True)
    return [*re.findall(r"chain (ep_\w+)", r.stdout), *re.findall(r'"(\w+)" : goto', r.stdout)]


# --- processes tests start ---------------------------------------------------------------------

_started: list[subprocess.Popen[Any]] = []
P = TypeVar("P", bound="subprocess.Popen[Any]")


def track(proc: P) -> P:
    """Record a process a test starts (Vmrt.popen does it for every CLI process), so that the
    test's teardown kills it by its pid if it still runs, whatever the test's outcome."""
    _started.append(proc)
    return proc


class Started:
    """The processes `track`ed from now on: those of one test (conftest's autouse fixture makes
    one before the test's own function-scoped fixtures; a module fixture's run on)."""

    def __init__(self) -> None:
        self.mark = len(_started)

    def stop(self) -> list[int]:
        """SIGKILL each of them that still runs and reap it; returns the pids that had to be killed."""
        killed = []
        for proc in _started[self.mark:]:
            if proc.poll() is None:
                proc.kill()
                killed.append(proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        del _started[self.mark:]
        return killed


# --- a private vmrt ----------------------------------------------------------------------------

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
                        VMRT_NETWORK_POOL="10.201.0.0/16",
                        # no background snapshot builds (a VM booting beside each test's own): the
                        # tests that want them set auto (tests/test_snapshot.py)
                        VMRT_SNAPSHOT="manual")
        self.env.pop("VMRT_ISOLATION", None)
        made.append(self)

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vmrt", *args]

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 180,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.cmd(*args), input=input, capture_output=True, timeout=timeout,
                              env={**self.env, **(env or {})},
                              stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        """The CLI in a process of its own, `track`ed: killed at the test's end if it still runs."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("stdin", subprocess.DEVNULL)
        env = {**self.env, **kw.pop("env", {})}  # type: ignore[dict-item]
        return track(subprocess.Popen(self.cmd(*args), env=env, **kw))  # type: ignore[call-overload]

    def wait_for_snapshot_builds(self, timeout: float = 300) -> None:
        """Until every background `vmrt snapshot build` of this vmrt (its state root in the
        environment) has ended: one is started before the run that starts it returns."""
        marker = f"VMRT_ROOT={self.root}".encode()
        deadline = time.monotonic() + timeout
        while True:
            builders = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"snapshot\0build\0" in cmd and marker in env:
                    builders.append(pid)
            if not builders:
                return
            assert time.monotonic() < deadline, f"the background snapshot build {builders} did not end"
            time.sleep(0.5)

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
        rw = self.root / "rw"  # writable layers (a VM's disk.img too) whose container is gone
        if rw.exists():
            kept = self._container_ids()
            found += [f"writable layer {p}" for p in rw.iterdir() if p.name not in kept]
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

    def _container_ids(self) -> set[str]:
        """The containers this vmrt has a record of (its state database, read-only)."""
        db = self.root / "state.db"
        if not db.exists():
            return set()
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return {row[0] for row in con.execute("SELECT id FROM containers")}
        except sqlite3.OperationalError:  # no such table: only images (or vmrt-runtime) used it so far
            return set()
        finally:
            con.close()

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

    def settle(self, timeout: float = 5.0) -> list[str]:
        """The leftovers once they stop going away by themselves (at most ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def assert_clean(self, timeout: float = 5.0) -> None:
        left = self.settle(timeout)
        assert not left, f"teardown left: {left}"

    # --- stopping what it runs -------------------------------------------------
    def remove_all(self) -> None:
        """Every container (running or not) and every user network of this vmrt, removed through
        its CLI: what a test may leave when it fails half way."""
        ids = self("ps", "-aq", timeout=60).stdout.decode().split()
        if ids:
            self("rm", "-f", *ids, timeout=300)
        for name in self("network", "ls", "--format", "{{.Name}}", timeout=60).stdout.decode().split():
            if name not in DEFAULT_NETWORKS:
                self("network", "rm", name, timeout=120)

    def sweep(self, started: Started | None = None) -> None:
        """Stop everything this vmrt still runs, so that the next test starts clean: through its
        CLI first (containers, user networks, the warm pool, snapshots: an attached run's CLI then
        ends by itself), then the processes the test ``started`` that still run, then by pid what
        is left of its own (QEMU, virtiofsd, anything in one of its containers' cgroups), its
        leftover mounts and cgroups, the CLI once more for what killed owners left (and a run that
        was still starting the first time), and a wait for the last of it to be reaped."""
        cdir = self.root / "containers"
        ids = set(os.listdir(cdir)) if cdir.is_dir() else set()  # before rm takes their dirs
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.remove_all()
            if (self.run_root / "pool" / "daemon.pid").exists():
                self("pool", "stop", timeout=120)
            snaps = self.root / "snapshots"
            if snaps.is_dir() and any(snaps.iterdir()):
                self("snapshot", "rm", timeout=120)
        if started is not None:
            started.stop()
        ids |= set(os.listdir(cdir)) if cdir.is_dir() else set()
        cgroups = [d for d in vmrt_cgroups() - self.cgroups_before if Path(d).name.removesuffix("-vmm") in ids]
        pids = self._leftover_pids(cgroups)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.05)
        marker = str(self.run_root)
        points = {ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()}
        for mp in sorted((p for p in points if p.startswith(marker)), key=len, reverse=True):  # deepest first
            subprocess.run(["umount", "-l", mp], capture_output=True)
        for d in cgroups:  # (one still in use is not empty: rmdir refuses it)
            with contextlib.suppress(OSError):
                os.rmdir(d)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.remove_all()  # ps reconciles what killed owners left; rm removes it
        # anti-spoofing chains a leak left (the leak failed its own test): with no container
        # left, vmrt's bridge table goes, and the next start writes it again
        if endpoint_rules(nft_table(self.root)):
            subprocess.run(["nft", "delete", "table", "bridge", nft_table(self.root)], capture_output=True)
        self.settle(10)  # an orphan killed above is a zombie until init reaps it

    def _leftover_pids(self, cgroups: list[str]) -> list[int]:
        """This vmrt's processes that should be gone: QEMU and virtiofsd of its run root, its jailed
        VMMs (pooled ones too), and whatever is in ``cgroups`` (its containers')."""
        marker = str(self.run_root).encode()
        pids = set(vmm_pids(self.run_root))
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if marker in cmd and (b"qemu" in cmd or b"virtiofsd" in cmd):
                    pids.add(int(pid))
        for d in cgroups:
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in Path(d, "cgroup.procs").read_text().split())
        pids.discard(os.getpid())
        return sorted(pids)

    def close(self) -> None:
        """At the end of a fixture that made this vmrt: anything it still runs is swept away."""
        if self.leftovers():
            self.sweep()


# set by conftest's pytest_runtest_makereport when a test's setup or call failed
FAILED = pytest.StashKey[bool]()


def failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test a fixture's teardown ends has failed (its setup or its call)."""
    return request.node.stash.get(FAILED, False)


def audit(v: Vmrt, *, failed: bool, started: Started | None = None, timeout: float = 5.0) -> None:
    """A test's (or a fixture's) end: the leak check; after a leak or a failed test, the processes
    the test started are killed and everything ``v`` runs is swept away, so that no later test
    inherits it; a leak still fails the test (raised after the sweep)."""
    left = v.settle(timeout)
    if left or failed:
        v.sweep(started)
    assert not left, f"teardown left: {left}"


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


def agent_walk(tmp_path: Path, rw: Path, content: bool) -> bytes:
    """guest-agent/walk.c's walk of ``rw``/upper (``content``: with the files' bytes, as for a
    build step; else metadata, as for docker diff), built here and run where the agent finds its
    writable layer (/run/vmrt/rw, in a mount namespace of its own): the raw stream. Needs root."""
    main = tmp_path / "walk_main.c"
    main.write_text(f'#include "agent.h"\nint main(void) {{ walk_upper({int(content)}); }}\n')
    exe = tmp_path / "walk"
    src = REPO / "guest-agent"
    r = subprocess.run(["gcc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", f"-I{src}",
                        f"-I{REPO / 'common'}", "-o", str(exe), str(main), str(src / "walk.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r2 = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs /run && mkdir -p /run/vmrt/rw && '
                         'mount --bind "$0" /run/vmrt/rw && exec "$1"', str(rw), str(exe)], capture_output=True)
    assert r2.returncode == 0, r2.stderr
    return r2.stdout
