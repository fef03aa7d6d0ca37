"""Where a command goes: the routing of an argv (``-H``/``--host``, ``-c``/``--context``,
``VMRT_HOST``, ``VMRT_CONTEXT``, the current context), as Docker's CLI decides between DOCKER_HOST
and contexts. Read on every ``vmrt`` start: nothing heavy is imported here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import UsageError
from ..proc import HERE
from . import contexts
from .target import SESSION_FLAG, SIGNAL_FLAG, SshTarget, parse_host

_SESSION = re.compile(r"--remote-session=((?:framed|pty):[0-9a-f]{32})|--remote-signal=([0-9a-f]{32}:[A-Z0-9]{1,8})")


@dataclass
class Route:
    """What :func:`route` decided: a remote target or None (this host), the argv to run (the
    global host options taken out), and ``session``: the mode of a remote session this process
    serves (the remote end of another vmrt's ``-H``), else None."""

    target: SshTarget | None
    argv: list[str]
    session: str | None = None
    source: str = ""  # where the target came from, for messages: "-H", "VMRT_HOST", "context NAME"
    debug: bool = False
    globals_: list[str] = field(default_factory=list)


def _value(argv: list[str], i: int, flag: str) -> str:
    if i + 1 >= len(argv):
        raise UsageError(f"flag needs an argument: {flag}")
    return argv[i + 1]


def route(argv: list[str], environ: Mapping[str, str]) -> Route:
    """Take the global host options off ``argv`` (only before the command's name, as click parses
    the main group's options) and decide where the command runs.

    Precedence as Docker's: ``-H`` and ``--context`` (not both), then ``VMRT_HOST``, then
    ``VMRT_CONTEXT``, then the context ``vmrt context use`` chose; ``vmrt context ...`` itself and
    a remote session's own command and vmrt's own children (:data:`~vmrt.proc.HERE` first:
    a service's builds, the pool daemon, the snapshot builder) always run here.
    """
    if argv[:1] == [HERE]:
        return Route(None, argv[1:])
    if argv and argv[0].startswith((SESSION_FLAG, SIGNAL_FLAG)):
        m = _SESSION.fullmatch(argv[0])
        if m is None:
            raise UsageError(f"invalid {argv[0].partition('=')[0]} (the remote end of vmrt -H): {argv[0][:80]!r}")
        return Route(None, argv[1:], session=m.group(1) or f"signal:{m.group(2)}")
    host: str | None = None
    context: str | None = None
    kept: list[str] = []
    debug = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-H", "--host"):
            host, i = _value(argv, i, a), i + 2
        elif a.startswith("--host="):
            host, i = a[len("--host="):], i + 1
        elif a.startswith("-H") and not a.startswith("--"):
            host, i = a[2:], i + 1
        elif a in ("-c", "--context"):
            context, i = _value(argv, i, a), i + 2
        elif a.startswith("--context="):
            context, i = a[len("--context="):], i + 1
        elif a.startswith("-") and a != "-":
            debug = debug or a == "--debug"
            kept.append(a)
            i += 1
        else:
            break
    rest = argv[i:]
    if host is not None and context is not None:
        raise UsageError("conflicting options: either specify --host or --context, not both")
    local = Route(None, kept + rest, debug=debug, globals_=kept)
    if rest[:1] == ["context"] or not rest:  # contexts are managed here; `vmrt` alone: help
        return local
    if host is not None:
        return Route(parse_host(host), rest, source="-H", debug=debug, globals_=kept)
    if context is not None:
        return _from_context(contexts.get_host(context, environ), rest, kept, debug, f"context {context}")
    env_host = environ.get("VMRT_HOST", "")
    if env_host:
        return Route(parse_host(env_host), rest, source="VMRT_HOST", debug=debug, globals_=kept)
    name = environ.get("VMRT_CONTEXT", "") or contexts.current(environ)
    if name and name != contexts.DEFAULT:
        return _from_context(contexts.get_host(name, environ), rest, kept, debug, f"context {name}")
    return local


def _from_context(host: str | None, rest: list[str], kept: list[str], debug: bool, source: str) -> Route:
    if host is None:  # the default context: this host
        return Route(None, kept + rest, debug=debug, globals_=kept)
    return Route(parse_host(host), rest, source=source, debug=debug, globals_=kept)
