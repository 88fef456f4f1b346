"""sftp repositories through asyncssh against a real OpenSSH sshd: URLs, the CLI end to end, host
key and login refusals, atomic and durable writes on the server, one channel per thread, stale
temp files, and connections that stall, drop or die (retried, or a clear StorageError)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bunker.errors import BunkerError, ExitCode, StorageError
from bunker.storage.sftp import SftpBackend, open_sftp, parse_sftp_url
from bunker.storage.url import open_backend
from helpers import (
    PASSWD_HOME_VAR,
    SFTP_SERVER,
    SSH_SCRUB,
    FlakyProxy,
    SshServer,
    check_children_never_see_the_passphrase,
    chown_to_user,
    compare_trees,
    describe,
    env_dumping_proxy,
    free_port,
    init_repo,
    js,
    make_env,
    make_tree,
    restored_path,
    run_bunker,
    ssh_keygen,
    start_sshd,
)

H = "0123456789abcdef" * 4
A = "packs/" + "a" * 64

# ------------------------------------------------------------------------------------------ URLs


def test_url_forms_and_canonical_form() -> None:
    loc = parse_sftp_url("sftp://backup@nas.example:2222/srv//bunker/repo/")
    assert (loc.user, loc.host, loc.port, loc.path) == ("backup", "nas.example", 2222, "/srv/bunker/repo")
    assert loc.url == "sftp://backup@nas.example:2222/srv/bunker/repo"
    assert parse_sftp_url(loc.url) == loc  # worker processes reopen the canonical URL
    # user and port may come from ~/.ssh/config or the defaults
    loc = parse_sftp_url("sftp://nas/backups")
    assert (loc.user, loc.port, loc.path, loc.url) == (None, None, "/backups", "sftp://nas/backups")
    # below the login directory
    loc = parse_sftp_url("sftp://u@nas/~/backups/laptop")
    assert (loc.path, loc.url) == ("backups/laptop", "sftp://u@nas/~/backups/laptop")
    assert parse_sftp_url("sftp://u@nas/~").path == "."
    # IPv6 and quoted characters
    loc = parse_sftp_url("sftp://u@[::1]:22/a%20b")
    assert (loc.host, loc.port, loc.path, loc.url) == ("::1", 22, "/a b", "sftp://u@[::1]:22/a%20b")
    assert loc.where == "sftp server [::1]:22, directory /a b"


@pytest.mark.parametrize(
    "url",
    [
        "sftp://user:secret@host/repo",  # a password in the URL
        "sftp://host",  # no directory
        "sftp://host/",
        "sftp://host/a/../b",
        "sftp://host/repo?identity=/tmp/k",  # no parameters
        "sftp://host:99999/repo",
        "sftp://host:port/repo",
        "sftp:///repo",
    ],
)
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(BunkerError) as exc:
        open_backend(url)
    assert exc.value.exit_code == ExitCode.USAGE, exc.value
    assert exc.value.hint


def test_sftp_settings_that_name_missing_files_are_refused(tmp_path: Path) -> None:
    for var in ("BUNKER_SSH_IDENTITY", "BUNKER_SSH_KNOWN_HOSTS"):
        with pytest.raises(BunkerError) as exc:
            open_sftp("sftp://127.0.0.1:1/repo", env={var: str(tmp_path / "nope")})
        assert exc.value.exit_code == ExitCode.USAGE and var in exc.value.message


# ------------------------------------------------------------------------------------ end to end


def _ssh_env(base: Path, sshd: SshServer, *, defaults: bool = True, **extra: str) -> dict[str, str]:
    """An isolated environment for the CLI; ``defaults``: the key and known_hosts live in ~/.ssh
    of a home directory of the test's own, given to bunker as its passwd entry's home (as for a
    user, whose $HOME is that too; run_bunker runs it so), else through BUNKER_SSH_*."""
    env = make_env(base)
    for k in SSH_SCRUB:
        env.pop(k, None)
    if defaults:
        home = base / "passwd-home"
        sshd.install_home(home)
        env[PASSWD_HOME_VAR] = str(home)
        env.update({k: v for k, v in sshd.env().items() if not k.startswith("BUNKER_SSH_")})
    else:
        env.update(sshd.env())
    env.update(extra)
    return env


def _assert_clear(cp: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert cp.returncode == code, describe(cp)
    assert "Traceback" not in cp.stderr, cp.stderr
    assert "next step:" in cp.stderr, cp.stderr
    for n in needles:
        assert n in cp.stderr, cp.stderr


def test_init_backup_restore_check_over_sftp(sshd: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "server" / "deep" / "repo"  # `init` makes the directories (mkdir -p)
    url = sshd.url(remote)
    repo = init_repo(tmp_path / "r", url=url, env_extra=_ssh_env(tmp_path / "r", sshd))
    assert sorted(p.name for p in remote.iterdir() if p.is_dir()) == sorted(
        [
            *("clients", "config", "gc", "index", "nodes", "packs", "policy", "refs", "retired", "sessions"),
            *("snapshots", "status"),
        ]
    )
    src = tmp_path / "src"
    files = make_tree(src)
    doc = repo.backup(src)
    assert doc["stats"]["files"] == len(files) and doc["stats"]["errors"] == 0
    assert doc["repository"] == url
    assert repo.backup(src)["stats"]["files_new"] == 0

    target = tmp_path / "target"
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    assert js(repo.ok("check", "--keyless", "--expect", repo.id, "--json"))["ok"] is True

    # the objects are on the server, private to the login user, with no temp file left behind
    packs = [p for p in (remote / "packs").iterdir()]
    assert packs and not [p for p in remote.rglob(".tmp-*")]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in packs)

    # `init` refuses a directory that holds a repository
    cp = run_bunker("init", "--repo", url, "--client", "again", env=repo.env)
    _assert_clear(cp, ExitCode.BAD_REPOSITORY, "already exists")


def test_repository_url_from_the_environment_with_bunker_ssh_variables(sshd: SshServer, tmp_path: Path) -> None:
    """BUNKER_REPO=sftp://..., the key and known_hosts given by BUNKER_SSH_IDENTITY and
    BUNKER_SSH_KNOWN_HOSTS (nothing in ~/.ssh)."""
    env = _ssh_env(tmp_path / "e", sshd, defaults=False)
    env["BUNKER_REPO"] = sshd.url(tmp_path / "server")
    assert js(run_bunker("init", "--client", "c", "--json", env=env))["id"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"hello sftp\n" * 1000)
    cp = run_bunker("backup", str(tmp_path / "d"), "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    cp = run_bunker("restore", "latest", "--target", str(tmp_path / "t"), env=env)
    assert cp.returncode == 0, describe(cp)
    assert (restored_path(tmp_path / "t", tmp_path / "d") / "f").read_bytes() == b"hello sftp\n" * 1000


def test_no_repository_at_the_path(sshd: SshServer, tmp_path: Path) -> None:
    env = _ssh_env(tmp_path / "e", sshd)
    cp = run_bunker("check", "--keyless", "--repo", sshd.url(tmp_path / "nothing-here"), env=env)
    _assert_clear(cp, ExitCode.NO_REPOSITORY, "no repository at", str(tmp_path / "nothing-here"))


# ------------------------------------------------------------------------- trust and login refused


def test_unknown_host_key_is_refused_with_its_fingerprint(sshd: SshServer, tmp_path: Path) -> None:
    env = _ssh_env(tmp_path / "e", sshd)
    known_hosts = Path(env[PASSWD_HOME_VAR]) / ".ssh" / "known_hosts"
    known_hosts.write_text("")
    remote = tmp_path / "server"
    cp = run_bunker("init", "--repo", sshd.url(remote), "--client", "c", env=env, timeout=60)
    keyscan = f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}"
    _assert_clear(cp, ExitCode.FATAL, "host key is unknown", sshd.fingerprint(), f"127.0.0.1:{sshd.port}", keyscan)
    assert not remote.exists()  # nothing was sent
    assert not list((tmp_path / "e" / "config").rglob("*.master"))  # no key made for a refused repository

    # a key that differs from the recorded one: a possible man-in-the-middle, said as such
    other = ssh_keygen(tmp_path / "other_host_key")
    key_type, key_b64 = other.with_suffix(".pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key_b64}\n")
    cp = run_bunker("check", "--keyless", "--repo", sshd.url(remote), env=env, timeout=60)
    _assert_clear(cp, ExitCode.FATAL, "host key changed", sshd.fingerprint(), "ssh-keygen -R", "intercepting")

    # the suggested command, run as it is printed, makes the server trusted
    known_hosts.write_text("")
    subprocess.run(["sh", "-c", keyscan], check=True, capture_output=True, timeout=30)
    cp = run_bunker("init", "--repo", sshd.url(remote), "--client", "c", env=env, timeout=60)
    assert cp.returncode == 0, describe(cp)


def test_ssh_config_cannot_turn_host_key_checking_off(sshd: SshServer, tmp_path: Path) -> None:
    """~/.ssh/config says UserKnownHostsFile none and StrictHostKeyChecking no (asyncssh alone
    would then accept any key): bunker still checks the server's key against the one file it
    reads, refuses an unknown key with the host, the fingerprint, that file and the ssh-keyscan
    line, and works once the key is in that file."""
    env = _ssh_env(tmp_path / "e", sshd)
    ssh = Path(env[PASSWD_HOME_VAR]) / ".ssh"
    known_hosts = ssh / "known_hosts"
    known_hosts.unlink()
    (ssh / "config").write_text("Host *\n    UserKnownHostsFile none\n    StrictHostKeyChecking no\n")
    remote = tmp_path / "server"
    cp = run_bunker("init", "--repo", sshd.url(remote), "--client", "c", env=env, timeout=60)
    keyscan = f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}"
    _assert_clear(
        cp,
        ExitCode.FATAL,
        "host key is unknown",
        f"127.0.0.1:{sshd.port}",
        sshd.fingerprint(),
        str(known_hosts),
        keyscan,
    )
    assert not remote.exists()  # nothing was sent

    subprocess.run(["sh", "-c", keyscan], check=True, capture_output=True, timeout=30)
    cp = run_bunker("init", "--repo", sshd.url(remote), "--client", "c", env=env, timeout=60)
    assert cp.returncode == 0, describe(cp)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"checked\n")
    cp = run_bunker("backup", tmp_path / "d", "--repo", sshd.url(remote), env=env, timeout=60)
    assert cp.returncode in (0, 1), describe(cp)


def test_proxy_command_never_sees_the_passphrase(sshd: SshServer, tmp_path: Path) -> None:
    """A ProxyCommand from ~/.ssh/config that records its environment, for every connection of
    init, backup and restore (whose worker processes connect too): BUNKER_PASSPHRASE and
    BUNKER_NEW_PASSPHRASE are never in it, nor the passphrase's text."""
    dump = tmp_path / "proxy-env.jsonl"
    env = _ssh_env(tmp_path / "e", sshd, BUNKER_NEW_PASSPHRASE="another secret phrase", PROXY_TEST_MARK="seen")
    ssh = Path(env[PASSWD_HOME_VAR]) / ".ssh"
    (ssh / "config").write_text(f"Host 127.0.0.1\n    ProxyCommand {env_dumping_proxy(tmp_path, dump)}\n")
    check_children_never_see_the_passphrase(sshd.url(tmp_path / "server"), env, dump, tmp_path)


