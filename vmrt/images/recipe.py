"""Build an OCI image from a recipe (``images/<name>/recipe.toml``).

A recipe names host files to copy, directories and files to create, and an
``[applets]`` table that turns every applet of a busybox binary into a
symlink. The result is one deterministic gzip layer (fixed mtimes, sorted
entries, numeric owners), an OCI config and manifest, stored as
content-addressed blobs and tagged ``name:tag``.

A recipe with an ``[mmdebstrap]`` table (suite, variant, include, components, hooks,
source_date_epoch) starts from a Debian root file system that mmdebstrap builds from the
host's apt sources, cached under ``<cache>/images/`` (images/bootstrap.py); the other tables, if
any, become a second layer on top of it.
"""

from __future__ import annotations

import datetime
import gzip
import io
import subprocess
import tarfile
import tomllib
from pathlib import Path
from typing import Any

from ..errors import ImageError
from . import archive, bootstrap
from . import store as st

EPOCH = 0  # deterministic layers: every entry gets this mtime


def _parent_dirs(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def build_layer(recipe: dict[str, Any], base: Path) -> bytes:
    entries: dict[str, tarfile.TarInfo] = {}
    data: dict[str, bytes] = {}

    def add_dir(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        name = path.strip("/")
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = tarfile.DIRTYPE, mode, uid, gid, EPOCH
        entries[name] = ti

    def ensure_parents(path: str) -> None:
        for d in _parent_dirs(path):
            if d not in entries:
                add_dir(d)

    for path, spec in recipe.get("dirs", {}).items():
        if isinstance(spec, dict):
            add_dir(path, int(spec.get("mode", 0o755)), int(spec.get("uid", 0)), int(spec.get("gid", 0)))
        else:
            add_dir(path, int(spec))
    for c in recipe.get("copy", []):
        src = Path(c["src"])
        if not src.is_absolute():
            src = base / src
        try:
            content = src.read_bytes()
        except OSError as e:
            raise ImageError(f"recipe: cannot read {src}: {e.strerror}") from e
        name = c["dst"].strip("/")
        ensure_parents(name)
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(content), int(c.get("mode", 0o644)), EPOCH
        entries[name], data[name] = ti, content
    for path, spec in recipe.get("files", {}).items():
        content = spec.get("content", "").lstrip("\n").encode()
        name = path.strip("/")
        ensure_parents(name)
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(content), int(spec.get("mode", 0o644)), EPOCH
        entries[name], data[name] = ti, content
    if "applets" in recipe:
        binary = recipe["applets"]["binary"]
        target_dir = recipe["applets"].get("dir", "/bin").strip("/")
        try:
            out = subprocess.run([binary, "--list"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise ImageError(f"recipe: cannot list applets of {binary}: {e}") from e
        link_target = "/" + next(c["dst"].strip("/") for c in recipe.get("copy", [])
                                 if Path(c["src"]).name == Path(binary).name)
        for applet in sorted(set(out.split())):
            name = f"{target_dir}/{applet}"
            if name in entries or "/" in applet:
                continue
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, link_target, 0o777, EPOCH
            entries[name] = ti
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(entries):
            ti = entries[name]
            ti.uname = ti.gname = ""
            tf.addfile(ti, io.BytesIO(data[name]) if name in data else None)
    return buf.getvalue()


FILE_TABLES = ("dirs", "copy", "files", "applets")


def _iso(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build(recipe_dir: Path, store: st.Store, cache: Path | None = None) -> str:
    """Build the recipe in ``recipe_dir``; returns the image reference. ``cache`` (the config's) holds
    the root file systems of ``[mmdebstrap]`` recipes."""
    path = recipe_dir / "recipe.toml" if recipe_dir.is_dir() else recipe_dir
    try:
        recipe = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ImageError(f"no recipe at {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ImageError(f"recipe {path}: {e}") from e
    section = bootstrap.parse_section(recipe["mmdebstrap"], str(path)) if "mmdebstrap" in recipe else None
    if not isinstance(recipe.get("name"), str):
        raise ImageError(f"recipe {path}: needs name = \"...\"")
    ref = f"{recipe['name']}:{recipe.get('tag', 'latest')}"
    created, history = "1970-01-01T00:00:00Z", []
    layers: list[tuple[dict[str, Any], str]] = []
    tarball: Path | None = None
    if section is not None:
        if cache is None:  # a caller that builds only file recipes
            raise ImageError(f"recipe {path}: [mmdebstrap] needs a cache directory")
        # built (or found in the cache) before the store's writer lock: mmdebstrap takes minutes
        tarball, record = bootstrap.rootfs(cache, section)
        if record.get("source_date_epoch") is not None:
            created = _iso(record["source_date_epoch"])
        history.append({"created": created, "created_by": " ".join(["mmdebstrap", *section.argv(), section.suite])})
    with store.writing():
        if tarball is not None:
            with open(tarball, "rb") as f:  # untrusted as any rootfs tarball: the store checks it on unpack
                layers.append(archive.import_layer(store, f))
        if section is None or any(t in recipe for t in FILE_TABLES):
            tar = build_layer(recipe, path.parent)
            gz = gzip.compress(tar, compresslevel=6, mtime=EPOCH)
            layers.append(({"mediaType": st.MT_OCI_LAYER_GZIP, "digest": store.put_blob(gz), "size": len(gz)},
                           st.sha256(tar)))
            history.append({"created": created, "created_by": f"vmrt recipe {path.parent.name}"})
        store.write_image(layers, {"created": created, "config": dict(recipe.get("config", {})),
                                   "history": history}, [ref])
    return ref
