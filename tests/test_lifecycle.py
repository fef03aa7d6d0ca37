"""Detached containers and their lifecycle, in both isolation modes, through the real CLI.

run -d / create / start, ps, logs, stop, kill, wait, rm -f, restart policies,
and the faults: QEMU or the monitor killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from support import Vmrt

MODES = ["process", pytest.param("vm", marks=pytest.mark.vm)]


def detach(v: Vmrt, mode: str, *args: str, name: str | None = None, opts: tuple[str, ...] = ()) -> str:
    r = v("run", "-d", f"--isolation={mode}", *(["--name", name] if name else []), *opts, "busybox", *args)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", cid), r.stdout
    return cid


def ps(v: Vmrt, *args: str) -> list[dict]:  # type: ignore[type-arg]
    r = v("ps", "-a", "--format", "json", *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.decode().splitlines()]


def status_of(v: Vmrt, cid: str) -> str:
    return next(row["Status"] for row in ps(v) if cid.startswith(row["ID"]) or row["Names"] == cid)


def until(pred, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def rm(v: Vmrt, *cids: str) -> None:
    r = v("rm", "-f", *cids)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_detached_run_logs_and_wait(vmrt: Vmrt, mode: str) -> None:
    cid = detach(vmrt, mode, "sh", "-c", "echo out; echo err >&2; sleep 1; echo late; exit 3")
    assert status_of(vmrt, cid).startswith(("Up", "Exited"))
    r = vmrt("wait", cid[:12])
    assert r.returncode == 0 and r.stdout == b"3\n", r.stderr
    assert status_of(vmrt, cid).startswith("Exited (3)")
    r = vmrt("logs", cid)
    assert r.stdout == b"out\nlate\n" and r.stderr == b"err\n"
    assert vmrt("logs", "--tail", "1", cid).stdout == b"late\n"
    stamped = vmrt("logs", "-t", cid).stdout.decode().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z (out|late)$", line) for line in stamped), stamped
    assert vmrt("logs", "--since", "1h", cid).stdout == b"out\nlate\n"
    assert vmrt("logs", "--since", "2999-01-01T00:00:00Z", cid).stdout == b""
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_logs_follow_ends_with_the_container(vmrt: Vmrt, mode: str) -> None:
    cid = detach(vmrt, mode, "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.3; done")
    r = vmrt("logs", "-f", cid, timeout=120)
    assert r.returncode == 0 and r.stdout == b"line1\nline2\nline3\n", r.stderr
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_stop_kills_after_the_grace_time(vmrt: Vmrt, mode: str) -> None:
    cid = detach(vmrt, mode, "sh", "-c", "trap 'echo ignored' TERM; while true; do sleep 0.1; done")
    t0 = time.monotonic()
    r = vmrt("stop", "-t", "1", cid)
    assert r.returncode == 0 and r.stdout.decode().strip() == next(x["Names"] for x in ps(vmrt)
                                                                    if cid.startswith(x["ID"]))
    assert 0.9 < time.monotonic() - t0 < 30
    assert status_of(vmrt, cid).startswith("Exited (137)")
    assert b"ignored" in vmrt("logs", cid).stdout
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_kill_with_a_signal_and_by_default(vmrt: Vmrt, mode: str) -> None:
    a = detach(vmrt, mode, "sh", "-c", "sleep 100")
    b = detach(vmrt, mode, "sh", "-c", "trap 'exit 7' USR1; while true; do sleep 0.1; done")
    assert vmrt("kill", a).returncode == 0
    assert status_of(vmrt, a).startswith("Exited (137)")  # a SIGKILL is seen through, as Docker's
    assert vmrt("kill", "-s", "USR1", b).returncode == 0
    assert vmrt("wait", a, b).stdout.split() == [b"137", b"7"]
    r = vmrt("kill", a)
    assert r.returncode == 1 and b"is not running" in r.stderr
    r = vmrt("kill", "-s", "NOPE", b)
    assert r.returncode == 125 and b"invalid signal" in r.stderr
    rm(vmrt, a, b)
    vmrt.assert_clean()


def test_kill_of_an_rm_container_it_removes_meanwhile(vmrt: Vmrt) -> None:
    # the SIGKILL is seen through while --rm removes the container: that is its end, not an error
    for _ in range(3):
        cid = detach(vmrt, "process", "sleep", "100", opts=("--rm",))
        r = vmrt("kill", cid)
        assert r.returncode == 0 and r.stderr == b"", r.stderr
        deadline = time.monotonic() + 30
        while ps(vmrt, "--filter", f"id={cid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ps(vmrt, "--filter", f"id={cid}") == []
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_rm_force_of_a_running_container(vmrt: Vmrt, mode: str) -> None:
    cid = detach(vmrt, mode, "sleep", "100")
    r = vmrt("rm", cid)
    assert r.returncode == 1 and b"stop it first or use -f" in r.stderr
    rm(vmrt, cid)
    assert ps(vmrt, "--filter", f"id={cid}") == []
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_restart_on_failure_restarts_exactly_n_times(vmrt: Vmrt, mode: str) -> None:
    r = vmrt("run", "-d", "--restart=on-failure:2", f"--isolation={mode}", "busybox", "sh", "-c", "echo run; exit 1")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    until(lambda: status_of(vmrt, cid).startswith("Exited (1)"), 180)
    time.sleep(1.0)  # a third restart would have begun by now
    assert status_of(vmrt, cid).startswith("Exited (1)")
    assert vmrt("logs", cid).stdout == b"run\nrun\nrun\n"
    rm(vmrt, cid)
    vmrt.assert_clean()


def test_restart_always_until_stopped(vmrt: Vmrt) -> None:
    r = vmrt("run", "-d", "--restart=always", "--isolation=process", "busybox", "sh", "-c", "echo x; sleep 0.2")
    cid = r.stdout.decode().strip()
    until(lambda: vmrt("logs", cid).stdout.count(b"x") >= 3, 60)
    assert vmrt("stop", "-t", "1", cid).returncode == 0
    n = vmrt("logs", cid).stdout.count(b"x")
    time.sleep(1.0)
    assert vmrt("logs", cid).stdout.count(b"x") == n  # stopped by hand: not restarted
    assert not status_of(vmrt, cid).startswith(("Up", "Restarting"))
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_create_then_start_and_start_attached(vmrt: Vmrt, mode: str) -> None:
    r = vmrt("create", f"--isolation={mode}", "--name", f"made-{mode}", "busybox", "sh", "-c", "echo hello; exit 4")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    assert status_of(vmrt, cid) == "Created"
    assert vmrt("start", f"made-{mode}").stdout.strip() == f"made-{mode}".encode()
    assert vmrt("wait", cid).stdout == b"4\n"
    r = vmrt("start", "-a", cid)
    assert r.returncode == 4 and r.stdout == b"hello\n", r.stderr
    assert vmrt("logs", cid).stdout == b"hello\nhello\n"  # both runs, the attached one too (as Docker)
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_detached_exec_error_is_one_line(vmrt: Vmrt, mode: str) -> None:
    r = vmrt("run", "-d", f"--isolation={mode}", "--name", f"noexec-{mode}", "busybox", "/no/such/binary")
    err = r.stderr.decode().strip()
    assert r.returncode == 127 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    rows = [x for x in ps(vmrt) if x["Names"] == f"noexec-{mode}"]
    assert rows and rows[0]["Status"].startswith("Exited (127)")
    rm(vmrt, f"noexec-{mode}")
    vmrt.assert_clean()


def _pids_of(pattern: bytes, marker: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read()
            except OSError:
                continue
            if pattern in cmd and marker.encode() in cmd:
                out.append(int(p))
    return out


@pytest.mark.vm
def test_qemu_killed_means_a_nonzero_exit_and_a_clean_rm(vmrt: Vmrt) -> None:
    cid = detach(vmrt, "vm", "sleep", "100")
    qemu = _pids_of(b"qemu-system", cid[:12]) or _pids_of(b"qemu-system", str(vmrt.run_root))
    assert qemu, "no QEMU found for the container"
    os.kill(qemu[0], signal.SIGKILL)
    r = vmrt("wait", cid, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() not in (b"", b"0"), r
    assert status_of(vmrt, cid).startswith("Exited (") and not status_of(vmrt, cid).startswith("Exited (0)")
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_monitor_killed_is_reconciled(vmrt: Vmrt, mode: str) -> None:
    cid = detach(vmrt, mode, "sleep", "100")
    monitor = _pids_of(b"vmrt.monitor", cid)
    assert len(monitor) == 1
    os.kill(monitor[0], signal.SIGKILL)
    until(lambda: not os.path.exists(f"/proc/{monitor[0]}"), 10)
    assert status_of(vmrt, cid).startswith("Exited (255)")  # ps reconciles: the truth, not "Up"
    rm(vmrt, cid)
    vmrt.assert_clean()


def test_twenty_parallel_detached_runs(vmrt: Vmrt) -> None:
    procs = [vmrt.popen("run", "-d", "--isolation=process", "busybox", "sleep", "30") for _ in range(20)]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err  # all succeed here; a failure would have to be one clear line
        ids.append(out.decode().strip())
    assert len(set(ids)) == 20
    running = {x["ID"] for x in ps(vmrt, "--filter", "status=running")}
    assert {i[:12] for i in ids} <= running
    r = subprocess.run(vmrt.cmd("rm", "-f", *ids), env=vmrt.env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_attach_follows_output_and_proxies_signals(vmrt: Vmrt, mode: str) -> None:
    cid = detach(vmrt, mode, "sh", "-c", "trap 'echo got-int; exit 9' INT; echo ready; "
                                         "while true; do sleep 0.2; done")
    until(lambda: b"ready" in vmrt("logs", cid).stdout, 60)
    p = vmrt.popen("attach", cid)
    time.sleep(1.0)  # attached: following the log
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 9, err
    assert out == b"got-int\n"  # from the moment of attaching: not the earlier "ready"
    r = vmrt("attach", cid)
    assert r.returncode == 125 and b"cannot attach to a stopped container" in r.stderr
    rm(vmrt, cid)
    vmrt.assert_clean()


def test_state_after_a_simulated_reboot(vmrt: Vmrt) -> None:
    """Everything a reboot takes away (processes, mounts, /run) gone at once: ps tells the truth,
    rm cleans up, and the same name starts again."""
    cid = detach(vmrt, "process", "sleep", "100", name="survivor")
    init = json.loads(vmrt("inspect", cid).stdout)[0]["State"]["Pid"]
    for pid in [*_pids_of(b"vmrt.monitor", cid), init]:
        os.kill(pid, signal.SIGKILL)
    until(lambda: not os.path.exists(f"/proc/{init}"), 10)
    for line in reversed(open("/proc/self/mountinfo").read().splitlines()):
        mp = line.split()[4]
        if mp.startswith(str(vmrt.run_root)):
            subprocess.run(["umount", "-l", mp], check=True)
    subprocess.run(["rm", "-rf", str(vmrt.run_root / "containers"), str(vmrt.run_root / "runtime")], check=True)
    assert status_of(vmrt, cid).startswith("Exited (255)")
    rm(vmrt, cid)
    again = detach(vmrt, "process", "true", name="survivor")
    assert vmrt("wait", again).stdout == b"0\n"
    rm(vmrt, again)
    vmrt.assert_clean()


def test_concurrent_starts_leave_one_healthy_container(vmrt: Vmrt) -> None:
    cid = vmrt("create", "--isolation=process", "busybox", "sleep", "60").stdout.decode().strip()
    procs = [vmrt.popen("start", cid) for _ in range(3)]
    codes = [p.wait(timeout=60) for p in procs]
    assert 0 in codes, codes
    assert status_of(vmrt, cid).startswith("Up")
    assert vmrt("exec", cid, "true").returncode == 0  # its root is still mounted: the losers touched nothing
    assert len(_pids_of(b"vmrt.monitor", cid)) == 1
    rm(vmrt, cid)
    vmrt.assert_clean()


def test_owner_identity_survives_a_clock_step(vmrt: Vmrt) -> None:
    import sqlite3
    cid = detach(vmrt, "process", "sleep", "60")
    with sqlite3.connect(vmrt.root / "state.db") as db:  # as if the wall clock jumped forward an hour
        db.execute("UPDATE containers SET started = started - 3600 WHERE id = ?", (cid,))
    assert status_of(vmrt, cid).startswith("Up")
    rm(vmrt, cid)
    vmrt.assert_clean()


def test_other_signals_reach_a_process_container(vmrt: Vmrt) -> None:
    cid = detach(vmrt, "process", "sh", "-c", "trap 'exit 5' ALRM; while true; do sleep 0.1; done")
    assert vmrt("kill", "-s", "ALRM", cid).returncode == 0
    assert vmrt("wait", cid).stdout == b"5\n"
    rm(vmrt, cid)
    vmrt.assert_clean()


def test_restart_policy_checks(vmrt: Vmrt) -> None:
    r = vmrt("run", "-d", "--rm", "--restart=always", "busybox", "true")
    assert r.returncode == 125 and b"--restart and --rm" in r.stderr
    r = vmrt("create", "--restart=always", "--isolation=process", "busybox", "true")
    assert r.returncode == 0, r.stderr
    rm(vmrt, r.stdout.decode().strip())
    # a command that cannot start is reported once and not restarted in a loop
    r = vmrt("run", "-d", "--restart=always", "--isolation=process", "--name", "never-starts", "busybox", "/nope")
    assert r.returncode == 127
    time.sleep(1.0)
    assert status_of(vmrt, "never-starts").startswith("Exited (127)")
    rm(vmrt, "never-starts")
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_attached_runs_are_logged_too(vmrt: Vmrt, mode: str) -> None:
    r = vmrt("run", f"--isolation={mode}", "--name", f"attached-{mode}", "busybox", "sh", "-c",
             "echo to-out; echo to-err >&2; exit 2")
    assert (r.returncode, r.stdout, r.stderr) == (2, b"to-out\n", b"to-err\n")
    logged = vmrt("logs", f"attached-{mode}")
    assert (logged.stdout, logged.stderr) == (b"to-out\n", b"to-err\n")
    rm(vmrt, f"attached-{mode}")
    vmrt.assert_clean()


def _pty_run(v: Vmrt, *args: str, stdin: bytes = b"") -> tuple[int, bytes]:
    """Run vmrt on a pseudo-terminal (as a user's `-t` run); returns its status and what it printed."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:  # the child: vmrt on the pty
        os.execve(v.cmd(*args)[0], v.cmd(*args), v.env)
    out = b""
    if stdin:
        os.write(fd, stdin)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, st = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(st), out


@pytest.mark.parametrize("mode", MODES)
def test_the_steady_state_monitor_is_the_small_c_one(vmrt: Vmrt, mode: str) -> None:
    """Once the process runs, the monitor (same PID, so `ps`, `stop`, reconciliation all work
    unchanged) is the C program, not a Python interpreter; the Python part comes back only to
    finish: exit recorded, teardown complete, logs kept."""
    cid = detach(vmrt, mode, "sh", "-c", "echo up; sleep 600")
    until(lambda: b"up" in vmrt("logs", cid).stdout, 60)
    r = vmrt("inspect", "--format", "{{.State.MonitorPid}}", cid)
    pid = int(r.stdout)
    assert os.readlink(f"/proc/{pid}/exe").endswith("/vmrt-monitor")
    r = vmrt("stop", "-t", "1", cid)
    assert r.returncode == 0, r.stderr
    assert status_of(vmrt, cid).startswith("Exited (137)")
    until(lambda: not os.path.exists(f"/proc/{pid}"), 30)  # the Python finish ends it
    r = vmrt("logs", cid)
    assert r.stdout == b"up\n" and b"container killed" in r.stderr
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_attach_feeds_stdin_of_a_detached_interactive_container(vmrt: Vmrt, mode: str) -> None:
    cid = detach(vmrt, mode, "sh", "-c", "echo ready; while read line; do echo \"got $line\"; done; "
                                                "echo stdin-closed", opts=("-i",))
    until(lambda: b"ready" in vmrt("logs", cid).stdout, 60)
    p = vmrt.popen("attach", "--no-sig-proxy", cid, stdin=subprocess.PIPE)
    assert p.stdin is not None
    p.stdin.write(b"one\ntwo\n")
    p.stdin.close()  # the attach's EOF: the container's stdin stays open (as Docker without --stdin-once)
    until(lambda: b"got two" in vmrt("logs", cid).stdout, 60)
    assert p.poll() is None  # still attached: following the output until the container ends
    # a second attach reaches the same stdin
    q = vmrt.popen("attach", "--no-sig-proxy", cid, stdin=subprocess.PIPE)
    assert q.stdin is not None
    q.stdin.write(b"three\n")
    q.stdin.flush()
    until(lambda: b"got three" in vmrt("logs", cid).stdout, 60)
    assert vmrt("stop", "-t", "1", cid).returncode == 0
    q.stdin.close()
    for proc in (p, q):
        assert proc.wait(timeout=60) == 137
        assert proc.stdout is not None
        out = proc.stdout.read()
    assert b"got three" in out and b"stdin-closed" not in vmrt("logs", cid).stdout
    rm(vmrt, cid)
    vmrt.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_terminal_runs_are_logged(vmrt: Vmrt, mode: str) -> None:
    """-t output is in `vmrt logs` too: attached (through the driver's tee) and detached (the C
    monitor reads the pty master / the agent's frames)."""
    status, out = _pty_run(vmrt, "run", "-t", f"--isolation={mode}", "--name", f"tty-{mode}", "busybox",
                           "sh", "-c", "echo on-a-tty; [ -t 1 ] && echo yes-tty")
    assert status == 0, out
    assert b"yes-tty" in out
    logged = vmrt("logs", f"tty-{mode}")
    assert b"on-a-tty" in logged.stdout and b"yes-tty" in logged.stdout
    cid = detach(vmrt, mode, "sh", "-c", "[ -t 1 ] && echo detached-tty", opts=("-t",))
    assert vmrt("wait", cid).stdout == b"0\n"
    assert vmrt("logs", cid).stdout.replace(b"\r\n", b"\n") == b"detached-tty\n"
    rm(vmrt, f"tty-{mode}", cid)
    vmrt.assert_clean()
