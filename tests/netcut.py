"""A TCP proxy on 127.0.0.1 that can cut a server off and bring it back: the repository becomes
unreachable in the middle of a run, the way a network or a VPN drops."""

from __future__ import annotations

import contextlib
import socket
import threading


class CutProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``. ``cut()`` closes every connection and stops
    listening (new connections are refused); ``cut_after`` bytes sent towards the server cut it
    automatically, mid-request. ``restore()`` listens again on the same port."""

    def __init__(self, target_port: int, cut_after: int | None = None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.sent = 0  # bytes forwarded client -> server
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self.was_cut = threading.Event()
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self, cut_after: int | None = None) -> None:
        """Accept connections again (on the same port as before); while still listening, only
        set a new ``cut_after``, counted from now."""
        with self._lock:
            if self._listener is not None:
                self.cut_after, self.sent = cut_after, 0
                return
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = int(s.getsockname()[1])
        with self._lock:
            self._listener = s
            self.cut_after = cut_after
            self.sent = 0
        self.was_cut.clear()
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and drop every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self.was_cut.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    conn.close()
                    upstream.close()
                    return
                self._conns += [conn, upstream]
            threading.Thread(target=self._pump, args=(conn, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if outbound:
                    with self._lock:
                        self.sent += len(data)
                        over = self.cut_after is not None and self.sent > self.cut_after
                    if over:
                        self.cut()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.cut()
