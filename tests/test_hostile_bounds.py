"""Bounded by default (issue 14, part 5), played as a hostile container would, in both modes.

* A container that prints without end holds at most max-file logs of max-size on the host
  (``--log-opt``, or the settings' default), ``vmrt logs`` still reads them (across rotations).
* The managed /etc/hosts, resolv.conf and hostname stay writable inside, but filling them fills
  a small tmpfs of the container's own, never the host's run root; names keep working for others.
* ``vmrt top``/``stats`` of a VM whose guest never answers end within the probe timeout.
* A ``:ro`` volume is read-only recursively: a mount under its source too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt, one_line_error

MODES = ["process", pytest.param("vm", marks=pytest.mark.vm)]
KIB = 1024
TMPFS_MAGIC = 0x01021994


@pytest.fixture
def vmrt(vmrt: Vmrt) -> Iterator[Vmrt]:
    """conftest's, plus: a failed test's containers and networks go before the leak check (conftest's
    fixture, which tears down after this one)."""
    yield vmrt
    vmrt.remove_all()


def detach(v: Vmrt, mode: str, *args: str, opts: tuple[str, ...] = (), env: dict[str, str] | None = None) -> str:
    r = v("run", "-d", f"--isolation={mode}", *opts, "busybox", *args, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def inspect(v: Vmrt, ref: str) -> dict:  # type: ignore[type-arg]
    r = v("inspect", ref)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]  # type: ignore[no-any-return]


def until(pred, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def log_files(v: Vmrt, cid: str) -> dict[str, int]:
    """The container's log files and their sizes (looked at again if one was rotated meanwhile)."""
    cdir = v.root / "containers" / cid
    while True:
        try:
            return {p.name: p.stat().st_size for p in cdir.glob("container.log*")}
        except FileNotFoundError:
            continue


# --- 1. logs: capped and rotated ---------------------------------------------------------------

@pytest.mark.parametrize("opts,message", [
    (("--log-opt", "max-size=0"), "positive"),
    (("--log-opt", "max-size=10x"), "max-size"),
    (("--log-opt", "max-file=0"), "max-file"),
    (("--log-opt", "max-file=two"), "max-file"),
    (("--log-opt", "max-size"), "KEY=VALUE"),
    (("--log-opt", "compress=true"), "unknown log opt"),
])
def test_bad_log_opts_are_one_line_errors(vmrt: Vmrt, opts: tuple[str, ...], message: str) -> None:
    r = vmrt("run", "--isolation=process", *opts, "busybox", "true")
    assert r.returncode == 125
    assert message in one_line_error(r.stderr)
    assert vmrt("ps", "-aq").stdout == b""  # nothing was created


@pytest.mark.parametrize("mode", MODES)
def test_endless_output_is_capped_and_rotated(vmrt: Vmrt, mode: str) -> None:
    """`yes` detached and `dd if=/dev/zero` attached, with max-size=100k and max-file=2: the
    host holds at most 2 files of 100 KiB; `logs --tail` still works; the container runs on."""
    opts = ("--log-opt", "max-size=100k", "--log-opt", "max-file=2")
    cid = detach(vmrt, mode, "yes", opts=opts)
    until(lambda: len(log_files(vmrt, cid)) == 2, 120, "a rotation")
    time.sleep(3)  # a few more seconds of output
    sizes = log_files(vmrt, cid)  # (container.log may be caught between its rename and its new one)
    assert set(sizes) <= {"container.log", "container.log.1"}, sizes
    assert sum(sizes.values()) <= 2 * 100 * KIB, sizes
    r = vmrt("logs", "--tail", "5", cid)
    assert r.returncode == 0 and r.stdout == b"y\n" * 5, r.stderr
    doc = inspect(vmrt, cid)
    assert doc["State"]["Running"], doc["State"]
    assert doc["HostConfig"]["LogConfig"] == {"Type": "json-file",
                                              "Config": {"max-size": "100k", "max-file": "2"}}
    # attached: the driver's tee writes the log (6.4 MB of NULs; each 16 KiB piece is one record)
    r = vmrt("run", f"--isolation={mode}", "--name", f"flood-{mode}", *opts, "busybox", "sh", "-c",
             "dd if=/dev/zero bs=64k count=100 2>/dev/null; echo end")
    assert r.returncode == 0 and r.stdout.endswith(b"end\n") and len(r.stdout) == 6553600 + 4, r.stderr
    sizes = log_files(vmrt, inspect(vmrt, f"flood-{mode}")["Id"])
    assert len(sizes) <= 2 and sum(sizes.values()) <= 2 * 100 * KIB, sizes
    assert vmrt("logs", "--tail", "1", f"flood-{mode}").stdout == b"end\n"
    for ref in (cid, f"flood-{mode}"):
        assert vmrt("rm", "-f", ref).returncode == 0
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_the_default_cap_applies_without_flags(vmrt: Vmrt, mode: str) -> None:
    env = {"VMRT_LOG_MAX_SIZE": "50k", "VMRT_LOG_MAX_FILE": "3"}
    cid = detach(vmrt, mode, "yes", env=env)
    until(lambda: len(log_files(vmrt, cid)) == 3, 120, "two rotations")
    time.sleep(2)
    sizes = log_files(vmrt, cid)  # (one may be caught between its rename and the next)
    assert set(sizes) <= {"container.log", "container.log.1", "container.log.2"}, sizes
    assert sum(sizes.values()) <= 3 * 50 * KIB, sizes
    # kept with the container: another default later does not change it
    assert inspect(vmrt, cid)["HostConfig"]["LogConfig"]["Config"] == {"max-size": "50k", "max-file": "3"}
    assert vmrt("rm", "-f", cid).returncode == 0
    vmrt.assert_clean()


