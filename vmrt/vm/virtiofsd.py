"""One virtiofsd (Debian's C virtiofsd from qemu-system-x86) per container.

Its vhost-user socket lives in the container's run directory and is named
relative to it (virtiofsd and QEMU both run with that directory as their
working directory), so deep state directories never hit the 108-byte limit
of a Unix socket path.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..config import Config
from ..errors import LaunchError
from . import procs


class Virtiofsd:
    def __init__(self, cfg: Config, source: Path, socket: Path, log: Path, die_with_parent: bool = True) -> None:
        self.cfg, self.source, self.socket, self.log = cfg, source, socket, log
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return [self.cfg.virtiofsd, f"--socket-path={self.socket.name}",
                "-o", f"source={self.source}", "-o", f"cache={self.cfg.virtiofs_cache}",
                "-o", "sandbox=namespace", "-o", "log_level=err", "-o", "no_posix_lock"]

    def start(self) -> None:
        with open(self.log, "ab") as log:
            try:
                self.proc = procs.spawn(self.command, stdout=log.fileno(), stderr=log.fileno(),
                                        cwd=str(self.socket.parent), die_with_parent=self.die_with_parent)
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
