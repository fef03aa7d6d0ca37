"""Pulling from a real registry (Debian's docker-registry 2.8, images pushed with skopeo), login and logout.

What a real registry will not do on request (answer 503, speak schema 1, expire a token
between two requests) is scripted with `Stub`, a small HTTP server in this file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from ocibuild import Layer, OciLayout, big_layer
from registry import Registry, StubHandler, StubServer, free_port

from vmrt.errors import ImageError, UsageError
from vmrt.images import auth
from vmrt.images import registry as client
from vmrt.images.store import MT_DOCKER_MANIFEST, Store

REPO = Path(__file__).resolve().parent.parent


# --- helpers -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("reg-none")) as r:
        yield r


@pytest.fixture(scope="module")
def reg_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("reg-basic"), "basic") as r:
        yield r


@pytest.fixture(scope="module")
def reg_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("reg-token"), "token") as r:
        yield r


def push(reg: Registry, tmp: Path, name: str, layers: list[Layer], **kw: Any) -> OciLayout:
    """Build a one-image layout under tmp and skopeo-push it as NAME:latest."""
    layout = OciLayout(tmp / f"layout-{name.replace('/', '-')}")
    layout.add_image(layers, **kw)
    reg.push(layout.ref("latest"), name)
    return layout


def do_pull(reg: Registry, store: Store, name: str, tmp: Path, **kw: Any) -> tuple[Any, str]:
    """Pull reg's NAME; returns (image, plain output)."""
    out = io.StringIO()
    kw.setdefault("auth_file", tmp / "auth.json")
    image = client.pull(store, f"{reg.host}/{name}", insecure_registries=[reg.host], out=out, **kw)
    return image, out.getvalue()


def merged(dirs: list[Path]) -> dict[str, str]:
    """What overlayfs would show for unpacked layers (lowest first): {path: content | 'dir' | '-> target'}."""
    view: dict[str, str] = {}
    for d in dirs:
        for root, dirnames, filenames in os.walk(d):
            for name in sorted(dirnames + filenames):
                p = Path(root, name)
                rel, st = str(p.relative_to(d)), p.lstat()
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # whiteout
                    for k in [k for k in view if k == rel or k.startswith(rel + "/")]:
                        del view[k]
                elif stat.S_ISDIR(st.st_mode):
                    with contextlib.suppress(OSError):
                        if os.getxattr(p, "trusted.overlay.opaque") == b"y":
                            for k in [k for k in view if k.startswith(rel + "/")]:
                                del view[k]
                    view[rel] = "dir"
                elif stat.S_ISLNK(st.st_mode):
                    view[rel] = "-> " + os.readlink(p)
                else:
                    view[rel] = p.read_bytes().decode(errors="replace")
    return view


def nothing_committed(store: Store, ref: str) -> None:
    assert store.images() == []
    assert store.lookup(ref) is None
    assert list(store.tmp.iterdir()) == []
    for blob in store.blobs.iterdir():  # whatever landed is complete and verified
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- pulls from a real registry ----------------------------------------------------------

