"""vmrt's local image store: content-addressed blobs, unpacked layers, SQLite metadata.

Layout under ``<root>/``::

    images/oci-layout                  OCI image layout marker
    images/blobs/sha256/<hex>          content-addressed blobs (manifests, configs,
                                       indexes, layers), verified before they land
    layers/<diff-id hex>/rootfs        each layer unpacked once, read-only, shared by
                                       every container of both isolation modes
    layers/<diff-id hex>/.vmrt-complete  "<diff-id> <uncompressed size>"
    state.db                           tables ``images`` and ``tags`` (beside the
                                       containers table, so "is it in use" is a query)
    tmp/                               downloads and unpacks in progress
    gc.lock                            shared by writers, exclusive for garbage collection

Every blob and layer is written under ``tmp/`` and renamed into place only after
its digest checked out, and an image becomes visible (a row in ``images``, its
tags) only once all its blobs are stored and its layers unpacked, in one SQLite
transaction. So an interrupted pull or load leaves nothing visible, and a retry
succeeds; two concurrent pulls of one image write the same content and the
second rename simply finds the first one's result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .. import fsmode, safefs
from ..errors import ImageError, UsageError
from . import reference, unpack

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
LAYER_TYPES = (MT_OCI_LAYER, MT_OCI_LAYER_GZIP, MT_OCI_LAYER_ZSTD, MT_DOCKER_LAYER, MT_DOCKER_LAYER_TAR,
               MT_DOCKER_FOREIGN,
               "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip")
# older names kept for callers of the first store
MT_MANIFEST, MT_CONFIG, MT_LAYER_GZIP, MT_LAYER_TAR = MT_OCI_MANIFEST, MT_OCI_CONFIG, MT_OCI_LAYER_GZIP, MT_OCI_LAYER

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


MAX_JSON = 4 << 20  # manifests, indexes and configs are a few KiB; refuse to parse more than this


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """The hex part of a sha256 digest; ImageError if it is anything else."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ImageError(f"unsupported or malformed digest {digest!r}")
    return hexpart


_hex = digest_hex


def decompressed(raw: IO[bytes]) -> IO[bytes]:
    """A reader of ``raw`` decompressed by its magic (gzip, zstd or a plain tar)."""
    peekable = raw if hasattr(raw, "peek") else io.BufferedReader(raw)  # type: ignore[type-var]
    head = peekable.peek(4)[:4]
    if head.startswith(GZIP_MAGIC):
        import gzip  # on use: a run of an unpacked image never loads it
        return gzip.GzipFile(fileobj=peekable, mode="rb")  # type: ignore[return-value]
    if head.startswith(ZSTD_MAGIC):
        import zstandard  # on use: an optional package, and zstd layers are rare
        return zstandard.ZstdDecompressor().stream_reader(peekable, read_across_frames=True)
    return peekable