def test_login_refused_is_a_clear_error(sshd: SshServer, tmp_path: Path) -> None:
    env = _ssh_env(tmp_path / "e", sshd)
    ssh = Path(env[PASSWD_HOME_VAR]) / ".ssh"
    ssh_keygen(tmp_path / "stranger")  # a key the server does not know
    shutil.copyfile(tmp_path / "stranger", ssh / "id_ed25519")
    shutil.copyfile(tmp_path / "stranger.pub", ssh / "id_ed25519.pub")
    t0 = time.monotonic()
    cp = run_bunker("init", "--repo", sshd.url(tmp_path / "server"), "--client", "c", env=env, timeout=60)
    assert time.monotonic() - t0 < 20  # refused at once, not retried
    _assert_clear(cp, ExitCode.FATAL, "refused the login", "authorized_keys", f"ssh -p {sshd.port} root@127.0.0.1")


# ------------------------------------------------------------------------------ unreachable servers


def test_unreachable_port_is_a_clear_error_in_bounded_time(tmp_path: Path, sshd: SshServer) -> None:
    port = free_port()  # nothing listens there
    url = f"sftp://root@127.0.0.1:{port}/srv/repo"
    env = _ssh_env(tmp_path / "e", sshd)
    for args in (("init", "--client", "c"), ("backup", str(tmp_path / "e")), ("check", "--keyless")):
        t0 = time.monotonic()
        cp = run_bunker(*args, "--repo", url, env=env, timeout=60)
        assert time.monotonic() - t0 < 30
        _assert_clear(cp, ExitCode.NO_REPOSITORY, f"127.0.0.1:{port}", "/srv/repo", "Connection refused")
        # nothing listens: a short try, not the backoff (issue 11 point 18; test_no_answer.py)
        assert "nothing answers there" in cp.stderr and f"ssh -p {port} root@127.0.0.1" in cp.stderr
    assert js(run_bunker("check", "--keyless", "--json", "--repo", url, env=env))["exit_code"] == ExitCode.NO_REPOSITORY


