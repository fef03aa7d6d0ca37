"""Image archives: ``docker load``, ``docker save`` and ``docker import`` against the store.

``load`` reads two formats, either one plain, gzip or zstd compressed:

* docker-archive (``docker save``, ``podman save``, ``skopeo copy ... docker-archive:``):
  ``manifest.json`` lists each image's config file, layer files and RepoTags. Layer
  paths are the legacy ``<id>/layer.tar``, skopeo's ``<diff id>.tar`` or Docker 25+'s
  ``blobs/sha256/<hex>``; layers are plain tars or gzip/zstd, told apart by magic.
* OCI image layouts (``oci-archive``): ``index.json`` and ``blobs/sha256/``. A
  manifest's tag comes from the descriptor's ``io.containerd.image.name`` annotation
  (a full name) or else ``org.opencontainers.image.ref.name`` read as a reference, as
  podman does (``v1`` names ``v1:latest``); a nested index gives its ``platform`` image.

An archive with both (Docker 25+ writes both) is read through ``manifest.json``: it is
what ``docker load`` itself reads and every Docker version writes it complete, while
Docker's ``index.json`` has not always been (some moby versions listed OCI manifests
carrying only their foreign layers).

The archive is untrusted. It is never extracted: members are read by name from the
tar (one that cannot seek, a pipe, or a compressed one is first spooled, decompressed,
to an unnamed file in the store's ``tmp/``). A link member stands for the member it
points to inside the archive, since Docker before 25 wrote a layer that occurs twice as
a symlink to its first copy; links leaving the archive, and anything else that is not a
regular file where a blob is expected, refuse the archive. JSON members are capped at
4 MiB. Every blob is verified: OCI blobs and ``blobs/sha256/<hex>`` files against their names,
layers against the config's diff ids when the store unpacks them. All images are
staged (blobs stored, layers unpacked) before the first one is committed, so a
failure leaves no image visible; its blobs are left to garbage collection.

``save`` writes what Docker 25+ writes: one tar that is both a docker-archive and an
OCI layout, blobs shared by both views and each stored once. Layers keep their stored
compression; docker load and skopeo's docker-archive reader decompress by magic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import shlex
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, BinaryIO

from ..errors import ImageError, UsageError
from . import reference
from .store import (
    GZIP_MAGIC,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_DOCKER_CONFIG,
    MT_DOCKER_FOREIGN,
    MT_DOCKER_LAYER,
    MT_DOCKER_MANIFEST,
    MT_OCI_CONFIG,
    MT_OCI_INDEX,
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    MT_OCI_MANIFEST,
    ZSTD_MAGIC,
    Image,
    Store,
    atomic_file,
    decompressed,
    descriptor,
    digest_hex,
    layer_descriptors,
    sha256,
)
from .unpack import BoundedTarInfo

JSON_LIMIT = 4 << 20       # the largest JSON member read (real configs are a few KiB)
CHUNK = 1 << 20
MAX_LINKS = 8              # link members followed in a row
MAX_NESTING = 4            # indexes within indexes
ANN_IMAGE_NAME = "io.containerd.image.name"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
_NAMED_BLOB = re.compile(r"(?:blobs/sha256/([0-9a-f]{64})|([0-9a-f]{64})\.json)")
_TO_OCI = {MT_DOCKER_MANIFEST: MT_OCI_MANIFEST, MT_DOCKER_CONFIG: MT_OCI_CONFIG, MT_DOCKER_LAYER: MT_OCI_LAYER_GZIP,
           MT_DOCKER_FOREIGN: "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"}


def _read_errors() -> tuple[type[Exception], ...]:
    """What reading a truncated, corrupt or undecodable input raises (zstd's only if it is installed)."""
    errors: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error, tarfile.TarError)
    with contextlib.suppress(ImportError):
        import zstandard  # optional: zstd's error type only where the package is installed
        errors += (zstandard.ZstdError,)
    return errors


