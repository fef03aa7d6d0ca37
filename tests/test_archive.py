"""docker load / save / import against the store, with archives written and read by skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from ocibuild import Compression, Layer, OciLayout, compress, sha256_digest

from vmrt.errors import ImageError, UsageError
from vmrt.images import archive
from vmrt.images.store import MT_OCI_LAYER, MT_OCI_LAYER_GZIP, MT_OCI_LAYER_ZSTD, Image, Store

NAME = "example.com/foo:v1"


def skopeo(*args: str) -> str:
    return subprocess.run(["skopeo", "--insecure-policy", *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def base_layer() -> Layer:
    return (Layer().add_dir("etc").add_file("etc/a", "A").add_file("etc/b", "B")
            .add_symlink("etc/link", "a").add_hardlink("etc/hard", "etc/b"))


def top_layer() -> Layer:
    return Layer().add_dir("etc").add_whiteout("etc/a").add_file("etc/c", "C")


@pytest.fixture
def layout(tmp_path: Path) -> OciLayout:
    """v1: base + top (a whiteout); v2: base + another layer, sharing base's blob with v1."""
    lay = OciLayout(tmp_path / "layout")
    lay.add_image([base_layer(), top_layer()], {"Cmd": ["/bin/sh"], "Env": ["A=1"]}, ref="v1")
    lay.add_image([base_layer(), Layer().add_file("two", "2")], {"Cmd": ["/bin/true"]}, ref="v2")
    return lay


def config_digest(lay: OciLayout, ref: str) -> str:
    return str(lay.manifest(lay.descriptor(ref)["digest"])["config"]["digest"])


def tar_dir(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, p.relative_to(src).as_posix(), recursive=False)
    return dest


