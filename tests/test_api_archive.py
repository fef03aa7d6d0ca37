"""The Docker Engine API's file copies, processes and changes, driven by the real docker CLI:
`docker cp` both ways through GET/HEAD/PUT /containers/{id}/archive in either isolation, of
running, created and stopped containers,
hostile archives both ways (an upload with names that lead out, a container whose `tar` lies),
`docker top` (GET /containers/{id}/top) and `docker diff` (GET /containers/{id}/changes) in
either isolation (a VM container's writable layer as its guest agent lists it, and that list
played by an attacker).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import struct
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import agent_walk
from test_api import Api
from test_api import api as api_service  # the fixture, registered here under this name

from vmrt.agent import walk
from vmrt.api.archive import ADDED, DELETED, MODIFIED, FdUpper, TreeUpper, layer_changes
from vmrt.errors import ProtocolError

pytestmark = pytest.mark.vm
assert api_service  # imported for pytest to find

GO_DIR, GO_SYMLINK = 1 << 31, 1 << 27


@pytest.fixture
def api(api_service: Api) -> Api:
    """test_api's service on a private socket, stopped (and checked) at the test's end."""
    return api_service


def _run(api: Api, name: str, isolation: str) -> str:
    r = api.docker("run", "-d", "--name", name, f"--isolation={isolation}", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def _sh(api: Api, name: str, script: str) -> str:
    r = api.docker("exec", name, "sh", "-c", script)
    assert r.returncode == 0, (script, r.stdout, r.stderr)
    return r.stdout.decode()


def _stat(api: Api, name: str, path: str) -> tuple[int, dict[str, object]]:
    status, headers, _ = api.request("HEAD", f"/containers/{name}/archive?path={path}")
    header = headers.get("X-Docker-Container-Path-Stat")
    return status, json.loads(base64.b64decode(header)) if header else {}


def _tar(*members: tuple[str, bytes, int, str]) -> bytes:
    """A tar of (name, type, mode, linkname-or-content) members."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, mode, extra in members:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = kind, mode
            if kind == tarfile.REGTYPE:
                ti.size = len(extra)
                tf.addfile(ti, io.BytesIO(extra.encode()))
            else:
                ti.linkname = extra
                tf.addfile(ti)
    return out.getvalue()


