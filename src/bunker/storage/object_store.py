"""Object-store backends through Apache OpenDAL: S3 and S3-compatible services.

``s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&path_style=true``

- Every put is one PUT request (OpenDAL sends a single PutObject when the whole object is written
  in one call and no chunk size is set): an object is visible whole or not at all, and a killed
  upload leaves nothing behind. Never multipart: a refused or killed multipart upload leaves
  invisible parts that OpenDAL can neither list nor abort (DESIGN.md §6).
- Create-if-absent uses a conditional PUT (``If-None-Match: *``) where the service supports it,
  else a stat followed by a put (not atomic: ``capabilities()`` says so; nothing depends on it).
- Transient failures (timeouts, 5xx, throttling, dropped connections) are retried by OpenDAL's
  RetryLayer with exponential backoff and jitter, a bounded number of times
  (BUNKER_STORAGE_RETRIES, BUNKER_STORAGE_RETRY_DELAY); each request is bounded by a
  TimeoutLayer (BUNKER_STORAGE_TIMEOUT). What still fails becomes a BunkerError naming the object,
  the endpoint and the next step.
- Object times are the server's Last-Modified (lease ages are judged by them).

The backend class takes any OpenDAL operator: GCS, Azure Blob, B2 and WebDAV will only need their
URL parsing (issue 4).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import opendal
import opendal.exceptions as ox
from opendal.layers import RetryLayer, TimeoutLayer

from bunker.errors import BunkerError, ExitCode, ObjectMissing, StorageError
from bunker.storage.backend import Backend, Capabilities, InvalidName, ObjectInfo, validate_name

DEFAULT_REGION = "us-east-1"
DEFAULT_RETRIES = 5  # retries after the first attempt: 0.5+1+2+4+8 s of backoff, up to twice that with jitter
DEFAULT_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0
DEFAULT_TIMEOUT = 60.0  # per control request (stat, list, delete); IO requests get twice that

# every exception class of the binding (they share no base class besides Exception)
_OPENDAL_ERRORS: tuple[type[Exception], ...] = tuple(
    v for v in vars(ox).values() if isinstance(v, type) and issubclass(v, Exception)
)
_S3_PARAMS = ("endpoint", "region", "path_style")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)"


def _usage(message: str, hint: str) -> BunkerError:
    return BunkerError(message, hint, exit_code=ExitCode.USAGE)


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
                raise _usage(f"{var}={raw!r} is not a number from {lo:g} to {hi:g}", f"fix or unset {var}")
            return v

        return cls(
            retries=int(number("BUNKER_STORAGE_RETRIES", DEFAULT_RETRIES, 0, 100)),
            first_delay=number("BUNKER_STORAGE_RETRY_DELAY", DEFAULT_RETRY_DELAY, 0, MAX_RETRY_DELAY),
            timeout=number("BUNKER_STORAGE_TIMEOUT", DEFAULT_TIMEOUT, 0.1, 3600),
        )

    def apply(self, op: opendal.Operator) -> opendal.Operator:
        """Wrap ``op``: a timeout per request inside (a timed-out request is a temporary error),
        retries with backoff and jitter outside."""
        op = op.layer(TimeoutLayer(timeout=self.timeout, io_timeout=2 * self.timeout))
        if self.retries > 0:
            op = op.layer(
                RetryLayer(
                    max_times=self.retries,
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
    ``endpoint`` is what error messages call the place (e.g. ``http://127.0.0.1:9000 bucket b``).
    """

    def __init__(self, op: opendal.Operator, url: str, endpoint: str) -> None:
        self._op = op
        self.url = url
        self.endpoint = endpoint
        self._if_not_exists = bool(op.capability().write_with_if_not_exists)

    # ------------------------------------------------------------------ the interface

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        # the binding takes any buffer (its stub says bytes); no copy of a 16 MiB pack here
        data = cast(bytes, data)
        try:
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
        except _OPENDAL_ERRORS as exc:
            self._fail(exc, "write", name)

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
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
                if "too little data" not in str(exc):
                    raise
                # the range runs past the end: read what is there
            return self._get_known_size(name, offset, length)
        except _OPENDAL_ERRORS as exc:
            self._fail(exc, "read", name)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            for entry in self._op.list(prefix):
                path = entry.path
                if path.endswith("/") or not path.startswith(prefix):
                    continue  # the prefix itself, or a "directory" below it
                meta = entry.metadata
                if meta.last_modified is None:  # not every service lists times: ask for them
                    try:
                        validate_name(path)
                    except InvalidName:
                        continue  # a foreign object: never sent back to the service
                    info = self._stat(path)
                    if info is not None:
                        yield info
                    continue
                yield ObjectInfo(path, meta.content_length, meta.last_modified.timestamp())
        except _OPENDAL_ERRORS as exc:
            self._fail(exc, "list", prefix)

    def _delete(self, name: str) -> None:
        try:
            self._op.delete(name)  # a missing object is not an error (S3 answers 204 either way)
        except ox.NotFound:
            pass
        except _OPENDAL_ERRORS as exc:
            self._fail(exc, "delete", name)

    def _stat(self, name: str) -> ObjectInfo | None:
        try:
            meta = self._op.stat(name)
        except ox.NotFound:
            return None
        except _OPENDAL_ERRORS as exc:
            self._fail(exc, "stat", name)
        mtime = meta.last_modified.timestamp() if meta.last_modified is not None else 0.0
        return ObjectInfo(name, meta.content_length, mtime)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            create_if_absent=self._if_not_exists, server_side_time=True, range_merge_gap=4 << 20, remote=True
        )

    def close(self) -> None:
        """OpenDAL pools its connections per operator; they go with it."""

    # ------------------------------------------------------------------ helpers

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
        raise storage_error(exc, what, name, self.endpoint) from None