@pytest.mark.root
def test_multi_layer_image_whiteouts_links(reg: Registry, tmp_path: Path) -> None:
    base = (Layer().add_dir("etc").add_file("etc/a", "a1").add_file("etc/b", "b1").add_dir("d")
            .add_file("d/x", "x").add_file("d/y", "y").add_dir("bin").add_file("bin/tool", "#!tool")
            .add_hardlink("bin/tool2", "bin/tool").add_file("bin/run", "#!run", mode=0o750, uid=7, gid=8))
    mid = (Layer().add_dir("etc").add_whiteout("etc/a").add_dir("d").add_opaque("d").add_file("d/z", "z")
           .add_symlink("etc/link", "../d/z").add_symlink("abs", "/etc/b"))
    top = Layer().add_dir("etc").add_file("etc/a", "a3").add_dir("d").add_whiteout("d/z")
    push(reg, tmp_path, "multi", [base, mid, top], config={"Cmd": ["/bin/tool"]})
    store = Store(tmp_path / "store")
    image, out = do_pull(reg, store, "multi", tmp_path)

    assert image.tags == [f"{reg.host}/multi:latest"] and image.runtime_config["Cmd"] == ["/bin/tool"]
    dirs = image.layer_dirs()
    assert len(dirs) == 3 and all(d.is_dir() for d in dirs)
    assert os.stat(dirs[0] / "bin/tool").st_ino == os.stat(dirs[0] / "bin/tool2").st_ino
    run = os.stat(dirs[0] / "bin/run")
    assert (run.st_mode & 0o777, run.st_uid, run.st_gid) == (0o750, 7, 8)
    assert stat.S_ISCHR((dirs[1] / "etc/a").lstat().st_mode)
    assert merged(dirs) == {"etc": "dir", "etc/a": "a3", "etc/b": "b1", "etc/link": "-> ../d/z", "d": "dir",
                            "bin": "dir", "bin/tool": "#!tool", "bin/tool2": "#!tool", "bin/run": "#!run",
                            "abs": "-> /etc/b"}

    digest = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--no-creds",
                                        reg.ref("multi")], capture_output=True, check=True).stdout)["Digest"]
    assert image.repo_digests == [f"{reg.host}/multi@{digest}"]
    assert store.get(f"{reg.host}/multi@{digest}").id == image.id
    lines = out.splitlines()
    assert lines[:2] == ["Using default tag: latest", "latest: Pulling from multi"]
    for layer in image.layers:
        short = layer["digest"][7:19]
        assert f"{short}: Pulling fs layer" in lines and f"{short}: Pull complete" in lines
    assert lines[-2:] == [f"Digest: {digest}", f"Status: Downloaded newer image for {reg.host}/multi:latest"]

    _, again = do_pull(reg, store, "multi:latest", tmp_path)
    assert "Pull complete" not in again and again.splitlines()[-1] == \
        f"Status: Image is up to date for {reg.host}/multi:latest"
    assert list(store.tmp.iterdir()) == []


@pytest.mark.root
def test_docker_media_types(reg: Registry, tmp_path: Path) -> None:
    push(reg, tmp_path, "dockerish", [Layer().add_file("hello", "docker")], docker_media_types=True)
    store = Store(tmp_path / "store")
    image, _ = do_pull(reg, store, "dockerish", tmp_path)
    assert image.manifest["mediaType"] == MT_DOCKER_MANIFEST
    assert merged(image.layer_dirs()) == {"hello": "docker"}
    by_digest, out = do_pull(reg, Store(tmp_path / "by-digest"), f"dockerish@{image.manifest_digest}", tmp_path)
    assert by_digest.id == image.id and by_digest.tags == [] and by_digest.repo_digests == image.repo_digests
    assert out.startswith(f"{image.manifest_digest}: Pulling from dockerish\n")


@pytest.mark.root
def test_zstd_layers(reg: Registry, tmp_path: Path) -> None:
    layers = [Layer().add_file("one", "1" * 10000), Layer().add_file("two", "2")]
    push(reg, tmp_path, "zstd", layers, compression="zstd")
    image, _ = do_pull(reg, Store(tmp_path / "store"), "zstd", tmp_path)
    assert {d["mediaType"] for d in image.layers} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    assert merged(image.layer_dirs()) == {"one": "1" * 10000, "two": "2"}


