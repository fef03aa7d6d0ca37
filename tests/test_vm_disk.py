"""A VM container's writable layer is a disk (vmrt/vm/disk.py): bounded by its size, not the
guest's RAM; kept across restarts, gone with the container; never read by the host.

Real QEMU under TCG; writes are kept small where the point allows (zeros, one random MiB).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from support import Vmrt, one_line_error, vmm_pids

pytestmark = pytest.mark.vm
VM = ("--isolation=vm",)
MIB = 1 << 20


def disk_of(v: Vmrt, name: str) -> Path:
    cid = v("inspect", "--format", "{{.Id}}", name).stdout.decode().strip()
    assert cid, name
    return v.root / "rw" / cid / "disk.img"


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_writes_past_the_guest_ram_and_reads_them_back(vmrt: Vmrt, tmp_path: Path) -> None:
    # -m 64m: a guest of 128 MiB, whose old tmpfs layer held at most 64. 12 copies of 16 random
    # MiB, each after its number (so no two blocks are alike), go to / and are read back: the
    # checksum is the host's of the same stream (no pipes in the guest: they crawl under TCG)
    seed = os.urandom(16 * MIB)
    (tmp_path / "seed").write_bytes(seed)
    want = hashlib.md5(b"".join(f"{i}\n".encode() + seed for i in range(12))).hexdigest()
    script = ("i=0; while [ $i -lt 12 ]; do echo $i; cat /in/seed; i=$((i+1)); done > /big && "
              "echo mine > /etc/hostname.new && rm /bin/uptime && "
              "grep MemTotal /proc/meminfo && ls -l /big && md5sum /big")
    r = vmrt("run", "--name", "big", *VM, "-m", "64m", "-v", f"{tmp_path}:/in:ro", "busybox", "sh", "-c", script,
             timeout=600)
    try:
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode().splitlines()
        mem_kib = int(out[0].split()[1])
        size = int(out[1].split()[4])
        assert size > 192 * MIB > mem_kib * 1024, out
        assert out[2].split()[0] == want, out  # read back from the disk as written
        disk = disk_of(vmrt, "big")
        assert allocated(disk) >= 192 * MIB  # on the host's disk, in the container's file
        assert os.stat(disk).st_mode & 0o777 == 0o600 and os.stat(disk.parent).st_mode & 0o777 == 0o700
        # the image is never written: a new container sees it as it was
        r = vmrt("run", "--rm", *VM, "busybox", "sh", "-c",
                 "test ! -e /etc/hostname.new && test ! -e /big && test -e /bin/uptime && echo pristine")
        assert r.stdout.decode().strip() == "pristine", (r.stdout, r.stderr)
    finally:
        assert vmrt("rm", "-f", "big").returncode == 0
    assert not disk.exists() and not disk.parent.exists()
    vmrt.assert_clean()


def test_storage_opt_size_bounds_the_layer(vmrt: Vmrt) -> None:
    r = vmrt("run", "--name", "small", *VM, "--storage-opt", "size=64m", "busybox", "sh", "-c",
             "df -k / | tail -1; dd if=/dev/zero of=/fill bs=1M count=100")
    try:
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert b"No space left on device" in r.stderr
        total_kib = int(r.stdout.split()[1])
        assert 40 * 1024 < total_kib <= 64 * 1024  # ext4's own metadata and journal take the rest
        disk = disk_of(vmrt, "small")
        assert os.stat(disk).st_size == 64 * MIB and allocated(disk) <= 64 * MIB
        host = json.loads(vmrt("inspect", "small").stdout)[0]["HostConfig"]
        assert host["StorageOpt"] == {"size": str(64 * MIB)}
    finally:
        assert vmrt("rm", "small").returncode == 0
    assert not disk.exists()
    vmrt.assert_clean()


@pytest.mark.parametrize("args, message", [
    (("--isolation=process", "--storage-opt", "size=1g"), "supported for --isolation=vm only"),
    (("--storage-opt", "dm.basesize=1g"), "unknown storage option 'dm.basesize'"),
    (("--storage-opt", "size"), "invalid storage option"),
    (("--storage-opt", "size=ten"), "invalid --storage-opt size 'ten'"),
    (("--storage-opt", "size=8m"), "below the minimum of 16m"),
    (("--storage-opt", "size=9000p"), "above the maximum of 16t"),   # once an OverflowError
    (("--storage-opt", "size=8000p"), "above the maximum of 16t"),   # once EFBIG at start
    (("--storage-opt", "size=16385g"), "above the maximum of 16t"),
])
def test_bad_storage_opts_are_one_line(vmrt: Vmrt, args: tuple[str, ...], message: str) -> None:
    for cmd in ("run", "create"):
        r = vmrt(cmd, "--rm", *args, "busybox", "true")
        assert r.returncode == 125
        assert message in one_line_error(r.stderr)
    assert not list((vmrt.root / "rw").glob("*/disk.img*"))


def test_the_layer_survives_restarts_and_goes_with_rm(vmrt: Vmrt) -> None:
    """As Docker keeps a container's writable layer across its restarts (the old tmpfs lost it)."""
    r = vmrt("run", "-d", "--name", "keep", *VM, "--storage-opt", "size=32m", "busybox", "sh", "-c",
             "echo start >> /starts; sleep 600")
    assert r.returncode == 0, r.stderr
    try:
        disk = disk_of(vmrt, "keep")
        assert vmrt("exec", "keep", "sh", "-c", "echo before > /mark").returncode == 0
        assert vmrt("restart", "-t", "1", "keep", timeout=300).returncode == 0
        assert vmrt("stop", "-t", "1", "keep", timeout=300).returncode == 0
        assert disk.exists()
        assert vmrt("start", "keep", timeout=300).returncode == 0
        # an I/O error (a full host file system) is the guest's EIO, never a paused VM
        cmds = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for p in vmm_pids(vmrt.run_root)]
        devs = [a for c in cmds for a in c if a.startswith(b"virtio-blk")]
        assert len(devs) == 1 and devs[0].endswith(b",werror=report,rerror=report"), devs
        r = vmrt("exec", "keep", "cat", "/mark", "/starts")
        assert r.stdout.decode().split() == ["before", "start", "start", "start"], r.stderr
    finally:
        assert vmrt("rm", "-f", "keep", timeout=300).returncode == 0
    assert not disk.exists()
    vmrt.assert_clean()


