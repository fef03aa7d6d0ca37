"""VM snapshots: restored clones differ; a corrupt snapshot is refused and the run cold-boots.

Real QEMU migration to a file and -incoming restores under TCG, the real agent (reseeding
its RNG from the host's SEED, setting clock and hostname). Each test removes the snapshots
it built (they live in the test's state root).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from support import Vmrt

pytestmark = pytest.mark.vm


def restored_from(stderr: bytes) -> str | None:
    m = re.search(rb"snapshot=([0-9a-f]{16})", stderr)
    return m.group(1).decode() if m else None


def test_clones_of_one_snapshot_differ(vmrt: Vmrt, snap: Path) -> None:
    seen = []
    for i in range(3):
        r = vmrt("run", "--rm", "--timings", "--isolation=vm", "--hostname", f"clone{i}", "busybox", "sh", "-c",
                 "cat /proc/sys/kernel/random/boot_id; hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n';"
                 " echo; date +%s; cat /proc/sys/kernel/random/uuid")
        assert r.returncode == 0, r.stderr
        assert restored_from(r.stderr) == snap.name, r.stderr  # not a cold boot
        boot_id, host, rnd, now, uuid = r.stdout.decode().split()
        assert host == f"clone{i}"
        assert abs(int(now) - time.time()) < 60  # the clock was set, not the snapshot's
        seen.append((boot_id, rnd, uuid))
    for k in range(3):
        assert len({s[k] for s in seen}) == 3, seen  # boot id, random bytes, uuids: all different


def test_detached_restored_vm_with_exec(vmrt: Vmrt, snap: Path) -> None:
    r = vmrt("run", "-d", "--name", "restored-d", "--isolation=vm", "busybox", "sh", "-c", "echo up; sleep 600")
    assert r.returncode == 0, r.stderr
    try:
        qemu = int(vmrt("inspect", "-f", "{{.State.Pid}}", "restored-d").stdout)
        cmdline = Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")
        assert b"-incoming" in cmdline and any(a.startswith(b"virtio-9p-device") for a in cmdline)
        r = vmrt("exec", "restored-d", "sh", "-c", "echo in-exec; exit 4")
        assert (r.returncode, r.stdout) == (4, b"in-exec\n"), r.stderr
        assert vmrt("stop", "-t", "1", "restored-d").returncode == 0
        assert vmrt("logs", "restored-d").stdout == b"up\n"
    finally:
        vmrt("rm", "-f", "restored-d")
    vmrt.assert_clean()


def test_the_image_is_read_only_through_9p(vmrt: Vmrt, snap: Path) -> None:
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "sh", "-c",
             "echo new > /etc/new-file && cat /etc/new-file")
    assert restored_from(r.stderr) == snap.name
    assert r.returncode == 0 and r.stdout == b"new\n", r.stderr
    assert not list(vmrt.root.glob("layers/*/etc/new-file"))


def test_a_changed_ram_file_is_refused(vmrt: Vmrt, snap: Path) -> None:
    ram = snap / "ram"
    with open(ram, "r+b") as f:  # one byte of the saved guest memory
        f.seek(1 << 20)
        b = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([b[0] ^ 0xFF]))
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "echo", "cold")
    assert r.returncode == 0 and r.stdout == b"cold\n", r.stderr
    assert restored_from(r.stderr) is None
    assert b"refused (RAM file changed since it was saved): cold boot" in r.stderr


def test_corrupt_or_mismatched_snapshot_means_a_cold_boot(vmrt: Vmrt, snap: Path, tmp_path: Path) -> None:
    state = snap / "state"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "echo", "still runs")
    assert r.returncode == 0 and r.stdout == b"still runs\n", r.stderr
    assert restored_from(r.stderr) is None
    assert b"refused (state file does not match its checksum): cold boot" in r.stderr
    # a container of another shape never restores one; one with a bind volume does (issue 17)
    assert vmrt("snapshot", "build", "--force", timeout=300).returncode == 0
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "-m", "300m", "busybox", "true")
    assert r.returncode == 0 and restored_from(r.stderr) is None
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "-v", f"{tmp_path}:/data", "busybox", "true")
    assert r.returncode == 0 and restored_from(r.stderr) == snap.name, r.stderr
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "true", env={"VMRT_SNAPSHOT": "off"})
    assert r.returncode == 0 and restored_from(r.stderr) is None
    vmrt.assert_clean()


def test_a_run_without_a_snapshot_builds_one_for_the_next(vmrt: Vmrt) -> None:
    """Issue 17: the cache is always there. With snapshot = auto a VM run that finds no snapshot
    of its shape cold-boots and starts one build in the background; the next run restores it.
    The build prunes snapshots that no run can restore (another kernel) and dead builds' dirs."""
    auto = {"VMRT_SNAPSHOT": "auto"}
    snaps = vmrt.root / "snapshots"
    stale = snaps / "0123456789abcdef"  # a snapshot of a kernel that is gone
    stale.mkdir(parents=True)
    (stale / "meta.json").write_text(json.dumps({"format": 7, "shape": {
        "memory_mib": 256, "vcpus": 1, "machine": "microvm", "kernel": "/nonexistent/vmlinux",
        "initrd": "/nonexistent/initrd", "accel": "tcg", "cmdline": "", "nic": True, "disk": True}}))
    dead = snaps / "fedcba9876543210.tmp999999999"  # a build that died (no such pid)
    dead.mkdir()
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "echo", "first", env=auto)
    assert r.returncode == 0 and r.stdout == b"first\n", r.stderr
    assert b"snapshot=none:missing,building" in r.stderr, r.stderr
    vmrt.wait_for_snapshot_builds()
    keys = vmrt("snapshot", "ls", "--format", "{{.Key}}").stdout.decode().split()
    assert len(keys) == 1, (keys, (snaps / "build.log").read_text())
    assert not stale.exists() and not dead.exists()
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "echo", "second", env=auto)
    assert r.returncode == 0 and r.stdout == b"second\n", r.stderr
    assert restored_from(r.stderr) == keys[0], r.stderr
    # manual restores what is there and builds nothing; off restores nothing
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "-m", "200m", "busybox", "true")
    assert r.returncode == 0 and b"snapshot=none:missing " in r.stderr, r.stderr
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "true", env={"VMRT_SNAPSHOT": "off"})
    assert r.returncode == 0 and b"snapshot=none:off " in r.stderr, r.stderr
    assert not list(snaps.glob("*.tmp*"))
    assert vmrt("snapshot", "rm").returncode == 0
    assert not list(snaps.iterdir())
    vmrt.assert_clean()


