"""vmrt/cgroups.py on both hierarchy layouts.

The real v1 hierarchy of this machine is used by the behaviour suite (runc and
the VM's host cgroup). A pure cgroup v2 host is not available here, so its
layout is reproduced in a directory with the files the kernel would offer, and
the same code paths are checked against it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmrt import cgroups


def v2_tree(root: Path) -> Path:
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def v1_tree(root: Path) -> Path:
    for c in ("memory", "cpu", "pids"):
        (root / c).mkdir()
    return root


@pytest.fixture(autouse=True)
def _default_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "PARENT", "vmrt")  # a slotted test run (VMRT_TEST_SLOT) moves it


def test_take_over_renames_a_pooled_vms_group(tmp_path: Path) -> None:
    """A claimed pooled VM's cgroup becomes the container's by a rename (its processes and
    their charges stay), with the container's limits."""
    root = v1_tree(tmp_path)
    pool = cgroups.HostGroup("pool-1", memory_bytes=64 << 20, cpus=None, pids=100, root=root)
    pool.create()
    (root / "memory/vmrt/pool-1/cgroup.procs").write_text("4321")
    g = cgroups.HostGroup("abc-vmm", memory_bytes=128 << 20, cpus=1.0, pids=200, root=root)
    g.take_over("pool-1")
    assert not (root / "memory/vmrt/pool-1").exists()
    assert (root / "memory/vmrt/abc-vmm/cgroup.procs").read_text() == "4321"
    assert (root / "memory/vmrt/abc-vmm/memory.limit_in_bytes").read_text() == str(128 << 20)
    assert (root / "pids/vmrt/abc-vmm/pids.max").read_text() == "200"
    assert g.procs_files() == [d / "cgroup.procs" for d in g.created] and len(g.created) == 3


def test_v2_host_group_limits(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    g = cgroups.HostGroup("abc-vmm", memory_bytes=300 << 20, cpus=1.5, pids=512, root=root)
    g.create()
    d = root / "vmrt" / "abc-vmm"
    assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (root / "vmrt" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (d / "memory.max").read_text() == str(300 << 20)
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "pids.max").read_text() == "512"
    g.add(1234)
    assert (d / "cgroup.procs").read_text() == "1234"
    assert cgroups.dirs("vmrt/abc-vmm", root) == [d]
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert g.oom_kills() == 1


def test_v1_host_group_limits(tmp_path: Path) -> None:
    root = v1_tree(tmp_path)
    g = cgroups.HostGroup("abc-vmm", memory_bytes=64 << 20, cpus=0.5, pids=100, root=root)
    g.create()
    assert (root / "memory/vmrt/abc-vmm/memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (root / "cpu/vmrt/abc-vmm/cpu.cfs_quota_us").read_text() == "50000"
    assert (root / "cpu/vmrt/abc-vmm/cpu.cfs_period_us").read_text() == "100000"
    assert (root / "pids/vmrt/abc-vmm/pids.max").read_text() == "100"
    (root / "memory/vmrt/abc-vmm/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cgroups.oom_kills("vmrt/abc-vmm", root) == 2
    assert not cgroups.is_v2(root)


def test_runtime_path_and_missing_oom_file(tmp_path: Path) -> None:
    assert cgroups.runtime_path("deadbeef") == "/vmrt/deadbeef"
    assert cgroups.oom_kills("/vmrt/none", v1_tree(tmp_path)) == 0


@pytest.mark.root
def test_real_host_group_is_created_and_removed() -> None:
    """On this machine's real hierarchy: limits written, directory gone after remove()."""
    g = cgroups.HostGroup("vmrt-selftest-vmm", memory_bytes=128 << 20, cpus=1, pids=64)
    g.create()
    try:
        made = list(g.created)
        assert made and all(d.is_dir() for d in made)
    finally:
        g.remove()
    assert not any(d.exists() for d in made)
