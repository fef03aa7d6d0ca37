"""Hostile images (issue 14, part 1): image data is data, never a path out, a device or code.

* Files the host reads from an image (``/etc/passwd``, ``/etc/group``) are resolved inside
  the image root, opened only when they are regular files, and read bounded
  (:mod:`vmrt.safefs`): a symlink aimed at a host file, a FIFO, a device node or a huge
  file makes the host follow, open, block on or exhaust nothing.
* The store's layers live on a nosuid, nodev, noexec mount, and a VM's share is nosuid,
  nodev where virtiofsd (root) opens files: a device node from an image or a guest never
  opens a host device; a setuid binary is inert on the host.
* Commands built from input: a newline, a comma or a leading dash in a flag or an image
  field splits, adds or injects nothing.

Each test plays the attacker with real images loaded into the real store and run under
runc and QEMU. The probes are benign: the host file they aim at is the test's own decoy,
the devices are harmless ones.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ocibuild import BUSYBOX, Layer, OciLayout, busybox_layer
from support import Vmrt, one_line_error

from vmrt import safefs
from vmrt.bundle import resolve_user
from vmrt.errors import ImageError, UsageError

MODES = ("process", "vm")
NO_POOL = {"VMRT_POOL": "off", "VMRT_SNAPSHOT": "off"}  # a cold boot: virtiofsd serves the share
DECOY = "evil:x:4321:4321:decoy on the host:/:/bin/sh\n"
ESCAPE = "../" * 24  # more than any root is deep


# --- safefs: the helper every read or write into a tenant's tree goes through --------------


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each safefs test twice: with openat2(RESOLVE_IN_ROOT), and with the component walk
    kernels without openat2 (before 5.6) get."""
    monkeypatch.setattr(safefs, "_have_openat2", None if request.param == "openat2" else False)
    return str(request.param)


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """An image root with /etc, and a decoy file on the host outside it."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    decoy = tmp_path / "host-secret"
    decoy.write_text(DECOY)
    return root, decoy


def test_reads_never_leave_the_root(tmp_path: Path, resolver: str) -> None:
    root, decoy = _tree(tmp_path)
    (root / "etc/abs").symlink_to(decoy)                                 # /etc/passwd -> /etc/shadow
    (root / "etc/rel").symlink_to(ESCAPE + str(decoy).lstrip("/"))       # -> ../../../../etc/shadow
    (root / "up").symlink_to(tmp_path)                                   # a directory link out
    (root / "etc/loop").symlink_to("loop")
    for path in ("/etc/abs", "etc/rel", "/up/host-secret", "/../host-secret", ESCAPE + "host-secret",
                 "/etc/loop", "/missing/x", "/etc/abs/x"):
        assert safefs.read_regular(root, path, 1 << 20) is None, path
    # the same names reach the image's own files, as chroot(root) would resolve them
    own = root / str(decoy).lstrip("/")
    own.parent.mkdir(parents=True)
    own.write_text("the image's own\n")
    for path in ("/etc/abs", "etc/rel", "/up/host-secret"):
        assert safefs.read_regular(root, path, 1 << 20) == b"the image's own\n", path


@pytest.mark.root
def test_magic_links_are_refused(tmp_path: Path, resolver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/self/root inside a root with a proc mount (a running container's) is the host's /."""
    root, decoy = _tree(tmp_path)
    (root / "proc").mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        (root / "etc/passwd").symlink_to(f"/proc/self/root{decoy}")
        (root / "etc/group").symlink_to(f"/proc/{os.getpid()}/cwd/{decoy.name}")
        monkeypatch.chdir(tmp_path)
        assert safefs.read_regular(root, "/etc/passwd", 1 << 20) is None
        assert safefs.read_regular(root, "/etc/group", 1 << 20) is None
    finally:
        subprocess.run(["umount", str(root / "proc")], check=True)


