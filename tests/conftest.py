"""Fixtures: every test gets its own XDG directories, HOME and passphrase (never the real home),
and a repository made by the real `bunker init`."""

from __future__ import annotations

import fcntl
import hashlib
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
    rgw_unavailable,
    start_moto,
    start_rgw,
    start_sshd,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long stress runs (marked slow) first: with two xdist workers, one that drew a
    2-minute test last ran alone at the end while the other sat idle; started first, they run
    beside the many short tests, and the suite's end is short tests on both workers."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # (a stable sort)


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
    nobody from an environment made with the system's Python (nobody_environment), else as root
    without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (root then obeys file modes); a test that finds
    none of them is skipped with the reason, never failed for the machine's layout."""

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


# A prefix's last part: the command after it runs as it is, except the tests' BUNKER (which
# run_bunker puts after the prefix), which runs as bunker from the environment's python.
_LAUNCH = f"""import os, sys
if sys.argv[1] == {BUNKER!r}:
    del sys.argv[1]
    from bunker.cli.main import main
    main()
else:
    os.execvp(sys.argv[1], sys.argv[1:])
"""
_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _distribution_python() -> str | None:
    """The operating system's Python of this Python's version, if user nobody can run it."""
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (f"/usr/bin/{want}", f"/usr/local/bin/{want}"):
        if os.path.realpath(cand) == os.path.realpath(sys.executable) or not os.access(cand, os.X_OK):
            continue
        cp = subprocess.run([*_NOBODY, cand, "-c", ""], capture_output=True, timeout=30, check=False)
        if cp.returncode == 0:
            return cand
    return None


def _remove_stale_environments(where: Path, keep: Path) -> None:
    """Remove the environments of checkouts that are gone (each is a few hundred MB): those
    whose ``.source`` names a directory that no longer exists, or that have none (made before
    it was written)."""
    for venv in where.glob("venv-*"):
        if venv == keep:
            continue
        try:
            gone = not Path((venv / ".source").read_text()).is_dir()
        except OSError:
            gone = True
        if gone:
            shutil.rmtree(venv, ignore_errors=True)


def nobody_environment(where: Path) -> tuple[list[str], str]:
    """A prefix that runs bunker as user nobody from an environment made with the operating
    system's Python (for a machine whose own Python, e.g. a pyenv under a 0700 /root, is out of
    nobody's reach), or ([], why not). The environment (deps installed once with pip; kept in
    ``where`` across sessions) gets a fresh copy of this source's ``bunker`` package each time."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return [], "needs root and setpriv"
    py = _distribution_python()
    if py is None:
        return [], f"no python{sys.version_info.major}.{sys.version_info.minor} of the system that nobody can run"
    src = Path(__file__).resolve().parent.parent
    key = hashlib.sha256(f"{src}\0{py}".encode()).hexdigest()[:16]  # one per checkout and python
    venv = where / f"venv-{key}"
    _remove_stale_environments(where, venv)
    vpy = venv / "bin" / "python"
    ready = venv / ".deps-installed"
    # made again when the dependencies change (a checkout at the same path that gained one)
    deps = hashlib.sha256((src / "pyproject.toml").read_bytes()).hexdigest()
    if not ready.exists() or ready.read_text() != deps:
        shutil.rmtree(venv, ignore_errors=True)
        for cmd in ([py, "-m", "venv", str(venv)], [str(vpy), "-m", "pip", "install", "-q", str(src)]):
            cp = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            if cp.returncode != 0:
                return [], f"{' '.join(cmd[:3])}: {(cp.stderr or cp.stdout).strip()[-300:]}"
        ready.write_text(deps)
    (venv / ".source").write_text(str(src))
    # this checkout's code, copied in once per change of it (the workers of a session share it)
    package = src / "src" / "bunker"
    files = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    stamp = hashlib.sha256(b"".join(f"{p}\0{p.stat().st_mtime_ns}\0".encode() for p in files)).hexdigest()
    site = subprocess.run(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    copied = venv / ".code"
    if not copied.exists() or copied.read_text() != stamp:
        shutil.rmtree(Path(site) / "bunker", ignore_errors=True)
        shutil.copytree(package, Path(site) / "bunker", ignore=shutil.ignore_patterns("__pycache__"))
        copied.write_text(stamp)
    os.chmod(where, 0o755)
    return [*_NOBODY, str(vpy), "-c", _LAUNCH], ""


@pytest.fixture(scope="session")
def nobody_prefix() -> tuple[list[str], str]:
    """nobody_environment's answer (made once per session)."""
    where = Path(tempfile.gettempdir()) / "bunker-tests-nobody"
    where.mkdir(exist_ok=True)
    lock = where / ".lock"
    with open(lock, "w") as f:  # the test workers of one session share it
        fcntl.flock(f, fcntl.LOCK_EX)
        return nobody_environment(where)


@pytest.fixture
def unprivileged(nobody_prefix: tuple[list[str], str]) -> Iterator[Unprivileged]:
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
        if nobody_prefix[0]:  # this Python is out of nobody's reach: the system's Python is not
            candidates.append((nobody_prefix[0], True))
        if shutil.which("setpriv"):
            candidates.append((["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"], False))
        chosen = None
        os.chmod(base, 0o755)
        for prefix, as_nobody in candidates:
            if _probe(prefix, probe_env):
                chosen = (prefix, as_nobody)
                break
        if chosen is None:
            pytest.skip(
                "neither setpriv nor runuser can run bunker without root's file access here (an environment "
                f"from the system's Python for user nobody: {nobody_prefix[1] or 'made, but it did not run'})"
            )
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


def _server_env(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> dict[str, str]:
    for k in AWS_SCRUB:
        monkeypatch.delenv(k, raising=False)
    env = server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> dict[str, str]:
    """The moto server's credentials (and a short retry budget) in this process's environment,
    with the developer's own AWS settings removed."""
    return _server_env(monkeypatch, s3_server)


@pytest.fixture(scope="session")
def rgw_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 implementation: Ceph's RADOS Gateway on a throw-away one-node cluster (one per
    test worker, on free ports, ~2 s to start) with the bucket ``bunker-test``; skipped, saying
    what to install, where the launcher (helpers.RGW_SCRIPT) or Ceph is missing."""
    why = rgw_unavailable()
    if why is not None:
        pytest.skip(why)
    server = start_rgw(tmp_path_factory.mktemp("rgw"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rgw_env(monkeypatch: pytest.MonkeyPatch, rgw_server: S3Server) -> dict[str, str]:
    """As s3_env, for the RADOS Gateway."""
    return _server_env(monkeypatch, rgw_server)


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
