"""VM mode liveness: a hung VM is detected within agent_dead seconds, a quiet one is not.

After STARTED the host PINGs the agent every ``agent_ping`` seconds (protocol v3,
docs/agent-protocol.md); nothing from the agent for ``agent_dead`` seconds fails
the run with one line and status 137 and tears the VM down.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import Vmrt, one_line_error, vmm_pids

pytestmark = pytest.mark.vm
FAST = {"VMRT_TIMEOUT_AGENT_PING": "1", "VMRT_TIMEOUT_AGENT_DEAD": "3"}


def read_until(p: subprocess.Popen[bytes], needle: bytes, timeout: float = 120) -> bytes:
    assert p.stdout is not None
    buf, fd = b"", p.stdout.fileno()
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in {buf!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"EOF before {needle!r}: {buf!r}; stderr: {p.stderr.read() if p.stderr else b''!r}"
            buf += chunk
    return buf


def test_hung_vm_is_killed_within_agent_dead(vmrt: Vmrt) -> None:
    name = "hung-vm"
    p = vmrt.popen("run", "--isolation=vm", "--name", name, "busybox", "sh", "-c", "echo ready; exec sleep 100",
                   env=FAST)
    stopped: list[int] = []
    try:
        read_until(p, b"ready")
        time.sleep(1.0)  # a few PING/PONG rounds: the check is live and passing
        assert p.poll() is None
        qemu = vmm_pids(vmrt.run_root)
        assert len(qemu) == 1, qemu
        os.kill(qemu[0], signal.SIGSTOP)  # the whole VM stops answering
        stopped.append(qemu[0])
        t0 = time.monotonic()
        _, err = p.communicate(timeout=30)
        took = time.monotonic() - t0
        assert p.returncode == 137, err
        assert one_line_error(err) == "vmrt: agent not responding for 3 s: the VM is hung (container killed)"
        assert took < 15, f"took {took:.1f}s"
        assert not os.path.exists(f"/proc/{qemu[0]}")  # the stopped QEMU was killed, not left behind
        vmrt.assert_clean()
        r = vmrt("ps", "-a", "--format", "json", "--filter", f"name={name}")
        rows = [json.loads(line) for line in r.stdout.decode().splitlines()]
        assert rows and rows[0]["Status"].startswith("Exited (137)"), rows
    finally:
        for pid in stopped:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
            p.wait()
        vmrt("rm", "-f", name)


def test_hung_detached_vm_ends_its_execs_too(vmrt: Vmrt) -> None:
    """Detached, the C monitor does the pinging: a hung VM is killed, recorded Exited (137) with
    the reason in its log, and an `exec` client waiting in it ends (its port closes with QEMU)."""
    name = "hung-detached"
    r = vmrt("run", "-d", "--isolation=vm", "--name", name, "busybox", "sleep", "600", env=FAST)
    assert r.returncode == 0, r.stderr
    stopped: list[int] = []
    ex = vmrt.popen("exec", name, "sh", "-c", "echo in-exec; exec sleep 100")
    try:
        read_until(ex, b"in-exec")
        qemu = vmm_pids(vmrt.run_root)
        assert len(qemu) == 1, qemu
        os.kill(qemu[0], signal.SIGSTOP)
        stopped.append(qemu[0])
        t0 = time.monotonic()
        _, err = ex.communicate(timeout=60)
        assert ex.returncode != 0 and b"Traceback" not in err, err
        r = vmrt("wait", name, timeout=60)
        assert r.stdout == b"137\n", r.stderr
        assert time.monotonic() - t0 < 30
        assert b"agent not responding for 3 s: the VM is hung" in vmrt("logs", name).stderr
        assert not os.path.exists(f"/proc/{qemu[0]}")
    finally:
        for pid in stopped:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if ex.poll() is None:
            ex.kill()
            ex.wait()
        vmrt("rm", "-f", name)
    vmrt.assert_clean()


def test_quiet_container_is_kept_alive_by_pings(vmrt: Vmrt) -> None:
    # no output for more than twice agent_dead: only PONGs say the agent lives
    r = vmrt("run", "--rm", "--isolation=vm", "busybox", "sh", "-c", "sleep 8; echo done", env=FAST, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"done\n"


def test_unread_stdin_does_not_look_like_a_hang(vmrt: Vmrt, tmp_path: Path) -> None:
    # the process leaves its stdin unread for 6 s while the host has MiBs for it: the agent
    # stops reading its port (flow control), so PINGs wait behind STDIN; its unprompted
    # PONGs keep the VM alive
    src = tmp_path / "in"
    src.write_bytes(os.urandom(1 << 20) * 4)
    with open(src, "rb") as f:
        p = vmrt.popen("run", "--rm", "-i", "--isolation=vm", "busybox", "sh", "-c", "sleep 6; wc -c",
                       stdin=f, env=FAST)
        out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert out.split()[0] == str(4 << 20).encode()
