"""Registry mirrors (issue 20): config and validation, fail-over from a down, empty or lying mirror
to the next and to the origin, credentials kept to their own host, and Docker Hub's mirror list,
all against real docker-registry processes on loopback. Nothing here reaches the internet: a
Docker Hub pull is served by a local mirror, and any lookup of a docker.io name is refused."""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from ocibuild import Layer, OciLayout
from registry import Registry, free_port
from support import Vmrt

from vmrt import config
from vmrt.api.system import _registry_config
from vmrt.errors import ImageError, UsageError
from vmrt.images import auth, mirrors
from vmrt.images import registry as client
from vmrt.images.store import Store


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("mirror-origin")) as r:
        yield r


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("mirror-live")) as r:
        yield r


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "BACKOFF", 0.01)


def push(regs: list[Registry], tmp: Path, name: str, content: str) -> OciLayout:
    """One image (a file holding ``content``), pushed as NAME:latest to each of ``regs``, digests kept."""
    layout = OciLayout(tmp / f"layout-{name.replace('/', '-')}")
    layout.add_image([Layer().add_file("served-by", content)])
    for reg in regs:
        reg.push(layout.ref("latest"), name)
    return layout


def table(origin_host: str, *urls: str) -> dict[str, list[mirrors.Mirror]]:
    return mirrors.table([], {origin_host: list(urls)})


def pull(store: Store, ref: str, tmp: Path, **kw: Any) -> tuple[Any, str]:
    out = io.StringIO()
    kw.setdefault("auth_file", tmp / "auth.json")
    image = client.pull(store, ref, out=out, **kw)
    return image, out.getvalue()


def served_by(image: Any) -> str:
    return str(next(d / "served-by" for d in image.layer_dirs() if (d / "served-by").exists()).read_text())


# --- config ---------------------------------------------------------------------------------

