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
from pathlib import Path

from ..errors import UsageError


class DockerfileError(UsageError):
    """A Dockerfile that cannot be built: the message names its line (``Dockerfile:7: ...``);
    exit status 1, as docker build's failures."""

    exit_code = 1


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
        msg = str(e)
        if "no instructions" in msg:
            raise DockerfileError(f"{where}:1: the file has no instructions") from None
        raise DockerfileError(f"{where}:{_error_line(text, msg)}: {msg[:300]}") from None
    out = []
    for c in cmds:
        ins = _instruction(c)
        if not ins.cmd or ins.cmd == "NONE":
            raise DockerfileError(f"{where}:{ins.line}: an instruction without a name")
        out.append(ins)
    return out


def _instruction(c: object) -> Instruction:
    cmd = str(getattr(c, "cmd") or "").upper()  # noqa: B009
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


# --- RUN --mount ---------------------------------------------------------------------------------
MOUNT_TYPES = ("bind", "cache", "tmpfs")
SHARING = ("shared", "private", "locked")


@dataclasses.dataclass(frozen=True)
class RunMount:
    """One ``RUN --mount=...`` (buildkit's syntax: comma-separated ``key=value`` fields)."""
    type: str                    # bind | cache | tmpfs
    target: str                  # absolute (a relative one is the workdir's)
    source: str = ""             # bind: the path in its root (the context, or ``from``'s root)
    from_: str | None = None     # bind: a stage or image
    readonly: bool = True        # bind: unless rw; cache: unless ro
    id: str = ""                 # cache: its identity (default: the target)
    sharing: str = "shared"      # cache
    mode: int = 0o755            # cache: the directory's when made
    uid: int = 0
    gid: int = 0
    size: int = 0                # tmpfs: bytes (0: the kernel's default)

    def key(self) -> str:
        """What the step's cache key holds of it."""
        return repr(dataclasses.astuple(self))


_BOOL = {"": True, "true": True, "1": True, "false": False, "0": False}


def run_mounts(flags: tuple[str, ...], env: Mapping[str, str], workdir: str, escape: str = "\\"
               ) -> list[RunMount]:
    """The ``--mount`` flags of a RUN, parsed strictly (a UsageError names what is wrong)."""
    out = []
    for f in flags:
        key, _, val = f.removeprefix("--").partition("=")
        if key.lower() == "mount":
            out.append(_run_mount(val, env, workdir, escape))
    targets = [m.target for m in out]
    dup = next((t for t in targets if targets.count(t) > 1), None)
    if dup is not None:
        raise UsageError(f"--mount: {dup} is the target of two mounts")
    return out


