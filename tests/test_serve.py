"""`bunker serve` and the ssh:// and unix:// backends: the CLI end to end over a real OpenSSH sshd
and a real `bunker serve --socket` process, append-only, a forced command restricting the path,
hostile and broken peers on both sides of the protocol, and connections that drop mid-backup."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bunker import encoding
from bunker.errors import BunkerError, ExitCode, ObjectMissing, StorageError
from bunker.repo.config import FORMAT_VERSION
from bunker.storage import wire
from bunker.storage.remote import RemoteBackend, ServerRefused, open_remote, parse_remote_url
from helpers import (
    BUNKER,
    SSH_SCRUB,
    FlakyProxy,
    SshServer,
    b3,
    check_children_never_see_the_passphrase,
    compare_trees,
    describe,
    env_dumping_proxy,
    init_repo,
    js,
    make_env,
    make_tree,
    restored_path,
    run_bunker,
    ssh_with_config,
    start_sshd,
)

A = "packs/" + "a" * 64


def _env(base: Path, sshd: SshServer | None = None, **extra: str) -> dict[str, str]:
    """An isolated CLI environment; with ``sshd``: its key and known_hosts through BUNKER_SSH_*
    (OpenSSH reads ~/.ssh of the passwd entry, never $HOME)."""
    env = make_env(base)
    for k in SSH_SCRUB:
        env.pop(k, None)
    if sshd is not None:
        env.update(sshd.env())
    env.update(extra)
    return env


def _ssh_url(sshd: SshServer, path: Path | str) -> str:
    return f"ssh://root@127.0.0.1:{sshd.port}{path}"


def _clean(doc: dict[str, Any]) -> bool:
    """A backup that ended at ok, or at note only because the test's master key sits on the client."""
    return bool(doc["level"] == "ok" or {e["code"] for e in doc["events"]} == {"master-key-on-client"})


