"""The VMM jail (issue 14 part 4): QEMU runs without root's power, and what it could reach if
a guest took it over is nothing of the host's or of another tenant's.

Real jailed QEMUs (cold, restored from a snapshot, taken from the pool) are inspected through
/proc; then a static busybox shell is started in exactly the jail a QEMU gets (same code,
same mounts, same uid drop) and plays a QEMU that a guest has compromised. No exploit is run:
the shell simply tries, as that process, what such an attacker would try.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import CGROUP_PARENT, Vmrt, vmm_pids

from vmrt.vm import jail as jail_mod

pytestmark = pytest.mark.vm
JAIL_UID_BASE = 0x40000000
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}


def memory_cgroup(pid: int) -> str:
    for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrl, path = ln.split(":", 2)
        if "memory" in ctrl.split(",") or (ctrl == "" and ln.startswith("0::")):
            return path
    return ""


@contextmanager
def detached_vm(v: Vmrt, *args: str) -> Iterator[tuple[str, int]]:
    r = v("run", "-d", "--isolation=vm", "--network", "none", *args, "busybox", "sleep", "300", timeout=300)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        pid = int(v("inspect", "--format", "{{.State.Pid}}", cid).stdout)
        assert pid in vmm_pids(v.run_root)
        yield cid, pid
    finally:
        assert v("rm", "-f", cid).returncode == 0


def assert_jailed(v: Vmrt, cid: str, pid: int) -> None:
    st = status(pid)
    uid = int(st["Uid"].split()[0])
    assert uid >= JAIL_UID_BASE and set(st["Uid"].split()) == {str(uid)}, st["Uid"]
    assert set(st["Gid"].split()) == {str(uid)} and st["Groups"] == "", (st["Gid"], st["Groups"])
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap], 16) == 0, (cap, st[cap])
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    assert os.readlink(f"/proc/{pid}/root") == str(v.run_root / "jail")
    for ns in ("mnt", "net", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"Max open files\s+4096\s+4096", limits), limits
    # no file it writes grows past its RAM or its disk (vm/disk.py: the default 10 GiB here)
    assert re.search(rf"Max file size\s+{10 << 30}\s+{10 << 30}\s+bytes", limits), limits
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    i = cmd.index(b"-sandbox")
    assert cmd[i + 1] == b"on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    # nothing of vmrt's state reaches it by path: every file it has open is in its jail, a
    # socket, a pipe, a tap, an anonymous file, its own log or its container's disk (an fd vmrt
    # opened for it)
    disk = str(v.root / "rw" / cid / "disk.img")
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        assert not target.startswith((str(v.root), "/var/lib/vmrt")) or target.endswith(".log") or target == disk, \
            target
    # it joined the container's own cgroup before it started, with the file server
    group = memory_cgroup(pid)
    assert group == f"/{CGROUP_PARENT}/{cid}-vmm", group


def test_a_cold_vms_qemu_and_virtiofsd_are_jailed_and_bounded(vmrt: Vmrt, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    with detached_vm(vmrt, "-v", f"{vol}:/v") as (cid, pid):
        assert_jailed(vmrt, cid, pid)
        # the jail's root holds only what QEMU needs (read as root, from outside)
        assert sorted(os.listdir(f"/proc/{pid}/root")) == sorted(
            {"usr", "dev", "etc", "kernel", "initrd", *[n for n in jail_mod.ROOT_LINKS if os.path.islink("/" + n)]})
        assert sorted(os.listdir(f"/proc/{pid}/root/dev")) == ["null", "random", "urandom", "zero"]
        # virtiofsd: in the same cgroup from its start, without mknod/setfcap/fsetid, bounded fds
        vfs = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
               if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/usr/lib/qemu/virtiofsd")
               and cid[:16].encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert vfs, "no virtiofsd"
        for p in vfs:
            assert memory_cgroup(p) == f"/{CGROUP_PARENT}/{cid}-vmm"
            assert re.search(r"Max open files\s+(\d+)", Path(f"/proc/{p}/limits").read_text())
            eff = int(status(p)["CapEff"], 16)
            for cap in (27, 31, 4):  # CAP_MKNOD, CAP_SETFCAP, CAP_FSETID
                assert not eff & (1 << cap), (p, hex(eff))
            assert status(p)["Seccomp"] == "2"
        assert_no_privileged_files(vmrt, cid, vol)
        # QEMU's own output lands on a small tmpfs, never on the host's /run itself
        mounts = Path("/proc/self/mountinfo").read_text()
        run_dir = next(ln.split()[4] for ln in mounts.splitlines() if ln.split()[4].endswith(f"{cid}/vmm"))
        assert os.statvfs(run_dir).f_blocks * os.statvfs(run_dir).f_frsize <= 2 << 20


# what a guest's root tries in a writable volume: plain files and owners work, privileged files do not
GUEST_TRIES = ("cd /v && echo data > f && chown 1000:1000 f && mkdir d && mkfifo p && "
               "for t in 'chmod u+s f' 'chmod g+s f' 'chmod g+s d' 'mknod mem c 1 1' 'mknod sda b 8 0' "
               "'install -m 4755 f suid' 'mknod reg p'; do if $t 2>/dev/null; then echo \"$t: ALLOWED\"; fi; done; "
               "echo done")


def assert_no_privileged_files(v: Vmrt, cid: str, vol: Path) -> None:
    """The guest's root, through the file server (virtiofsd, or a clone's proxy helper) into a
    writable volume: it writes files as their owners, but leaves no setuid/setgid file and no
    device node on the host (the file servers' seccomp filter, vmrt/seccomp.py)."""
    r = v("exec", cid, "sh", "-c", GUEST_TRIES)
    # only the fifo is allowed
    assert r.stdout == b"mknod reg p: ALLOWED\ndone\n", (r.stdout, r.stderr)
    assert (vol / "f").read_text() == "data\n" and (vol / "f").stat().st_uid == 1000
    for p in vol.rglob("*"):
        st = p.lstat()
        assert not st.st_mode & 0o6000 and not stat.S_ISCHR(st.st_mode) and not stat.S_ISBLK(st.st_mode), \
            (p, oct(st.st_mode))


def test_a_snapshot_clone_is_jailed_and_never_writes_the_shared_ram(vmrt: Vmrt, snap: Path) -> None:
    ram = snap / "ram"
    st = ram.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o400)
    before = hashlib.sha256(ram.read_bytes()).hexdigest()
    with detached_vm(vmrt) as (cid, pid):
        assert_jailed(vmrt, cid, pid)
        # its RAM is its own copy in its jail: the snapshot's file is neither mapped nor open
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert f"{vmrt.run_root}/jail/ram" in maps and str(ram) not in maps
        assert all(os.stat(f"/proc/{pid}/fd/{fd}").st_ino != st.st_ino for fd in os.listdir(f"/proc/{pid}/fd"))
        # the clone writes its memory (a page cache full of a new file) ...
        r = vmrt("exec", cid, "sh", "-c", "dd if=/dev/urandom of=/tmp/x bs=1M count=8 2>/dev/null; echo done")
        assert r.stdout.strip() == b"done", r.stderr
        # ... and its 9p share is served by the proxy helper (root's files: QEMU cannot open them)
        helpers = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                   if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/usr/lib/qemu/virtfs-proxy-helper")
                   and memory_cgroup(p) == f"/{CGROUP_PARENT}/{cid}-vmm"]
        assert len(helpers) == 1
    assert hashlib.sha256(ram.read_bytes()).hexdigest() == before
    assert ram.stat().st_mtime_ns == st.st_mtime_ns


