"""Where Bunker keeps its files on this machine (XDG base directories respected).

- config dir (``$XDG_CONFIG_HOME/bunker``): key files, ``keys/<repo id>.master`` and ``.put``
- data dir (``$XDG_DATA_HOME/bunker``): the default local repository ``repo/``, ``spool/`` (one
  partial repository per unreachable upstream, until forwarded), and ``state/``
  (chain heads per repository and client: losing them weakens rollback detection)
- cache dir (``$XDG_CACHE_HOME/bunker``): files cache and index cache (rebuildable), per
  repository, certificate and dedup secret

Everything bunker makes below them is private to the user (0700 directories, 0600 files, whatever
the umask): private_files.py creates, writes and tightens them.
"""

from __future__ import annotations

import os

import blake3


def _base(env: str, default: str) -> str:
    v = os.environ.get(env)
    if v and os.path.isabs(v):
        return v
    return os.path.join(os.path.expanduser("~"), default)


def config_dir() -> str:
    return os.path.join(_base("XDG_CONFIG_HOME", ".config"), "bunker")


def data_dir() -> str:
    return os.path.join(_base("XDG_DATA_HOME", os.path.join(".local", "share")), "bunker")


def cache_dir() -> str:
    return os.path.join(_base("XDG_CACHE_HOME", ".cache"), "bunker")


def default_repository() -> str:
    return os.path.join(data_dir(), "repo")


def master_key_path(repo_id: str) -> str:
    return os.path.join(config_dir(), "keys", f"{repo_id}.master")


def put_key_path(repo_id: str) -> str:
    return os.path.join(config_dir(), "keys", f"{repo_id}.put")


def key_files() -> list[str]:
    """Every key file in this machine's key directory (``<repo id>.master`` and ``.put``), sorted."""
    d = os.path.join(config_dir(), "keys")
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return sorted(os.path.join(d, n) for n in names if n.endswith((".master", ".put")) and not n.startswith("."))


def client_cache_dir(repo_id: str, client_tag: str, domain_id: str = "") -> str:
    """A client's caches: per repository, certificate and (``domain_id``) the secret its chunk ids
    are made with; without ``domain_id``, the certificate's directory that holds them."""
    return os.path.join(cache_dir(), repo_id[:32], client_tag, *((domain_id,) if domain_id else ()))


def state_dir(repo_id: str, client_tag: str) -> str:
    return os.path.join(data_dir(), "state", repo_id[:32], client_tag)


def spool_dir(upstream_url: str) -> str:
    """The local spool for one upstream repository URL (objects waiting to be forwarded)."""
    return os.path.join(data_dir(), "spool", blake3.blake3(upstream_url.encode()).hexdigest()[:24])