def _assert_clear(cp: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert cp.returncode == code, describe(cp)
    assert "Traceback" not in cp.stderr, cp.stderr
    assert "next step:" in cp.stderr, cp.stderr
    for n in needles:
        assert n in cp.stderr, cp.stderr


@pytest.fixture
def remote_env(sshd: SshServer, sftp_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """In-process: the test sshd's key and known_hosts, and this Python's bunker on the far side."""
    assert BUNKER
    monkeypatch.setenv("BUNKER_REMOTE_PATH", BUNKER)
    return {**sftp_env, "BUNKER_REMOTE_PATH": BUNKER}


class ServeProcess:
    """`bunker serve --socket` as its own process."""

    def __init__(self, sock: Path, repo: Path, *args: str) -> None:
        assert BUNKER
        self.sock, self.repo = sock, repo
        self.proc = subprocess.Popen(
            [BUNKER, "serve", "--socket", str(sock), "--repo", str(repo), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        return err.decode()


@pytest.fixture
def serve_socket(tmp_path: Path) -> Iterator[ServeProcess]:
    p = ServeProcess(tmp_path / "bunker.sock", tmp_path / "served")
    yield p
    p.stop()
    assert not p.sock.exists()  # removed on SIGTERM


# ------------------------------------------------------------------------------------------ URLs


def test_url_forms() -> None:
    loc = parse_remote_url("ssh://backup@nas.example:2222/srv//bunker/alice/")
    assert (loc.user, loc.host, loc.port, loc.path) == ("backup", "nas.example", 2222, "/srv/bunker/alice")
    assert loc.url == "ssh://backup@nas.example:2222/srv/bunker/alice" and parse_remote_url(loc.url) == loc
    assert parse_remote_url("ssh://nas/~/b").path == "b" and parse_remote_url("ssh://nas/~").url == "ssh://nas/~"
    loc = parse_remote_url("unix:///run/bunker/alice.sock")
    assert (loc.scheme, loc.path, loc.url) == ("unix", "/run/bunker/alice.sock", "unix:///run/bunker/alice.sock")
    for bad in (
        "ssh://u:pw@h/r",
        "ssh://h",
        "ssh://h/a/../b",
        "ssh://-oProxyCommand=x/r",
        "unix://host/s",
        "ssh://h/r?x=1",
    ):
        with pytest.raises(BunkerError) as exc:
            parse_remote_url(bad)
        assert exc.value.exit_code == ExitCode.USAGE, bad


# ------------------------------------------------------------------------------- the CLI end to end


def test_backup_and_restore_over_ssh(sshd: SshServer, tmp_path: Path) -> None:
    assert BUNKER
    remote = tmp_path / "server" / "repo"
    url = _ssh_url(sshd, remote)
    env = _env(tmp_path / "r", sshd)
    cp = run_bunker("init", "--repo", url, "--client", "c", "--remote-path", BUNKER, "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    assert (remote / "config").is_dir()
    src = tmp_path / "src"
    files = make_tree(src)
    env_rp = {**env, "BUNKER_REMOTE_PATH": BUNKER}
    doc = js(run_bunker("backup", src, "--repo", url, "--json", env=env_rp))
    assert _clean(doc) and doc["stats"]["files"] == len(files) and doc["repository"] == url, doc
    # restore with the option only: its worker processes reopen the URL and need the same command
    target = tmp_path / "target"
    cp = run_bunker("restore", "latest", "--target", target, "--repo", url, "--remote-path", BUNKER, env=env)
    assert cp.returncode == 0, describe(cp)
    compare_trees(src, restored_path(target, src))
    assert js(run_bunker("check", "--keyless", "--json", "--repo", url, env=env_rp))["ok"] is True


def test_backup_and_restore_over_a_unix_socket(serve_socket: ServeProcess, tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r", url=serve_socket.url)
    src = tmp_path / "src"
    make_tree(src)
    assert _clean(repo.backup(src))
    assert repo.backup(src)["stats"]["files_new"] == 0
    target = tmp_path / "target"
    repo.ok("restore", "latest", "--target", target)
    compare_trees(src, restored_path(target, src))
    assert sorted(p.name for p in (serve_socket.repo / "packs").iterdir())  # stored where the server said


def test_ssh_failures_name_the_next_step(sshd: SshServer, tmp_path: Path) -> None:
    assert BUNKER
    url = _ssh_url(sshd, tmp_path / "server")
    # no bunker on the far side under that name
    env = _env(tmp_path / "a", sshd, BUNKER_REMOTE_PATH="bunker-not-installed")
    cp = run_bunker("init", "--repo", url, "--client", "c", env=env, timeout=60)
    _assert_clear(cp, ExitCode.FATAL, "no command `bunker-not-installed`", "--remote-path", "BUNKER_REMOTE_PATH")
    # unknown host key: its fingerprint and the keyscan command
    kh = tmp_path / "empty_known_hosts"
    kh.write_text("")
    env = _env(tmp_path / "b", sshd, BUNKER_SSH_KNOWN_HOSTS=str(kh), BUNKER_REMOTE_PATH=BUNKER)
    cp = run_bunker("init", "--repo", url, "--client", "c", env=env, timeout=60)
    _assert_clear(cp, ExitCode.FATAL, "host key is unknown", sshd.fingerprint(), f"ssh-keyscan -p {sshd.port}")
    # a changed host key
    from helpers import ssh_keygen

    other = ssh_keygen(tmp_path / "other_host_key")
    key_type, key_b64 = other.with_suffix(".pub").read_text().split()[:2]
    kh.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key_b64}\n")
    cp = run_bunker("check", "--keyless", "--repo", url, env=env, timeout=60)
    _assert_clear(cp, ExitCode.FATAL, "host key changed", sshd.fingerprint(), "ssh-keygen -R")
    # a key the server does not accept: refused at once, not retried
    stranger = ssh_keygen(tmp_path / "stranger")
    env = _env(tmp_path / "c", sshd, BUNKER_SSH_IDENTITY=str(stranger), BUNKER_REMOTE_PATH=BUNKER)
    t0 = time.monotonic()
    cp = run_bunker("init", "--repo", url, "--client", "c", env=env, timeout=60)
    assert time.monotonic() - t0 < 15
    _assert_clear(cp, ExitCode.FATAL, "refused the login", "authorized_keys", f"ssh -p {sshd.port} root@127.0.0.1")
    # no repository at that path
    env = _env(tmp_path / "d", sshd, BUNKER_REMOTE_PATH=BUNKER)
    cp = run_bunker("check", "--keyless", "--repo", url, env=env, timeout=60)
    _assert_clear(cp, ExitCode.NO_REPOSITORY, "no repository at", str(tmp_path / "server"))


@pytest.mark.parametrize("strict", ["no", "accept-new"])
def test_ssh_config_cannot_turn_host_key_checking_off(sshd: SshServer, tmp_path: Path, strict: str) -> None:
    """The user's ssh config says StrictHostKeyChecking no (or accept-new) and UserKnownHostsFile
    /dev/null: bunker's ssh still refuses a key that is not in the file bunker names, adds
    nothing to it, and works once the key is there."""
    assert BUNKER
    config = f"Host *\n    StrictHostKeyChecking {strict}\n    UserKnownHostsFile /dev/null\n"
    path = ssh_with_config(tmp_path, config) + os.pathsep + os.environ["PATH"]
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    env = _env(tmp_path / "e", sshd, BUNKER_SSH_KNOWN_HOSTS=str(kh), BUNKER_REMOTE_PATH=BUNKER, PATH=path)
    remote = tmp_path / "server"
    url = _ssh_url(sshd, remote)
    cp = run_bunker("init", "--repo", url, "--client", "c", env=env, timeout=60)
    keyscan = f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {kh}"
    _assert_clear(cp, ExitCode.FATAL, "host key is unknown", f"127.0.0.1:{sshd.port}", sshd.fingerprint(), keyscan)
    assert not remote.exists() and kh.read_text() == ""  # nothing sent, nothing trusted on first use

    subprocess.run(["sh", "-c", keyscan], check=True, capture_output=True, timeout=30)
    cp = run_bunker("init", "--repo", url, "--client", "c", env=env, timeout=60)
    assert cp.returncode == 0, describe(cp)


def test_ssh_and_its_proxy_command_never_see_the_passphrase(sshd: SshServer, tmp_path: Path) -> None:
    """A ProxyCommand in the user's ssh config records the environment ssh gave it, for every
    connection of init, backup and restore (whose workers connect too): no BUNKER_PASSPHRASE
    or BUNKER_NEW_PASSPHRASE, nor their text."""
    assert BUNKER
    dump = tmp_path / "proxy-env.jsonl"
    config = f"Host 127.0.0.1\n    ProxyCommand {env_dumping_proxy(tmp_path, dump)}\n"
    path = ssh_with_config(tmp_path, config) + os.pathsep + os.environ["PATH"]
    env = _env(
        tmp_path / "e", sshd, BUNKER_REMOTE_PATH=BUNKER, PATH=path, BUNKER_NEW_PASSPHRASE="another secret phrase",
        PROXY_TEST_MARK="seen",
    )  # fmt: skip
    check_children_never_see_the_passphrase(_ssh_url(sshd, tmp_path / "server"), env, dump, tmp_path)


# ----------------------------------------------------------------------------------- append-only


def test_append_only_server_takes_backups_and_refuses_destruction(tmp_path: Path) -> None:
    served = tmp_path / "served"
    server = ServeProcess(tmp_path / "ao.sock", served, "--append-only")
    try:
        repo = init_repo(tmp_path / "r", url=server.url)
        # an older bunker's RECOVERY.md: a backup would rewrite it, the server keeps it
        (served / "RECOVERY.md").write_bytes(b"an older text\n")
        src = tmp_path / "src"
        make_tree(src)
        doc = repo.backup(src)
        assert _clean(doc), doc
        assert (served / "RECOVERY.md").read_bytes() == b"an older text\n"
        assert not list((served / "sessions").iterdir())  # the lease was deleted at the end

        b = open_remote(server.url)
        assert b.append_only
        pack = next((served / "packs").iterdir())
        pack_name = "packs/" + pack.name
        before = pack.read_bytes()
        with pytest.raises(ServerRefused) as exc:
            b.delete(pack_name)
        assert "append-only" in exc.value.message and "without --append-only" in exc.value.hint
        assert pack.read_bytes() == before
        # no overwrite: a put of an existing name writes nothing
        assert b.put(pack_name, before) is False
        assert b.put("RECOVERY.md", b"defaced") is False
        with pytest.raises(ServerRefused, match="do not match its name"):
            b.put(pack_name, b"garbage")
        assert pack.read_bytes() == before and (served / "RECOVERY.md").read_bytes() == b"an older text\n"
        # a hash name must match its bytes; sessions/ objects come and go
        with pytest.raises(ServerRefused, match="do not match its name"):
            b.put("packs/" + "0" * 64, b"not those bytes")
        assert b.put("packs/" + b3(b"right bytes"), b"right bytes") is True
        lease = "sessions/" + "0123456789abcdef01234567.0"
        b.put(lease, b"lease")
        b.delete(lease)
        assert b.stat(lease) is None
        b.close()
    finally:
        log = server.stop()
    assert "refused to delete " + pack_name in log


def test_forced_command_restricts_the_path(tmp_path: Path) -> None:
    """authorized_keys pins `serve --stdio --repo DIR --append-only`: whatever the client asks."""
    if os.geteuid() != 0:
        pytest.skip("starts sshd, which needs root")
    assert BUNKER
    own = start_sshd(tmp_path / "sshd")
    try:
        served = tmp_path / "alice"
        pub = own.client_key.with_suffix(".pub").read_text().strip()
        forced = f'command="{BUNKER} serve --stdio --repo {served} --append-only",restrict {pub}\n'
        (own.workdir / "authorized_keys").write_text(forced)
        env = own.env()
        with pytest.raises(BunkerError) as exc:
            open_remote(_ssh_url(own, tmp_path / "bob"), create=True, env=env)
        assert exc.value.exit_code == ExitCode.NO_REPOSITORY
        assert f"serves only the repository {served}" in exc.value.message and str(served) in exc.value.hint
        assert not (tmp_path / "bob").exists()
        # the served path works, append-only whatever the client's command line said
        b = open_remote(_ssh_url(own, served), create=True, env=env)
        name = "packs/" + b3(b"x")
        assert b.append_only and b.put(name, b"x") is True
        with pytest.raises(ServerRefused):
            b.delete(name)
        b.close()
    finally:
        own.stop()


# --------------------------------------------------------------------------- hostile and broken peers


class RawServe:
    """`bunker serve --stdio` driven by hand."""

    def __init__(self, repo: Path, *args: str) -> None:
        assert BUNKER
        repo.mkdir(exist_ok=True)
        self._rid = 0
        self.proc = subprocess.Popen(
            [BUNKER, "serve", "--stdio", "--repo", str(repo), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdin and self.proc.stdout
        self.stream = wire.FdStream(self.proc.stdout.fileno(), self.proc.stdin.fileno())

    def hello(self, vmin: int = 1, vmax: int = 1) -> wire.Hello:
        self.stream.write(wire.encode_hello({"create": False}, vmin, vmax))
        return wire.read_hello(self.stream, "the server")

    def reply(self) -> wire.Frame:
        length, rid, code, meta_len = wire.read_header(self.stream, wire.MAX_FRAME, "the server")
        return wire.read_body(self.stream, rid, code, length, meta_len, "the server")

    def request(self, op: int, meta: dict[str, Any], payload: bytes = b"") -> wire.Frame:
        """Send one request and return its reply."""
        self._rid += 1
        wire.write_frame(self.stream, self._rid, op, meta, payload)
        f = self.reply()
        assert f.rid == self._rid, f
        return f

    def finish(self) -> tuple[int, str]:
        rc = self.proc.wait(10)  # never hangs on a bogus length
        assert self.proc.stderr
        return rc, self.proc.stderr.read().decode()


def test_hostile_frames_get_a_clear_answer(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # an oversized length: refused before anything is allocated or read
    s = RawServe(repo)
    assert s.hello().fields["version"] == 1
    s.stream.write(struct.pack(">IIBH", 0xFFFFFFFF, 1, wire.PUT, 0))
    f = s.reply()
    assert f.rid == 0 and f.code == wire.PROTOCOL and "more than the limit" in f.meta["m"]
    rc, err = s.finish()
    assert rc == ExitCode.FATAL and "more than the limit" in err and "Traceback" not in err

    # garbage instead of a hello
    s = RawServe(repo)
    s.stream.write(b"GET / HTTP/1.0\r\n\r\n")
    hello = wire.read_hello(s.stream, "the server")
    assert hello.fields["version"] == 0 and "does not speak the bunker serve protocol" in hello.fields["error"]["m"]
    assert s.finish()[0] == ExitCode.FATAL

    # malformed requests are answered and the connection goes on; names are checked
    s = RawServe(repo)
    s.hello()
    for rid, op, meta in (
        (1, 99, {}),
        (2, wire.PUT, {"n": "../../escaped"}),
        (3, wire.GET, {"n": A, "o": "zero"}),
        (4, wire.LIST, {"p": "../"}),
        (5, wire.DELETE, {}),
    ):
        wire.write_frame(s.stream, rid, op, meta, b"payload")
        f = s.reply()
        assert (f.rid, f.code) == (rid, wire.INVALID), f
    wire.write_frame(s.stream, 6, wire.PING, {})
    assert s.reply().code == wire.OK
    # meta that is no msgpack map: the connection is closed with the reason
    s.stream.write(struct.pack(">IIBH", 3, 7, wire.STAT, 3) + b"\xc1\xc1\xc1")
    f = s.reply()
    assert f.code == wire.PROTOCOL and "malformed" in f.meta["m"]
    assert s.finish()[0] == ExitCode.FATAL
    assert not (tmp_path / "escaped").exists()

    # a frame cut short by the client going away
    s = RawServe(repo)
    s.hello()
    s.stream.write(struct.pack(">IIBH", 100, 8, wire.PUT, 0) + b"only part")
    assert s.proc.stdin
    s.proc.stdin.close()
    rc, err = s.finish()
    assert rc == 0 and "in the middle of a request" in err


@pytest.mark.parametrize("mode", [(), ("--append-only",)], ids=["read-write", "append-only"])
def test_server_refuses_names_that_break_their_prefixs_rule(tmp_path: Path, mode: tuple[str, ...]) -> None:
    """A compromised client cannot plant objects under names that no reader uses and that an
    append-only server would keep forever (docs/format.md sections 5 and 22)."""
    repo = tmp_path / "repo"
    s = RawServe(repo, *mode)
    assert s.hello().fields["append_only"] is bool(mode)
    bad = [
        "packs/junk",
        "snapshots/evil",
        "sessions/notasession",
        "foo/bar",
        "packs/" + "a" * 64 + "\n",
        "packs/" + "A" * 64,
        "sessions/0123456789abcdef01234567.01",
        "status/x",
    ]
    for name in bad:
        f = s.request(wire.PUT, {"n": name, "x": False}, b"bytes")
        assert f.code == wire.INVALID, (name, f)
        assert f"format version {FORMAT_VERSION} knows prefixes: config/ clients/ packs/" in f.meta["m"], f.meta
        assert "sessions/ (<24 hex>.<counter>), RECOVERY.md, FORMAT.md" in f.meta["m"], f.meta
        assert "same bunker version" in f.meta["h"]
    f = s.request(wire.PUT, {"n": "packs/" + b3(b"other bytes"), "x": False}, b"these bytes")
    if mode:
        assert f.code == wire.REFUSED and "do not match its name" in f.meta["m"], f
    good = {
        "packs/" + b3(b"a pack"): b"a pack",
        "snapshots/" + b3(b"a snapshot"): b"a snapshot",
        "sessions/0123456789abcdef01234567.0": b"a lease",
        "sessions/0123456789abcdef01234567.10": b"a refresh",
        "RECOVERY.md": b"a document",
    }
    for name, data in good.items():
        assert s.request(wire.PUT, {"n": name, "x": False}, data).code == wire.OK, name
    assert s.proc.stdin
    s.proc.stdin.close()
    rc, err = s.finish()
    assert rc == 0 and "refused a PUT" in err and "Traceback" not in err, err
    stored = {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}
    assert stored == set(good) | ({"packs/" + b3(b"other bytes")} if not mode else set())


def test_listings_never_show_names_that_could_be_confused(tmp_path: Path) -> None:
    """Files put into a served directory by other means: a listing shows only objects; a name
    with a newline, a directory under a hash name, junk: left out, and reported on request."""
    from bunker.node.serve import ServeConfig
    from bunker.node.serve_frontends import SocketServer

    repo = tmp_path / "repo"
    good = "packs/" + b3(b"a pack")
    server = SocketServer(str(tmp_path / "s.sock"), ServeConfig(str(repo))).start()
    try:
        b = open_remote(f"unix://{tmp_path / 's.sock'}", create=True)
        b.put(good, b"a pack")
        packs = repo / "packs"
        (packs / "junk").write_bytes(b"junk")
        (packs / ("e" * 64 + "\n")).write_bytes(b"a name with a newline")
        (packs / ("f" * 64)).mkdir()
        (packs / ("f" * 64) / ("d" * 64)).write_bytes(b"below a directory")
        (packs / ".tmp-0123456789abcdef").write_bytes(b"a writer's temp file")
        assert [i.name for i in b.list("packs/")] == [good]
        assert b.stat("packs/" + "f" * 64) is None
        with pytest.raises(ObjectMissing):
            b.get("packs/" + "f" * 64)
        strays = b.strays("packs/")
        assert strays.shown == (repr("packs/" + "e" * 64 + "\n"), "packs/" + "f" * 64 + "/", "packs/junk")
        assert strays.count == 3 and b.strays("index/").count == 0
        b.close()
    finally:
        server.close()
    # the raw protocol: LIST pages hold objects only
    s = RawServe(repo)
    s.hello()
    f = s.request(wire.LIST, {"p": "packs/", "a": ""})
    assert f.code == wire.OK and [r[0] for r in encoding.unpack(f.payload)] == [good[6:]]
    assert s.proc.stdin
    s.proc.stdin.close()
    assert s.finish()[0] == 0


def test_handshake_version_mismatch(tmp_path: Path) -> None:
    s = RawServe(tmp_path / "repo")
    hello = s.hello(7, 9)
    err = hello.fields["error"]
    assert hello.fields["version"] == 0 and "versions 7 to 9" in err["m"] and "1 to 1" in err["m"]
    assert "same bunker version" in err["h"]
    assert s.finish()[0] == ExitCode.FATAL


def _fake_server(path: Path, answer: bytes, after_hello: bytes = b"") -> threading.Thread:
    """A unix socket server that reads the client's hello and answers with ``answer`` (then
    ``after_hello`` once the first request arrives): a broken or hostile server."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(4)

    def run() -> None:
        conns = []
        sock.settimeout(10)
        try:
            while True:
                conn, _ = sock.accept()
                conns.append(conn)
                st = wire.SocketStream(conn)
                try:
                    wire.read_hello(st, "the client")
                    conn.sendall(answer)
                    if after_hello:
                        conn.recv(1 << 16)
                        conn.sendall(after_hello)
                except (OSError, wire.ProtocolError):
                    pass
        except OSError:
            pass
        finally:
            sock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_hostile_or_old_servers_give_clear_client_errors(tmp_path: Path) -> None:
    env = {"BUNKER_STORAGE_RETRIES": "1", "BUNKER_STORAGE_RETRY_DELAY": "0.01", "BUNKER_STORAGE_TIMEOUT": "5"}
    # a server that speaks other versions only
    _fake_server(tmp_path / "v.sock", wire.encode_hello({"version": 5}, 5, 6))
    with pytest.raises(StorageError) as exc:
        open_remote(f"unix://{tmp_path / 'v.sock'}", env=env)
    assert "versions 5 to 6" in exc.value.message and "speaks 1 to 1" in exc.value.message
    assert "same bunker version" in exc.value.hint
    # no bunker at all
    _fake_server(tmp_path / "h.sock", b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(64))
    with pytest.raises(StorageError, match="does not speak the bunker serve protocol"):
        open_remote(f"unix://{tmp_path / 'h.sock'}", env=env)
    # a reply of 2 GiB announced: refused at once, nothing allocated, no hang
    ok_hello = wire.encode_hello({"version": 1, "max_frame": wire.MAX_FRAME})
    bogus = struct.pack(">IIBH", 1 << 31, 1, wire.OK, 0)
    _fake_server(tmp_path / "b.sock", ok_hello, bogus)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="more than the limit"):
        open_remote(f"unix://{tmp_path / 'b.sock'}", env=env)
    assert time.monotonic() - t0 < 5
    # nobody listening: retried, then unreachable
    with pytest.raises(StorageError) as exc:
        open_remote(f"unix://{tmp_path / 'none.sock'}", env=env)
    assert exc.value.exit_code == ExitCode.NO_REPOSITORY and "bunker serve --socket" in exc.value.hint


# ------------------------------------------------------------------------------ dropped connections


def test_connect_retried_through_a_flaky_network(
    sshd: SshServer, remote_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUNKER_STORAGE_RETRIES", "4")
    proxy = FlakyProxy(sshd.port, faults=2, mode="drop")
    known = sshd.known_hosts.read_text().replace(f":{sshd.port} ", f":{proxy.port} ")
    (tmp_path / "kh").write_text(known)
    monkeypatch.setenv("BUNKER_SSH_KNOWN_HOSTS", str(tmp_path / "kh"))
    try:
        b = open_remote(f"ssh://root@127.0.0.1:{proxy.port}{tmp_path / 'repo'}", create=True)
        assert proxy.spoiled == 2
        assert b.put(A, b"survives") is True and b.get(A) == b"survives"
        b.close()
    finally:
        proxy.close()


def test_connection_dropped_during_a_backup_is_retried(sshd: SshServer, tmp_path: Path) -> None:
    assert BUNKER
    remote = tmp_path / "server"
    url = _ssh_url(sshd, remote)
    env = _env(tmp_path / "r", sshd, BUNKER_REMOTE_PATH=BUNKER, BUNKER_STORAGE_RETRIES="5")
    assert run_bunker("init", "--repo", url, "--client", "c", env=env).returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(8 << 20))
    logins = sshd.log.read_text().count("Accepted publickey")
    dropped: list[int] = []

    def drop_when_writing() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any((remote / "packs").iterdir()):  # a pack is being written or was just stored
                dropped.append(sshd.drop_connections())
                return
            time.sleep(0.002)

    t = threading.Thread(target=drop_when_writing)
    t.start()
    cp = run_bunker("backup", src, "--repo", url, "--json", env=env, timeout=120)
    t.join()
    assert cp.returncode == 0, describe(cp)
    assert _clean(js(cp)) and dropped and dropped[0] > 0
    assert sshd.log.read_text().count("Accepted publickey") >= logins + 2  # it logged in again
    target = tmp_path / "target"
    cp = run_bunker("restore", "latest", "--target", target, "--repo", url, env=env)
    assert cp.returncode == 0, describe(cp)
    compare_trees(src, restored_path(target, src))


def test_threads_share_one_connection(remote_env: dict[str, str], sshd: SshServer, tmp_path: Path) -> None:
    """Requests of several threads are in flight together on one ssh connection."""
    b = open_remote(_ssh_url(sshd, tmp_path / "repo"), create=True)
    assert isinstance(b, RemoteBackend)
    logins = sshd.log.read_text().count("Accepted publickey")
    data = os.urandom(4 << 20)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(4):
                name = f"packs/{i:032x}{j:032x}"
                b.put(name, data)
                assert b.get(name, -100) == data[-100:]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(list(b.list("packs/"))) == 12
    assert sshd.log.read_text().count("Accepted publickey") == logins  # no new login
    b.close()


def test_a_frozen_server_is_given_up_and_replaced(
    sshd: SshServer, remote_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that stops answering (SIGSTOP) costs one timeout, then a new connection."""
    # 3 s, not 1: the replacement connection's ssh handshake must fit in it on a loaded machine
    monkeypatch.setenv("BUNKER_STORAGE_TIMEOUT", "3")
    b = open_remote(_ssh_url(sshd, tmp_path / "repo"), create=True)
    assert b.put(A, b"before the freeze") is True
    frozen = sshd.freeze_connections()
    try:
        t0 = time.monotonic()
        assert b.get(A) == b"before the freeze"
        assert time.monotonic() - t0 >= 3  # it did wait for the frozen one: a new connection answered
    finally:
        sshd.drop_connections()  # also ends the frozen processes
    assert frozen
    b.close()


def test_listing_pages_and_objects_larger_than_a_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long listings come in pages; an object larger than one frame is read in ranges."""
    from bunker.node.serve import ServeConfig
    from bunker.node.serve_frontends import SocketServer

    monkeypatch.setattr(wire, "LIST_PAGE", 3)
    server = SocketServer(str(tmp_path / "s.sock"), ServeConfig(str(tmp_path / "repo"))).start()
    try:
        b = open_remote(f"unix://{tmp_path / 's.sock'}", create=True)
        names = [f"index/{i:064x}" for i in range(10)]
        for n in names:
            b.put(n, n.encode())
        assert [i.name for i in b.list("index/")] == names
        big = os.urandom(wire.MAX_PAYLOAD + 1000)  # put there by other means than the protocol
        (tmp_path / "repo" / "packs" / ("b" * 64)).write_bytes(big)
        assert b.get("packs/" + "b" * 64) == big
        assert b.get("packs/" + "b" * 64, -2000) == big[-2000:]
        with pytest.raises(BunkerError, match="more than a bunker server takes"):
            b.put(A, big)
        b.close()
    finally:
        server.close()


def test_closing_an_ssh_stream_under_a_writer_never_frees_its_descriptor_early() -> None:
    """A request that times out closes its connection while another thread may be writing a
    large frame to ssh's stdin. The descriptor must stay open until that writer has left (a
    freed number is soon reused by the next connection, which would then receive the rest of the
    old frame): close() kills ssh instead, the write fails at once, and the writer closes."""
    from bunker.storage.remote_link import _ProcStream

    proc = subprocess.Popen(["sleep", "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    stream = _ProcStream(proc)
    assert proc.stdin is not None
    failed: list[BaseException] = []

    def write() -> None:
        try:
            stream.write(b"x" * (4 << 20))  # far more than a pipe holds: blocks
        except OSError as exc:
            failed.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.3)
    assert writer.is_alive()
    stream.close()  # before: the pipes closed under the writer, which stayed blocked until ssh ended
    writer.join(5)
    assert not writer.is_alive() and failed and isinstance(failed[0], BrokenPipeError)
    assert proc.stdin.closed
    with pytest.raises(BrokenPipeError):
        stream.write(b"more")
    assert proc.wait(5) is not None
