"""The Docker Engine API's image transfers and disk usage, driven by the real docker CLI:
`docker save`/`docker load` through the service (and what a hostile or oversized upload
gets), `docker pull` from a local registry with the credentials the CLI sends in
X-Registry-Auth (basic auth, and an identity token on a token-auth registry), a client that
leaves mid-pull, and `docker system df`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ocibuild import Layer, OciLayout, big_layer, busybox_layer
from registry import Registry
from support import Vmrt
from test_api import DOCKER, Api
from test_api import api as api_service  # the fixture, registered here under this name
from test_archive import EVIL_LAYER, docker_tar

pytestmark = pytest.mark.vm
assert api_service  # imported for pytest to find


@pytest.fixture
def api(api_service: Api) -> Api:
    """test_api's service on a private socket, stopped (and checked) at the test's end."""
    return api_service


def _env_api(vmrt: Vmrt, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, **env: str) -> Api:
    """The `api` fixture's service, started with these settings in its environment."""
    for k, v in env.items():
        monkeypatch.setitem(vmrt.env, k, v)
    a: Api = request.getfixturevalue("api")
    return a


def _store_tmp(v: Vmrt) -> list[str]:
    tmp = v.root / "tmp"
    return sorted(os.listdir(tmp)) if tmp.is_dir() else []


def _found(top: Path, name: str) -> list[Path]:
    """Files called ``name`` under ``top`` (walked without following a link)."""
    return [Path(d, name) for d, dirs, files in os.walk(top) if name in files or name in dirs]


def _image_ids(api: Api) -> list[str]:
    return sorted(api.docker("images", "-q", "--no-trunc").stdout.decode().split())


# --- save and load ---------------------------------------------------------------------------

