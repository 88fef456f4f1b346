"""The two front ends of the serve protocol (node/serve.py): one client on stdin/stdout
(`serve --stdio`: ssh, inetd, systemd socket activation with Accept=yes) and a unix socket with a
thread per connection (`serve --socket`)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading

from bunker.errors import BunkerError, ExitCode
from bunker.node import serve
from bunker.node.serve import ServeConfig, Session
from bunker.storage import wire

# --------------------------------------------------------------------------- the two front ends


def _stderr_is_the_connection(*fds: int) -> bool:
    """Whether fd 2 is the socket ``fds`` are (inetd passes the connection as fds 0, 1 and 2)."""
    try:
        err = os.fstat(2)
        if not stat.S_ISSOCK(err.st_mode):
            return False
        return any((st.st_dev, st.st_ino) == (err.st_dev, err.st_ino) for st in map(os.fstat, fds))
    except OSError:
        return False


def serve_stdio(config: ServeConfig) -> int:
    """Serve one client on stdin/stdout (ssh, inetd, systemd Accept=yes); return the exit code."""
    rfd, wfd = os.dup(0), os.dup(1)
    if _stderr_is_the_connection(rfd, wfd):
        # a log line written there would land in the protocol stream and break it
        import syslog

        syslog.openlog("bunker", syslog.LOG_PID, syslog.LOG_DAEMON)
        serve.log_to_syslog()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    # nothing else may ever write into the protocol stream: stray output goes to stderr
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return Session(wire.FdStream(rfd, wfd), config).run()


class SocketServer:
    """`serve --socket PATH`: a unix socket, a thread per connection."""

    def __init__(self, path: str, config: ServeConfig, mode: int = 0o600) -> None:
        self.path, self.config = os.path.abspath(path), config
        self._stop = threading.Event()
        self.sock = _listen(self.path, mode)
        self._threads: list[threading.Thread] = []

    def serve_forever(self) -> None:
        """Accept connections until close() (polls the stop flag twice a second)."""
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            conn.settimeout(None)
            t = threading.Thread(target=self._one, args=(conn,), name="bunker-serve-conn", daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _one(self, conn: socket.socket) -> None:
        with contextlib.suppress(Exception):
            Session(wire.SocketStream(conn), self.config).run()

    def start(self) -> SocketServer:
        """Serve in a background thread (for embedding, e.g. tests)."""
        threading.Thread(target=self.serve_forever, name="bunker-serve-accept", daemon=True).start()
        return self

    def close(self) -> None:
        """Stop accepting and remove the socket file (open connections end on their own)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _listen(path: str, mode: int) -> socket.socket:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise BunkerError(
                f"{path} exists and is not a socket",
                "choose another --socket path, or remove that file if it is not needed",
                exit_code=ExitCode.USAGE,
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left by a server that is gone
        else:
            raise BunkerError(
                f"another server already listens on {path}",
                "stop it first, or choose another --socket path",
                exit_code=ExitCode.USAGE,
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # the socket is never reachable with wider permissions
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise BunkerError(
            f"cannot listen on {path}: {exc.strerror or exc}",
            "choose a --socket path in a directory this user may write",
            exit_code=ExitCode.FATAL,
        ) from None
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(64)
    return sock
