"""The OCI runtime spec document as vmrt's modules pass it (a bottom-layer type: the
network, the drivers and the runner all use it, bundle.make_config writes it)."""

from __future__ import annotations

from typing import Any, TypedDict


class Spec(TypedDict, total=False):
    """The bundle's config.json, an OCI runtime spec document (runtime-spec config.md): what
    the runner, the drivers and the network pass each other. Its members are typed; their
    contents are JSON as the spec has them, read where they are used."""

    ociVersion: str
    process: dict[str, Any]
    root: dict[str, Any]
    hostname: str
    mounts: list[dict[str, Any]]
    annotations: dict[str, str]
    linux: dict[str, Any]
