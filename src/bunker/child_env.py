"""Secrets in the environment (BUNKER_PASSPHRASE, BUNKER_NEW_PASSPHRASE) stay in bunker's own
process: no child process bunker starts inherits them (docs/security.md, "Passphrases in the
environment").

The command takes them out of ``os.environ`` before it does anything else, so that every child
(ssh and its ProxyCommand, asyncssh's ProxyCommand, worker processes, the forkserver) starts
without them, including children started by libraries that take no environment argument. The
values stay readable in this process through :func:`secret`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SECRET_VARS = ("BUNKER_PASSPHRASE", "BUNKER_NEW_PASSPHRASE")

_withheld: dict[str, str] = {}


def withhold_secrets() -> None:
    """Move the secret variables from ``os.environ`` (and the C environment that children
    inherit) into this process's memory."""
    _withheld.clear()
    for name in SECRET_VARS:
        value = os.environ.pop(name, None)
        if value is not None:
            _withheld[name] = value


def secret(name: str) -> str | None:
    """The value of a secret variable: as set now, else as it was when withheld."""
    value = os.environ.get(name)
    return value if value is not None else _withheld.get(name)


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) without the secret variables: the
    environment to give a child process explicitly."""
    source = os.environ if env is None else env
    return {k: v for k, v in source.items() if k not in SECRET_VARS}