def _copies_both_ways(api: Api, name: str, tmp_path: Path) -> None:
    """`docker cp` of a file and a directory out of the container and into it: contents,
    modes and symbolic links survive; a missing path fails in one line."""
    _sh(api, name, "mkdir -p /data/sub && echo hello > /data/f && chmod 640 /data/f && echo deep > /data/sub/g "
                   "&& chmod 750 /data/sub && ln -s f /data/link")
    out = tmp_path / "out"
    out.mkdir()
    r = api.docker("cp", f"{name}:/data/f", str(out / "f1"))
    assert r.returncode == 0, r.stderr
    assert (out / "f1").read_text() == "hello\n" and stat.S_IMODE((out / "f1").stat().st_mode) == 0o640
    r = api.docker("cp", f"{name}:/data", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "data" / "sub" / "g").read_text() == "deep\n"
    assert stat.S_IMODE((out / "data" / "sub").stat().st_mode) == 0o750
    assert os.readlink(out / "data" / "link") == "f"
    r = api.docker("cp", f"{name}:/data/.", str(out / "content"))  # a directory's content
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out / "content")) == ["f", "link", "sub"]
    # into the container: a directory (into an existing one), a file under a new name
    up = tmp_path / "up"
    (up / "inner").mkdir(parents=True)
    (up / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (up / "run.sh").chmod(0o755)
    (up / "inner" / "secret").write_text("s3cret\n")
    (up / "inner" / "secret").chmod(0o600)
    r = api.docker("cp", str(up), f"{name}:/data/")
    assert r.returncode == 0, r.stderr
    assert _sh(api, name, "/data/up/run.sh; cat /data/up/inner/secret; stat -c '%a %n' /data/up/run.sh "
                          "/data/up/inner/secret") == "ran\ns3cret\n755 /data/up/run.sh\n600 /data/up/inner/secret\n"
    r = api.docker("cp", str(up / "run.sh"), f"{name}:/data/renamed")
    assert r.returncode == 0, r.stderr
    assert _sh(api, name, "cat /data/renamed") == "#!/bin/sh\necho ran\n"
    # what is not there
    r = api.docker("cp", f"{name}:/nope", str(out))
    assert r.returncode != 0 and r.stderr == f"Error: No such container:path: {name}:/nope\n".encode(), r.stderr
    status, _, body = api.request("GET", f"/containers/{name}/archive?path=/nope")
    assert (status, json.loads(body)) == (404, {"message": f"Could not find the file /nope in container {name}"})
    r = api.docker("cp", str(up / "run.sh"), f"{name}:/no/such/dir/x")
    assert r.returncode != 0 and b"No such container:path: " + name.encode() + b":/no/such/dir" in r.stderr, r.stderr
    # HEAD: the stat Docker's clients read
    status, doc = _stat(api, name, "/data")
    assert status == 200 and doc["name"] == "data" and int(str(doc["mode"])) & GO_DIR, doc
    status, doc = _stat(api, name, "/data/link")
    assert status == 200 and int(str(doc["mode"])) & GO_SYMLINK and doc["linkTarget"] == "f", doc
    status, doc = _stat(api, name, "/data/f")
    assert status == 200 and doc["size"] == 6 and int(str(doc["mode"])) & 0o777 == 0o640, doc
    assert _stat(api, name, "/nope")[0] == 404
    assert api.request("GET", f"/containers/{name}/archive")[0] == 400
    assert api.request("GET", "/containers/nosuch/archive?path=/etc")[0] == 404


def _top(api: Api, name: str) -> None:
    r = api.docker("top", name)
    assert r.returncode == 0 and b"sleep 300" in r.stdout and b"PID" in r.stdout.splitlines()[0], r
    status, _, body = api.request("GET", f"/containers/{name}/top?ps_args=-o%20pid,args")
    doc = json.loads(body)
    assert status == 200 and doc["Titles"] == ["PID", "COMMAND"], doc
    assert any(row[1] == "sleep 300" and row[0].isdigit() for row in doc["Processes"]), doc


def test_docker_cp_top_and_diff_of_a_process_container(api: Api, tmp_path: Path) -> None:
    _run(api, "files", "process")
    r = api.docker("diff", "files")  # what the runtime made (/etc/hosts...) is no change of the container's
    assert (r.returncode, r.stdout) == (0, b""), r
    _copies_both_ways(api, "files", tmp_path)
    r = api.docker("cp", "files:/", str(tmp_path / "root"))  # /proc and /sys are live: refused in one line
    assert r.returncode != 0 and b"whole root of a container is not supported" in r.stderr, r.stderr
    _top(api, "files")
    # changes against the image: added, changed, deleted
    _sh(api, "files", "echo more >> /etc/passwd; rm /etc/group; touch /tmp/new")
    r = api.docker("diff", "files")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    for want in ("C /etc", "C /etc/passwd", "D /etc/group", "C /tmp", "A /tmp/new", "A /data", "A /data/f",
                 "A /data/up/inner/secret"):
        assert want in lines, (want, lines)
    assert not [ln for ln in lines if ln.split()[1] in ("/proc", "/sys", "/dev", "/etc/hosts", "/etc/resolv.conf")]
    # stopped: its files are still copied (a tool run over them), its changes still there
    assert api.docker("stop", "-t", "1", "files").returncode == 0
    r = api.docker("cp", "files:/data/f", str(tmp_path / "late"))
    assert r.returncode == 0 and (tmp_path / "late").read_text() == "hello\n", r.stderr
    r = api.docker("top", "files")
    assert r.returncode != 0 and b"is not running" in r.stderr, r.stderr
    assert "A /tmp/new" in api.docker("diff", "files").stdout.decode().splitlines()
    assert api.docker("rm", "files").returncode == 0
    api.v.assert_clean()


def test_docker_cp_and_top_of_a_vm_container(api: Api, tmp_path: Path) -> None:
    """The same copies into and out of a micro-VM (tar runs in the guest); top lists the guest's
    processes."""
    _run(api, "vmfiles", "hyperv")
    _copies_both_ways(api, "vmfiles", tmp_path)
    _top(api, "vmfiles")
    assert api.docker("rm", "-f", "vmfiles").returncode == 0
    api.v.assert_clean()


# what the diff tests do in a container: a file changed, one deleted from an image directory,
# files added (in a new directory and an image one), a directory's mode changed, a link added,
# and a whole image directory removed and made again (opaque: what the image had there is gone)
DIFF_SCRIPT = ("set -e; echo more >> /etc/passwd; rm /etc/group; chmod 750 /root; touch /tmp/new; "
               "mkdir -p /data/sub; echo deep > /data/sub/f; ln -s /etc /data/link; "
               "rm -rf /home; mkdir /home; echo mine > /home/mine")
DIFF_WANT = ["A /data", "A /data/link", "A /data/sub", "A /data/sub/f", "C /etc", "D /etc/group", "C /etc/passwd",
             "C /home", "D /home/vmrt", "A /home/mine", "C /root", "C /tmp", "A /tmp/new"]


def _diff(api: Api, name: str) -> list[str]:
    r = api.docker("diff", name, timeout=300)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, (name, r.stderr)
    return r.stdout.decode().splitlines()


def test_docker_diff_of_a_vm_container_is_the_process_containers(api: Api) -> None:
    """`docker diff` of a micro-VM: the guest agent lists the writable layer on its disk (the host
    never reads it), running (an exec) and stopped (a VM booted for the walk); what it reports
    for the same changes is what a process container reports: additions, a modified file and
    mode, a whiteout, an opaque directory hiding what the image had in it. A created container
    that never ran has no changes, and no VM is booted for it."""
    for name, isolation in (("diff-proc", "process"), ("diff-vm", "hyperv")):
        _run(api, name, isolation)
        assert _diff(api, name) == [], name  # what the runtime made (/etc/hosts...) is no change
        _sh(api, name, DIFF_SCRIPT)
    proc, vm = _diff(api, "diff-proc"), _diff(api, "diff-vm")
    assert sorted(vm) == sorted(DIFF_WANT), f"{vm} {proc}"  # nothing the runtime made (/etc/hosts, /dev...)
    assert vm == proc
    for name in ("diff-proc", "diff-vm"):
        assert api.docker("stop", "-t", "1", name).returncode == 0
    assert _diff(api, "diff-vm") == vm == _diff(api, "diff-proc")
    assert api.docker("inspect", "-f", "{{.State.Status}}", "diff-vm").stdout == b"exited\n"
    r = api.docker("create", "--name", "diff-new", "--isolation=hyperv", "busybox", "true")
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    assert _diff(api, "diff-new") == []
    assert time.monotonic() - t0 < 10  # nothing booted (a TCG boot takes longer)
    for name in ("diff-proc", "diff-vm", "diff-new"):
        assert api.docker("rm", name).returncode == 0
    api.v.assert_clean()


def test_docker_diff_of_a_layer_deeper_than_the_bound_is_one_line(api: Api) -> None:
    """A container that nests directories past the walk's bound (512): its diff fails in one line
    naming the bound, in either isolation (in a VM the guest's walk stops there and says so),
    and the service goes on."""
    for name, isolation in (("deep-proc", "process"), ("deep-vm", "hyperv")):
        _run(api, name, isolation)
        _sh(api, name, "mkdir -p /deep/" + "a/" * 600)
        r = api.docker("diff", name, timeout=300)
        err = r.stderr.decode()
        assert r.returncode != 0 and "deeper than 512" in err and len(err.splitlines()) == 1, (name, err)
        assert "Traceback" not in err and len(err) < 1000, err
        assert api.docker("rm", "-f", name).returncode == 0
    api.v.assert_clean()


@pytest.mark.parametrize("isolation", ["process", "hyperv"])
def test_docker_cp_into_a_created_and_out_of_a_stopped_container(api: Api, tmp_path: Path, isolation: str) -> None:
    """As Docker allows: a file copied into a container before its first start is what it reads;
    what it wrote is copied out once it stopped; the copies leave its record as it was (Exited,
    its status and finish time) and it starts again afterwards."""
    name = f"offline-{isolation}"
    r = api.docker("create", "--name", name, f"--isolation={isolation}", "busybox", "sh", "-c",
                   "cat /tmp/in/f; echo made > /tmp/made; exit 3")
    assert r.returncode == 0, r.stderr
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "f").write_text("copied before the start\n")
    r = api.docker("cp", str(tmp_path / "in"), f"{name}:/tmp/")
    assert r.returncode == 0, r.stderr
    assert api.docker("inspect", "-f", "{{.State.Status}}", name).stdout == b"created\n"
    r = api.docker("start", "-a", name)
    assert (r.returncode, r.stdout) == (3, b"copied before the start\n"), r
    before = api.docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}} {{.State.FinishedAt}}", name).stdout
    assert before.startswith(b"exited 3 "), before
    r = api.docker("cp", f"{name}:/tmp/made", str(tmp_path / "made"))
    assert r.returncode == 0 and (tmp_path / "made").read_text() == "made\n", r.stderr
    status, doc = _stat(api, name, "/tmp/in/f")
    assert status == 200 and doc["size"] == 24, doc
    assert _stat(api, name, "/tmp/nope")[0] == 404
    after = api.docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}} {{.State.FinishedAt}}", name).stdout
    assert after == before
    r = api.docker("start", "-a", name)  # the copies hold nothing of it
    assert (r.returncode, r.stdout) == (3, b"copied before the start\n"), r
    assert api.docker("rm", name).returncode == 0
    api.v.assert_clean()


