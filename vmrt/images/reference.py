"""Image references: ``[registry/]name[:tag][@sha256:digest]``."""

from __future__ import annotations

import dataclasses
import re

from ..errors import UsageError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
_REF = re.compile(rf"^(?P<name>{_NAME})(?::(?P<tag>[\w][\w.-]{{0,127}}))?"
                  rf"(?:@(?P<digest>sha256:[0-9a-f]{{64}}))?$")


@dataclasses.dataclass(frozen=True)
class Reference:
    name: str
    tag: str = "latest"
    digest: str | None = None

    def __str__(self) -> str:
        s = f"{self.name}:{self.tag}"
        return f"{s}@{self.digest}" if self.digest else s


def parse(ref: str) -> Reference:
    m = _REF.match(ref)
    if not m or len(ref) > 255:
        raise UsageError(f"invalid reference format: {ref!r}")
    return Reference(m["name"], m["tag"] or "latest", m["digest"])
