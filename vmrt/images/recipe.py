"""Build an OCI image from a recipe (``images/<name>/recipe.toml``).

A recipe names host files to copy, directories and files to create, and an
``[applets]`` table that turns every applet of a busybox binary into a
symlink. The result is one deterministic gzip layer (fixed mtimes, sorted
entries, numeric owners), an OCI config and manifest, stored as
content-addressed blobs and tagged ``name:tag``.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import tarfile
import tomllib
from pathlib import Path
from typing import Any

from ..errors import ImageError
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


def build(recipe_dir: Path, store: st.Store) -> str:
    """Build the recipe in ``recipe_dir``; returns the image reference."""
    path = recipe_dir / "recipe.toml" if recipe_dir.is_dir() else recipe_dir
    try:
        recipe = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ImageError(f"no recipe at {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ImageError(f"recipe {path}: {e}") from e
    tar = build_layer(recipe, path.parent)
    gz = gzip.compress(tar, compresslevel=6, mtime=EPOCH)
    ref = f"{recipe['name']}:{recipe.get('tag', 'latest')}"
    with store.writing():
        layer_digest = store.put_blob(gz)
        store.write_image(
            [({"mediaType": st.MT_OCI_LAYER_GZIP, "digest": layer_digest, "size": len(gz)}, st.sha256(tar))],
            {"created": "1970-01-01T00:00:00Z", "config": dict(recipe.get("config", {})),
             "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"vmrt recipe {path.parent.name}"}]},
            [ref])
    return ref