def test_a_stalled_server_does_not_hang(
    sshd: SshServer, sftp_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUNKER_STORAGE_RETRIES", "1")
    monkeypatch.setenv("BUNKER_STORAGE_TIMEOUT", "0.5")
    proxy = FlakyProxy(sshd.port, faults=1000, mode="stall")  # accepts, never answers
    known = sshd.known_hosts.read_text().replace(f":{sshd.port} ", f":{proxy.port} ")
    (tmp_path / "kh").write_text(known)
    monkeypatch.setenv("BUNKER_SSH_KNOWN_HOSTS", str(tmp_path / "kh"))
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as exc:
            open_sftp(f"sftp://root@127.0.0.1:{proxy.port}{tmp_path / 'repo'}", create=True)
        assert time.monotonic() - t0 < 10
        assert exc.value.exit_code == ExitCode.NO_REPOSITORY
        assert proxy.spoiled == 2  # the first attempt and one retry
    finally:
        proxy.close()


def test_dropped_connections_are_retried(
    sshd: SshServer, sftp_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUNKER_STORAGE_RETRIES", "4")
    proxy = FlakyProxy(sshd.port, faults=3, mode="drop")
    known = sshd.known_hosts.read_text().replace(f":{sshd.port} ", f":{proxy.port} ")
    (tmp_path / "kh").write_text(known)
    monkeypatch.setenv("BUNKER_SSH_KNOWN_HOSTS", str(tmp_path / "kh"))
    try:
        b = open_sftp(f"sftp://root@127.0.0.1:{proxy.port}{tmp_path / 'repo'}", create=True)
        assert proxy.spoiled == 3
        assert b.put(A, b"survives a flaky network") is True
        assert b.get(A) == b"survives a flaky network"
        b.close()
    finally:
        proxy.close()


def _wait_for_temp_file(d: Path, t: threading.Thread, timeout: float = 20) -> Path | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and t.is_alive():
        found = list(d.glob(".tmp-*"))
        if found:
            return found[0]
        time.sleep(0.001)
    return None


def test_connections_killed_mid_put_and_before_a_listing_are_retried(
    sshd: SshServer, sftp_env: dict[str, str], tmp_path: Path
) -> None:
    remote = tmp_path / "repo"
    b = open_sftp(sshd.url(remote), create=True)
    data = os.urandom(48 << 20)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(b.put(A, data)))
    t.start()
    assert _wait_for_temp_file(remote / "packs", t) is not None, "the upload never started"
    assert sshd.drop_connections() > 0  # every connection of this server dies mid-upload
    t.join(60)
    assert result == [True]
    assert (remote / "packs" / A[6:]).read_bytes() == data
    assert not list(remote.rglob(".tmp-*"))  # the retry removed the first attempt's temp file

    names = [f"index/{i:064x}" for i in range(300)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: b.put(n, b"i"), names))
    assert sshd.drop_connections() > 0
    assert sorted(i.name for i in b.list("index/")) == names
    b.close()


