"""One virtiofsd (Debian's C virtiofsd from qemu-system-x86) per container.

Its vhost-user socket lives in the container's run directory and is named
relative to it (virtiofsd and QEMU both run with that directory as their
working directory), so deep state directories never hit the 108-byte limit
of a Unix socket path.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from .. import fsmode, seccomp
from ..cgroups import HostGroup
from ..config import Config
from ..errors import LaunchError
from . import procs

# capabilities virtiofsd gives up (it keeps chown, dac_override, fowner, setgid, setuid to serve
# the guest's files as their owners): no device nodes, no file capabilities, and writes clear
# setuid/setgid bits (no fsetid). An owner's chmod u+s needs none of these: the file servers'
# seccomp filter (seccomp.file_server_profile) refuses that, so a guest never leaves a
# privileged file on the host
MODCAPS = "-mknod:-setfcap:-fsetid"
NOFILE = 65536  # open files (one per inode the guest holds): bounded, not the 1M default


def fuse_opt(v: str) -> str:
    """A value inside virtiofsd's comma-separated ``-o`` list (commas and backslashes escaped)."""
    return v.replace("\\", "\\\\").replace(",", "\\,")


class Virtiofsd:
    """``group``: the VM's host cgroup, joined before virtiofsd starts, so it and its sandboxed
    child are the container's from their first page. ``cache``: virtiofsd's cache policy
    (default: ``virtiofs_cache``)."""

    def __init__(self, cfg: Config, source: Path, socket: Path, log: Path, die_with_parent: bool = True,
                 group: HostGroup | None = None, cache: str | None = None) -> None:
        self.cfg, self.source, self.socket, self.log = cfg, source, socket, log
        self.die_with_parent, self.group = die_with_parent, group
        self.cache = cache or cfg.virtiofs_cache
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return [self.cfg.virtiofsd, f"--socket-path={self.socket.name}",
                "-o", f"source={fuse_opt(str(self.source))}", "-o", f"cache={self.cache}",
                "-o", "sandbox=namespace", "-o", f"modcaps={MODCAPS}", "--rlimit-nofile=0",  # set at spawn
                "-o", "log_level=err", "-o", "no_posix_lock"]

    def start(self) -> None:
        with open(self.log, "ab", opener=fsmode.opener) as log:
            try:
                self.proc = procs.spawn(self.command, stdout=log.fileno(), stderr=log.fileno(),
                                        cwd=str(self.socket.parent), die_with_parent=self.die_with_parent,
                                        join=self.group.procs_files() if self.group is not None else (),
                                        nofile=NOFILE, seccomp=seccomp.file_server_bpf())
            except OSError as e:
                raise LaunchError(f"cannot start virtiofsd: {e.strerror}", command=self.command) from e
        if not procs.wait_for_path(str(self.socket), self.proc, self.cfg.timeouts.virtiofsd_ready):
            status = self.proc.poll()
            self.stop()
            raise LaunchError("virtiofsd did not come up", command=self.command,
                              output=self.log.read_text(errors="replace"), exit_status=status)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, 2.0)
        self.socket.unlink(missing_ok=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class P9Proxy:
    """The server of a snapshot clone's 9p share: QEMU's ``proxy`` fsdev asks
    ``virtfs-proxy-helper`` over a socketpair, and the helper — root with only the filesystem
    capabilities, chrooted into the share, in the VM's cgroup, under the file servers' seccomp
    filter — opens the root-only files a jailed QEMU itself no longer can, and writes a writable
    volume's files as their guest owners (jailed or not). What is read-only in the share is so
    by its mounts. Same interface as :class:`Virtiofsd` for the driver."""

    def __init__(self, cfg: Config, source: Path, log: Path, die_with_parent: bool = True,
                 group: HostGroup | None = None) -> None:
        self.cfg, self.source, self.log = cfg, source, log
        self.die_with_parent, self.group = die_with_parent, group
        self.proc: subprocess.Popen[bytes] | None = None
        self.qemu_sock: socket.socket | None = None

    @property
    def helper(self) -> str:
        return str(Path(self.cfg.virtiofsd).parent / "virtfs-proxy-helper")

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [self.helper, "--nodaemon", "--fd", str(theirs.fileno()), "--path", str(self.source)]
        try:
            with open(self.log, "ab", opener=fsmode.opener) as log:
                self.proc = procs.spawn(cmd, pass_fds=(theirs.fileno(),), stdout=log.fileno(), stderr=log.fileno(),
                                        die_with_parent=self.die_with_parent, nofile=NOFILE,
                                        join=self.group.procs_files() if self.group is not None else (),
                                        seccomp=seccomp.file_server_bpf())
        except OSError as e:
            ours.close()
            raise LaunchError(f"cannot start virtfs-proxy-helper: {e.strerror}", command=cmd) from e
        finally:
            theirs.close()
        self.qemu_sock = ours

    @property
    def qemu_fd(self) -> int:
        assert self.qemu_sock is not None
        return self.qemu_sock.fileno()

    def handed(self) -> None:
        """QEMU holds its end now: ours goes, so the helper sees the end when QEMU ends."""
        if self.qemu_sock is not None:
            self.qemu_sock.close()
            self.qemu_sock = None

    def stop(self) -> None:
        if self.qemu_sock is not None:
            self.qemu_sock.close()
            self.qemu_sock = None
        if self.proc is not None:
            procs.stop(self.proc, 2.0)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None