@pytest.mark.root
@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
def test_multi_arch_platform_selection(reg: Registry, tmp_path: Path, docker: bool) -> None:
    layout = OciLayout(tmp_path / "layout")
    platforms = [("linux", "amd64"), ("linux", "arm64", "v8"), ("linux", "arm", "v7")]
    digests = [layout.add_image([Layer().add_file("arch", "/".join(p))], platform=p, ref=None,
                                docker_media_types=docker) for p in platforms]
    index = layout.add_index(digests, docker_media_types=docker)
    name = f"multi-{str(docker).lower()}"
    reg.push(layout.ref("latest"), name, all_images=True)

    default = Store(tmp_path / "amd64")
    image, out = do_pull(reg, default, name, tmp_path)
    assert merged(image.layer_dirs()) == {"arch": "linux/amd64"} and image.manifest_digest == digests[0]
    assert image.repo_digests == [f"{reg.host}/{name}@{index}"] and f"Digest: {index}" in out
    default.collect()
    assert default.has_blob(index), "the index is kept with the image"

    for platform, want, digest in (("linux/arm64", "linux/arm64/v8", digests[1]),
                                   ("linux/aarch64/v8", "linux/arm64/v8", digests[1]),
                                   ("linux/arm", "linux/arm/v7", digests[2])):
        store = Store(tmp_path / platform.replace("/", "-"))
        image, _ = do_pull(reg, store, name, tmp_path, platform=platform)
        assert merged(image.layer_dirs()) == {"arch": want} and image.manifest_digest == digest

    store = Store(tmp_path / "s390x")
    with pytest.raises(ImageError, match="no matching manifest for linux/s390x") as e:
        do_pull(reg, store, name, tmp_path, platform="linux/s390x")
    assert "linux/amd64, linux/arm/v7, linux/arm64/v8" in str(e.value)
    nothing_committed(store, f"{reg.host}/{name}")
    with pytest.raises(UsageError, match="os/arch"):
        do_pull(reg, store, name, tmp_path, platform="linux")


@pytest.mark.root
def test_shared_base_layer_stored_once(reg: Registry, tmp_path: Path) -> None:
    base = Layer().add_dir("etc").add_file("etc/os-release", "base")
    push(reg, tmp_path, "app1", [base, Layer().add_file("app", "1")])
    push(reg, tmp_path, "app2", [base, Layer().add_file("app", "2")])
    store = Store(tmp_path / "store")
    one, _ = do_pull(reg, store, "app1", tmp_path)
    two, out = do_pull(reg, store, "app2", tmp_path)
    assert f"{one.layers[0]['digest'][7:19]}: Already exists" in out
    assert f"{two.layers[1]['digest'][7:19]}: Pull complete" in out
    assert one.layer_dirs()[0] == two.layer_dirs()[0]
    assert len(list(store.layers.iterdir())) == 3 and len(store.images()) == 2
    assert merged(two.layer_dirs()) == {"etc": "dir", "etc/os-release": "base", "app": "2"}


@pytest.mark.root
def test_concurrent_pulls_of_one_image(reg: Registry, tmp_path: Path) -> None:
    push(reg, tmp_path, "together", [big_layer(4 << 20, seed) for seed in range(4)])
    results: list[Any] = []

    def one() -> None:
        try:
            results.append(do_pull(reg, Store(tmp_path / "store"), "together", tmp_path)[0].id)
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2 and results[0] == results[1] and isinstance(results[0], str), results
    store = Store(tmp_path / "store")
    image = store.get(f"{reg.host}/together")
    assert [i.id for i in store.images()] == [image.id] and list(store.tmp.iterdir()) == []
    assert len(list(store.layers.iterdir())) == 4
    for digest in image.blobs:
        store.read_blob(digest)  # verifies
    assert [d.joinpath("data/blob.bin").stat().st_size for d in image.layer_dirs()] == [4 << 20] * 4


@pytest.mark.root
def test_tty_progress_and_quiet(reg: Registry, tmp_path: Path) -> None:
    push(reg, tmp_path, "bars", [big_layer(1 << 20, 7), Layer().add_file("f", "x")])
    tty = FakeTTY()
    image = client.pull(Store(tmp_path / "tty"), f"{reg.host}/bars", insecure_registries=[reg.host],
                        auth_file=tmp_path / "auth.json", out=tty)
    text = tty.getvalue()
    assert all(f"{d['digest'][7:19]}: Pull complete" in text for d in image.layers)
    assert "1.00M/1.00M" in text and "Status: Downloaded newer image" in text
    quiet = io.StringIO()
    client.pull(Store(tmp_path / "quiet"), f"{reg.host}/bars", insecure_registries=[reg.host], quiet=True,
                auth_file=tmp_path / "auth.json", out=quiet)
    assert quiet.getvalue() == ""


