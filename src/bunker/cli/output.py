"""Human and JSON output. Human text goes to stdout (progress and problems to stderr); with
--json exactly one JSON document goes to stdout."""

from __future__ import annotations

import json
import sys
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
