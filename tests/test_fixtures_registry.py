"""The registry test infrastructure itself: a real docker-registry, skopeo pushes, auth flows, layouts.

These pin what tests of vmrt's registry client rely on: that tests/registry.py's auth modes really
challenge and really accept, that tests/ocibuild.py's layouts push with digests intact in every
media type and compression we use, and that registries go away without leftovers.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import requests
from ocibuild import (
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Layer,
    OciLayout,
    big_layer,
    busybox_layer,
)
from registry import Registry, SkopeoError, parse_challenge, skopeo_copy, skopeo_inspect

ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


@pytest.fixture(scope="module")
def busybox() -> Layer:
    return busybox_layer()


def two_layer(tmp_path: Path, busybox: Layer, **kw: object) -> tuple[OciLayout, str]:
    layout = OciLayout(tmp_path / "oci")
    digest = layout.add_image([busybox, Layer().add_dir("etc").add_file("etc/motd", "hi\n")],
                              {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}, ref="v1", **kw)  # type: ignore[arg-type]
    return layout, digest


def get_manifest(reg: Registry, name: str, ref: str) -> requests.Response:
    r = reg.session().get(f"{reg.url}/v2/{name}/manifests/{ref}", headers={"Accept": ACCEPT}, timeout=10)
    r.raise_for_status()
    return r


def registry_alive(reg: Registry, pid: int) -> bool:
    try:
        return str(reg.config) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return False


def test_anonymous_push_and_inspect(tmp_path: Path, busybox: Layer) -> None:
    layout, digest = two_layer(tmp_path, busybox)
    with Registry(tmp_path / "reg") as reg:
        reg.push(layout.ref("v1"), "test/two", "v1")
        info = skopeo_inspect(reg.ref("test/two", "v1"))
        assert info["Digest"] == digest
        assert info["Layers"] == [d["digest"] for d in layout.manifest(digest)["layers"]]
        assert len(info["Layers"]) == 2 and info["Architecture"] == "amd64"
        assert skopeo_inspect(reg.ref("test/two", "v1"), config=True)["config"]["Cmd"] == ["/bin/sh"]
        assert reg.blob_path(info["Layers"][1]).exists()  # where corruption tests reach in


def test_basic_auth(tmp_path: Path, busybox: Layer) -> None:
    layout, digest = two_layer(tmp_path, busybox)
    with Registry(tmp_path / "reg", "basic") as reg:
        r = requests.get(f"{reg.url}/v2/", timeout=5)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
        with pytest.raises(SkopeoError, match="(?i)unauthorized|authentication required"):
            skopeo_copy(layout.ref("v1"), reg.ref("nope", "v1"))
        with pytest.raises(SkopeoError):
            skopeo_copy(layout.ref("v1"), reg.ref("nope", "v1"), creds=f"{reg.user}:wrong")
        reg.push(layout.ref("v1"), "ok", "v1")
        assert skopeo_inspect(reg.ref("ok", "v1"), creds=reg.creds)["Digest"] == digest
        assert requests.get(f"{reg.url}/v2/", auth=(reg.user, reg.password), timeout=5).status_code == 200


def test_token_auth(tmp_path: Path, busybox: Layer) -> None:
    layout, digest = two_layer(tmp_path, busybox)
    with Registry(tmp_path / "reg", "token") as reg:
        assert reg.token_server is not None
        reg.push(layout.ref("v1"), "lib/img", "v1")
        assert reg.tokens_issued > 0
        assert any(r["user"] == reg.user and "repository:lib/img:pull,push" in r["scopes"]
                   for r in reg.token_server.requests)

        r = requests.get(f"{reg.url}/v2/lib/img/manifests/v1", timeout=5)
        assert r.status_code == 401
        scheme, _, params = r.headers["WWW-Authenticate"].partition(" ")
        assert scheme == "Bearer"
        assert parse_challenge(params) == {"realm": reg.token_server.realm, "service": "vmrt-test-registry",
                                           "scope": "repository:lib/img:pull"}

        # An anonymous token carries no access, so it is refused; the user's token is honoured.
        anon = requests.get(reg.token_server.realm, params={"service": "vmrt-test-registry",
                                                            "scope": "repository:lib/img:pull"}, timeout=5)
        assert anon.status_code == 200
        r = requests.get(f"{reg.url}/v2/lib/img/manifests/v1", timeout=5,
                         headers={"Authorization": f"Bearer {anon.json()['token']}"})
        assert r.status_code == 401 and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
        assert requests.get(reg.token_server.realm, auth=(reg.user, "wrong"), timeout=5).status_code == 401
        assert get_manifest(reg, "lib/img", "v1").headers["Docker-Content-Digest"] == digest
        assert skopeo_inspect(reg.ref("lib/img", "v1"), creds=reg.creds)["Digest"] == digest


def test_multi_arch_index(tmp_path: Path, busybox: Layer) -> None:
    layout = OciLayout(tmp_path / "oci")
    amd = layout.add_image([busybox, Layer().add_file("arch", "amd64\n")], {"Cmd": ["/bin/sh"]}, ref=None)
    arm = layout.add_image([busybox, Layer().add_file("arch", "arm64\n")], {"Cmd": ["/bin/sh"]},
                           platform=("linux", "arm64", "v8"), ref=None)
    index = layout.add_index([amd, arm], "multi")
    with Registry(tmp_path / "reg") as reg:
        reg.push(layout.ref("multi"), "multi", "1", all_images=True)
        r = get_manifest(reg, "multi", "1")
        assert r.headers["Content-Type"] == OCI_INDEX and r.headers["Docker-Content-Digest"] == index
        body = r.json()
        assert body["mediaType"] == OCI_INDEX
        assert [(m["digest"], m["platform"]["architecture"]) for m in body["manifests"]] == [
            (amd, "amd64"), (arm, "arm64")]
        assert body["manifests"][1]["platform"]["variant"] == "v8"
        assert get_manifest(reg, "multi", arm).json()["mediaType"] == OCI_MANIFEST


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_layer_compressions(tmp_path: Path, busybox: Layer, compression: str) -> None:
    layout, digest = two_layer(tmp_path, busybox, compression=compression)
    with Registry(tmp_path / "reg") as reg:
        reg.push(layout.ref("v1"), "c", "v1")
        layers = get_manifest(reg, "c", "v1").json()["layers"]
        assert [m["mediaType"] for m in layers] == [OCI_LAYER[compression]] * 2
        assert skopeo_inspect(reg.ref("c", "v1"))["Digest"] == digest


def test_docker_media_types_and_raw_upload(tmp_path: Path, busybox: Layer) -> None:
    layout = OciLayout(tmp_path / "oci")
    amd = layout.add_image([busybox], {"Cmd": ["/bin/sh"]}, ref="one", docker_media_types=True)
    arm = layout.add_image([busybox], {}, platform=("linux", "arm64"), ref=None, docker_media_types=True)
    lst = layout.add_index([amd, arm], "list", docker_media_types=True)
    assert layout.ref("one").startswith("dir:")  # skopeo's oci: transport only sees OCI types in index.json
    with Registry(tmp_path / "reg", "basic") as reg:
        reg.push(layout.ref("one"), "d", "one")
        m = get_manifest(reg, "d", "one")
        assert m.headers["Docker-Content-Digest"] == amd and m.json()["mediaType"] == DOCKER_MANIFEST
        assert m.json()["layers"][0]["mediaType"] == DOCKER_LAYER["gzip"]
        reg.push(layout.ref("list"), "d", "list", all_images=True)
        m = get_manifest(reg, "d", "list")
        assert m.headers["Docker-Content-Digest"] == lst and m.json()["mediaType"] == DOCKER_LIST
        # The same list uploaded over the HTTP API by hand, under another name.
        assert reg.upload(layout, "list", "raw") == lst
        assert get_manifest(reg, "raw", arm).headers["Docker-Content-Digest"] == arm


def test_stop_kill_restart_leave_nothing(tmp_path: Path, busybox: Layer) -> None:
    layout, digest = two_layer(tmp_path, busybox)
    reg = Registry(tmp_path / "reg", "token")
    with reg:
        assert reg.proc is not None and reg.token_server is not None
        pid, server = reg.proc.pid, reg.token_server
        reg.push(layout.ref("v1"), "k", "v1")
        reg.kill()
        assert not registry_alive(reg, pid)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{reg.url}/v2/", timeout=2)
        port = reg.port
        reg.restart()
        assert reg.port == port and reg.proc is not None
        pid = reg.proc.pid
        assert skopeo_inspect(reg.ref("k", "v1"), creds=reg.creds)["Digest"] == digest
    assert reg.proc is None and not registry_alive(reg, pid)
    assert not server._thread.is_alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.realm, timeout=2)


def test_layer_builder_is_deterministic_and_exact() -> None:
    def build() -> Layer:
        return (Layer().add_dir("etc").add_file("etc/x", b"\xff\x00", mode=0o4755, uid=7, gid=8,
                                                 xattrs={"user.k": b"\xff\x01", "security.capability": "v"})
                .add_whiteout("/etc/gone").add_opaque("var/").add_symlink("l", "/etc/x").add_hardlink("h", "etc/x")
                .add_device("dev/null", "c", 1, 3).add_fifo("p"))

    assert build().blob("gzip") == build().blob("gzip") and build().blob("zstd") == build().blob("zstd")
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(build().tar_bytes()))}
    assert list(members) == ["etc", "etc/x", "etc/.wh.gone", "var/.wh..wh..opq", "l", "h", "dev/null", "p"]
    x = members["etc/x"]
    assert (x.mode, x.uid, x.gid, x.uname) == (0o4755, 7, 8, "")
    assert x.pax_headers["SCHILY.xattr.user.k"].encode("utf-8", "surrogateescape") == b"\xff\x01"
    assert members["l"].linkname == "/etc/x" and members["h"].islnk() and members["h"].linkname == "etc/x"
    assert members["dev/null"].ischr() and (members["dev/null"].devmajor, members["dev/null"].devminor) == (1, 3)
    assert members["p"].isfifo()
    evil = tarfile.TarInfo("../../escape")
    assert Layer().add_tarinfo(evil, b"x").entries[0][0].name == "../../escape"
    big = big_layer(1 << 20, seed=5)
    data = big.entries[-1][1]
    assert data is not None and len(data) == 1 << 20 and data == big_layer(1 << 20, seed=5).entries[-1][1]
    assert len(big.blob("gzip")[0]) > 1 << 20  # incompressible


def test_busybox_layer_is_static_and_complete(busybox: Layer) -> None:
    names = {ti.name: ti for ti, _ in busybox.entries}
    assert {"bin/busybox", "bin/sh", "etc/passwd", "etc/group", "tmp", "proc", "sys", "dev", "root"} <= set(names)
    assert names["bin/sh"].linkname == "busybox" and names["tmp"].mode == 0o1777
    data = dict(busybox.entries)[names["bin/busybox"]]
    assert data is not None and data == Path("/bin/busybox").read_bytes() and names["bin/busybox"].mode == 0o755


def test_registry_quirks_clients_must_handle(tmp_path: Path) -> None:
    """distribution 2.8 hides OCI manifests from requests whose Accept lacks the exact OCI type
    (404 MANIFEST_UNKNOWN, even by digest or with */*), rewrites Docker schema2 to signed schema1
    for such requests by tag, and serves blob byte ranges."""
    layout = OciLayout(tmp_path / "oci")
    oci = layout.add_image([Layer().add_file("a", "b")], {}, ref="oci")
    layout.add_image([Layer().add_file("a", "b")], {}, ref="docker", docker_media_types=True)
    with Registry(tmp_path / "reg") as reg:
        reg.upload(layout, "oci", "q")
        reg.upload(layout, "docker", "q")
        for ref in ("oci", oci):
            r = requests.get(f"{reg.url}/v2/q/manifests/{ref}", headers={"Accept": "*/*"}, timeout=5)
            assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert get_manifest(reg, "q", "oci").headers["Docker-Content-Digest"] == oci
        r = requests.get(f"{reg.url}/v2/q/manifests/docker", timeout=5)
        assert r.headers["Content-Type"] == "application/vnd.docker.distribution.manifest.v1+prettyjws"
        layer = layout.manifest(oci)["layers"][0]["digest"]
        r = requests.get(f"{reg.url}/v2/q/blobs/{layer}", headers={"Range": "bytes=2-5"}, timeout=5)
        assert r.status_code == 206 and r.content == layout.blob_path(layer).read_bytes()[2:6]