# --- hostile or broken registries ----------------------------------------------------------

@pytest.mark.root
@pytest.mark.parametrize("what", ["layer", "config"])
def test_corrupt_blob_in_registry_storage(reg: Registry, tmp_path: Path, what: str) -> None:
    name = f"corrupt-{what}"
    layout = push(reg, tmp_path, name, [Layer().add_file("ok", "fine" * 1000), big_layer(300_000, 3)])
    manifest = layout.manifest(layout.descriptor("latest")["digest"])
    victim = manifest["layers"][1] if what == "layer" else manifest["config"]
    path = reg.blob_path(victim["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    store = Store(tmp_path / "store")
    with pytest.raises(ImageError, match="digest mismatch") as e:
        do_pull(reg, store, name, tmp_path)
    assert victim["digest"] in str(e.value) and "\n" not in str(e.value)
    nothing_committed(store, f"{reg.host}/{name}")
    assert not store.has_blob(victim["digest"])


def _evil_layers(outside: Path) -> dict[str, Layer]:
    dotdot = tarfile.TarInfo("../evil")
    absolute = tarfile.TarInfo(str(outside / "abs-evil"))
    through = tarfile.TarInfo("link/pwned")
    return {"dotdot": Layer().add_tarinfo(dotdot, b"evil"),
            "absolute": Layer().add_tarinfo(absolute, b"evil"),
            "symlink": Layer().add_symlink("link", str(outside)).add_tarinfo(through, b"evil")}


@pytest.mark.root
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_malicious_layer_refused(reg: Registry, tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    name = f"evil-{kind}"
    push(reg, tmp_path, name, [Layer().add_file("fine", "ok"), _evil_layers(outside)[kind]])
    store = Store(tmp_path / "store" / "nested")
    with pytest.raises(ImageError, match=r"cannot unpack layer sha256:\w+: .*(absolute|escapes|symlink 'link')"):
        do_pull(reg, store, name, tmp_path)
    nothing_committed(store, f"{reg.host}/{name}")
    assert list(outside.iterdir()) == [] and not (tmp_path / "store" / "evil").exists()
    assert not (store.layers / "evil").exists() and not (store.tmp / "evil").exists()


class _KillingStore(Store):
    """A store whose blob writes kill the registry once `after` bytes of layers have arrived."""

    def __init__(self, root: Path, reg: Registry, after: int) -> None:
        super().__init__(root)
        self.reg, self.after, self.seen = reg, after, 0

    @contextlib.contextmanager
    def blob_writer(self, expected: str | None = None, size: int | None = None) -> Iterator[Any]:
        with super().blob_writer(expected, size) as w:
            write = w.write

            def counting(data: bytes) -> int:
                self.seen += len(data)
                if self.seen > self.after and self.reg.proc is not None:
                    self.reg.kill()
                return write(data)

            w.write = counting  # type: ignore[method-assign]
            yield w


@pytest.mark.root
def test_registry_killed_mid_pull_then_retry(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as reg:
        layout = OciLayout(tmp_path / "layout")
        layout.add_image([Layer().add_file("small", "s"), big_layer(24 << 20, 1), big_layer(24 << 20, 2)])
        reg.push(layout.ref("latest"), "dying")
        ref = f"{reg.host}/dying"
        store = _KillingStore(tmp_path / "store", reg, after=2 << 20)
        t = time.monotonic()
        with pytest.raises(ImageError) as e:
            do_pull(reg, store, "dying", tmp_path)
        message = str(e.value)
        assert reg.proc is None and "\n" not in message, message
        assert f"cannot reach registry {reg.host}: connection refused (gave up after 5 attempts)" == message
        assert time.monotonic() - t < 15
        nothing_committed(store, ref)

        reg.start()
        store = Store(tmp_path / "store")
        image, _ = do_pull(reg, store, "dying", tmp_path)
        assert store.get(ref).id == image.id
        assert [p.joinpath("data/blob.bin").stat().st_size for p in image.layer_dirs()[1:]] == [24 << 20] * 2


def test_connection_errors_are_one_clear_line(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "BACKOFF", 0.01)
    store = Store(tmp_path / "store")
    port = free_port()
    with pytest.raises(ImageError, match=rf"cannot reach registry 127.0.0.1:{port}: connection refused"):
        client.pull(store, f"127.0.0.1:{port}/x", insecure_registries=["127.0.0.1"], auth_file=tmp_path / "a",
                    out=io.StringIO())
    with pytest.raises(ImageError, match="over HTTPS.*insecure registry"):
        client.pull(store, f"{reg.host}/x", auth_file=tmp_path / "a", out=io.StringIO())
    with pytest.raises(ImageError, match="manifest for .*/nothing-here:latest not found: manifest unknown"):
        do_pull(reg, store, "nothing-here", tmp_path)
    with pytest.raises(UsageError, match="invalid reference"):
        do_pull(reg, store, "UPPER", tmp_path)
    nothing_committed(store, f"{reg.host}/x")


# --- auth -----------------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.parametrize("kind", ["basic", "token"])
def test_login_pull_logout(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> None:
    reg: Registry = request.getfixturevalue(f"reg_{kind}")
    name = f"private-{kind}"
    push(reg, tmp_path, name, [Layer().add_file("secret", kind)])
    auth_file = tmp_path / "cfg" / "auth.json"
    store = Store(tmp_path / "store")
    issued = reg.tokens_issued

    with pytest.raises(ImageError, match="pull access denied for .*may require 'docker login'"):
        do_pull(reg, store, name, tmp_path, auth_file=auth_file)
    with pytest.raises(ImageError, match="unauthorized: incorrect username or password"):
        client.login(reg.host, reg.user, "wrong", insecure_registries=[reg.host], auth_file=auth_file)
    assert not auth_file.exists()

    client.login(reg.host, reg.user, reg.password, insecure_registries=[reg.host], auth_file=auth_file)
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    saved = json.loads(auth_file.read_text())["auths"][reg.host]["auth"]
    assert base64.b64decode(saved).decode() == f"{reg.user}:{reg.password}"
    image, _ = do_pull(reg, store, name, tmp_path, auth_file=auth_file)
    assert merged(image.layer_dirs()) == {"secret": kind}
    if kind == "token":
        assert reg.token_server is not None and reg.tokens_issued > issued
        asked = [r for r in reg.token_server.requests if r["user"] == reg.user]
        assert any(f"repository:{name}:pull" in r["scopes"] for r in asked)

    assert client.logout(reg.host, auth_file=auth_file) is True
    assert client.logout(reg.host, auth_file=auth_file) is False
    assert json.loads(auth_file.read_text())["auths"] == {}
    with pytest.raises(ImageError, match="pull access denied"):
        do_pull(reg, Store(tmp_path / "other"), name, tmp_path, auth_file=auth_file)


def test_auth_file_format(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"auths": {"https://registry.example:5000/v2/": {"auth": "dTpw"}}, "psFormat": "x"}))
    f.chmod(0o644)
    assert auth.get(f, "registry.example:5000") == ("u", "p")
    auth.save(f, "docker.io", "hub", "pw:with:colons")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    data = json.loads(f.read_text())
    assert data["psFormat"] == "x" and set(data["auths"]) == {"https://registry.example:5000/v2/",
                                                               "https://index.docker.io/v1/"}
    for spelling in ("docker.io", "index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io"):
        assert auth.get(f, spelling) == ("hub", "pw:with:colons")
    auth.save(f, "http://registry.example:5000", "u2", "p2")
    assert json.loads(f.read_text())["auths"]["registry.example:5000"] == {"auth": "dTI6cDI="}
    assert auth.get(f, "registry.example:5000") == ("u2", "p2") and auth.get(f, "registry.example") is None
    assert auth.erase(f, "docker.io") and auth.get(f, "docker.io") is None
    assert not list(tmp_path.glob(".config.json.*"))
    f.write_text("[1]")
    with pytest.raises(ImageError, match="not a Docker config.json"):
        auth.get(f, "x")


def test_parse_challenges_and_platforms() -> None:
    header = ('Bearer realm="https://auth.example/token?a=1,b=2",service="registry.example",'
              'scope="repository:app:pull,push" , Basic realm="say \\"hi\\""')
    assert client.parse_challenges(header) == {
        "bearer": {"realm": "https://auth.example/token?a=1,b=2", "service": "registry.example",
                   "scope": "repository:app:pull,push"},
        "basic": {"realm": 'say "hi"'}}
    assert client.parse_challenges('BASIC Realm=plain') == {"basic": {"realm": "plain"}}
    assert client.parse_challenges("") == {}
    assert client.parse_platform("linux/amd64") == ("linux", "amd64", "")
    assert client.parse_platform("linux/aarch64") == ("linux", "arm64", "v8")
    assert client.parse_platform("Linux/ARM/v6") == ("linux", "arm", "v6")
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(UsageError):
            client.parse_platform(bad)


# --- scripted misbehaviour ------------------------------------------------------------------

class Stub(StubServer):
    """A registry serving an OciLayout's blobs and tags, scripted to misbehave.

    `fail`: statuses answered (in order) before serving anything; `tokens`: require bearer
    tokens from /token; `expire_after_manifest`: revoke every token once a manifest was
    served; `cut`: send only that many bytes of the next blob, then drop the connection.
    """

    def __init__(self, layout: OciLayout) -> None:
        self.blobs = {f"sha256:{p.name}": p.read_bytes() for p in (layout.dir / "blobs" / "sha256").iterdir()}
        self.tags = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
                     for m in layout.index["manifests"]}
        self.fail: list[int] = []
        self.tokens, self.expire_after_manifest, self.cut = False, False, 0
        self.valid: set[str] = set()
        self.issued = 0
        self.log: list[str] = []
        super().__init__()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(StubHandler):

            def do_GET(self) -> None:
                stub.log.append(self.path)
                if self.path.startswith("/token"):
                    stub.issued += 1
                    token = f"t{stub.issued}"
                    stub.valid.add(token)
                    return self.reply(200, json.dumps({"token": token}).encode())
                if stub.fail:
                    return self.reply(stub.fail.pop(0), b"{}")
                if stub.tokens and self.headers.get("Authorization", "").removeprefix("Bearer ") not in stub.valid:
                    realm = f"http://{stub.host}/token"
                    return self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}',
                                      {"WWW-Authenticate": f'Bearer realm="{realm}",service="stub",scope="x"'})
                if self.path == "/v2/":
                    return self.reply(200, b"{}")
                _, _, name, kind, ref = self.path.split("/", 4)
                data = stub.blobs.get(stub.tags.get(ref, ref))
                if data is None:
                    return self.reply(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')
                if kind == "manifests":
                    if stub.expire_after_manifest:
                        stub.valid.clear()
                    return self.reply(200, data, {"Content-Type": json.loads(data).get("mediaType", ""),
                                                  "Docker-Content-Digest": stub.tags.get(ref, ref)})
                if 0 < stub.cut < len(data):  # layers only: the config is smaller
                    cut, stub.cut = stub.cut, 0
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:cut])
                    self.close_connection = True
                    return None
                return self.reply(200, data)

        return Handler


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Stub]:
    layout = OciLayout(tmp_path / "stub-layout")
    layout.add_image([Layer().add_file("a", "A"), big_layer(200_000, 5)])
    s = Stub(layout)
    yield s
    s.close()


