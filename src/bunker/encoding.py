"""Canonical msgpack encoding and bounded decoding of untrusted bytes.

Canonical means: maps are written with their keys sorted, so equal values always give equal bytes
(trees and reference objects dedup). Decoding never trusts lengths: msgpack's own limits are set
from the size of the input, and every structural check failure becomes :class:`FormatError`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import msgpack


class FormatError(ValueError):
    """Bytes that do not have the expected structure."""


_SCALAR = frozenset((bytes, str, int, float, bool, type(None)))


def _canon(value: Any) -> Any:
    t = type(value)
    if t is dict:
        return {k: (v if type(v) in _SCALAR else _canon(v)) for k, v in sorted(value.items())}
    if t is list or t is tuple:
        return [v if type(v) in _SCALAR else _canon(v) for v in value]
    if isinstance(value, dict):
        return _canon(dict(value))
    if isinstance(value, (list, tuple)):
        return _canon(list(value))
    return value


def pack(value: Any) -> bytes:
    """Encode ``value`` canonically (sorted map keys, bin for bytes, str for text)."""
    return msgpack.packb(_canon(value), use_bin_type=True)  # type: ignore[no-any-return]


def pack_local(value: Any) -> bytes:
    """Encode ``value`` for this machine's own caches: no canonical form (nothing signs, hashes or
    compares these bytes), so no pass over it first (~4x faster than :func:`pack`)."""
    return pack_ordered(value)


def pack_ordered(value: Any) -> bytes:
    """Encode ``value`` as is: the caller guarantees every map's keys are already sorted."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _limits(n: int) -> dict[str, Any]:
    """msgpack's options for decoding ``n`` untrusted bytes: no length may claim more than the
    input holds (msgpack would allocate for it first)."""
    return {
        "raw": False,
        "strict_map_key": False,
        "use_list": True,
        "max_bin_len": n,
        "max_str_len": n,
        "max_array_len": n,
        "max_map_len": n // 2 + 1,
        "max_ext_len": 0,
    }


def unpack(data: bytes | memoryview) -> Any:
    """Decode msgpack from untrusted bytes; raise FormatError on anything malformed."""
    try:
        return msgpack.unpackb(data, **_limits(len(data)))
    except Exception as exc:  # msgpack raises many types on bad input
        raise FormatError(f"not valid msgpack ({type(exc).__name__}: {exc})") from None


def stream(data: bytes | memoryview, start: int = 0) -> msgpack.Unpacker:
    """A decoder that reads untrusted ``data`` (from offset ``start``) one item at a time, with
    :func:`unpack`'s limits: for objects too large to decode whole at once (an index object's
    100,000 entries). Use it inside :func:`malformed`, which turns its errors into FormatError."""
    n = len(data)
    f = io.BytesIO(data)  # shares ``data``'s buffer: nothing is copied
    f.seek(start)
    return msgpack.Unpacker(f, read_size=min(n, 1 << 18) or 1, max_buffer_size=n or 1, **_limits(n))


@contextlib.contextmanager
def malformed() -> Iterator[None]:
    """Turn what a :func:`stream` decoder raises on bad input into FormatError."""
    try:
        yield
    except FormatError:
        raise
    except Exception as exc:  # msgpack raises many types on bad input
        raise FormatError(f"not valid msgpack ({type(exc).__name__}: {exc})") from None


def expect_map(value: Any, *keys: str) -> dict[str, Any]:
    """Return ``value`` as a dict that has at least ``keys``, or raise FormatError."""
    if not isinstance(value, dict):
        raise FormatError(f"expected a map, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise FormatError(f"missing field(s): {', '.join(missing)}")
    return value


def field(m: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    """Return ``m[key]`` checked against ``typ`` (bool is never accepted as int)."""
    if key not in m:
        raise FormatError(f"missing field {key!r}")
    v = m[key]
    if isinstance(v, bool) and typ is int:
        raise FormatError(f"field {key!r} has the wrong type")
    if not isinstance(v, typ):
        raise FormatError(f"field {key!r} has the wrong type ({type(v).__name__})")
    return v


def field_bytes(m: dict[str, Any], key: str, size: int | None = None) -> bytes:
    """Return a bytes field, optionally of an exact size."""
    v: bytes = field(m, key, bytes)
    if size is not None and len(v) != size:
        raise FormatError(f"field {key!r} must be {size} bytes, is {len(v)}")
    return v