def test_mirror_settings_file_env_and_info(tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text('registry_mirrors = ["https://mirror.example/", "http://127.0.0.1:5000"]\n'
                 'insecure_registries = "registry.example:5000"\n'
                 '[mirrors]\n"registry.example:5000" = ["http://127.0.0.1:5001"]\n'
                 '"index.docker.io" = ["https://hub-cache.example:8443/base/"]\n')
    cfg = config.load({"VMRT_CONFIG": str(f)})
    assert {k: [str(m) for m in v] for k, v in mirrors.from_config(cfg).items()} == {
        "docker.io": ["https://mirror.example", "http://127.0.0.1:5000", "https://hub-cache.example:8443/base"],
        "registry.example:5000": ["http://127.0.0.1:5001"]}
    assert mirrors.parse_mirror("https://hub-cache.example:8443/base/").api_root == \
        "https://hub-cache.example:8443/base/v2/"
    # for a Docker Hub reference whichever way it was spelt
    assert [str(m) for m in mirrors.for_domain(mirrors.from_config(cfg), "registry-1.docker.io")][0] == \
        "https://mirror.example"
    assert mirrors.for_domain(mirrors.from_config(cfg), "other.example") == []
    env = config.load({"VMRT_CONFIG": str(f), "VMRT_REGISTRY_MIRRORS": "http://10.0.0.1:5000, https://m.example"})
    assert [str(m) for m in mirrors.from_config(env)["docker.io"]][:2] == ["http://10.0.0.1:5000", "https://m.example"]
    # the API's /info: Docker's RegistryConfig (Mirrors: Docker Hub's, with Docker's trailing "/")
    rc = _registry_config(cfg)
    assert rc["Mirrors"] == ["https://mirror.example/", "http://127.0.0.1:5000/",
                             "https://hub-cache.example:8443/base/"]
    assert rc["IndexConfigs"]["registry.example:5000"] == {"Name": "registry.example:5000", "Official": False,
                                                           "Secure": False, "Mirrors": ["http://127.0.0.1:5001/"]}
    assert rc["IndexConfigs"]["docker.io"]["Official"] is True
    assert _registry_config(config.load({"VMRT_CONFIG": str(tmp_path / "none.toml")}))["Mirrors"] == []


@pytest.mark.parametrize("setting, message", [
    ('registry_mirrors = "ftp://m.example"', "unsupported scheme"),
    ('registry_mirrors = "m.example:5000"', "unsupported scheme"),
    ('registry_mirrors = "https://user:pw@m.example"', "username/password not allowed"),
    ('registry_mirrors = "https://m.example/?x=1"', "query or fragment"),
    ('registry_mirrors = "https://m.example:99999"', "not a valid URI|not http"),
    ('registry_mirrors = "https://m example"', "not http"),
    ('[mirrors]\n"a b" = ["https://m.example"]', "not a registry"),
    ('[mirrors]\n"r.example" = "https://m.example"', "table of URL lists"),
])
def test_bad_mirror_settings_are_usage_errors(tmp_path: Path, setting: str, message: str) -> None:
    f = tmp_path / "config.toml"
    f.write_text(setting + "\n")
    with pytest.raises(UsageError, match=message) as e:
        mirrors.from_config(config.load({"VMRT_CONFIG": str(f)}))
    assert "pw" not in str(e.value)  # a mirror URL's password is not echoed


# --- pulls ----------------------------------------------------------------------------------

@pytest.mark.root
def test_down_mirror_then_live_mirror(origin: Registry, mirror: Registry, tmp_path: Path, fast: None) -> None:
    """The first mirror refuses connections: the second serves the pull; the origin is never asked
    (its copy of the name holds other content)."""
    push([mirror], tmp_path, "via-mirror", "mirror")
    push([origin], tmp_path / "o", "via-mirror", "origin")
    down = f"http://127.0.0.1:{free_port()}"
    store = Store(tmp_path / "store")
    image, out = pull(store, f"{origin.host}/via-mirror", tmp_path, insecure_registries=[origin.host],
                      mirrors=table(origin.host, down, mirror.url))
    assert served_by(image) == "mirror"
    assert f"Mirror {down} failed, pulling from mirror {mirror.url} instead: cannot reach registry " \
           f"{down[7:]}: connection refused" in out
    assert image.repo_digests == [f"{origin.host}/via-mirror@{image.manifest_digest}"]  # the origin's name
    assert store.lookup(f"{origin.host}/via-mirror:latest") == image.id


@pytest.mark.root
def test_all_mirrors_fail_then_origin(origin: Registry, mirror: Registry, tmp_path: Path, fast: None) -> None:
    """A closed port, then a mirror without the repository (404 of the manifest): the origin serves it."""
    push([origin], tmp_path, "origin-only", "origin")
    down = f"http://127.0.0.1:{free_port()}"
    image, out = pull(Store(tmp_path / "store"), f"{origin.host}/origin-only", tmp_path,
                      insecure_registries=[origin.host], mirrors=table(origin.host, down, mirror.url))
    assert served_by(image) == "origin"
    assert f"Mirror {down} failed, pulling from mirror {mirror.url} instead" in out
    assert f"Mirror {mirror.url} failed, pulling from {origin.host} instead: manifest for " \
           f"{origin.host}/origin-only:latest not found: manifest unknown" in out
    # the origin failing too is the origin's error, one line
    with pytest.raises(ImageError, match=f"manifest for {origin.host}/nowhere:latest not found") as e:
        pull(Store(tmp_path / "s2"), f"{origin.host}/nowhere", tmp_path, insecure_registries=[origin.host],
             mirrors=table(origin.host, down))
    assert "\n" not in str(e.value)


@pytest.mark.root
def test_lying_mirror_fails_over_with_a_notice(origin: Registry, tmp_path: Path, fast: None) -> None:
    """A mirror whose layer blob was tampered with (same size, other bytes) is caught by the digest
    check, as the origin would be: the pull moves on to the origin and keeps only verified content."""
    with Registry(tmp_path / "liar") as liar:
        layout = push([liar, origin], tmp_path, "tampered", "honest")
        layer = layout.manifest(layout.descriptor("latest")["digest"])["layers"][0]
        path = liar.blob_path(layer["digest"])
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        store = Store(tmp_path / "store")
        image, out = pull(store, f"{origin.host}/tampered", tmp_path, insecure_registries=[origin.host],
                          mirrors=table(origin.host, liar.url))
    assert served_by(image) == "honest"
    assert f"Mirror {liar.url} failed, pulling from {origin.host} instead: digest mismatch for layer " \
           f"{layer['digest']}" in out
    assert store.has_blob(layer["digest"])
    assert "sha256:" + hashlib.sha256(store.read_blob(layer["digest"])).hexdigest() == layer["digest"]


class _Unavailable(BaseHTTPRequestHandler):
    """A mirror whose backend is down: 503 to everything."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.mark.root
def test_hanging_and_5xx_mirrors_give_way(origin: Registry, tmp_path: Path, fast: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror that takes the connection and never answers (a timeout), then one answering 503:
    each gets MIRROR_ATTEMPTS tries, then the origin serves the pull."""
    monkeypatch.setattr(client, "TIMEOUT", (2, 0.3))
    push([origin], tmp_path, "slow-mirrors", "origin")
    with socket.socket() as hang:
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)  # connections complete in the backlog; nothing is ever read or sent
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            slow = f"http://127.0.0.1:{hang.getsockname()[1]}"
            broken = f"http://127.0.0.1:{server.server_address[1]}"
            started = time.monotonic()
            image, out = pull(Store(tmp_path / "store"), f"{origin.host}/slow-mirrors", tmp_path,
                              insecure_registries=[origin.host], mirrors=table(origin.host, slow, broken))
            assert time.monotonic() - started < 10
        finally:
            server.shutdown()
            server.server_close()
    assert served_by(image) == "origin"
    assert f"Mirror {slow} failed, pulling from mirror {broken} instead: cannot reach registry " \
           f"{slow[7:]}: timed out (gave up after 2 attempts)" in out
    assert f"Mirror {broken} failed, pulling from {origin.host} instead: registry {broken[7:]} answered " \
           "503 Service Unavailable (gave up after 2 attempts)" in out