def test_save_and_load_round_trip_through_docker(api: Api, tmp_path: Path) -> None:
    """`docker save busybox | docker load`; an image saved, removed and loaded back runs again
    with its content and its ID; a save of a missing image fails in one line and leaves no file."""
    layer = busybox_layer().add_file("marker", "round-trip\n")
    r = api.v("import", "-", "roundtrip:1", input=layer.tar_bytes())
    assert r.returncode == 0, r.stderr
    image_id = r.stdout.decode().strip()
    try:
        save = subprocess.Popen([DOCKER, "-H", f"unix://{api.sock}", "save", "busybox"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={"PATH": os.environ["PATH"], "HOME": str(api.home)})
        load = subprocess.run([DOCKER, "-H", f"unix://{api.sock}", "load"], stdin=save.stdout, capture_output=True,
                              env={"PATH": os.environ["PATH"], "HOME": str(api.home)}, timeout=180)
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait(60) == 0, save.stderr.read() if save.stderr else b""
        assert (load.returncode, load.stdout) == (0, b"Loaded image: busybox:latest\n"), load.stderr

        out = tmp_path / "rt.tar"
        r = api.docker("save", "-o", str(out), "roundtrip:1")
        assert r.returncode == 0, r.stderr
        with tarfile.open(out) as tf:
            manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert [m["RepoTags"] for m in manifest] == [["roundtrip:1"]]
        assert api.docker("rmi", "roundtrip:1").returncode == 0
        assert image_id not in _image_ids(api)
        r = api.docker("load", "-i", str(out))
        assert (r.returncode, r.stdout) == (0, b"Loaded image: roundtrip:1\n"), r.stderr
        assert api.docker("image", "inspect", "-f", "{{.Id}}", "roundtrip:1").stdout.decode().strip() == image_id
        r = api.docker("run", "--rm", "--isolation=process", "roundtrip:1", "cat", "/marker")
        assert (r.returncode, r.stdout) == (0, b"round-trip\n"), r.stderr

        # both images in one archive, by the API's names=
        status, headers, body = api.request("GET", "/images/get?names=busybox&names=roundtrip:1")
        assert status == 200 and headers["Content-Type"] == "application/x-tar"
        with tarfile.open(fileobj=io.BytesIO(body)) as tf:
            manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert sorted(t for m in manifest for t in m["RepoTags"]) == ["busybox:latest", "roundtrip:1"]

        # a missing image: an error before any byte of archive, and no file
        missing = tmp_path / "missing.tar"
        r = api.docker("save", "-o", str(missing), "nosuch:1")
        assert r.returncode != 0 and b"No such image: nosuch:1" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not missing.exists()
        status, _, body = api.request("GET", "/images/nosuch/get")
        assert status == 404 and json.loads(body)["message"] == "No such image: nosuch", body
        assert api.request("GET", "/images/get")[0] == 400

        # a client that leaves mid-archive: the save stops, the service answers on
        s = _raw(api, b"GET /v1.43/images/roundtrip:1/get HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        s.close()
        assert api.request("GET", "/_ping")[0] == 200
    finally:
        api.v("rmi", "roundtrip:1")
    assert _store_tmp(api.v) == []
    api.v.assert_clean()


def _raw(api: Api, request: bytes) -> socket.socket:
    """A connection to the service that sent ``request`` (a client free to leave at any point)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(api.sock))
    s.sendall(request)
    return s


def _chunks(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_load_refuses_hostile_garbage_and_oversized_archives(vmrt: Vmrt, monkeypatch: pytest.MonkeyPatch,
                                                             request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A layer entry climbing out of the root is refused (the whole archive, in one line) and
    written nowhere; so are an archive member named out of it, a body that is no tar, an empty
    one; a body over the limit is a 413 whether its length is announced or not (chunked). The
    service answers on, nothing is left in the store's tmp/, no image was added."""
    api = _env_api(vmrt, monkeypatch, request, VMRT_API_MAX_LOAD=str(1 << 20))
    before = _image_ids(api)
    outer = io.BytesIO()
    with tarfile.open(fileobj=outer, mode="w") as tf:  # the hostile image, plus a member named out of the archive
        with tarfile.open(fileobj=io.BytesIO(docker_tar([EVIL_LAYER], ["evil:1"]))) as src:
            for m in src.getmembers():
                tf.addfile(m, src.extractfile(m))
        ti = tarfile.TarInfo(f"../../../../../../../..{tmp_path}/outer-evil")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    hostile = tmp_path / "hostile.tar"
    hostile.write_bytes(outer.getvalue())
    r = api.docker("load", "-i", str(hostile))
    assert r.returncode != 0 and b"escapes the root: '../evil'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and b"Traceback" not in r.stderr
    assert not (tmp_path / "outer-evil").exists()
    assert not _found(vmrt.root, "evil") and not _found(vmrt.root, "outer-evil")
    assert not (vmrt.root.parent / "evil").exists() and not (vmrt.root / "evil").exists()

    hdr = {"Content-Type": "application/x-tar"}
    for body, want, message in ((b"this is no archive\n" * 1000, 400, "not a tar file"),
                                (b"\x1f\x8b\x08\x00" + b"\xff" * 300, 400, "archive is corrupt"),
                                (b"", 400, "no body")):
        status, _, answer = api.request("POST", "/images/load?quiet=1", body, hdr)
        assert status == want and message in json.loads(answer)["message"], (status, answer)
    status, _, answer = api.request("POST", "/images/load?quiet=maybe", b"x", hdr)
    assert status == 400, answer

    # over the limit: announced (refused before a byte is read), or chunked (refused at the limit)
    s = _raw(api, b"POST /v1.43/images/load HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-tar\r\n"
                  b"Content-Length: 17179869185\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 413 "), "no 413 for an announced oversized body"
    s.close()
    big = os.urandom(3 << 20)
    status, _, answer = api.request("POST", "/images/load", _chunks(big), hdr)  # type: ignore[arg-type]
    assert status == 413 and "api_max_load" in json.loads(answer)["message"], (status, answer)
    # a client that leaves half way through its upload
    s = _raw(api, b"POST /v1.43/images/load HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\r\n" + big[:200000])
    time.sleep(0.3)
    s.close()

    assert api.request("GET", "/_ping")[0] == 200
    assert _image_ids(api) == before and _store_tmp(vmrt) == []
    api.v.assert_clean()


# --- pull with credentials ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Registry]]:
    """A basic-auth registry and a token-auth one, each holding private/app:1."""
    base = tmp_path_factory.mktemp("api-regs")
    layout = OciLayout(base / "layout")
    layout.add_image([Layer().add_file("hello", "from the registry\n")], {"Cmd": ["/hello"]}, ref="1")
    with Registry(base / "basic", "basic", password="b4sic-Secret-81") as basic, \
            Registry(base / "token", "token", password="t0ken-Secret-82") as token:
        basic.push(layout.ref("1"), "private/app", "1")
        token.push(layout.ref("1"), "private/app", "1")
        assert token.token_server is not None
        token.token_server.refresh_tokens["refresh-Secret-83"] = token.user
        yield basic, token


def _docker_config(home: Path, name: str, auths: dict[str, dict[str, str]]) -> Path:
    d = home / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"auths": auths}))
    return d