def _pump(src: IO[bytes], sink: Callable[[bytes], object], what: str) -> None:
    """Copy ``src`` into ``sink``; a failure to read is the input's fault (ImageError), one to write is not."""
    while True:
        try:
            chunk = src.read(CHUNK)
        except _read_errors() as e:
            raise ImageError(f"{what} is corrupt: {e}") from e
        if not chunk:
            return
        sink(chunk)


def _peekable(raw: IO[bytes]) -> IO[bytes]:
    return raw if hasattr(raw, "peek") else io.BufferedReader(raw)  # type: ignore[type-var]


def _head(f: IO[bytes]) -> bytes:
    return bytes(f.peek(4)[:4])  # type: ignore[attr-defined]


def _compressed(head: bytes) -> bool:
    return head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC)


def _layer_type(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return MT_OCI_LAYER_GZIP
    return MT_OCI_LAYER_ZSTD if head.startswith(ZSTD_MAGIC) else MT_OCI_LAYER


def _open_source(source: Path | BinaryIO, stack: contextlib.ExitStack) -> IO[bytes]:
    if not isinstance(source, Path):
        return _peekable(source)
    try:
        return stack.enter_context(open(source, "rb"))
    except OSError as e:
        raise ImageError(f"cannot read {source}: {e.strerror}") from e


# --- reading an untrusted archive ---------------------------------------------------------

class _Archive:
    """The members of an untrusted tar, read by name and never extracted."""

    def __init__(self, tf: tarfile.TarFile) -> None:
        self._tf = tf
        try:
            self._members = {posixpath.normpath(m.name): m for m in tf.getmembers()}
        except _read_errors() as e:
            raise ImageError(f"archive is corrupt: {e}") from e

    def __contains__(self, name: str) -> bool:
        return name in self._members

    def member(self, name: str) -> tarfile.TarInfo:
        """The regular file ``name`` stands for, following links only to other members."""
        path = posixpath.normpath(name)
        for _ in range(MAX_LINKS):
            m = self._members.get(path)
            if m is None:
                raise ImageError(f"invalid archive: {name!r} is missing" if path == posixpath.normpath(name)
                                 else f"invalid archive: {name!r} links to missing {path!r}")
            if m.isreg():
                return m
            if not (m.issym() or m.islnk()):
                raise ImageError(f"invalid archive: {name!r} is not a regular file")
            path = posixpath.normpath(m.linkname if m.islnk() else posixpath.join(posixpath.dirname(m.name),
                                                                                   m.linkname))
            if m.linkname.startswith("/") or path == ".." or path.startswith("../"):
                raise ImageError(f"invalid archive: {name!r} is a link out of the archive ({m.linkname!r})")
        raise ImageError(f"invalid archive: too many links resolving {name!r}")

    def copy(self, m: tarfile.TarInfo, sink: Callable[[bytes], object]) -> None:
        f = self._tf.extractfile(m)
        assert f is not None  # a regular member
        _pump(f, sink, f"archive member {m.name!r}")

    def json(self, name: str) -> tuple[Any, bytes]:
        """(parsed, raw bytes) of the JSON member ``name``."""
        m = self.member(name)
        if m.size > JSON_LIMIT:
            raise ImageError(f"invalid archive: {name!r} is too large for JSON ({m.size} bytes)")
        buf = bytearray()
        self.copy(m, buf.extend)
        data = bytes(buf)
        try:
            return json.loads(data), data
        except (ValueError, RecursionError) as e:
            raise ImageError(f"invalid archive: {name!r} is not valid JSON: {e}") from e


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageError(f"invalid archive: {what} is not a JSON object")
    return value


def _descriptor(value: Any, what: str) -> dict[str, Any]:
    return descriptor(value, f"invalid archive: {what}")


def _blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest_hex(digest)


def _tag(name: Any, what: str) -> reference.Reference | None:
    """The tag ``name`` gives the image; None for a digest reference (a name, not a tag)."""
    try:
        r = reference.parse(name) if isinstance(name, str) else None
    except UsageError:
        r = None
    if r is None:
        raise ImageError(f"invalid archive: {what} names an invalid reference {name!r}")
    return None if r.digest else r


def _diff_ids(config: dict[str, Any], layers: int, what: str) -> list[str]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or len(ids) != layers or not all(isinstance(i, str) for i in ids):
        raise ImageError(f"invalid archive: config {what} does not list one diff id for each of its {layers} layers")
    for i in ids:
        digest_hex(i)
    return ids


@dataclasses.dataclass
class _Staged:
    """An image whose blobs are in the store, not yet visible."""
    manifest_digest: str
    layers: list[dict[str, Any]]
    diff_ids: list[str]
    refs: list[reference.Reference] = dataclasses.field(default_factory=list)
    extra: list[str] = dataclasses.field(default_factory=list)


def _copy_blob(store: Store, arc: _Archive, name: str, digest: str | None = None,
               size: int | None = None) -> tuple[str, int, bytes]:
    """Stream member ``name`` into the store; (digest, size, first bytes). Checked against ``digest``/``size``."""
    m = arc.member(name)
    if size is not None and m.size != size:
        raise ImageError(f"archive is corrupt: {name!r} has {m.size} bytes, its descriptor says {size}")
    head = bytearray()  # the first bytes, to tell the compression by
    with store.blob_writer() as w:
        def write(chunk: bytes) -> None:
            head.extend(chunk[:4 - len(head)])
            w.write(chunk)
        arc.copy(m, write)
        if digest is not None and w.digest != digest:
            raise ImageError(f"archive is corrupt: {name!r} does not match its digest (got {w.digest})")
    return w.digest, w.size, bytes(head)


def _stage_docker(store: Store, arc: _Archive) -> list[_Staged]:
    """Store the images manifest.json lists, each with an OCI manifest made for it."""
    items, _ = arc.json("manifest.json")
    if not isinstance(items, list) or not items:
        raise ImageError("invalid archive: manifest.json is not a list of images")
    copied: dict[str, dict[str, Any]] = {}  # layer path -> descriptor
    staged = []
    for entry in items:
        item = _obj(entry, "a manifest.json entry")
        config_path, paths, tags = item.get("Config"), item.get("Layers"), item.get("RepoTags") or []
        if not isinstance(config_path, str) or not isinstance(paths, list) or not isinstance(tags, list) \
                or not all(isinstance(p, str) for p in paths):
            raise ImageError("invalid archive: malformed manifest.json entry")
        config, data = arc.json(config_path)
        config_digest = sha256(data)
        if (named := _NAMED_BLOB.fullmatch(posixpath.normpath(config_path))) \
                and config_digest != "sha256:" + (named[1] or named[2]):
            raise ImageError(f"archive is corrupt: config {config_path!r} does not match its digest")
        diff_ids = _diff_ids(_obj(config, config_path), len(paths), config_digest)
        store.put_blob(data)
        for path in paths:
            if path not in copied:
                named = _NAMED_BLOB.fullmatch(posixpath.normpath(path))
                digest, size, head = _copy_blob(store, arc, path, "sha256:" + named[1] if named and named[1] else None)
                copied[path] = {"mediaType": _layer_type(head), "digest": digest, "size": size}
        layers = [copied[p] for p in paths]
        manifest_digest, _ = store.put_json({
            "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": len(data)}, "layers": layers})
        refs = [r for t in tags if (r := _tag(t, "manifest.json")) is not None]
        staged.append(_Staged(manifest_digest, layers, diff_ids, refs))
    return staged


