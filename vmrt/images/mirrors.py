"""Registry mirrors: where a pull tries a registry's repositories before the registry itself.

Two settings name them (vmrt/config.py): ``registry_mirrors``, Docker's daemon.json
``registry-mirrors``, for Docker Hub; and the ``[mirrors]`` table, for any registry
(containers-registries.conf's ``[[registry.mirror]]``), keyed by ``host[:port]``. A mirror
is a URL, ``http://host[:port][/path]`` (plain HTTP to that mirror only) or ``https://...``,
validated as Docker's ``ValidateMirror`` does: no credentials, query or fragment. Its
registry API is ``<url>/v2/``, and it serves the origin's repository names
(``library/busybox`` for ``busybox``).

A mirror is untrusted: the pull checks what it serves exactly as it checks the origin
(vmrt/images/registry.py), and moves on to the next mirror, and last to the origin, when
one fails. It gets no credentials meant for the origin, only those stored for its own host.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Mapping, Sequence

from ..config import Config
from ..errors import UsageError
from . import reference

_HOST = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$")
_PATH = re.compile(r"^(?:/[A-Za-z0-9._~-]+)*/?$")
_HUB = {reference.DEFAULT_DOMAIN, reference.LEGACY_DOMAIN, reference.DOCKER_HUB_API}


@dataclasses.dataclass(frozen=True)
class Mirror:
    url: str    # normalised: scheme://host[:port][/path], no trailing slash

    @property
    def host(self) -> str:
        """``host[:port]``: what its credentials are stored under and messages name it by."""
        return self.url.split("/")[2]

    @property
    def api_root(self) -> str:
        return self.url + "/v2/"

    def __str__(self) -> str:
        return self.url


def parse_mirror(value: str) -> Mirror:
    """A mirror URL, strictly (UsageError, Docker's wording, for anything else)."""
    v = value.strip()
    try:
        u = urllib.parse.urlsplit(v)
        port = u.port
    except ValueError as e:
        raise UsageError(f"invalid mirror: {v!r} is not a valid URI: {e}") from e
    if u.scheme not in ("http", "https"):
        raise UsageError(f"invalid mirror: unsupported scheme {u.scheme!r} in {v!r} (use http:// or https://)")
    if u.query or u.fragment or v.endswith(("?", "#")):
        raise UsageError(f"invalid mirror: query or fragment at end of the URI {v!r}")
    if "@" in u.netloc:
        raise UsageError(f"invalid mirror: username/password not allowed in URI {u.scheme}://...@{u.hostname}")
    if not _HOST.match(u.netloc) or port == 0 or (port or 0) > 65535 or not _PATH.match(u.path):
        raise UsageError(f"invalid mirror: {v!r} is not http(s)://host[:port][/path]")
    return Mirror(f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}")


def registry_key(name: str) -> str:
    """The registry a ``[mirrors]`` key names: ``host[:port]``, any of Docker Hub's names as docker.io."""
    key = name.strip().lower()
    if not _HOST.match(key):
        raise UsageError(f"mirrors: {name!r} is not a registry host[:port]")
    return reference.DEFAULT_DOMAIN if key in _HUB else key


def table(hub: Sequence[str], per_registry: Mapping[str, Sequence[str]]) -> dict[str, list[Mirror]]:
    """{registry: its mirrors, in order}: Docker Hub's ``hub`` first, then each ``per_registry`` entry."""
    out: dict[str, list[Mirror]] = {}
    for key, urls in [(reference.DEFAULT_DOMAIN, hub), *per_registry.items()]:
        mirrors = out.setdefault(registry_key(key), [])
        mirrors += [m for m in map(parse_mirror, urls) if m not in mirrors]
    return {k: v for k, v in out.items() if v}


def from_config(cfg: Config) -> dict[str, list[Mirror]]:
    """:func:`table` of the settings ``registry_mirrors`` and ``[mirrors]``; UsageError for a bad one."""
    return table([u for u in cfg.registry_mirrors.split(",") if u.strip()], cfg.mirrors)


def for_domain(mirrors: Mapping[str, Sequence[Mirror]], domain: str) -> list[Mirror]:
    """The mirrors of the registry ``domain`` (a reference's domain: docker.io for Docker Hub)."""
    return list(mirrors.get(reference.DEFAULT_DOMAIN if domain in _HUB else domain.lower(), ()))