def _describe(exc: Exception) -> str:
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


def storage_error(exc: Exception, what: str, name: str, endpoint: str) -> StorageError:
    """A failure that retrying did not cure, as a user-facing error: transient kinds (no answer,
    5xx, throttling) say the repository cannot be reached (exit 13); the rest are fatal (exit 4)."""
    detail = _describe(exc)
    text = str(exc)
    first = text.split("\n", 1)[0]
    where = f"{what} {name} at {endpoint}"
    if "signing credential" in text:
        return StorageError(
            f"could not {where}: no usable credentials ({detail})",
            f"set {_CREDENTIAL_VARS}, or AWS_PROFILE naming a profile in ~/.aws/credentials",
            exit_code=ExitCode.FATAL,
        )
    if isinstance(exc, ox.PermissionDenied):
        return StorageError(
            f"could not {where}: access denied ({detail})",
            f"check the credentials ({_CREDENTIAL_VARS}, or AWS_PROFILE) and that they may read, write, list and "
            "delete under the repository's prefix",
            exit_code=ExitCode.FATAL,
        )
    if "NoSuchBucket" in text:
        return StorageError(
            f"could not {where}: the bucket does not exist ({detail})",
            "check the bucket name in --repo / BUNKER_REPO, or create the bucket first",
            exit_code=ExitCode.NO_REPOSITORY,
        )
    if "(persistent)" in first or "(temporary)" in first or isinstance(exc, ox.RateLimited):
        return StorageError(
            f"could not {where}: the object store did not answer or kept failing ({detail}), also after retrying",
            "check the endpoint (endpoint= in the URL or AWS_ENDPOINT_URL), the network and the service's status, "
            "then run the command again; BUNKER_STORAGE_RETRIES and BUNKER_STORAGE_RETRY_DELAY set how long "
            "bunker keeps retrying",
            exit_code=ExitCode.NO_REPOSITORY,
        )
    return StorageError(
        f"could not {where}: {detail}",
        "check the repository URL and the object store's settings, then run the command again",
        exit_code=ExitCode.FATAL,
    )


# ---------------------------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Location:
    """A parsed ``s3://`` repository URL."""

    bucket: str
    prefix: str  # "" or "a/b" (no leading or trailing slash)
    endpoint: str | None
    region: str
    path_style: bool

    @property
    def url(self) -> str:
        """The canonical URL: what error messages show and worker processes reopen."""
        query: dict[str, str] = {}
        if self.endpoint:
            query["endpoint"] = self.endpoint
        query["region"] = self.region
        query["path_style"] = "true" if self.path_style else "false"
        path = "/" + quote(self.prefix) if self.prefix else ""
        return f"s3://{self.bucket}{path}?{urlencode(query, safe=':/')}"

    @property
    def where(self) -> str:
        return f"{self.endpoint or 'AWS S3 (' + self.region + ')'}, bucket {self.bucket}" + (
            f", prefix {self.prefix}/" if self.prefix else ""
        )