def test_a_start_killed_during_mkfs_leaves_no_half_formatted_disk(vmrt: Vmrt, tmp_path: Path) -> None:
    """mkfs works on disk.img.tmp, renamed disk.img once it succeeded: a start killed meanwhile
    (SIGKILL: no cleanup) leaves no disk.img that would pass as formatted and fail every start."""
    (tmp_path / "mkfs.ext4").write_text("#!/bin/sh\necho $$ > \"$0.started\"; exec sleep 60\n")
    (tmp_path / "mkfs.ext4").chmod(0o755)
    assert vmrt("create", "--name", "cut", *VM, "--storage-opt", "size=32m", "busybox", "echo", "up").returncode == 0
    try:
        p = vmrt.popen("start", "-a", "cut", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
        started, pid = tmp_path / "mkfs.ext4.started", ""
        deadline = time.monotonic() + 120
        while not pid.endswith("\n") and time.monotonic() < deadline:
            time.sleep(0.05)
            pid = started.read_text() if started.exists() else ""
        assert int(pid) > 1
        p.send_signal(signal.SIGKILL)
        p.wait()
        os.kill(int(pid), signal.SIGKILL)  # the stand-in mkfs
        disk = disk_of(vmrt, "cut")
        assert not disk.exists() and disk.with_name("disk.img.tmp").exists()
        r = vmrt("start", "-a", "cut", timeout=300)  # the real mkfs, on a new file
        assert r.returncode == 0 and r.stdout == b"up\n", r.stderr
        assert disk.exists() and not disk.with_name("disk.img.tmp").exists()
    finally:
        assert vmrt("rm", "-f", "cut", timeout=300).returncode == 0
    assert not disk.parent.exists()
    vmrt.assert_clean()


def test_garbage_on_the_raw_device_stays_in_the_guest(vmrt: Vmrt) -> None:
    """The container (root, CAP_MKNOD) overwrites its own disk raw, superblock included: the host
    never reads it, so nothing happens there; the next start fails in the guest with one line,
    and rm takes the file as always."""
    script = ("mknod /vdx b $(tr : ' ' < /sys/block/vda/dev) && "
              "dd if=/dev/urandom of=/vdx bs=64k count=16 conv=fsync 2>/dev/null && echo wrote")
    r = vmrt("run", "--name", "raw", *VM, "--storage-opt", "size=32m", "busybox", "sh", "-c", script)
    try:
        assert r.stdout.decode().split()[:1] == ["wrote"], (r.stdout, r.stderr)
        disk = disk_of(vmrt, "raw")
        assert os.stat(disk).st_size == 32 * MIB
        assert not [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(disk) in ln]
        r = vmrt("start", "-a", "raw", timeout=300)
        assert r.returncode == 125
        assert "cannot mount ext4 /dev/vda" in one_line_error(r.stderr)
    finally:
        assert vmrt("rm", "-f", "raw", timeout=300).returncode == 0
    assert not disk.exists()
    vmrt.assert_clean()


def test_a_restored_snapshot_gets_the_containers_disk(vmrt: Vmrt, snap: Path) -> None:
    """The snapshot's VM booted with an empty placeholder: the clone's QEMU opens the container's
    disk and block_resize tells the guest its capacity."""
    r = vmrt("run", "--rm", "--timings", *VM, "--storage-opt", "size=48m", "busybox", "sh", "-c",
             "cat /sys/block/vda/size; echo ok > /f; cat /f")
    assert r.returncode == 0, r.stderr
    assert f"snapshot={snap.name}".encode() in r.stderr and b"upper=disk 48m" in r.stderr
    assert r.stdout.decode().split() == [str(48 * MIB // 512), "ok"]
    vmrt.assert_clean()


def test_a_pooled_vm_gets_the_containers_disk(vmrt: Vmrt) -> None:
    """The pool daemon swaps the container's disk in at the claim (QMP blockdev-reopen)."""
    assert vmrt("pool", "start", "--size", "1").returncode == 0
    try:
        assert vmrt("pool", "fill", "--wait", timeout=300).returncode == 0
        r = vmrt("run", "--rm", "--timings", *VM, "--storage-opt", "size=40m", "busybox", "sh", "-c",
                 "cat /sys/block/vda/size; df -k / | tail -1")
        assert r.returncode == 0, r.stderr
        assert b"pool-claim" in r.stderr and b"upper=disk 40m" in r.stderr
        out = r.stdout.decode().split()
        assert out[0] == str(40 * MIB // 512) and int(out[2]) < 40 * 1024
    finally:
        assert vmrt("pool", "stop").returncode == 0
    vmrt.assert_clean()