def tar_bytes(files: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for ti in extra:
            tf.addfile(ti)
    return buf.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, target
    return ti


def docker_files(layers: list[bytes], tags: list[str], *, paths: list[str] | None = None,
                 diff_ids: list[str] | None = None) -> dict[str, bytes]:
    """A legacy docker-archive (Docker < 25 layout) of one image with these layer tars."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/x"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha256_digest(t) for t in layers]}})
    cfg = hashlib.sha256(config.encode()).hexdigest() + ".json"
    paths = paths or [f"{i:064x}/layer.tar" for i in range(len(layers))]
    manifest = [{"Config": cfg, "RepoTags": tags, "Layers": paths}]
    return {cfg: config.encode(), **dict(zip(paths, layers, strict=True)),
            "manifest.json": json.dumps(manifest).encode()}


def snapshot(store: Store) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((i.id, tuple(i.tags)) for i in store.images())


def check_v1_content(image: Image) -> None:
    base, top = image.layer_dirs()
    assert (base / "etc/a").read_text() == "A" and os.readlink(base / "etc/link") == "a"
    assert (base / "etc/hard").stat().st_ino == (base / "etc/b").stat().st_ino
    wh = (top / "etc/a").lstat()
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert (top / "etc/c").read_text() == "C"
    assert image.runtime_config["Cmd"] == ["/bin/sh"]


# --- load -------------------------------------------------------------------------------

@pytest.mark.root
def test_load_docker_archive_from_skopeo(tmp_path: Path, layout: OciLayout) -> None:
    src = tmp_path / "d.tar"
    skopeo("copy", f"oci:{layout.dir}:v1", f"docker-archive:{src}:{NAME}")
    store = Store(tmp_path / "store")
    assert archive.load(store, src) == [NAME]
    image = store.get(NAME)
    assert image.id == config_digest(layout, "v1")
    assert [d["mediaType"] for d in image.layers] == [MT_OCI_LAYER, MT_OCI_LAYER]  # skopeo writes plain tars
    check_v1_content(image)
    assert list(store.tmp.iterdir()) == []


@pytest.mark.root
@pytest.mark.parametrize(("name", "loaded"), [(NAME, NAME), ("v1", "v1:latest")])
def test_load_oci_archive_from_skopeo(tmp_path: Path, layout: OciLayout, name: str, loaded: str) -> None:
    src = tmp_path / "o.tar"
    skopeo("copy", f"oci:{layout.dir}:v1", f"oci-archive:{src}:{name}")
    store = Store(tmp_path / "store")
    assert archive.load(store, src) == [loaded]
    image = store.get(loaded)
    assert (image.id, image.manifest_digest) == (config_digest(layout, "v1"), layout.descriptor("v1")["digest"])
    check_v1_content(image)


@pytest.mark.root
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("as_stream", [False, True])
def test_load_compressed_archive(tmp_path: Path, layout: OciLayout, compression: str, as_stream: bool) -> None:
    plain = tmp_path / "d.tar"
    skopeo("copy", f"oci:{layout.dir}:v1", f"docker-archive:{plain}:{NAME}")
    packed = compress(plain.read_bytes(), "gzip" if compression == "gzip" else "zstd")
    src = tmp_path / "d.tar.x"
    src.write_bytes(packed)
    store = Store(tmp_path / "store")
    assert archive.load(store, io.BytesIO(packed) if as_stream else src) == [NAME]
    assert store.get(NAME).id == config_digest(layout, "v1")
    assert list(store.tmp.iterdir()) == []


@pytest.mark.root
def test_load_index_picks_platform_and_reports_untagged(tmp_path: Path, layout: OciLayout) -> None:
    amd = layout.descriptor("v2")["digest"]
    arm = layout.add_image([Layer().add_file("arm", "x")], platform=("linux", "arm64"), ref=None)
    layout.add_index([arm, amd], ref="multi")
    index = json.loads((layout.dir / "index.json").read_text())
    untagged = {k: v for k, v in layout.descriptor("v1").items() if k != "annotations"}
    index["manifests"] = [m for m in index["manifests"] if m["annotations"][archive.ANN_REF_NAME] != "v1"]
    (layout.dir / "index.json").write_text(json.dumps({**index, "manifests": [*index["manifests"], untagged]}))
    store = Store(tmp_path / "store")
    v1_id = config_digest(layout, "v1")
    assert archive.load(store, tar_dir(layout.dir, tmp_path / "o.tar")) == ["v2:latest", "multi:latest", v1_id]
    assert store.get("multi").id == store.get("v2").id == config_digest(layout, "v2")
    assert store.get(v1_id).tags == []


@pytest.mark.root
def test_load_follows_links_inside_the_archive(tmp_path: Path) -> None:
    """Docker < 25 saves a layer that occurs twice as a symlink to its first copy."""
    layer = Layer().add_file("f", "x").tar_bytes()
    files = docker_files([layer, layer], ["a:1"], paths=["1/layer.tar", "2/layer.tar"])
    del files["2/layer.tar"]
    src = tmp_path / "d.tar"
    src.write_bytes(tar_bytes(files, (link("2/layer.tar", "../1/layer.tar"),)))
    store = Store(tmp_path / "store")
    assert archive.load(store, src) == ["a:1"]
    assert [(d / "f").read_text() for d in store.get("a:1").layer_dirs()] == ["x", "x"]


@pytest.mark.root
@pytest.mark.parametrize(("compression", "media_type"), [("none", MT_OCI_LAYER), ("gzip", MT_OCI_LAYER_GZIP),
                                                         ("zstd", MT_OCI_LAYER_ZSTD)])
def test_load_tells_layer_compression_by_magic(tmp_path: Path, compression: Compression, media_type: str) -> None:
    layer = Layer().add_file("f", "x").tar_bytes()
    src = tmp_path / "d.tar"
    src.write_bytes(tar_bytes(docker_files([compress(layer, compression)], ["a:1"], diff_ids=[sha256_digest(layer)])))
    store = Store(tmp_path / "store")
    assert archive.load(store, src) == ["a:1"]
    image = store.get("a:1")
    assert image.layers[0]["mediaType"] == media_type and (image.layer_dirs()[0] / "f").read_text() == "x"


# --- save -------------------------------------------------------------------------------

@pytest.mark.root
def test_save_is_read_by_skopeo_and_loads_back(tmp_path: Path, layout: OciLayout) -> None:
    store = Store(tmp_path / "store")
    archive.load(store, tar_dir(layout.dir, tmp_path / "o.tar"))
    store.tag(NAME, "v1")
    v1, v2 = store.get(NAME), store.get("v2")
    out = tmp_path / "saved.tar"
    archive.save(store, [NAME, "v1", v2.id], out)

    with tarfile.open(out) as tf:
        names = tf.getnames()
        docker = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert len(names) == len(set(names))
    base = v1.layers[0]["digest"]
    assert names.count("blobs/sha256/" + base.partition(":")[2]) == 1 and v2.layers[0]["digest"] == base
    assert [(e["RepoTags"], e["Config"]) for e in docker] == [([NAME, "v1:latest"], "blobs/sha256/" + v1.id[7:]),
                                                              ([], "blobs/sha256/" + v2.id[7:])]

    inspected = json.loads(skopeo("inspect", f"docker-archive:{out}:{NAME}"))
    assert inspected["Layers"] == v1.diff_ids  # gzip layers in the docker view: skopeo decompresses them
    for source, image in ((f"docker-archive:{out}:{NAME}", v1), (f"docker-archive:{out}:@1", v2),
                          (f"oci-archive:{out}:v1", v1)):
        dest = f"oci:{tmp_path / 'copy'}:x"
        skopeo("copy", source, dest)
        # converting docker-archive's schema2 to OCI, skopeo re-marshals the config: same content, new digest
        config = json.loads(skopeo("inspect", "--config", dest))
        assert (config["rootfs"], config["config"]) == (image.config["rootfs"], image.config["config"]), source
    assert json.loads(skopeo("inspect", "--raw", dest))["config"]["digest"] == v1.id

    fresh = Store(tmp_path / "fresh")
    assert archive.load(fresh, out) == [NAME, "v1:latest", v2.id]
    check_v1_content(fresh.get(NAME))
    assert fresh.get("v1").id == v1.id and fresh.get(v2.id).diff_ids == v2.diff_ids
    stream = io.BytesIO()
    archive.save(store, [NAME, "v1", v2.id], stream)
    assert stream.getvalue() == out.read_bytes()  # reproducible


@pytest.mark.root
def test_save_gives_docker_schema2_images_an_oci_manifest(tmp_path: Path) -> None:
    """skopeo's OCI reader ignores Docker media types in index.json."""
    lay = OciLayout(tmp_path / "layout")
    lay.add_image([base_layer()], ref="d1", docker_media_types=True)
    store = Store(tmp_path / "store")
    assert archive.load(store, tar_dir(lay.dir, tmp_path / "o.tar")) == ["d1:latest"]
    out = tmp_path / "saved.tar"
    archive.save(store, ["d1"], out)
    manifest = json.loads(skopeo("inspect", "--raw", f"oci-archive:{out}:latest"))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["layers"][0]["mediaType"] == MT_OCI_LAYER_GZIP
    assert manifest["config"]["digest"] == store.get("d1").id
    assert archive.load(Store(tmp_path / "fresh"), out) == ["d1:latest"]


@pytest.mark.root
def test_failed_save_leaves_no_file(tmp_path: Path, layout: OciLayout) -> None:
    store = Store(tmp_path / "store")
    archive.load(store, tar_dir(layout.dir, tmp_path / "o.tar"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ImageError, match="No such image"):
        archive.save(store, ["v1", "nope"], out_dir / "x.tar")
    store.blob_path(store.get("v1").layers[1]["digest"]).write_bytes(b"rotten")
    with pytest.raises(ImageError, match="corrupt"):
        archive.save(store, ["v1"], out_dir / "x.tar")
    assert list(out_dir.iterdir()) == []


# --- import -----------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_import(tmp_path: Path, compression: Compression) -> None:
    rootfs = Layer().add_dir("bin").add_file("bin/hello", "hi", mode=0o755).add_symlink("sh", "bin/hello").tar_bytes()
    given = compress(rootfs, compression)
    src = tmp_path / "rootfs.tar"
    src.write_bytes(given)
    store = Store(tmp_path / "store")
    changes = ['CMD ["/bin/hello", "x"]', "ENTRYPOINT exec run", "ENV A=1 B='two words'", "workdir /srv",
               "WORKDIR app", "USER 1000:1000", "EXPOSE 80 53/udp", "LABEL org.x=y"]
    image = archive.import_tarball(store, src, "example.com/rootfs:1", changes=changes)
    assert image.tags == ["example.com/rootfs:1"] and store.get("example.com/rootfs:1").id == image.id
    assert image.diff_ids == [sha256_digest(rootfs)]
    assert image.layers[0]["mediaType"] == MT_OCI_LAYER_GZIP
    if compression == "gzip":
        assert image.layers[0]["digest"] == sha256_digest(given)  # stored as given
    assert image.runtime_config == {
        "Cmd": ["/bin/hello", "x"], "Entrypoint": ["/bin/sh", "-c", "exec run"], "Env": ["A=1", "B=two words"],
        "WorkingDir": "/srv/app", "User": "1000:1000", "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
        "Labels": {"org.x": "y"}}
    assert (image.config["architecture"], image.config["os"]) == ("amd64", "linux")
    assert image.config["history"] == [{"created": image.config["created"], "comment": f"Imported from {src}"}]
    assert image.config["created"].endswith("Z")
    (layer,) = image.layer_dirs()
    assert (layer / "bin/hello").read_text() == "hi" and os.readlink(layer / "sh") == "bin/hello"


@pytest.mark.root
def test_import_from_stream_untagged(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    image = archive.import_tarball(store, io.BytesIO(Layer().add_file("f", "x").tar_bytes()), None, message="m")
    assert image.tags == [] and store.get(image.id).config["history"][0]["comment"] == "m"
    image = archive.import_tarball(store, io.BytesIO(Layer().add_file("g", "y").tar_bytes()), None)
    assert image.config["comment"] == "Imported from -"


@pytest.mark.parametrize("change", ["RUN true", "FROM x", "CMD", "ENV =x", "ENV A", "LABEL a=b c",
                                    "EXPOSE 70000", "EXPOSE http"])
def test_import_refuses_bad_changes(tmp_path: Path, change: str) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(UsageError):
        archive.import_tarball(store, io.BytesIO(b""), "x", changes=[change])
    assert store.images() == []


def test_change_forms() -> None:
    assert archive.changes_config(["CMD [not json", "ENV K some value", "LABEL \"a b\"=c", "EXPOSE 8000-8002/TCP",
                                   "ENTRYPOINT []"]) == {
        "Cmd": ["/bin/sh", "-c", "[not json"], "Env": ["K=some value"], "Labels": {"a b": "c"},
        "ExposedPorts": {"8000/tcp": {}, "8001/tcp": {}, "8002/tcp": {}}, "Entrypoint": []}


@pytest.mark.root
def test_import_of_a_hostile_rootfs_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    evil = Layer().add_file("ok", "1").add_tarinfo(tarfile.TarInfo("../evil"), b"x").tar_bytes()
    with pytest.raises(ImageError, match="escapes the root"):
        archive.import_tarball(store, io.BytesIO(gzip.compress(evil)), "evil:1")
    assert store.images() == [] and list(store.tmp.iterdir()) == []
    assert not list(tmp_path.rglob("evil"))


# --- malformed archives -----------------------------------------------------------------

GOOD_LAYER = Layer().add_file("f", "x").tar_bytes()
EVIL_LAYER = Layer().add_file("f", "x").add_tarinfo(tarfile.TarInfo("../evil"), b"x").tar_bytes()
Spoil = Callable[[OciLayout, dict[str, str]], object]


def oci_tar(tmp_path: Path, spoil: Spoil) -> bytes:
    """An OCI archive of one image, after ``spoil`` damaged its layout (given the blob digests by role)."""
    lay = OciLayout(tmp_path / "bad-layout")
    manifest = lay.add_image([base_layer()], ref="bad")
    m = lay.manifest(manifest)
    spoil(lay, {"manifest": manifest, "config": m["config"]["digest"], "layer": m["layers"][0]["digest"]})
    return tar_dir(lay.dir, tmp_path / "bad.tar").read_bytes()


def replace_blob(role: str, data: bytes = b"", symlink: str = "", fifo: bool = False) -> Spoil:
    def spoil(lay: OciLayout, digests: dict[str, str]) -> None:
        path = lay.blob_path(digests[role])
        path.unlink()
        if symlink:
            path.symlink_to(symlink)
        elif fifo:
            os.mkfifo(path)
        else:
            path.write_bytes(data)
    return spoil


def flip_last_byte(lay: OciLayout, digests: dict[str, str]) -> None:
    path = lay.blob_path(digests["layer"])
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def only_arm64(lay: OciLayout, digests: dict[str, str]) -> None:
    lay.add_index([lay.add_image([base_layer()], platform=("linux", "arm64"), ref=None)], ref="bad")


def docker_tar(layers: list[bytes], tags: list[str] | None = None, **kw: list[str]) -> bytes:
    return tar_bytes(docker_files(layers, ["a:1"] if tags is None else tags, **kw))


def two_images_second_evil() -> bytes:
    """All images are checked before the first becomes visible."""
    good, evil = docker_files([GOOD_LAYER], ["a:1"]), docker_files([EVIL_LAYER], ["b:1"], paths=["evil.tar"])
    both = json.loads(good["manifest.json"]) + json.loads(evil["manifest.json"])
    return tar_bytes({**good, **evil, "manifest.json": json.dumps(both).encode()})


def json_member(name: str, data: bytes) -> bytes:
    config = {"c.json": data} if name == "c.json" else {}
    manifest = json.dumps([{"Config": "c.json", "RepoTags": [], "Layers": []}]).encode()
    return tar_bytes({**config, "manifest.json": manifest} if config else {name: data})


MALFORMED: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "not a tar": (lambda _: b"this is not an archive\n" * 100, "not a tar"),
    "corrupt gzip": (lambda _: b"\x1f\x8b\x08\x00" + b"\xff" * 200, "archive is corrupt"),
    "truncated zstd": (lambda _: zstandard.ZstdCompressor().compress(docker_tar([GOOD_LAYER]))[:200], "archive"),
    "no manifest": (lambda _: tar_bytes({"hello": b"x"}), "no manifest.json or index.json"),
    "missing layer": (lambda _: tar_bytes({k: v for k, v in docker_files([GOOD_LAYER], ["a:1"]).items()
                                           if not k.endswith("layer.tar")}), "is missing"),
    "layer not matching its diff id": (lambda _: docker_tar([GOOD_LAYER], diff_ids=["sha256:" + "0" * 64]),
                                       "does not match its diff id"),
    "layer not matching its name": (lambda _: docker_tar([GOOD_LAYER], paths=["blobs/sha256/" + "1" * 64]),
                                    "does not match its digest"),
    "escaping layer entry": (lambda _: docker_tar([EVIL_LAYER]), "escapes the root"),
    "second image broken": (lambda _: two_images_second_evil(), "escapes the root"),
    "bad tag": (lambda _: docker_tar([GOOD_LAYER], ["Not A Ref"]), "invalid reference"),
    "JSON too large": (lambda _: json_member("manifest.json", b"[" + b" " * (5 << 20) + b"]"), "too large"),
    "manifest.json not a list": (lambda _: json_member("manifest.json", b"{}"), "not a list"),
    "index.json not an object": (lambda _: json_member("index.json", b"[]"), "not a JSON object"),
    "config not an object": (lambda _: json_member("c.json", b"[1]"), "not a JSON object"),
    "config not JSON": (lambda _: json_member("c.json", b"\xff{"), "not valid JSON"),
    "OCI blob not matching its name": (lambda tmp: oci_tar(tmp, flip_last_byte), "does not match its digest"),
    "OCI blob of the wrong size": (lambda tmp: oci_tar(tmp, replace_blob("layer", b"other")), "descriptor says"),
    "symlink to a host file as blob": (lambda tmp: oci_tar(tmp, replace_blob("layer", symlink="/etc/passwd")),
                                       "link out of the archive"),
    "symlink climbing out as config": (lambda tmp: oci_tar(tmp, replace_blob("config", symlink="../../../../x")),
                                       "link out of the archive"),
    "fifo as manifest": (lambda tmp: oci_tar(tmp, replace_blob("manifest", fifo=True)), "not a regular file"),
    "no amd64 image": (lambda tmp: oci_tar(tmp, only_arm64), "no linux/amd64 image"),
}


@pytest.mark.root
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_archive_is_refused_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    make, message = MALFORMED[case]
    data = make(tmp_path)
    store = Store(tmp_path / "store")
    archive.import_tarball(store, io.BytesIO(GOOD_LAYER), "before:1")
    before = snapshot(store)
    for source in (tmp_path / "bad-input", io.BytesIO(data)):
        if isinstance(source, Path):
            source.write_bytes(data)
        with pytest.raises(ImageError, match=message) as err:
            archive.load(store, source)
        assert "\n" not in str(err.value)
        assert snapshot(store) == before and list(store.tmp.iterdir()) == []
    assert not list(tmp_path.rglob("evil"))


def test_truncated_archive(tmp_path: Path, layout: OciLayout) -> None:
    data = tar_dir(layout.dir, tmp_path / "o.tar").read_bytes()
    store = Store(tmp_path / "store")
    with pytest.raises(ImageError):
        archive.load(store, io.BytesIO(data[: len(data) // 2]))
    assert store.images() == [] and list(store.tmp.iterdir()) == []
