"""Named volumes (issue 18): `vmrt volume ...` and `-v NAME:/path`, shared by containers of
either isolation, kept until removed, never removed while a container uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import Vmrt


@pytest.mark.vm
def test_a_named_volume_outlives_its_containers_in_either_isolation(vmrt: Vmrt) -> None:
    assert vmrt("volume", "create", "data").stdout == b"data\n"
    assert vmrt("volume", "create", "data").returncode == 0  # an existing one is kept
    r = vmrt("run", "--rm", "--isolation=process", "-v", "data:/d", "busybox", "sh", "-c", "echo kept > /d/f")
    assert r.returncode == 0, r.stderr
    r = vmrt("run", "--rm", "--isolation=vm", "--network", "none", "-v", "data:/d", "busybox", "cat", "/d/f")
    assert (r.returncode, r.stdout) == (0, b"kept\n"), r.stderr
    doc = json.loads(vmrt("volume", "inspect", "data").stdout)[0]
    assert doc["Name"] == "data" and doc["Driver"] == "local"
    assert doc["Mountpoint"] == str(vmrt.root / "volumes" / "data" / "_data")
    assert (Path(doc["Mountpoint"]) / "f").read_text() == "kept\n"
    # -v with a new name makes it; --mount type=volume without a source makes an anonymous one
    r = vmrt("run", "-d", "--name", "user", "--isolation=process", "-v", "made:/m:ro",
             "--mount", "type=volume,target=/anon", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    names = vmrt("volume", "ls", "-q").stdout.decode().split()
    assert "data" in names and "made" in names and len(names) == 3
    mounts = json.loads(vmrt("inspect", "-f", "{{json .Mounts}}", "user").stdout)
    assert {m.get("Name") for m in mounts if m["Type"] == "volume"} >= {"made"}
    r = vmrt("volume", "rm", "made")  # in use, even by a stopped container (as Docker)
    assert r.returncode == 1 and b"volume is in use - [user]" in r.stderr, r.stderr
    assert vmrt("volume", "ls", "-q", "--filter", "dangling=true").stdout.decode().split() == ["data"]
    assert vmrt("rm", "-f", "user").returncode == 0
    assert vmrt("volume", "rm", "made").returncode == 0
    assert sorted(vmrt("volume", "prune", "-f").stdout.decode().split()) == sorted(set(names) - {"made"})
    assert vmrt("volume", "ls", "-q").stdout == b""
    vmrt.assert_clean()


def test_bad_volume_names_and_removal_follow_nothing(vmrt: Vmrt, tmp_path: Path) -> None:
    """A name is Docker's pattern (no path), an error is one line and 125/1; removing a volume
    whose tenant left a symlink to a host dir removes the link, not the host's files."""
    for spec in ("../x:/d", "a b:/d", "x:/d:rw,ro", ".hidden:/d"):
        r = vmrt("run", "--rm", "--isolation=process", "-v", spec, "busybox", "true")
        assert r.returncode == 125 and r.stderr.count(b"\n") == 1, (spec, r.stderr)
    r = vmrt("volume", "inspect", "nosuch")
    assert r.returncode == 1 and r.stderr == b"vmrt: No such volume: nosuch\n"
    canary = tmp_path / "host"
    canary.mkdir()
    (canary / "keep").write_text("host's\n")
    r = vmrt("run", "--rm", "--isolation=process", "-v", "v2:/d", "busybox", "sh", "-c",
             f"ln -s {canary} /d/link && ln -s {canary}/keep /d/file")
    assert r.returncode == 0, r.stderr
    assert vmrt("volume", "rm", "v2").returncode == 0
    assert (canary / "keep").read_text() == "host's\n"
    assert not (vmrt.root / "volumes" / "v2").exists()
    vmrt.assert_clean()