def parse_s3_url(url: str, env: Mapping[str, str] | None = None) -> S3Location:
    """Parse ``s3://bucket[/prefix][?endpoint=URL&region=R&path_style=true|false]``; the endpoint
    defaults to AWS_ENDPOINT_URL, the region to AWS_REGION / AWS_DEFAULT_REGION / us-east-1."""
    env = os.environ if env is None else env
    hint = "write it as s3://BUCKET/PREFIX?endpoint=https://HOST:PORT&region=REGION&path_style=true"
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise _usage(f"{url!r} is not an s3:// URL", hint)
    if parts.username is not None or parts.password is not None:
        raise _usage(
            "credentials do not belong in the repository URL",
            f"remove them from the URL and set {_CREDENTIAL_VARS} (or AWS_PROFILE) instead",
        )
    bucket = parts.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise _usage(f"{bucket!r} is not a valid S3 bucket name", hint)
    segments = [s for s in unquote(parts.path).split("/") if s]
    for s in segments:
        if s in (".", "..") or any(ord(c) < 32 or c == "\\" for c in s):
            raise _usage(f"the prefix {parts.path!r} of {url!r} is not usable", "use plain names separated by /")
    params: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if k not in _S3_PARAMS:
            raise _usage(
                f"unknown parameter {k!r} in the repository URL", f"s3:// URLs take {', '.join(_S3_PARAMS)}: {hint}"
            )
        if k in params:
            raise _usage(f"parameter {k!r} is given twice in the repository URL", hint)
        params[k] = v
    endpoint = params.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.netloc or ep.query or ep.fragment:
            raise _usage(f"endpoint {endpoint!r} is not an http:// or https:// URL", hint)
        endpoint = endpoint.rstrip("/")
    region = params.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    if not _REGION.match(region):
        raise _usage(f"{region!r} is not a valid region name", hint)
    if "path_style" in params:
        flag = _BOOL.get(params["path_style"].lower())
        if flag is None:
            raise _usage(f"path_style={params['path_style']!r} is neither true nor false", hint)
        path_style = flag
    else:
        path_style = endpoint is not None  # S3-compatible servers (MinIO, Ceph...) usually want path style
    return S3Location(bucket, "/".join(segments), endpoint, region, path_style)


def _s3_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """Explicit keys from the environment, else nothing (OpenDAL then reads AWS_PROFILE and the
    shared config files); refuse clearly when no source of credentials is there at all."""
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        out = {"access_key_id": key, "secret_access_key": secret}
        if env.get("AWS_SESSION_TOKEN"):
            out["session_token"] = env["AWS_SESSION_TOKEN"]
        return out
    if key or secret:
        missing = "AWS_SECRET_ACCESS_KEY" if key else "AWS_ACCESS_KEY_ID"
        raise BunkerError(
            f"{missing} is not set (the other half of the access key is)",
            f"set both {_CREDENTIAL_VARS}",
            exit_code=ExitCode.FATAL,
        )
    if env.get("AWS_PROFILE"):
        return {"profile": env["AWS_PROFILE"]}
    home = os.path.expanduser("~")
    files = (
        env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials"),
        env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"),
    )
    if any(os.path.isfile(f) for f in files) or env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return {}
    raise BunkerError(
        "no credentials for the object store",
        f"set {_CREDENTIAL_VARS}, or AWS_PROFILE naming a profile in ~/.aws/credentials",
        exit_code=ExitCode.FATAL,
    )


def open_s3(url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> ObjectStoreBackend:
    """The backend for an ``s3://`` URL. Nothing is created: the bucket must exist, and need not be
    empty (`init` refuses a prefix that already holds a repository). ``create`` changes nothing."""
    del create  # an object store has no directories to make
    env = os.environ if env is None else env
    loc = parse_s3_url(url, env)
    cfg: dict[str, str] = {
        "bucket": loc.bucket,
        "root": "/" + loc.prefix + "/" if loc.prefix else "/",
        "region": loc.region,
        "enable_virtual_host_style": "false" if loc.path_style else "true",
        # credentials come from the environment or the profile files only: never probe the EC2
        # instance metadata address (a long hang anywhere but on EC2)
        "disable_ec2_metadata": "true",
    }
    if loc.endpoint:
        cfg["endpoint"] = loc.endpoint
    cfg.update(_s3_credentials(env))
    policy = RetryPolicy.from_env(env)
    try:
        op = opendal.Operator("s3", **cfg)
    except _OPENDAL_ERRORS as exc:
        raise BunkerError(
            f"cannot use the repository URL {loc.url}: {_describe(exc)}",
            "check the URL's parameters",
            exit_code=ExitCode.USAGE,
        ) from None
    return ObjectStoreBackend(policy.apply(op), loc.url, loc.where)