def _oci_json(store: Store, arc: _Archive, desc: dict[str, Any]) -> dict[str, Any]:
    """The JSON blob ``desc`` points to, verified and stored."""
    name = _blob_path(desc["digest"])
    obj, data = arc.json(name)
    if sha256(data) != desc["digest"] or len(data) != desc["size"]:
        raise ImageError(f"archive is corrupt: {name!r} does not match its descriptor")
    store.put_blob(data)
    return _obj(obj, name)


def _find_manifest(store: Store, arc: _Archive, desc: dict[str, Any], platform: str,
                   extra: list[str], depth: int = 0) -> tuple[str, dict[str, Any], list[str]] | None:
    """(digest, manifest, indexes passed) of the image ``desc`` leads to; None for a non-image artifact."""
    mt = desc.get("mediaType")
    if mt is not None and mt not in (*MANIFEST_TYPES, *INDEX_TYPES):
        return None
    obj = _oci_json(store, arc, desc)
    if (mt or obj.get("mediaType") or (MT_OCI_INDEX if "manifests" in obj else MT_OCI_MANIFEST)) in MANIFEST_TYPES:
        return desc["digest"], obj, extra
    if depth >= MAX_NESTING:
        raise ImageError("invalid archive: indexes nested too deeply")
    os_, _, arch = platform.partition("/")
    arch, _, variant = arch.partition("/")
    entries = obj.get("manifests") or []
    if not isinstance(entries, list):
        raise ImageError(f"invalid archive: index {desc['digest']} has no list of manifests")
    for entry in entries:
        p = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(p, dict) and p.get("os") == os_ and p.get("architecture") == arch \
                and (not variant or p.get("variant") == variant):
            return _find_manifest(store, arc, _descriptor(entry, desc["digest"]), platform,
                                  [*extra, desc["digest"]], depth + 1)
    raise ImageError(f"archive has no {platform} image in index {desc['digest']}")


