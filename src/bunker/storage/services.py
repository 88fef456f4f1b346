"""Repository URLs of the object stores reached through OpenDAL, and how each configures its
operator. The backend itself (bunker.storage.object_store) is the same for all of them.

| URL | service |
|---|---|
| ``s3://BUCKET/PREFIX?endpoint=URL&region=R&path_style=true`` | S3 and S3-compatible servers |
| ``gcs://BUCKET/PREFIX[?endpoint=URL]`` | Google Cloud Storage |
| ``azblob://CONTAINER/PREFIX[?account=NAME&endpoint=URL]`` | Azure Blob Storage (and Azurite) |
| ``b2://BUCKET/PREFIX?bucket_id=ID`` | Backblaze B2 (native API) |
| ``webdav+https://[USER@]HOST[:PORT]/PATH`` (or ``webdav+http``) | a WebDAV server |

Credentials never come from the URL (a password there would show up in every message and
listing): each service reads the environment variables its own tools use, and a missing one is a
usage error naming it, before anything is sent. Unknown or repeated URL parameters are refused, so
a typo cannot silently change where backups go.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit

import opendal

from bunker.errors import BunkerError, ExitCode
from bunker.storage.object_store import (
    OPENDAL_ERRORS,
    ObjectStoreBackend,
    RetryPolicy,
    ServiceInfo,
    describe_error,
    usage_error,
)

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class _Url(NamedTuple):
    parts: SplitResult
    prefix: str  # "" or "a/b" (no leading or trailing slash)
    params: dict[str, str]


def _split(
    url: str, schemes: tuple[str, ...], allowed: tuple[str, ...], hint: str, creds: str, *, user_ok: bool = False
) -> _Url:
    """Split and check what every object-store URL shares: the scheme, no credentials (``creds``
    names where they go instead), a clean prefix, known parameters given once."""
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise usage_error(f"{url!r} is not a {schemes[0]}:// URL", hint)
    if parts.password is not None or (parts.username is not None and not user_ok):
        raise usage_error(
            "credentials do not belong in the repository URL", f"remove them from the URL and set {creds}"
        )
    if parts.fragment:
        raise usage_error(f"the repository URL {url!r} has a #fragment", hint)
    segments = [s for s in unquote(parts.path).split("/") if s]
    for s in segments:
        if s in (".", "..") or any(ord(c) < 32 or c == "\\" for c in s):
            raise usage_error(f"the path {parts.path!r} of {url!r} is not usable", "use plain names separated by /")
    params: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if k not in allowed:
            takes = f"{schemes[0]}:// URLs take {', '.join(allowed)}" if allowed else f"{schemes[0]}:// URLs take none"
            raise usage_error(f"unknown parameter {k!r} in the repository URL", f"{takes}: {hint}")
        if k in params:
            raise usage_error(f"parameter {k!r} is given twice in the repository URL", hint)
        params[k] = v
    return _Url(parts, "/".join(segments), params)


def _http_url(value: str, what: str, hint: str) -> str:
    ep = urlsplit(value)
    if ep.scheme not in ("http", "https") or not ep.netloc or ep.query or ep.fragment:
        raise usage_error(f"{what} {value!r} is not an http:// or https:// URL", hint)
    return value.rstrip("/")


def _root(prefix: str) -> str:
    return "/" + prefix + "/" if prefix else "/"


def _path(prefix: str) -> str:
    return "/" + quote(prefix) if prefix else ""


def _backend(
    scheme: str,
    cfg: dict[str, str],
    url: str,
    where: str,
    service: ServiceInfo,
    env: Mapping[str, str],
    *,
    staged: bool = False,
) -> ObjectStoreBackend:
    """The operator for ``cfg`` with retries and timeouts, as a backend."""
    policy = RetryPolicy.from_env(env)
    try:
        op = opendal.Operator(scheme, **cfg)
    except OPENDAL_ERRORS as exc:
        raise usage_error(
            f"cannot use the repository URL {url}: {describe_error(exc)}", "check the URL's parameters"
        ) from None
    return ObjectStoreBackend(
        policy.apply(op),
        url,
        where,
        service=service,
        staged=staged,
        probe=policy.probe(op),
        rest=policy.apply(op, max(0, policy.retries - 1)),  # after a first attempt through ``probe``
        policy=policy,
    )


# ---------------------------------------------------------------------------------------------- S3

DEFAULT_REGION = "us-east-1"
_S3_PARAMS = ("endpoint", "region", "path_style")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_AWS_KEYS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)"
S3 = ServiceInfo(
    "S3",
    f"{_AWS_KEYS}, or AWS_PROFILE naming a profile in ~/.aws/credentials",
    "endpoint= in the URL or AWS_ENDPOINT_URL",
    ("NoSuchBucket",),
)


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
        return f"s3://{self.bucket}{_path(self.prefix)}?{urlencode(query, safe=':/')}"

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
    u = _split(url, ("s3",), _S3_PARAMS, hint, f"{_AWS_KEYS} (or AWS_PROFILE) instead")
    bucket, params = u.parts.netloc, u.params
    if not _S3_BUCKET.match(bucket) or ".." in bucket:
        raise usage_error(f"{bucket!r} is not a valid S3 bucket name", hint)
    endpoint = params.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None:
        endpoint = _http_url(endpoint, "endpoint", hint)
    region = params.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    if not _REGION.match(region):
        raise usage_error(f"{region!r} is not a valid region name", hint)
    if "path_style" in params:
        flag = _BOOL.get(params["path_style"].lower())
        if flag is None:
            raise usage_error(f"path_style={params['path_style']!r} is neither true nor false", hint)
        path_style = flag
    else:
        path_style = endpoint is not None  # S3-compatible servers (MinIO, Ceph...) usually want path style
    return S3Location(bucket, u.prefix, endpoint, region, path_style)


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
            f"set both {_AWS_KEYS}",
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
    raise BunkerError("no credentials for the object store", f"set {S3.credentials}", exit_code=ExitCode.FATAL)


def open_s3(url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> ObjectStoreBackend:
    """The backend for an ``s3://`` URL. Nothing is created: the bucket must exist, and need not be
    empty (`init` refuses a prefix that already holds a repository). ``create`` changes nothing."""
    del create  # an object store has no directories to make
    env = os.environ if env is None else env
    loc = parse_s3_url(url, env)
    cfg: dict[str, str] = {
        "bucket": loc.bucket,
        "root": _root(loc.prefix),
        "region": loc.region,
        "enable_virtual_host_style": "false" if loc.path_style else "true",
        # credentials come from the environment or the profile files only: never probe the EC2
        # instance metadata address (a long hang anywhere but on EC2)
        "disable_ec2_metadata": "true",
    }
    if loc.endpoint:
        cfg["endpoint"] = loc.endpoint
    cfg.update(_s3_credentials(env))
    return _backend("s3", cfg, loc.url, loc.where, S3, env)


# --------------------------------------------------------------------------------------------- GCS

_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
GCS = ServiceInfo(
    "Google Cloud Storage",
    "GOOGLE_APPLICATION_CREDENTIALS to the path of a service account's JSON key file",
    "endpoint= in the URL, default https://storage.googleapis.com",
    ("The specified bucket does not exist",),
)


def open_gcs(url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> ObjectStoreBackend:
    """The backend for ``gcs://BUCKET/PREFIX[?endpoint=URL]``, with the service account key file
    named by GOOGLE_APPLICATION_CREDENTIALS (the VM metadata server is never asked)."""
    del create
    env = os.environ if env is None else env
    hint = "write it as gcs://BUCKET/PREFIX"
    u = _split(url, ("gcs",), ("endpoint",), hint, GCS.credentials)
    bucket = u.parts.netloc
    if not _GCS_BUCKET.match(bucket) or ".." in bucket:
        raise usage_error(f"{bucket!r} is not a valid Google Cloud Storage bucket name", hint)
    endpoint = _http_url(u.params["endpoint"], "endpoint", hint) if u.params.get("endpoint") else None
    key_file = env.get("GOOGLE_APPLICATION_CREDENTIALS", "")
    if not key_file:
        raise usage_error("no credentials for Google Cloud Storage", f"set {GCS.credentials}")
    if not os.path.isfile(key_file):
        raise usage_error(
            f"GOOGLE_APPLICATION_CREDENTIALS names {key_file!r}, which is not a file",
            "set it to the path of the service account's JSON key file",
        )
    cfg = {
        "bucket": bucket,
        "root": _root(u.prefix),
        "credential_path": key_file,
        # only what this URL and the environment say: no other configuration, no metadata server
        "disable_config_load": "true",
        "disable_vm_metadata": "true",
    }
    query = ""
    if endpoint:
        cfg["endpoint"] = endpoint
        query = "?" + urlencode({"endpoint": endpoint}, safe=":/")
    canonical = f"gcs://{bucket}{_path(u.prefix)}{query}"
    where = f"{endpoint or 'Google Cloud Storage'}, bucket {bucket}" + (f", prefix {u.prefix}/" if u.prefix else "")
    return _backend("gcs", cfg, canonical, where, GCS, env)


# ------------------------------------------------------------------------------------- Azure Blob

_CONTAINER = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
# Azurite's fixed development account (public, documented by Microsoft)
_DEV_ACCOUNT = "devstoreaccount1"
_DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_AZ_KEYS = (
    "AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY (or AZURE_STORAGE_SAS_TOKEN), or AZURE_STORAGE_CONNECTION_STRING"
)
AZURE = ServiceInfo(
    "Azure Blob Storage",
    _AZ_KEYS,
    "endpoint= in the URL or BlobEndpoint in AZURE_STORAGE_CONNECTION_STRING",
    ("ContainerNotFound",),
)


def _connection_string(text: str) -> dict[str, str]:
    """``Key=Value;Key=Value`` (values may hold '=': base64 keys, SAS tokens)."""
    out: dict[str, str] = {}
    for item in text.split(";"):
        k, sep, v = item.strip().partition("=")
        if not item.strip():
            continue
        if not sep or not k:
            raise usage_error(
                "AZURE_STORAGE_CONNECTION_STRING is not a list of Key=Value items separated by ';'",
                "copy it again from the storage account's Access keys page, or set AZURE_STORAGE_ACCOUNT and "
                "AZURE_STORAGE_KEY instead",
            )
        out[k] = v
    if out.get("UseDevelopmentStorage", "").lower() == "true":  # Azurite's own defaults
        out.setdefault("AccountName", _DEV_ACCOUNT)
        out.setdefault("AccountKey", _DEV_KEY)
        out.setdefault("BlobEndpoint", f"http://127.0.0.1:10000/{_DEV_ACCOUNT}")
    return out


def open_azblob(url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> ObjectStoreBackend:
    """The backend for ``azblob://CONTAINER/PREFIX[?account=NAME&endpoint=URL]``; the account and
    its key or SAS token come from the environment (the variables the ``az`` CLI reads)."""
    del create
    env = os.environ if env is None else env
    hint = "write it as azblob://CONTAINER/PREFIX?account=ACCOUNT"
    u = _split(url, ("azblob",), ("account", "endpoint"), hint, _AZ_KEYS)
    container = u.parts.netloc
    if not _CONTAINER.match(container):
        raise usage_error(f"{container!r} is not a valid Azure container name", hint)
    conn = _connection_string(env.get("AZURE_STORAGE_CONNECTION_STRING", ""))
    account = u.params.get("account") or conn.get("AccountName") or env.get("AZURE_STORAGE_ACCOUNT", "")
    if not account:
        raise usage_error(
            "no Azure storage account is named", f"set AZURE_STORAGE_ACCOUNT (or account= in the URL): {hint}"
        )
    if not _ACCOUNT.match(account):
        raise usage_error(f"{account!r} is not a valid Azure storage account name", hint)
    key = conn.get("AccountKey") or env.get("AZURE_STORAGE_KEY", "")
    sas = conn.get("SharedAccessSignature") or env.get("AZURE_STORAGE_SAS_TOKEN", "")
    if not key and not sas:
        raise usage_error(f"no credentials for the Azure storage account {account}", f"set {_AZ_KEYS}")
    endpoint = u.params.get("endpoint") or conn.get("BlobEndpoint")
    if endpoint:
        endpoint = _http_url(endpoint, "endpoint", hint)
    else:
        proto = conn.get("DefaultEndpointsProtocol", "https")
        endpoint = f"{proto}://{account}.blob.{conn.get('EndpointSuffix', 'core.windows.net')}"
    cfg = {"container": container, "root": _root(u.prefix), "endpoint": endpoint, "account_name": account}
    if key:
        cfg["account_key"] = key
    else:
        cfg["sas_token"] = sas.lstrip("?")
    query = urlencode({"account": account, "endpoint": endpoint}, safe=":/")
    canonical = f"azblob://{container}{_path(u.prefix)}?{query}"
    where = f"{endpoint}, container {container}" + (f", prefix {u.prefix}/" if u.prefix else "")
    return _backend("azblob", cfg, canonical, where, AZURE, env)


# ---------------------------------------------------------------------------------------------- B2

_B2_BUCKET = re.compile(r"^[A-Za-z0-9-]{6,50}$")
_B2_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")
_B2_KEYS = "B2_APPLICATION_KEY_ID and B2_APPLICATION_KEY"
B2 = ServiceInfo("Backblaze B2", _B2_KEYS, "the network and https://status.backblaze.com", ("bucket_not_found",))


def open_b2(url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> ObjectStoreBackend:
    """The backend for ``b2://BUCKET/PREFIX?bucket_id=ID`` (B2's native API; the id is shown by
    ``b2 bucket get BUCKET`` and in the web console), keys from B2_APPLICATION_KEY_ID/_KEY."""
    del create
    env = os.environ if env is None else env
    hint = "write it as b2://BUCKET/PREFIX?bucket_id=BUCKET_ID"
    u = _split(url, ("b2",), ("bucket_id",), hint, _B2_KEYS)
    bucket = u.parts.netloc
    if not _B2_BUCKET.match(bucket):
        raise usage_error(f"{bucket!r} is not a valid B2 bucket name", hint)
    bucket_id = u.params.get("bucket_id", "")
    if not _B2_ID.match(bucket_id):
        raise usage_error(
            f"the B2 URL needs the bucket's id (bucket_id={bucket_id!r})",
            f"{hint}; `b2 bucket get {bucket}` and the B2 web console's bucket list show the id",
        )
    key_id, key = env.get("B2_APPLICATION_KEY_ID", ""), env.get("B2_APPLICATION_KEY", "")
    if not key_id or not key:
        missing = " and ".join(v for v, x in (("B2_APPLICATION_KEY_ID", key_id), ("B2_APPLICATION_KEY", key)) if not x)
        raise usage_error(f"no credentials for Backblaze B2 ({missing} not set)", f"set {_B2_KEYS}")
    cfg = {
        "bucket": bucket,
        "bucket_id": bucket_id,
        "root": _root(u.prefix),
        "application_key_id": key_id,
        "application_key": key,
    }
    canonical = f"b2://{bucket}{_path(u.prefix)}?{urlencode({'bucket_id': bucket_id})}"
    where = f"Backblaze B2, bucket {bucket}" + (f", prefix {u.prefix}/" if u.prefix else "")
    return _backend("b2", cfg, canonical, where, B2, env)


# ------------------------------------------------------------------------------------------ WebDAV

_WEBDAV_KEYS = "BUNKER_WEBDAV_USER (or USER@ in the URL) and BUNKER_WEBDAV_PASSWORD, or BUNKER_WEBDAV_TOKEN"
WEBDAV = ServiceInfo("WebDAV", _WEBDAV_KEYS, "the host and port in the repository URL")


def open_webdav(url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> ObjectStoreBackend:
    """The backend for ``webdav+https://[USER@]HOST[:PORT]/PATH`` (or ``webdav+http``): the
    password (BUNKER_WEBDAV_PASSWORD) or bearer token (BUNKER_WEBDAV_TOKEN) from the environment.
    Writes are staged (PUT to a hidden name, then MOVE): many servers write a PUT straight into
    the target file, so a reader could see half an object. Directories are made by OpenDAL
    (MKCOL) on the first write below them."""
    del create
    env = os.environ if env is None else env
    hint = "write it as webdav+https://USER@HOST:PORT/PATH"
    u = _split(url, ("webdav+https", "webdav+http"), (), hint, "BUNKER_WEBDAV_PASSWORD", user_ok=True)
    parts = u.parts
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise usage_error(f"the port in {url!r} is not a number from 1 to 65535", hint) from None
    if not host:
        raise usage_error(f"{url!r} names no server", hint)
    hostport = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    endpoint = f"{parts.scheme.removeprefix('webdav+')}://{hostport}"
    user = unquote(parts.username) if parts.username else env.get("BUNKER_WEBDAV_USER", "")
    password, token = env.get("BUNKER_WEBDAV_PASSWORD", ""), env.get("BUNKER_WEBDAV_TOKEN", "")
    cfg = {"endpoint": endpoint, "root": _root(u.prefix)}
    if user:
        if not password:
            raise usage_error(f"no password for the WebDAV user {user}", "set BUNKER_WEBDAV_PASSWORD")
        cfg.update(username=user, password=password)
    elif token:
        cfg["token"] = token
    # else anonymous: a server that wants a login answers 401, reported as access denied
    userinfo = quote(parts.username, safe="") + "@" if parts.username else ""
    canonical = f"{parts.scheme}://{userinfo}{hostport}{_path(u.prefix)}"
    return _backend("webdav", cfg, canonical, f"{endpoint}{_root(u.prefix)}", WEBDAV, env, staged=True)


# ------------------------------------------------------------------------------------------- all

OPENERS: dict[str, Callable[..., ObjectStoreBackend]] = {
    "s3": open_s3,
    "gcs": open_gcs,
    "azblob": open_azblob,
    "b2": open_b2,
    "webdav+https": open_webdav,
    "webdav+http": open_webdav,
}


def open_object_store(url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> ObjectStoreBackend:
    """The backend for any object-store URL (a scheme of OPENERS)."""
    scheme = urlsplit(url).scheme
    opener = OPENERS.get(scheme)
    if opener is None:
        raise usage_error(f"{scheme!r} is not an object store scheme", f"use one of {', '.join(OPENERS)}")
    return opener(url, create=create, env=env)
