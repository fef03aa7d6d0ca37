"""The warm pool: pre-booted VMs serve `vmrt run` (attached and detached), each exactly once.

Real pool daemon, real QEMU/virtiofsd under TCG. Every test stops its pool, and the leak
check then also covers the pool's own directories and cgroups.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt

from vmrt.pool.files import SOCK_NAME
from vmrt.proc import connect_unix

pytestmark = pytest.mark.vm


def pool_status(v: Vmrt) -> dict:  # type: ignore[type-arg]
    r = v("pool", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def served_by(stderr: bytes) -> str | None:
    """The pooled VM a `run --timings` took (None: cold boot)."""
    m = re.search(rb"pool=([0-9a-f]{12})", stderr)
    return m.group(1).decode() if m and b"pool-claim" in stderr else None


@pytest.fixture
def pooled(vmrt: Vmrt) -> Iterator[Vmrt]:
    r = vmrt("pool", "start", "--size", "1")
    assert r.returncode == 0, r.stderr
    try:
        r = vmrt("pool", "fill", "--wait", timeout=300)
        assert r.returncode == 0, r.stderr
        yield vmrt
    finally:
        r = vmrt("pool", "stop")
        assert r.returncode == 0, r.stderr
    assert not [p for p in (vmrt.run_root / "pool").iterdir() if p.name != "daemon.log"]


def test_runs_take_a_pooled_vm_once_each(pooled: Vmrt) -> None:
    v = pooled
    ids = []
    boot_ids = set()
    for _ in range(2):
        r = v("run", "--rm", "--timings", "--isolation=vm", "busybox", "sh", "-c",
              "cat /proc/sys/kernel/random/boot_id; echo ok > /tmp/f; cat /tmp/f")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.decode().split()
        assert lines[1] == "ok"
        boot_ids.add(lines[0])
        ids.append(served_by(r.stderr))
        assert v("pool", "fill", "--wait", timeout=300).returncode == 0
    assert None not in ids and ids[0] != ids[1]  # a fresh VM each time: never reused
    assert len(boot_ids) == 2
    st = pool_status(v)
    assert st["Served"] == 2 and st["Ready"] == 1


def test_detached_run_on_a_pooled_vm(pooled: Vmrt) -> None:
    v = pooled
    r = v("run", "-d", "--name", "pooled-d", "--isolation=vm", "busybox", "sh", "-c", "echo up; sleep 600")
    assert r.returncode == 0, r.stderr
    assert pool_status(v)["Served"] == 1
    r = v("exec", "pooled-d", "sh", "-c", "echo in-exec; exit 3")  # exec ports of the pooled VM
    assert (r.returncode, r.stdout) == (3, b"in-exec\n"), r.stderr
    pid = int(v("inspect", "-f", "{{.State.MonitorPid}}", "pooled-d").stdout)
    assert os.readlink(f"/proc/{pid}/exe").endswith("/vmrt-monitor")
    qemu = int(v("inspect", "-f", "{{.State.Pid}}", "pooled-d").stdout)
    assert v("stop", "-t", "1", "pooled-d").returncode == 0
    assert v("wait", "pooled-d").stdout == b"137\n"
    assert b"up\n" == v("logs", "pooled-d").stdout
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{qemu}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{qemu}")  # the VM went with its container
    assert v("rm", "pooled-d").returncode == 0


def test_shape_mismatch_and_read_only_volumes_cold_boot(pooled: Vmrt, tmp_path: Path) -> None:
    v = pooled
    r = v("run", "--rm", "--timings", "--isolation=vm", "-m", "300m", "busybox", "true")
    assert r.returncode == 0, r.stderr
    assert served_by(r.stderr) is None  # another memory size: another shape
    (tmp_path / "f").write_text("data\n")
    r = v("run", "--rm", "--timings", "--isolation=vm", "-v", f"{tmp_path}:/data:ro", "busybox",
          "sh", "-c", "cat /data/f; echo x > /data/g")
    assert r.returncode != 0 and r.stdout == b"data\n"
    assert served_by(r.stderr) is None  # read-only volumes are done by a cold boot
    assert not (tmp_path / "g").exists()
    r = v("run", "--rm", "--timings", "--isolation=vm", "-v", f"{tmp_path}:/data", "busybox",
          "sh", "-c", "cat /data/f; echo x > /data/g")
    assert r.returncode == 0 and r.stdout == b"data\n", r.stderr
    assert served_by(r.stderr) is not None  # a writable volume is fine in a pooled VM
    assert (tmp_path / "g").read_text() == "x\n"
    assert pool_status(v)["Served"] == 1
    r = v("run", "--rm", "--timings", "--isolation=vm", "busybox", "true", env={"VMRT_POOL": "off"})
    assert r.returncode == 0 and served_by(r.stderr) is None


def test_pooled_vms_are_restored_from_the_snapshot(vmrt: Vmrt, snap: Path, tmp_path: Path) -> None:
    """Issue 17 part 1: with a snapshot of its shape, the pool restores its VMs (a 9p share the
    proxy helper serves) rather than booting them. A restored VM's export is read-only, so a
    run with a writable volume restores a VM of its own instead of taking it."""
    assert vmrt("pool", "start", "--size", "1").returncode == 0
    try:
        assert vmrt("pool", "fill", "--wait", timeout=300).returncode == 0
        r = vmrt("run", "-d", "--name", "pclone", "--isolation=vm", "busybox", "sleep", "600")
        assert r.returncode == 0, r.stderr
        doc = json.loads(vmrt("inspect", "pclone").stdout)[0]
        assert doc["VM"] == {"Source": "pool", "Snapshot": snap.name, "Memory": "private"}, doc["VM"]
        assert b"-incoming" in Path(f"/proc/{doc['State']['Pid']}/cmdline").read_bytes().split(b"\0")
        r = vmrt("exec", "pclone", "sh", "-c", "echo in > /tmp/f && cat /tmp/f /etc/hostname")
        assert r.stdout == f"in\n{doc['Config']['Hostname']}\n".encode(), r.stderr
        assert vmrt("rm", "-f", "pclone").returncode == 0
        assert vmrt("pool", "fill", "--wait", timeout=300).returncode == 0
        r = vmrt("run", "--rm", "--timings", "--isolation=vm", "-v", f"{tmp_path}:/data", "busybox", "sh", "-c",
                 "echo w > /data/f")
        assert r.returncode == 0 and served_by(r.stderr) is None, r.stderr
        assert f"snapshot={snap.name}".encode() in r.stderr and (tmp_path / "f").read_text() == "w\n"
        assert pool_status(vmrt)["Served"] == 1
    finally:
        assert vmrt("pool", "stop").returncode == 0
    vmrt.assert_clean()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def test_the_image_is_read_only_where_virtiofsd_serves_it(pooled: Vmrt) -> None:
    """The rootfs reaches a pooled VM's virtiofsd by mount propagation (it is mounted after the
    VM booted): it must be read-only in virtiofsd's own mount namespace too, not only on the
    host (an overlay without upper dir; a bind's read-only flag would come too late)."""
    r = pooled("run", "-d", "--name", "ro-check", "--isolation=vm", "busybox", "sleep", "600")
    assert r.returncode == 0, r.stderr
    try:
        cid = pooled("inspect", "-f", "{{.Id}}", "ro-check").stdout.decode().strip()
        run_dir = pooled.run_root / "containers" / cid
        pids = json.loads((run_dir / "vm" / "pids.json").read_text())
        served = _children(pids["virtiofsd"])  # the sandboxed server, in its namespace
        assert served, "virtiofsd has no sandboxed child"
        mounts = Path(f"/proc/{served[0]}/mountinfo").read_text().splitlines()
        rootfs = [ln for ln in mounts if ln.split()[4] == "/rootfs"]
        assert rootfs, mounts
        assert "ro" in rootfs[0].split()[5].split(","), rootfs[0]
        r = pooled("exec", "ro-check", "sh", "-c", "echo changed > /bin/new-file && cat /bin/new-file")
        assert r.stdout == b"changed\n", r.stderr  # the container's own layer, in the guest
        assert not list(Path(pooled.root).glob("**/bin/new-file"))
    finally:
        assert pooled("rm", "-f", "ro-check").returncode == 0


def test_a_dead_daemon_means_cold_boots_and_stop_cleans_up(vmrt: Vmrt) -> None:
    assert vmrt("pool", "start", "--size", "1").returncode == 0
    try:
        assert vmrt("pool", "fill", "--wait", timeout=300).returncode == 0
        pid = pool_status(vmrt)["Pid"]
        os.kill(pid, signal.SIGKILL)  # its idle VM is orphaned
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        r = vmrt("run", "--rm", "--timings", "--isolation=vm", "busybox", "echo", "cold")
        assert r.returncode == 0 and r.stdout == b"cold\n", r.stderr
        assert served_by(r.stderr) is None
        assert pool_status(vmrt)["Running"] is False
    finally:
        vmrt("pool", "stop")  # kills the orphaned VM, removes its dir and cgroup
    vmrt.assert_clean()
    assert not [p for p in (vmrt.run_root / "pool").iterdir() if p.name != "daemon.log"]


def test_a_claim_whose_client_is_gone_leaves_no_vm(pooled: Vmrt) -> None:
    """A client that gave up on its claim (timed out: it cold-boots) gets no VM left running in its
    run dir: the daemon's reply fails, and it kills and removes the VM it had moved there."""
    with connect_unix(pooled.run_root, SOCK_NAME, 30) as s:
        s.sendall(b'{"op": "status"}\n')
        status = json.loads(s.makefile("rb").readline())
    qemu = status["vms"][0]["qemu"]
    run_dir = pooled.run_root / "containers" / ("f" * 64)
    run_dir.mkdir(parents=True)
    try:
        with connect_unix(pooled.run_root, SOCK_NAME, 30) as s:
            s.shutdown(socket.SHUT_RD)  # gone before the daemon answers: its reply fails (EPIPE)
            s.sendall(json.dumps({"op": "claim", "shape": status["shape"], "run_dir": str(run_dir)}).encode() + b"\n")
            s.recv(1)  # the daemon's end closes once it is done
        deadline = time.monotonic() + 30
        while (os.path.exists(f"/proc/{qemu}") or (run_dir / "vm").exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{qemu}") and not (run_dir / "vm").exists()
        assert "not taken: destroyed" in (pooled.run_root / "pool" / "daemon.log").read_text()
    finally:
        run_dir.rmdir()


def test_an_idle_vm_that_dies_is_replaced(pooled: Vmrt) -> None:
    assert pool_status(pooled)["Ready"] == 1
    assert pooled("pool", "--format", "{{.Ready}}").stdout == b"1\n"
    pids = json.loads(next((pooled.run_root / "pool").glob("*/pids.json")).read_text())
    os.kill(pids["qemu"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = list((pooled.run_root / "pool").glob("*/pids.json"))
        if now and json.loads(now[0].read_text())["qemu"] != pids["qemu"] and pool_status(pooled)["Ready"] == 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the pool did not replace its dead VM")
    assert "died while idle" in pool_status(pooled)["LastError"]


def test_pool_command_errors(vmrt: Vmrt) -> None:
    r = vmrt("pool", "fill", "2")
    assert r.returncode == 125 and b"not running" in r.stderr and b"Traceback" not in r.stderr
    r = vmrt("pool", "stop")
    assert r.returncode == 0 and b"not running" in r.stdout
    r = vmrt("pool", "start", "--size", "-1")
    assert r.returncode == 125 and r.stderr.count(b"\n") == 1


def test_stop_while_a_replacement_boots_leaves_nothing(vmrt: Vmrt) -> None:
    """`pool stop` right after a claim: the VM the daemon is booting meanwhile goes too. The
    guests print their whole boot log on the serial console (slow under TCG), and the claim is
    a detached run (it returns once its process started): the replacement is still booting when
    the status is read, now that a guest boots in about 0.6 s."""
    chatty = {"VMRT_KERNEL_CMDLINE": "loglevel=8"}  # the pool's shape and the run's: the same
    assert vmrt("pool", "start", "--size", "1", env=chatty).returncode == 0
    try:
        assert vmrt("pool", "fill", "--wait", timeout=300, env=chatty).returncode == 0
        r = vmrt("run", "-d", "--isolation=vm", "busybox", "sleep", "60", env=chatty)
        assert r.returncode == 0, r.stderr
        assert pool_status(vmrt)["Booting"] == 1  # the replacement, not yet at HELLO
        assert vmrt("rm", "-f", r.stdout.decode().strip()).returncode == 0
    finally:
        assert vmrt("pool", "stop").returncode == 0
    vmrt.assert_clean()