def _stage_manifest(store: Store, arc: _Archive, digest: str, manifest: dict[str, Any]) -> _Staged:
    if manifest.get("mediaType", MT_OCI_MANIFEST) not in MANIFEST_TYPES or manifest.get("schemaVersion") != 2:
        raise ImageError(f"invalid archive: {digest} is not an image manifest")
    config_desc = _descriptor(manifest.get("config"), digest)
    config = _oci_json(store, arc, config_desc)
    descs = layer_descriptors(manifest, f"invalid archive: manifest {digest}")
    for d in descs:
        if not store.has_blob(d["digest"]):
            _copy_blob(store, arc, _blob_path(d["digest"]), d["digest"], d["size"])
    return _Staged(digest, descs, _diff_ids(config, len(descs), config_desc["digest"]))


def _stage_oci(store: Store, arc: _Archive, platform: str) -> list[_Staged]:
    """Store the images index.json lists (entries that are no image, e.g. signatures, are skipped)."""
    entries = _obj(arc.json("index.json")[0], "index.json").get("manifests")
    if not isinstance(entries, list):
        raise ImageError("invalid archive: index.json has no manifest list")
    staged: dict[str, _Staged] = {}
    for entry in entries:
        desc = _descriptor(entry, "index.json")
        if (found := _find_manifest(store, arc, desc, platform, [])) is None:
            continue
        digest, manifest, extra = found
        if digest not in staged:
            staged[digest] = _stage_manifest(store, arc, digest, manifest)
        staged[digest].extra += extra  # indexes it was reached through, kept with the image
        ann = desc.get("annotations")
        name = (ann.get(ANN_IMAGE_NAME) or ann.get(ANN_REF_NAME)) if isinstance(ann, dict) else None
        if name is not None and (r := _tag(name, "index.json")) is not None:
            staged[digest].refs.append(r)
    if not staged:
        raise ImageError("invalid archive: index.json lists no image")
    return list(staged.values())


