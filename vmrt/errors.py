"""Errors raised by vmrt.

Every error a user can cause or meet derives from :class:`VmrtError`; the CLI
turns one into a single line on stderr and the exit status in ``exit_code``
(Docker's convention: 125 for an error of the runtime itself)::

    VmrtError (125)
     +-- UsageError            bad flag values, bad references
     +-- ImageError            unknown image, corrupt store, unsafe layer
     +-- KernelError           guest kernel missing or failed to build
     +-- LaunchError           QEMU/virtiofsd/runc failed to start (carries evidence)
     +-- AgentError            guest agent timed out, died or broke the protocol
     |    +-- ProtocolError    malformed, truncated or oversized frame
     +-- StateError            container state store problems, name conflicts
     +-- NetworkError          networks, addresses, ports, netlink and nftables failures
     +-- ContainerExecError    the container's command could not be executed
                               (exit_code 126 not executable, 127 not found)
"""

from __future__ import annotations


class VmrtError(Exception):
    """Base of every vmrt error; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 125

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(VmrtError):
    pass


class ImageError(VmrtError):
    pass


class KernelError(VmrtError):
    pass


class LaunchError(VmrtError):
    """A component failed to start; holds the command line and its output."""

    def __init__(self, message: str, *, command: list[str] | None = None,
                 output: str = "", exit_status: int | None = None) -> None:
        super().__init__(message)
        self.command = command or []
        self.output = output
        self.exit_status = exit_status

    def evidence(self) -> str:
        lines = [f"command: {' '.join(self.command)}"] if self.command else []
        if self.exit_status is not None:
            lines.append(f"exit status: {self.exit_status}")
        if self.output:
            lines.append("output (tail):\n" + self.output[-4000:])
        return "\n".join(lines)


class AgentError(VmrtError):
    pass


class ProtocolError(AgentError):
    pass


class StateError(VmrtError):
    pass


class NetworkError(VmrtError):
    pass


class ContainerExecError(VmrtError):
    """The agent or runtime could not exec the container's command."""
