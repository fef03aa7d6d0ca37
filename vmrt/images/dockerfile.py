"""A Dockerfile as instructions, the words of each as Docker expands them, and ``.dockerignore``.

The grammar (line continuations, JSON forms, flags, heredocs, the ``escape`` directive) is
Docker's own: the PyPI ``dockerfile`` package wraps buildkit's Go parser. It leaves values as
written (``B="two words"`` keeps its quotes): :func:`word` is buildkit's shell lexer for one
word (quotes, backslashes, ``$VAR``, ``${VAR}``, ``${VAR:-x}``, ``${VAR:+x}``), used for ENV,
ARG, LABEL, WORKDIR, USER, COPY/ADD paths, EXPOSE, VOLUME, STOPSIGNAL and FROM.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Mapping

from ..errors import UsageError


class DockerfileError(UsageError):
    """A Dockerfile that cannot be built: the message names its line (``Dockerfile:7: ...``)."""


@dataclasses.dataclass(frozen=True)
class Heredoc:
    name: str
    content: str


@dataclasses.dataclass(frozen=True)
class Instruction:
    cmd: str                       # upper case: RUN, COPY...
    value: tuple[str, ...]         # the parser's words (raw: quotes kept outside JSON form)
    flags: tuple[str, ...]         # --from=x ...
    json: bool                     # exec (JSON) form
    original: str                  # the line(s) as written, continuations joined
    line: int
    heredocs: tuple[Heredoc, ...] = ()
    sub: Instruction | None = None  # ONBUILD's instruction

    def flag(self, name: str) -> str | None:
        """The value of ``--name=VALUE`` (the last one given), or None."""
        found = None
        for f in self.flags:
            key, eq, val = f.removeprefix("--").partition("=")
            if key.lower() == name:
                found = val if eq else "true"
        return found

    def check_flags(self, allowed: set[str], where: str) -> None:
        for f in self.flags:
            key = f.removeprefix("--").partition("=")[0].lower()
            if key not in allowed:
                raise DockerfileError(f"{where}:{self.line}: unknown flag: --{key} for {self.cmd}")


def parse(text: str, where: str = "Dockerfile") -> list[Instruction]:
    """The instructions of a Dockerfile (ImageError-free: a syntax error is a DockerfileError)."""
    import dockerfile as parser  # on use: the Go parser's extension loads only for a build

    try:
        cmds = parser.parse_string(text)
    except parser.GoParseError as e:
        raise DockerfileError(f"{where}: {e}") from e
    out = []
    for c in cmds:
        ins = _instruction(c)
        out.append(ins)
    return out


def _instruction(c: object) -> Instruction:
    cmd = str(getattr(c, "cmd")).upper()  # noqa: B009
    sub_cmd = getattr(c, "sub_cmd")  # noqa: B009
    docs = tuple(Heredoc(h.name, h.content) for h in getattr(c, "heredocs"))  # noqa: B009
    base = Instruction(cmd, tuple(getattr(c, "value")), tuple(getattr(c, "flags")),  # noqa: B009
                       bool(getattr(c, "json")), str(getattr(c, "original")),  # noqa: B009
                       int(getattr(c, "start_line")), docs)  # noqa: B009
    if cmd == "ONBUILD" and sub_cmd:
        sub = dataclasses.replace(base, cmd=str(sub_cmd).upper(), original=onbuild_text(base.original))
        return dataclasses.replace(base, sub=sub)
    return base


def onbuild_text(original: str) -> str:
    """``ONBUILD RUN x`` -> ``RUN x`` (what the image's OnBuild list holds)."""
    return re.sub(r"^\s*onbuild\s+", "", original, flags=re.IGNORECASE)


# --- the shell lexer -----------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def word(text: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """One word as buildkit's ProcessWord makes it: quotes removed, backslash escapes, and
    ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:+alt}`` (and ``-``/``+`` without the
    colon) expanded from ``env``; whitespace kept as it is."""
    return "".join(_lex(text, env, escape, split=False)[0])


def words(text: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Whitespace-separated words (ProcessWords): quoted whitespace stays in its word."""
    return _lex(text, env, escape, split=True)


