"""Object-store backends through Apache OpenDAL: one generic backend for every service.

The services (S3, GCS, Azure Blob, Backblaze B2, WebDAV) differ only in their URL and how their
OpenDAL operator is configured: that lives in ``bunker.storage.services``.

- Every put is one write request (OpenDAL sends a single PutObject / Put Blob / PUT when the
  whole object is written in one call and no chunk size is set): an object is visible whole or
  not at all, and a killed upload leaves nothing behind. Never multipart: a refused or killed
  multipart upload leaves invisible parts that OpenDAL can neither list nor abort (docs/format.md section 17).
  A service whose PUT is not atomic on the server (WebDAV: many servers write straight into the
  target file) gets *staged* writes: a PUT to a hidden temporary name, then a MOVE over the name.
- Create-if-absent uses a conditional write (``If-None-Match: *``) where the service has one,
  else a stat followed by a put (not atomic: ``capabilities()`` says so; nothing depends on it).
- Transient failures (timeouts, 5xx, throttling, dropped connections) are retried by OpenDAL's
  RetryLayer with exponential backoff and jitter, a bounded number of times
  (BUNKER_STORAGE_RETRIES, BUNKER_STORAGE_RETRY_DELAY); each request is bounded by a
  TimeoutLayer (BUNKER_STORAGE_TIMEOUT). What still fails becomes a BunkerError naming the object,
  the endpoint and the next step.
- Object times are the server's (Last-Modified, getlastmodified): lease ages are judged by them.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import opendal
import opendal.exceptions as ox
from opendal.layers import RetryLayer, TimeoutLayer

from bunker.errors import BunkerError, ExitCode, ObjectMissing, StorageError
from bunker.storage.backend import Backend, Capabilities, ObjectInfo
from bunker.storage.full import full_reason, service_full
from bunker.storage.prefixes import is_object_name
from bunker.storage.refused import StorageRefused

T = TypeVar("T")

DEFAULT_RETRIES = 5  # retries after the first attempt: 0.5+1+2+4+8 s of backoff, up to twice that with jitter
DEFAULT_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0
DEFAULT_TIMEOUT = 60.0  # per control request (stat, list, delete); IO requests get twice that
# A host that refuses connections and has not answered once during this command (a stopped
# server, a wrong port) is retried for this long at most, in short steps, then it is unreachable
# (a backup spools): the backoff above is for servers that stumble, not for servers that are off.
NO_ANSWER_SECONDS = 3.0
NO_ANSWER_FIRST_DELAY = 0.2

# every exception class of the binding (they share no base class besides Exception)
OPENDAL_ERRORS: tuple[type[Exception], ...] = tuple(
    v for v in vars(ox).values() if isinstance(v, type) and issubclass(v, Exception)
)
_RANGE_PAST_END = ("too little data", "status: 416", "content range is invalid")
# staged writes go to a hidden name first: the leading dot makes it an invalid object name, so
# listings never show it; one left by a killed upload is removed by a later listing once stale
TMP_MARK = ".bunker-tmp-"
STALE_TMP_AGE = 24 * 3600.0


def usage_error(message: str, hint: str) -> BunkerError:
    """A bad repository URL or setting: exit code USAGE, nothing was sent anywhere."""
    return BunkerError(message, hint, exit_code=ExitCode.USAGE)


@dataclass(frozen=True)
class ServiceInfo:
    """What error messages say about one kind of object store."""

    label: str  # "S3", "Azure Blob Storage"...
    credentials: str  # where the credentials come from: "X and Y, or Z" (follows "set ")
    endpoint_hint: str  # where the endpoint is set, for "did not answer" errors
    # service error codes (or message parts) that mean the bucket / container is not there
    missing_bucket: tuple[str, ...] = ()


GENERIC = ServiceInfo(
    "object store",
    "the credentials the repository URL's service needs (see the user guide's Repository URLs)",
    "the endpoint in the repository URL",
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing request is repeated."""

    retries: int = DEFAULT_RETRIES
    first_delay: float = DEFAULT_RETRY_DELAY
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetryPolicy:
        env = os.environ if env is None else env

        def number(var: str, default: float, lo: float, hi: float) -> float:
            raw = env.get(var)
            if raw is None or raw == "":
                return default
            try:
                v = float(raw)
            except ValueError:
                v = float("nan")
            if not lo <= v <= hi:
                raise usage_error(f"{var}={raw!r} is not a number from {lo:g} to {hi:g}", f"fix or unset {var}")
            return v

        return cls(
            retries=int(number("BUNKER_STORAGE_RETRIES", DEFAULT_RETRIES, 0, 100)),
            first_delay=number("BUNKER_STORAGE_RETRY_DELAY", DEFAULT_RETRY_DELAY, 0, MAX_RETRY_DELAY),
            timeout=number("BUNKER_STORAGE_TIMEOUT", DEFAULT_TIMEOUT, 0.1, 3600),
        )

    def probe(self, op: opendal.Operator) -> opendal.Operator:
        """``op`` with the timeout per request and no retries: for the first contact, whose
        retries ``no_answer_delay`` paces."""
        return op.layer(TimeoutLayer(timeout=self.timeout, io_timeout=2 * self.timeout))

    def no_answer_delay(self, attempt: int, started: float) -> float | None:
        """The wait before retrying a connection refused by a host that has not answered once in
        this command (0.2 s, 0.4 s, 0.8 s...), or None once that would pass NO_ANSWER_SECONDS
        since ``started`` (time.monotonic()), or when retries are off: then the host is taken as
        unreachable."""
        if attempt >= self.retries:
            return None
        delay = NO_ANSWER_FIRST_DELAY * 2.0**attempt
        if time.monotonic() + delay - started > NO_ANSWER_SECONDS:
            return None
        return delay

    def apply(self, op: opendal.Operator, retries: int | None = None) -> opendal.Operator:
        """Wrap ``op``: a timeout per request inside (a timed-out request is a temporary error),
        retries with backoff and jitter outside (``retries``: other than the policy's)."""
        op = self.probe(op)
        retries = self.retries if retries is None else retries
        if retries > 0:
            op = op.layer(
                RetryLayer(
                    max_times=retries,
                    factor=2.0,
                    jitter=True,
                    min_delay=self.first_delay,
                    max_delay=max(self.first_delay, MAX_RETRY_DELAY),
                )
            )
        return op


