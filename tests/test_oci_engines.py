"""vmrt-runtime under real engines (issue 19): Debian's podman with conmon, containerd's runc
shim driven by `ctr --runc-binary`, and Debian's dockerd with vmrt as an added runtime, each in
both isolations. Every engine runs on private roots and sockets started here and stopped after
(the machine's own services, if any, are never touched); the runtime is the `Runtime` wrapper
of tests/test_oci_runtime.py (the test's vmrt configuration, a private --root where the engine
gives none).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import SLOT, Vmrt, track
from test_oci_runtime import Runtime

pytestmark = pytest.mark.vm
MODES = ["process", "vm"]
IMAGE = "docker.io/library/busybox:latest"
LOOP = "trap 'exit 0' TERM; echo up; while true; do sleep 0.2; done"


def _umount_under(path: Path) -> None:
    """What an engine left mounted under its private dirs (after a failure), deepest first."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mp in sorted((m for m in mounts if m.startswith(str(path))), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _image_tar(v: Vmrt, tmp: Path) -> Path:
    tar = tmp / "busybox.tar"
    r = v("save", "busybox", "-o", str(tar))
    assert r.returncode == 0, r.stderr
    return tar


def _kernel(out: bytes) -> bool:
    """Whether ``out`` names the host's kernel (process mode) rather than the guest's."""
    return out.decode().strip() == os.uname().release