def test_hostile_archives_are_refused_both_ways(api: Api, tmp_path: Path) -> None:
    """Uploads whose members lead out (``..``, an absolute name, a file through a symbolic link
    of the same archive, a device node) are refused with 400 and write nothing outside; a setuid
    bit is dropped. Out of the container, a `tar` that lies (a file beyond a link to the host)
    cuts the copy short: the client fails and nothing lands outside its destination, whether the
    container runs or is stopped."""
    cid = _run(api, "hostile", "process")
    outside = tmp_path / "outside"
    outside.mkdir()
    put = f"/containers/{cid}/archive?path=/tmp"
    for body in (_tar(("../escape", tarfile.REGTYPE, 0o644, "x")),
                 _tar(("/abs-escape", tarfile.REGTYPE, 0o644, "x")),
                 _tar(("l", tarfile.SYMTYPE, 0o777, "/etc"), ("l/pwned", tarfile.REGTYPE, 0o644, "x")),
                 _tar(("h", tarfile.SYMTYPE, 0o777, str(outside)), ("h/pwned", tarfile.REGTYPE, 0o644, "x")),
                 _tar(("up", tarfile.SYMTYPE, 0o777, "../../../etc")),
                 _tar(("hard", tarfile.LNKTYPE, 0o644, "../etc/passwd")),
                 _tar(("mem", tarfile.CHRTYPE, 0o644, "")),
                 b"this is not a tar archive" * 100):
        status, _, answer = api.request("PUT", put, body, {"Content-Type": "application/x-tar"})
        assert status == 400 and json.loads(answer)["message"], (body[:100], status, answer)
    assert _sh(api, "hostile", "ls -a /tmp /etc; test ! -e /escape && test ! -e /abs-escape && echo none") \
        .split()[-1] == "none"
    assert "pwned" not in _sh(api, "hostile", "ls /etc /tmp") and not os.listdir(outside)
    status, _, _ = api.request("PUT", put, _tar(("suid", tarfile.REGTYPE, 0o6755, "x")))
    assert status == 200
    assert api.request("PUT", put, b"")[0] == 200  # nothing to extract
    assert _sh(api, "hostile", "stat -c %a /tmp/suid") == "755\n"
    status, _, _ = api.request("PUT", f"/containers/{cid}/archive?path=/tmp/suid", _tar(("a", tarfile.REGTYPE,
                                                                                             0o644, "x")))
    assert status == 400  # the extraction point is a file
    # a container whose tar writes a link to the host and a file through it
    evil = _tar(("data", tarfile.DIRTYPE, 0o755, ""), ("data/l", tarfile.SYMTYPE, 0o777, str(outside)),
                ("data/l/pwned", tarfile.REGTYPE, 0o644, "gotcha"))
    (tmp_path / "evil.tar").write_bytes(evil)
    assert api.docker("cp", str(tmp_path / "evil.tar"), "hostile:/evil.tar").returncode == 0
    _sh(api, "hostile", "mkdir -p /data /usr/local/bin && printf '#!/bin/sh\\nexec cat /evil.tar\\n' "
                        "> /usr/local/bin/tar && chmod 755 /usr/local/bin/tar")
    dest = tmp_path / "dest"
    dest.mkdir()
    r = api.docker("cp", "hostile:/data", str(dest))
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert not os.listdir(outside) and not (dest / "data" / "pwned").exists()
    r = api.docker("cp", "hostile:/etc", str(dest))  # its first member is not /etc: refused before any byte
    assert r.returncode != 0 and b"wrote 'data' first" in r.stderr, r.stderr
    assert not (dest / "etc").exists() and not os.listdir(outside)
    # stopped, its lying tar runs in a tool run over its files: checked the same way
    assert api.docker("stop", "-t", "1", "hostile").returncode == 0
    r = api.docker("cp", "hostile:/data", str(dest))
    assert r.returncode != 0 and b"Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert not os.listdir(outside) and not (dest / "data" / "pwned").exists()
    assert api.docker("rm", "-f", "hostile").returncode == 0
    api.v.assert_clean()


