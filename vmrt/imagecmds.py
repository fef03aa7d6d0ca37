"""Image commands: pull, images, rmi, tag, image inspect/prune, load, save, import, login, logout.

Registered on the main group by :mod:`vmrt.cli`, both at the top level (``vmrt
pull``) and under ``vmrt image`` (``vmrt image pull``), as Docker has them.
Output follows Docker's wording so scripts written for it keep working.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import click

from . import formatting
from .config import Config
from .errors import ImageError, UsageError
from .images import reference
from .images.store import Image, Store

IMAGE_COLUMNS = [("REPOSITORY", "Repository", 0), ("TAG", "Tag", 0), ("IMAGE ID", "ID", 0),
                 ("CREATED", "CreatedSince", 0), ("SIZE", "Size", 0)]


def _cfg(ctx: click.Context) -> Config:
    return ctx.obj["cfg"]


def _store(ctx: click.Context) -> Store:
    return Store(_cfg(ctx).root)


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


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}TB"


# --- pull / login / logout --------------------------------------------------------
@click.command()
@click.argument("ref")
@click.option("--platform", help="Pick this os/arch[/variant] from a multi-platform image (default linux/amd64).")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Talk plain HTTP to this registry (repeatable; also config insecure_registries).")
@click.option("-q", "--quiet", is_flag=True, help="Suppress verbose output; print the image reference.")
@click.pass_context
def pull(ctx: click.Context, ref: str, platform: str | None, insecure: tuple[str, ...], quiet: bool) -> None:
    """Download an image from a registry."""
    from .images import registry  # on use: requests and urllib3 cost over 100 ms at start-up
    cfg = _cfg(ctx)
    img = registry.pull(_store(ctx), ref, platform=platform or cfg.platform, insecure_registries=cfg.insecure(insecure),
                        quiet=quiet, auth_file=cfg.auth_file)
    parsed = reference.parse(ref)
    click.echo(str(parsed) if parsed.tag or parsed.digest else img.id)


@click.command()
@click.argument("server")
@click.option("-u", "--username")
@click.option("-p", "--password")
@click.option("--password-stdin", is_flag=True, help="Take the password from stdin.")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]")
@click.pass_context
def login(ctx: click.Context, server: str, username: str | None, password: str | None, password_stdin: bool,
          insecure: tuple[str, ...]) -> None:
    """Log in to a registry (credentials stored with mode 0600)."""
    from .images import registry  # on use: requests and urllib3 cost over 100 ms at start-up
    cfg = _cfg(ctx)
    if password_stdin:
        if password:
            raise UsageError("--password and --password-stdin are mutually exclusive")
        password = sys.stdin.readline().rstrip("\r\n")
    if not username:
        if not sys.stdin.isatty():
            raise UsageError("login: -u USERNAME is required when stdin is not a terminal")
        username = click.prompt("Username")
    if not password:
        if not sys.stdin.isatty():
            raise UsageError("login: a password is required (-p or --password-stdin)")
        password = click.prompt("Password", hide_input=True)
    registry.login(server, username, password, insecure_registries=cfg.insecure(insecure), auth_file=cfg.auth_file)
    click.echo("Login Succeeded")


@click.command()
@click.argument("server")
@click.pass_context
def logout(ctx: click.Context, server: str) -> None:
    """Forget the credentials stored for a registry."""
    from .images import registry  # on use: requests and urllib3 cost over 100 ms at start-up
    if registry.logout(server, auth_file=_cfg(ctx).auth_file):
        click.echo(f"Removing login credentials for {server}")
    else:
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


@click.command("images")
@click.argument("repository", required=False)
@click.option("-a", "--all", "show_all", is_flag=True, help="Accepted for Docker compatibility: vmrt has no "
              "intermediate images, so every image is always shown.")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@click.option("--no-trunc", is_flag=True, help="Show full image IDs.")
@click.option("--format", "fmt", help="table, json, or a Go-template-like string such as '{{.Repository}}:{{.Tag}}'.")
@click.pass_context
def images(ctx: click.Context, repository: str | None, show_all: bool, quiet: bool, no_trunc: bool,
           fmt: str | None) -> None:
    """List images: REPOSITORY TAG IMAGE ID CREATED SIZE."""
    store = _store(ctx)
    rows = image_rows(store, repository)
    if no_trunc:
        full = {short_id(i.id): i.id for i in store.images()}
        for r in rows:
            r["ID"] = full[r["ID"]]
    if quiet:
        for i in dict.fromkeys(r["ID"] for r in rows):
            click.echo(i)
        return
    for line in formatting.emit(fmt, rows, IMAGE_COLUMNS):
        click.echo(line)


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


@click.command("inspect")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", help="Go-template-like format, e.g. '{{.Id}}' or '{{json .Config}}'.")
@click.pass_context
def image_inspect(ctx: click.Context, refs: tuple[str, ...], fmt: str | None) -> None:
    """Show an image's details as JSON (Docker's shape)."""
    store = _store(ctx)
    docs = [inspect_doc(store.get(r)) for r in refs]
    if fmt and fmt != "json":
        for d in docs:
            click.echo(formatting.render(fmt, d))
    else:
        click.echo(json.dumps(docs, indent=4))


# --- tagging and removal ---------------------------------------------------------------
@click.command()
@click.argument("source")
@click.argument("target")
@click.pass_context
def tag(ctx: click.Context, source: str, target: str) -> None:
    """Create a tag TARGET that refers to SOURCE."""
    _store(ctx).tag(target, source)


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
        return out, None
    out += [f"Untagged: {reference.parse(rd).familiar()}" for rd in img.repo_digests]
    return [*out, f"Deleted: {image_id}"], image_id


def remove_images(store: Store, refs: tuple[str, ...] | list[str], force: bool) -> list[str]:
    """``docker rmi``: untag, and delete images that lose their last tag and have no container."""
    deleted: list[str] = []
    errors: list[str] = []
    for ref in refs:
        try:
            lines, gone = _remove_one(store, ref, force)
        except (ImageError, UsageError) as e:
            errors.append(str(e))
            continue
        for line in lines:
            click.echo(line)
        if gone:
            deleted.append(gone)
    if deleted:
        store.collect()
    if errors:
        for msg in errors[:-1]:
            click.echo(f"vmrt: {formatting.inert(msg)}", err=True)
        raise ImageError(errors[-1])
    return deleted


@click.command("rmi")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove even if referenced by several tags or by containers "
              "(an image a container still uses stays, untagged, until the container is removed).")
@click.pass_context
def rmi(ctx: click.Context, refs: tuple[str, ...], force: bool) -> None:
    """Remove one or more images."""
    remove_images(_store(ctx), refs, force)


@click.command("prune")
@click.option("-a", "--all", "prune_all", is_flag=True, help="Remove all images no container uses, not just "
              "untagged ones.")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.pass_context
def image_prune(ctx: click.Context, prune_all: bool, force: bool) -> None:
    """Remove unused images (untagged ones; with -a, every image no container uses)."""
    if not force and sys.stdin.isatty():
        what = "all images without at least one container associated to them" if prune_all else "all dangling images"
        if not click.confirm(f"WARNING! This will remove {what}.\nAre you sure you want to continue?"):
            return
    store = _store(ctx)
    deleted = []
    for img in store.images():
        if (img.tags and not prune_all) or not store.delete_if_unused(img.id):
            continue
        deleted.append(img)
    freed = store.collect()
    if deleted:
        click.echo("Deleted Images:")
        for img in deleted:
            for t in img.tags:
                click.echo(f"untagged: {reference.parse(t).familiar()}")
            click.echo(f"deleted: {img.id}")
        click.echo()
    click.echo(f"Total reclaimed space: {human_size(freed)}")


# --- archives ------------------------------------------------------------------------------
@click.command("load")
@click.option("-i", "--input", "source", type=click.Path(dir_okay=False, path_type=Path),
              help="Read from a tar archive file (docker-archive or OCI layout, maybe compressed), not stdin.")
@click.option("-q", "--quiet", is_flag=True, help="Suppress the load output.")
@click.pass_context
def load(ctx: click.Context, source: Path | None, quiet: bool) -> None:
    """Load images from a tar archive (docker save / podman save / skopeo output)."""
    if source is None and sys.stdin.isatty():
        raise UsageError("requested load from stdin, but stdin is empty (use -i FILE)")
    if source is not None and not source.exists():
        raise UsageError(f"open {source}: no such file or directory")
    from .images import archive  # on use: not on `vmrt run`'s path
    loaded = archive.load(_store(ctx), source if source is not None else sys.stdin.buffer)
    if not quiet:
        for r in loaded:
            click.echo(f"Loaded image{' ID' if r.startswith('sha256:') else ''}: {r}")


@click.command("save")
@click.argument("refs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to a file instead of stdout.")
@click.pass_context
def save(ctx: click.Context, refs: tuple[str, ...], output: Path | None) -> None:
    """Save images to a tar archive (both a docker-archive and an OCI layout, as Docker 25+)."""
    from .images import archive  # on use: not on `vmrt run`'s path
    if output is None and sys.stdout.isatty():
        raise UsageError("cowardly refusing to save to a terminal. Use the -o flag or redirect")
    archive.save(_store(ctx), list(refs), output if output is not None else sys.stdout.buffer)


@click.command("import")
@click.argument("source")
@click.argument("ref", required=False)
@click.option("-c", "--change", "changes", multiple=True,
              help="Apply a Dockerfile instruction (CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, LABEL).")
@click.option("-m", "--message", default="", help="Commit message for the imported image.")
@click.pass_context
def import_(ctx: click.Context, source: str, ref: str | None, changes: tuple[str, ...], message: str) -> None:
    """Create an image from a root file system tarball (FILE or - for stdin)."""
    from .images import archive  # on use: not on `vmrt run`'s path
    if source != "-" and not Path(source).is_file():
        raise UsageError(f"open {source}: no such file or directory")
    img = archive.import_tarball(_store(ctx), sys.stdin.buffer if source == "-" else Path(source), ref,
                                 changes=list(changes), message=message)
    click.echo(img.id)


def register(main: click.Group, image: click.Group) -> None:
    for cmd, top, sub in ((pull, "pull", "pull"), (images, "images", "ls"), (rmi, "rmi", "rm"), (tag, "tag", "tag"),
                          (load, "load", "load"), (save, "save", "save"), (import_, "import", "import")):
        main.add_command(cmd, top)
        image.add_command(cmd, sub)
    main.add_command(login)
    main.add_command(logout)
    image.add_command(image_inspect)
    image.add_command(image_prune)
