"""The guest kernel and agent builds (the C fuzz targets run in test_fuzz.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmrt import agentbuild, config, kernel

REPO = Path(__file__).resolve().parent.parent


def test_kernel_config_has_every_fragment_option(built: None) -> None:
    cfg = config.load()
    d = kernel.kernel_dir(cfg)
    kernel._check_config(d / "config")  # raises KernelError on any missing option
    text = (d / "config").read_text()
    for opt in ("CONFIG_PVH=y", "CONFIG_VIRTIO_FS=y", "CONFIG_OVERLAY_FS=y", "CONFIG_VIRTIO_VSOCKETS=y",
                "CONFIG_SECCOMP_FILTER=y", "# CONFIG_MODULES is not set", "# CONFIG_ACPI is not set"):
        assert opt in text
    assert (d / "vmlinux").read_bytes()[:4] == b"\x7fELF"


def test_kernel_cache_key_follows_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v = kernel.source_version()
    k1 = kernel.cache_key(v)
    frags = tmp_path / "kernels"
    shutil.copytree(REPO / "kernels", frags)
    monkeypatch.setenv("VMRT_SOURCE_DIR", str(tmp_path))
    assert kernel.cache_key(v) == k1
    with open(frags / "vmrt.config", "a") as f:
        f.write("CONFIG_IKCONFIG=y\n")
    assert kernel.cache_key(v) != k1
    assert kernel.cache_key(v + "+1") != kernel.cache_key(v)


def test_kernel_cache_key_follows_the_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v = kernel.source_version()
    k1 = kernel.cache_key(v)
    shutil.copytree(REPO / "kernels", tmp_path / "kernels")
    monkeypatch.setenv("VMRT_SOURCE_DIR", str(tmp_path))
    assert kernel.cache_key(v) == k1 and kernel.patches()
    patch = kernel.patches()[0]
    patch.write_text(patch.read_text().replace("quarter of a second", "quarter second"))
    assert kernel.cache_key(v) != k1
    patch.unlink()
    assert kernel.cache_key(v) != k1


def test_built_kernel_carries_the_patches(built: None) -> None:
    """The lapic_timer_period= parameter the host passes under TCG is in the kernel it boots."""
    d = kernel.kernel_dir(config.load())
    assert b"lapic_timer_period" in (d / "vmlinux").read_bytes()
    assert [p.name for p in kernel.patches()] == json.loads((d / "build.json").read_text())["patches"]


def test_agent_and_monitor_keys_follow_the_shared_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """common/ is compiled into both binaries: a change there must rebuild both."""
    for d in ("guest-agent", "monitor", "common"):
        shutil.copytree(REPO / d, tmp_path / d, ignore=shutil.ignore_patterns("fuzz"))
    monkeypatch.setenv("VMRT_SOURCE_DIR", str(tmp_path))
    agent, monitor = agentbuild.cache_key(), agentbuild.monitor_key()
    with open(tmp_path / "common" / "util.c", "a") as f:
        f.write("/* changed */\n")
    assert agentbuild.cache_key() != agent and agentbuild.monitor_key() != monitor
    agent, monitor = agentbuild.cache_key(), agentbuild.monitor_key()
    with open(tmp_path / "guest-agent" / "session.c", "a") as f:
        f.write("/* changed */\n")
    assert agentbuild.cache_key() != agent and agentbuild.monitor_key() == monitor


def test_kernel_build_is_cached(built: None) -> None:
    r = subprocess.run([sys.executable, "-m", "vmrt", "kernel", "build"], capture_output=True, text=True)
    assert r.returncode == 0 and "cached" in r.stderr


def test_initramfs_holds_the_static_agent_as_init(built: None) -> None:
    data = agentbuild.find(config.load()).read_bytes()
    assert data.startswith(b"070701") and b"TRAILER!!!" in data
    assert b"init\0" in data and b"dev/console\0" in data
    agent = agentbuild.agent_dir(config.load()) / "vmrt-agent"
    out = subprocess.run(["file", str(agent)], capture_output=True, text=True).stdout
    if out:
        assert "statically linked" in out