class ObjectStoreBackend(Backend):
    """A repository under a prefix of an object store, through one OpenDAL operator.

    ``op`` must be rooted at the repository's prefix (object names are relative to it);
    ``endpoint`` is what error messages call the place (e.g. ``http://127.0.0.1:9000 bucket b``);
    ``service`` what they say about credentials and endpoints. ``staged`` writes each object to
    a hidden temporary name and renames it, for services whose PUT is not atomic on the server.

    ``probe`` (the same operator without retries: RetryPolicy.probe) and ``policy`` make the
    first contact quick when nothing answers: until the service has answered once, requests go
    through ``probe``; a connection it refuses is retried for NO_ANSWER_SECONDS at most, then
    the repository is unreachable (exit 13; a backup spools) instead of costing the full backoff
    of every request. Other failures of the first request are retried as usual, through
    ``rest`` (the operator with one retry fewer: the attempt through ``probe`` was the first).
    """

    def __init__(
        self,
        op: opendal.Operator,
        url: str,
        endpoint: str,
        *,
        service: ServiceInfo = GENERIC,
        staged: bool = False,
        probe: opendal.Operator | None = None,
        rest: opendal.Operator | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._full_op = op
        self._probe_op = probe
        self._rest_op = rest if rest is not None else op
        self._policy = policy or RetryPolicy()
        self._answered = probe is None  # the service answered once (an error is an answer too)
        self._first_lock = threading.RLock()
        # during the first contact: the thread making it, the operator its requests use, and
        # whether a failure is the first contact's to judge (_ProbeFailed) or an error to map
        self._first_thread: threading.Thread | None = None
        self._first_op: opendal.Operator | None = None
        self._probing = False
        self.url = url
        self.endpoint = endpoint
        self.service = service
        self._staged = staged
        cap = op.capability()
        if staged and not cap.rename:
            raise ValueError("staged writes need a service that can rename")
        self._if_not_exists = bool(cap.write_with_if_not_exists)

    # ------------------------------------------------------------------ the first contact

    @property
    def _op(self) -> opendal.Operator:
        if self._first_op is not None and self._first_thread is threading.current_thread():
            return self._first_op
        return self._full_op

    def _first(self, fn: Callable[[], T], what: str, name: str) -> T:
        """Run one entry point (``fn``); the first one of this backend with the first-contact
        rules (see the class docstring). Later callers wait for the first one to finish."""
        if self._answered:
            return fn()
        with self._first_lock:
            me = threading.current_thread()
            if self._answered or self._first_thread is me:
                return fn()  # answered meanwhile, or a request nested in the first one
            started, attempt = time.monotonic(), 0
            self._first_thread = me
            try:
                while True:
                    self._first_op, self._probing = self._probe_op, True
                    try:
                        out = fn()
                    except _ProbeFailed as failed:
                        exc = failed.exc
                        if _connection_refused(exc):
                            delay = self._policy.no_answer_delay(attempt, started)
                            if delay is None:
                                raise self._no_answer(exc, what, name, time.monotonic() - started) from None
                            time.sleep(delay)
                            attempt += 1
                            continue
                        self._probing = False
                        if _answer(exc) or self._policy.retries == 0:
                            self._answered = _answer(exc)
                            self._fail(exc, what, name)
                        # no answer yet (a timeout, a 5xx, a dropped connection): the remaining
                        # retries, as for any request
                        self._first_op = self._rest_op
                        time.sleep(self._policy.first_delay)
                        out = fn()
                    except BaseException:
                        self._answered = True  # an answer that means an error (NotFound...)
                        raise
                    self._answered = True
                    return out
            finally:
                self._first_thread, self._first_op, self._probing = None, None, False

    def _no_answer(self, exc: Exception, what: str, name: str, waited: float) -> StorageError:
        where = f"{what} {name} at {self.endpoint}" if name else f"{what} at {self.endpoint}"
        return StorageError(
            f"could not {where}: nothing answers there ({describe_error(exc)}; tried for {waited:.1f} s): the "
            f"{self.service.label} server is not running or the endpoint is wrong",
            f"start the server or fix the endpoint ({self.service.endpoint_hint}), then run the command again",
            exit_code=ExitCode.NO_REPOSITORY,
        )

    # ------------------------------------------------------------------ the interface

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        return self._first(lambda: self._put_now(name, data, if_absent), "write", name)

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        return self._first(lambda: self._get_now(name, offset, length), "read", name)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        if self._answered:
            yield from self._list_now(prefix)
        else:
            yield from self._first(lambda: list(self._list_now(prefix)), "list", prefix)

    def _delete(self, name: str) -> None:
        self._first(lambda: self._delete_now(name), "delete", name)

    def _stat(self, name: str) -> ObjectInfo | None:
        return self._first(lambda: self._stat_now(name), "stat", name)

    # ------------------------------------------------------------------ the requests

    def _put_now(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        # the binding takes any buffer (its stub says bytes); no copy of a 16 MiB pack here
        data = cast(bytes, data)
        try:
            if self._staged:
                if if_absent and self._stat(name) is not None:
                    return False
                self._staged_write(name, data)
                return True
            if not if_absent:
                self._op.write(name, data)
                return True
            if self._if_not_exists:
                # A retried conditional PUT whose first attempt did land is refused by the retry:
                # it then reports "already there", which is true (with the same bytes).
                try:
                    self._op.write(name, data, if_not_exists=True)
                except (ox.ConditionNotMatch, ox.AlreadyExists):
                    return False
                return True
            if self._stat(name) is not None:
                return False
            self._op.write(name, data)
            return True
        except OPENDAL_ERRORS as exc:
            self._fail(exc, "write", name)

    def _get_now(self, name: str, offset: int, length: int | None) -> bytes:
        if length is not None and length < 0:
            length = None
        try:
            if offset == 0 and length is None:
                return self._read(name)
            if offset < 0 or length == 0:
                return self._get_known_size(name, offset, length)
            try:
                return self._read(name, offset=offset, size=length)
            except ox.RangeNotSatisfied:
                pass  # starts at or past the end (or the object is empty)
            except ox.Unexpected as exc:
                # the range runs past the end ("too little data"), or starts there: a 416 that
                # OpenDAL did not classify (wsgidav), or Azurite's "bytes 10-9/10" answer for an
                # empty tail. Read what is there, after a stat.
                if not any(m in str(exc) for m in _RANGE_PAST_END):
                    raise
            return self._get_known_size(name, offset, length)
        except OPENDAL_ERRORS as exc:
            self._fail(exc, "read", name)

    def _list_now(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            # a missing prefix (WebDAV: no collection yet) lists as empty in OpenDAL
            for entry in self._op.list(prefix):
                path = entry.path
                if path == prefix or not path.startswith(prefix):
                    continue  # the prefix itself ("directories" below it are strays)
                meta = entry.metadata
                if self._staged and path[len(prefix) :].startswith(TMP_MARK):
                    self._sweep(path, meta.last_modified)
                    continue
                if meta.last_modified is None:  # not every service lists times: ask for them
                    if not is_object_name(path):  # a stray: never sent back to the service
                        yield ObjectInfo(path, meta.content_length or 0, 0.0)
                        continue
                    info = self._stat(path)
                    if info is not None:
                        yield info
                    continue
                yield ObjectInfo(path, meta.content_length, meta.last_modified.timestamp())
        except OPENDAL_ERRORS as exc:
            self._fail(exc, "list", prefix)

    def _delete_now(self, name: str) -> None:
        try:
            self._op.delete(name)  # a missing object is not an error (S3 answers 204 either way)
        except ox.NotFound:
            pass
        except OPENDAL_ERRORS as exc:
            self._fail(exc, "delete", name)

    def _stat_now(self, name: str) -> ObjectInfo | None:
        try:
            meta = self._op.stat(name)
        except ox.NotFound:
            return None
        except OPENDAL_ERRORS as exc:
            self._fail(exc, "stat", name)
        mtime = meta.last_modified.timestamp() if meta.last_modified is not None else 0.0
        return ObjectInfo(name, meta.content_length, mtime)

    def capabilities(self) -> Capabilities:
        """Create-if-absent only where the service has a conditional write (a stat-then-put or
        a staged write checked first is not atomic); times are the server's."""
        return Capabilities(
            create_if_absent=self._if_not_exists and not self._staged,
            server_side_time=True,
            range_merge_gap=4 << 20,
            remote=True,
        )

    def close(self) -> None:
        """OpenDAL pools its connections per operator; they go with it."""

    # ------------------------------------------------------------------ helpers

    def _staged_write(self, name: str, data: bytes) -> None:
        """PUT to a hidden name beside ``name``, then rename (WebDAV MOVE, Overwrite: T) over it:
        a reader sees the old object or the new one, never a half-written file."""
        head, _, _ = name.rpartition("/")
        tmp = (head + "/" if head else "") + TMP_MARK + os.urandom(8).hex()
        try:
            self._op.write(tmp, data)
        except OPENDAL_ERRORS:
            # a server may keep what it got of a refused PUT (wsgidav does, on a full disk): it
            # must not take the room that a run after freeing space needs for a day
            with contextlib.suppress(*OPENDAL_ERRORS):
                self._op.delete(tmp)
            raise
        try:
            self._op.rename(tmp, name)
        except ox.NotFound:
            # a retried MOVE whose first attempt landed finds no source: done if the object is there
            info = self._stat(name)
            if info is None or info.size != len(data):
                raise
        except OPENDAL_ERRORS:
            with contextlib.suppress(*OPENDAL_ERRORS):  # else a later listing sweeps it once stale
                self._op.delete(tmp)
            raise

    def _sweep(self, path: str, mtime: Any) -> None:
        """Remove a temporary object a killed upload left behind, once a day old (by the
        server's time; best effort: another run sweeps it otherwise)."""
        if mtime is None or time.time() - mtime.timestamp() < STALE_TMP_AGE:
            return
        with contextlib.suppress(*OPENDAL_ERRORS):
            self._op.delete(path)

    def _read(self, name: str, **kw: Any) -> bytes:
        try:
            return bytes(self._op.read(name, **kw))
        except ox.NotFound:
            raise ObjectMissing(name) from None

    def _get_known_size(self, name: str, offset: int, length: int | None) -> bytes:
        """A range read after a stat, with LocalBackend's semantics: a range past the end is
        cut at the end; a negative offset counts from the end, and one reaching before the start
        gives the whole object."""
        info = self._stat(name)
        if info is None:
            raise ObjectMissing(name)
        size = info.size
        if offset < 0:
            if size + offset < 0:
                return self._read(name)
            offset += size
        if length == 0 or offset >= size:
            return b""
        end = size if length is None else min(size, offset + length)
        if offset == 0 and end == size:
            return self._read(name)
        return self._read(name, offset=offset, size=end - offset)

    def _fail(self, exc: Exception, what: str, name: str) -> NoReturn:
        if self._probing and self._first_thread is threading.current_thread():
            raise _ProbeFailed(exc)  # the first contact decides (_first)
        raise storage_error(exc, what, name, self.endpoint, self.service) from None


class _ProbeFailed(Exception):
    """A request of the first contact failed with ``exc`` (an OpenDAL error)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _connection_refused(exc: Exception) -> bool:
    """The host refused the TCP connection: nothing listens on the port."""
    text = str(exc)
    return "error sending request" in text and "Connection refused" in text


def _answer(exc: Exception) -> bool:
    """The service answered (with an error): not a timeout, a dropped or an unsent request."""
    text = str(exc)
    first = text.split("\n", 1)[0]
    return not ("error sending request" in text or "(temporary)" in first or isinstance(exc, ox.RateLimited))


def describe_error(exc: Exception) -> str:
    """The useful part of an OpenDAL error: the service's error code and message, or the
    underlying cause (e.g. ``tcp connect error: Connection refused``), without the backtrace."""
    text = str(exc)
    s3 = re.search(r'code: "([^"]*)", message: "([^"]*)"', text)
    if s3:
        return f"{s3.group(1)}: {s3.group(2)}" if s3.group(2) else s3.group(1)
    m = re.search(r"\nSource:\s*\n\s*(.+)", text)
    if m:
        return m.group(1).strip()
    status = re.search(r"status: (\d{3})", text)
    first = text.split("\n", 1)[0]
    head = first.split("=>", 1)[1].strip() if "=>" in first else first.strip()
    if status:
        return f"{head} (HTTP {status.group(1)})".strip()
    return head or type(exc).__name__


def storage_error(exc: Exception, what: str, name: str, endpoint: str, service: ServiceInfo = GENERIC) -> BunkerError:
    """A failure that retrying did not cure, as a user-facing error: a service that says it has no
    room (507, a "full" or quota code: storage/full.py) is RepositoryFull (exit 4, never spooled);
    one that denies access (401, 403: storage/refused.py) is StorageRefused (a backup spools, at err);
    transient kinds (no answer, 5xx, throttling) say the repository cannot be reached (exit 13);
    the rest are fatal (exit 4)."""
    detail = describe_error(exc)
    text = str(exc)
    first = text.split("\n", 1)[0]
    where = f"{what} {name} at {endpoint}"
    # fetching a token (GCS, Azure AD) can fail for want of a network: that is no answer, not bad keys
    if ("signing credential" in text or "signing http request" in text) and "error sending request" not in text:
        return StorageError(
            f"could not {where}: no usable credentials for {service.label} ({detail})",
            f"set {service.credentials}",
            exit_code=ExitCode.FATAL,
        )
    full = full_reason(text)  # before "access denied": Ceph answers a used-up quota with 403 QuotaExceeded
    if full is not None:
        return service_full(f"could not {where}", detail if detail.startswith(full) else full, service.label)
    if isinstance(exc, ox.PermissionDenied) or "status: 401" in text:
        # the service answered and refuses: a backup keeps its data in the spool, at level err
        return StorageRefused(
            f"could not {where}: access denied ({detail})",
            f"check the credentials ({service.credentials}) and that they may read, write, list and "
            "delete under the repository's prefix",
        )
    if any(code in text for code in service.missing_bucket):
        return StorageError(
            f"could not {where}: the bucket or container does not exist ({detail})",
            "check its name in --repo / BUNKER_REPO, or create it first (bunker never creates one)",
            exit_code=ExitCode.NO_REPOSITORY,
        )
    unsent = "error sending request" in text
    if "(persistent)" in first or "(temporary)" in first or unsent or isinstance(exc, ox.RateLimited):
        return StorageError(
            f"could not {where}: the {service.label} server did not answer or kept failing ({detail}), "
            "also after retrying",
            f"check the endpoint ({service.endpoint_hint}), the network and the service's status, "
            "then run the command again; BUNKER_STORAGE_RETRIES and BUNKER_STORAGE_RETRY_DELAY set how long "
            "bunker keeps retrying",
            exit_code=ExitCode.NO_REPOSITORY,
        )
    return StorageError(
        f"could not {where}: {detail}",
        "check the repository URL and the object store's settings, then run the command again",
        exit_code=ExitCode.FATAL,
    )


def __getattr__(name: str) -> Any:
    """The S3 URL helpers moved to bunker.storage.services; old imports keep working."""
    if name in ("open_s3", "parse_s3_url", "S3Location"):
        from bunker.storage import services

        return getattr(services, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