def test_the_python_monitor_caps_too(vmrt: Vmrt, tmp_path: Path) -> None:
    """Without a built C monitor (an empty cache) the Python monitor stays resident: same cap."""
    env = {"VMRT_CACHE": str(tmp_path / "cache")}
    cid = detach(vmrt, "process", "yes", opts=("--log-opt", "max-size=20k", "--log-opt", "max-file=2"), env=env)
    pid = inspect(vmrt, cid)["State"]["MonitorPid"]
    assert not os.readlink(f"/proc/{pid}/exe").endswith("/vmrt-monitor")
    until(lambda: len(log_files(vmrt, cid)) == 2, 60, "a rotation")
    time.sleep(2)
    sizes = log_files(vmrt, cid)
    assert set(sizes) <= {"container.log", "container.log.1"} and sum(sizes.values()) <= 2 * 20 * KIB, sizes
    assert vmrt("logs", "--tail", "2", cid).stdout == b"y\ny\n"
    assert vmrt("rm", "-f", cid).returncode == 0
    vmrt.assert_clean()


def test_logs_follow_reads_across_rotations(vmrt: Vmrt) -> None:
    """`logs -f` from the start of a container whose log rotates every ~70 lines: every line, in
    order, once (the reader keeps up: the output is paced), and it ends with the container."""
    cid = detach(vmrt, "process", "sh", "-c",
                 "sleep 1; i=0; while [ $i -lt 2000 ]; do echo $i; i=$((i+1)); "
                 "[ $((i % 50)) = 0 ] && sleep 0.05; done",
                 opts=("--log-opt", "max-size=4k", "--log-opt", "max-file=3"))
    r = vmrt("logs", "-f", cid, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == [str(i) for i in range(2000)]
    assert len(log_files(vmrt, cid)) == 3
    r = vmrt("logs", cid)  # what is kept: the last three files, oldest first
    seen = [int(x) for x in r.stdout.split()]
    assert seen == list(range(seen[0], 2000)) and seen[0] > 0
    assert vmrt("rm", "-f", cid).returncode == 0
    vmrt.assert_clean()


# --- 2. managed /etc files: a small tmpfs of their own ------------------------------------------

FILL = ("for f in /etc/hosts /etc/resolv.conf /etc/hostname; do "
        "dd if=/dev/zero of=$f bs=1M count=100 2>/tmp/err; echo \"$f rc=$?\"; "
        "grep -q 'No space left on device' /tmp/err && echo \"$f ENOSPC\"; done; echo filled; sleep 300")


@pytest.mark.parametrize("mode", MODES)
def test_managed_files_cannot_fill_the_run_root(vmrt: Vmrt, mode: str) -> None:
    """From inside, 100 MiB into /etc/hosts (and resolv.conf, hostname) ends in ENOSPC within the
    container's 256 KiB; the host's run root keeps its free space; names on the user network still
    work for the other containers."""
    assert vmrt("network", "create", "boundnet").returncode == 0
    peer = detach(vmrt, "process", "sleep", "300", opts=("--network", "boundnet", "--name", "peer"))
    vmrt.run_root.mkdir(parents=True, exist_ok=True)
    before = os.statvfs(vmrt.run_root)
    cid = detach(vmrt, mode, "sh", "-c", FILL, opts=("--network", "boundnet", "--name", "filler"))
    until(lambda: b"filled" in vmrt("logs", cid).stdout, 120, "the writes")
    out = vmrt("logs", cid).stdout.decode()
    for f in ("hosts", "resolv.conf", "hostname"):
        assert f"/etc/{f} ENOSPC" in out.splitlines() and f"/etc/{f} rc=0" not in out, out
    after = os.statvfs(vmrt.run_root)
    dropped = (before.f_bavail - after.f_bavail) * after.f_frsize
    assert dropped < 32 << 20, f"the run root lost {dropped >> 20} MiB"  # 300 MiB were written
    fdir = vmrt.run_root / "containers" / cid / "net"
    fs = os.statvfs(fdir)
    assert fs.f_blocks * fs.f_frsize <= 256 * KIB
    assert all((fdir / f).stat().st_size <= 256 * KIB for f in ("hosts", "resolv.conf", "hostname"))
    # names still work for the others: a newcomer finds both, the peer has the filler's name
    r = vmrt("run", "--rm", "--isolation=process", "--network", "boundnet", "--name", "newcomer", "busybox",
             "sh", "-c", "grep -qw peer /etc/hosts && ping -c1 -W5 peer >/dev/null && echo ok; "
                         "grep -cw filler /etc/hosts")
    assert r.stdout.split() == [b"ok", b"1"], r.stderr
    r = vmrt("exec", peer, "grep", "-c", "filler", "/etc/hosts")
    assert r.stdout == b"1\n", r.stderr
    for ref in (cid, peer):
        assert vmrt("rm", "-f", ref).returncode == 0
    assert vmrt("network", "rm", "boundnet").returncode == 0
    vmrt.assert_clean()


# --- 3. stats/top of a guest that never answers -------------------------------------------------

@pytest.mark.vm
def test_top_and_stats_time_out_on_a_stopped_vm(vmrt: Vmrt) -> None:
    cid = detach(vmrt, "vm", "sleep", "300", opts=("--network", "none"))
    env = {"VMRT_TIMEOUT_PROBE_EXEC": "2"}
    r = vmrt("top", cid, env=env)
    assert r.returncode == 0 and b"sleep" in r.stdout, r.stderr
    qemu = inspect(vmrt, cid)["State"]["Pid"]
    os.kill(qemu, signal.SIGSTOP)  # the guest never answers (well under agent_dead: not killed as hung)
    try:
        t0 = time.monotonic()
        r = vmrt("top", cid, env=env)
        took = time.monotonic() - t0
        assert r.returncode == 125 and "timed out" in one_line_error(r.stderr), r.stderr
        assert took < 8, took
        t0 = time.monotonic()
        r = vmrt("stats", "--no-stream", "--format", "{{.Name}} {{.GuestMem}}", cid, env=env)
        assert r.returncode == 0 and r.stdout.split()[1:] == [b"--"], r.stdout
        assert time.monotonic() - t0 < 8
    finally:
        os.kill(qemu, signal.SIGCONT)
    until(lambda: b"sleep" in vmrt("top", cid, env=env).stdout, 30, "top to work again")
    r = vmrt("stats", "--no-stream", "--format", "{{.GuestMem}}", cid)
    assert r.returncode == 0 and r.stdout.strip() != b"--", r.stdout
    assert inspect(vmrt, cid)["State"]["Running"]
    assert vmrt("rm", "-f", cid).returncode == 0
    vmrt.assert_clean()


# --- 4. :ro is recursive ---------------------------------------------------------------------

@pytest.fixture
def tree_with_submount(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "D"
    (d / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d / "sub")], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d / "sub")], check=False)


