"""Reaching a `bunker serve`: URLs, the ssh child process or the unix socket, the handshake, and
what a failed connection means (host key unknown or changed, login refused, no bunker on the far
side, a dropped connection) in words and next steps."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol
from urllib.parse import quote, unquote, urlsplit

from bunker import __version__
from bunker.child_env import child_env
from bunker.errors import BunkerError, ExitCode, StorageError
from bunker.storage import wire
from bunker.storage.node_path import split_node_path
from bunker.storage.ssh_address import SshAddress, parse_ssh_address, ssh_dir

DEFAULT_REMOTE_PATH = "bunker"
REMOTE_PATH_VAR = "BUNKER_REMOTE_PATH"
IDENTITY_VAR = "BUNKER_SSH_IDENTITY"
KNOWN_HOSTS_VAR = "BUNKER_SSH_KNOWN_HOSTS"
DEFAULT_PORT = 22
_URL_HINT = (
    "write it as ssh://USER@HOST:PORT/ABSOLUTE/PATH (ssh://USER@HOST/~/PATH below the login directory) or "
    "unix:///PATH/TO/SOCKET"
)


class Lost(Exception):
    """A connection that failed in a way a new connection may cure (retried). ``no_answer``: the
    host answered nothing (connection refused, no socket): retried only briefly while it has
    never answered (RetryPolicy.no_answer_delay)."""

    def __init__(self, message: str, *, no_answer: bool = False) -> None:
        super().__init__(message)
        self.no_answer = no_answer


# ------------------------------------------------------------------------------------------ URLs


@dataclass(frozen=True)
class RemoteLocation:
    """A parsed ``ssh://`` or ``unix://`` URL. For ssh, ``path`` is the repository directory on
    the server (absolute, or relative to the login directory); for unix, ``path`` is the socket."""

    scheme: str
    path: str
    host: str = ""
    port: int | None = None
    user: str | None = None

    @property
    def address(self) -> SshAddress:
        return SshAddress(self.host, self.port, self.user, self.path)

    @property
    def url(self) -> str:
        """The canonical URL: what messages show and worker processes reopen."""
        if self.scheme == "node":
            return self.path  # a node directory: reopening it starts its server again
        if self.scheme == "unix":
            return "unix://" + quote(self.path, safe="/")
        return self.address.canonical("ssh")

    @property
    def host_port(self) -> str:
        return self.address.host_port

    @property
    def where(self) -> str:
        """How messages name the place."""
        if self.scheme == "node":
            return f"the node at {self.path} (started for this run)"
        if self.scheme == "unix":
            return f"the bunker server at {self.path}"
        return f"the bunker server on {self.host_port} (ssh), repository {self.address.shown_path}"

    def ssh_command(self) -> str:
        """The ssh command line that tests the same login."""
        port = f"-p {self.port} " if self.port is not None and self.port != DEFAULT_PORT else ""
        user = f"{self.user}@" if self.user else ""
        return f"ssh {port}{user}{self.host}"


def parse_remote_url(url: str) -> RemoteLocation:
    """Parse ``ssh://[user@]host[:port]/path`` (``/~/path``: below the login directory) or
    ``unix:///path/to/socket``."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise wire.usage(f"{parts.scheme}:// URLs take no parameters ({url!r})", _URL_HINT)
    raw = unquote(parts.path)
    if parts.scheme == "unix":
        if parts.netloc not in ("", "localhost") or not raw.startswith("/") or "\x00" in raw:
            raise wire.usage(f"{url!r} names no socket path", _URL_HINT)
        return RemoteLocation("unix", os.path.normpath(raw))
    if parts.scheme != "ssh":
        raise wire.usage(f"{url!r} is not an ssh:// or unix:// URL", _URL_HINT)
    a = parse_ssh_address(parts, url, _URL_HINT)
    return RemoteLocation("ssh", a.path, a.host, a.port, a.user)


# ------------------------------------------------------------------------------------ openers


class Opener(Protocol):
    """Makes handshaken connections to one server."""

    test_hint: str

    def open(self, *, create: bool) -> tuple[wire.Stream, Callable[[], str], dict[str, Any]]: ...

    def close(self) -> None: ...


def opener_for(loc: RemoteLocation, env: Mapping[str, str], timeout: float) -> Opener:
    """The opener for ``loc``'s scheme."""
    if loc.scheme == "node":
        return ForkOpener(loc, timeout)
    return UnixOpener(loc, timeout) if loc.scheme == "unix" else SshOpener(loc, env, timeout)