@pytest.mark.root
def test_fifo_and_device_nodes_are_never_opened(tmp_path: Path, resolver: str) -> None:
    root, _ = _tree(tmp_path)
    fifo = root / "etc/passwd"
    os.mkfifo(fifo)
    opened = threading.Event()

    def writer() -> None:  # its open returns only once something opens the FIFO for reading
        os.close(os.open(fifo, os.O_WRONLY))
        opened.set()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    start = time.monotonic()
    assert safefs.read_regular(root, "/etc/passwd", 1 << 20) is None
    assert time.monotonic() - start < 5
    assert not opened.wait(0.5), "the host opened the image's FIFO"
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # release the writer
    t.join(5)
    os.mknod(root / "etc/group", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # made like /dev/zero
    os.mknod(root / "etc/shadow", stat.S_IFBLK | 0o600, os.makedev(7, 0))  # a loop device
    (root / "etc/dir").mkdir()
    for path in ("/etc/group", "/etc/shadow", "/etc/dir"):
        assert safefs.read_regular(root, path, 1 << 20) is None, path
        assert safefs.stat_in_root(root, path) is not None  # seen, through an O_PATH fd only


def test_huge_file_is_refused_unread(tmp_path: Path, resolver: str) -> None:
    root, _ = _tree(tmp_path)
    with open(root / "etc/passwd", "wb") as f:
        f.truncate(8 << 30)  # 8 GiB, sparse: reading it whole would take the host's memory
    start = time.monotonic()
    with pytest.raises(safefs.FileTooLarge):
        safefs.read_regular(root, "/etc/passwd", 1 << 20)
    assert time.monotonic() - start < 5
    with pytest.raises(ImageError, match="larger than 4 MiB"):
        resolve_user(root, "root")


@pytest.mark.root
def test_writes_replace_planted_links_never_follow_them(tmp_path: Path, resolver: str) -> None:
    root, decoy = _tree(tmp_path)
    (root / "etc/hostname").symlink_to(decoy)
    (root / "etc/hosts").symlink_to(ESCAPE + str(decoy).lstrip("/"))
    os.mkfifo(root / "etc/resolv.conf")
    os.mknod(root / "etc/mtab", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    for name in ("hostname", "hosts", "resolv.conf", "mtab"):
        safefs.replace_in_root(root, f"/etc/{name}", b"written\n")
        p = root / "etc" / name
        assert stat.S_ISREG(p.lstat().st_mode) and p.read_bytes() == b"written\n", name
    assert decoy.read_text() == DECOY
    (root / "var").symlink_to(tmp_path)  # a parent aimed out resolves inside the root (missing there)
    with pytest.raises(FileNotFoundError):
        safefs.replace_in_root(root, "/var/planted", b"x")
    assert not (tmp_path / "planted").exists()
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["hostname", "hosts", "mtab", "resolv.conf"]


@pytest.mark.parametrize("kind", ["abs-link", "rel-link", "fifo", pytest.param("chr", marks=pytest.mark.root),
                                  pytest.param("blk", marks=pytest.mark.root), "dir"])  # (mknod of a device: root)
def test_user_lookup_treats_a_hostile_passwd_as_missing(tmp_path: Path, kind: str) -> None:
    """As Docker with no /etc/passwd: numeric ids work, names fail with Docker's message."""
    root, decoy = _tree(tmp_path)
    for name in ("passwd", "group"):
        p = root / "etc" / name
        if kind == "abs-link":
            p.symlink_to(decoy)
        elif kind == "rel-link":
            p.symlink_to(ESCAPE + str(decoy).lstrip("/"))
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "dir":
            p.mkdir()
        else:
            os.mknod(p, (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | 0o666, os.makedev(1, 5))
    u = resolve_user(root, "1234:5")
    assert (u.uid, u.gid, u.groups) == (1234, 5, [])
    with pytest.raises(UsageError, match="unable to find user evil: no matching entries in passwd file"):
        resolve_user(root, "evil")
    with pytest.raises(UsageError, match="unable to find group evil: no matching entries in group file"):
        resolve_user(root, "0:evil")


# --- the same attacks through the real CLI, store, runc and QEMU ---------------------------


@pytest.fixture
def images(vmrt: Vmrt, tmp_path: Path) -> Iterator[list[str]]:
    """Images a test loads (removed after it)."""
    made: list[str] = []
    yield made
    if made:
        vmrt("rmi", "-f", *made)


def load(vmrt: Vmrt, tmp_path: Path, made: list[str], name: str, top: Layer,
         config: dict[str, object] | None = None) -> str:
    """A busybox image with ``top`` over it, loaded into the store as ``name:latest`` (an OCI
    layout archive through ``vmrt load``, the way any image arrives)."""
    lay = OciLayout(tmp_path / f"layout-{name}")
    lay.add_image([busybox_layer(), top], {"Cmd": ["/bin/sh"], **(config or {})}, ref=name)
    tar = tmp_path / f"{name}.tar"
    with tarfile.open(tar, "w") as tf:
        for p in sorted(lay.dir.iterdir()):
            tf.add(p, p.name)
    r = vmrt("load", "-i", str(tar))
    assert r.returncode == 0, r.stderr
    made.append(f"{name}:latest")
    return f"{name}:latest"


def run(vmrt: Vmrt, mode: str, *args: str, timeout: float = 180,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return vmrt("run", "--rm", f"--isolation={mode}", *args, timeout=timeout, env={**NO_POOL, **(env or {})})


def hostile_passwd(kind: str, decoy: Path) -> Layer:
    top = Layer().add_dir("etc")
    if kind == "abs-link":
        return top.add_symlink("etc/passwd", str(decoy))
    if kind == "rel-link":
        return top.add_symlink("etc/passwd", ESCAPE + str(decoy).lstrip("/"))
    if kind == "fifo":
        return top.add_fifo("etc/passwd")
    if kind == "chr":
        return top.add_device("etc/passwd", "c", 1, 5)  # made like /dev/zero
    return top.add_file("etc/passwd", DECOY + "x" * (5 << 20))  # huge


def test_image_link_climbing_out_is_refused_at_unpack(vmrt: Vmrt, tmp_path: Path, images: list[str]) -> None:
    """``etc/passwd -> ../../../../etc/shadow`` never lands in the store (stricter than Docker,
    which resolves it in scope at use: vmrt's readers do that too, see the safefs tests)."""
    with pytest.raises(AssertionError, match="points outside the root"):
        load(vmrt, tmp_path, images, "hostile-passwd-rel", hostile_passwd("rel-link", tmp_path / "decoy"))
    images.clear()


@pytest.mark.parametrize("kind", ["abs-link", "fifo", "chr"])
def test_image_passwd_aimed_at_the_host_is_missing(vmrt: Vmrt, tmp_path: Path, images: list[str], kind: str) -> None:
    """The image's /etc/passwd is a link to a host file holding user ``evil``, a FIFO or a
    device node: the host finds no ``evil`` (and neither blocks nor opens anything); numeric
    users still work, as Docker does without a passwd file."""
    decoy = tmp_path / "decoy-passwd"
    decoy.write_text(DECOY)
    img = load(vmrt, tmp_path, images, f"hostile-passwd-{kind}", hostile_passwd(kind, decoy))
    r = run(vmrt, "process", "-u", "evil", img, "/bin/busybox", "id", "-u", timeout=60)
    assert r.returncode == 125
    assert one_line_error(r.stderr) == "vmrt: unable to find user evil: no matching entries in passwd file"
    r = run(vmrt, "process", "-u", "1234", img, "/bin/busybox", "id", "-u", timeout=60,
            env={"VMRT_TIMEOUT_START": "5"})
    if kind == "abs-link":
        assert (r.returncode, r.stdout) == (0, b"1234\n"), r.stderr
    else:  # runc's init reads the file itself, inside the container (as under Docker): one bounded line
        assert r.returncode == 125
        assert one_line_error(r.stderr) == {
            "fifo": "vmrt: runc create did not finish within 5 s (its init reads the image's /etc/passwd "
                    "and /etc/group: is one a FIFO?)",
            "chr": "vmrt: runc create: unable to setup user: unable to find user 1234: bufio.Scanner: "
                   "token too long"}[kind]
    # the image's own User field takes the same path
    img2 = load(vmrt, tmp_path, images, f"hostile-user-{kind}", hostile_passwd(kind, decoy), {"User": "evil"})
    r = run(vmrt, "process", img2, "/bin/busybox", "true", timeout=60)
    assert r.returncode == 125 and "unable to find user evil" in one_line_error(r.stderr)


@pytest.mark.vm
def test_image_passwd_fifo_in_vm_mode(vmrt: Vmrt, tmp_path: Path, images: list[str]) -> None:
    img = load(vmrt, tmp_path, images, "hostile-passwd-vm", hostile_passwd("fifo", tmp_path))
    r = run(vmrt, "vm", "-u", "evil", img, "/bin/busybox", "true", timeout=60)
    assert r.returncode == 125 and "unable to find user evil" in one_line_error(r.stderr)
    # (from /proc: busybox's id reads /etc/passwd itself, and would wait on the FIFO, in the guest)
    r = run(vmrt, "vm", "-u", "1234:99", img, "/bin/busybox", "grep", "-E", "^(Uid|Gid):", "/proc/self/status")
    assert r.returncode == 0, r.stderr
    assert [ln.split()[:2] for ln in r.stdout.decode().splitlines()] == [["Uid:", "1234"], ["Gid:", "99"]]


def test_image_passwd_too_large_is_one_line(vmrt: Vmrt, tmp_path: Path, images: list[str]) -> None:
    img = load(vmrt, tmp_path, images, "hostile-passwd-huge", hostile_passwd("huge", tmp_path))
    r = run(vmrt, "process", "-u", "evil", img, "/bin/busybox", "true", timeout=60)
    assert r.returncode == 125
    assert one_line_error(r.stderr) == "vmrt: the image's /etc/passwd is larger than 4 MiB: refused"


# --- layers on an inert mount ---------------------------------------------------------------


def devices_layer() -> Layer:
    """A setuid-root binary and device nodes, as an image may carry them."""
    return (Layer().add_dir("opt").add_file("opt/suid", BUSYBOX.read_bytes(), mode=0o4755)
            .add_device("opt/zero", "c", 1, 5).add_device("opt/mem", "c", 1, 1)
            .add_device("opt/loop", "b", 7, 0))


def test_store_layers_are_inert_on_the_host(vmrt: Vmrt, tmp_path: Path, images: list[str]) -> None:
    img = load(vmrt, tmp_path, images, "hostile-devices", devices_layer())
    assert run(vmrt, "process", img, "/bin/busybox", "true").returncode == 0
    layers = vmrt.root / "layers"
    assert {"nosuid", "nodev", "noexec"} <= safefs.mount_flags(layers)
    assert {"nosuid", "nodev", "noexec"} <= safefs.mount_flags(vmrt.root / "tmp")
    points = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert points.count(str(vmrt.root)) == 1  # one bind of the root, however many runs set it up
    (suid,) = layers.glob("*/rootfs/opt/suid")
    assert suid.stat().st_mode & stat.S_ISUID  # kept, as Docker keeps it: the image's own bits
    with pytest.raises(PermissionError):  # noexec: the host never runs the image's binaries
        subprocess.run([str(suid), "true"], check=False)
    for node in ("zero", "mem", "loop"):  # nodev: a device node from an image opens nothing here
        (path,) = layers.glob(f"*/rootfs/opt/{node}")
        with pytest.raises(PermissionError):
            open(path, "rb").close()


def test_process_mode_device_nodes_meet_the_device_cgroup(vmrt: Vmrt, tmp_path: Path, images: list[str]) -> None:
    """The container's own root (an overlay mounted elsewhere) keeps Docker's semantics: device
    nodes from the image are subject to the device cgroup, which denies /dev/mem and block devices."""
    img = load(vmrt, tmp_path, images, "hostile-devices-p", devices_layer())
    r = run(vmrt, "process", img, "/bin/busybox", "sh", "-c",
            "for n in mem loop; do /bin/busybox head -c 1 /opt/$n >/dev/null 2>&1; echo $n=$?; done;"
            " /bin/busybox head -c 4 /opt/zero | /bin/busybox od -An -tx1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["mem=1", "loop=1", "00", "00", "00", "00"]


def _virtiofsd_mounts(cid: str) -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) of the share's mounts, as each virtiofsd process of the
    container sees them in its own mount namespace."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            info = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            continue
        if b"virtiofsd" not in cmd or cid.encode() not in cmd:
            continue
        for line in info.splitlines():
            f = line.split()
            if "/containers/" in f[4] and cid not in f[4]:
                continue  # another container's (a virtiofsd still in the host's mount namespace sees all)
            if f[4].endswith("/rootfs") or "/volumes/" in f[4]:
                found.append((f[4], set(f[5].split(","))))
    return found


@pytest.mark.vm
def test_vm_device_nodes_never_open_host_devices(vmrt: Vmrt, tmp_path: Path, images: list[str]) -> None:
    """virtiofsd runs as root on the host and opens what the guest asks for: the share it
    serves is nodev (and nosuid), so an image's node 1,1 (/dev/mem) or 7,0 (loop0), or one the
    guest makes in a volume, can never make it open a host device."""
    img = load(vmrt, tmp_path, images, "hostile-devices-vm", devices_layer())
    vol = tmp_path / "vol"
    vol.mkdir()
    r = vmrt("run", "-d", "--isolation=vm", "-v", f"{vol}:/vol", img, "/bin/busybox", "sleep", "600", env=NO_POOL)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        mounts = _virtiofsd_mounts(cid)
        assert any(mp.endswith("/rootfs") for mp, _ in mounts), mounts
        assert any("/volumes/" in mp for mp, _ in mounts), mounts
        for mp, opts in mounts:
            assert {"nodev", "nosuid"} <= opts, (mp, opts)
        # the host's own view of the share: the image's nodes open nothing
        nodes = list((vmrt.run_root / "containers" / cid).glob("**/rootfs/opt/mem"))
        assert nodes
        for node in nodes:
            with pytest.raises(PermissionError):
                open(node, "rb").close()
        # inside the guest: /dev/mem and a block device are not the host's (nor readable)
        e = vmrt("exec", cid, "/bin/busybox", "sh", "-c",
                 "for n in mem loop; do /bin/busybox head -c 1 /opt/$n >/dev/null 2>&1; echo $n=$?; done;"
                 " /bin/busybox mknod /vol/mem c 1 1 2>/dev/null; echo made=$?")
        assert e.returncode == 0, e.stderr
        out = e.stdout.decode().split()
        assert out[:2] == ["mem=1", "loop=1"], out
        made = vol / "mem"
        if made.exists():  # virtiofsd may make it (the lead's jail drops its mknod): inert to virtiofsd
            assert stat.S_ISCHR(made.lstat().st_mode)
            for mp, opts in _virtiofsd_mounts(cid):
                assert "nodev" in opts, (mp, opts)
    finally:
        vmrt("rm", "-f", cid)
        with contextlib.suppress(OSError):
            (vol / "mem").unlink()


# --- commands and option strings built from input -------------------------------------------


@pytest.mark.vm
@pytest.mark.parametrize("mode", MODES)
def test_env_newline_injects_no_variable(vmrt: Vmrt, mode: str) -> None:
    r = run(vmrt, mode, "-e", "X=a\nY=injected", "busybox", "sh", "-c", 'echo "[$X]"; echo "[${Y-unset}]"')
    assert (r.returncode, r.stdout) == (0, b"[a\nY=injected]\n[unset]\n"), r.stderr


@pytest.mark.vm
def test_image_env_and_command_are_data(vmrt: Vmrt, tmp_path: Path, images: list[str]) -> None:
    """Env entries without ``=`` run (as an empty variable); a NUL byte, which no execve can
    carry, in Env, Cmd or WorkingDir is one line at create, in both modes."""
    img = load(vmrt, tmp_path, images, "hostile-env", Layer(),
               {"Env": ["NOEQ", "GOOD=1", "SPACES=a b,c=d"], "Cmd": ["/bin/busybox", "env"]})
    for mode in MODES:
        r = run(vmrt, mode, img)
        assert r.returncode == 0, r.stderr
        env = r.stdout.decode().splitlines()
        assert "GOOD=1" in env and "SPACES=a b,c=d" in env and "NOEQ=" in env, env
    for name, config in (("nul-env", {"Env": ["A=1\x00B=2"]}), ("nul-cmd", {"Cmd": ["/bin/busybox", "echo", "a\x00b"]}),
                         ("nul-cwd", {"WorkingDir": "/tmp\x00/x"})):
        img = load(vmrt, tmp_path, images, f"hostile-{name}", Layer(), config)
        for mode in MODES:
            r = run(vmrt, mode, img, timeout=60)
            assert r.returncode == 125, (name, mode, r.stderr)
            one_line_error(r.stderr)


@pytest.mark.parametrize(("flag", "value"), [
    ("--hostname", "a,b"), ("--hostname", "host\nname"), ("--hostname", "-rf"),
    ("--name", "a,b"), ("--name", "x\ny"), ("--name", "../x"),
    ("--dns-search", "example.com\nnameserver 192.0.2.1"), ("--dns-option", "ndots:1 rotate"),
    ("--add-host", "x:192.0.2.1\n192.0.2.2 y"), ("--dns", "192.0.2.1\nnameserver 192.0.2.2"),
])
def test_names_with_separators_are_refused(vmrt: Vmrt, flag: str, value: str) -> None:
    r = run(vmrt, "process", flag, value, "busybox", "true", timeout=60)
    assert r.returncode == 125
    one_line_error(r.stderr)


def test_exec_and_cp_arguments_are_never_options(vmrt: Vmrt, tmp_path: Path) -> None:
    """Arguments that look like runc's or tar's options stay arguments; an -e newline adds no variable."""
    r = vmrt("run", "-d", "--isolation=process", "busybox", "sleep", "600")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    try:
        e = vmrt("exec", cid, "echo", "--user=0:0", "--cwd=/etc", "--env=Z=1", "-t")
        assert (e.returncode, e.stdout) == (0, b"--user=0:0 --cwd=/etc --env=Z=1 -t\n"), e.stderr
        e = vmrt("exec", "-e", "X=a\nY=injected", cid, "sh", "-c", 'echo "[$X]"; echo "[${Y-unset}]"')
        assert (e.returncode, e.stdout) == (0, b"[a\nY=injected]\n[unset]\n"), e.stderr
        name = "--to-command=echo pwned"  # a tar option, if it were read as one
        assert vmrt("exec", cid, "sh", "-c", f"echo data > '/tmp/{name}'").returncode == 0
        out = tmp_path / "out"
        out.mkdir()
        c = vmrt("cp", f"{cid}:/tmp/{name}", str(out))
        assert c.returncode == 0, c.stderr
        assert (out / name).read_text() == "data\n"
    finally:
        vmrt("rm", "-f", cid)


@pytest.mark.parametrize("bad", ["a,b", "a:b", "a b", "a\nb"])
def test_state_dirs_that_would_split_options_are_refused(vmrt: Vmrt, tmp_path: Path, bad: str) -> None:
    """The state/run/cache dirs go into overlayfs, QEMU and virtiofsd option lists."""
    for var in ("VMRT_ROOT", "VMRT_RUN_ROOT", "VMRT_CACHE"):
        r = vmrt("ps", env={var: str(tmp_path / bad)})
        assert r.returncode == 125
        assert "option lists" in one_line_error(r.stderr)
    r = vmrt("ps", env={"VMRT_VIRTIOFS_CACHE": "auto,source=/"})
    assert r.returncode == 125 and "virtiofs_cache" in one_line_error(r.stderr)
    assert not list(tmp_path.iterdir())
