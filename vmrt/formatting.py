"""``--format`` for listings and inspect output, as Docker's CLI takes it.

Docker formats with Go templates; vmrt understands the subset people use in
scripts: ``json`` (one JSON object per line), ``table`` (the default columns),
and templates made of ``{{.Field}}``, ``{{.Field.Sub}}``, ``{{json .Field}}``,
``{{json .}}`` and ``\\t``/``\\n`` escapes, optionally after ``table `` (then a
header line of the field names is printed first). Anything else in ``{{ }}`` is
refused with one clear line rather than printed wrongly.

:func:`inert` makes text from images and guests safe to print on a terminal:
every table cell and template value goes through it, and so does every line
vmrt prints itself (errors, notices, logged debug output).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import UsageError

# Terminal controls: C0 (but \n and \t where a multi-line block is printed), DEL, C1, the
# Unicode line/paragraph separators and bidi controls (they reorder what is shown), lone
# surrogates (bytes that were not UTF-8, from surrogateescape)
_CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[\t\n{_CONTROLS}]")
_UNSAFE_BLOCK = re.compile(f"[{_CONTROLS}]")
_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_FIELD = re.compile(r"^(json\s+)?\.((?:[A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z_][A-Za-z0-9_]*)*)?$")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): shown as that byte
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def inert(text: str | bytes, *, block: bool = False) -> str:
    """``text`` with every terminal control escaped Python-style (ESC -> ``\\x1b``), so that a
    string an image or a guest chose can be printed without moving the cursor, retitling the
    window or hiding what precedes it; bytes that are not UTF-8 become ``\\xNN``. ``block``
    keeps newlines and tabs (a multi-line evidence block)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return (_UNSAFE_BLOCK if block else _UNSAFE).sub(_escape, text)


def _lookup(obj: Any, path: str | None, template: str) -> Any:
    if not path:
        return obj
    for part in path.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            raise UsageError(f"template {template!r}: no field {part!r}")
        obj = obj[part]
    return obj


def _text(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_text(v)}" for k, v in value.items()) + "]"
    return str(value)


def render(template: str, obj: Mapping[str, Any]) -> str:
    """Expand one Go-template-like ``template`` for ``obj``."""
    def action(m: re.Match[str]) -> str:
        f = _FIELD.match(m.group(1))
        if not f:
            raise UsageError(f"template {template!r}: unsupported action {{{{{m.group(1)}}}}}")
        value = _lookup(obj, f.group(2), template)
        return json.dumps(value, separators=(",", ":")) if f.group(1) else inert(_text(value))  # compact, as Go
    return _ACTION.sub(action, template.replace("\\t", "\t").replace("\\n", "\n"))


def header(template: str) -> str:
    """The header line of a ``table`` template: each field's name, upper-cased as Docker does."""
    def name(m: re.Match[str]) -> str:
        f = _FIELD.match(m.group(1))
        path = f.group(2) if f else None
        return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", path.split(".")[-1]).upper() if path else ""
    return _ACTION.sub(name, template.replace("\\t", "\t").replace("\\n", "\n"))


def emit(fmt: str | None, rows: list[dict[str, Any]], default: list[tuple[str, str, int]]) -> list[str]:
    """Lines for ``rows``: ``default`` is the table's (header, field, minimum width) columns."""
    if fmt in (None, "", "table"):  # columns as wide as their widest cell, like Go's tabwriter
        cells = [[inert(_text(r[f])) for _, f, _ in default] for r in rows]
        widths = [max([w, len(h), *(len(row[i]) for row in cells)]) for i, (h, _, w) in enumerate(default)]
        lines = ["   ".join(h.ljust(w) for (h, _, _), w in zip(default, widths, strict=True)).rstrip()]
        lines += ["   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
        return lines
    assert fmt is not None
    if fmt == "json":
        return [json.dumps(r, separators=(",", ":")) for r in rows]
    if fmt.startswith("table "):
        body = fmt[len("table "):]
        return [header(body)] + [render(body, r) for r in rows]
    return [render(fmt, r) for r in rows]


def documents(fmt: str | None, docs: list[dict[str, Any]]) -> Iterator[str]:
    """``inspect``'s output: the documents as one indented JSON list, or a template per document
    (lazily: the documents before one a template fails on are printed first)."""
    if fmt and fmt != "json":
        for d in docs:
            yield render(fmt, d)
    else:
        yield json.dumps(docs, indent=4)


def ago(seconds: float) -> str:
    """Docker's relative times: "Less than a second ago", "About a minute ago", "3 weeks ago"."""
    d = max(0, int(seconds))
    for unit, n in (("years", 365 * 86400), ("months", 30 * 86400), ("weeks", 7 * 86400), ("days", 86400),
                    ("hours", 3600), ("minutes", 60)):
        if d >= 2 * n:
            return f"{d // n} {unit} ago"
        if d >= n:
            return f"About {'an' if unit == 'hours' else 'a'} {unit[:-1]} ago"
    return f"{d} seconds ago" if d > 1 else "Less than a second ago"