def test_other_memory_and_cpus_get_their_own_snapshot(vmrt: Vmrt, tmp_path: Path) -> None:
    """A -m/--cpus shape is built in the background too, and restored from then on, with a
    writable bind volume too."""
    auto = {"VMRT_SNAPSHOT": "auto"}
    args = ("run", "--rm", "--timings", "--isolation=vm", "-m", "200m", "busybox", "sh", "-c",
            "grep MemTotal /proc/meminfo")
    r = vmrt(*args, env=auto)
    assert r.returncode == 0 and b"snapshot=none:missing,building" in r.stderr, r.stderr
    cold = r.stdout
    vmrt.wait_for_snapshot_builds()
    r = vmrt(*args, env=auto)
    assert r.returncode == 0 and restored_from(r.stderr) is not None, r.stderr
    assert r.stdout == cold  # the same guest memory as the cold boot's
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "-m", "200m", "-v", f"{tmp_path}:/data", "busybox",
             "sh", "-c", "echo written > /data/out", env=auto)
    assert r.returncode == 0 and restored_from(r.stderr) is not None, r.stderr
    assert (tmp_path / "out").read_text() == "written\n"
    assert vmrt("snapshot", "rm").returncode == 0
    vmrt.assert_clean()


def test_a_kernel_of_the_users_is_not_built_and_bad_settings_are_refused(vmrt: Vmrt, tmp_path: Path) -> None:
    from vmrt import config, kernel
    kpath = tmp_path / "vmlinux"  # the user's own kernel (a copy of the project's)
    kpath.write_bytes(kernel.find(config.load())[0].read_bytes())
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "--kernel", str(kpath), "busybox", "true",
             env={"VMRT_SNAPSHOT": "auto"})
    assert r.returncode == 0 and b"snapshot=none:missing,not-buildable" in r.stderr, r.stderr
    assert not list((vmrt.root / "snapshots").glob("*.building"))
    r = vmrt("run", "--rm", "--isolation=vm", "busybox", "true", env={"VMRT_SNAPSHOT": "sometimes"})
    assert r.returncode == 125 and b"snapshot 'sometimes': use auto, manual or off" in r.stderr, r.stderr
    vmrt.assert_clean()


