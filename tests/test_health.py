"""Health checks (issue 18): the image's HEALTHCHECK and `--health-*`, run by the container's
monitor every interval, in the container (both isolations); the status in `ps` and `inspect`.
Through the API (docker CLI, Compose's service_healthy): tests/test_api.py."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pytest
from ocibuild import Layer, OciLayout, busybox_layer
from support import Vmrt


def _wait_health(vmrt: Vmrt, name: str, want: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        health = json.loads(vmrt("inspect", "-f", "{{json .State.Health}}", name).stdout or b"null")
        if health and health["Status"] == want:
            return dict(health)
        assert time.monotonic() < deadline, (want, health)
        time.sleep(0.2)


@pytest.mark.vm
@pytest.mark.parametrize("isolation", ["process", "vm"])
def test_a_health_check_runs_in_the_container(vmrt: Vmrt, isolation: str) -> None:
    """starting -> unhealthy after Retries failures -> healthy once the check passes; the
    check runs inside the container (its file system), ps shows the status and filters by it,
    the last results keep the check's output (at most 4 KiB of it)."""
    r = vmrt("run", "-d", "--name", "hc", f"--isolation={isolation}", "--health-cmd",
             "head -c 10000 /dev/zero | tr '\\0' x; test -f /tmp/ok", "--health-interval", "300ms",
             "--health-retries", "2", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    assert b"(health: starting)" in vmrt("ps", "--format", "{{.Status}}").stdout
    health = _wait_health(vmrt, "hc", "unhealthy")
    log = health["Log"]
    assert isinstance(log, list) and log[-1]["ExitCode"] == 1 and log[-1]["Output"] == "x" * 4096
    assert health["FailingStreak"] >= 2
    assert vmrt("ps", "-q", "--filter", "health=unhealthy").stdout.strip()
    assert vmrt("exec", "hc", "touch", "/tmp/ok").returncode == 0
    health = _wait_health(vmrt, "hc", "healthy")
    assert health["FailingStreak"] == 0
    assert b"(healthy)" in vmrt("ps", "--format", "{{.Status}}").stdout
    assert vmrt("ps", "-q", "--filter", "health=healthy").stdout.strip()
    assert vmrt("ps", "-q", "--filter", "health=unhealthy").stdout == b""
    hc = json.loads(vmrt("inspect", "-f", "{{json .Config.Healthcheck}}", "hc").stdout)
    assert hc["Test"][0] == "CMD-SHELL" and hc["Interval"] == 300_000_000 and hc["Retries"] == 2
    assert vmrt("rm", "-f", "hc").returncode == 0
    vmrt.assert_clean()


@pytest.mark.vm
def test_a_check_that_hangs_times_out_and_the_image_s_check_applies(vmrt: Vmrt, tmp_path: Path) -> None:
    """An image's HEALTHCHECK runs without any flag; --health-timeout bounds one check (exit
    -1, Docker's message); --no-healthcheck turns the image's off; bad values are refused in
    one line (125)."""
    lay = OciLayout(tmp_path / "layout")
    config = {"Cmd": ["busybox", "sleep", "300"], "Env": ["PATH=/bin"],  # the layer's applets: a few
              "Healthcheck": {"Test": ["CMD", "busybox", "test", "-f", "/ok"], "Interval": 300_000_000}}
    lay.add_image([busybox_layer(), Layer().add_file("ok", "")], config, ref="hcimage")
    tar = tmp_path / "hc.tar"
    with tarfile.open(tar, "w") as tf:
        for p in sorted(lay.dir.iterdir()):
            tf.add(p, p.name)
    assert vmrt("load", "-i", str(tar)).returncode == 0
    try:
        assert vmrt("run", "-d", "--name", "img", "--isolation=process", "hcimage").returncode == 0
        _wait_health(vmrt, "img", "healthy")
        r = vmrt("run", "-d", "--name", "slow", "--isolation=process", "--health-cmd", "busybox sleep 30",
                 "--health-timeout", "300ms", "--health-interval", "200ms", "--health-retries", "1", "hcimage")
        assert r.returncode == 0, r.stderr
        health = _wait_health(vmrt, "slow", "unhealthy")
        log = health["Log"]
        assert isinstance(log, list) and log[0]["ExitCode"] == -1 and "timeout" in log[0]["Output"]
        assert vmrt("run", "-d", "--name", "off", "--isolation=process", "--no-healthcheck", "hcimage").returncode == 0
        assert vmrt("inspect", "-f", "{{json .State.Health}}", "off").stdout.strip() in (b"", b"null")
        assert b"health" not in vmrt("ps", "--filter", "name=off", "--format", "{{.Status}}").stdout
        for bad in (["--health-interval", "soon"], ["--health-retries", "-1"],
                    ["--no-healthcheck", "--health-cmd", "true"]):
            r = vmrt("run", "--rm", "--isolation=process", *bad, "hcimage", "true")
            assert r.returncode == 125 and len(r.stderr.splitlines()) == 1, r.stderr
    finally:
        vmrt("rm", "-f", "img", "slow", "off")
        vmrt("rmi", "hcimage")
    vmrt.assert_clean()
