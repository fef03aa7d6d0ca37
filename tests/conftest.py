"""Fixtures and hooks: a private vmrt root per test session, the real CLI, leak checks, and the
``root`` marker.

Tests boot real micro-VMs under QEMU (TCG on hosts without usable KVM) and use the real kernel,
agent and image built by `vmrt setup`: those need root, and are marked ``root`` (here, by the
fixtures they use; or by their module or themselves). The others (codecs, parsers,
config, formatting, lint) run as any user: ``pytest -m 'not root'``. Every test owns what it
starts: the CLI processes it started are killed by pid at its end, and after a leak or a failure
everything its vmrt still runs is stopped (the leak still fails the test). The helpers tests
share are in tests/support.py (a plain module: nothing imports this file).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from support import FAILED, Started, Vmrt, audit, failed, made, nft_table, private_vmrt

# a test that uses one of these (directly or through another fixture) makes or drives a private
# vmrt, which needs root: it is marked ``root``
ROOT_FIXTURES = frozenset({"built", "vmrt_session"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Without root, refuse at once (not fail obscurely later) if a selected test needs it."""
    if os.geteuid() == 0:
        return
    need = [item.nodeid for item in session.items if item.get_closest_marker("root")]
    if need:
        pytest.exit(f"{len(need)} of the selected tests need root (mounts, QEMU, virtiofsd, runc), {need[0]} "
                    "first: run them as root, or only the others with -m 'not root'", returncode=4)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                               ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember a failed setup or call, for the teardown of the fixtures that then sweep."""
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture(autouse=True)
def owned_processes() -> Iterator[Started]:
    """The processes this test starts (Vmrt.popen, support.track): any still running at its end is
    killed by its pid, whatever the outcome."""
    started = Started()
    yield started
    started.stop()


@pytest.fixture(scope="session", autouse=True)
def _remove_test_bridges() -> Iterator[None]:
    """At the end of the session: whatever a private vmrt still runs is stopped, and their default
    bridges and nftables tables (kept between their containers, as docker0 is) go, so the host is
    as before."""
    yield
    for v in made:
        v.close()
        subprocess.run(["ip", "link", "del", v.bridge], capture_output=True)
        for family in ("ip", "inet", "bridge"):
            subprocess.run(["nft", "delete", "table", family, nft_table(v.root)], capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def _unmount_test_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session: the nosuid,nodev,noexec binds vmrt made of each private state
    root (vmrt/safefs.py: inert_mount, once per root, kept as long as the host runs) go, also those
    of the stores tests open directly (Store(tmp_path / ...)), which would keep the next run with
    the same --basetemp from clearing it."""
    yield
    base = str(tmp_path_factory.getbasetemp()) + "/"
    for _ in range(5):  # a stacked mount needs one umount each
        points = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
        ours = sorted({p for p in points if p.startswith(base)}, key=len, reverse=True)
        if not ours:
            break
        for mp in ours:
            subprocess.run(["umount", "-l", mp], capture_output=True)


@pytest.fixture(scope="session")
def built() -> None:
    """Kernel and agent in the shared cache (built once; cached by hash)."""
    r = subprocess.run([sys.executable, "-m", "vmrt", "kernel", "build"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "vmrt", "agent", "build"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def vmrt_session(tmp_path_factory: pytest.TempPathFactory, built: None) -> Vmrt:
    return private_vmrt(tmp_path_factory.mktemp("vmrt"))


@pytest.fixture
def vmrt(vmrt_session: Vmrt, owned_processes: Started, request: pytest.FixtureRequest) -> Iterator[Vmrt]:
    """The session's vmrt for one test. At its end the leak check: a leftover fails the test; after
    a leftover or a failure, the processes the test started are killed and everything the vmrt
    still runs is stopped (support.audit), so that no later test inherits it."""
    yield vmrt_session
    audit(vmrt_session, failed=failed(request), started=owned_processes)


@pytest.fixture
def snap(vmrt: Vmrt) -> Iterator[Path]:
    """The default shape's snapshot, built in the test's state root and removed after."""
    r = vmrt("snapshot", "build", timeout=300)
    assert r.returncode == 0, r.stderr
    try:
        yield Path(r.stdout.decode().split()[0])
    finally:
        assert vmrt("snapshot", "rm").returncode == 0
    assert not list((vmrt.root / "snapshots").iterdir())