def test_writable_volumes_are_served_from_the_cache(vmrt: Vmrt, snap: Path, tmp_path: Path) -> None:
    """Issue 17: a writable bind volume restores from the cache too: what the guest writes is
    the host's at once (as the guest's users), what the host writes the guest reads, and the
    image beside it stays read-only."""
    (tmp_path / "conf").write_text("one\n")
    tmp_path.chmod(0o777)  # for the guest's user 1234
    r = vmrt("run", "-d", "--isolation=vm", "--name", "rwvol", "-v", f"{tmp_path}:/data", "busybox", "sleep", "120")
    assert r.returncode == 0, r.stderr
    try:
        qemu = int(vmrt("inspect", "-f", "{{.State.Pid}}", "rwvol").stdout)
        assert b"-incoming" in Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")  # a clone
        r = vmrt("exec", "-u", "1234:5678", "rwvol", "sh", "-c", "echo guest > /data/new && mkdir /data/sub")
        assert r.returncode == 0, r.stderr
        st = (tmp_path / "new").stat()
        assert (tmp_path / "new").read_text() == "guest\n" and (st.st_uid, st.st_gid) == (1234, 5678)
        assert (tmp_path / "sub").is_dir()
        with open(tmp_path / "conf", "r+") as f:
            f.write("two\n")
        assert vmrt("exec", "rwvol", "cat", "/data/conf").stdout == b"two\n"
        assert vmrt("exec", "rwvol", "sh", "-c", "echo x >> /data/conf && rm /data/new").returncode == 0
        assert (tmp_path / "conf").read_text() == "two\nx\n" and not (tmp_path / "new").exists()
        # the rest of the share stays read-only beneath the guest's own overlay
        r = vmrt("exec", "rwvol", "sh", "-c", "echo x > /bin/busybox-new && echo ok")
        assert r.stdout == b"ok\n"  # the container's writable layer (its disk) ...
        layers = vmrt.root / "layers"
        assert not list(layers.rglob("busybox-new"))  # ... not the image
    finally:
        vmrt("rm", "-f", "rwvol")
    vmrt.assert_clean()


def test_read_only_volumes_are_served_from_the_cache_and_stay_live(vmrt: Vmrt, snap: Path, tmp_path: Path) -> None:
    """Issue 17: a read-only bind volume no longer means a cold boot; the clone reads it uncached
    (SHARE_FRESH), so what the host changes there while the container runs is what it reads."""
    (tmp_path / "conf").write_text("one\n")
    r = vmrt("run", "-d", "--isolation=vm", "--name", "rovol", "-v", f"{tmp_path}:/data:ro", "busybox", "sleep", "120")
    assert r.returncode == 0, r.stderr
    try:
        qemu = int(vmrt("inspect", "-f", "{{.State.Pid}}", "rovol").stdout)
        assert b"-incoming" in Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")  # a clone
        assert vmrt("exec", "rovol", "cat", "/data/conf").stdout == b"one\n"
        with open(tmp_path / "conf", "r+") as f:  # in place, as an editor that keeps the inode
            f.write("two\n")
        assert vmrt("exec", "rovol", "cat", "/data/conf").stdout == b"two\n"
        r = vmrt("exec", "rovol", "sh", "-c", "echo x > /data/new")
        assert r.returncode != 0 and not (tmp_path / "new").exists()
    finally:
        vmrt("rm", "-f", "rovol")
    vmrt.assert_clean()