def test_a_connection_that_hangs_mid_put_is_given_up_and_replaced(
    sshd: SshServer, sftp_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUNKER_STORAGE_TIMEOUT", "1")  # each 4 MiB piece within 2 s
    remote = tmp_path / "repo"
    b = open_sftp(sshd.url(remote), create=True)
    data = os.urandom(48 << 20)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(b.put(A, data)))
    t.start()
    try:
        assert _wait_for_temp_file(remote / "packs", t) is not None, "the upload never started"
        t0 = time.monotonic()
        assert sshd.freeze_connections()  # the server side of the connection hangs, the listener answers
        t.join(30)
        assert result == [True] and time.monotonic() - t0 < 20
    finally:
        sshd.drop_connections()
    assert (remote / "packs" / A[6:]).read_bytes() == data
    b.close()


def test_server_gone_mid_put_is_a_storage_error(
    sftp_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_sshd(tmp_path / "own-sshd")  # this test kills it
    try:
        monkeypatch.setenv("BUNKER_SSH_KNOWN_HOSTS", str(server.known_hosts))
        monkeypatch.setenv("BUNKER_SSH_IDENTITY", str(server.client_key))
        remote = tmp_path / "repo"
        b = open_sftp(server.url(remote), create=True)
        errors: list[BaseException] = []

        def put() -> None:
            try:
                b.put(A, os.urandom(48 << 20))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=put)
        t.start()
        assert _wait_for_temp_file(remote / "packs", t) is not None, "the upload never started"
        t0 = time.monotonic()
        server.stop()
        t.join(60)
        assert time.monotonic() - t0 < 20
        assert len(errors) == 1 and isinstance(errors[0], StorageError), errors
        e = errors[0]
        assert e.exit_code == ExitCode.NO_REPOSITORY
        for needle in (A, f"127.0.0.1:{server.port}", str(remote), "Connection refused"):
            assert needle in e.message, e.message
        assert "BUNKER_STORAGE_RETRIES" in e.hint
        assert not (remote / A).exists()  # never half an object under its name

        # the server comes back while the backend retries: the request goes through
        monkeypatch.setenv("BUNKER_STORAGE_RETRIES", "8")
        monkeypatch.setenv("BUNKER_STORAGE_RETRY_DELAY", "0.1")
        server.start()
        b2 = open_sftp(server.url(remote))  # a new backend reads the retry settings
        server.stop()
        threading.Timer(0.5, server.start).start()
        assert sorted(i.name for i in b2.list("packs/")) == []
        assert b2.put(A, b"after the restart") is True
        b.close()
        b2.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- how objects are written


