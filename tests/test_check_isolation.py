"""`vmrt check isolation`: the probes of docs/ISOLATION.md, each mode's expected column."""

from __future__ import annotations

import json

import pytest
from support import Vmrt

pytestmark = pytest.mark.vm


def test_isolation_probes(vmrt: Vmrt) -> None:
    r = vmrt("check", "isolation", "--format", "json", timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    p, v = res["process"], res["vm"]
    # process isolation: the host's kernel, with namespaces hiding the host's objects
    for key in ("kernel", "boot_id", "uptime"):
        assert p[key].endswith("(host)"), (key, p[key])
        assert v[key].endswith("(own)"), (key, v[key])
    assert p["pids"].endswith("(hidden)") and v["pids"].endswith("(absent: other kernel)")
    assert p["ifaces"] == "hidden" and v["ifaces"] == "absent (other kernel)"
    # the overlay's host paths show in a process container's /proc/mounts, never in a VM's
    assert p["mounts"] == "host paths in /proc/mounts"
    assert v["mounts"].startswith("no host paths")
    assert p["dmesg"] == "not readable" and v["dmesg"].endswith("(own)")
    assert p["firmware"] == "empty"  # masked
    for col in (p, v):
        assert col["self_fd"] == "nothing of the host"
        assert col["proc1_exe"] == "/bin/busybox (container's)"
        assert col["workdir_fd"] == "refused (fds 3-8)"
    # the host side: a process container's init is root with Docker's capabilities in its
    # rootfs; a VM's QEMU is a jailed uid with none, under a seccomp filter, in its jail
    assert p["host_uid"] == "0 (root)" and p["host_caps"].startswith("14 ")
    assert p["host_root"] == "/ of its own mount namespace (its rootfs)"
    assert v["host_proc"] == "qemu-system-x86_64"
    assert v["host_uid"].endswith("(jail range)") and v["host_caps"] == "none"
    assert v["host_seccomp"] == "filter, no_new_privs=1" and p["host_seccomp"] == "filter, no_new_privs=1"
    assert v["host_root"] == "<run root>/jail"
    for col in (p, v):
        assert "/vmrt" in col["host_cgroup"], col["host_cgroup"]
    # what the kernel behind the container offers (issue 16, part 6): the same in both modes
    for col in (p, v):
        assert col["families"].split() == ["unix", "inet", "inet6", "packet", "netlink"], col["families"]
        assert col["io_uring"] == "refused (ENOSYS)"
        assert {"mnt", "pid", "net", "uts", "ipc"} <= set(col["namespaces"].split()), col["namespaces"]
        assert int(col["enosys"].split()[2].rstrip(":")) > 300, col["enosys"]  # the profile's syscalls were asked
    # the same ENOSYS answers: only calls x86_64 never implemented (epoll_ctl_old, ...), in both
    assert p["enosys"] == v["enosys"], (p["enosys"], v["enosys"])
    assert v["pid_max"] == "4194304 / 4194304", v["pid_max"]
    table = vmrt("check", "isolation", timeout=600)
    assert table.returncode == 0
    assert table.stdout.decode().splitlines()[0].split() == ["PROBE", "PROCESS", "VM"]