def handshake(stream: wire.Stream, fields: dict[str, Any], timeout: float, where: str) -> dict[str, Any]:
    """Exchange hellos (bounded by ``timeout``); return the server's fields, or raise the server's
    refusal as a BunkerError. Raises wire.ConnectionClosed / OSError when the stream ends first."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            stream.write(wire.encode_hello(fields))
            result["hello"] = wire.read_hello(stream, where)
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=run, name="bunker-remote-hello", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        stream.close()
        t.join(5)
        raise Lost(f"no handshake within {timeout:g} s (BUNKER_STORAGE_TIMEOUT)")
    if "error" in result:
        raise result["error"]
    hello: wire.Hello = result["hello"]
    f = hello.fields
    err = f.get("error")
    if isinstance(err, dict):
        code = err.get("x")
        raise BunkerError(
            f"{where} refused the connection: {wire.text(err.get('m'))}",
            wire.text(err.get("h")) or "ask the server's administrator",
            exit_code=code if isinstance(code, int) and 0 < code < 64 else ExitCode.FATAL,
        )
    expected = wire.choose_version((wire.VERSION_MIN, wire.VERSION_MAX), (hello.vmin, hello.vmax))
    if not expected or f.get("version") != expected:
        raise StorageError(
            f"{where} speaks serve protocol versions {hello.vmin} to {hello.vmax}; this bunker ({__version__}) "
            f"speaks {wire.VERSION_MIN} to {wire.VERSION_MAX}",
            "install the same bunker version on the client and on the server",
            exit_code=ExitCode.FATAL,
        )
    return f


class UnixOpener:
    """Connects to ``bunker serve --socket``."""

    def __init__(self, loc: RemoteLocation, timeout: float) -> None:
        self.loc, self.timeout = loc, timeout
        self.test_hint = f"`bunker serve --socket {loc.path} --repo DIR` must be running"

    def open(self, *, create: bool) -> tuple[wire.Stream, Callable[[], str], dict[str, Any]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.loc.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise Lost(f"no bunker server listens at {self.loc.path} ({exc.strerror})", no_answer=True) from None
        except PermissionError:
            sock.close()
            raise StorageError(
                f"may not connect to the bunker server at {self.loc.path}: permission denied",
                "the socket's owner and mode decide who may use it (`bunker serve --socket-mode`); ask the "
                "server's administrator to let this user in",
                exit_code=ExitCode.FATAL,
            ) from None
        except OSError as exc:
            sock.close()
            raise Lost(f"cannot connect to {self.loc.path}: {exc.strerror or exc}") from None
        sock.settimeout(None)
        stream = wire.SocketStream(sock)
        try:
            fields = handshake(stream, {"create": create, "client": __version__}, self.timeout, self.loc.where)
        except (wire.ConnectionClosed, OSError) as exc:
            stream.close()
            raise Lost(f"the server closed the connection during the handshake ({exc})") from None
        except BaseException:
            stream.close()
            raise
        return stream, lambda: "", fields

    def close(self) -> None:
        """Nothing to release: each connection's socket is closed with it."""


class _ChildOpener:
    """An opener whose connections are child processes speaking the protocol on their stdin and
    stdout (ssh, or a node's own server): it starts them and ends them all on close()."""

    def __init__(self) -> None:
        self._streams: list[_ProcStream] = []

    def _spawn(self, argv: list[str]) -> tuple[_ProcStream, _Tail]:
        # a session of its own: the terminal's Ctrl-C reaches bunker, which ends the child itself;
        # no passphrase in its environment (child_env)
        proc = subprocess.Popen(
            argv,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
        )
        assert proc.stderr is not None
        stream = _ProcStream(proc)
        self._streams.append(stream)
        return stream, _Tail(proc.stderr)

    def close(self) -> None:
        """End every child this opener started."""
        streams, self._streams = self._streams, []
        for s in streams:
            s.close()