@pytest.mark.root  # a whiteout (a character device) and a trusted.* xattr need root
def test_changes_read_the_writable_layer_without_following_it(tmp_path: Path) -> None:
    """docker diff's walk over an overlay upper dir and its lower layers: a whiteout is a deletion,
    an opaque directory hides what the layers had in it, a directory only copied up (/opt) is no
    change unless something in it was added or deleted; a symbolic link (in the upper dir or a layer)
    is never followed: a layer's `x -> /etc` does not make the upper `x/passwd` the host's."""
    lower, top, upper = tmp_path / "lower", tmp_path / "top", tmp_path / "upper"
    for d in ("etc", "opt/old", "same", "x"):
        (lower / d).mkdir(parents=True)
    for f in ("etc/passwd", "etc/group", "opt/old/a", "same/f"):
        (lower / f).write_text("image\n")
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "shadow").write_text("image\n")
    (top / "x").symlink_to("/etc")  # the top layer turns x into a link to the host's /etc
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "passwd").write_text("changed\n")
    os.mknod(upper / "etc" / "group", stat.S_IFCHR | 0o600, 0)  # a whiteout
    (upper / "opt" / "old").mkdir(parents=True)
    os.setxattr(upper / "opt" / "old", "trusted.overlay.opaque", b"y")
    (upper / "opt" / "old" / "b").write_text("new\n")
    (upper / "x").mkdir()
    (upper / "x" / "passwd").write_text("mine\n")
    (upper / "link").symlink_to("/etc")
    for d in ("etc", "opt"):  # copied up: the lower's metadata
        shutil.copystat(lower / d, upper / d)
    shutil.copystat(top / "etc", upper / "etc")
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (upper, top, lower)]
    try:
        found = list(layer_changes(FdUpper(fds[0]), fds[1:]))
        # the same upper dir as a VM's guest agent lists it (guest-agent/walk.c, built here and run
        # where the agent finds its writable layer: /run/vmrt/rw, in a mount namespace of its own)
        listed = list(layer_changes(TreeUpper(_agent_walk(tmp_path, upper.parent)), fds[1:]))
    finally:
        for fd in fds:
            os.close(fd)
    assert found == [("/etc", MODIFIED), ("/etc/group", DELETED), ("/etc/passwd", MODIFIED), ("/link", ADDED),
                     ("/opt/old", MODIFIED), ("/opt/old/a", DELETED), ("/opt/old/b", ADDED),
                     ("/x", MODIFIED), ("/x/passwd", ADDED)], found
    assert listed == found


