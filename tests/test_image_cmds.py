"""Image commands through the real CLI: images, tag, inspect, rmi, prune, and the store's sharing.

A private store per module (rmi and prune change it); containers run in process
mode (real runc) where a test needs an image in use.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Vmrt, private_vmrt

from vmrt.images.store import Store


@pytest.fixture(scope="module")
def v(tmp_path_factory: pytest.TempPathFactory, built: None) -> Iterator[Vmrt]:
    store = private_vmrt(tmp_path_factory.mktemp("imgcmds"))
    yield store
    store.close()  # what a failed test left running is stopped


def out(r) -> str:  # type: ignore[no-untyped-def]
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def test_images_table_json_and_template(v: Vmrt) -> None:
    lines = out(v("images")).splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    row = next(line.split() for line in lines[1:] if line.startswith("busybox "))
    assert row[1] == "latest" and len(row[2]) == 12 and row[-1].endswith("MB")
    rows = [json.loads(line) for line in out(v("images", "--format", "json")).splitlines()]
    bb = next(r for r in rows if r["Repository"] == "busybox")
    assert bb["Tag"] == "latest" and bb["ID"] == row[2]
    assert out(v("images", "--format", "{{.Repository}}:{{.Tag}}", "busybox")).split() == ["busybox:latest"]
    assert out(v("images", "-q", "busybox")).split() == [row[2]]
    full = out(v("images", "--no-trunc", "-q", "busybox")).strip()
    assert full.startswith("sha256:" + row[2]) and len(full) == 71
    r = v("images", "--format", "{{.Nope}}")
    assert r.returncode == 125 and b"no field 'Nope'" in r.stderr and len(r.stderr.splitlines()) == 1


def test_tag_inspect_and_untag(v: Vmrt) -> None:
    image_id = out(v("image", "inspect", "--format", "{{.Id}}", "busybox")).strip()
    assert out(v("tag", "busybox", "localhost/mine:v1")) == ""
    doc = json.loads(out(v("image", "inspect", "localhost/mine:v1")))[0]
    assert doc["Id"] == image_id
    assert sorted(doc["RepoTags"]) == ["busybox:latest", "localhost/mine:v1"]
    assert doc["Os"] == "linux" and doc["Architecture"] == "amd64" and doc["Config"]["Cmd"] == ["sh"]
    assert len(doc["RootFS"]["Layers"]) == 1 and doc["Size"] > 1_000_000
    # by ID prefix too, and the short name rules: docker.io/library/busybox is busybox
    assert json.loads(out(v("image", "inspect", image_id[7:19])))[0]["Id"] == image_id
    assert json.loads(out(v("image", "inspect", "docker.io/library/busybox:latest")))[0]["Id"] == image_id
    assert out(v("rmi", "localhost/mine:v1")).strip() == "Untagged: localhost/mine:v1"
    r = v("image", "inspect", "localhost/mine:v1")
    assert r.returncode == 125 and r.stderr.decode().strip() == "vmrt: No such image: localhost/mine:v1"


def test_rmi_refuses_while_a_container_uses_the_image(v: Vmrt) -> None:
    assert out(v("tag", "busybox", "localhost/inuse:1")) == ""
    r = v("run", "--isolation=process", "--name", "user-of-inuse", "localhost/inuse:1", "true")
    assert r.returncode == 0, r.stderr
    try:
        r = v("rmi", "localhost/inuse:1")  # not the last tag (busybox:latest remains): an untag is fine
        assert out(r).strip() == "Untagged: localhost/inuse:1"
        image_id = out(v("image", "inspect", "--format", "{{.Id}}", "busybox")).strip()
        r = v("rmi", image_id[7:19])
        assert r.returncode == 125 and b"container" in r.stderr and b"is using its referenced image" in r.stderr
        r = v("rmi", "busybox")
        assert r.returncode == 125 and b"must force" in r.stderr
        assert out(v("images", "-q", "busybox")).strip() == image_id[7:19]
    finally:
        assert v("rm", "user-of-inuse").returncode == 0
    v.assert_clean()


def test_rmi_force_untags_but_keeps_what_a_container_still_needs(v: Vmrt, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("forced\n")
    with tarfile.open(tmp_path / "f.tar", "w") as tf:
        tf.add(tmp_path / "f", "f")
    image_id = out(v("import", str(tmp_path / "f.tar"), "localhost/forced:1")).strip()
    r = v("run", "--isolation=process", "--name", "forced-user", "--entrypoint", "/f", "localhost/forced:1")
    assert r.returncode == 126, r.stderr  # /f is not executable: a container record stays all the same
    try:
        assert out(v("rmi", "-f", "localhost/forced:1")).strip() == "Untagged: localhost/forced:1"
        # still there, untagged, because the container was made from it; prune leaves it too
        assert image_id[7:19] in out(v("images", "-q"))
        assert f"deleted: {image_id}" not in out(v("image", "prune", "-f"))
    finally:
        assert v("rm", "forced-user").returncode == 0
    assert f"deleted: {image_id}" in out(v("image", "prune", "-f"))
    assert image_id[7:19] not in out(v("images", "-q"))
    v.assert_clean()


def test_rmi_and_prune_free_what_no_image_needs(v: Vmrt, tmp_path: Path) -> None:
    store = Store(v.root)
    # a second image sharing busybox's layer, plus a layer of its own (via import)
    tar = tmp_path / "extra.tar"
    (tmp_path / "hello").write_text("hi\n")
    with tarfile.open(tar, "w") as tf:
        tf.add(tmp_path / "hello", "hello")
    imported = out(v("import", str(tar), "localhost/extra:1")).strip()
    assert imported.startswith("sha256:")
    blobs_before = set(os.listdir(store.blobs))
    layers_before = set(os.listdir(store.layers))
    assert out(v("rmi", "localhost/extra:1")).splitlines() == ["Untagged: localhost/extra:1", f"Deleted: {imported}"]
    assert len(set(os.listdir(store.layers))) == len(layers_before) - 1
    assert set(os.listdir(store.blobs)) < blobs_before
    # busybox is untouched and still runs
    r = v("run", "--rm", "--isolation=process", "busybox", "echo", "ok")
    assert r.returncode == 0 and r.stdout == b"ok\n", r.stderr
    # a dangling image (its tag moved elsewhere) goes with `image prune`; tagged ones stay
    imported = out(v("import", str(tar), "localhost/extra:1")).strip()
    assert out(v("tag", "busybox", "localhost/extra:1")) == ""
    rows = [json.loads(line) for line in out(v("images", "--format", "json")).splitlines()]
    assert any(r["Repository"] == "<none>" and r["ID"] == imported[7:19] for r in rows)
    pruned = out(v("image", "prune", "-f"))
    assert f"deleted: {imported}" in pruned and "Total reclaimed space:" in pruned
    assert out(v("images", "-q")).split() == [out(v("images", "-q", "busybox")).strip()]
    assert out(v("rmi", "localhost/extra:1")).strip() == "Untagged: localhost/extra:1"
    assert list(store.tmp.iterdir()) == []
    v.assert_clean()


@pytest.mark.parametrize("args,message", [
    (("rmi", "Bad Name"), "invalid reference format"),
    (("tag", "busybox", "UPPER/case"), "repository name must be lowercase"),
    (("tag", "nosuch", "x"), "No such image: nosuch"),
    (("image", "inspect", "nosuch:1"), "No such image: nosuch:1"),
    (("tag", "busybox", "x@sha256:" + "a" * 64), "digest reference"),
    (("load", "-i", "/nonexistent.tar"), "no such file"),
    (("run", "--rm", "--pull=never", "localhost/absent", "true"), "No such image: localhost/absent"),
])
def test_bad_image_input_is_one_line(v: Vmrt, args: tuple[str, ...], message: str) -> None:
    r = v(*args)
    err = r.stderr.decode()
    assert r.returncode == 125, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