def _seekable(source: Path | BinaryIO) -> bool:
    """A path, or an open file that can seek (the API's spooled upload; stdin from a file)."""
    if isinstance(source, Path):
        return True
    try:
        return bool(source.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _open_tar(store: Store, source: Path | BinaryIO, stack: contextlib.ExitStack) -> tarfile.TarFile:
    """The archive as a seekable tar: a plain file (or an open one that seeks) as it is; a pipe or a
    compressed archive spooled."""
    f = _open_source(source, stack)
    if not _seekable(source) or _compressed(_head(f)):
        spool = stack.enter_context(tempfile.TemporaryFile(dir=store.tmp, prefix="load-"))
        _pump(decompressed(f), spool.write, "archive")
        spool.seek(0)
        f = spool
    try:
        return stack.enter_context(tarfile.open(fileobj=f, mode="r:", tarinfo=BoundedTarInfo))
    except tarfile.TarError as e:
        raise ImageError(f"invalid archive: not a tar file ({e})") from e


def load(store: Store, source: Path | BinaryIO, *, platform: str = "linux/amd64") -> list[str]:
    """Load every image of a docker-archive or OCI archive; their tags (familiar form), or IDs if untagged."""
    with store.writing(), contextlib.ExitStack() as stack:
        arc = _Archive(_open_tar(store, source, stack))
        if "manifest.json" in arc:
            staged = _stage_docker(store, arc)
        elif "index.json" in arc:
            staged = _stage_oci(store, arc, platform)
        else:
            raise ImageError("invalid archive: no manifest.json or index.json")
        for s in staged:  # unpack (and so verify) every layer before any image becomes visible
            for desc, diff_id in zip(s.layers, s.diff_ids, strict=True):
                store.unpacked_layer(desc, diff_id)
        loaded: list[str] = []
        for s in staged:
            refs = list(dict.fromkeys(s.refs))
            image = store.commit_image(s.manifest_digest, [str(r) for r in refs], extra_blobs=s.extra)
            loaded += [r.familiar() for r in refs] or [image.id]
        return list(dict.fromkeys(loaded))


# --- save ---------------------------------------------------------------------------------

class _Hashing:
    """Reads a stored blob into the archive, hashing it, so a corrupt store is not exported."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.hash = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        return data


def _member(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    """A member as Docker writes it: root-owned, epoch mtime (so a save is reproducible)."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mode = size, kind, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return ti


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    tf.addfile(_member(name, len(data)), io.BytesIO(data))


def _add_blob(tf: tarfile.TarFile, store: Store, digest: str) -> None:
    try:
        with open(store.blob_path(digest), "rb") as f:
            reader = _Hashing(f)
            tf.addfile(_member(_blob_path(digest), os.fstat(f.fileno()).st_size), reader)
    except FileNotFoundError:
        raise ImageError(f"blob {digest} missing from the store") from None
    if "sha256:" + reader.hash.hexdigest() != digest:
        raise ImageError(f"blob {digest} is corrupt (digest mismatch)")


def _oci_manifest(store: Store, image: Image) -> bytes:
    """The image's manifest as stored, or for a Docker schema2 one its OCI equivalent (skopeo's OCI
    reader skips Docker media types in index.json); the config, and so the image ID, is unchanged."""
    if image.manifest.get("mediaType") != MT_DOCKER_MANIFEST:
        return store.read_blob(image.manifest_digest)

    def oci(d: dict[str, Any]) -> dict[str, Any]:
        return {**d, "mediaType": _TO_OCI.get(d.get("mediaType", ""), d.get("mediaType"))}
    m = image.manifest
    return json.dumps({**m, "mediaType": MT_OCI_MANIFEST, "config": oci(m["config"]),
                       "layers": [oci(d) for d in image.layers]}, separators=(",", ":")).encode()


def _write_archive(store: Store, images: Iterable[tuple[Image, list[reference.Reference]]], out: IO[bytes]) -> None:
    manifests: dict[str, bytes] = {}  # digest -> OCI manifest
    blobs: set[str] = set()           # configs and layers, each once
    docker: list[dict[str, Any]] = []
    index: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    for image, tags in images:
        data = _oci_manifest(store, image)
        digest = sha256(data)
        manifests[digest] = data
        blobs.update([image.id, *(d["digest"] for d in image.layers)])
        desc: dict[str, Any] = {"mediaType": MT_OCI_MANIFEST, "digest": digest, "size": len(data)}
        if isinstance(image.config.get("os"), str) and isinstance(image.config.get("architecture"), str):
            desc["platform"] = {k: image.config[k] for k in ("architecture", "os", "variant") if k in image.config}
        index += [{**desc, "annotations": {ANN_IMAGE_NAME: str(t), ANN_REF_NAME: t.tag}} for t in tags] or [desc]
        for t in tags if image.diff_ids else ():
            repositories.setdefault(t.familiar_name, {})[str(t.tag)] = digest_hex(image.diff_ids[-1])
        docker.append({"Config": _blob_path(image.id), "RepoTags": [t.familiar() for t in tags],
                       "Layers": [_blob_path(d["digest"]) for d in image.layers]})
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_member("blobs/", kind=tarfile.DIRTYPE))
        tf.addfile(_member("blobs/sha256/", kind=tarfile.DIRTYPE))
        for digest in sorted(blobs | manifests.keys()):
            if digest in manifests:
                _add_bytes(tf, _blob_path(digest), manifests[digest])
            else:
                _add_blob(tf, store, digest)
        _add_bytes(tf, "index.json", json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                                                 "manifests": index}).encode())
        _add_bytes(tf, "manifest.json", json.dumps(docker).encode())
        _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        if repositories:
            _add_bytes(tf, "repositories", json.dumps(repositories).encode())