def _agent_walk(tmp_path: Path, rw: Path) -> walk.Node:
    """The agent's walk (guest-agent/walk.c) of ``rw``/upper, parsed."""
    parser = walk.WalkParser()
    parser.feed(agent_walk(tmp_path, rw, content=False))
    return parser.close()


# --- the walk stream, played by an attacker (a guest writes it) ----------------------------------
def _rec(path: bytes, kind: bytes = b"f", *, flags: int = 0, mode: int = 0o644, size: int = 0,
         mtime: int = 0, dev: tuple[int, int] = (0, 0), plen: int | None = None) -> bytes:
    return walk.RECORD.pack(len(path) if plen is None else plen, kind[0], flags, mode, size, mtime, *dev) + path


def _end(count: int) -> bytes:
    return walk.RECORD.pack(0, 0, 0, 0, 0, 0, 0, 0)[:8] + struct.pack(">Q", count) + bytes(16)


def _parse(*chunks: bytes) -> walk.Node:
    p = walk.WalkParser()
    for c in chunks:
        p.feed(c)
    return p.close()


def _refused(stream: bytes, why: str) -> None:
    with pytest.raises(ProtocolError) as e:
        _parse(stream)
    msg = str(e.value)
    assert msg.startswith(walk.WHAT) and why in msg and "\n" not in msg and len(msg) < 400, msg


