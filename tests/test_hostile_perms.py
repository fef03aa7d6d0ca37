"""Issue 14, part 3: nothing of a tenant is readable by another local user (CVE-2021-41091 class).

The attacker is user ``nobody`` on the host (every probe runs as uid/gid 65534 with no
supplementary groups, through ``setpriv``). A tenant runs ``vmrt run -d -e SECRET=...``,
prints its secret (so it is in container.log) and, as container root, plants a setuid
copy of busybox and a 0666 device node in its writable layer. nobody must not read
the config, the log, the database or any other file with the secret, list the state,
run or containers dirs or the writable layer, reach the setuid binary, or connect to
any of vmrt's sockets. Root's own commands (ps, logs, inspect, exec) keep working, and
a container running as nobody still reads its /etc/hosts and /etc/resolv.conf.

The vmrts here live under a world-traversable dir in /tmp (pytest's own tmp dirs are
0700, which would make every probe pass for the wrong reason): one made fresh, one made
0755 as vmrt did before (the upgrade path: closed when vmrt next starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SLOT, Started, Vmrt, audit, failed, private_vmrt

pytestmark = pytest.mark.root  # private vmrts; probes switch to user nobody; chown
MODES = ["process", pytest.param("vm", marks=pytest.mark.vm)]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SHARED = {"hosts", "resolv.conf", "hostname"}  # read inside the container by any uid: 0644 on purpose

# Runs as nobody: each probe's outcome ("ok" or the errno's name), and what a walk of the
# whole tree could read. Benign: it lists, stats, reads a byte, connects, and runs a
# binary with `true`; it writes nothing.
PROBE = r"""
import errno, json, os, socket, stat, subprocess, sys
req = json.load(sys.stdin)
def outcome(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def read(p):
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        os.read(fd, 1)
    finally:
        os.close(fd)
def connect(p):
    os.chdir(os.path.dirname(p))  # sun_path is short; the attacker may chdir as well
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(os.path.basename(p))
def run(p):
    r = subprocess.run([p, "true"], capture_output=True)
    if r.returncode:
        raise OSError(errno.EIO, "exit %d" % r.returncode)
ops = {"list": os.listdir, "stat": os.lstat, "read": read, "connect": connect, "exec": run}
out = {"probes": [[op, p, outcome(lambda: ops[op](p))] for op, p in req["probes"]], "found": [], "listed": []}
for top in req["walk"]:
    for d, dirs, files in os.walk(top):
        out["listed"].append(d)
        for f in files:
            p = os.path.join(d, f)
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode) and req["secret"].encode() in os.read(fd, 1 << 20):
                    out["found"].append(p)
            finally:
                os.close(fd)
