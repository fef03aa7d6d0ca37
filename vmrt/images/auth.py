"""Registry credentials, kept in Docker's ``config.json`` format so either tool can read the file.

The file holds ``{"auths": {"<server>": {"auth": base64("user:password")}}}``. Keys are
what Docker writes: ``host[:port]`` for a registry, and Docker Hub's legacy
``https://index.docker.io/v1/`` for docker.io. Keys written by other tools with a
scheme or a path (``https://127.0.0.1:5000/v2/``) match their host too, as Docker's
lookup does. Other top-level keys of the file are kept. The file is written
0600 and replaced atomically, so a crash never leaves it half written and a file
that was wider than 0600 comes out 0600.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from ..errors import ImageError
from . import reference
from .store import atomic_file

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_HOSTS = {reference.DEFAULT_DOMAIN, reference.LEGACY_DOMAIN, reference.DOCKER_HUB_API}


def server_host(server: str) -> str:
    """``host[:port]`` of a server name, URL or auths key (Docker's ``ConvertToHostname``)."""
    s = server.strip()
    for scheme in ("http://", "https://"):
        s = s.removeprefix(scheme)
    return s.split("/", 1)[0]


def server_key(server: str) -> str:
    """The auths key Docker uses for ``server``."""
    host = server_host(server)
    return DOCKER_HUB_KEY if host in _HUB_HOSTS else host


def _read(auth_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(auth_file.read_bytes() or b"{}")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read credentials from {auth_file}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("auths", {}), dict):
        raise ImageError(f"cannot read credentials from {auth_file}: not a Docker config.json")
    return data


def _write(auth_file: Path, data: dict[str, Any]) -> None:
    auth_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_file(auth_file, 0o600) as f:
        f.write((json.dumps(data, indent="\t") + "\n").encode())


def _matching(auths: dict[str, Any], server: str) -> list[str]:
    key = server_key(server)
    return [k for k in auths if k == key or server_key(k) == key]


def get(auth_file: Path, server: str) -> tuple[str, str] | None:
    """(username, password) stored for ``server``, or None."""
    auths = _read(auth_file).get("auths", {})
    for k in _matching(auths, server):
        entry = auths[k]
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, TypeError) as e:
                raise ImageError(f"{auth_file}: malformed credentials for {k}: {e}") from e
            if sep:
                return user, password
        if entry.get("username") and entry.get("password"):
            return str(entry["username"]), str(entry["password"])
    return None


def save(auth_file: Path, server: str, username: str, password: str) -> None:
    """Store credentials for ``server`` (replacing any spelling of its key)."""
    data = _read(auth_file)
    auths = data.setdefault("auths", {})
    for k in _matching(auths, server):
        del auths[k]
    auths[server_key(server)] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    _write(auth_file, data)


def erase(auth_file: Path, server: str) -> bool:
    """Forget the credentials for ``server``; False if there were none."""
    data = _read(auth_file)
    auths = data.get("auths", {})
    gone = _matching(auths, server)
    for k in gone:
        del auths[k]
    if gone:
        _write(auth_file, data)
    return bool(gone)