def stub_pull(stub: Stub, tmp_path: Path) -> tuple[Any, str]:
    out = io.StringIO()
    image = client.pull(Store(tmp_path / "store"), f"{stub.host}/app", insecure_registries=[stub.host],
                        auth_file=tmp_path / "auth.json", out=out)
    return image, out.getvalue()


@pytest.mark.root
def test_retries_5xx_429_and_broken_downloads(stub: Stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "BACKOFF", 0.01)
    stub.fail = [503, 429, 500]
    stub.cut = 1000
    image, out = stub_pull(stub, tmp_path)
    assert merged(image.layer_dirs())["a"] == "A"
    big = image.layers[1]["digest"]
    assert f"{big[7:19]}: Retrying in 0.01 seconds" in out and f"{big[7:19]}: Pull complete" in out
    assert stub.log.count(f"/v2/app/blobs/{big}") == 2 and stub.log.count("/v2/") == 4
    stub.fail = [502] * 5
    with pytest.raises(ImageError, match=r"answered 502 Bad Gateway \(gave up after 5 attempts\)"):
        stub_pull(stub, tmp_path / "again")


@pytest.mark.root
def test_token_refreshed_once_mid_pull(stub: Stub, tmp_path: Path) -> None:
    stub.tokens = stub.expire_after_manifest = True
    image, _ = stub_pull(stub, tmp_path)
    assert merged(image.layer_dirs())["a"] == "A"
    assert stub.issued == 2, stub.log  # the first token, and one refresh after it was revoked


