"""`vmrt system df` (Docker's `docker system df`): the summary table, `--format json`, `-v`, through
the real CLI on a private vmrt (the numbers come from vmrt.systemcmds.disk_usage, which the API's
GET /system/df serves too: tests/test_api_images.py)."""

from __future__ import annotations

import json
from pathlib import Path

from support import Vmrt, one_line_error


def _rows(v: Vmrt) -> dict[str, dict[str, str]]:
    r = v("system", "df", "--format", "json")
    assert r.returncode == 0, r.stderr
    return {d["Type"]: d for d in map(json.loads, r.stdout.decode().splitlines())}


def _kb(size: str) -> float:
    """A Docker size ("307.2kB", "1.05MB (100%)") in kB."""
    value = size.split()[0]
    for unit, scale in (("kB", 1.0), ("MB", 1e3), ("GB", 1e6), ("B", 1e-3)):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * scale
    raise AssertionError(size)


def test_system_df_counts_images_containers_volumes(vmrt: Vmrt) -> None:
    """A stopped container with 200 kB in its writable layer and 300 kB in a named volume: both
    counted, the container's reclaimable (not running), the volume not (a container uses it) until
    the container is removed; `-v` lists each; a bad format is one line."""
    assert vmrt("volume", "create", "dfcli").returncode == 0
    r = vmrt("run", "--name", "dfcli-c", "--isolation=process", "-v", "dfcli:/data", "busybox", "sh", "-c",
             "dd if=/dev/urandom of=/data/f bs=1024 count=300 2>/dev/null; "
             "dd if=/dev/urandom of=/rwfile bs=1024 count=200 2>/dev/null")
    assert r.returncode == 0, r.stderr
    try:
        r = vmrt("system", "df")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.decode().splitlines()
        assert lines[0].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"], lines
        assert [ln.split("  ")[0] for ln in lines[1:]] == ["Images", "Containers", "Local Volumes", "Build Cache"]

        rows = _rows(vmrt)
        img, ctr, vol = rows["Images"], rows["Containers"], rows["Local Volumes"]
        assert int(img["TotalCount"]) >= 1 and int(img["Active"]) == 1 and _kb(img["Size"]) > 500, img
        assert (ctr["TotalCount"], ctr["Active"]) == ("1", "0") and 200 <= _kb(ctr["Size"]) < 400, ctr
        assert ctr["Reclaimable"].endswith("(100%)") and _kb(ctr["Reclaimable"]) == _kb(ctr["Size"]), ctr
        assert (vol["TotalCount"], vol["Active"]) == ("1", "1") and 300 <= _kb(vol["Size"]) < 500, vol
        assert vol["Reclaimable"] == "0B (0%)", vol

        r = vmrt("system", "df", "-v")
        assert r.returncode == 0, r.stderr
        text = r.stdout.decode()
        for heading in ("Images space usage:", "Containers space usage:", "Local Volumes space usage:",
                        "Build cache usage: "):
            assert heading in text, text
        assert "dfcli-c" in text and "busybox" in text and any(
            ln.split()[:2] == ["dfcli", "1"] for ln in text.splitlines()), text
        r = vmrt("system", "df", "-v", "--format", "json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert [c["Names"] for c in doc["Containers"]] == [["/dfcli-c"]]
        assert vmrt("system", "df", "--format", "{{.Type}}={{.TotalCount}}").stdout.decode().splitlines()[2] == \
            "Local Volumes=1"
        r = vmrt("system", "df", "-v", "--format", "{{.Type}}")
        assert r.returncode == 125 and "--format with -v" in one_line_error(r.stderr), r.stderr

        assert vmrt("rm", "-f", "dfcli-c").returncode == 0
        vol = _rows(vmrt)["Local Volumes"]
        assert vol["Active"] == "0" and vol["Reclaimable"].endswith("(100%)"), vol
        assert vmrt("volume", "rm", "dfcli").returncode == 0
        rows = _rows(vmrt)
        assert rows["Containers"]["TotalCount"] == "0" and rows["Local Volumes"]["TotalCount"] == "0", rows
    finally:
        vmrt("rm", "-f", "dfcli-c")
        vmrt("volume", "rm", "-f", "dfcli")
    vmrt.assert_clean()


def test_system_df_counts_the_build_cache(vmrt: Vmrt, tmp_path: Path) -> None:
    """A build's RUN step leaves a cache entry with its layer: one more in Build Cache, shared
    (the image holds its layer, so not counted in SIZE); `-v` lists it; `builder prune -a` and
    the image's removal take it away again."""
    before = int(_rows(vmrt)["Build Cache"]["TotalCount"])
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN head -c 50000 /dev/urandom > /blob\n")
    r = vmrt("build", "-q", "--isolation=process", "-t", "dfcache:1", str(tmp_path))
    assert r.returncode == 0, r.stderr
    try:
        cache = _rows(vmrt)["Build Cache"]
        assert int(cache["TotalCount"]) == before + 1 and cache["Active"] == "0", cache
        doc = json.loads(vmrt("system", "df", "-v", "--format", "json").stdout)
        entry = [b for b in doc["BuildCache"] if b["Size"] >= 50000]
        assert len(entry) == 1 and entry[0]["Shared"] is True, doc["BuildCache"]
        text = vmrt("system", "df", "-v").stdout.decode()
        assert any(ln.startswith(entry[0]["ID"][:12]) and ln.split()[-1] == "true" for ln in text.splitlines()), text
    finally:
        vmrt("rmi", "-f", "dfcache:1")
    assert vmrt("builder", "prune", "-a", "-f").returncode == 0
    assert _rows(vmrt)["Build Cache"]["TotalCount"] == "0"
