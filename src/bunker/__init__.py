"""Bunker: secure, deduplicating backups that need no password to take."""

__version__ = "0.1.0"
