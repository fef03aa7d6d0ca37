"""The libvirt VM driver (``vm_driver = libvirt``, vmrt/drivers/libvirt.py) against a libvirtd of
the test's own.

The daemon is Debian's ``/usr/sbin/libvirtd``, started by the module's fixture in a mount namespace
of its own: its config dir (/etc/libvirt: libvirtd.conf with its sockets in a temporary dir, and a
qemu.conf with ``stdio_handler = "file"``, since no virtlogd runs here) and its state, log and cache
dirs (tmpfs over /run, /var/lib, /var/log, /var/cache, seen by it alone) are its own, so nothing of
the host's libvirt (none runs here; its default socket is never touched) is used or changed, and
when it ends its whole footprint goes with its namespace. Only its QEMU driver module is loaded
(``LIBVIRT_DRIVER_DIR``): no network, nwfilter or storage driver makes bridges or firewall rules.
vmrt reaches it as ``qemu+unix:///system?socket=<tmp>/libvirt-sock``.

The behaviour suite's cases (tests/test_behaviour.py) run here with the module's ``vmrt`` fixture
overriding conftest's: the same cases, every ``--isolation=vm`` run through libvirt.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Started, Vmrt, audit, failed, one_line_error, private_vmrt

libvirt = pytest.importorskip("libvirt", reason="libvirt-python (the libvirt extra) is not installed")

LIBVIRTD = Path("/usr/sbin/libvirtd")
TINI = shutil.which("tini") or "/usr/bin/tini"
DRIVERS = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver")
pytestmark = [pytest.mark.vm, pytest.mark.skipif(not LIBVIRTD.exists(), reason="no libvirtd (libvirt-daemon)")]

CLONE_NEWNS, MS_REC, MS_SLAVE, MS_SHARED, MS_BIND = 0x00020000, 0x4000, 1 << 19, 1 << 20, 4096
DEFAULT_QEMU_UID = 0x40000000 + 0x3FFFFF  # the daemon's default QEMU user: vmrt gives each domain its own


def _in_private_mounts(etc: Path) -> None:
    """(In the daemon's child, before exec.) A mount namespace of its own: its config over
    /etc/libvirt, tmpfs over the dirs libvirtd keeps state, logs and caches in."""
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(src: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
        if libc.mount(src, target, fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target!r}")

    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    # slave: what the host mounts under the domains' dir (a shared mount, below) reaches it; nothing
    # it mounts reaches the host
    mount(None, b"/", None, MS_REC | MS_SLAVE, None)
    for d in (b"/run", b"/var/lib", b"/var/log", b"/var/cache"):
        mount(b"tmpfs", d, b"tmpfs", 0, b"mode=0755")
    mount(str(etc).encode(), b"/etc/libvirt", None, MS_BIND, None)
    for name in ("passwd", "group"):  # with its default QEMU user, which Debian's libvirt resolves at start
        mount(str(etc / name).encode(), f"/etc/{name}".encode(), None, MS_BIND, None)
    if os.path.exists("/dev/kvm"):
        # here /dev/kvm is there, open to all, and unusable (no nested virtualization): libvirt's
        # capabilities probe finds no KVM, and its cache check then sees a /dev/kvm its QEMU user
        # could open and drops the cache at every lookup (a dozen ~0.6 s probes per domain start).
        # Its daemon sees a root-only file there instead: no KVM, as the probe found.
        mount(str(etc / "no-kvm").encode(), b"/dev/kvm", None, MS_BIND, None)


class Libvirtd:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.sock_dir = base / "sock"
        self.etc = base / "etc"
        self.drivers = base / "drivers"
        for d in (self.sock_dir, self.etc, self.drivers):
            d.mkdir(mode=0o700)
        (self.drivers / "libvirt_driver_qemu.so").symlink_to(DRIVERS / "libvirt_driver_qemu.so")
        (self.etc / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.sock_dir}"\nunix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n'
            'unix_sock_admin_perms = "0700"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            + (os.environ.get('VLV_EXTRA') or 'log_outputs = "3:stderr"\n'))
        (self.etc / "qemu.conf").write_text(
            f'user = "+{DEFAULT_QEMU_UID}"\ngroup = "+{DEFAULT_QEMU_UID}"\nstdio_handler = "file"\n'
            # no mount namespace per QEMU: libvirt moves every mount under /dev into the one it would
            # make, and the bind over /dev/kvm below cannot be moved (EINVAL)
            'dynamic_ownership = 1\nremember_owner = 1\nnamespaces = []\n')
        # libvirt-daemon-system (the libvirt-qemu user, /var/lib/libvirt...) is not installed: the
        # daemon alone sees a passwd and group that have the user its QEMU driver looks up at start
        u = DEFAULT_QEMU_UID
        passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
        user = f"libvirt-qemu:x:{u}:{u}::/nonexistent:/usr/sbin/nologin\n"
        (self.etc / "passwd").write_text(passwd.rstrip("\n") + "\n" + user)
        (self.etc / "group").write_text(group.rstrip("\n") + f"\nlibvirt-qemu:x:{u}:\n"
                                        + ("" if "\nkvm:" in "\n" + group else f"kvm:x:{u + 1}:\n"))
        (self.etc / "no-kvm").touch(mode=0o600)
        # the domains' dir (vmrt's libvirt_dir): 0711, its QEMUs reach their own dirs in it; a shared
        # mount, so that a disk vmrt binds there (its state root is a mount of its own: no hard link)
        # is seen in the daemon's namespace too, as in a system daemon's (the host's own)
        self.lvdir = Path(tempfile.mkdtemp(prefix="vlv-"))  # short: the channel sockets' paths
        self.lvdir.chmod(0o711)
        subprocess.run(["mount", "--bind", str(self.lvdir), str(self.lvdir)], check=True)
        subprocess.run(["mount", "--make-shared", str(self.lvdir)], check=True)
        self.uri = f"qemu+unix:///system?socket={self.sock_dir}/libvirt-sock"
        self.log = open(base / "libvirtd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.cgroup_before = Path("/sys/fs/cgroup/machine").exists()
        self.proc = subprocess.Popen(
            # under tini as a child subreaper: the QEMU that libvirtd starts to probe its capabilities
            # daemonizes, and this machine's PID 1 reaps no orphan; libvirtd would wait for the
            # zombie to go (~100 s) and keep no capabilities cache
            [TINI, "-s", "--", str(LIBVIRTD), "--config", str(self.etc / "libvirtd.conf"),
             "--pid-file", str(base / "libvirtd.pid")],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
            env={"PATH": os.environ["PATH"], "LIBVIRT_DRIVER_DIR": str(self.drivers)},
            preexec_fn=lambda: _in_private_mounts(self.etc))
        deadline = time.monotonic() + 60
        while not (self.sock_dir / "libvirt-sock").exists():
            assert self.proc.poll() is None, self.log_text()
            assert time.monotonic() < deadline, "libvirtd did not come up: " + self.log_text()
            time.sleep(0.1)

    def log_text(self) -> str:
        return (self.base / "libvirtd.log").read_text(errors="replace")[-4000:]

    def domains(self) -> list[str]:
        conn = libvirt.open(self.uri)
        try:
            return [d.name() for d in conn.listAllDomains()]
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        subprocess.run(["umount", "-l", str(self.lvdir)], check=False)
        if not self.cgroup_before:  # the cgroup partition libvirt made for its domains (empty now)
            with contextlib.suppress(OSError):
                for d in sorted(Path("/sys/fs/cgroup/machine").glob("**/"), key=lambda p: -len(p.parts)):
                    d.rmdir()


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    base = Path(tempfile.mkdtemp(prefix="vlvd-"))  # short: socket paths
    d = Libvirtd(base)
    try:
        yield d
    finally:
        left = d.domains() if d.proc.poll() is None else []
        d.stop()
        pid = d.proc.pid
        # the domains' dirs (the uids allocation's record, UIDS_NAME, stays as a lock file would)
        lv_left = [p for p in (d.lvdir / "d").iterdir() if p.name != "uids"] if (d.lvdir / "d").exists() else []
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(d.lvdir, ignore_errors=True)
        assert not lv_left, f"domain dirs left: {lv_left}"
        assert not left, f"domains left in libvirt: {left}"
        assert not Path(f"/proc/{pid}").exists(), "libvirtd still runs"
        assert not Path("/sys/fs/cgroup/machine").exists() or d.cgroup_before, "libvirt's cgroups left"


@pytest.fixture(scope="module")
def lv_session(tmp_path_factory: pytest.TempPathFactory, libvirtd: Libvirtd, built: None) -> Iterator[Vmrt]:
    v = private_vmrt(tmp_path_factory.mktemp("vmrt-libvirt"))
    v.env.update(VMRT_VM_DRIVER="libvirt", VMRT_LIBVIRT_URI=libvirtd.uri, VMRT_LIBVIRT_DIR=str(libvirtd.lvdir / "d"))
    yield v


@pytest.fixture
def vmrt(lv_session: Vmrt, libvirtd: Libvirtd, owned_processes: Started,
         request: pytest.FixtureRequest) -> Iterator[Vmrt]:
    """conftest's ``vmrt`` (the leak check at the end) with every VM run through libvirt; also no
    domain may be left in the daemon."""
    yield lv_session
    audit(lv_session, failed=failed(request), started=owned_processes)
    deadline = time.monotonic() + 10
    while (left := libvirtd.domains()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"domains left: {left}"


# --- the behaviour suite's VM cases, through libvirt -------------------------------------------
from test_behaviour import (  # noqa: E402 - after the fixture that overrides conftest's `vmrt`
    test_bad_input_is_125_in_both,
    test_cpus_bound_the_host_side,
    test_env,
    test_exec_errors,
    test_exit_codes,
    test_hostname,
    test_image_is_never_modified,
    test_intended_difference_cpu_count,
    test_intended_difference_kernel,
    test_intended_difference_writable_layer,
    test_memory_limit_oom_137_and_flag,
    test_pids_limit,
    test_privileges,
    test_read_only_root,
    test_rm_and_exited_record,
    test_same_syscall_filter_and_masks,
    test_signal_is_forwarded_to_the_container,
    test_stdin_with_and_without_i,
    test_stdout_and_stderr_are_separate,
    test_symlinked_mount_target_stays_inside,
    test_tmpfs,
    test_tty,
    test_unhandled_stop_is_killed_after_grace_137,
    test_user,
    test_volume_directory_created_and_mount_option,
    test_volumes_rw_and_ro,
    test_workdir,
    test_workdir_cannot_be_a_leaked_fd,
)

# every case of tests/test_behaviour.py, each of its VM runs through libvirt
BEHAVIOUR = [test_exit_codes, test_exec_errors, test_bad_input_is_125_in_both, test_stdout_and_stderr_are_separate,
             test_stdin_with_and_without_i, test_env, test_user, test_workdir, test_workdir_cannot_be_a_leaked_fd,
             test_hostname, test_tty, test_privileges, test_signal_is_forwarded_to_the_container,
             test_unhandled_stop_is_killed_after_grace_137, test_rm_and_exited_record, test_image_is_never_modified,
             test_volumes_rw_and_ro, test_volume_directory_created_and_mount_option,
             test_symlinked_mount_target_stays_inside, test_tmpfs, test_read_only_root,
             test_memory_limit_oom_137_and_flag, test_pids_limit, test_cpus_bound_the_host_side,
             test_intended_difference_kernel, test_same_syscall_filter_and_masks, test_intended_difference_cpu_count,
             test_intended_difference_writable_layer]


# --- the libvirt driver's own ------------------------------------------------------------------
def _domain_xml(libvirtd: Libvirtd, name: str) -> str:
    conn = libvirt.open(libvirtd.uri)
    try:
        return str(conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()


def _virsh_list(libvirtd: Libvirtd) -> str:
    return subprocess.run(["virsh", "-c", libvirtd.uri, "list", "--name"], capture_output=True, text=True,
                          check=True, timeout=30).stdout


def test_detached_domain_is_listed_with_its_metadata_and_confined(vmrt: Vmrt, libvirtd: Libvirtd) -> None:
    """run -d: a transient domain vmrt-<id12> that virsh lists, whose metadata names the container,
    whose QEMU runs as a uid of its own (not root); exec, logs, stop, rm go through it."""
    r = vmrt("run", "-d", "--isolation=vm", "--name", "lv1", "--cpus", "0.5", "-m", "64m", "busybox",
             "sh", "-c", "echo started; while true; do sleep 1; done")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        name = f"vmrt-{cid[:12]}"
        assert name in _virsh_list(libvirtd).split()
        xml = _domain_xml(libvirtd, name)
        assert f'id="{cid}"' in xml and 'name="lv1"' in xml
        assert "<global_quota>50000</global_quota>" in xml and "<global_period>100000</global_period>" in xml
        assert "machine='pc-q35" in xml.replace('"', "'")
        pid = int(vmrt("inspect", "--format", "{{.State.Pid}}", "lv1").stdout.decode().strip() or 0)
        assert pid > 0
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])
        assert uid >= 0x40000000, status  # neither root nor the daemon's shared default user
        assert uid != DEFAULT_QEMU_UID
        e = vmrt("exec", "lv1", "sh", "-c", "echo from-exec; cat /proc/cpuinfo | grep -c ^processor")
        assert e.returncode == 0, e.stderr
        assert e.stdout.decode().split()[0] == "from-exec"
        deadline = time.monotonic() + 30
        while b"started" not in vmrt("logs", "lv1").stdout and time.monotonic() < deadline:
            time.sleep(0.5)
        assert b"started" in vmrt("logs", "lv1").stdout
        st = vmrt("stats", "--no-stream", "--format", "{{json .}}", "lv1")
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout.decode().splitlines()[0])["Name"] == "lv1"
        s = vmrt("stop", "-t", "2", "lv1", timeout=120)
        assert s.returncode == 0, s.stderr
        deadline = time.monotonic() + 15  # libvirt forgets a transient domain once its QEMU is reaped
        while name in _virsh_list(libvirtd).split() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert name not in _virsh_list(libvirtd).split()
    finally:
        assert vmrt("rm", "-f", "lv1", timeout=120).returncode == 0


def test_kill_and_rm_of_a_running_domain(vmrt: Vmrt, libvirtd: Libvirtd) -> None:
    r = vmrt("run", "-d", "--isolation=vm", "--name", "lv2", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    k = vmrt("kill", "lv2", timeout=120)
    assert k.returncode == 0, k.stderr
    deadline = time.monotonic() + 60
    while f"vmrt-{cid[:12]}" in _virsh_list(libvirtd).split() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert f"vmrt-{cid[:12]}" not in _virsh_list(libvirtd).split()
    assert "Exited (137)" in vmrt("ps", "-a", "--filter", "name=lv2").stdout.decode()
    assert vmrt("rm", "lv2").returncode == 0


def test_a_crashed_owner_leaves_a_domain_that_rm_reconciles(vmrt: Vmrt, libvirtd: Libvirtd) -> None:
    """The attached vmrt killed with SIGKILL (no teardown at all): its domain stays in libvirt;
    ``vmrt rm -f`` destroys it (only the domain whose metadata names the container) and cleans up."""
    p = vmrt.popen("run", "--isolation=vm", "--name", "lv3", "busybox", "sh", "-c", "echo ready; sleep 300")
    assert p.stdout is not None
    assert p.stdout.readline().strip() == b"ready"
    cid = vmrt("ps", "-q", "--no-trunc", "--filter", "name=lv3").stdout.decode().strip()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert f"vmrt-{cid[:12]}" in _virsh_list(libvirtd).split()
    r = vmrt("rm", "-f", "lv3", timeout=120)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 15
    while f"vmrt-{cid[:12]}" in _virsh_list(libvirtd).split() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"vmrt-{cid[:12]}" not in _virsh_list(libvirtd).split()
    assert not (Path(vmrt.env["VMRT_LIBVIRT_DIR"]) / cid[:16]).exists()


def test_label_uid_reads_only_a_numeric_dac_label() -> None:
    """The uids of other domains (any libvirt user's XML) are read strictly: the DAC label's user
    as digits, anything else is no uid."""
    from vmrt.drivers.libvirt import label_uid
    dac = "<domain><seclabel type='static' model='dac'><label>{}</label></seclabel></domain>"
    assert label_uid(dac.format("+1078000001:+1078000001")) == 1078000001
    assert label_uid(dac.format("107:108")) == 107
    for bad in ("libvirt-qemu:kvm", "+-1:+1", "", "+99999999999:+1", "+1e3:+1"):
        assert label_uid(dac.format(bad)) is None, bad
    assert label_uid("<domain><seclabel model='apparmor'><label>+5:+5</label></seclabel></domain>") is None
    assert label_uid("<domain") is None and label_uid("<domain/>") is None


def _attached_then_owner_killed(vmrt: Vmrt, name: str) -> str:
    """An attached VM run whose vmrt is SIGKILLed once its command runs: its domain stays. Its ID."""
    p = vmrt.popen("run", "--isolation=vm", "--name", name, "busybox", "sh", "-c", "echo ready; sleep 300")
    assert p.stdout is not None
    assert p.stdout.readline().strip() == b"ready"
    cid = vmrt("ps", "-q", "--no-trunc", "--filter", f"name={name}").stdout.decode().strip()
    p.send_signal(signal.SIGKILL)
    p.wait()
    return cid


def _ids(pid: int) -> tuple[int, int]:
    """A process's real uid and gid."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return (int(next(ln for ln in status if ln.startswith("Uid:")).split()[1]),
            int(next(ln for ln in status if ln.startswith("Gid:")).split()[1]))


def _running_as(uid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, StopIteration):
                if _ids(int(d.name))[0] == uid:
                    pids.append(int(d.name))
    return pids


def test_a_killed_owners_domain_keeps_its_uid_and_a_new_domain_gets_another(vmrt: Vmrt, libvirtd: Libvirtd) -> None:
    """The attacker's setup: A's vmrt is SIGKILLed, A's domain (QEMU as uid U) runs on; a new
    container B must not get U (its QEMU could then open A's disk, 0600 U's while A runs, or signal
    A's QEMU). The uid was the starting vmrt's PID, which a later vmrt can have. Here the collision
    is forced without PID luck: the allocation's record is set so that B's first candidate slot is
    A's, and A's dir (the record that would catch it first) is regrouped to root for the while, so
    only libvirt's live label of A and its QEMU's ids say U is taken (each alone suffices: with the
    process check taken out, B still skipped U and got the sleeper's uid); the next candidate is the
    uid of a process that runs (any QEMU libvirt no longer lists), the next the group of a domain
    dir left in libvirt_dir. B gets the slot after those three, A keeps U, and rm reconciles A."""
    from vmrt import config
    from vmrt.drivers.libvirt import UID_OFFSET, UID_SLOTS, UIDS_NAME, label_uid

    lvdir = Path(vmrt.env["VMRT_LIBVIRT_DIR"])
    base = config.load(vmrt.env).jail_uid_base + UID_OFFSET
    cid_a = _attached_then_owner_killed(vmrt, "lv5")
    name_a = f"vmrt-{cid_a[:12]}"
    dir_a = lvdir / cid_a[:16]
    ua = label_uid(_domain_xml(libvirtd, name_a))
    assert ua is not None and base <= ua < base + UID_SLOTS - 4
    assert _running_as(ua), "A's QEMU does not run as its label's uid"
    assert dir_a.stat().st_gid == ua
    fake = lvdir / ("f" * 16)
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        (lvdir / UIDS_NAME).write_text(f"{(ua - base - 1) % UID_SLOTS}\n")
        os.chown(dir_a, 0, 0)
        sleeper = subprocess.Popen(["setpriv", f"--reuid={ua + 1}", f"--regid={ua + 1}", "--clear-groups",
                                    "sleep", "300"])
        deadline = time.monotonic() + 10
        while _ids(sleeper.pid)[0] != ua + 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fake.mkdir(mode=0o700)
        os.chown(fake, 0, ua + 2)
        r = vmrt("run", "-d", "--isolation=vm", "--name", "lv6", "busybox", "sleep", "300", timeout=180)
        assert r.returncode == 0, r.stderr
        cid_b = r.stdout.decode().strip()
        # A's domain ran on, with its uid, while B's was made (the next vmrt command's reconcile
        # reaps it: checked before any)
        assert label_uid(_domain_xml(libvirtd, name_a)) == ua and _running_as(ua)
        os.chown(dir_a, 0, ua)
        ub = label_uid(_domain_xml(libvirtd, f"vmrt-{cid_b[:12]}"))
        assert ub == ua + 3, (ua, ub)
        assert (lvdir / cid_b[:16]).stat().st_gid == ub
        pid_b = int(vmrt("inspect", "--format", "{{.State.Pid}}", "lv6").stdout.decode().strip() or 0)
        assert _ids(pid_b) == (ub, ub)
    finally:
        with contextlib.suppress(OSError):
            os.chown(dir_a, 0, ua)
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        with contextlib.suppress(OSError):
            fake.rmdir()
        assert vmrt("rm", "-f", "lv6", timeout=120).returncode == 0
        assert vmrt("rm", "-f", "lv5", timeout=120).returncode == 0
    assert not dir_a.exists() and name_a not in _virsh_list(libvirtd).split()
    assert not _running_as(ua)


def test_a_reap_that_cannot_see_the_domain_gone_keeps_its_dir_for_the_next_rm(
        vmrt: Vmrt, libvirtd: Libvirtd, tmp_path: Path) -> None:
    """A domain's dir is what makes rm, prune and start reap it again (lifecycle reaps only where it
    is), so it may go only once libvirt says the domain is gone. libvirt is made unreachable for
    the first rm (this daemon will not be made to refuse a destroy: it SIGKILLs QEMU and forgets
    the domain): that rm cannot know, fails in one line (exit 1) naming the domain, and keeps the
    dir and the container's record; the next rm, libvirt reachable again, destroys what is left
    and removes both. Before, the first rm removed the dir and the record, and a domain still
    running then was never reaped."""
    cid = _attached_then_owner_killed(vmrt, "lv7")
    ddir = Path(vmrt.env["VMRT_LIBVIRT_DIR"]) / cid[:16]
    assert ddir.is_dir()
    r = vmrt("rm", "-f", "lv7", env={"VMRT_LIBVIRT_URI": f"qemu+unix:///system?socket={tmp_path}/none"},
             timeout=120)
    assert r.returncode == 1, r.stderr
    last = r.stderr.decode().strip().splitlines()[-1]
    assert "cannot connect to libvirt" in last and f"vmrt-{cid[:12]}" in last and "kept" in last, last
    assert "Traceback" not in r.stderr.decode()
    assert ddir.is_dir()
    assert vmrt("ps", "-a", "-q", "--no-trunc", "--filter", "name=lv7").stdout.decode().strip() == cid
    r = vmrt("rm", "-f", "lv7", timeout=120)
    assert r.returncode == 0, r.stderr
    assert not ddir.exists()
    assert f"vmrt-{cid[:12]}" not in _virsh_list(libvirtd).split()
    assert not vmrt("ps", "-a", "-q", "--filter", "name=lv7").stdout.strip()


def test_pool_and_snapshots_say_qemu_driver_only(vmrt: Vmrt) -> None:
    for args in (("pool", "start"), ("snapshot", "build")):
        r = vmrt(*args)
        assert r.returncode == 125
        assert "qemu driver only" in one_line_error(r.stderr)


def test_bad_vm_driver_is_one_line_125(vmrt: Vmrt) -> None:
    r = vmrt("run", "--rm", "--isolation=vm", "--vm-driver", "xen", "busybox", "true")
    assert r.returncode == 2 or r.returncode == 125  # click's usage error for a bad choice
    r = vmrt("run", "--rm", "--isolation=vm", "busybox", "true", env={"VMRT_VM_DRIVER": "xen"})
    assert r.returncode == 125 and "vm_driver 'xen'" in one_line_error(r.stderr)


def test_unreachable_libvirt_is_one_line_125(vmrt: Vmrt, tmp_path: Path) -> None:
    r = vmrt("run", "--rm", "--isolation=vm", "busybox", "true",
             env={"VMRT_LIBVIRT_URI": f"qemu+unix:///system?socket={tmp_path}/none"})
    assert r.returncode == 125
    assert "cannot connect to libvirt" in one_line_error(r.stderr)


def test_qemu_driver_flag_beside_libvirt_default(vmrt: Vmrt, libvirtd: Libvirtd) -> None:
    """``--vm-driver qemu`` over a libvirt default: vmrt's own QEMU, no domain."""
    r = vmrt("run", "--rm", "--isolation=vm", "--vm-driver", "qemu", "busybox", "sh", "-c", "echo q")
    assert r.returncode == 0 and r.stdout == b"q\n", r.stderr
    assert not libvirtd.domains()


def test_check_isolation_names_the_driver_and_its_confinement(vmrt: Vmrt, libvirtd: Libvirtd) -> None:
    """`vmrt check isolation`'s driver row (the probes' containers are the other tests' business:
    tests/test_check_isolation.py): libvirt's version, URI and the daemon's security drivers."""
    from vmrt import config, systemcmds
    line = systemcmds.vm_driver_line(config.load(vmrt.env))
    assert line.startswith("libvirt 9.") and libvirtd.uri in line, line
    assert "dac" in line.split("security drivers ")[1], line
    assert systemcmds.vm_driver_line(config.load({**vmrt.env, "VMRT_VM_DRIVER": "qemu"})).startswith("qemu")


def test_vm_driver_flag_is_kept_for_start(vmrt: Vmrt, libvirtd: Libvirtd) -> None:
    """`--vm-driver libvirt` over a qemu default: the container's domain, and again at `vmrt start`
    (the driver is in its meta, not taken from the setting of the day)."""
    env = {"VMRT_VM_DRIVER": "qemu"}
    r = vmrt("run", "-d", "--isolation=vm", "--vm-driver", "libvirt", "--name", "lv4", "busybox", "sleep", "300",
             env=env)
    assert r.returncode == 0, r.stderr
    name = f"vmrt-{r.stdout.decode().strip()[:12]}"
    try:
        assert name in _virsh_list(libvirtd).split()
        assert vmrt("stop", "-t", "1", "lv4", env=env, timeout=120).returncode == 0
        deadline = time.monotonic() + 15
        while name in _virsh_list(libvirtd).split() and time.monotonic() < deadline:
            time.sleep(0.2)
        s = vmrt("start", "lv4", env=env, timeout=120)
        assert s.returncode == 0, s.stderr
        assert name in _virsh_list(libvirtd).split()
    finally:
        assert vmrt("rm", "-f", "lv4", env=env, timeout=120).returncode == 0


def test_bench_measures_libvirt_beside_the_qemu_driver(vmrt: Vmrt, tmp_path: Path) -> None:
    """`vmrt bench --modes vm-q35,vm-libvirt`: start and idle memory of both drivers on q35."""
    out = tmp_path / "b.json"
    r = vmrt("bench", "--runs", "1", "--parallel", "1", "--idle", "1", "--modes", "vm-q35,vm-libvirt",
             "--only", "start,memory", "--json", str(out), "--plots", str(tmp_path / "p"), timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert {k: v["status"] for k, v in doc["modes"].items()} == {"vm-q35": "ok", "vm-libvirt": "ok"}
    start = doc["results"]["start"]
    assert start["vm-libvirt"]["setup"]["vm_driver"].startswith("libvirt (")
    assert start["vm-q35"]["setup"]["vm_driver"] == "qemu" and start["vm-q35"]["setup"]["machine"] == "q35"
    assert all(start[m]["serial"]["p50"] > 0 for m in ("vm-q35", "vm-libvirt"))
    mem = doc["results"]["memory"]
    assert "qemu-system-x86" in json.dumps(mem["vm-libvirt"])  # its QEMU counted (libvirtd's child)
