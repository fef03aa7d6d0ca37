"""Deterministic OCI image layouts built in Python, for registry and image-store tests.

`Layer` assembles a tar (regular files, dirs, links, whiteouts, devices, PAX xattrs, or raw
hostile `TarInfo`s); `OciLayout` writes an OCI image layout (oci-layout, blobs/sha256, index.json)
holding single-platform images and multi-arch indexes, with OCI or Docker schema2 media types,
which `skopeo copy oci:DIR:REF docker://...` can push. The same inputs always give the same
digests: fixed mtimes, owners and names, gzip without a timestamp, zstd at a fixed level.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import random
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zstandard

Compression = Literal["gzip", "zstd", "none"]
Platform = tuple[str, ...]  # (os, architecture) or (os, architecture, variant)

MTIME = 1_700_000_000  # every entry's mtime, so tars are reproducible
CREATED = "2023-11-14T22:13:20Z"  # the same instant, for image configs

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = {"none": "application/vnd.oci.image.layer.v1.tar",
             "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
             "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = {"none": "application/vnd.docker.image.rootfs.diff.tar",
                "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip"}
REF_ANNOTATION = "org.opencontainers.image.ref.name"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _rel(path: str) -> str:
    """Archive names are relative ('bin/sh'), as docker and buildah write them."""
    return path.lstrip("/")


def compress(data: bytes, compression: Compression, level: int | None = None) -> bytes:
    """Deterministic compression: gzip with mtime 0 and no file name; zstd with a fixed level."""
    if compression == "none":
        return data
    if compression == "gzip":
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="",
                           compresslevel=6 if level is None else level) as gz:
            gz.write(data)
        return buf.getvalue()
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3 if level is None else level).compress(data)
    raise ValueError(f"unknown compression {compression!r}")


class Layer:
    """A layer tar built entry by entry, in the order the add_* calls are made.

    Parents are not added implicitly: a test that wants `etc/` before `etc/passwd` adds it,
    and a test of an extractor that must cope without it simply does not.
    """

    def __init__(self, mtime: int = MTIME) -> None:
        self.mtime = mtime
        self.entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _info(self, path: str, type_: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(_rel(path))
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type_, mode, uid, gid, self.mtime
        ti.uname = ti.gname = ""
        return ti

    def add_tarinfo(self, ti: tarfile.TarInfo, data: bytes | None = None) -> Layer:
        """Append a raw entry as given (no name clean-up): for '..', absolute and other hostile names."""
        if data is not None:
            ti.size = len(data)
        self.entries.append((ti, data))
        return self

    def add_file(self, path: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
                 xattrs: Mapping[str, bytes | str] | None = None) -> Layer:
        """A regular file; `xattrs` become PAX 'SCHILY.xattr.NAME' records (e.g. 'user.x', 'security.capability')."""
        ti = self._info(path, tarfile.REGTYPE, mode, uid, gid)
        if xattrs:
            # tarfile writes PAX values as UTF-8, or raw bytes (hdrcharset=BINARY) when they
            # carry surrogate escapes; so bytes go through surrogateescape to survive exactly.
            ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
                              for k, v in xattrs.items()}
        return self.add_tarinfo(ti, data.encode() if isinstance(data, str) else data)

    def add_dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Layer:
        return self.add_tarinfo(self._info(path, tarfile.DIRTYPE, mode, uid, gid))

    def add_symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> Layer:
        """A symlink; `target` is stored verbatim (absolute targets stay absolute)."""
        ti = self._info(path, tarfile.SYMTYPE, 0o777, uid, gid)
        ti.linkname = target
        return self.add_tarinfo(ti)

    def add_hardlink(self, path: str, target: str) -> Layer:
        """A hard link to an earlier entry `target` (a path in this layer's archive)."""
        ti = self._info(path, tarfile.LNKTYPE, 0o644, 0, 0)
        ti.linkname = _rel(target)
        return self.add_tarinfo(ti)

    def add_whiteout(self, path: str) -> Layer:
        """Delete `path` from lower layers: an empty file named 'DIR/.wh.NAME'."""
        parent, _, name = _rel(path).rpartition("/")
        return self.add_file(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"", mode=0o600)

    def add_opaque(self, dir: str) -> Layer:
        """Hide everything lower layers had under `dir`: 'DIR/.wh..wh..opq'."""
        return self.add_file(f"{_rel(dir).rstrip('/')}/.wh..wh..opq", b"", mode=0o600)

    def add_device(self, path: str, kind: Literal["c", "b"], major: int, minor: int,
                   mode: int = 0o666, uid: int = 0, gid: int = 0) -> Layer:
        ti = self._info(path, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, mode, uid, gid)
        ti.devmajor, ti.devminor = major, minor
        return self.add_tarinfo(ti)

    def add_fifo(self, path: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Layer:
        return self.add_tarinfo(self._info(path, tarfile.FIFOTYPE, mode, uid, gid))

    def tar_bytes(self) -> bytes:
        """The uncompressed tar (PAX format, so long names and xattrs need no GNU extensions)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for ti, data in self.entries:
                tf.addfile(copy.copy(ti), io.BytesIO(data) if data is not None else None)
        return buf.getvalue()

    def blob(self, compression: Compression = "gzip", *, docker: bool = False,
             level: int | None = None) -> tuple[bytes, str, str]:
        """(blob bytes, layer media type, diff_id) with OCI or Docker schema2 media types."""
        tar = self.tar_bytes()
        types = DOCKER_LAYER if docker else OCI_LAYER
        if compression not in types:
            raise ValueError(f"Docker schema2 has no media type for {compression} layers")
        return compress(tar, compression, level), types[compression], sha256_digest(tar)


@dataclass
class Blob:
    """A descriptor's three fields, for blobs written into a layout."""
    media_type: str
    digest: str
    size: int

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def _platform(p: Platform) -> dict[str, str]:
    d = {"architecture": p[1], "os": p[0]}
    if len(p) > 2:
        d["variant"] = p[2]
    return d


class OciLayout:
    """An OCI image layout directory; `skopeo copy oci:DIR:REF docker://HOST/NAME:TAG` pushes from it."""

    def __init__(self, dir: Path) -> None:
        self.dir = Path(dir)
        (self.dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.dir / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        self.manifests: dict[str, tuple[Blob, Platform]] = {}  # digest -> manifest blob, platform
        self._write_index()

    def __str__(self) -> str:
        return str(self.dir)

    def ref(self, ref: str) -> str:
        """The skopeo source name for tag `ref`: 'oci:DIR:REF', or for a Docker schema2 manifest or list
        (which skopeo's oci: transport skips in index.json) a 'dir:' export of it next to the layout."""
        if self.descriptor(ref)["mediaType"] in (OCI_MANIFEST, OCI_INDEX):
            return f"oci:{self.dir}:{ref}"
        return "dir:" + str(self.export_dir(ref, self.dir.with_name(f"{self.dir.name}.dir-{ref}")))

    def tar(self, dest: Path) -> Path:
        """The layout as one tar archive (what `vmrt load -i` and `docker load` take)."""
        with tarfile.open(dest, "w") as tf:
            for p in sorted(self.dir.rglob("*")):
                tf.add(p, p.relative_to(self.dir).as_posix(), recursive=False)
        return dest

    def descriptor(self, ref: str) -> dict[str, Any]:
        """index.json's entry for tag `ref`."""
        for m in self.index["manifests"]:
            if m.get("annotations", {}).get(REF_ANNOTATION) == ref:
                return dict(m)
        raise KeyError(f"no tag {ref!r} in {self.dir}")

    def manifest(self, digest: str) -> dict[str, Any]:
        return dict(json.loads(self.blob_path(digest).read_bytes()))

    def export_dir(self, ref: str, dest: Path) -> Path:
        """Write tag `ref` as containers/image's 'dir:' layout (version 1.1): manifest.json, each list
        instance as HEX.manifest.json, blobs as HEX. Any media types; digests unchanged."""
        dest = Path(dest)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        (dest / "version").write_text("Directory Transport Version: 1.1\n")
        top = self.descriptor(ref)["digest"]
        shutil.copyfile(self.blob_path(top), dest / "manifest.json")
        m = self.manifest(top)
        images = [top]
        if "manifests" in m:
            images = [d["digest"] for d in m["manifests"]]
            for digest in images:
                shutil.copyfile(self.blob_path(digest), dest / f"{digest.partition(':')[2]}.manifest.json")
        for digest in images:
            im = self.manifest(digest)
            for d in [im["config"], *im["layers"]]:
                shutil.copyfile(self.blob_path(d["digest"]), dest / d["digest"].partition(":")[2])
        return dest

    def blob_path(self, digest: str) -> Path:
        algo, _, hex_ = digest.partition(":")
        return self.dir / "blobs" / algo / hex_

    def add_blob(self, data: bytes, media_type: str) -> Blob:
        b = Blob(media_type, sha256_digest(data), len(data))
        path = self.blob_path(b.digest)
        if not path.exists():
            path.write_bytes(data)
        return b

    def _json_blob(self, obj: Any, media_type: str) -> Blob:
        return self.add_blob(json.dumps(obj, indent=None, separators=(",", ":")).encode(), media_type)

    def _write_index(self) -> None:
        (self.dir / "index.json").write_text(json.dumps(self.index, indent=1))

    def tag(self, desc: dict[str, Any], ref: str) -> None:
        """Point index.json's `ref` at `desc`, replacing an earlier entry of that name."""
        ms = [m for m in self.index["manifests"] if m.get("annotations", {}).get(REF_ANNOTATION) != ref]
        ms.append({**desc, "annotations": {REF_ANNOTATION: ref}})
        self.index["manifests"] = ms
        self._write_index()

    def add_image(self, layers: Sequence[Layer], config: Mapping[str, Any] | None = None,
                  platform: Platform = ("linux", "amd64"), compression: Compression = "gzip",
                  ref: str | None = "latest", *, docker_media_types: bool = False,
                  level: int | None = None, annotations: Mapping[str, str] | None = None) -> str:
        """Write layers, image config and manifest; tag it `ref` (None: untagged, e.g. for an index).

        `config` is the image config's "config" section (Cmd, Env, Entrypoint, WorkingDir, User, ...).
        Returns the manifest digest.
        """
        blobs = [lay.blob(compression, docker=docker_media_types, level=level) for lay in layers]
        layer_blobs = [self.add_blob(data, mt) for data, mt, _ in blobs]
        image_config = {
            "created": CREATED, **_platform(platform), "config": dict(config or {}),
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, _, diff_id in blobs]},
            "history": [{"created": CREATED, "created_by": f"ocibuild layer {i}"} for i in range(len(blobs))],
        }
        cfg = self._json_blob(image_config, DOCKER_CONFIG if docker_media_types else OCI_CONFIG)
        manifest: dict[str, Any] = {
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST,
            "config": cfg.descriptor(), "layers": [b.descriptor() for b in layer_blobs]}
        if annotations:
            manifest["annotations"] = dict(annotations)
        m = self._json_blob(manifest, manifest["mediaType"])
        self.manifests[m.digest] = (m, platform)
        if ref is not None:
            self.tag(m.descriptor(), ref)
        return m.digest

    def add_index(self, manifests: Sequence[str | tuple[str, Platform]], ref: str | None = "latest", *,
                  docker_media_types: bool = False) -> str:
        """A multi-arch index over manifests made by add_image (platform as recorded, or given as
        (digest, platform)); tagged `ref`. Returns the index digest."""
        entries = []
        for item in manifests:
            digest, platform = item if isinstance(item, tuple) else (item, self.manifests[item][1])
            entries.append(self.manifests[digest][0].descriptor(platform=_platform(platform)))
        mt = DOCKER_LIST if docker_media_types else OCI_INDEX
        idx = self._json_blob({"schemaVersion": 2, "mediaType": mt, "manifests": entries}, mt)
        if ref is not None:
            self.tag(idx.descriptor(), ref)
        return idx.digest


# --- ready-made layers -------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "cat", "ls", "echo", "true")


def _is_static_elf(path: Path) -> bool:
    """An ELF with no PT_INTERP program header, i.e. not dynamically linked."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only; that is all Debian ships here
        return False
    order: Literal["little", "big"] = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[0x20:0x28], order)
    phentsize = int.from_bytes(data[0x36:0x38], order)
    phnum = int.from_bytes(data[0x38:0x3A], order)
    return all(int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], order) != 3  # PT_INTERP
               for i in range(phnum))


def busybox_layer(busybox: Path = BUSYBOX) -> Layer:
    """A minimal runnable root: static busybox, a few applet links, the usual dirs, root in passwd/group."""
    if not busybox.exists() or not _is_static_elf(busybox):
        raise RuntimeError(f"{busybox} is not a static ELF (install busybox-static)")
    layer = Layer()
    for d in ("bin", "etc", "dev", "proc", "sys", "root"):
        layer.add_dir(d, 0o700 if d == "root" else 0o755)
    layer.add_dir("tmp", 0o1777)
    layer.add_file("bin/busybox", busybox.read_bytes(), mode=0o755)
    for applet in BUSYBOX_APPLETS:
        layer.add_symlink(f"bin/{applet}", "busybox")
    layer.add_file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    layer.add_file("etc/group", "root:x:0:\nnogroup:x:65534:\n")
    return layer


def big_layer(size_bytes: int, seed: int, path: str = "data/blob.bin") -> Layer:
    """One file of `size_bytes` seeded pseudo-random (incompressible) bytes, fast: random.randbytes."""
    layer = Layer()
    if parent := path.rpartition("/")[0]:
        layer.add_dir(parent)
    return layer.add_file(path, random.Random(seed).randbytes(size_bytes))
