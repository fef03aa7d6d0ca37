"""Store integrity under faults: killed pulls and loads, concurrent pulls and loads.

The invariant (issue 4): whatever moment `vmrt pull` or `vmrt load` dies at, the
image is either fully there (and runs) or not visible at all, and a retry
succeeds; concurrent pulls or loads of one image all succeed and store it once.
Real registry, real CLI processes, SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from ocibuild import Layer, OciLayout, big_layer, busybox_layer
from registry import Registry
from support import Vmrt

LAYERS = 4


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory, built: None):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("imgfaults")
    layout = OciLayout(base / "layout")
    layers = [busybox_layer(), *(big_layer(24 << 20, seed, f"data/{seed}.bin") for seed in range(LAYERS - 2)),
              Layer().add_file("marker", "complete\n")]
    layout.add_image(layers, {"Cmd": ["sh"]}, ref="1", level=1)
    with Registry(base / "registry") as r:
        r.push(layout.ref("1"), "big", "1")
        yield r


def fresh(tmp_path: Path, reg: Registry) -> Vmrt:
    v = Vmrt(tmp_path / "root", tmp_path / "run")
    v.env["VMRT_INSECURE_REGISTRIES"] = reg.host
    return v


def visible(v: Vmrt) -> list[dict]:  # type: ignore[type-arg]
    r = v("images", "--format", "json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.decode().splitlines()]


def check_whole_or_absent(v: Vmrt, ref: str) -> bool:
    rows = visible(v)
    if not rows:
        return False
    assert len(rows) == 1
    r = v("run", "--rm", "--pull=never", "--isolation=process", ref, "cat", "/marker")
    assert r.returncode == 0 and r.stdout == b"complete\n", r.stderr
    return True


def killed_at(v: Vmrt, delay: float, *args: str) -> None:
    p = v.popen(*args)
    time.sleep(delay)
    p.kill()
    p.communicate(timeout=30)


def test_killed_pull_is_all_or_nothing_and_retry_succeeds(reg: Registry, tmp_path: Path) -> None:
    v = fresh(tmp_path, reg)
    ref = f"{reg.host}/big:1"
    outcomes = []
    for delay in (0.15, 0.3, 0.5, 0.9):
        killed_at(v, delay, "pull", "-q", ref)
        outcomes.append(check_whole_or_absent(v, ref))
        if outcomes[-1]:
            assert v("rmi", ref).returncode == 0
    assert not all(outcomes), "every pull finished before its kill: make the image bigger"
    r = v("pull", "-q", ref)
    assert r.returncode == 0, r.stderr
    assert check_whole_or_absent(v, ref)
    assert list((v.root / "tmp").iterdir()) == []  # the retry, alone, cleared what the kills left
    v.assert_clean()


def test_killed_load_is_all_or_nothing_and_retry_succeeds(reg: Registry, tmp_path: Path) -> None:
    src = fresh(tmp_path / "src", reg)
    ref = f"{reg.host}/big:1"
    assert src("pull", "-q", ref).returncode == 0
    archive = tmp_path / "big.tar"
    assert src("save", "-o", str(archive), ref).returncode == 0
    v = fresh(tmp_path / "dst", reg)
    outcomes = []
    for delay in (0.15, 0.3, 0.6):
        killed_at(v, delay, "load", "-i", str(archive))
        outcomes.append(check_whole_or_absent(v, ref))
        if outcomes[-1]:
            assert v("rmi", ref).returncode == 0
    # stdin cut off half way: an error, nothing visible
    data = archive.read_bytes()
    r = v("load", input=data[: len(data) // 2])
    assert r.returncode == 125 and len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
    assert not check_whole_or_absent(v, ref)
    r = v("load", "-i", str(archive))
    assert r.returncode == 0, r.stderr
    assert check_whole_or_absent(v, ref)
    v.assert_clean()


@pytest.mark.parametrize("what", ["pull", "load"])
def test_concurrent_pulls_or_loads_of_one_image(reg: Registry, tmp_path: Path, what: str) -> None:
    ref = f"{reg.host}/big:1"
    v = fresh(tmp_path, reg)
    if what == "pull":
        args = ["pull", "-q", ref]
    else:
        src = fresh(tmp_path / "src", reg)
        assert src("pull", "-q", ref).returncode == 0
        archive = tmp_path / "big.tar"
        assert src("save", "-o", str(archive), ref).returncode == 0
        args = ["load", "-i", str(archive)]
    procs = [v.popen(*args) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert check_whole_or_absent(v, ref)
    assert len(os.listdir(v.root / "layers")) == LAYERS
    # every blob still hashes to its name: nothing was torn by the concurrent writers
    for blob in (v.root / "images" / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    v.assert_clean()
