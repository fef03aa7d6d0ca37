"""A command for a remote host (``vmrt -H ssh://...``, ``VMRT_HOST``, a context): what it needs
from this side, read with the commands' own click definitions, then :mod:`vmrt.remote.client`.

Local files are read and written here, never named to the remote: ``cp LOCAL C:PATH`` sends a tar
made here (the remote's ``cp --source-name NAME - C:PATH``), ``cp C:PATH LOCAL`` unpacks here
the remote's ``cp C:PATH -`` (vmrt/cp.py's checks), ``load -i FILE`` and ``import FILE`` feed
FILE as the remote's stdin, ``save -o FILE`` writes its stdout to FILE. stdin is forwarded only to
the commands that read it (-i, load, attach, login, ``cp -``): as Docker's client, a script's
stdin is not swallowed by ``vmrt -H ... ps``. ``build CONTEXT`` sends a tar of the local context
made here (the remote's ``build -f NAME -``; vmrt/remote/localfiles.py), ``--iidfile`` is written
here; ``run -d``/``create --cidfile`` is written here; ``run``/``create --env-file`` and
``--label-file`` are read here, sent as ``-e`` and ``--label`` pairs (and ``-e KEY`` of run,
create and exec takes this side's value).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from ..remote import client, localfiles, mux
from ..remote.client import Plan
from ..remote.routing import Route


def _leaf(main: click.Group, argv: list[str]) -> tuple[list[str], click.Command, list[str]] | None:
    """(the command's path, the command, its arguments), or None when click cannot tell."""
    ctx = click.Context(main, info_name="vmrt", resilient_parsing=True)
    cmd: click.Command = main
    path: list[str] = []
    rest = list(argv)
    while isinstance(cmd, click.Group):
        if not rest or rest[0].startswith("-"):
            return None
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            return None
        path.append(rest.pop(0))
        cmd = sub
    return path, cmd, rest


def plan(main: click.Group, route: Route) -> Plan:
    argv = route.argv
    p = Plan(argv=list(argv), globals_=route.globals_)
    leaf = _leaf(main, argv)
    if leaf is None:
        return p
    path, cmd, rest = leaf
    if "--help" in rest or "-h" in rest:
        return p
    try:  # a strict parse: a resilient one stops at an unknown option and would drop the rest
        params = cmd.make_context(path[-1], list(rest)).params
    except (click.ClickException, click.exceptions.Exit):  # the remote vmrt says what is wrong
        return p
    name = cmd.name or path[-1]
    tty_here = os.isatty(0) and os.isatty(1)
    if name in ("run", "exec"):
        attached = not params.get("detach")
        p.stdin = bool(params.get("interactive")) and attached
        p.tty = bool(params.get("tty")) and attached
    elif name == "attach":
        p.stdin = not params.get("no_stdin")
        p.tty = tty_here
    elif name == "login":
        p.stdin = True
        p.tty = tty_here and not params.get("password_stdin")
    elif "prune" in name and not params.get("force") and tty_here:
        p.stdin = p.tty = True  # the remote asks, on a terminal
    elif name == "load":
        source = params.get("source")
        if source is not None:
            p.stdin_file = Path(source)
            p.argv = [*path, *(["-q"] if params.get("quiet") else [])]
        else:
            p.stdin = True
    elif name == "save":
        output = params.get("output")
        if output is not None:
            p.stdout_file = Path(output)
            if not p.stdout_file.parent.is_dir():
                raise UsageError(f"cannot write {output}: its directory does not exist")
        elif os.isatty(1):
            raise UsageError("cowardly refusing to save to a terminal. Use the -o flag or redirect")
        p.argv = [*path, *params.get("refs", ())]
    elif name == "import":
        source = params.get("source")
        if source and source != "-" and not source.startswith(("http://", "https://")):
            p.stdin_file = Path(source)
            args = [f"--change={c}" for c in params.get("changes", ())]
            if params.get("message"):
                args.append(f"--message={params['message']}")
            p.argv = [*path, *args, "-", *([params["ref"]] if params.get("ref") else [])]
        elif source == "-":
            p.stdin = True
    elif name == "cp":
        _cp(p, path, params)
    elif name == "build" and path[-1] == "build" and params.get("context"):
        _build(p, cmd, path, params)
    if name in ("run", "create", "exec"):
        _env(p, cmd, path, params)
    return p


def _argv_of(cmd: click.Command, params: Mapping[str, Any]) -> list[str]:
    """The arguments that make ``params`` for ``cmd`` again (options first, as ``--name=value``;
    only those not at their default), so that one can be changed and the rest kept as given."""
    ctx = click.Context(cmd, info_name=cmd.name, resilient_parsing=True)
    opts: list[str] = []
    args: list[str] = []
    for p in cmd.params:
        value = params.get(p.name) if p.name else None
        if isinstance(p, click.Argument):
            if p.nargs == -1:
                args += [str(v) for v in value or ()]
            elif value is not None:
                args.append(str(value))
            continue
        if not isinstance(p, click.Option) or value is None:
            continue
        flag = max(p.opts, key=len)
        default = p.get_default(ctx)
        if p.is_flag:
            if bool(value) == bool(default):
                continue
            if value is True:
                opts.append(flag)
            elif p.secondary_opts:  # --no-x against a default of True
                opts.append(max(p.secondary_opts, key=len))
        elif p.multiple:
            opts += [f"{flag}={v}" for v in value]
        elif value != default:
            opts.append(f"{flag}={value}")
    return [*opts, *args]


def _seq(value: object) -> tuple[object, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else ()


def _env(p: Plan, cmd: click.Command, path: list[str], params: dict[str, object]) -> None:
    """``--env-file`` and ``--label-file`` read here; ``-e KEY`` takes this host's value (as a
    local run would), never the remote session's."""
    files = tuple(Path(str(f)) for f in _seq(params.get("env_file")))
    env = tuple(str(e) for e in _seq(params.get("env")))
    label_files = tuple(Path(str(f)) for f in _seq(params.get("label_file")))
    cidfile = params.get("cidfile")
    if not files and not label_files and cidfile is None and all("=" in e for e in env):
        return
    changed = {**params, "env_file": (), "env": tuple(localfiles.env_pairs(files, env, os.environ))}
    if cidfile is not None:  # written here with the ID the remote prints (create, run -d) or marks
        p.cidfile = Path(str(cidfile))
        changed["cidfile"] = None
        if path[-1] == "run" and not params.get("detach"):  # an attached run prints no ID: a marked one
            p.cid = client.CidWatch(os.urandom(16).hex(), lambda _: None)
            changed["cid_marker"] = p.cid.token
        else:
            p.keep_tail = True
    if label_files:  # --label-file read here, its lines sent as --label, before the given ones
        from ..containercmds import label_lines  # imported on use: --label-file alone
        changed.update(label_file=(), labels=(*label_lines(label_files), *_seq(params.get("labels"))))
    p.argv = [*path, *_argv_of(cmd, changed)]


def _build(p: Plan, cmd: click.Command, path: list[str], params: dict[str, object]) -> None:
    """``build CONTEXT``: the local context as the remote's stdin; ``--iidfile`` written here."""
    iidfile = params.get("iidfile")
    if iidfile is not None:
        p.iidfile = Path(str(iidfile))
        p.keep_tail = True
        if not p.iidfile.parent.is_dir():
            raise UsageError(f"cannot write {iidfile}: its directory does not exist")
    args: dict[str, object] = {**params, "iidfile": None}
    build_args = []
    for a in _seq(params.get("build_args")):
        k, eq, _ = str(a).partition("=")
        if eq:
            build_args.append(str(a))
        elif k in os.environ:  # as a local build: NAME alone takes this host's value
            build_args.append(f"{k}={os.environ[k]}")
    args["build_args"] = tuple(build_args)
    context = str(params["context"])
    if context == "-":  # a tar (or the remote's reading of stdin): passed on
        p.stdin = True
    else:
        dockerfile = params.get("dockerfile")
        ctx = localfiles.build_context(context, None if dockerfile is None else str(dockerfile))
        p.stdin_producer = ctx.write
        args.update(context="-", dockerfile=ctx.dockerfile_name)
    p.argv = [*path, *_argv_of(cmd, args)]


def _cp(p: Plan, path: list[str], params: dict[str, object]) -> None:
    from ..cp import source_base, split  # imported on use: cp alone
    src, dest = str(params.get("src") or ""), str(params.get("dest") or "")
    (sref, spath), (dref, _) = split(src), split(dest)
    if src == "-":
        p.stdin = True
    elif sref is None and dref is not None:
        local = Path(src)
        if not os.path.lexists(local):
            raise UsageError(f"could not find the file {src} in the host")
        name = os.path.basename(os.path.normpath(os.path.abspath(src)))
        if not name:
            raise UsageError("cannot copy / to a remote container")
        p.stdin_tar = (local, name)
        p.argv = [*path, "--source-name", name, "-", dest]
    elif sref is not None and dref is None and dest != "-":
        p.extract = (source_base(spath)[1], Path(dest))
        p.argv = [*path, src, "-"]


def run(main: click.Group, route: Route) -> int:
    """Through the user's connection master for the host when one runs or can start (started
    with the first command; VMRT_SSH_PERSIST=0: none), else on a connection of its own."""
    assert route.target is not None
    p = plan(main, route)
    if p.cidfile is not None:
        from ..containercmds import CidFile  # imported on use: --cidfile alone
        with CidFile(p.cidfile) as cid:  # refused if it exists, before anything runs
            if p.cid is not None:  # written as soon as the remote marks the ID
                p.cid.found = cid.write
                return _run(route, p)
            status = _run(route, p)
            got = localfiles.container_id(p.tail) if status == 0 else None
            if got is not None:
                cid.write(got)
            elif status == 0:
                raise UsageError(f"the container was made, but its ID could not be read from the remote's output: "
                                 f"{p.cidfile} not written")
        return status
    status = _run(route, p)
    if status == 0 and p.iidfile is not None:
        _write_iidfile(route, p)
    return status


def _run(route: Route, p: Plan) -> int:
    assert route.target is not None
    persist = client.persist_seconds()
    if persist > 0:
        status = mux.run(route.target, p, persist)
        if status is not None:
            return status
    return client.run(route.target, p)


def _write_iidfile(route: Route, p: Plan) -> None:
    """The ID the remote build printed (-q: whole; else the short one, asked for whole)."""
    assert p.iidfile is not None
    got = localfiles.image_id(p.tail)
    if got is not None and not got.startswith("sha256:"):
        import tempfile  # imported on use: build --iidfile alone
        with tempfile.TemporaryDirectory(prefix="vmrt-iid-") as d:
            out = Path(d) / "id"
            ask = Plan(argv=["image", "inspect", "--format", "{{.Id}}", got], globals_=p.globals_, stdout_file=out)
            got = localfiles.full_id(out.read_bytes(), got) if _run(route, ask) == 0 and out.exists() else None
    if got is None:
        raise UsageError(f"the image was built, but its ID could not be read from the remote's output: "
                         f"{p.iidfile} not written")
    p.iidfile.write_text(got)