def test_a_clones_writable_volume_is_served_by_a_confined_helper(vmrt: Vmrt, snap: Path, tmp_path: Path) -> None:
    """Issue 17: a writable volume is served from the cache too. The proxy helper, which writes
    it as the guest's users, runs under the file servers' seccomp filter."""
    vol = tmp_path / "vol"
    vol.mkdir()
    with detached_vm(vmrt, "-v", f"{vol}:/v") as (cid, pid):
        assert b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")  # a clone
        helpers = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                   if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/usr/lib/qemu/virtfs-proxy-helper")
                   and memory_cgroup(p) == f"/{CGROUP_PARENT}/{cid}-vmm"]
        assert len(helpers) == 1 and status(helpers[0])["Seccomp"] == "2"
        assert_no_privileged_files(vmrt, cid, vol)


def test_a_pooled_vms_cgroup_becomes_the_containers_with_its_charges(vmrt: Vmrt) -> None:
    assert vmrt("pool", "start", "--size", "1").returncode == 0
    try:
        r = vmrt("pool", "fill", "--wait", timeout=300)
        assert r.returncode == 0, r.stderr
        v1 = not Path("/sys/fs/cgroup/cgroup.controllers").exists()
        parent = Path("/sys/fs/cgroup") / ("memory" if v1 else "") / CGROUP_PARENT
        idle = set(parent.glob("pool-*"))
        assert len(idle) == 1
        with detached_vm(vmrt) as (cid, pid):
            assert json.loads(vmrt("pool", "--format", "json").stdout)["Served"] == 1  # it took the pooled VM
            assert_jailed(vmrt, cid, pid)
            d = parent / f"{cid}-vmm"
            used = int((d / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
            # the booted guest's memory (charged while it was the pool's) came along with the rename
            assert used > 32 << 20, used
            assert not any(p.exists() for p in idle)  # renamed, not emptied
    finally:
        assert vmrt("pool", "stop").returncode == 0


# --- a compromised QEMU: a shell in exactly the jail a QEMU gets ------------------------------
PROBE = r"""
try() { if "$@" >/dev/null 2>&1; then echo "$*: ALLOWED"; else echo "$*: denied"; fi; }
echo "id=$(id -u):$(id -g)"
echo "root=$(ls / | tr '\n' ' ')"
try ls /proc/1
try cat STATE_DB
try ls CONTAINERS
try cat /etc/shadow
try sh -c 'echo x >> /kernel'
try sh -c 'echo x > /newfile'
try mknod /dev/mem2 c 1 1
try mount -t proc proc /usr
try chroot /usr /bin/true
try kill -0 1
try nc -w 2 127.0.0.1 HOSTPORT
try sh -c 'echo x > /ram'
try sh -c 'head -c 4096 /ram >/dev/null'
"""


def test_a_compromised_vmm_reaches_nothing_of_the_host(vmrt: Vmrt, tmp_path: Path) -> None:
    """A shell in QEMU's jail, as QEMU's uid: the host's /proc, vmrt's state, other tenants'
    dirs, host files and devices are not there; the kernel it boots is read-only; it cannot
    mount, chroot, make devices, signal host processes or reach the host's loopback. Its /ram
    (a clone's) is its own."""
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"\x7fELF not really")
    kernel.chmod(0o644)
    ram = tmp_path / "snapram"
    ram.write_bytes(os.urandom(8192))
    ram.chmod(0o400)
    before = ram.read_bytes()
    j = jail_mod.Jail(mountpoint=vmrt.run_root / "jail", uid_base=JAIL_UID_BASE, cgroup_procs=[],
                      files={"kernel": kernel, "initrd": kernel})
    (vmrt.run_root / "jail").mkdir(mode=0o700, exist_ok=True)
    fd = os.open(ram, os.O_RDONLY)
    j.ram_copy = (fd, 8192)
    listener = socket.socket()  # a service on the host's loopback: not in the jail's network
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    script = PROBE.replace("STATE_DB", str(vmrt.root / "state.db")).replace("CONTAINERS", str(vmrt.root / "containers"))
    port = listener.getsockname()[1]
    script = script.replace("HOSTPORT", str(port))
    out = tmp_path / "out"
    with open(out, "wb") as f:
        p = jail_mod.spawn([BUSYBOX, "sh", "-c", script], j, stderr=f.fileno())
    os.close(fd)
    assert p.wait(timeout=60) == 0
    listener.close()
    text = out.read_text()
    res = dict(ln.split(": ", 1) for ln in text.splitlines() if ": " in ln)
    uid = int(text.split("id=")[1].split(":")[0])
    assert uid >= JAIL_UID_BASE, text
    assert set(text.split("root=")[1].splitlines()[0].split()) <= {
        "usr", "dev", "etc", "kernel", "initrd", "ram", *jail_mod.ROOT_LINKS}, text
    for probe in ("ls /proc/1", f"cat {vmrt.root / 'state.db'}", f"ls {vmrt.root / 'containers'}", "cat /etc/shadow",
                  "sh -c echo x >> /kernel", "sh -c echo x > /newfile", "mknod /dev/mem2 c 1 1",
                  "mount -t proc proc /usr", "chroot /usr /bin/true", "kill -0 1",
                  f"nc -w 2 127.0.0.1 {port}"):
        assert res.get(probe) == "denied", (probe, text)
    # its /ram is a private copy it owns and writes; the file it was copied from never changes
    assert res.get("sh -c echo x > /ram") == "ALLOWED" and res.get("sh -c head -c 4096 /ram >/dev/null") == "ALLOWED"
    assert ram.read_bytes() == before
    assert kernel.read_bytes() == b"\x7fELF not really"
    # nothing of the jail is left on the host: its tmpfs lived in its own mount namespace
    assert not os.listdir(vmrt.run_root / "jail")
    assert str(vmrt.run_root / "jail") not in Path("/proc/self/mountinfo").read_text()


def test_no_jailed_process_outlives_a_killed_owner(vmrt: Vmrt) -> None:
    """vmrt SIGKILLed while its VM runs: the jailed QEMU dies with it (its parent-death
    signal is set after the change of uid, which clears it)."""
    p = vmrt.popen("run", "--isolation=vm", "--network", "none", "busybox", "sh", "-c", "echo up; sleep 300")
    assert p.stdout is not None
    assert p.stdout.readline() == b"up\n"
    assert len(vmm_pids(vmrt.run_root)) == 1
    p.kill()
    p.wait()
    deadline = time.monotonic() + 10
    while vmm_pids(vmrt.run_root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not vmm_pids(vmrt.run_root)
    r = vmrt("ps", "-aq")  # reconciles the lost owner's container
    for cid in r.stdout.decode().split():
        assert vmrt("rm", "-f", cid).returncode == 0