def _lex(text: str, env: Mapping[str, str], escape: str, *, split: bool) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    started = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if split and ch in " \t\r\n":
            if started:
                out.append("".join(cur))
                cur, started = [], False
            i += 1
            continue
        started = True
        if ch == escape:
            if i + 1 < n:
                cur.append(text[i + 1])
                i += 2
            else:
                cur.append(ch)
                i += 1
        elif ch == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise UsageError(f"unexpected end of statement while looking for matching single-quote: {text}")
            cur.append(text[i + 1:end])
            i = end + 1
        elif ch == '"':
            i += 1
            while True:
                if i >= n:
                    raise UsageError(f"unexpected end of statement while looking for matching double-quote: {text}")
                c2 = text[i]
                if c2 == '"':
                    i += 1
                    break
                if c2 == escape and i + 1 < n and text[i + 1] in ('"', "$", escape):
                    cur.append(text[i + 1])
                    i += 2
                elif c2 == "$":
                    val, i = _var(text, i, env, escape)
                    cur.append(val)
                else:
                    cur.append(c2)
                    i += 1
        elif ch == "$":
            val, i = _var(text, i, env, escape)
            cur.append(val)
        else:
            cur.append(ch)
            i += 1
    if started or not split:
        out.append("".join(cur))
    return out


def _var(text: str, i: int, env: Mapping[str, str], escape: str) -> tuple[str, int]:
    """The expansion of the ``$`` at ``text[i]``; the index after it."""
    if i + 1 < len(text) and text[i + 1] == "{":
        end = _closing_brace(text, i + 2)
        inner = text[i + 2:end]
        m = _NAME.match(inner)
        if not m:
            raise UsageError(f"bad substitution: ${{{inner}}}")
        name, rest = m.group(0), inner[m.end():]
        value = env.get(name)
        if rest == "":
            return value or "", end + 1
        for op in (":-", ":+", "-", "+"):
            if rest.startswith(op):
                arg = word(rest[len(op):], env, escape)
                if op == ":-":
                    return (value if value else arg), end + 1
                if op == "-":
                    return (value if value is not None else arg), end + 1
                if op == ":+":
                    return (arg if value else ""), end + 1
                return (arg if value is not None else ""), end + 1
        raise UsageError(f"unsupported modifier ({rest[:2]}) in substitution: ${{{inner}}}")
    m = _NAME.match(text, i + 1)
    if not m:
        return "$", i + 1
    return env.get(m.group(0), ""), m.end()


def _closing_brace(text: str, start: int) -> int:
    depth = 1
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    raise UsageError(f"missing '}}' in substitution: {text}")


def pairs(values: tuple[str, ...], env: Mapping[str, str], what: str) -> list[tuple[str, str]]:
    """ENV's and LABEL's key/value pairs (the parser gives them alternately), expanded."""
    if len(values) % 2:
        raise UsageError(f"{what} requires key/value pairs")
    return [(word(values[k], env), word(values[k + 1], env)) for k in range(0, len(values), 2)]


# --- .dockerignore -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    exclusion: bool
    dirs: tuple[str, ...]


class Ignore:
    """Docker's ``.dockerignore``: Go filepath.Match patterns plus ``**``, cleaned, leading
    ``/`` dropped, ``!`` exceptions; the last pattern that matches a path (or a parent
    directory of it) decides."""

    def __init__(self, text: str = "") -> None:
        self.patterns: list[_Pattern] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            excl = line.startswith("!")
            if excl:
                line = line[1:].strip()
            line = os.path.normpath(line).lstrip("/")
            if line in ("", "."):
                continue
            self.patterns.append(_Pattern(re.compile(_glob_regex(line)), excl, tuple(line.split("/"))))

    def excluded(self, rel: str) -> bool:
        rel = rel.strip("/")
        parents = rel.split("/")
        matched = False
        for p in self.patterns:
            hit = bool(p.regex.fullmatch(rel))
            if not hit:  # a pattern naming a parent directory covers what is under it
                hit = any(p.regex.fullmatch("/".join(parents[:k])) for k in range(1, len(parents)))
            if hit:
                matched = not p.exclusion
        return matched

    def may_hold_exceptions(self) -> bool:
        return any(p.exclusion for p in self.patterns)


def _glob_regex(pattern: str) -> str:
    """A Go filepath.Match pattern (with Docker's ``**``) as a regular expression."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1:end]
                if body.startswith("^"):
                    body = "!" + body[1:]
                out.append(fnmatch.translate("[" + body + "]").removeprefix("(?s:").removesuffix(")\\Z"))
                i = end
        elif ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 1
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")
