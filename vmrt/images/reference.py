"""Image references: ``[registry/]path[:tag][@sha256:digest]``, normalised as Docker does.

Short names follow Docker's rules (distribution/reference ``ParseNormalizedNamed``):
the first component is a registry only if it contains a ``.`` or a ``:`` or is
``localhost``; otherwise the image lives on ``docker.io`` and a one-component path
gets ``library/``. So ``busybox`` is ``docker.io/library/busybox:latest`` and
``127.0.0.1:5000/app`` is ``127.0.0.1:5000/app:latest``. ``familiar()`` gives the
short form back for display, as ``docker images`` shows it.
"""

from __future__ import annotations

import dataclasses
import re

from ..errors import UsageError

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAIN = "index.docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's registry API is served
OFFICIAL_PREFIX = "library/"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*" \
          r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_REF = re.compile(rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH})"
                  rf"(?::(?P<tag>[\w][\w.-]{{0,127}}))?(?:@(?P<digest>sha256:[0-9a-f]{{64}}))?$")
_HEX_ID = re.compile(r"^(?:sha256:)?[0-9a-f]{1,64}$")


@dataclasses.dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str | None = "latest"
    digest: str | None = None

    @property
    def name(self) -> str:
        """The fully qualified repository name, e.g. ``docker.io/library/busybox``."""
        return f"{self.domain}/{self.path}"

    @property
    def familiar_name(self) -> str:
        """The repository name as Docker shows it, e.g. ``busybox``."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        return self.path.removeprefix(OFFICIAL_PREFIX) if self.path.count("/") == 1 else self.path

    @property
    def api_host(self) -> str:
        """The host that serves this repository's registry API."""
        return DOCKER_HUB_API if self.domain == DEFAULT_DOMAIN else self.domain

    def with_tag(self, tag: str | None) -> Reference:
        return dataclasses.replace(self, tag=tag, digest=None)

    def __str__(self) -> str:
        s = self.name + (f":{self.tag}" if self.tag else "")
        return s + (f"@{self.digest}" if self.digest else "")

    def familiar(self) -> str:
        s = self.familiar_name + (f":{self.tag}" if self.tag else "")
        return s + (f"@{self.digest}" if self.digest else "")


def _split_domain(first: str | None) -> bool:
    return first is not None and ("." in first or ":" in first or first == "localhost" or first.startswith("["))


def parse(ref: str) -> Reference:
    """Parse and normalise ``ref``; UsageError (Docker's wording) if it is malformed."""
    if not ref or len(ref) > 255 or any(c.isspace() for c in ref):
        raise UsageError(f"invalid reference format: {ref!r}")
    if ref != ref.lower() and _REF.match(ref.lower()) and not _REF.match(ref):
        raise UsageError(f"invalid reference format: repository name must be lowercase: {ref!r}")
    m = _REF.match(ref)
    if not m:
        raise UsageError(f"invalid reference format: {ref!r}")
    domain, path = m["domain"], m["path"]
    if domain is not None and not _split_domain(domain):
        # "foo/bar": "foo" is a path component, not a registry
        if domain != domain.lower():
            raise UsageError(f"invalid reference format: repository name must be lowercase: {ref!r}")
        if not re.fullmatch(_COMPONENT, domain):
            raise UsageError(f"invalid reference format: {ref!r}")
        path, domain = f"{domain}/{path}", None
    if domain is None or domain == LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    tag = m["tag"] or (None if m["digest"] else "latest")
    return Reference(domain, path, tag, m["digest"])


def looks_like_id(s: str) -> bool:
    """Whether ``s`` could be an image ID or a unique prefix of one."""
    return bool(_HEX_ID.match(s))
