"""Why a VM ended before its container did, in words a user reads (one line each): QEMU
gone (a guest panic, a signal, the host cgroup's OOM), virtiofsd gone, the agent hung.
Used by the VM driver while it owns a run and by the monitor's finish after a hand-off."""

from __future__ import annotations

from ..errors import AgentError


def _how(status: int | None) -> str:
    if status is None:
        return "status unknown"
    return f"killed by signal {-status}" if status < 0 else f"exit status {status}"


def vm_gone(status: int | None, console_tail: bytes, host_oom: bool) -> AgentError:
    """Why QEMU ended (its wait status, None if unknown) before the container's EXIT: a guest
    panic, or how."""
    how = _how(status)
    if host_oom:
        how += ", out of memory on the host (its cgroup's limit)"
    console = console_tail.decode(errors="replace")
    panic = [ln.split("]", 1)[-1].strip() for ln in console.splitlines() if "Kernel panic" in ln]
    if panic:
        return AgentError(f"the VM stopped before the container exited: guest {panic[-1]}")
    tail = console.strip().splitlines()[-3:]
    return AgentError(f"the VM stopped before the container exited (qemu {how})"
                      + (f"; console: {' | '.join(tail)}" if tail else ""))


def virtiofsd_gone(status: int | None) -> AgentError:
    return AgentError(f"virtiofsd stopped while the container ran ({_how(status)}); its root filesystem is gone")


def hung(dead: float) -> AgentError:
    return AgentError(f"agent not responding for {dead:g} s: the VM is hung (container killed)", exit_code=137)
