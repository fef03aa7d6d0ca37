"""Several VM containers at once: no shared socket, pid file or mount collides."""

from __future__ import annotations

from support import Vmrt


def test_three_containers_in_parallel(vmrt: Vmrt) -> None:
    procs = [vmrt.popen("run", "--rm", "--isolation=vm", "busybox", "sh", "-c", f"sleep 1; echo c{i}")
             for i in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, results, strict=True)):
        assert p.returncode == 0, err
        assert out == f"c{i}\n".encode()