def descriptor(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a well-formed OCI descriptor (sha256 digest, size, optional
    string mediaType); ImageError naming ``what`` otherwise."""
    if not isinstance(value, dict) or not isinstance(value.get("digest"), str) \
            or type(value.get("size")) is not int or value["size"] < 0 \
            or not isinstance(value.get("mediaType", ""), str):
        raise ImageError(f"{what} has a malformed descriptor: {json.dumps(value)[:200]}")
    digest_hex(value["digest"])
    return value


def layer_descriptors(manifest: dict[str, Any], what: str) -> list[dict[str, Any]]:
    """The manifest's layer descriptors, each well-formed and of a layer media type vmrt unpacks."""
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{what} has no layer list")
    descs = [descriptor(d, what) for d in layers]
    for d in descs:
        if d.get("mediaType", MT_OCI_LAYER_GZIP) not in LAYER_TYPES:
            raise ImageError(f"layer {d['digest']} has unsupported media type {d.get('mediaType')!r}")
    return descs


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A file written under a temporary name beside ``path`` (created ``mode``), synced
    and renamed over ``path`` when the block ends; removed if it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # O_EXCL, 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_STR_LISTS = ("Env", "Cmd", "Entrypoint")
_STRS = ("WorkingDir", "User", "StopSignal", "Hostname", "Domainname")
_MAPS = ("Labels", "ExposedPorts", "Volumes")


def check_config(config: dict[str, Any], digest: str) -> None:
    """Refuse an image config whose fields vmrt reads have the wrong JSON types.

    The config is untrusted input like the layers: every later reader (run,
    inspect, save) may then rely on the types the image spec gives.
    """
    def bad(field: str, want: str) -> ImageError:
        return ImageError(f"image config {digest} is malformed: {field} must be {want}")

    for key in ("created", "author", "architecture", "os", "variant"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise bad(key, "a string")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list) \
            or not all(isinstance(d, str) for d in rootfs["diff_ids"]):
        raise bad("rootfs.diff_ids", "a list of digests")
    history = config.get("history")
    if history is not None and (not isinstance(history, list) or not all(isinstance(h, dict) for h in history)):
        raise bad("history", "a list of objects")
    run = config.get("config")
    if run is None:
        return
    if not isinstance(run, dict):
        raise bad("config", "an object")
    for key in _STR_LISTS:
        v = run.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            raise bad(f"config.{key}", "a list of strings")
    for key in _STRS:
        if run.get(key) is not None and not isinstance(run[key], str):
            raise bad(f"config.{key}", "a string")
    for key in _MAPS:
        if run.get(key) is not None and not isinstance(run[key], dict):
            raise bad(f"config.{key}", "an object")


@dataclasses.dataclass
class Image:
    id: str                      # the config digest, as Docker's image ID
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    store: Store
    ref: str = ""                # the reference it was looked up by (or its first tag, or its ID)
    tags: list[str] = dataclasses.field(default_factory=list)
    repo_digests: list[str] = dataclasses.field(default_factory=list)
    size: int = 0                # uncompressed size of all layers, as `docker images` shows
    added: float = 0.0

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
    def blobs(self) -> list[str]:
        return [self.manifest_digest, self.id, *(d["digest"] for d in self.layers)]

    def layer_dirs(self) -> list[Path]:
        """Unpacked layer directories, lowest first (on the store's inert mount)."""
        self.store.seal()
        return [self.store.unpacked_layer(desc, diff)
                for desc, diff in zip(self.layers, self.diff_ids, strict=True)]


class BlobWriter:
    """Streams one blob into ``tmp/``; the store renames it into place once verified."""

    def __init__(self, f: IO[bytes], path: Path) -> None:
        self._f, self.path = f, path
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self._h.update(data)
        self.size += len(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self._h.hexdigest()


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.oci = root / "images"
        self.blobs = self.oci / "blobs" / "sha256"
        self.layers = root / "layers"
        self.tmp = root / "tmp"
        self._db: sqlite3.Connection | None = None
        self._sealed = False

    def init(self) -> None:
        for d in (self.blobs, self.layers, self.tmp):
            fsmode.private_dir(d)
        self.seal()
        layout = self.oci / "oci-layout"
        if not layout.exists():
            self._atomic_write(layout, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())

    def seal(self) -> None:
        """The store on a nosuid, nodev, noexec mount (the whole state root: unpacked layers,
        ``tmp/`` where they are unpacked, and the process-mode writable layers in ``rw/``): a
        setuid binary or a device node from an image or a container is inert on the host
        (:func:`vmrt.safefs.inert_mount`; set up on first use after boot, one statvfs after)."""
        if not self._sealed and self.root.is_dir():
            safefs.inert_mount(self.root)
            self._sealed = True

    # --- metadata ------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            fsmode.private_dir(self.root)
            db = sqlite3.connect(fsmode.touch_private(self.root / "state.db"), timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("""CREATE TABLE IF NOT EXISTS images (
                id TEXT PRIMARY KEY, manifest_digest TEXT NOT NULL, added REAL NOT NULL,
                size INTEGER NOT NULL, repo_digests TEXT NOT NULL DEFAULT '[]',
                extra_blobs TEXT NOT NULL DEFAULT '[]')""")
            db.execute("""CREATE TABLE IF NOT EXISTS tags (
                name TEXT PRIMARY KEY, image_id TEXT NOT NULL REFERENCES images(id))""")
            self._db = db
            self._migrate_index_json()
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _migrate_index_json(self) -> None:
        """Stores made before SQLite metadata kept their tags in images/index.json."""
        old = self.oci / "index.json"
        if not old.exists():
            return
        with contextlib.suppress(OSError, ValueError, KeyError, ImageError, UsageError):
            for m in json.loads(old.read_text()).get("manifests", []):
                name = m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                if name and self.has_blob(m["digest"]):
                    self.commit_image(m["digest"], [name])
        with contextlib.suppress(OSError):
            old.unlink()

    # --- locks ---------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        fsmode.private_dir(self.root)
        with open(self.root / "gc.lock", "a", opener=fsmode.opener) as lk:
            fcntl.flock(lk, mode)
            yield

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held (shared) while blobs are added, so garbage collection waits for them.

        The first writer to find no other holder clears ``tmp/`` of what an
        interrupted pull or load left behind.
        """
        self.init()
        with open(self.root / "gc.lock", "a") as lk:
            try:
                fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while another writer is active
                self._clear_tmp()
            except BlockingIOError:
                pass
            fcntl.flock(lk, fcntl.LOCK_SH)  # converts the exclusive lock, or waits for a collect()
            yield

    def _clear_tmp(self) -> None:
        for p in self.tmp.iterdir() if self.tmp.is_dir() else ():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()

    # --- blobs ---------------------------------------------------------------
    def _atomic_write(self, path: Path, data: bytes) -> None:
        with atomic_file(path) as f:
            f.write(data)

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    @contextlib.contextmanager
    def blob_writer(self, expected: str | None = None, size: int | None = None) -> Iterator[BlobWriter]:
        """Write a blob by streaming; it lands in the store only if its digest (and size) match.

        On any exception, or a mismatch (ImageError), the partial file is removed.
        """
        if expected is not None:
            digest_hex(expected)
        self.init()
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as f:
                w = BlobWriter(f, Path(tmp))
                yield w
                f.flush()
                os.fsync(f.fileno())
            if expected is not None and w.digest != expected:
                raise ImageError(f"digest mismatch: expected {expected}, got {w.digest}")
            if size is not None and w.size != size:
                raise ImageError(f"size mismatch for {w.digest}: expected {size} bytes, got {w.size}")
            os.rename(tmp, self.blob_path(w.digest))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_blob(self, data: bytes, expected: str | None = None) -> str:
        digest = sha256(data)
        if expected is not None and expected != digest:
            raise ImageError(f"digest mismatch: expected {expected}, got {digest}")
        if not self.has_blob(digest):
            with self.blob_writer(digest, len(data)) as w:
                w.write(data)
        return digest

    def put_json(self, obj: dict[str, Any]) -> tuple[str, int]:
        """Store ``obj`` as canonical JSON; returns (digest, size)."""
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        return self.put_blob(data), len(data)

    def read_blob(self, digest: str) -> bytes:
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"blob {digest} missing from the store") from None
        if sha256(data) != digest:
            raise ImageError(f"blob {digest} is corrupt (digest mismatch)")
        return data

    def read_json(self, digest: str) -> dict[str, Any]:
        with contextlib.suppress(OSError):
            if self.blob_path(digest).stat().st_size > MAX_JSON:
                raise ImageError(f"blob {digest} is too large to be a manifest or config")
        try:
            obj = json.loads(self.read_blob(digest))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ImageError(f"blob {digest} is not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ImageError(f"blob {digest} is not a JSON object")
        return obj

    # --- images --------------------------------------------------------------
    def commit_image(self, manifest_digest: str, refs: Iterable[str] = (), *,
                     repo_digests: Iterable[str] = (), extra_blobs: Iterable[str] = ()) -> Image:
        """Make the image whose manifest is stored under ``manifest_digest`` visible.

        Checks that the manifest, its config and every layer are in the store,
        unpacks the layers (verifying each diff id), then records the image and
        moves ``refs`` to it in one transaction. ``extra_blobs`` (e.g. the index a
        manifest was chosen from) are kept as long as the image.
        """
        manifest = self.read_json(manifest_digest)
        mt = manifest.get("mediaType", MT_OCI_MANIFEST)
        if mt not in MANIFEST_TYPES or manifest.get("schemaVersion") != 2:
            raise ImageError(f"manifest {manifest_digest} has unsupported media type {mt!r}")
        try:
            config_digest = manifest["config"]["digest"]
            layers = list(manifest.get("layers") or [])
            if not isinstance(config_digest, str) or not all(
                    isinstance(d, dict) and isinstance(d.get("digest"), str) for d in layers):
                raise TypeError("descriptor digests")
            config = self.read_json(config_digest)
            diff_ids = list(config["rootfs"]["diff_ids"])
        except (KeyError, TypeError) as e:
            raise ImageError(f"manifest {manifest_digest} or its config is malformed: missing {e}") from e
        check_config(config, config_digest)
        if len(diff_ids) != len(layers):
            raise ImageError(f"image {config_digest}: {len(layers)} layers but {len(diff_ids)} diff ids")
        size = 0
        for desc, diff_id in zip(layers, diff_ids, strict=True):
            if desc.get("mediaType", MT_OCI_LAYER_GZIP) not in LAYER_TYPES:
                raise ImageError(f"layer {desc.get('digest')} has unsupported media type {desc.get('mediaType')!r}")
            if not self.has_blob(desc["digest"]):
                raise ImageError(f"layer {desc['digest']} missing from the store")
            self.unpacked_layer(desc, diff_id)
            size += self.layer_size(diff_id)
        parsed = [reference.parse(r) for r in refs]
        if any(p.digest for p in parsed):
            raise UsageError("a digest reference cannot be a tag: "
                             f"{next(str(p) for p in parsed if p.digest)!r}")
        names = [str(p) for p in parsed]
        extra = [d for d in extra_blobs if self.has_blob(d)]
        with self._tx() as db:
            row = db.execute("SELECT repo_digests, extra_blobs FROM images WHERE id=?", (config_digest,)).fetchone()
            old_rd, old_extra = (json.loads(row[0]), json.loads(row[1])) if row else ([], [])
            rd = list(dict.fromkeys([*repo_digests, *old_rd]))
            ex = list(dict.fromkeys([*old_extra, *extra]))
            db.execute("INSERT INTO images (id, manifest_digest, added, size, repo_digests, extra_blobs) "
                       "VALUES (?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET manifest_digest=excluded.manifest_digest,"
                       " repo_digests=excluded.repo_digests, extra_blobs=excluded.extra_blobs",
                       (config_digest, manifest_digest, time.time(), size, json.dumps(rd), json.dumps(ex)))
            for n in names:
                db.execute("INSERT INTO tags (name, image_id) VALUES (?,?) "
                           "ON CONFLICT(name) DO UPDATE SET image_id=excluded.image_id", (n, config_digest))
        return self.get(names[0] if names else config_digest)

    def write_image(self, layers: list[tuple[dict[str, Any], str]], config: dict[str, Any],
                    refs: Iterable[str] = ()) -> Image:
        """Store an OCI config + manifest for stored ``layers`` ((descriptor, diff id) pairs) and commit it.

        ``config`` is the image config without ``rootfs`` (architecture, os, created,
        config, history); used by recipes, ``import`` and archive loads.
        """
        full = {"architecture": "amd64", "os": "linux", **config,
                "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]}}
        config_digest, config_size = self.put_json(full)
        manifest = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                    "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": config_size},
                    "layers": [desc for desc, _ in layers]}
        manifest_digest, _ = self.put_json(manifest)
        return self.commit_image(manifest_digest, refs)

    def _load(self, image_id: str, ref: str) -> Image:
        row = self.db.execute("SELECT manifest_digest, size, repo_digests, added FROM images WHERE id=?",
                              (image_id,)).fetchone()
        if row is None:
            raise ImageError(f"No such image: {ref}")
        manifest = self.read_json(row[0])
        config = self.read_json(image_id)
        tags = [t for (t,) in self.db.execute("SELECT name FROM tags WHERE image_id=? ORDER BY name", (image_id,))]
        return Image(image_id, row[0], manifest, config, self, ref=ref or (tags[0] if tags else image_id),
                     tags=tags, repo_digests=json.loads(row[2]), size=row[1], added=row[3])

    def lookup(self, ref: str) -> str | None:
        """The ID of the image ``ref`` names, as Docker resolves it.

        A ``sha256:`` ID (or ID prefix) first; then a reference (a tag, or a digest
        reference); then an ID prefix, so a tag that happens to look like hex wins
        over an image whose ID starts with the same characters.
        """
        if ref.startswith("sha256:") or (len(ref) == 64 and reference.looks_like_id(ref)):
            return self._by_id_prefix(ref)
        r = reference.parse(ref)
        if r.digest:
            want = f"{r.name}@{r.digest}"
            for image_id, rds in self.db.execute("SELECT id, repo_digests FROM images"):
                if want in json.loads(rds):
                    return str(image_id)
            row = self.db.execute("SELECT id FROM images WHERE manifest_digest=?", (r.digest,)).fetchone()
            return str(row[0]) if row else None
        row = self.db.execute("SELECT image_id FROM tags WHERE name=?", (str(r),)).fetchone()
        if row:
            return str(row[0])
        return self._by_id_prefix(ref) if reference.looks_like_id(ref) else None

    def _by_id_prefix(self, ref: str) -> str | None:
        prefix = ref if ref.startswith("sha256:") else "sha256:" + ref
        if not reference.looks_like_id(ref):
            raise UsageError(f"invalid image ID {ref!r}")
        ids = [i for (i,) in self.db.execute("SELECT id FROM images WHERE substr(id, 1, ?) = ?",
                                             (len(prefix), prefix))]
        if len(ids) > 1:
            raise UsageError(f"ambiguous image ID prefix {ref!r}: matches {len(ids)} images")
        return str(ids[0]) if ids else None

    def is_tag(self, ref: str) -> bool:
        try:
            name = str(reference.parse(ref))
        except UsageError:
            return False
        return self.db.execute("SELECT 1 FROM tags WHERE name=?", (name,)).fetchone() is not None

    def get(self, ref: str) -> Image:
        image_id = self.lookup(ref)
        if image_id is None:
            raise ImageError(f"No such image: {ref}")
        return self._load(image_id, ref if not reference.looks_like_id(ref) or self.is_tag(ref) else "")

    def images(self) -> list[Image]:
        ids = [i for (i,) in self.db.execute("SELECT id FROM images ORDER BY added DESC")]
        return [self._load(i, "") for i in ids]

    def all_tags(self) -> list[tuple[str, str]]:
        """(tag, image id) pairs, sorted by tag."""
        return [(n, i) for n, i in self.db.execute("SELECT name, image_id FROM tags ORDER BY name")]

    def tag(self, ref: str, target: str) -> str:
        """Point ``ref`` at the image ``target`` names (a reference, an ID or a unique ID prefix)."""
        name = reference.parse(ref)
        if name.digest:
            raise UsageError(f"refusing to create a tag with a digest reference: {ref!r}")
        image_id = self.lookup(target)
        if image_id is None:
            raise ImageError(f"No such image: {target}")
        with self._tx() as db:
            db.execute("INSERT INTO tags (name, image_id) VALUES (?,?) "
                       "ON CONFLICT(name) DO UPDATE SET image_id=excluded.image_id", (str(name), image_id))
        return image_id

    def forget_repo_digests(self, image_id: str, repository: str) -> list[str]:
        """Drop ``image_id``'s digest references of ``repository`` (Docker does once the
        repository's last tag of the image is removed); the ones dropped."""
        with self._tx() as db:
            row = db.execute("SELECT repo_digests FROM images WHERE id=?", (image_id,)).fetchone()
            if row is None:
                return []
            rds = json.loads(row[0])
            gone = [rd for rd in rds if reference.parse(rd).name == repository]
            if gone:
                db.execute("UPDATE images SET repo_digests=? WHERE id=?",
                           (json.dumps([rd for rd in rds if rd not in gone]), image_id))
        return gone

    def untag(self, ref: str) -> bool:
        name = str(reference.parse(ref))
        with self._tx() as db:
            return db.execute("DELETE FROM tags WHERE name=?", (name,)).rowcount > 0

    def users(self, image_id: str) -> list[tuple[str, str]]:
        """(container id, status) of every container made from ``image_id``.

        Containers recorded before images had IDs in the state carry only the
        reference they were run with; those match by reference.
        """
        try:
            rows = list(self.db.execute("SELECT id, status, image, image_id FROM containers "
                                        "WHERE image_id=? OR image_id=''", (image_id,)))
        except sqlite3.OperationalError:  # no containers table (yet)
            return []
        tags = {t for (t,) in self.db.execute("SELECT name FROM tags WHERE image_id=?", (image_id,))}
        out = []
        for cid, status, image, iid in rows:
            if iid == image_id:
                out.append((cid, status))
                continue
            with contextlib.suppress(UsageError):
                if str(reference.parse(image)) in tags or image_id.endswith(image.removeprefix("sha256:")):
                    out.append((cid, status))
        return out

    def delete_if_unused(self, image_id: str) -> bool:
        """Forget an image and its tags unless a container uses it; its blobs go at the next :meth:`collect`.

        Runs under the exclusive GC lock: ``vmrt run`` holds it shared from finding
        an image to recording its container, so no container can start on an image
        between this check and the delete.
        """
        self.db  # opened (and an old store migrated) before taking the lock  # noqa: B018
        with self._flock(fcntl.LOCK_EX), self._tx() as db:
            if self.users(image_id):
                return False
            db.execute("DELETE FROM tags WHERE image_id=?", (image_id,))
            db.execute("DELETE FROM images WHERE id=?", (image_id,))
        return True

    def collect(self) -> int:
        """Remove blobs and unpacked layers no image refers to; returns bytes freed.

        Waits for writers (pulls, loads) to finish, since their blobs belong to no
        image yet.
        """
        self.init()
        self.db  # opened (and an old store migrated) before taking the lock  # noqa: B018
        freed = 0
        with self._flock(fcntl.LOCK_EX):
            keep_blobs: set[str] = set()
            keep_layers: set[str] = set()
            for image_id, mdigest, extra in self.db.execute("SELECT id, manifest_digest, extra_blobs FROM images"):
                keep_blobs.update([image_id, mdigest, *json.loads(extra)])
                try:
                    keep_blobs.update(d["digest"] for d in self.read_json(mdigest).get("layers", []))
                    keep_layers.update(self.read_json(image_id).get("rootfs", {}).get("diff_ids", []))
                except ImageError as e:  # cannot tell what it needs: remove nothing
                    raise ImageError(f"not collecting unused blobs: image {image_id} is unreadable ({e})") from e
            keep_hex = {d.partition(":")[2] for d in keep_blobs}
            for p in self.blobs.iterdir():
                if p.name not in keep_hex:
                    freed += p.stat().st_size
                    p.unlink()
            keep_layer_hex = {d.partition(":")[2] for d in keep_layers}
            for p in self.layers.iterdir():
                if p.name not in keep_layer_hex:
                    freed += self._layer_size_of(p)
                    unpack.remove_tree(p)
            self._clear_tmp()
        return freed

    # --- layers --------------------------------------------------------------
    def layer_size(self, diff_id: str) -> int:
        return self._layer_size_of(self.layers / digest_hex(diff_id))

    @staticmethod
    def _layer_size_of(d: Path) -> int:
        try:
            return int((d / ".vmrt-complete").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # unpacked by an older vmrt: count the files
            sizes = (e.lstat() for e in (d / "rootfs").rglob("*"))  # never stat a link's target
            return sum(st.st_size for st in sizes if stat.S_ISREG(st.st_mode))

    def has_layer(self, diff_id: str) -> bool:
        return (self.layers / digest_hex(diff_id) / ".vmrt-complete").exists()

    def unpacked_layer(self, desc: dict[str, Any], diff_id: str, stream: IO[bytes] | None = None) -> Path:
        """The directory holding layer ``diff_id`` unpacked; unpacks it first if needed.

        The layer is read from its stored blob, or from ``stream`` (the compressed
        blob as it arrives: a pull unpacks while it downloads; the stream is read
        to its end). The unpacked tree lands in ``layers/`` only if its
        uncompressed content hashes to ``diff_id``, the digest the (verified)
        image config names.
        """
        dest = self.layers / digest_hex(diff_id)
        if (dest / ".vmrt-complete").exists():
            if stream is not None:
                while stream.read(1 << 20):
                    pass
            return dest / "rootfs"
        self.init()
        tmp = Path(tempfile.mkdtemp(dir=self.tmp, prefix="layer-"))
        try:
            hasher = hashlib.sha256()
            with contextlib.ExitStack() as stack:
                raw = stream if stream is not None else stack.enter_context(open(self.blob_path(desc["digest"]), "rb"))
                hashing = _HashingReader(decompressed(raw), hasher)
                (tmp / "rootfs").mkdir()
                unpack.extract(hashing, tmp / "rootfs")  # type: ignore[arg-type]
                hashing.drain()
                if stream is not None:
                    while stream.read(1 << 20):  # the compressed stream may have trailing bytes
                        pass
            if "sha256:" + hasher.hexdigest() != diff_id:
                raise ImageError(f"layer {desc['digest']} does not match its diff id {diff_id}")
            (tmp / ".vmrt-complete").write_text(f"{diff_id} {hashing.count}\n")
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / ".vmrt-complete").exists():
                    raise
        except FileNotFoundError as e:
            raise ImageError(f"layer {desc['digest']} missing from the store") from e
        except Exception as e:  # gzip/zstd/tar errors of a bad blob
            if isinstance(e, ImageError | OSError | EOFError | ValueError) or "Zstd" in type(e).__name__:
                raise ImageError(f"cannot unpack layer {desc['digest']}: {e}") from e
            raise
        finally:
            if tmp.exists():
                unpack.remove_tree(tmp)
        return dest / "rootfs"


class _HashingReader:
    def __init__(self, f: Any, h: Any) -> None:
        self._f, self._h = f, h
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = bytes(self._f.read(n))
        self._h.update(b)
        self.count += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass
