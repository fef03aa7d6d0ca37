"""The image commands (click only: what each does is in :mod:`vmrt.imagecmds`), at the top
level (``vmrt pull``) and under ``vmrt image`` (``vmrt image pull``), as Docker has them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .. import imagecmds
from ..errors import ImageError
from .common import config_of, echo_lines, report


@click.group()
def image() -> None:
    """Manage images."""


@image.command("build")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.pass_context
def image_build(ctx: click.Context, recipe: Path) -> None:
    """Build an image from a recipe directory (see images/)."""
    click.echo(imagecmds.build(config_of(ctx), recipe))


@click.command("build")
@click.argument("context")
@click.option("-t", "--tag", "tags", multiple=True, metavar="NAME[:TAG]", help="Tag the result (repeatable).")
@click.option("-f", "--file", "dockerfile", metavar="PATH",
              help="The Dockerfile (default CONTEXT/Dockerfile; - for stdin).")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE", help="Set a build-time ARG.")
@click.option("--target", help="Build up to this stage.")
@click.option("--no-cache", is_flag=True, help="Do not use the build cache.")
@click.option("--pull", is_flag=True, help="Always pull the base images.")
@click.option("--isolation", default="process", type=click.Choice(["process", "vm"]),
              help="Where RUN steps run (vm: not yet).")
@click.option("--network", help="The network of RUN steps (default: the default bridge; none).")
@click.option("--platform", help="The platform of base images (os/arch[/variant]).")
@click.option("-q", "--quiet", is_flag=True, help="Only print the image ID.")
@click.option("--iidfile", type=click.Path(dir_okay=False, path_type=Path), help="Write the image ID to this file.")
@click.pass_context
def build(ctx: click.Context, context: str, tags: tuple[str, ...], dockerfile: str | None,
          build_args: tuple[str, ...], target: str | None, no_cache: bool, pull: bool, isolation: str,
          network: str | None, platform: str | None, quiet: bool, iidfile: Path | None) -> None:
    """Build an image from a Dockerfile (CONTEXT: a directory, or - for a tar archive on stdin)."""
    from .. import build as build_mod  # on use: the Dockerfile parser loads only for a build
    args = {}
    for a in build_args:
        k, eq, v = a.partition("=")
        if eq:
            args[k] = v
        elif k in os.environ:  # docker: --build-arg NAME takes the value from the environment
            args[k] = os.environ[k]
    opts = build_mod.Options(None if context == "-" else Path(context), dockerfile=dockerfile, tags=list(tags),
                             build_args=args, target=target, no_cache=no_cache, pull=pull, isolation=isolation,
                             network=network, quiet=quiet, iidfile=iidfile, platform=platform)
    image_id = build_mod.build(config_of(ctx), opts, (lambda _: None) if quiet else _progress)
    if quiet:
        click.echo(image_id)


@click.group()
def builder() -> None:
    """Manage the build cache."""


@builder.command("prune")
@click.option("-a", "--all", "prune_all", is_flag=True, help="Remove the whole build cache, not just the "
              "layers no image holds.")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.pass_context
def builder_prune(ctx: click.Context, prune_all: bool, force: bool) -> None:
    """Remove build cache (the layers of build steps that no image holds)."""
    from .. import build as build_mod  # on use, as build's
    if not force and sys.stdin.isatty():
        if not click.confirm("WARNING! This will remove all dangling build cache.\nAre you sure you want to continue?"):
            return
    gone, freed = build_mod.prune_cache(config_of(ctx), prune_all=prune_all)
    if gone:
        click.echo("Deleted build cache objects:")
        echo_lines(gone)
        click.echo("")
    click.echo(f"Total reclaimed space: {imagecmds.human_size(freed)}")


def _progress(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


@click.command()
@click.argument("ref")
@click.option("--platform", help="Pick this os/arch[/variant] from a multi-platform image (default linux/amd64).")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Talk plain HTTP to this registry (repeatable; also config insecure_registries).")
@click.option("-q", "--quiet", is_flag=True, help="Suppress verbose output; print the image reference.")
@click.pass_context
def pull(ctx: click.Context, ref: str, platform: str | None, insecure: tuple[str, ...], quiet: bool) -> None:
    """Download an image from a registry."""
    click.echo(imagecmds.pull(config_of(ctx), ref, platform=platform, insecure=insecure, quiet=quiet))


@click.command()
@click.argument("ref")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Talk plain HTTP to this registry (repeatable; also config insecure_registries).")
@click.option("-q", "--quiet", is_flag=True, help="Suppress verbose output; print the reference pushed.")
@click.pass_context
def push(ctx: click.Context, ref: str, insecure: tuple[str, ...], quiet: bool) -> None:
    """Upload an image to a registry (REF: NAME[:TAG] or NAME@DIGEST)."""
    try:
        line = imagecmds.push(config_of(ctx), ref, insecure=insecure, quiet=quiet)
    except ImageError as e:  # as `docker push`: one line, exit 1
        e.exit_code = 1
        raise
    if line:
        click.echo(line)


def _ask(prompt: str, hide_input: bool) -> str:
    return str(click.prompt(prompt, hide_input=hide_input))


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
    click.echo(imagecmds.login(config_of(ctx), server, username=username, password=password,
                               password_stdin=password_stdin, insecure=insecure, ask=_ask))


@click.command()
@click.argument("server")
@click.pass_context
def logout(ctx: click.Context, server: str) -> None:
    """Forget the credentials stored for a registry."""
    click.echo(imagecmds.logout(config_of(ctx), server))


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
    echo_lines(imagecmds.images(config_of(ctx), repository, quiet=quiet, no_trunc=no_trunc, fmt=fmt))


@click.command("inspect")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", help="Go-template-like format, e.g. '{{.Id}}' or '{{json .Config}}'.")
@click.pass_context
def image_inspect(ctx: click.Context, refs: tuple[str, ...], fmt: str | None) -> None:
    """Show an image's details as JSON (Docker's shape)."""
    echo_lines(imagecmds.inspect(config_of(ctx), refs, fmt=fmt))


@click.command()
@click.argument("source")
@click.argument("target")
@click.pass_context
def tag(ctx: click.Context, source: str, target: str) -> None:
    """Create a tag TARGET that refers to SOURCE."""
    imagecmds.tag(config_of(ctx), source, target)


@click.command("rmi")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove even if referenced by several tags or by containers "
              "(an image a container still uses stays, untagged, until the container is removed).")
@click.pass_context
def rmi(ctx: click.Context, refs: tuple[str, ...], force: bool) -> None:
    """Remove one or more images."""
    report(ctx, imagecmds.rmi(config_of(ctx), refs, force=force))


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
    echo_lines(imagecmds.prune(config_of(ctx), prune_all=prune_all))


@click.command("load")
@click.option("-i", "--input", "source", type=click.Path(dir_okay=False, path_type=Path),
              help="Read from a tar archive file (docker-archive or OCI layout, maybe compressed), not stdin.")
@click.option("-q", "--quiet", is_flag=True, help="Suppress the load output.")
@click.pass_context
def load(ctx: click.Context, source: Path | None, quiet: bool) -> None:
    """Load images from a tar archive (docker save / podman save / skopeo output)."""
    echo_lines(imagecmds.load(config_of(ctx), source, quiet=quiet))


@click.command("save")
@click.argument("refs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to a file instead of stdout.")
@click.pass_context
def save(ctx: click.Context, refs: tuple[str, ...], output: Path | None) -> None:
    """Save images to a tar archive (both a docker-archive and an OCI layout, as Docker 25+)."""
    imagecmds.save(config_of(ctx), refs, output)


@click.command("import")
@click.argument("source")
@click.argument("ref", required=False)
@click.option("-c", "--change", "changes", multiple=True,
              help="Apply a Dockerfile instruction (CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, LABEL).")
@click.option("-m", "--message", default="", help="Commit message for the imported image.")
@click.pass_context
def import_(ctx: click.Context, source: str, ref: str | None, changes: tuple[str, ...], message: str) -> None:
    """Create an image from a root file system tarball (FILE or - for stdin)."""
    click.echo(imagecmds.import_image(config_of(ctx), source, ref, changes=changes, message=message))


def register(main: click.Group) -> None:
    for cmd, top, sub in ((pull, "pull", "pull"), (push, "push", "push"), (images, "images", "ls"),
                          (rmi, "rmi", "rm"), (tag, "tag", "tag"), (load, "load", "load"),
                          (save, "save", "save"), (import_, "import", "import")):
        main.add_command(cmd, top)
        image.add_command(cmd, sub)
    main.add_command(build)
    main.add_command(builder)
    main.add_command(login)
    main.add_command(logout)
    image.add_command(image_inspect)
    image.add_command(image_prune)
    main.add_command(image)