class ForkOpener(_ChildOpener):
    """Starts the node's own server for this run: ``bunker node serve DIR --stdio`` as a child
    of this process (the forked mode, docs/hierarchy.md), with the same Python and bunker."""

    def __init__(self, loc: RemoteLocation, timeout: float) -> None:
        self.loc, self.timeout = loc, timeout
        self.node_dir = node_dir_of(loc.path)
        self.test_hint = f"`bunker node status {self.node_dir}` should show the node"
        super().__init__()

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bunker", "node", "serve", self.node_dir, "--stdio"]

    def open(self, *, create: bool) -> tuple[wire.Stream, Callable[[], str], dict[str, Any]]:
        self.close()
        stream, tail = self._spawn(self.argv())

        def describe() -> str:
            tail.thread.join(0.5)
            return f"; node: {tail.lines[-1]}" if tail.lines else ""

        fields = {"repo": self.loc.path, "create": create, "client": __version__}
        try:
            return stream, describe, handshake(stream, fields, self.timeout, self.loc.where)
        except (wire.ConnectionClosed, OSError, wire.ProtocolError):
            stream.close()
            rc = stream.reap(5)
            tail.thread.join(2)
            said = tail.text().strip().splitlines()
            raise StorageError(
                f"the node server for {self.node_dir} ended before it answered ({said[-1] if said else f'exit {rc}'})",
                f"run `bunker node serve {shlex.quote(self.node_dir)} --stdio < /dev/null` to see what it says",
                exit_code=ExitCode.FATAL,
            ) from None
        except BaseException:
            stream.close()
            raise


def node_dir_of(path: str) -> str:
    """The node directory of a node path (``DIR`` or ``DIR/<repository id>``)."""
    found = split_node_path(path)
    return found[0] if found else path


_HOST_KEY = re.compile(r"^debug1: Server host key: (\S+) (SHA256:[A-Za-z0-9+/=]+)")
_SSH_CHATTER = ("debug", "OpenSSH_", "Transferred: ", "Bytes per second: ", "Authenticated to ")


class _Tail:
    """Drains a pipe (ssh's stderr, at -v) in a thread, keeping its last lines (without ssh's
    debug chatter) and the host key the server presented."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.lines: deque[str] = deque(maxlen=40)
        self.host_key = ""  # "ssh-ed25519 SHA256:..."
        self.thread = threading.Thread(target=self._run, args=(pipe,), name="bunker-ssh-stderr", daemon=True)
        self.thread.start()

    def _run(self, pipe: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(lambda: pipe.readline(4096), b""):
                line = wire.text(raw.decode("utf-8", "replace").rstrip("\r\n"), 400)
                m = _HOST_KEY.match(line)
                if m:
                    self.host_key = f"{m.group(1)} {m.group(2)}"
                elif line.strip() and not line.startswith(_SSH_CHATTER):
                    self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines)


class _ProcStream:
    """The ssh child's stdout (read) and stdin (write).

    A write goes through ``os.write`` on stdin's descriptor number, so the pipes are closed only
    once no write is under way: a descriptor closed under a writer is soon reused by the next
    connection, and the rest of the old frame would land in that connection's stream."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self._r = proc.stdout
        self._wfd = proc.stdin.fileno()
        self._lock = threading.Lock()
        self._writers = 0
        self._closed = False
        self._pipes_closed = False

    def readinto(self, buf: memoryview) -> int:
        return self._r.readinto(buf) or 0  # type: ignore[attr-defined]  # an unbuffered FileIO

    def write(self, data: bytes | memoryview) -> None:
        with self._lock:
            if self._closed:
                raise BrokenPipeError(errno.EPIPE, "the connection was closed")
            self._writers += 1
        try:
            view = memoryview(data).cast("B")
            while view:
                if self._closed:
                    raise BrokenPipeError(errno.EPIPE, "the connection was closed")
                n = os.write(self._wfd, view)
                view = view[n:]
        finally:
            with self._lock:
                self._writers -= 1
                last = self._closed and self._writers == 0
            if last:
                self._close_pipes()

    def close(self) -> None:
        """Close the pipes without waiting: ssh is reaped in the background (a frozen server
        must not hold up the retry on a new connection). With a write under way, ssh is killed
        instead (the write then fails at once) and the writer closes the pipes."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = self._writers > 0
        if busy:
            with contextlib.suppress(OSError):
                self.proc.kill()
        else:
            self._close_pipes()
        threading.Thread(target=self.reap, name="bunker-ssh-reap", daemon=True).start()

    def _close_pipes(self) -> None:
        with self._lock:
            if self._pipes_closed:
                return
            self._pipes_closed = True
        # closing stdin ends `bunker serve` (end of input) and then ssh; kill what lingers
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()

    def reap(self, patience: float = 2.0) -> int | None:
        """Wait for ssh to end (kill it after ``patience`` seconds); its exit code."""
        try:
            return self.proc.wait(patience)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
            return self.proc.returncode


@functools.cache
def _hardware_aes() -> bool:
    """Whether the CPU has AES instructions (x86 "aes", arm64 "aes" feature); else ssh's
    default (chacha20-poly1305) is the faster cipher."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def _ssh_config_path(path: str) -> str:
    """``path`` as one ssh_config argument: quoted (it may hold spaces), ``%`` doubled (ssh
    expands %-tokens in file names)."""
    return '"' + path.replace("%", "%%") + '"'