def _run_mount(spec: str, env: Mapping[str, str], workdir: str, escape: str) -> RunMount:
    if len(spec) > 8192:
        raise UsageError("--mount: longer than 8192 characters")
    fields: dict[str, str] = {}
    for raw in spec.split(","):
        k, eq, v = raw.partition("=")
        k = k.strip().lower()
        if not k:
            raise UsageError(f"--mount: an empty field in {spec[:200]!r}")
        k = {"dst": "target", "destination": "target", "src": "source", "readonly": "ro",
             "readwrite": "rw"}.get(k, k)
        if k in fields:
            raise UsageError(f"--mount: {k} given twice")
        fields[k] = word(v, env, escape) if eq else ""
    kind = fields.pop("type", "bind")
    if kind not in MOUNT_TYPES:
        raise UsageError(f"--mount: unsupported mount type {kind[:40]!r} (bind, cache or tmpfs)")
    allowed = {"bind": {"target", "source", "from", "ro", "rw"},
               "cache": {"target", "id", "sharing", "mode", "uid", "gid", "ro", "rw"},
               "tmpfs": {"target", "size"}}[kind]
    bad = sorted(set(fields) - allowed)
    if bad:
        raise UsageError(f"--mount: unknown option {bad[0][:40]!r} for type={kind} "
                         f"({', '.join(sorted(allowed))})")
    target = fields.get("target", "")
    if not target:
        raise UsageError(f"--mount: type={kind} needs a target")
    if "\0" in target or len(target) > 4096:
        raise UsageError("--mount: a bad target")
    target = os.path.normpath(os.path.join(workdir or "/", target))
    if target == "/":
        raise UsageError("--mount: the target cannot be /")
    flags = {}
    for b in ("ro", "rw"):
        if b in fields:
            if fields[b].lower() not in _BOOL:
                raise UsageError(f"--mount: {b}={fields[b][:40]!r} is not a boolean")
            flags[b] = _BOOL[fields[b].lower()]
    readonly = flags.get("ro", not flags["rw"] if "rw" in flags else kind == "bind")
    if kind == "tmpfs":
        return RunMount("tmpfs", target, readonly=False, size=_size(fields.get("size", "0")))
    if kind == "bind":
        frm = fields.get("from") or None
        return RunMount("bind", target, source=fields.get("source", "") or "/", from_=frm, readonly=readonly)
    sharing = fields.get("sharing", "shared")
    if sharing not in SHARING:
        raise UsageError(f"--mount: sharing={sharing[:40]!r} (shared, private or locked)")
    mode = fields.get("mode", "0755")
    if not re.fullmatch(r"[0-7]{1,4}", mode):
        raise UsageError(f"--mount: mode={mode[:40]!r} is not an octal mode")
    ids = []
    for name in ("uid", "gid"):
        v = fields.get(name, "0")
        if not v.isdigit() or int(v) > 0xFFFFFFFE:
            raise UsageError(f"--mount: {name}={v[:40]!r} is not a number")
        ids.append(int(v))
    cache_id = fields.get("id") or target
    if len(cache_id) > 1024 or "\0" in cache_id:
        raise UsageError("--mount: a bad cache id")
    return RunMount("cache", target, readonly=readonly, id=cache_id, sharing=sharing, mode=int(mode, 8),
                    uid=ids[0], gid=ids[1])


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d{1,15})([kmg]?)b?", text.strip().lower())
    if not m:
        raise UsageError(f"--mount: size={text[:40]!r} (bytes, or with k, m or g)")
    return int(m[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[m[2]]


# --- the text ------------------------------------------------------------------------------------
MAX_BYTES = 16 << 20  # a Dockerfile's (buildkit refuses lines over 64 KiB; this bounds the rest)


def locate(context: Path, dockerfile: str | None) -> Path:
    """The file ``-f`` names, as docker build finds it: the path as given, else relative to the
    context; without ``-f``, the context's ``Dockerfile``."""
    path = Path(dockerfile) if dockerfile else context / "Dockerfile"
    if dockerfile and not path.is_absolute() and not path.exists() and (context / dockerfile).exists():
        path = context / dockerfile
    return path


def decode(data: bytes, where: str) -> str:
    """A Dockerfile's bytes as text: UTF-8 (a BOM dropped) without NUL bytes, at most
    ``MAX_BYTES``; otherwise a DockerfileError naming the line."""
    if len(data) > MAX_BYTES:
        raise DockerfileError(f"{where}: larger than {MAX_BYTES >> 20} MiB")
    nul = data.find(b"\0")
    if nul >= 0:
        raise DockerfileError(f"{where}:{_line_at(data, nul)}: a NUL byte (not a text file)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start
        raise DockerfileError(f"{where}:{_line_at(data, bad)}: not UTF-8 text (byte 0x{data[bad]:02x})") from None
    return text.removeprefix("\ufeff")


def _line_at(data: bytes, offset: int) -> int:
    return data.count(NL, 0, offset) + 1


NL = b"\n"


def _error_line(text: str, msg: str) -> int:
    """Where the parser's line-less error is."""
    lines = text.splitlines()
    if "max allowed size" in msg:
        return next((i + 1 for i, ln in enumerate(lines) if len(ln.encode()) > 65535), 1)
    if "escape token" in msg:
        return next((i + 1 for i, ln in enumerate(lines) if re.match(r"\s*#\s*escape\s*=", ln, re.I)), 1)
    if "heredoc" in msg:
        for i, ln in enumerate(lines):
            for m in re.finditer(r"<<-?[\"']?(\w+)[\"']?", ln):
                if not any(rest.strip() == m[1] for rest in lines[i + 1:]):
                    return i + 1
    return 1