def test_the_walk_stream_is_parsed_strictly() -> None:
    """What a guest's walk may say: a tree, checked entry by entry. Anything malformed or out of
    bounds is refused in one line: a long path or name, a `..`, `.` or empty component, an
    absolute path, a NUL, an unknown type or flag, mode bits past 07777, a size past 2^63 - 1,
    a device number on a file, an entry before its directory or twice, a stream cut short
    (inside a record or before its end record), a wrong count at the end, bytes after it."""
    good = [_rec(b"etc", b"d", mode=0o755, size=4096, mtime=-5), _rec(b"etc/group", b"c", dev=(0, 0)),
            _rec(b"etc/disk", b"b", dev=(8, 1)), _rec(b"opt", b"d", flags=walk.OPAQUE),
            _rec(b"etc/l\xffink", b"l", mode=0o777, size=4, mtime=2**63 - 1)]
    root = _parse(walk.MAGIC + b"".join(good) + _end(len(good)))
    assert root.children is not None and set(root.children) == {b"etc", b"opt"}
    etc = root.children[b"etc"]
    assert etc.children is not None and etc.st_mode == stat.S_IFDIR | 0o755 and etc.st_mtime_ns == -5
    assert etc.children[b"disk"].st_rdev == os.makedev(8, 1) and etc.children[b"group"].st_rdev == 0
    assert root.children[b"opt"].opaque and stat.S_ISLNK(etc.children[b"l\xffink"].st_mode)
    one = _parse(walk.MAGIC, *(bytes([b]) for b in good[0] + _end(1)))  # a byte at a time
    assert one.children is not None and list(one.children) == [b"etc"]
    head, d = walk.MAGIC, _rec(b"d", b"d")
    for stream, why in [
            (head + _rec(b"a" * 4097) + _end(1), "a path of 4097 bytes"),
            (head + _rec(b"", plen=65535), "a path of 65535 bytes"),  # refused from its header
            (head + _rec(b"x" * 256) + _end(1), "a name longer than 255 bytes"),
            (head + d + _rec(b"d/../../etc/passwd") + _end(2), "'..'"),
            (head + _rec(b"..") + _end(1), "'..'"),
            (head + d + _rec(b"d/./x") + _end(2), "'.'"),
            (head + d + _rec(b"d//x") + _end(2), "empty"),
            (head + _rec(b"/etc/passwd") + _end(1), "an absolute path"),
            (head + _rec(b"etc\0passwd") + _end(1), "a NUL byte"),
            (head + _rec(b"a/" * 513 + b"a") + _end(1), "deeper than 512"),
            (head + _rec(b"x", b"?") + _end(1), "an unknown type"),
            (head + _rec(b"x", flags=2) + _end(1), "flags 0x02"),
            (head + _rec(b"x", flags=walk.OPAQUE) + _end(1), "flags 0x01"),
            (head + _rec(b"x", mode=0o10644) + _end(1), "mode bits"),
            (head + _rec(b"x", size=2**64 - 1) + _end(1), "a size of 18446744073709551615"),
            (head + _rec(b"x", dev=(1, 3)) + _end(1), "a device number"),
            (head + _rec(b"nodir/x") + _end(1), "before its directory"),
            (head + _rec(b"f") + _rec(b"f/x") + _end(2), "before its directory"),
            (head + _rec(b"x") + _rec(b"x", b"d") + _end(2), "listed twice"),
            (head + _rec(b"x")[:20], "inside a record"),
            (head + _rec(b"x")[:-1], "inside a record"),
            (head + _rec(b"x"), "before its end record"),
            (head + _rec(b"x") + _end(7), "a bad end record"),
            (head + _end(0) + b"more", "bytes after the end record"),
            (b"VMRTWLK2" + _end(0), "no magic"),
            (b"", "no walk stream"),
            (b"VMRT", "no walk stream")]:
        _refused(stream, why)


