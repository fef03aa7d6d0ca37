"""VM snapshots: restored clones differ; a corrupt snapshot is refused and the run cold-boots.

Real QEMU migration to a file and -incoming restores under TCG, the real agent (reseeding
its RNG from the host's SEED, setting clock and hostname). Each test removes the snapshots
it built (they live in the test's state root).
"""

from __future__ import annotations

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
    # a container of another shape, or with a bind volume, never restores one
    assert vmrt("snapshot", "build", "--force", timeout=300).returncode == 0
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "-m", "300m", "busybox", "true")
    assert r.returncode == 0 and restored_from(r.stderr) is None
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "-v", f"{tmp_path}:/data", "busybox", "true")
    assert r.returncode == 0 and restored_from(r.stderr) is None
    r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "true", env={"VMRT_SNAPSHOT": "off"})
    assert r.returncode == 0 and restored_from(r.stderr) is None
    vmrt.assert_clean()
