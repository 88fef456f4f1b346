"""Fixtures: every test gets its own XDG directories, HOME and passphrase (never the real home),
and a repository made by the real `bunker init`."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# hypothesis keeps caches in ./.hypothesis by default: keep the working tree clean
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "bunker-tests-hypothesis"))

from helpers import (  # noqa: E402
    AWS_SCRUB,
    BUNKER,
    SSH_SCRUB,
    Repo,
    S3Server,
    SshServer,
    init_repo,
    make_env,
    start_moto,
    start_sshd,
)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process code (fuzzing, storage tests) must not see the developer's bunker settings."""
    for k in ("BUNKER_REPO", "BUNKER_PASSPHRASE", "BUNKER_MASTER_KEY", "BUNKER_PUT_KEY", "BUNKER_NEW_PASSPHRASE"):
        monkeypatch.delenv(k, raising=False)
    for k, sub in (("XDG_DATA_HOME", "xdg-data"), ("XDG_CONFIG_HOME", "xdg-config"), ("XDG_CACHE_HOME", "xdg-cache")):
        monkeypatch.setenv(k, str(tmp_path / sub))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An isolated environment for subprocesses (XDG dirs and HOME under tmp_path)."""
    return make_env(tmp_path / "env")


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """A fresh repository (`bunker init`) with the master and put key in its own config dir."""
    return init_repo(tmp_path / "r")


def _probe(prefix: list[str], env: dict[str, str]) -> bool:
    try:
        cp = subprocess.run(
            [*prefix, BUNKER or "bunker", "--version"],
            env=env,
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return cp.returncode == 0


class Unprivileged:
    """How to run bunker without the right to read files that are not readable to their mode:
    as user nobody (setpriv/runuser) when the Python installation is reachable for it, else as
    root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (root then obeys file modes)."""

    def __init__(self, prefix: list[str], as_nobody: bool, base: Path) -> None:
        self.prefix = prefix
        self.as_nobody = as_nobody
        self.base = base

    def own(self, path: Path) -> None:
        """Make ``path`` (recursively) belong to the unprivileged user."""
        if not self.as_nobody:
            return
        for dirpath, dirnames, filenames in os.walk(path):
            os.chown(dirpath, 65534, 65534)
            for n in dirnames + filenames:
                os.chown(os.path.join(dirpath, n), 65534, 65534, follow_symlinks=False)


@pytest.fixture
def unprivileged() -> Iterator[Unprivileged]:
    if os.geteuid() != 0:
        base = Path(tempfile.mkdtemp(prefix="bunker-unpriv-"))
        try:
            yield Unprivileged([], False, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    # a base directory outside pytest's root-only tmp dir, so that user nobody can reach it
    base = Path(tempfile.mkdtemp(prefix="bunker-unpriv-", dir="/tmp"))
    try:
        probe_env = dict(os.environ, HOME=str(base))
        candidates: list[tuple[list[str], bool]] = []
        if shutil.which("setpriv"):
            candidates.append((["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], True))
        if shutil.which("runuser"):
            candidates.append((["runuser", "-u", "nobody", "--"], True))
        if shutil.which("setpriv"):
            candidates.append((["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"], False))
        chosen = None
        os.chmod(base, 0o755)
        for prefix, as_nobody in candidates:
            if _probe(prefix, probe_env):
                chosen = (prefix, as_nobody)
                break
        if chosen is None:
            pytest.skip("neither setpriv nor runuser can run bunker without root's file access here")
        yield Unprivileged(chosen[0], chosen[1], base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server process (one per test worker) with the bucket ``bunker-test``."""
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_prefix() -> str:
    """A prefix of the test bucket that no other test uses."""
    return "t-" + secrets.token_hex(6)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> dict[str, str]:
    """The moto server's credentials (and a short retry budget) in this process's environment,
    with the developer's own AWS settings removed."""
    for k in AWS_SCRUB:
        monkeypatch.delenv(k, raising=False)
    env = s3_server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A real OpenSSH sshd on 127.0.0.1 (one per test worker), logins as root with a generated key."""
    if os.geteuid() != 0:
        pytest.skip("the sftp tests start sshd, which needs root to log users in (CI runs the tests as root)")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sftp_env(monkeypatch: pytest.MonkeyPatch, sshd: SshServer, tmp_path: Path) -> dict[str, str]:
    """The test server's client key and known_hosts (BUNKER_SSH_*) and a short retry budget in this
    process's environment; no ssh-agent, and a HOME without the developer's ~/.ssh."""
    for k in SSH_SCRUB:
        monkeypatch.delenv(k, raising=False)
    home = tmp_path / "ssh-home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    env = sshd.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="session")
def webdav_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A wsgidav WebDAV server process (one per test worker) with basic auth, serving a directory."""
    from helpers import start_wsgidav

    server = start_wsgidav(tmp_path_factory.mktemp("wsgidav"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def webdav_env(monkeypatch: pytest.MonkeyPatch, webdav_server: Any) -> dict[str, str]:
    """The WebDAV test server's password and a short retry budget in this process's environment."""
    for k in ("BUNKER_WEBDAV_USER", "BUNKER_WEBDAV_PASSWORD", "BUNKER_WEBDAV_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    env: dict[str, str] = webdav_server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An Azurite blob service process (one per test worker, in memory) with the container
    ``bunker-test``; skipped where Azurite is not installed (scripts/test installs it with npm)."""
    from helpers import azurite_command, start_azurite

    if azurite_command() is None:
        pytest.skip("Azurite is not installed: run scripts/test, or `npm install --prefix .cache/azurite azurite`")
    server = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def azure_env(monkeypatch: pytest.MonkeyPatch, azurite: Any) -> dict[str, str]:
    """Azurite's connection string and a short retry budget in this process's environment, with
    the developer's own Azure settings removed."""
    from helpers import AZURE_SCRUB

    for k in AZURE_SCRUB:
        monkeypatch.delenv(k, raising=False)
    env: dict[str, str] = azurite.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