class SshOpener(_ChildOpener):
    """Runs ``ssh ... <remote path> serve --stdio --repo PATH`` (OpenSSH client, BatchMode)."""

    def __init__(self, loc: RemoteLocation, env: Mapping[str, str], timeout: float) -> None:
        self.loc, self.timeout = loc, timeout
        self.remote_path = (env.get(REMOTE_PATH_VAR) or DEFAULT_REMOTE_PATH).strip()
        if not self.remote_path or any(ord(c) < 32 for c in self.remote_path):
            raise wire.usage(
                f"{REMOTE_PATH_VAR} / --remote-path {self.remote_path!r} is not a usable command",
                "give the server's bunker command, e.g. --remote-path /usr/local/bin/bunker",
            )
        self.identity = env.get(IDENTITY_VAR) or None
        self.known_hosts = env.get(KNOWN_HOSTS_VAR) or None
        for var, path in ((IDENTITY_VAR, self.identity), (KNOWN_HOSTS_VAR, self.known_hosts)):
            if path is not None and not os.access(path, os.R_OK):
                raise wire.usage(
                    f"{var}={path} is not a readable file",
                    f"point {var} at an existing file, or unset it to use the defaults in {ssh_dir()}",
                )
        self.test_hint = f"`{loc.ssh_command()}` should log in"
        if any(ord(c) < 32 or c == '"' for c in self.known_hosts_file):
            raise wire.usage(
                f"the known_hosts file {self.known_hosts_file!r} cannot be named to ssh",
                f"point {KNOWN_HOSTS_VAR} at a file whose path has no double quote or control character",
            )
        super().__init__()

    @property
    def known_hosts_file(self) -> str:
        """The one file whose host keys bunker trusts: BUNKER_SSH_KNOWN_HOSTS, else
        known_hosts in :func:`ssh_dir` (the passwd entry's home, not $HOME: one rule with sftp://)."""
        if self.known_hosts:
            return os.path.abspath(self.known_hosts)
        return os.path.join(ssh_dir(), "known_hosts")

    def argv(self) -> list[str]:
        """The ssh command line (no shell involved on this side)."""
        # -v: its debug lines name the server's host key (for the message when it is not trusted)
        argv = ["ssh", "-v", "-T", "-x", "-a", "-o", "BatchMode=yes", "-o", "ClearAllForwardings=yes"]
        argv += ["-o", f"ConnectTimeout={max(1, round(self.timeout))}", "-o", "ServerAliveInterval=30"]
        if _hardware_aes():
            # AES-GCM first (the rest of ssh's default list after it): measured 233 MB/s against
            # chacha20-poly1305's 162 MB/s over loopback on an AES-NI machine
            argv += ["-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com"]
        if self.loc.port is not None:
            argv += ["-p", str(self.loc.port)]
        if self.identity:
            argv += ["-i", self.identity]
        # host keys are checked whatever ~/.ssh/config says, against one file only: a config that
        # says StrictHostKeyChecking no or accept-new, UserKnownHostsFile none or /dev/null, or
        # VerifyHostKeyDNS yes does not apply to bunker's connections (docs/security.md)
        known_hosts = _ssh_config_path(self.known_hosts_file)
        argv += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
        argv += ["-o", "GlobalKnownHostsFile=/dev/null", "-o", "VerifyHostKeyDNS=no"]
        if self.loc.user:
            argv += ["-l", self.loc.user]
        # the far side's shell runs this line: the remote path as given (it may hold arguments,
        # e.g. "/opt/venv/bin/python -m bunker"), the repository path quoted
        remote = f"{self.remote_path} serve --stdio --repo {shlex.quote(self.loc.path)}"
        return [*argv, "--", self.loc.host, remote]

    def open(self, *, create: bool) -> tuple[wire.Stream, Callable[[], str], dict[str, Any]]:
        self.close()
        try:
            stream, tail = self._spawn(self.argv())
        except FileNotFoundError:
            raise BunkerError(
                "the ssh command is not installed on this machine",
                "install the OpenSSH client (Debian: `apt install openssh-client`)",
                exit_code=ExitCode.FATAL,
            ) from None
        proc = stream.proc

        def describe() -> str:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)
            tail.thread.join(0.5)
            last = tail.lines[-1] if tail.lines else ""
            return f"; ssh: {last}" if last else ""

        fields = {"repo": self.loc.path, "create": create, "client": __version__}
        try:
            return stream, describe, handshake(stream, fields, self.timeout, self.loc.where)
        except (wire.ConnectionClosed, OSError):
            stream.close()
            rc = stream.reap(5)
            tail.thread.join(2)
            raise self._failure(rc, tail.text(), tail.host_key) from None
        except wire.ProtocolError as exc:
            stream.close()
            stream.reap(5)
            tail.thread.join(2)
            raise StorageError(
                exc.message,
                f"run `{self.loc.ssh_command()} {self.remote_path} --version`: it must print only bunker's version "
                "(a shell startup file that prints text breaks the connection)",
                exit_code=ExitCode.FATAL,
            ) from None
        except BaseException:
            stream.close()
            raise

    def _failure(self, rc: int | None, err: str, host_key: str) -> BaseException:
        """What an ssh that ended before the handshake means (see docs/user-guide.md)."""
        loc = self.loc
        kh = self.known_hosts_file
        qkh = shlex.quote(kh)  # the commands in the hint run as printed
        port = loc.port if loc.port is not None else DEFAULT_PORT
        keyscan = f"ssh-keyscan {'-p ' + str(port) + ' ' if port != DEFAULT_PORT else ''}{loc.host}"
        said = err.strip().splitlines()
        last = said[-1] if said else f"exit code {rc}"
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
            fp = re.search(r"SHA256:[A-Za-z0-9+/=]+", host_key or err)
            entry = f"[{loc.host}]:{port}" if port != DEFAULT_PORT else loc.host
            return StorageError(
                f"refused to connect to {loc.host_port}: its host key changed"
                + (f" (it now presents {fp.group(0)})" if fp else "")
                + f", which does not match the key recorded in {kh}. Someone may be intercepting the connection, "
                "or the server was reinstalled",
                "ask the server's administrator for its key's fingerprint (on the server: `ssh-keygen -lf "
                f"/etc/ssh/ssh_host_ed25519_key.pub`); only if it matches, remove the old entry with "
                f"`ssh-keygen -R '{entry}' -f {qkh}` and trust the new key with `{keyscan} >> {qkh}`",
                exit_code=ExitCode.FATAL,
            )
        if "Host key verification failed" in err or re.search(r"No \S+ host key is known", err):
            presents = f". The server presents the {host_key.replace(' ', ' key ')}" if host_key else ""
            return StorageError(
                f"refused to connect to {loc.host_port}: its host key is unknown (not in {kh}, the only file of host "
                f"keys bunker trusts){presents}",
                f"compare `{keyscan} | ssh-keygen -lf -` with the server's own `ssh-keygen -lf "
                f"/etc/ssh/ssh_host_ed25519_key.pub`; if they match, trust it with `{keyscan} >> {qkh}` and run "
                "the command again",
                exit_code=ExitCode.FATAL,
            )
        if "Permission denied (" in err or "Too many authentication failures" in err:
            return StorageError(
                f"the ssh server {loc.host_port} refused the login ({last})",
                f"bunker logs in with the keys of your ssh-agent (SSH_AUTH_SOCK), {ssh_dir()}/id_* and "
                "BUNKER_SSH_IDENTITY; add the public key to ~/.ssh/authorized_keys of the user on the server and "
                "check that "
                f"`{loc.ssh_command()}` logs in without a password",
                exit_code=ExitCode.FATAL,
            )
        if rc == 127 or "command not found" in err or re.search(r": not found$", err, re.M):
            return StorageError(
                f"the server {loc.host_port} has no command `{self.remote_path}` ({last})",
                "install bunker on the server, or name its bunker command with --remote-path CMD or "
                f"{REMOTE_PATH_VAR} (e.g. /usr/local/bin/bunker, or '/opt/bunker/bin/python -m bunker')",
                exit_code=ExitCode.FATAL,
            )
        if "No such command 'serve'" in err or "No such option: --stdio" in err:
            return StorageError(
                f"the bunker on {loc.host_port} (`{self.remote_path}`) cannot serve a repository: it is too old",
                "install this bunker version on the server",
                exit_code=ExitCode.FATAL,
            )
        if rc == 255:
            # ssh's own failures that a retry may cure: refused or timed-out connects, drops
            return Lost(f"ssh could not connect ({last})", no_answer="Connection refused" in err)
        return StorageError(
            f"`{self.remote_path} serve` on {loc.host_port} ended before the handshake ({last})",
            f"check that `{loc.ssh_command()} {self.remote_path} --version` prints bunker's version; name another "
            f"command with --remote-path CMD or {REMOTE_PATH_VAR}",
            exit_code=ExitCode.FATAL,
        )
