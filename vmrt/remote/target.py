"""``ssh://[user@]host[:port]`` URLs, parsed strictly: the remote hosts vmrt speaks to.

Read on every ``vmrt`` start (through :mod:`.routing`): nothing heavy is imported here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import UsageError

# a login name as useradd allows it (no leading '-': nothing here may look like an option)
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")

# the first token of a remote session (vmrt/remote/session.py), never typed by a user:
# --remote-session=framed, --remote-session=pty:TOKEN, --remote-signal=TOKEN:SIGNAME
SESSION_FLAG = "--remote-session"
SIGNAL_FLAG = "--remote-signal"


@dataclass(frozen=True)
class SshTarget:
    """A remote vmrt host. ``user`` None: the local user's name (as ssh)."""

    host: str
    port: int = 22
    user: str | None = None

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}{'' if self.port == 22 else f':{self.port}'}"

    def known_hosts_name(self) -> str:
        """The name known_hosts files use for it (OpenSSH's: ``[host]:port`` off port 22)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def parse_host(url: str) -> SshTarget:
    """``ssh://[user@]host[:port]`` -> SshTarget; anything else is a UsageError."""
    bad = UsageError(f"invalid host {url!r}: expected ssh://[user@]host[:port] (the only remote vmrt speaks)")
    if not url.startswith("ssh://"):
        raise bad
    rest = url[len("ssh://"):]
    if rest.endswith("/"):
        rest = rest[:-1]
    user: str | None = None
    if "@" in rest:
        user, _, rest = rest.rpartition("@")
        if not _USER.fullmatch(user):
            raise bad
    port = 22
    if rest.startswith("["):  # [v6 address] or [v6]:port
        addr, close, tail = rest[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise bad
        try:
            host = str(ipaddress.IPv6Address(addr))
        except ValueError:
            raise bad from None
        ptext = tail[1:] if tail else None
    else:
        host, colon, ptext_ = rest.partition(":")
        ptext = ptext_ if colon else None
        if not _HOSTNAME.fullmatch(host) or len(host) > 253:
            raise bad
    if ptext is not None:
        if not _PORT.fullmatch(ptext) or not 1 <= int(ptext) <= 65535:
            raise bad
        port = int(ptext)
    return SshTarget(host=host.rstrip(".") or host, port=port, user=user)