def test_writes_are_temp_fsync_rename_and_create_if_absent_links(
    sftp_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the server saw, from the request log of Debian's sftp-server (a server of its own,
    with a user whose login shell runs no startup file)."""
    if not os.access(SFTP_SERVER, os.X_OK) or not shutil.which("useradd"):
        pytest.skip(f"needs {SFTP_SERVER} (openssh-sftp-server) and useradd for the request log")
    base = Path(tempfile.mkdtemp(prefix="bunker-sftp-log-", dir="/tmp"))  # reachable for the login user
    os.chmod(base, 0o755)
    server = start_sshd(base / "sshd", request_log=True)
    try:
        monkeypatch.setenv("BUNKER_SSH_IDENTITY", str(server.client_key))
        monkeypatch.setenv("BUNKER_SSH_KNOWN_HOSTS", str(server.known_hosts))
        remote = base / "repo"
        chown_to_user(remote, server.user)
        b = open_sftp(server.url(remote), create=True)
        assert b.capabilities().create_if_absent is True
        assert b.put(A, b"durable") is True
        assert b.put("packs/" + H, b"only once", if_absent=True) is True
        assert b.put("packs/" + H, b"refused", if_absent=True) is False
        assert b.get("packs/" + H) == b"only once"
        b.close()
        assert server.sftp_log is not None
        log = [line for line in server.sftp_log.read_text("utf-8", "replace").splitlines() if str(remote) in line]
        final = str(remote / A)
        rename = next(i for i, line in enumerate(log) if line.startswith("posix-rename") and f'new "{final}"' in line)
        tmp = re.search(r'old "([^"]+)"', log[rename])
        assert tmp and os.path.dirname(tmp.group(1)) == str(remote / "packs") and "/.tmp-" in tmp.group(1)
        ops = [line.split(" ", 1)[0] for line in log[:rename] if f'"{tmp.group(1)}"' in line]
        assert ops == ["open", "fsync", "close"], log
        opened = next(line for line in log if line.startswith("open") and tmp.group(1) in line)
        assert "flags WRITE,CREATE,EXCL mode 0600" in opened
        links = [line for line in log if line.startswith("hardlink") and f'new "{remote / "packs" / H}"' in line]
        assert len(links) == 2, log  # the second one was refused: the name existed
        assert not list(remote.rglob(".tmp-*"))
        assert (remote / "packs" / H).stat().st_uid == pwd.getpwnam(server.user).pw_uid
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_each_thread_gets_its_own_channel_on_several_connections(
    sftp_env: dict[str, str], sshd: SshServer, tmp_path: Path
) -> None:
    """24 threads: more channels than OpenSSH allows on one connection (10 sessions)."""
    b = open_sftp(sshd.url(tmp_path / "repo"), create=True)
    assert isinstance(b, SftpBackend)
    names = [f"index/{i:064x}" for i in range(96)]
    seen: dict[int, set[int]] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(24)

    def one(name: str) -> bytes:
        b.put(name, name.encode())
        chan = b._pool._channels[threading.current_thread()]
        with lock:
            seen.setdefault(id(chan), set()).add(threading.get_ident())
        return b.get(name)

    def first(name: str) -> bytes:
        barrier.wait(10)  # all 24 threads hold a channel at once
        return one(name)

    with ThreadPoolExecutor(24) as pool:
        assert list(pool.map(first, names[:24])) == [n.encode() for n in names[:24]]
        assert list(pool.map(one, names[24:])) == [n.encode() for n in names[24:]]
    assert all(len(threads) == 1 for threads in seen.values()), seen  # never one channel for two threads
    assert len(seen) == 24
    assert len(b._pool._links) >= 3
    assert sorted(i.name for i in b.list("index/")) == names
    b.close()


def test_stale_temp_files_are_swept(sshd: SshServer, sftp_env: dict[str, str], tmp_path: Path) -> None:
    remote = tmp_path / "repo"
    b = open_sftp(sshd.url(remote), create=True)
    old = time.time() - 7200
    stale = [remote / ".tmp-0001", remote / "packs" / ".tmp-0002", remote / "index" / ".tmp-0003"]
    fresh = remote / "packs" / ".tmp-0004"
    for p in [*stale, fresh]:
        p.write_bytes(b"killed writer")
    for p in stale:
        os.utime(p, (old, old))
    assert [i.name for i in b.list("packs/")] == []  # temp files are no objects
    assert b.sweep_temp_files() == 3
    assert fresh.exists() and not any(p.exists() for p in stale)
    b.close()

    # a writer sweeps by itself, in the background, once it writes
    for p in stale:
        p.write_bytes(b"killed writer")
        os.utime(p, (old, old))
    b = open_sftp(sshd.url(remote))
    assert all(p.exists() for p in stale)  # opening alone (restore workers...) lists nothing
    b.put(A, b"x")
    deadline = time.monotonic() + 10
    while any(p.exists() for p in stale) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.exists() for p in stale) and fresh.exists()
    b.close()


def test_permission_problems_are_clear(sshd: SshServer, sftp_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"not a directory")
    with pytest.raises(BunkerError) as exc:
        open_sftp(sshd.url(tmp_path / "a-file" / "repo"), create=True)
    assert exc.value.exit_code == ExitCode.FATAL and str(tmp_path / "a-file") in str(exc.value)
    with pytest.raises(BunkerError) as exc:
        open_sftp(sshd.url(tmp_path / "a-file"))
    assert exc.value.exit_code == ExitCode.NO_REPOSITORY and "is no directory" in exc.value.message