def _saved_tag(image: Image, ref: str) -> reference.Reference | None:
    """The tag ``ref`` names, or None if it named the image by ID or digest (saved untagged, as Docker does)."""
    try:
        r = reference.parse(ref)
    except UsageError:
        return None
    return r if not r.digest and str(r) in image.tags else None


def save(store: Store, refs: list[str], dest: Path | BinaryIO) -> None:
    """Write the images ``refs`` name as one archive, both docker-archive and OCI layout (Docker 25+'s format).

    A file is written beside ``dest`` and renamed over it at the end, so a failed save leaves
    nothing; like the docker CLI's, it is created mode 0600. The shared store lock keeps
    garbage collection from removing blobs while they are read.
    """
    if not refs:
        raise UsageError("save needs at least one image")
    with store.writing():
        chosen: dict[str, tuple[Image, list[reference.Reference]]] = {}
        for ref in refs:
            image = store.get(ref)
            tags = chosen.setdefault(image.id, (image, []))[1]
            if (tag := _saved_tag(image, ref)) is not None and tag not in tags:
                tags.append(tag)
        try:
            if not isinstance(dest, Path):
                _write_archive(store, chosen.values(), dest)
                return
            with atomic_file(dest, 0o600) as f:  # 0600 like the docker CLI's save
                _write_archive(store, chosen.values(), f)
        except OSError as e:
            raise ImageError(f"cannot write {dest if isinstance(dest, Path) else 'the archive'}: {e}") from e


# --- import -------------------------------------------------------------------------------

_CHANGES = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "USER", "WORKDIR")
_PORT = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?(?:/(tcp|udp|sctp))?", re.IGNORECASE)


def _command(arg: str) -> list[str]:
    """JSON (exec) form, or shell form run by /bin/sh -c; text that is not a JSON string list is shell form,
    as in a Dockerfile."""
    if arg.startswith("["):
        with contextlib.suppress(ValueError):
            value = json.loads(arg)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
    return ["/bin/sh", "-c", arg]


def _pairs(instr: str, arg: str) -> list[tuple[str, str]]:
    """``k=v ...`` (shell quoting), or the legacy ``KEY value with spaces``."""
    try:
        words = shlex.split(arg)
    except ValueError as e:
        raise UsageError(f"{instr} {arg}: {e}") from e
    if "=" not in words[0]:
        if len(words) < 2:
            raise UsageError(f"{instr} {arg}: needs KEY=VALUE or KEY VALUE")
        return [(words[0], " ".join(words[1:]))]
    pairs = [w.partition("=")[::2] for w in words]
    if any(not k or "=" not in w for (k, _), w in zip(pairs, words, strict=True)):
        raise UsageError(f"{instr} {arg}: every word must be KEY=VALUE")
    return pairs


def _ports(arg: str) -> list[str]:
    out = []
    for word in arg.split():
        m = _PORT.fullmatch(word)
        first, last = (int(m[1]), int(m[2] or m[1])) if m else (0, 0)
        if not m or not 0 < first <= last <= 65535:
            raise UsageError(f"EXPOSE {arg}: invalid port {word!r}")
        out += [f"{p}/{(m[3] or 'tcp').lower()}" for p in range(first, last + 1)]
    return out


