"""Human and JSON output. Human text goes to stdout (progress and problems to stderr); with
--json exactly one JSON document goes to stdout."""

from __future__ import annotations

import json
import sys
import unicodedata
from typing import Any

import click

from bunker.errors import BunkerError


class Output:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def line(self, text: str = "") -> None:
        if not self.json:
            click.echo(text)

    def info(self, text: str) -> None:
        """Status for humans on stderr (never mixed into --json stdout)."""
        click.echo(text, err=True)

    def document(self, doc: Any) -> None:
        if self.json:
            sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=_default) + "\n")

    def error(self, exc: BunkerError) -> None:
        if self.json:
            self.document({"error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code})
        click.echo(f"bunker: error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"  next step: {exc.hint}", err=True)


def _default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.decode("utf-8", "backslashreplace")
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(type(o).__name__)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# what GNU ls leaves unquoted in its shell-escape style (besides letters and digits)
_SAFE = set("%+,-./:=@_^")
_NAMED = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}


def _unprintable(ch: str) -> bool:
    """Control characters (escape sequences start with one), format characters (bidi overrides
    that reorder what a terminal shows), separators other than space, and undecodable bytes."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def quote_name(name: bytes | str) -> str:
    """A file name as GNU ls shows it in its shell-escape style: as it is when it holds nothing
    a shell or a terminal would take for something else, else in single quotes, with control
    characters and bytes that are not UTF-8 as $'\\n' / $'\\377' pieces: what is printed is
    one line that pasted into a shell names that very file."""
    text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
    if text and all(ch.isalnum() and ch.isprintable() or ch in _SAFE for ch in text):
        return text
    out: list[str] = []
    literal: list[str] = []
    escaped: list[str] = []

    def flush_literal() -> None:
        if literal:
            out.append("'" + "".join(literal).replace("'", "'\\''") + "'")
            literal.clear()

    def flush_escaped() -> None:
        if escaped:
            out.append("$'" + "".join(escaped) + "'")
            escaped.clear()

    for ch in text:
        if _unprintable(ch):
            flush_literal()
            if ch in _NAMED:
                escaped.append(_NAMED[ch])
            else:
                raw = ch.encode("utf-8", "surrogateescape")
                escaped.append("".join(f"\\{b:03o}" for b in raw))
        else:
            flush_escaped()
            literal.append(ch)
    flush_literal()
    flush_escaped()
    return "".join(out) or "''"