def test_a_walk_stream_past_its_bounds_is_refused_without_reading_on() -> None:
    """More entries than :data:`walk.ENTRIES_MAX`, or more bytes than :data:`walk.BYTES_MAX`:
    refused when the bound is crossed, without reading the rest of an endless stream."""
    def endless(record: Callable[[int], bytes], chunk: int) -> Iterator[bytes]:
        yield walk.MAGIC
        n, buf = 0, bytearray()
        while True:
            while len(buf) < chunk:
                n += 1
                buf += record(n)
            yield bytes(buf)
            buf.clear()

    for record, why in [(lambda n: _rec(b"f%d" % n), f"entry {walk.ENTRIES_MAX + 1}: more than"),
                        (lambda n: _rec(b"d%d" % n, b"d") + _rec(b"d%d/" % n + b"x" * 250), "more than 64 MiB")]:
        p, read = walk.WalkParser(), 0
        with pytest.raises(ProtocolError) as e:
            for c in endless(record, 1 << 20):
                read += len(c)
                p.feed(c)
        assert why in str(e.value) and read <= walk.BYTES_MAX + (2 << 20), (str(e.value), read)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64) | st.sampled_from([walk.MAGIC, _rec(b"a", b"d"), _rec(b"a/b"), _end(1),
                                                            _end(2), _rec(b"a/b", plen=4)]), max_size=12))
def test_any_walk_stream_is_a_tree_or_one_refusal(chunks: list[bytes]) -> None:
    """Whatever bytes a guest writes, the parser gives a tree or a ProtocolError, nothing else."""
    try:
        root = _parse(*chunks)
    except ProtocolError as e:
        assert "\n" not in str(e)
        return
    assert root.children is not None