class _Recorder(BaseHTTPRequestHandler):
    """A mirror that refuses everyone (401 Basic) and remembers the Authorization it was sent."""

    seen: list[str | None] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mirror"')
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.mark.root
def test_mirror_gets_its_own_credentials_never_the_origins(tmp_path: Path, fast: None) -> None:
    with Registry(tmp_path / "private", "basic") as private:
        push([private], tmp_path, "secret", "origin")
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            murl = f"http://127.0.0.1:{server.server_address[1]}"
            auth_file = tmp_path / "auth.json"
            auth.save(auth_file, private.host, private.user, private.password)
            mtable = table(private.host, murl)
            image, out = pull(Store(tmp_path / "s1"), f"{private.host}/secret", tmp_path, auth_file=auth_file,
                              insecure_registries=[private.host], mirrors=mtable)
            assert served_by(image) == "origin" and "pull access denied" in out
            assert _Recorder.seen and set(_Recorder.seen) == {None}  # asked, and sent nothing
            _Recorder.seen.clear()
            auth.save(auth_file, murl, "mirror-user", "mirror-pw")  # `vmrt login` to the mirror
            image, out = pull(Store(tmp_path / "s2"), f"{private.host}/secret", tmp_path, auth_file=auth_file,
                              insecure_registries=[private.host], mirrors=mtable)
            assert served_by(image) == "origin"
            mine = "Basic " + base64.b64encode(b"mirror-user:mirror-pw").decode()
            assert mine in _Recorder.seen and set(_Recorder.seen) <= {None, mine}
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture
def no_docker_io(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any lookup of a docker.io name in this process is refused (and recorded): the test passes
    only if the mirror served the pull."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(host, bytes):
            host = host.decode()
        if isinstance(host, str) and host.rstrip(".").endswith("docker.io"):
            asked.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.mark.root
def test_docker_hub_pull_served_by_its_mirror(mirror: Registry, tmp_path: Path, no_docker_io: list[str],
                                              fast: None) -> None:
    push([mirror], tmp_path, "library/busybox", "hub-mirror")
    hub = mirrors.table([mirror.url], {})
    store = Store(tmp_path / "store")
    image, out = pull(store, "busybox", tmp_path, mirrors=hub)
    assert served_by(image) == "hub-mirror" and no_docker_io == [] and "Mirror" not in out
    assert store.lookup("docker.io/library/busybox:latest") == image.id
    assert image.repo_digests == [f"docker.io/library/busybox@{image.manifest_digest}"]
    # a name the mirror lacks goes on to Docker Hub itself, which (here) cannot be reached
    with pytest.raises(ImageError, match="cannot reach registry registry-1.docker.io"):
        pull(Store(tmp_path / "s2"), "alpine", tmp_path, mirrors=hub)
    assert no_docker_io == ["registry-1.docker.io"]


@pytest.mark.root
def test_cli_pull_and_info_use_registry_mirrors(mirror: Registry, tmp_path: Path) -> None:
    """``VMRT_REGISTRY_MIRRORS`` through the CLI; Docker Hub reached only through a closed proxy, so
    the pull succeeds only if the mirror served it."""
    push([mirror], tmp_path, "library/busybox", "hub-mirror")
    v = Vmrt(tmp_path / "root", tmp_path / "run")
    env = {"VMRT_REGISTRY_MIRRORS": mirror.url, "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}",
           "https_proxy": f"http://127.0.0.1:{free_port()}", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    r = v("pull", "busybox", env=env, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip() == "docker.io/library/busybox:latest"
    r = v("info", env=env, timeout=60)
    assert f"Registry mirrors:    docker.io: {mirror.url}" in r.stdout.decode()