def _tty_run(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, bytes]:
    """``argv`` on a new pty (as a user's terminal): its exit status and what it printed."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(argv[0], argv, env)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


# --- podman ----------------------------------------------------------------------------------
class Podman:
    def __init__(self, rt: Runtime, tmp: Path) -> None:
        # podman refuses a run root longer than 50 characters: a short dir of its own (removed in close)
        self.rt, self.dir = rt, Path(tempfile.mkdtemp(prefix="vmrt-pm-"))
        conf = self.dir / "containers.conf"
        # this machine's hard limits are below podman's default ulimits (1048576 files): as a host
        # that lowers them in containers.conf
        conf.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
                        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
        (self.dir / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf),
                        CONTAINERS_REGISTRIES_CONF=str(self.dir / "registries.conf"))
        self.base = ["podman", "--root", str(self.dir / "storage"), "--runroot", str(self.dir / "run"),
                     "--tmpdir", str(self.dir / "tmp"), "--storage-driver", "overlay",
                     "--runtime", str(rt.wrapper)]

    def __call__(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.base, *args], capture_output=True, timeout=timeout, env=self.env,
                              stdin=subprocess.DEVNULL, check=False)

    def close(self) -> None:
        self("rm", "-af", "-t", "0")
        self("rmi", "-af")
        _umount_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def podman(vmrt: Vmrt, tmp_path: Path) -> Iterator[Podman]:
    if not shutil.which("podman") or not shutil.which("conmon"):
        pytest.fail("podman and conmon are set-up's (setup.sh installs them)")
    rt = Runtime(vmrt, tmp_path)
    p = Podman(rt, tmp_path)
    r = p("load", "-i", str(_image_tar(vmrt, tmp_path)))
    assert r.returncode == 0, r.stderr
    try:
        yield p
    finally:
        p.close()


@pytest.mark.parametrize("mode", MODES)
def test_podman_runs_either_isolation(podman: Podman, mode: str) -> None:
    note = ["--annotation", f"io.vmrt.isolation={mode}", "--network", "none"]
    r = podman("run", "--rm", *note, IMAGE, "uname", "-r")
    assert r.returncode == 0 and _kernel(r.stdout) == (mode == "process"), r
    r = podman("run", "--rm", *note, IMAGE, "sh", "-c", "echo out; echo err >&2; exit 5")
    assert (r.returncode, r.stdout, r.stderr) == (5, b"out\n", b"err\n"), r
    r = podman("run", "-d", "--name", "svc", *note, IMAGE, "sh", "-c", LOOP)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    while b"up" not in podman("logs", "svc").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert podman("logs", "svc").stdout.startswith(b"up\n")
    assert podman("ps", "--format", "{{.Names}} {{.Status}}").stdout.decode().startswith("svc Up")
    r = podman("exec", "svc", "sh", "-c", "echo $((40 + 2)); hostname")
    assert r.returncode == 0 and r.stdout.split()[0] == b"42", r
    r = podman("exec", "svc", "sh", "-c", "exit 3")
    assert r.returncode == 3
    doc = json.loads(podman("inspect", "svc").stdout)[0]
    assert doc["State"]["Running"] and doc["State"]["Pid"] > 0, doc["State"]
    r = podman("stop", "-t", "10", "svc")
    assert r.returncode == 0, r.stderr
    state = json.loads(podman("inspect", "svc").stdout)[0]["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0), state
    assert podman("rm", "svc").returncode == 0
    assert not [p for p in podman.rt.root.iterdir()] if podman.rt.root.exists() else True
    podman.rt.v.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_podman_it_under_a_terminal(podman: Podman, mode: str) -> None:
    note = ["--annotation", f"io.vmrt.isolation={mode}", "--network", "none"]
    code, out = _tty_run([*podman.base, "run", "-it", "--rm", *note, IMAGE, "sh", "-c", "tty; stty size; exit 4"],
                         podman.env)
    assert code == 4 and b"/dev/pts/" in out, out
    assert podman("run", "-d", "--name", "tt", *note, IMAGE, "sh", "-c", LOOP).returncode == 0
    code, out = _tty_run([*podman.base, "exec", "-it", "tt", "sh", "-c", "tty; exit 6"], podman.env)
    assert code == 6 and b"/dev/pts/" in out, out
    assert podman("rm", "-f", "-t", "0", "tt").returncode == 0
    podman.rt.v.assert_clean()


# --- containerd ------------------------------------------------------------------------------
class Containerd:
    """containerd on private paths; ``plugins``: its config's plugin sections (None: no CRI)."""

    def __init__(self, rt: Runtime, tmp: Path, plugins: str | None = None) -> None:
        self.rt, self.dir = rt, Path(tempfile.mkdtemp(prefix="vmrt-cd-"))  # short socket paths (removed in stop)
        self.sock = self.dir / "c.sock"
        self.ns = f"vmrt-test{SLOT or ''}"
        cri = ('disabled_plugins = ["io.containerd.grpc.v1.cri"]\n' if plugins is None else
               '[plugins."io.containerd.grpc.v1.cri"]\n  disable_tcp_service = true\n'
               '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
               f'  [plugins."io.containerd.grpc.v1.cri".cni]\n    conf_dir = "{self.dir}/cni"\n'
               f'    bin_dir = "{self.dir}/cni-bin"\n{plugins}\n')
        (self.dir / "config.toml").write_text(
            f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
            f'[grpc]\n  address = "{self.sock}"\n[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
            f'[debug]\n  address = ""\n[metrics]\n  address = ""\n{cri}')
        self.log = open(self.dir / "containerd.log", "wb")  # noqa: SIM115  # closed in stop()
        self.proc = track(subprocess.Popen(["containerd", "--config", str(self.dir / "config.toml")],
                                           stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while self.ctr("version").returncode != 0:
            assert time.monotonic() < deadline and self.proc.poll() is None, (self.dir / "containerd.log").read_text()
            time.sleep(0.2)

    def ctr(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ctr", "-a", str(self.sock), "-n", self.ns, *args], capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)

    def stop(self) -> None:
        for task in self.ctr("tasks", "ls", "-q").stdout.decode().split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task)
            self.ctr("tasks", "delete", "-f", task)
        for c in self.ctr("containers", "ls", "-q").stdout.decode().split():
            self.ctr("containers", "rm", c)
        _stop(self.proc)
        self.log.close()
        _umount_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(Path("/run/containerd/runc") / self.ns, ignore_errors=True)


@pytest.fixture
def containerd(vmrt: Vmrt, tmp_path: Path) -> Iterator[Containerd]:
    c = Containerd(Runtime(vmrt, tmp_path), tmp_path)
    yield from _with_busybox(c, lambda tar: c.ctr("images", "import", tar), vmrt, tmp_path)


def _with_busybox(engine: Containerd | Dockerd, load: Callable[[str], subprocess.CompletedProcess[bytes]],
                  vmrt: Vmrt, tmp: Path) -> Iterator[Any]:
    """A started engine with vmrt's busybox loaded (``load`` of its saved tar), stopped after."""
    try:
        r = load(str(_image_tar(vmrt, tmp)))
        assert r.returncode == 0, r.stderr
        yield engine
    finally:
        engine.stop()


@pytest.mark.parametrize("mode", MODES)
def test_containerd_runc_shim_runs_either_isolation(containerd: Containerd, mode: str) -> None:
    run = ["run", "--runc-binary", str(containerd.rt.wrapper), "--annotation", f"io.vmrt.isolation={mode}"]
    r = containerd.ctr(*run, "--rm", IMAGE, f"once-{mode}", "uname", "-r")
    assert r.returncode == 0 and _kernel(r.stdout) == (mode == "process"), r
    r = containerd.ctr(*run, "--rm", IMAGE, f"status-{mode}", "sh", "-c", "exit 9")
    assert r.returncode == 9, r
    r = containerd.ctr(*run, "-d", IMAGE, f"bg-{mode}", "sh", "-c", LOOP)
    assert r.returncode == 0, r.stderr
    r = containerd.ctr("tasks", "exec", "--exec-id", "e1", f"bg-{mode}", "sh", "-c", "echo from-exec; exit 2")
    assert (r.returncode, r.stdout) == (2, b"from-exec\n"), r
    tasks = containerd.ctr("tasks", "ls").stdout.decode()
    assert f"bg-{mode}" in tasks and "RUNNING" in tasks, tasks
    assert containerd.ctr("tasks", "kill", "-s", "SIGTERM", f"bg-{mode}").returncode == 0
    deadline = time.monotonic() + 60
    while "STOPPED" not in containerd.ctr("tasks", "ls").stdout.decode() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert containerd.ctr("tasks", "delete", f"bg-{mode}").returncode == 0
    assert containerd.ctr("containers", "rm", f"bg-{mode}").returncode == 0
    containerd.rt.v.assert_clean()


# --- dockerd ---------------------------------------------------------------------------------
class Dockerd:
    def __init__(self, rt: Runtime, tmp: Path) -> None:
        # a short dir of its own (removed in stop): its containerd's debug socket path must stay
        # under 104 bytes, which a pytest basetemp need not
        self.rt, self.dir = rt, Path(tempfile.mkdtemp(prefix="vmrt-dk-"))
        self.sock = self.dir / "docker.sock"
        wrapper = str(rt.wrapper)
        (self.dir / "daemon.json").write_text(json.dumps({
            # `--add-runtime vmrt=PATH`, with the isolation as runtime arguments: one name per isolation
            "runtimes": {"vmrt": {"path": wrapper, "runtimeArgs": ["--isolation=process"]},
                         "vmrt-vm": {"path": wrapper, "runtimeArgs": ["--isolation=vm"]}},
            "bridge": "none", "iptables": False, "ip6tables": False, "ip-forward": False, "ip-masq": False,
            "default-ulimits": {"nofile": {"Name": "nofile", "Hard": 1024, "Soft": 1024}}}))
        self.log = open(self.dir / "dockerd.log", "wb")  # noqa: SIM115  # closed in stop()
        self.proc = track(subprocess.Popen(
            ["/usr/sbin/dockerd", "--config-file", str(self.dir / "daemon.json"), "--data-root", str(self.dir / "data"),
             "--exec-root", str(self.dir / "exec"), "--pidfile", str(self.dir / "pid"), "-H", f"unix://{self.sock}"],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while self.docker("version").returncode != 0:
            assert time.monotonic() < deadline and self.proc.poll() is None, (self.dir / "dockerd.log").read_text()
            time.sleep(0.3)

    def docker(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["/usr/bin/docker", "-H", f"unix://{self.sock}", *args], capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)

    def stop(self) -> None:
        ids = self.docker("ps", "-aq").stdout.decode().split()
        if ids:
            self.docker("rm", "-f", *ids)
        _stop(self.proc, 60)
        self.log.close()
        _umount_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def dockerd(vmrt: Vmrt, tmp_path: Path) -> Iterator[Dockerd]:
    d = Dockerd(Runtime(vmrt, tmp_path), tmp_path)
    yield from _with_busybox(d, lambda tar: d.docker("load", "-i", tar), vmrt, tmp_path)


@pytest.mark.parametrize("runtime", ["vmrt", "vmrt-vm"])
def test_dockerd_with_vmrt_as_a_runtime(dockerd: Dockerd, runtime: str) -> None:
    r = dockerd.docker("run", "--rm", "--runtime", runtime, "--network", "none", "busybox", "uname", "-r")
    assert r.returncode == 0 and _kernel(r.stdout) == (runtime == "vmrt"), r
    r = dockerd.docker("run", "-d", "--runtime", runtime, "--network", "none", "--name", "d1", "busybox", "sh", "-c",
                       LOOP)
    assert r.returncode == 0, r.stderr
    r = dockerd.docker("exec", "d1", "sh", "-c", "echo in-d1; exit 4")
    assert (r.returncode, r.stdout) == (4, b"in-d1\n"), r
    assert dockerd.docker("inspect", "-f", "{{.HostConfig.Runtime}} {{.State.Running}}", "d1").stdout == \
        f"{runtime} true\n".encode()
    assert dockerd.docker("stop", "-t", "10", "d1").returncode == 0
    assert dockerd.docker("inspect", "-f", "{{.State.ExitCode}}", "d1").stdout == b"0\n"
    assert dockerd.docker("rm", "d1").returncode == 0
    with contextlib.suppress(FileNotFoundError):
        assert not list((dockerd.dir / "exec" / "runtime-runc").rglob("vmrt.json"))
    dockerd.rt.v.assert_clean()


def test_the_documented_containerd_config_loads_and_runs_both_isolations(vmrt: Vmrt, tmp_path: Path) -> None:
    """docs/KUBERNETES.md's runtime handler, as written there, in a containerd of the test's own:
    its CRI plugin loads it, and containers run through the handler's shim and BinaryName (here
    the test's wrapper of it) with the isolation annotation, in both isolations."""
    doc = (Path(__file__).parents[1] / "docs" / "KUBERNETES.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    binary = "/usr/local/bin/vmrt-runtime"
    assert f'BinaryName = "{binary}"' in block and 'runtimes.vmrt]' in block
    rt = Runtime(vmrt, tmp_path)
    c = Containerd(rt, tmp_path, plugins=block.replace(binary, str(rt.wrapper)))
    try:
        plugins = c.ctr("plugins", "ls").stdout.decode().splitlines()
        assert any(" cri " in f" {ln} " and ln.split()[-1] == "ok" for ln in plugins), plugins
        r = c.ctr("images", "import", str(_image_tar(vmrt, tmp_path)))
        assert r.returncode == 0, r.stderr
        for mode in MODES:
            r = c.ctr("run", "--rm", "--runc-binary", str(rt.wrapper), "--annotation", f"io.vmrt.isolation={mode}",
                      IMAGE, f"k8s-{mode}", "uname", "-r")
            assert r.returncode == 0 and _kernel(r.stdout) == (mode == "process"), (mode, r)
    finally:
        c.stop()
    vmrt.assert_clean()
