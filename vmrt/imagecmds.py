"""What the image verbs do: pull, push, images, rmi, tag, image inspect/prune/build, load, save,
import, login, logout.

The CLI (:mod:`vmrt.cli.images`) has them both at the top level (``vmrt pull``) and under
``vmrt image`` (``vmrt image pull``), as Docker has them, and prints what these return.
Output follows Docker's wording so scripts written for it keep working.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from . import formatting
from .config import Config
from .errors import ImageError, UsageError, VmrtError
from .images import mirrors, reference
from .images.store import Image, Store

IMAGE_COLUMNS = [("REPOSITORY", "Repository", 0), ("TAG", "Tag", 0), ("IMAGE ID", "ID", 0),
                 ("CREATED", "CreatedSince", 0), ("SIZE", "Size", 0)]


def short_id(image_id: str) -> str:
    return image_id.partition(":")[2][:12]


def created_at(img: Image) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(str(img.config.get("created") or ""))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def ago(when: dt.datetime | None) -> str:
    return "N/A" if when is None else formatting.ago((dt.datetime.now(dt.UTC) - when).total_seconds())


def summary(img: Image) -> dict[str, Any]:
    """An image as Docker's API lists it (``GET /images/json``; ``system df``'s images too)."""
    when = created_at(img)
    return {"Id": img.id, "ParentId": "", "RepoTags": [reference.parse(t).familiar() for t in img.tags],
            "RepoDigests": [reference.parse(d).familiar() for d in img.repo_digests],
            "Created": int(when.timestamp()) if when else 0, "Size": img.size, "SharedSize": -1,
            "VirtualSize": img.size, "Labels": (img.runtime_config.get("Labels") or {}), "Containers": -1}


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}TB"


# --- pull / login / logout --------------------------------------------------------
def pull(cfg: Config, ref: str, *, platform: str | None, insecure: tuple[str, ...], quiet: bool,
         creds: tuple[str, str] | None = None, identity_token: str = "", cancel: threading.Event | None = None,
         progress: Callable[[dict[str, Any]], None] | None = None) -> str:
    """``vmrt pull``: the line to print once the image is here (its reference, or its ID).
    ``creds``/``identity_token``: this pull's credentials instead of the stored ones (the API's
    ``X-Registry-Auth``); ``cancel``: set to stop the pull; ``progress``: Docker's JSON progress
    messages go to it (the API's stream) instead of the output."""
    from .images import registry  # on use: requests and urllib3 cost over 100 ms at start-up
    img = registry.pull(Store(cfg.root), ref, platform=platform or cfg.platform,
                        insecure_registries=cfg.insecure(insecure), quiet=quiet, auth_file=cfg.auth_file,
                        creds=creds, identity_token=identity_token, cancel=cancel, mirrors=mirrors.from_config(cfg),
                        progress=registry.JsonProgress(progress) if progress is not None else None)
    parsed = reference.parse(ref)
    return str(parsed) if parsed.tag or parsed.digest else img.id


def push(cfg: Config, ref: str, *, insecure: tuple[str, ...], quiet: bool, creds: tuple[str, str] | None = None,
         identity_token: str = "", cancel: threading.Event | None = None,
         progress: Callable[[dict[str, Any]], None] | None = None) -> str:
    """``vmrt push``: Docker's lines on stdout; returns what is left to print (with ``quiet``, the
    reference pushed, as ``docker push -q``; else nothing). ``creds``/``identity_token``: this
    push's credentials instead of the stored ones (the API's ``X-Registry-Auth``); ``progress``:
    Docker's JSON progress messages go to it (the API's stream) instead of the output. Blobs
    larger than the ``push_chunk_size`` setting (default 16 MiB) go in chunks of that size."""
    from .images import push as pusher  # on use: requests and urllib3 cost over 100 ms at start-up
    store = Store(cfg.root)
    try:
        digest, _ = pusher.push(store, ref, insecure_registries=cfg.insecure(insecure), quiet=quiet,
                                auth_file=cfg.auth_file, out=sys.stdout, creds=creds, identity_token=identity_token,
                                chunk_size=cfg.push_chunk_size, cancel=cancel, emit=progress)
    finally:
        store.close()
    return reference.parse(ref).familiar() if quiet else ""


def login(cfg: Config, server: str, *, username: str | None, password: str | None, password_stdin: bool,
          insecure: tuple[str, ...], ask: Callable[[str, bool], str]) -> str:
    """``vmrt login``: what is missing is read from stdin (``--password-stdin``) or asked on
    the terminal (``ask(prompt, hide_input)``); the line to print."""
    from .images import registry  # on use: requests and urllib3 cost over 100 ms at start-up
    if password_stdin:
        if password:
            raise UsageError("--password and --password-stdin are mutually exclusive")
        password = sys.stdin.readline().rstrip("\r\n")
    if not username:
        if not sys.stdin.isatty():
            raise UsageError("login: -u USERNAME is required when stdin is not a terminal")
        username = ask("Username", False)
    if not password:
        if not sys.stdin.isatty():
            raise UsageError("login: a password is required (-p or --password-stdin)")
        password = ask("Password", True)
    registry.login(server, username, password, insecure_registries=cfg.insecure(insecure), auth_file=cfg.auth_file)
    return "Login Succeeded"


def check_login(cfg: Config, server: str, username: str, password: str) -> None:
    """The API's ``docker login``: the registry takes these credentials (else ImageError);
    nothing is stored (the client keeps its own)."""
    from .images import registry  # on use: requests and urllib3 cost over 100 ms at start-up
    registry.check_login(server, username, password, insecure_registries=cfg.insecure(()))


def logout(cfg: Config, server: str) -> str:
    """``vmrt logout``: the line to print."""
    from .images import registry  # on use: requests and urllib3 cost over 100 ms at start-up
    if registry.logout(server, auth_file=cfg.auth_file):
        return f"Removing login credentials for {server}"
    raise UsageError(f"Not logged in to {server}")


# --- listing and inspecting ----------------------------------------------------------
def image_rows(store: Store, filter_ref: str | None = None) -> list[dict[str, Any]]:
    rows = []
    want = _repo_filter(filter_ref)
    for img in store.images():
        when = created_at(img)
        base = {"ID": short_id(img.id), "Digest": (img.repo_digests[0].partition("@")[2] if img.repo_digests
                                                    else "<none>"),
                "CreatedAt": when.strftime("%Y-%m-%d %H:%M:%S %z") if when else "N/A", "CreatedSince": ago(when),
                "Size": human_size(img.size), "VirtualSize": human_size(img.size)}
        names = [reference.parse(t) for t in img.tags]
        if not names:
            if want:
                continue
            rows.append({"Repository": "<none>", "Tag": "<none>", **base})
        for r in names:
            if want and not want(r):
                continue
            rows.append({"Repository": r.familiar_name, "Tag": r.tag or "<none>", **base})
    return rows


def _repo_filter(ref: str | None):  # type: ignore[no-untyped-def]
    if not ref:
        return None
    has_tag = ":" in ref.rpartition("/")[2]
    r = reference.parse(ref)
    return lambda t: t.name == r.name and (not has_tag or t.tag == r.tag)


def images(cfg: Config, repository: str | None, *, quiet: bool, no_trunc: bool, fmt: str | None) -> list[str]:
    """``vmrt images``' lines."""
    store = Store(cfg.root)
    rows = image_rows(store, repository)
    if no_trunc:
        full = {short_id(i.id): i.id for i in store.images()}
        for r in rows:
            r["ID"] = full[r["ID"]]
    if quiet:
        return list(dict.fromkeys(r["ID"] for r in rows))
    return formatting.emit(fmt, rows, IMAGE_COLUMNS)


def inspect_doc(img: Image) -> dict[str, Any]:
    """``docker image inspect``'s shape for one image."""
    cfg = img.config
    return {
        "Id": img.id,
        "RepoTags": [reference.parse(t).familiar() for t in img.tags],
        "RepoDigests": [reference.parse(d).familiar() for d in img.repo_digests],
        "Parent": "",
        "Comment": next((h.get("comment", "") for h in reversed(cfg.get("history") or []) if h.get("comment")), ""),
        "Created": cfg.get("created", ""),
        "Author": cfg.get("author", ""),
        "Config": cfg.get("config") or {},
        "Architecture": cfg.get("architecture", ""),
        "Variant": cfg.get("variant", ""),
        "Os": cfg.get("os", ""),
        "Size": img.size,
        "VirtualSize": img.size,
        "RootFS": {"Type": "layers", "Layers": img.diff_ids},
        "Metadata": {"LastTagTime": dt.datetime.fromtimestamp(img.added, dt.UTC).isoformat()},
        "Manifest": {"Digest": img.manifest_digest, "MediaType": img.manifest.get("mediaType", ""),
                     "Layers": [{"Digest": d["digest"], "MediaType": d.get("mediaType", ""), "Size": d.get("size", 0)}
                                for d in img.layers]},
    }


def inspect(cfg: Config, refs: tuple[str, ...], *, fmt: str | None) -> Iterator[str]:
    """``vmrt image inspect``'s lines (every ref is looked up before the first is shown)."""
    store = Store(cfg.root)
    docs = [inspect_doc(store.get(r)) for r in refs]
    yield from formatting.documents(fmt, docs)


# --- tagging and removal ---------------------------------------------------------------
def tag(cfg: Config, source: str, target: str) -> None:
    """``vmrt tag``."""
    Store(cfg.root).tag(target, source)


def _remove_one(store: Store, ref: str, force: bool) -> tuple[list[str], str | None]:
    """Untag/delete what ``ref`` names; returns (output lines, deleted image ID)."""
    image_id = store.lookup(ref)
    if image_id is None:
        raise ImageError(f"No such image: {ref}")
    img = store.get(image_id)
    users = store.users(image_id)
    if not reference.looks_like_id(ref) or store.is_tag(ref):
        untag = [str(reference.parse(ref))]
        if untag[0] not in img.tags:  # named by digest: as Docker, that removes the image
            untag = list(img.tags)
    else:
        untag = list(img.tags)
        if len(untag) > 1 and not force:
            raise ImageError(f"conflict: unable to delete {short_id(image_id)} (must be forced) - image is "
                             "referenced in multiple repositories")
    last = set(untag) >= set(img.tags)
    if last and users and not force:
        cid, status = users[0]
        what = "running container" if status == "running" else "container"
        raise ImageError(f"conflict: unable to remove repository reference \"{ref}\" (must force) - "
                         f"{what} {cid[:12]} is using its referenced image {short_id(image_id)}")
    out = []
    for t in untag:
        store.untag(t)
        out.append(f"Untagged: {reference.parse(t).familiar()}")
    # a container made from it keeps it (untagged) until the container goes; checked again under the lock
    if not last or users or not store.delete_if_unused(image_id):
        left = {reference.parse(t).name for t in img.tags if t not in untag}
        for repo in dict.fromkeys(reference.parse(t).name for t in untag):
            if repo not in left:  # its repository's last tag of the image: its digests go too (Docker)
                out += [f"Untagged: {reference.parse(rd).familiar()}"
                        for rd in store.forget_repo_digests(image_id, repo)]
        return out, None
    out += [f"Untagged: {reference.parse(rd).familiar()}" for rd in img.repo_digests]
    return [*out, f"Deleted: {image_id}"], image_id


def remove_images(store: Store, refs: tuple[str, ...] | list[str], force: bool) -> Iterator[str | VmrtError]:
    """``docker rmi``: untag, and delete images that lose their last tag and have no container.
    Yields the lines to print; a ref that fails does not stop the others: the failures come
    last, all but the last one yielded, the last one raised."""
    deleted: list[str] = []
    errors: list[str] = []
    for ref in refs:
        try:
            lines, gone = _remove_one(store, ref, force)
        except (ImageError, UsageError) as e:
            errors.append(str(e))
            continue
        yield from lines
        if gone:
            deleted.append(gone)
    if deleted:
        store.collect()
    if errors:
        yield from (ImageError(msg) for msg in errors[:-1])
        raise ImageError(errors[-1])


def rmi(cfg: Config, refs: tuple[str, ...], *, force: bool) -> Iterator[str | VmrtError]:
    """``vmrt rmi``: as :func:`remove_images`."""
    return remove_images(Store(cfg.root), refs, force)


def prune(cfg: Config, *, prune_all: bool) -> list[str]:
    """``vmrt image prune`` (confirmed): remove untagged images (``prune_all``: every image no
    container uses); the report's lines."""
    store = Store(cfg.root)
    deleted = []
    for img in store.images():
        if (img.tags and not prune_all) or not store.delete_if_unused(img.id):
            continue
        deleted.append(img)
    freed = store.collect()
    lines = []
    if deleted:
        lines.append("Deleted Images:")
        for img in deleted:
            lines += [f"untagged: {reference.parse(t).familiar()}" for t in img.tags]
            lines.append(f"deleted: {img.id}")
        lines.append("")
    return [*lines, f"Total reclaimed space: {human_size(freed)}"]


# --- archives, builds ------------------------------------------------------------------------
def load(cfg: Config, source: Path | BinaryIO | None, *, quiet: bool) -> list[str]:
    """``vmrt load``: images from a tar archive (``source``: a file, an open one, or stdin); the
    lines to print."""
    if source is None and sys.stdin.isatty():
        raise UsageError("requested load from stdin, but stdin is empty (use -i FILE)")
    if isinstance(source, Path) and not source.exists():
        raise UsageError(f"open {source}: no such file or directory")
    from .images import archive  # on use: not on `vmrt run`'s path
    loaded = archive.load(Store(cfg.root), source if source is not None else sys.stdin.buffer)
    if quiet:
        return []
    return [f"Loaded image{' ID' if r.startswith('sha256:') else ''}: {r}" for r in loaded]


def save(cfg: Config, refs: tuple[str, ...], output: Path | None) -> None:
    """``vmrt save``: the images as a tar archive to ``output`` or stdout (never a terminal)."""
    from .images import archive  # on use: not on `vmrt run`'s path
    if output is None and sys.stdout.isatty():
        raise UsageError("cowardly refusing to save to a terminal. Use the -o flag or redirect")
    archive.save(Store(cfg.root), list(refs), output if output is not None else sys.stdout.buffer)


def import_image(cfg: Config, source: str, ref: str | None, *, changes: tuple[str, ...], message: str) -> str:
    """``vmrt import``: an image from a root file system tarball (a file, or - for stdin); its ID."""
    from .images import archive  # on use: not on `vmrt run`'s path
    if source != "-" and not Path(source).is_file():
        raise UsageError(f"open {source}: no such file or directory")
    img = archive.import_tarball(Store(cfg.root), sys.stdin.buffer if source == "-" else Path(source), ref,
                                 changes=list(changes), message=message)
    return img.id


def build(cfg: Config, recipe: Path) -> str:
    """``vmrt image build``: an image from a recipe directory (see images/); its reference."""
    from .images import recipe as recipe_mod  # on use: not on `vmrt run`'s path
    return recipe_mod.build(recipe, Store(cfg.root), cfg.cache)
