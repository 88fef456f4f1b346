"""Storage layer: a small backend interface and its implementations."""

from bunker.storage.backend import Backend, Capabilities, ObjectInfo, validate_name
from bunker.storage.url import open_backend

__all__ = ["Backend", "Capabilities", "ObjectInfo", "open_backend", "validate_name"]
