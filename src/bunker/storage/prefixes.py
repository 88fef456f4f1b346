"""The repository's namespace: every top-level prefix and the rule its names follow.

This is the one registry of names (docs/format.md section 5 is its normative text). The storage
boundary (storage/backend.py) refuses any other name before a backend sees it and leaves it out of
every listing; the serve protocol refuses it in requests; the readers (repo/objects.py) take their
hash-named prefixes from here. A name that breaks its prefix's rule is never used: it cannot be
written through bunker, so whatever carries one was put there by other means.

The registry belongs to the repository format (repo/config.py FORMAT_VERSION), which this layer
may not import: messages that name the format version are made by the layers above (serve, check).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HASH = "hash"  # the leaf is the hex BLAKE3 of the object's stored bytes
SESSION = "session"  # the leaf is <session id>.<counter>

# A lease counter grows by one per refresh (minutes apart): 18 digits never run out, and keep the
# name's length bounded.
MAX_COUNTER_DIGITS = 18

_LEAF_RULES = {
    HASH: re.compile(r"[0-9a-f]{64}"),
    SESSION: re.compile(rf"[0-9a-f]{{24}}\.(?:0|[1-9][0-9]{{0,{MAX_COUNTER_DIGITS - 1}}})"),
}
RULE_TEXT = {
    HASH: "64 lowercase hex digits, the BLAKE3 of the object's bytes",
    SESSION: "24 lowercase hex digits, a dot and a counter (a decimal number without leading zeros)",
}
_RULE_SHORT = {HASH: "<64 hex>", SESSION: "<24 hex>.<counter>"}


@dataclass(frozen=True)
class Prefix:
    """One top-level prefix: its name, the rule of its leaves, what it holds."""

    name: str
    rule: str
    holds: str
    reserved: bool = False  # in the namespace, but this version writes nothing there yet


REGISTRY: tuple[Prefix, ...] = (
    Prefix("config", HASH, "signed repository configuration versions"),
    Prefix("clients", HASH, "client certificates"),
    Prefix("packs", HASH, "encrypted blobs"),
    Prefix("index", HASH, "encrypted chunk locations"),
    Prefix("refs", HASH, "pack sets and chunk sets"),
    Prefix("snapshots", HASH, "snapshots"),
    Prefix("retired", HASH, "retirement records and their withdrawals (unretire records)"),
    Prefix("gc", HASH, "GC condemnation and move records"),
    Prefix("status", HASH, "status records of clients' runs"),
    Prefix("policy", HASH, "the owner's policy versions, signed by the master key"),
    Prefix("nodes", HASH, "node certificates"),
    Prefix("sessions", SESSION, "leases of running writers"),
)
BY_NAME = {p.name: p for p in REGISTRY}
PREFIXES = tuple(p.name for p in REGISTRY)
HASH_NAMED = tuple(p.name for p in REGISTRY if p.rule == HASH)
# what this version writes (and so reads and checks); a server of an older version may not know
# the reserved prefixes yet
WRITTEN = tuple(p.name for p in REGISTRY if not p.reserved)
FIXED_NAMES = ("RECOVERY.md", "FORMAT.md")
MAX_SHOWN = 200  # characters of a foreign name shown in a message


def is_object_name(name: str) -> bool:
    """True if ``name`` is a fixed name or ``<known prefix>/<leaf>`` with the prefix's rule."""
    return name_problem(name) is None


def is_hash_name(name: str) -> bool:
    """True if ``name`` is ``<hash-named prefix>/<64 lowercase hex>``."""
    prefix, _, leaf = name.partition("/")
    p = BY_NAME.get(prefix)
    return p is not None and p.rule == HASH and _LEAF_RULES[HASH].fullmatch(leaf) is not None


def name_problem(name: str) -> str | None:
    """Why ``name`` is not an object name of the repository (None when it is one)."""
    if name in FIXED_NAMES:
        return None
    prefix, sep, leaf = name.partition("/")
    p = BY_NAME.get(prefix)
    if not sep or p is None:
        return "no such prefix" if sep else "not a fixed name, and no prefix"
    if _LEAF_RULES[p.rule].fullmatch(leaf) is None:
        return f"{prefix}/ holds only names of {RULE_TEXT[p.rule]}"
    return None


def rule_for(prefix: str) -> str:
    """The rule of the names under ``prefix`` (``packs`` or ``packs/``), in words."""
    return RULE_TEXT[BY_NAME[prefix.rstrip("/")].rule]


def known_names() -> str:
    """Every prefix with its rule and the fixed names, on one line (for messages)."""
    groups: dict[str, list[str]] = {}
    for p in REGISTRY:
        groups.setdefault(p.rule, []).append(p.name + "/")
    parts = [f"{' '.join(names)} ({_RULE_SHORT[rule]})" for rule, names in groups.items()]
    return ", ".join([*parts, *FIXED_NAMES])


def printable(name: str) -> str:
    """``name`` as it can be shown on one line of a message or a report: a foreign name may hold
    newlines, control characters or undecodable bytes; it is then quoted with escapes."""
    shown = name if name.isascii() and name.isprintable() else ascii(name)
    return shown if len(shown) <= MAX_SHOWN else shown[:MAX_SHOWN] + "…"