def test_hostile_manifests_refused(stub: Stub, tmp_path: Path) -> None:
    def add(tag: str, body: bytes, digest: str = "") -> None:
        stub.tags[tag] = digest or "sha256:" + hashlib.sha256(body).hexdigest()
        stub.blobs[stub.tags[tag]] = body

    add("old", json.dumps({"schemaVersion": 1, "name": "app", "tag": "old", "fsLayers": []}).encode())
    add("huge", json.dumps({"schemaVersion": 2, "pad": "x" * (5 << 20)}).encode())
    add("bigconfig", json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                 "config": {"digest": "sha256:" + "1" * 64, "size": 5 << 20}, "layers": []}).encode())
    add("lying", stub.blobs[stub.tags["latest"]], "sha256:" + "0" * 64)  # served under a digest it does not have
    store = Store(tmp_path / "store")
    for ref, message in ((":old", "schema 1"), (":huge", "too large"), (":bigconfig", "too large"),
                         (":lying", "digest mismatch: the registry promised sha256:0000"),
                         ("@sha256:" + "0" * 64, "digest mismatch")):
        with pytest.raises(ImageError, match=message):
            client.pull(store, f"{stub.host}/app{ref}", insecure_registries=[stub.host], auth_file=tmp_path / "a",
                        out=io.StringIO())
    nothing_committed(store, f"{stub.host}/app")


