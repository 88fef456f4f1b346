"""The asyncssh side of the sftp backend: the event loop thread, the SSH connections and SFTP
channels, and requests run on them with reconnect-and-retry.

The Backend interface is synchronous and used from several threads; asyncssh is asynchronous. So
the loop runs in a background thread, each calling thread gets its own SFTP channel (a channel is
never shared by two threads), and one SSH connection carries up to CHANNELS_PER_CONNECTION
channels (OpenSSH allows 10 sessions per connection). A request whose failure is transient (a
dropped, refused or timed-out connection, a request that does not answer in time) is retried on
a new channel, after a reconnect when the connection is lost, with exponential backoff and
jitter, BUNKER_STORAGE_RETRIES times.

What the requests do is sftp.py's; logging in is sftp_link.py's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncssh

from bunker.errors import BunkerError, ExitCode, StorageError
from bunker.storage.object_store import MAX_RETRY_DELAY, RetryPolicy
from bunker.storage.sftp_link import Connector, Link

T = TypeVar("T")

CHANNELS_PER_CONNECTION = 8  # below OpenSSH's default MaxSessions (10)
LOOP_THREAD = "bunker-sftp"


class _QuietLostConnections(logging.Filter):
    """asyncio warns once per write into a connection that died under a running upload (e.g.
    "socket.send() raised exception."); ChannelPool.call retries that, and what still fails is
    reported by bunker itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != LOOP_THREAD or record.levelno > logging.WARNING


logging.getLogger("asyncio").addFilter(_QuietLostConnections())


@dataclass(eq=False)
class Channel:
    """An SFTP channel and the connection that carries it."""

    sftp: asyncssh.SFTPClient
    link: Link