print(json.dumps(out))
"""


def as_nobody(probes: list[tuple[str, Path]], walk: list[Path] = (), secret: str = "") -> dict:  # type: ignore[type-arg, assignment]
    req = {"probes": [[op, str(p)] for op, p in probes], "walk": [str(p) for p in walk], "secret": secret}
    r = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", PROBE], input=json.dumps(req).encode(),
                       capture_output=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _world_traversable_base(kind: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=f"vmrt-perm{SLOT}{kind}-", dir="/tmp"))
    base.chmod(0o755)
    return base


def _teardown(v: Vmrt, base: Path) -> None:
    try:
        v("pool", "stop")
        r = v("ps", "-aq")
        if ids := r.stdout.decode().split():
            v("rm", "-f", *ids)
        v.assert_clean(timeout=30)
    finally:
        v.close()  # what a failed test left running is stopped before its dirs go
        if str(v.root) in mount_points():  # the store's own nosuid,nodev,noexec bind (vmrt/safefs.py)
            subprocess.run(["umount", "-R", str(v.root)], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh(built: None) -> Iterator[Vmrt]:
    """A vmrt whose root and run root did not exist: vmrt makes them."""
    base = _world_traversable_base("f")
    v = private_vmrt(base)
    yield v
    _teardown(v, base)


@pytest.fixture(scope="module")
def upgraded(built: None) -> Iterator[Vmrt]:
    """A vmrt installed before this change: root, run root and their dirs 0755, files 0644
    (one old container's config with a secret in it among them)."""
    base = _world_traversable_base("u")
    for d in (base / "root" / "containers" / "0ld", base / "root" / "rw", base / "run" / "containers"):
        d.mkdir(parents=True)
    (base / "root" / "containers" / "0ld" / "config.json").write_text('{"env": ["OLD_SECRET=hunter2"]}')
    for p in [base / "root", base / "run", *base.glob("*/**/*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    v = Vmrt(base / "root", base / "run")
    assert as_nobody([("read", base / "root/containers/0ld/config.json")])["probes"][0][2] == "ok"  # the hole
    r = v("image", "build", str(Path(__file__).resolve().parent.parent / "images" / "busybox"))
    assert r.returncode == 0, r.stderr
    for p in (base / "root" / "state.db", base / "root" / "state.db-wal", base / "root" / "state.db-shm"):
        with contextlib.suppress(FileNotFoundError):
            p.chmod(0o644)  # as an old vmrt left them
    yield v
    _teardown(v, base)


@pytest.fixture(params=["fresh", "upgraded"])
def vroot(request: pytest.FixtureRequest, owned_processes: Started) -> Iterator[Vmrt]:
    v: Vmrt = request.getfixturevalue(request.param)
    yield v
    audit(v, failed=failed(request), started=owned_processes, timeout=15)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def mount_points() -> set[str]:
    """(os.path.ismount misses a bind mount within one file system)"""
    return {ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()}


def private_tree(top: Path) -> list[str]:
    """What under ``top`` (not crossing mounts: the container's root, the share's image,
    its netns) another user could reach if its dirs were open: files and dirs with any
    group/other bit, besides the /etc files a container reads as any uid."""
    wide, mounts = [], mount_points()
    for d, dirs, files in os.walk(top):
        dirs[:] = [x for x in dirs if os.path.join(d, x) not in mounts]
        if mode(Path(d)) & 0o077:
            wide.append(f"{d} {mode(Path(d)):o}")
        for f in files:
            p = Path(d) / f
            st = os.lstat(p)
            if str(p) in mounts or stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode):
                continue  # sockets: probed by connecting; mount points: the bound file's own mode
            want = 0o644 if p.parent.name == "net" and f in SHARED else None
            if (stat.S_IMODE(st.st_mode) != want) if want is not None else (st.st_mode & 0o077):
                wide.append(f"{p} {stat.S_IMODE(st.st_mode):o}")
    return wide


def sockets(*tops: Path) -> list[Path]:
    """Every UNIX socket file vmrt made under these dirs (not crossing mounts)."""
    found, mounts = [], mount_points()
    for top in tops:
        for d, dirs, files in os.walk(top):
            dirs[:] = [x for x in dirs if os.path.join(d, x) not in mounts]
            found += [Path(d) / f for f in files if stat.S_ISSOCK(os.lstat(Path(d) / f).st_mode)]
    return found


def vmrt_abstract_sockets() -> list[str]:
    return [ln.split()[-1] for ln in Path("/proc/net/unix").read_text().splitlines()[1:]
            if ln.split()[-1].startswith("@") and "vmrt" in ln.split()[-1]]


PLANT = ("cp /bin/busybox /suid && chmod 4755 /suid && mknod /null0 c 1 3 && chmod 666 /null0 && "
         'echo "the secret is $SECRET" && sleep 300')


@pytest.mark.parametrize("mode_", MODES)
def test_nobody_reads_nothing_of_a_tenant(vroot: Vmrt, mode_: str) -> None:
    if mode_ == "vm" and vroot.root.parent.name.startswith(f"vmrt-perm{SLOT}u"):
        pytest.skip("the upgrade path is the same for both modes: covered in process mode")
    v = vroot
    secret = f"s3cret-{os.getpid()}-{mode_}"
    r = v("run", "-d", "-i", f"--isolation={mode_}", "-e", f"SECRET={secret}", "busybox", "sh", "-c", PLANT)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        deadline = time.monotonic() + 120
        while secret.encode() not in v("logs", cid).stdout:
            assert time.monotonic() < deadline, v("logs", cid)
            time.sleep(0.2)
        cdir, rdir, rw = v.root / "containers" / cid, v.run_root / "containers" / cid, v.root / "rw" / cid
        # root's view: the secret is there to steal, the files the probes aim at exist
        assert secret in (cdir / "config.json").read_text()
        assert secret in (cdir / "container.log").read_text()
        targets = [cdir / n for n in ("config.json", "monitor.json", "container.log")]
        targets += [v.root / "state.db"] + [p for p in (v.root / "state.db-wal", v.root / "state.db-shm") if p.exists()]
        targets += [rdir / "config.json", rdir / "net" / "hosts"]
        if mode_ == "process":
            targets += [rw / "upper" / "suid", rw / "upper" / "null0"]
            assert mode(rw / "upper" / "suid") == 0o4755
            assert stat.S_ISCHR(os.lstat(rw / "upper" / "null0").st_mode)
        else:
            targets += [rdir / "run.frame"]
        for t in targets:
            assert t.exists(), t
        socks = sockets(v.root, v.run_root)
        names = {s.name for s in socks}
        assert "attach.sock" in names, names
        if mode_ == "vm":
            assert "exec-0.sock" in names, names
        # the modes themselves: 0700 dirs, 0600 files (the container's own /etc files 0644)
        for top in (v.root, v.run_root, Path(os.environ.get("VMRT_CACHE", "/var/cache/vmrt"))):
            assert mode(top) == 0o700, top
        assert mode(v.root / "containers") == 0o700 or v.root.parent.name.startswith(f"vmrt-perm{SLOT}u")
        assert private_tree(cdir) == [] and private_tree(rdir) == []
        for n in ("state.db", "state.db-wal", "state.db-shm"):  # (the WAL files exist while it is open)
            assert not (v.root / n).exists() or mode(v.root / n) == 0o600 or v.root.parent.name.startswith(
                f"vmrt-perm{SLOT}u"), n
        if mode_ == "process":
            assert mode(rw) == 0o700 and mode(rw / "work") == 0o700
            assert mode(rw / "upper") == 0o755  # the container's "/": reachable only through its mount

        # the attacker: nobody
        probes = [("list", d) for d in (v.root, v.run_root, v.root / "containers", cdir, rdir,
                                        v.run_root / "containers", v.root / "rw", rw, rw / "upper")]
        probes += [("read", t) for t in targets]
        probes += [("stat", rw / "upper" / "suid"), ("exec", rw / "upper" / "suid"), ("read", rw / "upper" / "null0")]
        probes += [("connect", s) for s in socks]
        got = as_nobody(probes, walk=[v.root.parent], secret=secret)
        allowed = [p for p in got["probes"] if p[2] == "ok"]
        assert allowed == [], allowed
        assert all(p[2] in ("EACCES", "ENOENT") for p in got["probes"]), got["probes"]
        assert got["found"] == [], got["found"]
        listed = [d for d in got["listed"] if "/vol-" not in d]  # (another test's volume dirs: not vmrt's)
        assert listed == [str(v.root.parent)], listed  # the base only: nothing of vmrt's

        # root's commands still work
        assert secret.encode() in v("logs", cid).stdout
        r = v("ps", "--format", "json")
        assert r.returncode == 0 and cid[:12] in r.stdout.decode(), r
        r = v("inspect", cid)
        assert r.returncode == 0 and f"SECRET={secret}" in r.stdout.decode(), r.stderr
        r = v("exec", "-u", "nobody", cid, "sh", "-c", "id -u; cat /etc/hosts /etc/resolv.conf >/dev/null && umask")
        assert r.returncode == 0 and r.stdout.split() == [b"65534", b"0022"], r
        assert vmrt_abstract_sockets() == []  # a name any local user could bind first (exec ports use flock)
    finally:
        v("rm", "-f", cid)


@pytest.mark.parametrize("mode_", MODES)
def test_a_container_as_nobody_reads_its_etc_files(fresh: Vmrt, mode_: str) -> None:
    """The managed /etc files are 0644 (not the umask's 0600) and a volume's missing parents,
    made by the runtime, are 0755 as under Docker: uid 65534 inside reads them."""
    vol = fresh.root.parent / f"vol-{mode_}" / "new" / "dir"
    r = fresh("run", "--rm", f"--isolation={mode_}", "-u", "nobody", "-v", f"{vol}:/a/b/c", "busybox", "sh", "-c",
              "id -u; cat /etc/hosts /etc/resolv.conf /etc/hostname >/dev/null && ls -d /a/b/c && umask")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"65534", b"/a/b/c", b"0022"], r.stdout
    assert mode(vol) == 0o755 and mode(vol.parent) == 0o755  # made for -v as Docker makes it
    fresh.assert_clean()


def test_an_existing_install_is_closed_on_start(upgraded: Vmrt) -> None:
    """The first vmrt command after the upgrade chmods the top dirs (no walk): the old
    container's 0644 config is out of reach although its own mode is unchanged."""
    old = upgraded.root / "containers" / "0ld" / "config.json"
    assert mode(old) == 0o644
    assert mode(upgraded.root) == 0o700 and mode(upgraded.run_root) == 0o700
    got = as_nobody([("read", old), ("list", upgraded.root), ("list", upgraded.run_root)],
                    walk=[upgraded.root.parent], secret="hunter2")
    assert [p[2] for p in got["probes"]] == ["EACCES"] * 3, got
    assert got["found"] == []
    r = upgraded("ps", "-a")
    assert r.returncode == 0, r.stderr


def test_a_root_pointed_at_someone_elses_dir_is_not_taken_over(tmp_path: Path) -> None:
    """secure_tops only narrows dirs this user owns (VMRT_ROOT=/srv/shared must not chmod it)."""
    from vmrt import fsmode
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir(mode=0o755)
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    fsmode.secure_tops(mine, theirs, tmp_path / "missing")
    assert mode(mine) == 0o700 and mode(theirs) == 0o755
    assert not (tmp_path / "missing").exists()


def test_the_pool_socket_and_log_are_root_only(fresh: Vmrt) -> None:
    r = fresh("pool", "start", "--size", "0")
    assert r.returncode == 0, r.stderr
    try:
        sock, log = fresh.run_root / "pool.sock", fresh.run_root / "pool" / "daemon.log"
        assert stat.S_ISSOCK(os.lstat(sock).st_mode) and mode(sock) & 0o077 == 0
        assert mode(log) == 0o600 and mode(log.parent) == 0o700
        got = as_nobody([("connect", sock), ("read", log), ("list", fresh.run_root / "pool")])
        assert [p[2] for p in got["probes"]] == ["EACCES"] * 3, got
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # root still can
            os.chdir(sock.parent)
            try:
                s.connect(sock.name)
            finally:
                os.chdir("/")
    finally:
        r = fresh("pool", "stop")
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("mode_", MODES)
def test_entry_points_set_a_private_umask(fresh: Vmrt, mode_: str) -> None:
    """The umask every entry point sets, so a file or dir made without a mode is root's alone.
    Checked on the running processes: the CLI of an attached run, and a detached container's
    monitor (the C one after the hand-off, which calls umask(077) itself)."""
    if mode_ == "process":
        p = fresh.popen("run", "--rm", "--isolation=process", "busybox", "sleep", "30")
        try:
            deadline = time.monotonic() + 60
            while _umask_of(p.pid) != "0077":  # (the interpreter starts with the caller's umask)
                assert time.monotonic() < deadline and p.poll() is None, _umask_of(p.pid)
                time.sleep(0.05)
        finally:
            p.kill()
            p.wait()
        # killed at any point of its start: the next command reconciles what its owner left
        for cid in fresh("ps", "-aq").stdout.decode().split():
            assert fresh("rm", "-f", cid).returncode == 0
        fresh.assert_clean(timeout=30)
    r = fresh("run", "-d", f"--isolation={mode_}", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        pid = json.loads(fresh("inspect", cid).stdout)[0]["State"]["MonitorPid"]
        assert pid and _umask_of(pid) == "0077", pid
    finally:
        fresh("rm", "-f", cid)
    fresh.assert_clean(timeout=30)


def _umask_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("Umask:"):
                return ln.split()[1]
    return ""


@pytest.mark.vm
def test_snapshot_files_are_root_only_and_clones_read_their_etc_files(fresh: Vmrt) -> None:
    """A snapshot's RAM, device state and meta are root's alone; a clone restored from it (its
    share over 9p) still reads /etc/hosts and /etc/resolv.conf as uid 65534."""
    r = fresh("snapshot", "build")
    assert r.returncode == 0, r.stderr
    try:
        snaps = fresh.root / "snapshots"
        files = [p for p in snaps.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"ram", "state", "meta.json"}, files
        assert mode(snaps) == 0o700 and all(mode(p.parent) == 0o700 for p in files)
        assert all(mode(p) & 0o077 == 0 for p in files), [(str(p), oct(mode(p))) for p in files]
        got = as_nobody([("list", snaps), *[("read", p) for p in files]])
        assert {p[2] for p in got["probes"]} == {"EACCES"}, got
        r = fresh("run", "--rm", "--timings", "-u", "nobody", "busybox", "sh", "-c",
                  "id -u; cat /etc/hosts /etc/resolv.conf /etc/hostname >/dev/null && echo read")
        assert r.returncode == 0 and r.stdout.split() == [b"65534", b"read"], r
        assert b"snapshot=" in r.stderr and b"snapshot=none" not in r.stderr, r.stderr  # a clone, not a boot
    finally:
        r = fresh("snapshot", "rm")
        assert r.returncode == 0, r.stderr
    fresh.assert_clean()


def test_cp_out_of_a_container_makes_dirs_with_the_callers_umask(fresh: Vmrt, tmp_path: Path) -> None:
    """vmrt's own umask (077) is for vmrt's files: a dir `vmrt cp` makes in the user's
    destination gets the caller's umask (022 here: 0755), as before."""
    r = fresh("run", "-d", "--isolation=process", "busybox", "sh", "-c",
              "mkdir -p /d/e && echo x > /d/e/f && sleep 300")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        deadline = time.monotonic() + 30
        while fresh("exec", cid, "test", "-f", "/d/e/f").returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        old = os.umask(0o022)
        try:
            r = fresh("cp", f"{cid}:/d", str(tmp_path / "out"))
        finally:
            os.umask(old)
        assert r.returncode == 0, r.stderr
        assert (mode(tmp_path / "out"), mode(tmp_path / "out" / "e"), mode(tmp_path / "out" / "e" / "f")) == (
            0o755, 0o755, 0o644)
    finally:
        fresh("rm", "-f", cid)
    fresh.assert_clean()
