"""Pull from a real registry with the CLI, then run the image in both isolation modes.

The image is built here (tests/ocibuild.py), pushed to Debian's docker-registry on
127.0.0.1 with skopeo, pulled by `vmrt pull`/`vmrt run`, and its content checked
from inside containers: whiteouts and opaque directories across layers,
symlinks, hard links, modes, owners, an xattr and a device node.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ocibuild import Layer, OciLayout, busybox_layer
from registry import Registry
from support import Vmrt

pytestmark = pytest.mark.vm

PROBE = ("cat a.txt; ls; readlink link; stat -c '%h %a %u:%g' hard; ls dir; echo \"X=$X\"; "
         "echo written > null && echo null-ok")


def app_layers() -> list[Layer]:
    mid = (Layer().add_dir("data").add_file("data/a.txt", "alpha\n", mode=0o640, uid=7, gid=8,
                                             xattrs={"user.note": "hello"})
           .add_file("data/gone.txt", "bye\n").add_dir("data/dir").add_file("data/dir/old", "old\n")
           .add_symlink("data/link", "a.txt").add_hardlink("data/hard", "data/a.txt")
           .add_device("data/null", "c", 1, 3, mode=0o666))
    top = Layer().add_dir("data").add_whiteout("data/gone.txt").add_dir("data/dir").add_opaque("data/dir") \
        .add_file("data/dir/new", "new\n")
    return [busybox_layer(), mid, top]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, built: None):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("regrun")
    layout = OciLayout(base / "layout")
    layout.add_image(app_layers(), {"Cmd": ["sh"], "Env": ["X=1", "PATH=/bin"], "WorkingDir": "/data"}, ref="1")
    layout.add_image([busybox_layer(), Layer().add_file("other", "2\n")], {"Cmd": ["sh"]}, ref="2",
                     compression="zstd")
    with Registry(base / "registry") as reg:
        reg.push(layout.ref("1"), "app", "1")
        reg.push(layout.ref("2"), "other", "2")
        v = Vmrt(base / "root", base / "run")
        v.env["VMRT_INSECURE_REGISTRIES"] = reg.host
        yield v, reg
        v.close()  # what a failed test left running is stopped, before the registry


EXPECTED = ("alpha\n"
            "a.txt\ndir\nhard\nlink\nnull\n"
            "a.txt\n"
            "2 640 7:8\n"
            "new\n"
            "X=1\n"
            "null-ok\n")


def test_pull_then_run_in_both_modes(env) -> None:  # type: ignore[no-untyped-def]
    v, reg = env
    r = v("pull", f"{reg.host}/app:1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == f"{reg.host}/app:1"
    err = r.stderr.decode()  # not a terminal: Docker's plain lines, no progress bars
    assert "Pull complete" in err and "Digest: sha256:" in err and "Status: Downloaded newer image" in err
    outs = {}
    for iso in ("process", "vm"):
        r = v("run", "--rm", f"--isolation={iso}", f"{reg.host}/app:1", "sh", "-c", PROBE)
        assert r.returncode == 0, (iso, r.stderr)
        outs[iso] = r.stdout.decode()
    assert outs["process"] == EXPECTED, outs["process"]
    assert outs["vm"] == outs["process"]
    # the xattr is on the unpacked layer (busybox has no getfattr to look from inside)
    a = [p for p in (v.root / "layers").glob("*/rootfs/data/a.txt")]
    assert len(a) == 1 and os.getxattr(a[0], "user.note") == b"hello"
    again = v("pull", f"{reg.host}/app:1")
    assert again.returncode == 0 and "Image is up to date" in again.stderr.decode()
    v.assert_clean()


def test_run_pulls_a_missing_image_and_shares_the_base_layer(env) -> None:  # type: ignore[no-untyped-def]
    v, reg = env
    assert v("pull", "-q", f"{reg.host}/app:1").returncode == 0
    layers = set(os.listdir(v.root / "layers"))
    r = v("run", "--rm", "--isolation=process", f"{reg.host}/other:2", "cat", "/other")
    assert r.returncode == 0 and r.stdout == b"2\n", r.stderr
    assert "Unable to find image" in r.stderr.decode()
    # the busybox layer is shared: only the one new layer was added
    assert len(set(os.listdir(v.root / "layers")) - layers) == 1
    doc = json.loads(v("image", "inspect", f"{reg.host}/other:2").stdout)[0]
    assert doc["RepoDigests"][0].startswith(f"{reg.host}/other@sha256:")
    assert doc["Manifest"]["Layers"][1]["MediaType"].endswith("+zstd")
    v.assert_clean()


def test_save_load_roundtrip_runs_in_a_fresh_store(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    v, reg = env
    assert v("pull", "-q", f"{reg.host}/app:1").returncode == 0
    archive = tmp_path / "app.tar"
    r = v("save", "-o", str(archive), f"{reg.host}/app:1")
    assert r.returncode == 0, r.stderr
    fresh = Vmrt(tmp_path / "root", tmp_path / "run")
    r = fresh("load", "-i", str(archive))
    assert r.returncode == 0 and r.stdout.decode().strip() == f"Loaded image: {reg.host}/app:1", r.stderr
    r = fresh("run", "--rm", "--pull=never", "--isolation=vm", f"{reg.host}/app:1", "sh", "-c", PROBE)
    assert r.returncode == 0 and r.stdout.decode() == EXPECTED, r.stderr
    same = [json.loads(x("image", "inspect", f"{reg.host}/app:1").stdout)[0]["Id"] for x in (v, fresh)]
    assert same[0] == same[1]
    fresh.assert_clean()