def test_clone_memory_is_a_choice_inspect_shows(vmrt: Vmrt, snap: Path) -> None:
    """Issue 17 part 6: whether a clone's RAM pages are the snapshot's, shared with every other
    clone (a cross-tenant side channel), or a private copy: the vm_memory setting and
    --vm-memory per run; inspect shows what a container got. A jailed QEMU can only copy."""
    r = vmrt("run", "-d", "--isolation=vm", "--network", "none", "busybox", "sleep", "120")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        doc = json.loads(vmrt("inspect", cid).stdout)[0]
        assert doc["VM"] == {"Source": "snapshot", "Snapshot": snap.name, "Memory": "private"}, doc["VM"]
        assert doc["HostConfig"]["VMMemory"] == ""
    finally:
        assert vmrt("rm", "-f", cid).returncode == 0
    # refused in one line: shared under the jail, and anywhere in process mode, and a bad value
    for args, env, want in (
            (("--vm-memory", "shared", "--isolation=vm"), {}, b"--vm-memory shared needs vmm_jail = false"),
            (("--vm-memory", "private", "--isolation=process"), {}, b"--vm-memory is supported for --isolation=vm"),
            (("--isolation=vm",), {"VMRT_VM_MEMORY": "shared"}, b"vm_memory shared needs vmm_jail = false"),
            (("--isolation=vm",), {"VMRT_VM_MEMORY": "some"}, b"vm_memory 'some': use auto, shared or private")):
        r = vmrt("run", "--rm", *args, "busybox", "true", env=env)
        assert r.returncode == 125 and r.stderr.count(b"\n") == 1 and want in r.stderr, r.stderr


def test_an_unjailed_clone_maps_the_snapshots_ram_or_a_copy_as_asked(vmrt: Vmrt) -> None:
    """Unjailed, auto means shared: the clone maps the snapshot's RAM file itself; --vm-memory
    private copies it into the container's run dir first (gone with the container)."""
    unjailed = {"VMRT_VMM_JAIL": "0"}
    r = vmrt("snapshot", "build", timeout=300)
    assert r.returncode == 0, r.stderr
    jailed = Path(r.stdout.decode().split()[0])
    r = vmrt("snapshot", "build", env=unjailed, timeout=300)
    assert r.returncode == 0, r.stderr
    ram = Path(r.stdout.decode().split()[0]) / "ram"
    assert jailed.is_dir()  # a build prunes neither setting's snapshot (benchmarks/jail.py runs both)
    try:
        for mode, want in (("auto", "shared"), ("private", "private")):
            r = vmrt("run", "-d", "--isolation=vm", "--network", "none", "--vm-memory", mode, "busybox", "sleep",
                     "120", env=unjailed)
            assert r.returncode == 0, r.stderr
            cid = r.stdout.decode().strip()
            try:
                doc = json.loads(vmrt("inspect", cid).stdout)[0]
                assert doc["VM"]["Memory"] == want and doc["HostConfig"]["VMMemory"] == mode, doc
                maps = Path(f"/proc/{doc['State']['Pid']}/maps").read_text()
                copy = vmrt.run_root / "containers" / cid / "ram"
                assert (str(ram) in maps) == (want == "shared") and (str(copy) in maps) == (want == "private")
                assert vmrt("exec", cid, "echo", "up").stdout == b"up\n"
            finally:
                assert vmrt("rm", "-f", cid).returncode == 0
    finally:
        assert vmrt("snapshot", "rm", env=unjailed).returncode == 0
    vmrt.assert_clean()


def test_a_directory_opaque_in_a_layer_is_copied_up_through_9p(vmrt: Vmrt, snap: Path, tmp_path: Path) -> None:
    """A directory made over a whiteout in a build step is opaque in its layer (as apt's new
    directories are in Docker's and vmrt's builds). The host's overlay counts its hidden
    trusted.overlay.opaque in listxattr's size but lists nothing; 9p handed the guest a zero-filled
    list and the copy-up failed (EOPNOTSUPP). The file servers read no xattrs now: it is written."""
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN rm -rf /home/vmrt && mkdir -p /home/vmrt/sub\n")
    r = vmrt("build", "-q", "--isolation=process", "-t", "opaque:1", str(tmp_path))
    assert r.returncode == 0, r.stderr
    try:
        assert [p for p in vmrt.root.glob("layers/*/rootfs/home/vmrt") if "trusted.overlay.opaque" in
                os.listxattr(p)], "the step's layer has no opaque directory"
        for mode in ("vm", "process"):
            r = vmrt("run", "--rm", "--timings", f"--isolation={mode}", "opaque:1", "sh", "-c",
                     "touch /home/vmrt/f /home/vmrt/sub/g && ls /home/vmrt")
            assert mode == "process" or restored_from(r.stderr) == snap.name, r.stderr
            assert (r.returncode, r.stdout.split()) == (0, [b"f", b"sub"]), (mode, r.stderr)
    finally:
        vmrt("rmi", "-f", "opaque:1")
        vmrt("builder", "prune", "-a", "-f")
