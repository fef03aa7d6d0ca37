"""`vmrt run --isolation=vm` end to end: real QEMU boots, real agent, real image."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt, one_line_error, vmm_pids

pytestmark = pytest.mark.vm
RUN = ("run", "--rm", "--isolation=vm")


def read_until(stream, needle: bytes, timeout: float = 120) -> bytes:  # type: ignore[no-untyped-def]
    buf = b""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {needle!r}; got {buf!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf


@contextlib.contextmanager
def ready(vmrt: Vmrt, *args: str, **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    """A `vmrt run` that has printed "ready"; killed on the way out if still running."""
    p = vmrt.popen(*args, **kw)
    try:
        read_until(p.stdout, b"ready")
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for n in sorted(filenames + dirnames):
            p = Path(dirpath, n)
            st = p.lstat()
            h.update(f"{p.relative_to(root)} {st.st_mode} {st.st_size} {st.st_mtime_ns}".encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


def test_main_job_prints_hello_and_guest_kernel(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "busybox", "sh", "-c", "echo hello; uname -r; exit 3")
    assert r.returncode == 3, r.stderr
    out = r.stdout.decode().splitlines()
    assert out[0] == "hello"
    assert out[1].startswith("6.1.") and out[1] != os.uname().release
    assert r.stderr == b""


@pytest.mark.parametrize("cmd,code", [
    (["true"], 0),
    (["sh", "-c", "exit 42"], 42),
    # a child killed by signal N: the shell reports 128+N, as Docker shows it
    (["sh", "-c", "sh -c 'kill -TERM $$'; exit $?"], 143),
])
def test_exit_codes(vmrt: Vmrt, cmd: list[str], code: int) -> None:
    r = vmrt(*RUN, "busybox", *cmd)
    assert r.returncode == code, r.stderr


def test_container_init_ignores_unhandled_signals_like_docker(vmrt: Vmrt) -> None:
    # the process is PID 1 of its own PID namespace in the guest, as under Docker/runc
    r = vmrt(*RUN, "busybox", "sh", "-c", "kill -KILL $$; kill -TERM $$; echo survived")
    assert (r.returncode, r.stdout) == (0, b"survived\n")


def test_command_not_found_is_127(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "busybox", "no-such-command")
    assert r.returncode == 127
    assert "executable file not found" in one_line_error(r.stderr)


def test_not_executable_is_126(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "busybox", "/etc/passwd")
    assert r.returncode == 126
    assert "permission denied" in one_line_error(r.stderr)


def test_stdout_and_stderr_stay_separate(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "busybox", "sh", "-c", "echo out; echo err >&2; echo out2")
    assert r.returncode == 0
    assert r.stdout == b"out\nout2\n"
    assert r.stderr == b"err\n"


def test_stdin_is_piped_with_i(vmrt: Vmrt) -> None:
    data = b"".join(b"line %d\n" % i for i in range(2000))
    r = vmrt(*RUN, "-i", "busybox", "sh", "-c", "cat; echo done", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data + b"done\n"
    r = vmrt(*RUN, "busybox", "sh", "-c", "cat; echo empty", input=b"ignored")
    assert r.stdout == b"empty\n"


def test_env_cwd_user_hostname(vmrt: Vmrt, tmp_path: Path) -> None:
    envfile = tmp_path / "env"
    envfile.write_text("# comment\nFROM_FILE=yes\nOVERRIDE=file\n")
    r = vmrt(*RUN, "-e", "FOO=bar baz", "--env-file", str(envfile), "-e", "OVERRIDE=flag",
             "-w", "/work/dir", "-u", "vmrt", "--hostname", "box1", "busybox",
             "sh", "-c", 'echo "$FOO|$FROM_FILE|$OVERRIDE|$HOME"; pwd; id; hostname; cat /etc/hostname')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "bar baz|yes|flag|/home/vmrt"
    assert lines[1] == "/work/dir"
    assert lines[2].startswith("uid=1000(vmrt) gid=1000(vmrt)")
    assert "100(users)" in lines[2] and "29(audio)" in lines[2]
    assert lines[3:] == ["box1", "box1"]
    r = vmrt(*RUN, "-u", "65534:100", "busybox", "id")
    assert r.stdout.decode().startswith("uid=65534(nobody) gid=100(users)")


def test_container_is_pid_1_with_image_env(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "busybox", "sh", "-c", "echo $$; echo $PATH; cat /proc/1/cmdline | tr '\\0' ' '")
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "1"
    assert lines[1] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert lines[2].startswith("sh -c")


def test_entrypoint_override(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "--entrypoint", "echo", "busybox", "a", "b")
    assert r.stdout == b"a b\n"


def test_signal_to_vmrt_reaches_the_process(vmrt: Vmrt) -> None:
    with ready(vmrt, *RUN, "busybox", "sh", "-c",
                     'trap "echo got TERM; exit 7" TERM; echo ready; while true; do sleep 0.2; done') as p:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 7, err
    assert b"got TERM" in out


def test_two_stop_signals_kill_and_tear_down(vmrt: Vmrt) -> None:
    with ready(vmrt, *RUN, "busybox", "sh", "-c", "echo ready; exec sleep 1000") as p:
        p.send_signal(signal.SIGTERM)   # sleep as PID 1 ignores it, as in Docker
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
    assert p.returncode == 137


def test_tty_is_a_real_terminal_with_window_size(vmrt: Vmrt) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    p = vmrt.popen(*RUN, "-t", "busybox", "sh", "-c", "tty; stty size; test -t 0 && echo isatty",
                   stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 1)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert p.returncode == 0, text
    assert "/dev/pts/" in text
    assert "33 101" in text
    assert "isatty" in text


def test_writes_never_change_the_image(vmrt: Vmrt) -> None:
    layers = vmrt.root / "layers"
    blobs = vmrt.root / "images"
    before = (tree_digest(layers), tree_digest(blobs))
    r = vmrt(*RUN, "busybox", "sh", "-c",
             "echo pwned > /bin/busybox.new && rm -f /bin/ls && echo x >> /etc/passwd && "
             "rm -rf /home && touch /newfile && ls /newfile")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"/newfile\n"
    assert (tree_digest(layers), tree_digest(blobs)) == before
    r = vmrt(*RUN, "busybox", "sh", "-c", "ls /bin/ls /home; test -e /newfile || echo fresh")
    assert r.returncode == 0 and r.stdout.endswith(b"fresh\n")


def test_read_only_rootfs(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "--read-only", "busybox", "sh", "-c", "touch /x || echo refused")
    assert b"refused" in r.stdout


def test_memory_and_cpus_size_the_vm(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "--memory", "160m", "--cpus", "2", "busybox", "sh", "-c",
             "grep MemTotal /proc/meminfo; nproc")
    assert r.returncode == 0, r.stderr
    mem_kib = int(r.stdout.split()[1])  # the limit plus room for the guest kernel and agent
    assert 160 * 1024 < mem_kib <= (160 + 64) * 1024
    assert r.stdout.decode().splitlines()[1] == "2"


def test_timings_report_every_phase(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "--timings", "busybox", "echo", "hi")
    assert r.returncode == 0
    err = r.stderr.decode()
    for phase in ("vmm-spawned", "kernel-up", "agent-ready", "process-started", "first-output",
                  "exit", "teardown-done"):
        assert phase in err, err
    assert "accel=tcg" in err or "accel=kvm" in err


def test_named_container_lifecycle(vmrt: Vmrt) -> None:
    r = vmrt("run", "--name", "keepme", "busybox", "sh", "-c", "exit 5")
    assert r.returncode == 5
    r = vmrt("run", "--name", "keepme", "busybox", "true")
    assert r.returncode == 125
    assert "already in use" in one_line_error(r.stderr)
    ps = vmrt("ps", "-a").stdout.decode()
    assert "keepme" in ps and "Exited (5)" in ps
    assert (vmrt.root / "containers").exists()
    r = vmrt("rm", "keepme")
    assert r.returncode == 0
    assert "keepme" not in vmrt("ps", "-a").stdout.decode()


def test_vmm_killed_is_reported_as_failure(vmrt: Vmrt) -> None:
    with ready(vmrt, *RUN, "busybox", "sh", "-c", "echo ready; exec sleep 1000") as p:
        qemu = vmm_pids(vmrt.run_root)
        assert len(qemu) == 1
        os.kill(int(qemu[0]), signal.SIGKILL)
        _, err = p.communicate(timeout=60)
    assert p.returncode not in (0, None)
    assert "VM stopped before the container exited" in one_line_error(err)


def _cmd(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_boot_timeout_names_the_phase(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "busybox", "true", env={"VMRT_TIMEOUT_AGENT_READY": "0.05"})
    assert r.returncode == 125
    assert "timed out" in one_line_error(r.stderr) and "guest agent" in r.stderr.decode()


@pytest.mark.parametrize("args,needle", [
    (("run", "--rm", "no-such-image", "true"), "Unable to find image"),
    (("run", "--rm", "NOT/valid image", "true"), "invalid reference"),
    (("run", "--rm", "--bogus-flag", "busybox", "true"), "No such option"),
    (("run", "--rm", "--memory", "lots", "busybox", "true"), "invalid memory size"),
    (("run", "--rm", "--cpus", "x", "busybox", "true"), "--cpus"),
    (("run", "--rm", "--isolation", "bogus", "busybox", "true"), "invalid isolation"),
    (("run", "--rm", "--kernel", "/nonexistent/vmlinux", "busybox", "true"), "not found"),
    (("run", "--rm", "-w", "relative", "busybox", "true"), "absolute path"),
    (("run", "--rm", "-u", "nosuchuser", "busybox", "true"), "unable to find user"),
    (("run", "--rm", "--isolation=process", "--runtime", "nosuchruntime", "busybox", "true"), "not found"),
    (("run", "--rm", "busybox"), None),
])
def test_bad_input_is_one_line_and_125(vmrt: Vmrt, args: tuple[str, ...], needle: str | None) -> None:
    r = vmrt(*args, timeout=120)
    if needle is None:  # no command: image Cmd "sh" with stdin closed exits 0
        assert r.returncode == 0
        return
    assert r.returncode == 125, (r.returncode, r.stderr)
    assert needle in one_line_error(r.stderr)


def test_missing_kernel_build_is_explained(vmrt: Vmrt, tmp_path: Path) -> None:
    r = vmrt(*RUN, "busybox", "true", env={"VMRT_CACHE": str(tmp_path / "empty-cache")})
    assert r.returncode == 125
    assert "vmrt kernel build" in one_line_error(r.stderr)


def test_hyperv_alias_and_default_isolation(vmrt: Vmrt) -> None:
    r = vmrt("run", "--rm", "--isolation=hyperv", "busybox", "true")
    assert r.returncode == 0
    r = vmrt("run", "--rm", "busybox", "uname", "-r", env={"VMRT_ISOLATION": "process"})
    assert r.returncode == 0 and r.stdout.decode().strip() == os.uname().release  # the host's kernel
    r = vmrt("run", "--rm", "--isolation=default", "busybox", "uname", "-r", env={"VMRT_ISOLATION": "vm"})
    assert r.returncode == 0 and r.stdout.decode().strip() != os.uname().release
    for iso in ("process", "vm"):
        info = vmrt("info", env={"VMRT_ISOLATION": iso}).stdout.decode()
        assert f"Default isolation:   {iso}" in info
    assert "Process runtime:" in info and "runc" in info


def test_tcg_notice_when_auto(vmrt: Vmrt) -> None:
    from vmrt.vm.accel import probe_host
    if probe_host() == "kvm":
        pytest.skip("host has usable KVM")
    r = vmrt(*RUN, "busybox", "true", env={"VMRT_ACCEL": "auto"})
    assert r.returncode == 0
    line = one_line_error(r.stderr)
    assert "TCG" in line


def test_interrupt_during_boot_tears_down(vmrt: Vmrt) -> None:
    p = vmrt.popen(*RUN, "busybox", "sleep", "1000")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until QEMU exists, then interrupt the boot
        if vmm_pids(vmrt.run_root):
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode in (130, 137), err
    assert b"Traceback" not in err


def test_info_reports_accelerator_versions_and_kernel(vmrt: Vmrt) -> None:
    r = vmrt("info")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for key in ("Accelerator:", "QEMU:", "virtiofsd:", "Kernel:", "Kernel build id:", "State directory:"):
        assert key in out
    assert "QEMU emulator version" in out
    assert str(vmrt.root) in out
    # issue 17: the cache in use, and whether clones share memory (the jail: never)
    assert "VM cache:            snapshot=manual, pool=auto" in out  # the suite's setting (tests/support.py)
    assert "Clone memory:        private" in out and "(vm_memory=auto, jailed QEMU)" in out
    r = vmrt("info", env={"VMRT_VMM_JAIL": "0"})
    assert "Clone memory:        shared" in r.stdout.decode()
    r = vmrt("info", env={"VMRT_VMM_JAIL": "0", "VMRT_VM_MEMORY": "private"})
    assert "Clone memory:        private" in r.stdout.decode()


def test_images_lists_busybox(vmrt: Vmrt) -> None:
    r = vmrt("images")
    assert r.returncode == 0
    assert any(line.split()[:2] == ["busybox", "latest"] for line in r.stdout.decode().splitlines()[1:])


def test_q35_machine_boots_too(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "busybox", "sh", "-c", "echo q35", env={"VMRT_MACHINE": "q35"})
    assert (r.returncode, r.stdout) == (0, b"q35\n"), r.stderr


def _pids_of(vmrt: Vmrt, needle: str) -> list[int]:
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit()
            and needle in _cmd(pid) and str(vmrt.run_root) in _cmd(pid)]


def test_virtiofsd_death_fails_the_container_cleanly(vmrt: Vmrt) -> None:
    with ready(vmrt, *RUN, "busybox", "sh", "-c", "echo ready; sleep 1000") as p:
        for pid in _pids_of(vmrt, "virtiofsd"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 125
    assert "virtiofsd stopped" in one_line_error(err)


def test_rm_force_kills_a_running_container(vmrt: Vmrt) -> None:
    with ready(vmrt, "run", "--name", "victim", "busybox", "sh", "-c", "echo ready; sleep 1000") as p:
        r = vmrt("rm", "victim")
        assert r.returncode != 0 and b"use -f" in r.stderr
        r = vmrt("rm", "-f", "victim")
        assert r.returncode == 0, r.stderr
        p.communicate(timeout=60)
    assert p.returncode not in (0, None)
    assert "victim" not in vmrt("ps", "-a").stdout.decode()


def test_workdir_through_leaked_fd_is_refused(vmrt: Vmrt) -> None:
    # CVE-2024-21626 shape: no host fd is reachable as the working directory
    r = vmrt(*RUN, "-w", "/proc/self/fd/3", "busybox", "pwd")
    assert r.returncode == 125
    assert "chdir" in one_line_error(r.stderr)


def test_the_guest_kernel_has_what_debian_software_expects(vmrt: Vmrt) -> None:
    """Issue 16: IPv6 (at least ::1 on lo: Debian's nginx listens on [::]:80), AF_PACKET,
    dnotify and fanotify, full-size tables (no BASE_SMALL) and a Debian host's pid_max and
    threads-max (4194304, as systemd sets them), not 4096 and 1901."""
    r = vmrt(*RUN, "busybox", "sh", "-c",
             "cat /proc/net/if_inet6; test -e /proc/net/packet && echo packet; "
             "test -e /proc/sys/fs/dir-notify-enable && echo dnotify; "
             "test -d /proc/sys/fs/fanotify && echo fanotify; echo threads=$(cat /proc/sys/kernel/threads-max); "
             "echo pid_max=$(cat /proc/sys/kernel/pid_max)")
    out = r.stdout.decode()
    assert any(line.startswith("00000000000000000000000000000001 ") and line.split()[-1] == "lo"
               for line in out.splitlines()), out
    for feature in ("packet", "dnotify", "fanotify"):
        assert feature in out.splitlines(), out
    assert int(out.rsplit("pid_max=", 1)[1]) == 4194304, out
    assert int(out.split("threads=", 1)[1].split()[0]) == 4194304, out


def test_the_guest_takes_the_apic_timer_rate_from_the_host(vmrt: Vmrt) -> None:
    """Under TCG the host passes lapic_timer_period= (the project's kernel patch): the guest skips
    its ~250 ms calibration of the APIC timer against the PIT, and its timers keep real time."""
    if vmrt.env["VMRT_ACCEL"] != "tcg":
        pytest.skip("the parameter is for TCG guests (KVM offers the TSC deadline timer)")
    r = vmrt("run", "-d", "--isolation=vm", "--network", "none", "busybox", "sleep", "600",
             env={"VMRT_KERNEL_CMDLINE": "loglevel=7 apic=verbose"})
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        console = vmrt.run_root / "containers" / cid / "console.log"
        deadline = time.monotonic() + 30
        while "lapic timer already calibrated" not in (text := console.read_text(errors="replace")):
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.2)
        assert "lapic timer already calibrated 10000000" in text and "calibrating APIC timer" not in text
        t0 = time.monotonic()
        r = vmrt("exec", cid, "sleep", "2")
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert 2.0 <= elapsed < 6.0, elapsed
    finally:
        vmrt("rm", "-f", cid)


def _virtiofsd_cache(cid: str) -> str:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if args and args[0].endswith(b"virtiofsd") and any(cid.encode() in a for a in args):
                return next(a.decode().removeprefix("cache=") for a in args if a.startswith(b"cache="))
    raise AssertionError(f"no virtiofsd of {cid}")


def test_an_unchanging_share_is_cached_by_the_guest(vmrt: Vmrt, tmp_path: Path) -> None:
    """Issue 17: a cold VM whose share does not change while it runs (no bind volume, no user
    network) gets virtiofsd cache=always: the guest keeps the image's pages across opens. With a
    bind volume it stays cache=auto, and what the host writes there is what the container reads."""
    a = vmrt("run", "-d", "--isolation=vm", "busybox", "sleep", "120").stdout.decode().strip()
    (tmp_path / "f").write_text("one\n")
    b = vmrt("run", "-d", "--isolation=vm", "-v", f"{tmp_path}:/v", "busybox", "sleep", "120").stdout.decode().strip()
    try:
        assert _virtiofsd_cache(a) == "always" and _virtiofsd_cache(b) == "auto"
        assert vmrt("exec", b, "cat", "/v/f").stdout == b"one\n"
        (tmp_path / "f").write_text("two\n")
        deadline = time.monotonic() + 10  # virtiofsd auto: attributes are trusted for a second
        while (out := vmrt("exec", b, "cat", "/v/f").stdout) != b"two\n" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert out == b"two\n"
    finally:
        vmrt("rm", "-f", a, b)
    vmrt.assert_clean()


def test_docker_default_capabilities_and_no_new_privs(vmrt: Vmrt) -> None:
    r = vmrt(*RUN, "busybox", "grep", "-E", "^(CapBnd|CapEff|NoNewPrivs)", "/proc/self/status")
    fields = dict(line.split(":\t") for line in r.stdout.decode().splitlines())
    assert fields["CapBnd"] == fields["CapEff"] == "00000000a80425fb"  # Docker's default set
    assert fields["NoNewPrivs"] == "1"
    r = vmrt(*RUN, "-u", "vmrt", "busybox", "grep", "^CapEff", "/proc/self/status")
    assert r.stdout.decode().split()[1] == "0000000000000000"


def test_stdin_that_cannot_be_polled(vmrt: Vmrt) -> None:
    with open("/dev/null", "rb") as devnull:
        p = vmrt.popen(*RUN, "-i", "busybox", "sh", "-c", "cat; echo eof", stdin=devnull)
        out, err = p.communicate(timeout=120)
    assert (p.returncode, out) == (0, b"eof\n"), err


def test_large_stdin_is_relayed_with_backpressure(vmrt: Vmrt, tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(1 << 20) * 6)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    with open(src, "rb") as f:
        p = vmrt.popen(*RUN, "-i", "busybox", "sh", "-c", "sleep 2; sha256sum", stdin=f)
        out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert out.split()[0].decode() == digest


def test_one_stop_signal_is_bounded_by_stop_grace(vmrt: Vmrt) -> None:
    with ready(vmrt, *RUN, "busybox", "sh", "-c", "echo ready; exec sleep 1000",
                     env={"VMRT_TIMEOUT_STOP_GRACE": "1"}) as p:
        p.send_signal(signal.SIGTERM)   # ignored by PID 1 sleep, then killed after the grace
        _, err = p.communicate(timeout=60)
    assert p.returncode == 137
    assert "no exit 1s after signal 15" in one_line_error(err)


def test_non_utf8_argument_is_a_usage_error(vmrt: Vmrt) -> None:
    r = subprocess.run([*vmrt.cmd(*RUN, "busybox", "echo"), b"\xff"], capture_output=True,
                       env=vmrt.env, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 125
    assert "UTF-8" in one_line_error(r.stderr)


def test_guest_kernel_panic_is_reported_as_failure(vmrt: Vmrt) -> None:
    # no init in the initramfs: the guest kernel panics; panic=-1 + -no-reboot end QEMU
    r = vmrt(*RUN, "busybox", "true", env={"VMRT_KERNEL_CMDLINE": "rdinit=/no-such-init"})
    assert r.returncode == 125
    line = one_line_error(r.stderr)
    assert "VM stopped before the container exited" in line and "panic" in line.lower()