# --- the CLI --------------------------------------------------------------------------------------

@pytest.mark.root
def test_cli_login_pull_logout(reg_basic: Registry, tmp_path: Path) -> None:
    push(reg_basic, tmp_path, "cli", [Layer().add_file("via", "cli")])
    env = {**os.environ, "VMRT_ROOT": str(tmp_path / "root")}
    env.pop("REGISTRY_AUTH_FILE", None)

    def vmrt(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmrt", *args], capture_output=True, text=True, env=env,
                              input=input.decode() if input else None, cwd=REPO, timeout=120)

    ref = f"{reg_basic.host}/cli"
    r = vmrt("pull", "--insecure-registry", reg_basic.host, ref)
    assert r.returncode != 0 and "docker login" in r.stderr and "Traceback" not in r.stderr
    r = vmrt("login", "-u", reg_basic.user, "--password-stdin", "--insecure-registry", reg_basic.host,
             reg_basic.host, input=reg_basic.password.encode())
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "root" / "auth.json").stat().st_mode) == 0o600
    r = vmrt("pull", "-q", "--insecure-registry", reg_basic.host, ref)
    assert r.returncode == 0 and r.stdout.strip() == f"{ref}:latest", r.stderr
    assert vmrt("logout", reg_basic.host).returncode == 0
