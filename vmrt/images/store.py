"""vmrt's local image store: an OCI image layout plus unpacked layers.

Layout under ``<root>/``::

    images/oci-layout, images/index.json   OCI image layout; each manifest in the
                                           index carries its reference in the
                                           ``org.opencontainers.image.ref.name``
                                           annotation
    images/blobs/sha256/<hex>              content-addressed blobs (verified)
    layers/<diff-id hex>/                  each layer unpacked once, read-only,
                                           shared by every container

Writes go to a temporary name and are renamed into place, so an interrupted
write never leaves a partial blob, layer or index. ``store.lock`` serialises
index updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ImageError
from . import reference, unpack

REF_ANNOTATION = "org.opencontainers.image.ref.name"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ImageError(f"unsupported or malformed digest {digest!r}")
    return hexpart


@dataclasses.dataclass
class Image:
    ref: str
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    store: Store

    @property
    def id(self) -> str:
        return str(self.manifest["config"]["digest"])

    @property
    def runtime_config(self) -> dict[str, Any]:
        return dict(self.config.get("config") or {})

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("layers", []))

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.get("rootfs", {}).get("diff_ids", []))

    @property
    def size(self) -> int:
        return sum(int(d.get("size", 0)) for d in self.layers)

    def layer_dirs(self) -> list[Path]:
        """Unpacked layer directories, lowest first."""
        return [self.store.unpacked_layer(desc, diff)
                for desc, diff in zip(self.layers, self.diff_ids, strict=True)]


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.oci = root / "images"
        self.blobs = self.oci / "blobs" / "sha256"
        self.layers = root / "layers"
        self.tmp = root / "tmp"

    def init(self) -> None:
        for d in (self.blobs, self.layers, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        layout = self.oci / "oci-layout"
        if not layout.exists():
            self._atomic_write(layout, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        if not (self.oci / "index.json").exists():
            self._write_index({"schemaVersion": 2, "manifests": []})

    # --- blobs ---------------------------------------------------------------
    def _atomic_write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def blob_path(self, digest: str) -> Path:
        return self.blobs / _hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def put_blob(self, data: bytes, expected: str | None = None) -> str:
        digest = sha256(data)
        if expected is not None and expected != digest:
            raise ImageError(f"digest mismatch: expected {expected}, got {digest}")
        if not self.has_blob(digest):
            self._atomic_write(self.blob_path(digest), data)
        return digest

    def read_blob(self, digest: str) -> bytes:
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"blob {digest} missing from the store") from None
        if sha256(data) != digest:
            raise ImageError(f"blob {digest} is corrupt (digest mismatch)")
        return data

    def read_json(self, digest: str) -> dict[str, Any]:
        try:
            obj = json.loads(self.read_blob(digest))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ImageError(f"blob {digest} is not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ImageError(f"blob {digest} is not a JSON object")
        return obj

    # --- index ---------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "store.lock", "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            yield

    def _read_index(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.oci / "index.json").read_text()))
        except FileNotFoundError:
            return {"schemaVersion": 2, "manifests": []}
        except (json.JSONDecodeError, OSError) as e:
            raise ImageError(f"image index is corrupt: {e}") from e

    def _write_index(self, index: dict[str, Any]) -> None:
        self._atomic_write(self.oci / "index.json", json.dumps(index, indent=1).encode())

    def tag(self, ref: str, manifest_digest: str) -> None:
        name = str(reference.parse(ref))
        size = self.blob_path(manifest_digest).stat().st_size
        with self._locked():
            index = self._read_index()
            ms = [m for m in index.get("manifests", [])
                  if m.get("annotations", {}).get(REF_ANNOTATION) != name]
            ms.append({"mediaType": MT_MANIFEST, "digest": manifest_digest, "size": size,
                       "annotations": {REF_ANNOTATION: name,
                                       "org.vmrt.created": str(int(time.time()))}})
            index["manifests"] = ms
            self._write_index(index)

    def untag(self, ref: str) -> bool:
        name = str(reference.parse(ref))
        with self._locked():
            index = self._read_index()
            before = len(index.get("manifests", []))
            index["manifests"] = [m for m in index.get("manifests", [])
                                  if m.get("annotations", {}).get(REF_ANNOTATION) != name]
            self._write_index(index)
            return len(index["manifests"]) != before

    def list(self) -> list[tuple[str, dict[str, Any]]]:
        return [(m["annotations"][REF_ANNOTATION], m)
                for m in self._read_index().get("manifests", [])
                if REF_ANNOTATION in m.get("annotations", {})]

    def get(self, ref: str) -> Image:
        r = reference.parse(ref)
        name = f"{r.name}:{r.tag}"
        for n, desc in self.list():
            if n == name and (r.digest is None or desc["digest"] == r.digest):
                manifest = self.read_json(desc["digest"])
                config = self.read_json(manifest["config"]["digest"])
                return Image(name, desc["digest"], manifest, config, self)
        raise ImageError(f"Unable to find image '{ref}' locally (no registry configured)")

    # --- layers --------------------------------------------------------------
    def unpacked_layer(self, desc: dict[str, Any], diff_id: str) -> Path:
        dest = self.layers / _hex(diff_id)
        if (dest / ".vmrt-complete").exists():
            return dest / "rootfs"
        self.init()
        tmp = Path(tempfile.mkdtemp(dir=self.tmp, prefix="layer-"))
        try:
            blob = self.blob_path(desc["digest"])
            hasher = hashlib.sha256()
            with open(blob, "rb") as raw:
                opener = gzip.open if desc.get("mediaType", "").endswith("gzip") else None
                stream = opener(raw) if opener else raw
                hashing = _HashingReader(stream, hasher)
                (tmp / "rootfs").mkdir()
                unpack.extract(hashing, tmp / "rootfs")  # type: ignore[arg-type]
                hashing.drain()
            if "sha256:" + hasher.hexdigest() != diff_id:
                raise ImageError(f"layer {desc['digest']} does not match its diff id {diff_id}")
            (tmp / ".vmrt-complete").write_text(diff_id + "\n")
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / ".vmrt-complete").exists():
                    raise
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ImageError(f"cannot unpack layer {desc['digest']}: {e}") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest / "rootfs"


class _HashingReader:
    def __init__(self, f: Any, h: Any) -> None:
        self._f, self._h = f, h

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._h.update(b)
        return bytes(b)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass
