"""One behaviour suite for both isolation modes.

Every case runs the same image with the same flags under ``--isolation=process``
(runc) and ``--isolation=vm`` (a micro-VM under QEMU), and asserts the same
observable result: exit code, stdout, stderr. Differences that are intended are
listed in docs/ISOLATION.md and pinned by ``test_intended_difference_*`` below.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import CGROUP_PARENT, Vmrt

MODES = ("process", "vm")
pytestmark = pytest.mark.vm


def run(vmrt: Vmrt, mode: str, *args: str, input: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return vmrt("run", f"--isolation={mode}", *args, input=input, env=env)


def both(vmrt: Vmrt, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run in both modes; assert the results are identical; return one."""
    rs = {m: run(vmrt, m, "--rm", *args, input=input) for m in MODES}
    p, v = rs["process"], rs["vm"]
    assert "Traceback" not in (p.stderr + v.stderr).decode()
    assert (p.returncode, p.stdout, p.stderr) == (v.returncode, v.stdout, v.stderr), rs
    return p


def err_line(r: subprocess.CompletedProcess[bytes]) -> str:
    lines = [ln for ln in r.stderr.decode().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vmrt: ")
    return lines[0]


# --- exit codes ------------------------------------------------------------------
@pytest.mark.parametrize("args,code", [
    (("true",), 0),
    (("sh", "-c", "exit 42"), 42),
    (("sh", "-c", "exec 2>/dev/null; sleep 30 & kill -KILL $!; wait $!"), 137),  # a child killed by a signal
        # (stderr muted: whether sh reports "Killed" depends on when it reaps the job)
])
def test_exit_codes(vmrt: Vmrt, args: tuple[str, ...], code: int) -> None:
    assert both(vmrt, "busybox", *args).returncode == code


@pytest.mark.parametrize("cmd,code,text", [
    ("nope", 127, 'exec: "nope": executable file not found in $PATH'),
    ("/no/such/file", 127, '"/no/such/file"'),
    ("/etc/passwd", 126, 'exec: "/etc/passwd": permission denied'),
])
def test_exec_errors(vmrt: Vmrt, cmd: str, code: int, text: str) -> None:
    rs = {m: run(vmrt, m, "--rm", "busybox", cmd) for m in MODES}
    for r in rs.values():
        assert r.returncode == code
        assert text in err_line(r)
        assert r.stdout == b""


@pytest.mark.parametrize("args,needle", [
    (("--memory", "lots"), "invalid memory size"),
    (("-v", "../relative:/x"), "neither an absolute host path nor a volume name"),
    (("-v", "/tmp:relative"), "must be absolute"),
    (("--mount", "type=image,target=/x"), "not supported"),
    (("--mount", "type=bind,source=relative,target=/x"), "must be an absolute host path"),
    (("--mount", "type=bind,source=/no/such/dir,target=/x"), "does not exist"),
    (("--tmpfs", "/x:bogus"), "unknown option"),
    (("--pids-limit", "many"), "--pids-limit"),
    (("--tmpfs", "/x", "--tmpfs", "/x"), "duplicate mount point"),
    (("-u", "nosuchuser"), "unable to find user"),
])
def test_bad_input_is_125_in_both(vmrt: Vmrt, args: tuple[str, ...], needle: str) -> None:
    for m in MODES:
        r = run(vmrt, m, "--rm", *args, "busybox", "true")
        assert r.returncode == 125
        assert needle in err_line(r)


# --- stdio, env, user, cwd, hostname, tty -------------------------------------------
def test_stdout_and_stderr_are_separate(vmrt: Vmrt) -> None:
    r = both(vmrt, "busybox", "sh", "-c", "echo out; echo err >&2; echo out2")
    assert (r.stdout, r.stderr) == (b"out\nout2\n", b"err\n")


def test_stdin_with_and_without_i(vmrt: Vmrt) -> None:
    data = b"line one\n" + bytes(range(256)) * 64
    assert both(vmrt, "-i", "busybox", "cat", input=data).stdout == data
    assert both(vmrt, "busybox", "cat", input=b"ignored").stdout == b""  # no -i: stdin is /dev/null


def test_env(vmrt: Vmrt, tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("# comment\nFROM_FILE=1\nOVER=file\n")
    r = both(vmrt, "--hostname", "h1", "-e", "A=b c", "--env-file", str(f), "-e", "OVER=flag",
             "busybox", "env")
    env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
    assert env["A"] == "b c" and env["FROM_FILE"] == "1" and env["OVER"] == "flag"
    assert env["HOSTNAME"] == "h1" and env["HOME"] == "/root" and "/bin" in env["PATH"]


@pytest.mark.parametrize("user,expect", [
    ("", "uid=0(root) gid=0(root)"),
    ("1234:1234", "uid=1234 gid=1234"),
    ("nobody", "uid=65534(nobody)"),
])
def test_user(vmrt: Vmrt, user: str, expect: str) -> None:
    args = ("-u", user) if user else ()
    assert both(vmrt, *args, "busybox", "id").stdout.decode().startswith(expect)


def test_workdir(vmrt: Vmrt) -> None:
    assert both(vmrt, "-w", "/tmp", "busybox", "pwd").stdout == b"/tmp\n"
    assert both(vmrt, "-w", "/made/for/me", "busybox", "pwd").stdout == b"/made/for/me\n"


def test_workdir_cannot_be_a_leaked_fd(vmrt: Vmrt) -> None:
    """CVE-2024-21626 shape: a cwd through /proc/self/fd reaches nothing of the host."""
    for m in MODES:
        r = run(vmrt, m, "--rm", "-w", "/proc/self/fd/7", "busybox", "sh", "-c", "ls ../../../../etc/")
        assert r.returncode != 0 or b"vmrt" not in r.stdout


def test_hostname(vmrt: Vmrt) -> None:
    r = both(vmrt, "--hostname", "web-1", "busybox", "sh", "-c", "hostname; cat /etc/hostname; grep web-1 /etc/hosts")
    prefix = vmrt.subnet.rsplit(".", 1)[0].encode()  # /etc/hosts names the container's own address, as Docker's
    assert re.fullmatch(rb"web-1\nweb-1\n" + re.escape(prefix) + rb"\.\d+\tweb-1\n", r.stdout), r.stdout
    r = both(vmrt, "--network", "none", "--hostname", "web-1", "busybox", "grep", "web-1", "/etc/hosts")
    assert r.stdout == b"127.0.1.1\tweb-1\n"
    for m in MODES:  # the default is the container ID's first 12 characters
        r = run(vmrt, m, "--rm", "busybox", "hostname")
        assert len(r.stdout.strip()) == 12


def test_tty(vmrt: Vmrt) -> None:
    r = both(vmrt, "-t", "busybox", "sh", "-c", "tty; [ -t 1 ] && echo is-a-tty; echo $TERM")
    assert r.stdout == b"/dev/pts/0\r\nis-a-tty\r\nxterm\r\n"
    r = both(vmrt, "busybox", "sh", "-c", "[ -t 1 ] || echo not-a-tty")
    assert r.stdout == b"not-a-tty\n"


def test_privileges(vmrt: Vmrt) -> None:
    """Docker's default capability set and no_new_privs, identically."""
    r = both(vmrt, "busybox", "sh", "-c", "grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status")
    assert b"CapEff:\t00000000a80425fb" in r.stdout and b"NoNewPrivs:\t1" in r.stdout


# --- signals and --rm ------------------------------------------------------------------
@contextlib.contextmanager
def started(vmrt: Vmrt, mode: str, *args: str, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    p = vmrt.popen("run", "--rm", f"--isolation={mode}", *args, env=env or {})
    try:
        buf = b""
        deadline = time.monotonic() + 120
        assert p.stdout is not None
        while b"ready" not in buf and time.monotonic() < deadline:
            chunk = p.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                break
            buf += chunk
        assert b"ready" in buf, (buf, p.stderr.read() if p.stderr else b"")
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("mode", MODES)
def test_signal_is_forwarded_to_the_container(vmrt: Vmrt, mode: str) -> None:
    script = "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.1; done"
    with started(vmrt, mode, "busybox", "sh", "-c", script) as p:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    assert p.returncode == 7 and b"got-term" in out


@pytest.mark.parametrize("mode", MODES)
def test_unhandled_stop_is_killed_after_grace_137(vmrt: Vmrt, mode: str) -> None:
    # PID 1 without a handler ignores SIGTERM (as in Docker); the grace time then kills it
    with started(vmrt, mode, "busybox", "sh", "-c", "echo ready; sleep 100",
                 env={"VMRT_TIMEOUT_STOP_GRACE": "1"}) as p:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 137
    assert b"container killed" in err


@pytest.mark.parametrize("mode", MODES)
def test_rm_and_exited_record(vmrt: Vmrt, mode: str) -> None:
    name = f"keep-{mode}"
    r = run(vmrt, mode, "--name", name, "busybox", "sh", "-c", "exit 3")
    assert r.returncode == 3
    ps = vmrt("ps", "-a").stdout.decode()
    line = next(ln for ln in ps.splitlines() if ln.endswith(name))
    assert "Exited (3)" in line and mode in line
    assert vmrt("rm", name).returncode == 0
    assert name not in vmrt("ps", "-a").stdout.decode()
    assert not any((vmrt.root / "rw").glob("*")) if (vmrt.root / "rw").exists() else True
    r = run(vmrt, mode, "--rm", "--name", name, "busybox", "true")
    assert r.returncode == 0 and name not in vmrt("ps", "-a").stdout.decode()


# --- file systems: image, volumes, tmpfs, read-only ---------------------------------------
def test_image_is_never_modified(vmrt: Vmrt) -> None:
    layers = vmrt.root / "layers"
    before = {p: p.stat().st_mtime_ns for p in layers.rglob("*") if p.is_file()}
    both(vmrt, "busybox", "sh", "-c", "echo x > /etc/passwd; rm -f /bin/ls; echo new > /newfile")
    r = both(vmrt, "busybox", "sh", "-c", "ls /bin/ls; head -c 5 /etc/passwd; ls /newfile 2>&1 || true")
    assert r.stdout.startswith(b"/bin/ls\nroot:")
    assert {p: p.stat().st_mtime_ns for p in layers.rglob("*") if p.is_file()} == before


def test_volumes_rw_and_ro(vmrt: Vmrt, tmp_path: Path) -> None:
    for m in MODES:
        d = tmp_path / m
        d.mkdir()
        (d / "in").write_text("from host\n")
        single = tmp_path / f"{m}.conf"
        single.write_text("a file\n")
        r = run(vmrt, m, "--rm", "-v", f"{d}:/data", "-v", f"{d}:/ro:ro", "-v", f"{single}:/etc/app.conf:ro",
                "busybox", "sh", "-c",
                "cat /data/in /etc/app.conf; echo from-ctr > /data/out; echo x > /ro/x; echo rc=$?")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"from host\na file\nrc=1\n"
        assert b"Read-only file system" in r.stderr
        assert (d / "out").read_text() == "from-ctr\n"
        assert not (d / "x").exists()


def test_volume_directory_created_and_mount_option(vmrt: Vmrt, tmp_path: Path) -> None:
    for m in MODES:
        d = tmp_path / f"made-{m}"
        r = run(vmrt, m, "--rm", "-v", f"{d}:/a", "--mount", f"type=bind,source={d},target=/b,readonly",
                "busybox", "sh", "-c", "touch /a/f && ls /b && touch /b/g")
        assert d.is_dir() and (d / "f").exists() and not (d / "g").exists()
        assert r.stdout == b"f\n" and r.returncode == 1


def test_symlinked_mount_target_stays_inside(vmrt: Vmrt, tmp_path: Path) -> None:
    """A symlink on the way to a mount target resolves inside the container root."""
    for m in MODES:
        escape = tmp_path / f"escape-{m}"   # where a naive runtime would mount
        vol = tmp_path / f"vol-{m}"
        vol.mkdir()
        (vol / "abs").symlink_to(escape)
        (vol / "rel").symlink_to(f"../../../../../../{escape}")
        extra = tmp_path / f"extra-{m}"
        extra.mkdir()
        (extra / "marker").write_text("m\n")
        r = run(vmrt, m, "--rm", "-v", f"{vol}:/v", "-v", f"{extra}:/v/abs/x", "-v", f"{extra}:/v/rel/y",
                "busybox", "sh", "-c", f"cat {escape}/x/marker {escape}/y/marker")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"m\nm\n"
        assert not escape.exists()


def test_tmpfs(vmrt: Vmrt) -> None:
    r = both(vmrt, "--tmpfs", "/scratch:size=2m,mode=1777", "--mount", "type=tmpfs,target=/t2",
             "busybox", "sh", "-c",
             "stat -c %a /scratch; df -k /scratch | tail -1 | awk '{print $2}'; "
             "grep -E ' /(scratch|t2) ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1-4; echo x > /t2/f && cat /t2/f")
    assert r.stdout == b"1777\n2048\nrw,nosuid,nodev,noexec\nrw,nosuid,nodev,noexec\nx\n"


def test_read_only_root(vmrt: Vmrt) -> None:
    r = both(vmrt, "--read-only", "--tmpfs", "/run", "-w", "/made", "busybox", "sh", "-c",
             "pwd; touch /x 2>&1; echo a > /run/a && echo a > /dev/shm/b && cat /run/a /dev/shm/b")
    assert r.stdout == b"/made\ntouch: /x: Read-only file system\na\na\n"


# --- limits ------------------------------------------------------------------------
def _oom_flag(vmrt: Vmrt, name: str) -> bool:
    db = sqlite3.connect(vmrt.root / "state.db")
    try:
        return bool(db.execute("SELECT oom_killed FROM containers WHERE name=?", (name,)).fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("mode", MODES)
def test_memory_limit_oom_137_and_flag(vmrt: Vmrt, mode: str) -> None:
    name = f"oom-{mode}"
    r = run(vmrt, mode, "--name", name, "--memory", "32m", "busybox", "tail", "/dev/zero")
    try:
        assert r.returncode == 137
        assert _oom_flag(vmrt, name)
        assert "OOM killed" in vmrt("ps", "-a").stdout.decode()
    finally:
        vmrt("rm", name)
    r = run(vmrt, mode, "--name", name, "--memory", "32m", "busybox", "sh", "-c", "head -c 8m /dev/zero | wc -c")
    try:
        assert r.returncode == 0 and r.stdout == b"8388608\n" and not _oom_flag(vmrt, name)
    finally:
        vmrt("rm", name)


def test_pids_limit(vmrt: Vmrt) -> None:
    script = "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1 & done; echo started; wait"
    r = both(vmrt, "--pids-limit", "8", "busybox", "sh", "-c", script)
    assert r.returncode != 0 and b"can't fork" in r.stderr and b"started" not in r.stdout
    r = both(vmrt, "--pids-limit", "20", "busybox", "sh", "-c", script)
    assert r.returncode == 0 and r.stdout == b"started\n"


def _cgroup_file(pattern: str, name: str) -> str:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        hits = list(root.glob(f"{CGROUP_PARENT}/{pattern}/{name}"))
    else:
        ctrl = {"cpu": "cpu", "memory": "memory", "pids": "pids"}[name.split(".")[0].replace("cfs_", "")]
        hits = list(root.glob(f"{ctrl}/{CGROUP_PARENT}/{pattern}/{name}"))
    assert len(hits) == 1, (pattern, name, hits)
    return hits[0].read_text().strip()


@pytest.mark.parametrize("mode", MODES)
def test_cpus_bound_the_host_side(vmrt: Vmrt, mode: str) -> None:
    """--cpus caps the container's processes (process) or QEMU + virtiofsd (vm) on the host."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    with started(vmrt, mode, "--name", f"cpu-{mode}", "--cpus", "0.5", "--memory", "64m",
                 "busybox", "sh", "-c", "echo ready; sleep 100") as p:
        cid = next(ln.split()[0] for ln in vmrt("ps").stdout.decode().splitlines() if ln.endswith(f"cpu-{mode}"))
        pattern = f"{cid}*" + ("-vmm" if mode == "vm" else "")
        if v2:
            assert _cgroup_file(pattern, "cpu.max").split()[0] == "50000"
            mem = int(_cgroup_file(pattern, "memory.max"))
        else:
            assert _cgroup_file(pattern, "cpu.cfs_quota_us") == "50000"
            mem = int(_cgroup_file(pattern, "memory.limit_in_bytes"))
        if mode == "process":
            assert mem == 64 << 20
        else:  # guest RAM (limit + guest overhead) + QEMU/virtiofsd overhead
            assert 64 << 20 < mem <= (64 + 64 + 256) << 20
        p.send_signal(signal.SIGKILL)
        p.wait()
    # vmrt was killed: clean up as a user would
    assert vmrt("rm", "-f", f"cpu-{mode}").returncode == 0


# --- intended differences (docs/ISOLATION.md) ---------------------------------------------
def test_intended_difference_kernel(vmrt: Vmrt) -> None:
    p = run(vmrt, "process", "--rm", "busybox", "uname", "-r").stdout.decode().strip()
    v = run(vmrt, "vm", "--rm", "busybox", "uname", "-r").stdout.decode().strip()
    assert p == os.uname().release and v != p


def test_same_syscall_filter_and_masks(vmrt: Vmrt) -> None:
    """Both modes filter syscalls with the same seccomp profile and mask and make read-only the
    same /proc paths (issue 16: in VM mode the agent installs what runc does; tests/test_policy.py
    checks each path and syscall)."""
    script = "grep '^Seccomp:' /proc/self/status; grep -c ' /proc/' /proc/mounts"
    p = run(vmrt, "process", "--rm", "busybox", "sh", "-c", script).stdout.decode().split()
    v = run(vmrt, "vm", "--rm", "busybox", "sh", "-c", script).stdout.decode().split()
    assert p[:2] == v[:2] == ["Seccomp:", "2"], (p, v)
    assert int(p[2]) >= 5 and int(v[2]) >= 5, (p, v)


def test_intended_difference_cpu_count(vmrt: Vmrt) -> None:
    """--cpus is a CFS quota in process mode; in VM mode it also sets the vCPU count."""
    p = run(vmrt, "process", "--rm", "--cpus", "1", "busybox", "nproc").stdout.strip()
    v = run(vmrt, "vm", "--rm", "--cpus", "1", "busybox", "nproc").stdout.strip()
    assert int(p) == os.cpu_count() and v == b"1"


def test_intended_difference_writable_layer(vmrt: Vmrt) -> None:
    """Both modes keep the writable layer on the host's disk until `vmrt rm`, across starts
    (issue 16): a process container's is a directory the host's overlay writes; a VM
    container's an ext4 image in one file that only its guest reads (vm/disk.py)."""
    for m in MODES:
        assert run(vmrt, m, "--name", f"layer-{m}", "busybox", "sh", "-c",
                   "cat /written 2>/dev/null; echo hi >> /written").returncode == 0
    db = sqlite3.connect(vmrt.root / "state.db")
    ids = dict(db.execute("SELECT name, id FROM containers WHERE name LIKE 'layer-%'").fetchall())
    db.close()
    try:
        for m in MODES:  # the same container again: its layer is still there
            r = vmrt("start", "-a", f"layer-{m}", timeout=300)
            assert r.returncode == 0 and r.stdout == b"hi\n", (m, r.stdout, r.stderr)
        assert (vmrt.root / "rw" / ids["layer-process"] / "upper" / "written").read_text() == "hi\nhi\n"
        assert sorted(os.listdir(vmrt.root / "rw" / ids["layer-vm"])) == ["disk.img"]
    finally:
        for m in MODES:
            vmrt("rm", f"layer-{m}")
    assert not (vmrt.root / "rw" / ids["layer-process"]).exists()
    assert not (vmrt.root / "rw" / ids["layer-vm"]).exists()