WRITE = ("touch /v/x 2>/dev/null; echo top=$?; touch /v/sub/x 2>/dev/null; echo sub=$?; "
         "mkdir /v/sub/d 2>/dev/null; echo mkdir=$?")


@pytest.mark.parametrize("mode", MODES)
def test_ro_volume_is_read_only_recursively(vmrt: Vmrt, mode: str, tree_with_submount: Path) -> None:
    d = tree_with_submount
    r = vmrt("run", "--rm", f"--isolation={mode}", "--network", "none", "-v", f"{d}:/v:ro", "busybox", "sh", "-c",
             WRITE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"top=1", b"sub=1", b"mkdir=1"], r.stdout
    assert sorted(os.listdir(d)) == ["sub"] and os.listdir(d / "sub") == []
    # the same tree read-write: the submount is writable (so the above is the :ro at work)
    r = vmrt("run", "--rm", f"--isolation={mode}", "--network", "none", "-v", f"{d}:/v", "busybox", "sh", "-c",
             "touch /v/sub/x && echo wrote")
    assert r.stdout == b"wrote\n", r.stderr
    assert os.listdir(d / "sub") == ["x"]
    vmrt.assert_clean()


@pytest.mark.vm
def test_vm_share_of_a_ro_volume_is_read_only_on_the_host(vmrt: Vmrt, tree_with_submount: Path) -> None:
    """VM mode: what virtiofsd serves of a :ro volume, submount included, is read-only on the host
    too (a guest that got around its own read-only mount still cannot write)."""
    d = tree_with_submount
    cid = detach(vmrt, "vm", "sleep", "300", opts=("--network", "none", "-v", f"{d}:/v:ro"))
    vol = str(vmrt.run_root / "containers" / cid / "share" / "volumes" / "0")  # the first user volume
    shared = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    points = {m[4]: m[5] for m in shared if m[4] == vol or m[4].startswith(vol + "/")}
    assert set(points) == {vol, vol + "/sub"}, points
    assert all("ro" in opts.split(",") for opts in points.values()), points
    assert vmrt("rm", "-f", cid).returncode == 0
    vmrt.assert_clean()