def changes_config(changes: Iterable[str]) -> dict[str, Any]:
    """The runtime config (``config`` section) that ``--change`` lines in Dockerfile syntax describe."""
    cfg: dict[str, Any] = {}
    for line in changes:
        instr, _, arg = line.strip().partition(" ")
        instr, arg = instr.upper(), arg.strip()
        if instr not in _CHANGES:
            raise UsageError(f"{instr or line!r} is not a valid change command (supported: {', '.join(_CHANGES)})")
        if not arg:
            raise UsageError(f"{instr} requires an argument")
        if instr in ("CMD", "ENTRYPOINT"):
            cfg["Cmd" if instr == "CMD" else "Entrypoint"] = _command(arg)
        elif instr == "ENV":
            env = dict(e.partition("=")[::2] for e in cfg.get("Env", []))
            env.update(_pairs(instr, arg))
            cfg["Env"] = [f"{k}={v}" for k, v in env.items()]
        elif instr == "LABEL":
            cfg["Labels"] = {**cfg.get("Labels", {}), **dict(_pairs(instr, arg))}
        elif instr == "EXPOSE":
            cfg["ExposedPorts"] = {**cfg.get("ExposedPorts", {}), **{p: {} for p in _ports(arg)}}
        elif instr == "WORKDIR":
            cfg["WorkingDir"] = posixpath.normpath(posixpath.join(cfg.get("WorkingDir", "/"), arg))
        else:
            cfg["User"] = arg
    return cfg


class _Tee:
    """A reader that hands everything read to ``sink`` too: a gzip rootfs is stored as given while it is
    decompressed to hash its diff id, in one pass."""

    def __init__(self, src: IO[bytes], sink: Callable[[bytes], object]) -> None:
        self._src, self._sink = src, sink

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self._sink(data)
        return data


def import_layer(store: Store, raw: IO[bytes]) -> tuple[dict[str, Any], str]:
    """Store a rootfs tar (plain, gzip or zstd) as a gzip layer blob; (descriptor, diff id)."""
    src = _peekable(raw)
    diff = hashlib.sha256()
    with store.blob_writer() as w:
        if _head(src).startswith(GZIP_MAGIC):  # GzipFile reads its input to the end
            _pump(gzip.GzipFile(fileobj=_Tee(src, w.write), mode="rb"),  # type: ignore[call-overload]
                  diff.update, "rootfs tarball")
        else:
            with gzip.GzipFile(fileobj=w, mode="wb", mtime=0, compresslevel=6) as gz:  # type: ignore[call-overload]
                def both(chunk: bytes) -> None:
                    diff.update(chunk)
                    gz.write(chunk)
                _pump(decompressed(src), both, "rootfs tarball")
    return {"mediaType": MT_OCI_LAYER_GZIP, "digest": w.digest, "size": w.size}, "sha256:" + diff.hexdigest()


def import_tarball(store: Store, source: Path | BinaryIO, ref: str | None, *, changes: Iterable[str] = (),
                   message: str = "") -> Image:
    """A one-layer image of the rootfs tarball ``source`` (a path, or a stream: stdin), as ``docker import``.

    The layer is untrusted: it becomes visible only after the store unpacked it with the
    same checks as any pulled layer.
    """
    tag = reference.parse(ref) if ref else None
    if tag is not None and tag.digest:
        raise UsageError(f"cannot import to a digest reference: {ref!r}")
    runtime = changes_config(changes)
    comment = message or f"Imported from {source if isinstance(source, Path) else '-'}"
    with store.writing(), contextlib.ExitStack() as stack:
        desc, diff_id = import_layer(store, _open_source(source, stack))
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        config = {"created": created, "comment": comment, "config": runtime,
                  "history": [{"created": created, "comment": comment}]}
        return store.write_image([(desc, diff_id)], config, [str(tag)] if tag else [])