class ChannelPool:
    """The event loop thread, the SSH connections and one SFTP channel per calling thread, and
    requests run on them with reconnect-and-retry (``call``)."""

    def __init__(self, connector: Connector, policy: RetryPolicy) -> None:
        self._connector = connector
        self._policy = policy
        self.loop = asyncio.new_event_loop()
        self._links: list[Link] = []  # loop only
        self._alock: asyncio.Lock | None = None  # loop only
        self._channels: dict[threading.Thread, Channel] = {}
        self._lock = threading.Lock()
        self.closed = False
        self.answered = False  # the server answered once: a refused connection then gets every retry
        self.thread = threading.Thread(target=self._run, name=LOOP_THREAD, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the loop, bounded by ``timeout`` seconds (None: ``coro`` bounds its own
        steps), and return its result."""
        if self.closed:
            coro.close()
            raise BunkerError("the sftp connection was closed", "this is a bug in bunker; please report it")
        bounded = coro if timeout is None else asyncio.wait_for(coro, timeout)
        return asyncio.run_coroutine_threadsafe(bounded, self.loop).result()

    def channel(self, timeout: float) -> Channel:
        """The calling thread's channel, opened (and a connection made) when needed."""
        me = threading.current_thread()
        with self._lock:
            chan = self._channels.get(me)
            if chan is not None and not chan.link.lost:
                return chan
            gone = [t for t in self._channels if t is me or not t.is_alive()]
            released = [self._channels.pop(t) for t in gone]
        for c in released:
            self._later(self._close_channel, c)
        chan = self.run(self._open_channel(), timeout)
        with self._lock:
            if self.closed:
                self._later(self._close_channel, chan)
            else:
                self._channels[me] = chan
        return chan

    def _later(self, fn: Callable[[Channel], None], chan: Channel) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            self.loop.call_soon_threadsafe(fn, chan)

    def discard(self, chan: Channel, broken: bool) -> None:
        """Stop using ``chan`` (after an error); ``broken``: its connection does not answer."""
        with self._lock:
            for t, c in list(self._channels.items()):
                if c is chan:
                    del self._channels[t]
        if broken:
            chan.link.lost = True
        self._later(self._close_channel, chan)

    async def _open_channel(self) -> Channel:
        if self._alock is None:
            self._alock = asyncio.Lock()
        for _ in range(3):
            async with self._alock:
                for dead in [lk for lk in self._links if lk.lost]:
                    self._links.remove(dead)
                    dead.conn.close()
                link = next((lk for lk in self._links if not lk.full and lk.channels < CHANNELS_PER_CONNECTION), None)
                if link is None:
                    link = await self._connector.connect()
                    self._links.append(link)
                link.channels += 1
            try:
                sftp = await link.conn.start_sftp_client(path_errors="surrogateescape")
            except asyncssh.ChannelOpenError as exc:
                link.channels -= 1
                if link.lost:
                    raise  # the connection dropped meanwhile: retried
                if link.channels > 0:
                    link.full = True  # the server allows fewer channels per connection: open another one
                    continue
                if exc.code == asyncssh.OPEN_REQUEST_SESSION_FAILED:  # the sftp subsystem was refused
                    raise StorageError(
                        f"the ssh server {self._connector.loc.host_port} offers no sftp ({exc.reason})",
                        "enable it in the server's sshd_config (`Subsystem sftp internal-sftp`), or ask the "
                        "server's administrator",
                        exit_code=ExitCode.FATAL,
                    ) from None
                raise
            except BaseException:
                link.channels -= 1
                raise
            return Channel(sftp, link)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no more sftp sessions")

    def _close_channel(self, chan: Channel) -> None:
        chan.link.channels -= 1
        with contextlib.suppress(Exception):
            chan.sftp.exit()
        if chan.link.lost or (chan.link.full and chan.link.channels == 0):
            with contextlib.suppress(Exception):
                chan.link.conn.close()
            chan.link.lost = True

    def shutdown(self) -> None:
        """Close every channel and connection and stop the loop (idempotent)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._channels.clear()
        if not self.thread.is_alive():
            return
        if threading.current_thread() is self.thread:
            self.loop.call_soon(self.loop.stop)
            return

        async def close_all() -> None:
            me = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not me:
                    task.cancel()  # callers waiting on a request get an error, not a hang
            for link in self._links:
                link.conn.close()
            waits = [link.conn.wait_closed() for link in self._links]
            if waits:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()

    # ------------------------------------------------------------------ requests with retries

    def call(self, where: str, op: Callable[[asyncssh.SFTPClient], Coroutine[Any, Any, T]], *, io: bool = False) -> T:
        """Run ``op`` on this thread's channel; reconnect and retry transient failures, and when
        the retries are used up raise a StorageError that says so (``where`` names the request
        in it, e.g. "read data/ab at sftp server HOST, directory PATH"). Other failures are
        raised as they are, for the caller to put in words. An ``io`` operation bounds each of
        its steps itself (a transfer: each piece), others are bounded by BUNKER_STORAGE_TIMEOUT
        as a whole."""
        timeout = None if io else self._policy.timeout
        attempt = quick = 0
        started = time.monotonic()
        while True:
            chan: Channel | None = None
            try:
                chan = self.channel(self._policy.timeout)
                self.answered = True
                return self.run(op(chan.sftp), timeout)
            except BunkerError:
                raise
            except Exception as exc:
                transient = is_transient(exc)
                if chan is not None and (transient or isinstance(exc, concurrent.futures.CancelledError)):
                    self.discard(chan, broken=isinstance(exc, TimeoutError))
                if not transient:
                    raise
                if isinstance(exc, ConnectionRefusedError) and not self.answered:
                    # nothing listens (a stopped server): a short try, not the backoff for a
                    # server that stumbles; then it is unreachable and a backup spools
                    delay = self._policy.no_answer_delay(quick, started)
                    if delay is None:
                        raise self._unreachable(exc, where, time.monotonic() - started) from None
                    time.sleep(delay)
                    quick += 1
                    continue
                if attempt >= self._policy.retries:
                    raise self._unreachable(exc, where) from None
                time.sleep(self._delay(attempt))
                attempt += 1

    def _delay(self, attempt: int) -> float:
        first = self._policy.first_delay
        return min(first * 2.0**attempt, max(first, MAX_RETRY_DELAY)) * (1.0 + random.random())

    def _unreachable(self, exc: BaseException, where: str, waited: float | None = None) -> StorageError:
        if waited is not None:
            return StorageError(
                f"could not {where}: nothing answers there ({describe(exc, self._policy.timeout)}; tried for "
                f"{waited:.1f} s): the ssh server is not running or the address is wrong",
                f"start the ssh server or fix the repository URL (`{self._connector.loc.ssh_command()}` should log "
                "in), then run the command again",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        tries = f"also after {self._policy.retries} retries" if self._policy.retries else "and retries are off"
        return StorageError(
            f"could not {where}: the server did not answer or the connection kept dropping "
            f"({describe(exc, self._policy.timeout)}), {tries}",
            f"check that the server is up and reachable (`{self._connector.loc.ssh_command()}` should log in) and "
            "the network, then run the command again; BUNKER_STORAGE_RETRIES and BUNKER_STORAGE_RETRY_DELAY set how "
            "long bunker keeps retrying",
            exit_code=ExitCode.NO_REPOSITORY,
        )


# --------------------------------------------------------------------- which failures are retried

_PERMANENT = (
    asyncssh.HostKeyNotVerifiable,
    asyncssh.PermissionDenied,
    asyncssh.IllegalUserName,
    asyncssh.KeyExchangeFailed,
    asyncssh.ProtocolNotSupported,
    asyncssh.ServiceNotAvailable,
    asyncssh.KeyImportError,
)


def is_transient(exc: BaseException) -> bool:
    """A failure that a new connection may cure: dropped or refused connections, timeouts."""
    if isinstance(exc, asyncssh.SFTPConnectionLost | asyncssh.SFTPNoConnection):
        return True
    if isinstance(exc, (asyncssh.SFTPError, *_PERMANENT)):
        return False
    return isinstance(exc, asyncssh.DisconnectError | asyncssh.ChannelOpenError | OSError | TimeoutError | EOFError)


def describe(exc: BaseException, timeout: float) -> str:
    """A failure in words, for error messages."""
    if isinstance(exc, TimeoutError) and not exc.args:
        return f"no answer in time (BUNKER_STORAGE_TIMEOUT is {timeout:g} s)"
    if isinstance(exc, OSError) and exc.errno:
        return f"{os.strerror(exc.errno)} ({exc.strerror or exc})"
    if isinstance(exc, asyncssh.SFTPError):
        return str(exc.reason or type(exc).__name__)
    if isinstance(exc, asyncssh.Error):
        return str(exc.reason or type(exc).__name__)
    return str(exc) or type(exc).__name__