def _b64url(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()


def test_pull_uses_the_credentials_docker_sends(vmrt: Vmrt, monkeypatch: pytest.MonkeyPatch,
                                                request: pytest.FixtureRequest,
                                                registries: tuple[Registry, Registry]) -> None:
    """`docker --config DIR pull` with a login in DIR/config.json: its X-Registry-Auth carries
    them, for this pull only: a basic-auth registry with username/password, a token registry
    with an identity token (OAuth2 refresh grant). Wrong or missing credentials fail in one
    line; a malformed header is a 400; the secrets are nowhere on disk nor in the log."""
    basic, token = registries
    api = _env_api(vmrt, monkeypatch, request, VMRT_INSECURE_REGISTRIES=f"{basic.host},{token.host}")
    secrets = [basic.password, token.password, "refresh-Secret-83"]

    def pull(config: Path | None, ref: str) -> subprocess.CompletedProcess[bytes]:
        return api.docker(*(["--config", str(config)] if config else []), "pull", ref)

    ref_b, ref_t = f"{basic.host}/private/app:1", f"{token.host}/private/app:1"
    try:
        r = pull(None, ref_b)
        assert r.returncode != 0 and b"pull access denied" in r.stderr, r.stderr
        wrong = _docker_config(api.home, "wrong", {basic.host: {
            "auth": base64.b64encode(f"{basic.user}:not-it".encode()).decode()}})
        r = pull(wrong, ref_b)
        assert r.returncode != 0 and b"incorrect username or password" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr

        good = _docker_config(api.home, "good", {
            basic.host: {"auth": base64.b64encode(f"{basic.user}:{basic.password}".encode()).decode()},
            token.host: {"identitytoken": "refresh-Secret-83"}})
        r = pull(good, ref_b)
        assert r.returncode == 0 and f"Downloaded newer image for {ref_b}".encode() in r.stdout, r.stderr
        # Docker's progress: each layer's messages, then the digest
        assert b": Pulling fs layer" in r.stdout and b": Pull complete" in r.stdout, r.stdout
        assert b"Digest: sha256:" in r.stdout, r.stdout
        r = pull(good, ref_t)
        assert r.returncode == 0, r.stderr
        # the repository's last tag removed, its digest reference goes too (the image stays, tagged otherwise)
        assert api.docker("tag", ref_t, "keep/app:1").returncode == 0
        r = api.docker("rmi", ref_t)
        assert r.returncode == 0 and b"@sha256:" in r.stdout and b"Deleted" not in r.stdout, r
        r = api.docker("images", "--format", "{{.Repository}}")
        assert token.host.encode() not in r.stdout, r
        assert token.host.encode() not in api.docker("inspect", "-f", "{{.RepoDigests}}", "keep/app:1").stdout
        assert api.docker("rmi", "keep/app:1").returncode == 0
        r = pull(good, ref_t)
        assert r.returncode == 0, r.stderr
        # docker login: the registry is asked through the service; the CLI keeps what it was told
        r = api.docker("login", "-u", basic.user, "--password-stdin", basic.host, input=b"not-it\n")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        r = api.docker("login", "-u", basic.user, "--password-stdin", basic.host, input=basic.password.encode())
        assert r.returncode == 0 and b"Login Succeeded" in r.stdout, r.stderr
        api.v("rmi", ref_b)
        r = pull(None, ref_b)  # the CLI's own config now has the login
        assert r.returncode == 0, r.stderr
        assert token.token_server is not None and any(q["method"] == "POST" for q in token.token_server.requests)
        bad_token = _docker_config(api.home, "badtoken", {token.host: {"identitytoken": "not-a-refresh-token"}})
        r = pull(bad_token, ref_t)
        assert r.returncode != 0 and b"identity token was refused" in r.stderr, r.stderr
        assert api.docker("image", "inspect", ref_b, ref_t).returncode == 0

        # the header as the API reads it: base64url JSON, any key case; else a 400 naming no secret
        path = f"/images/create?fromImage={basic.host}/private/app&tag=1"
        for header in ("!!!", base64.b64encode(b"[1]").decode(), _b64url({"username": 5}),
                       _b64url({"auth": "bm8tY29sb24="}), _b64url({"registrytoken": "x"})):
            status, _, body = api.request("POST", path, headers={"X-Registry-Auth": header})
            assert status == 400 and "X-Registry-Auth" in json.loads(body)["message"], (header, body)
        creds = _b64url({"Username": basic.user, "Password": basic.password, "ServerAddress": basic.host})
        status, _, body = api.request("POST", path, headers={"X-Registry-Auth": creds.rstrip("=")})
        assert status == 200 and b'"error"' not in body, body
        # credentials for another registry are not sent to this one
        elsewhere = _b64url({"username": basic.user, "password": basic.password, "serveraddress": "other.example"})
        api.v("rmi", ref_b)
        status, _, body = api.request("POST", path, headers={"X-Registry-Auth": elsewhere})
        assert status == 200 and b"pull access denied" in body, body
        status, _, body = api.request("POST", path, headers={"X-Registry-Auth": creds})  # the JSON stream itself
        messages = [json.loads(line) for line in body.splitlines() if line.strip()]
        assert status == 200 and messages[0]["status"] == "Pulling from private/app", messages
        assert messages[-1]["status"] == f"Status: Downloaded newer image for {ref_b}", messages
    finally:
        api.v("rmi", ref_b, ref_t)
    # nothing kept: no login stored, the secrets in no file of vmrt's and not in the service's log
    api.proc.send_signal(signal.SIGTERM)
    api.proc.wait(30)
    assert api.proc.stderr is not None
    log = api.proc.stderr.read()
    assert not (vmrt.root / "auth.json").exists()
    for root, dirs, files in os.walk(vmrt.root):
        dirs[:] = [d for d in dirs if d not in ("layers", "rw", "blobs")]
        for name in files:
            p = Path(root, name)
            if p.is_file() and not p.is_symlink() and p.stat().st_size < (64 << 20):
                data = p.read_bytes()
                assert not any(s.encode() in data for s in secrets), p
    assert not any(s.encode() in log for s in secrets)
    api.v.assert_clean()


# --- a client that leaves mid-pull --------------------------------------------------------------

class SlowProxy:
    """A TCP proxy to `upstream` that passes the registry's answers on slowly (8 KiB per 20 ms):
    a pull through it lasts seconds. `sent` counts the bytes passed to the client."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream, self.sent = upstream, 0
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(c, u, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, 0.02), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(8192):
                dst.sendall(data)
                if delay:
                    self.sent += len(data)
                    time.sleep(delay)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed.set()
        self.srv.close()


def test_a_client_leaving_mid_pull_cancels_it(vmrt: Vmrt, monkeypatch: pytest.MonkeyPatch,
                                              request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A client that closes its connection while its pull downloads: the pull stops (no image,
    nothing left in tmp/, the store's lock released: the next pull of it works), and the service
    answers on."""
    layout = OciLayout(tmp_path / "layout")
    layout.add_image([big_layer(3 << 20, 7)], {"Cmd": ["/x"]}, ref="1")
    with Registry(tmp_path / "reg") as reg:
        reg.push(layout.ref("1"), "big/app", "1")
        proxy = SlowProxy(("127.0.0.1", reg.port))
        try:
            api = _env_api(vmrt, monkeypatch, request, VMRT_INSECURE_REGISTRIES=f"{reg.host},{proxy.host}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(str(api.sock))
            s.sendall(f"POST /v1.43/images/create?fromImage={proxy.host}/big/app&tag=1 HTTP/1.1\r\nHost: x\r\n"
                      "Content-Length: 0\r\n\r\n".encode())
            got = b""
            while b"Pulling from" not in got:
                data = s.recv(4096)
                assert data, got
                got += data
            deadline = time.monotonic() + 30
            while proxy.sent < (256 << 10):  # the layer is coming
                assert time.monotonic() < deadline, "the pull did not start downloading"
                time.sleep(0.05)
            while b'"Downloading"' not in got:  # Docker's progress: the bytes so far of the layer's total
                data = s.recv(4096)
                assert data, got
                got += data
            progress = [json.loads(line) for line in got.partition(b"\r\n\r\n")[2].splitlines()
                        if line.startswith(b"{") and b'"Downloading"' in line]
            detail = progress[0]["progressDetail"]
            assert 0 < detail["current"] < detail["total"] and detail["total"] > (1 << 20), progress
            s.close()
            assert api.request("GET", "/_ping")[0] == 200
            deadline = time.monotonic() + 30
            while _store_tmp(vmrt):
                assert time.monotonic() < deadline, _store_tmp(vmrt)
                time.sleep(0.1)
            sent = proxy.sent
            time.sleep(1)
            assert proxy.sent - sent < (64 << 10), "the download went on after the client left"
            assert proxy.sent < (3 << 20)
            assert api.docker("image", "inspect", f"{proxy.host}/big/app:1").returncode != 0
            r = api.docker("pull", f"{reg.host}/big/app:1")  # the store is free: a pull goes through
            assert r.returncode == 0, r.stderr
            assert api.v("rmi", f"{reg.host}/big/app:1").returncode == 0
        finally:
            proxy.close()
    assert _store_tmp(vmrt) == []
    api.v.assert_clean()


# --- docker system df ---------------------------------------------------------------------------

def test_docker_system_df(api: Api) -> None:
    """`docker system df` and `-v`: the images (with the containers using them), a container's
    writable layer, a volume's data and its users, as Docker's shape."""
    assert api.docker("volume", "create", "dfvol").returncode == 0
    r = api.docker("run", "--name", "dfc", "--isolation=process", "-v", "dfvol:/data", "busybox", "sh", "-c",
                   "dd if=/dev/urandom of=/data/f bs=1024 count=300 2>/dev/null; "
                   "dd if=/dev/urandom of=/rwfile bs=1024 count=200 2>/dev/null")
    assert r.returncode == 0, r.stderr
    try:
        r = api.docker("system", "df")
        assert r.returncode == 0, r.stderr
        kinds = [ln.split()[0] for ln in r.stdout.decode().splitlines()[1:]]
        assert kinds == ["Images", "Containers", "Local", "Build"], r.stdout
        r = api.docker("system", "df", "-v")
        assert r.returncode == 0, r.stderr
        text = r.stdout.decode()
        assert "dfvol" in text and "dfc" in text and "busybox" in text, text

        status, _, body = api.request("GET", "/system/df")
        assert status == 200, body
        df = json.loads(body)
        assert set(df) == {"LayersSize", "Images", "Containers", "Volumes", "BuildCache"} and df["BuildCache"] == []
        busybox = next(i for i in df["Images"] if "busybox:latest" in i["RepoTags"])
        assert busybox["Size"] > 0 and busybox["Containers"] == 1 and df["LayersSize"] >= busybox["Size"]
        c = next(c for c in df["Containers"] if c["Names"] == ["/dfc"])
        assert c["SizeRw"] >= 200 << 10 and c["SizeRootFs"] >= c["SizeRw"] + busybox["Size"], c
        assert [m.get("Driver") for m in c["Mounts"] if m.get("Name") == "dfvol"] == ["local"]
        v = next(v for v in df["Volumes"] if v["Name"] == "dfvol")
        assert v["UsageData"]["RefCount"] == 1 and v["UsageData"]["Size"] >= 300 << 10, v
        status, _, body = api.request("GET", "/system/df?type=volume")
        assert status == 200 and set(json.loads(body)) == {"Volumes"}, body
        assert api.request("GET", "/system/df?type=bogus")[0] == 400
    finally:
        api.docker("rm", "-f", "dfc")
        api.docker("volume", "rm", "dfvol")
    api.v.assert_clean()


def test_disk_usage_of_a_tenant_tree_follows_no_link(tmp_path: Path) -> None:
    """What `system df` counts in a writable layer or a volume: files once (hard links), a sparse
    file by its blocks, never what a link (to / here) leads to; a missing tree is 0."""
    from vmrt.api.system import tree_size
    d = tmp_path / "tree"
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "b" / "f").write_bytes(os.urandom(5000))
    os.link(d / "a" / "b" / "f", d / "hard")
    (d / "a" / "root").symlink_to("/")
    (d / "a" / "etc").symlink_to("/etc")
    with open(d / "sparse", "wb") as f:
        f.truncate(1 << 30)
    (d / "small").write_bytes(b"x" * 100)
    assert tree_size(d) == 5100
    assert tree_size(d / "a" / "root") == 0 and tree_size(tmp_path / "none") == 0
