"""S3 repositories through OpenDAL against a real moto server: URLs, credentials, the CLI end to
end, retries of transient faults (a flaky TCP proxy in front of moto) and clear errors; the
errors for refused keys and a missing bucket also against a real S3 implementation (Ceph's
RADOS Gateway, skipped where it is not installed)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bunker.errors import BunkerError, ExitCode
from bunker.storage.object_store import ObjectStoreBackend, open_s3, parse_s3_url
from bunker.storage.url import open_backend
from helpers import (
    AWS_SCRUB,
    S3_CREDENTIALS,
    FlakyProxy,
    S3Server,
    compare_trees,
    describe,
    free_port,
    init_repo,
    js,
    make_env,
    make_tree,
    restored_path,
    run_bunker,
    start_moto,
)

H = "0123456789abcdef" * 4

# ------------------------------------------------------------------------------------------ URLs


def test_url_parameters_and_canonical_form() -> None:
    loc = parse_s3_url("s3://my-bucket/a/b/?endpoint=http://127.0.0.1:9000/&region=eu-west-1&path_style=false", {})
    assert (loc.bucket, loc.prefix, loc.endpoint, loc.region, loc.path_style) == (
        "my-bucket",
        "a/b",
        "http://127.0.0.1:9000",
        "eu-west-1",
        False,
    )
    assert loc.url == "s3://my-bucket/a/b?endpoint=http://127.0.0.1:9000&region=eu-west-1&path_style=false"
    assert parse_s3_url(loc.url, {}) == loc  # worker processes reopen the canonical URL
    # defaults: AWS itself, us-east-1, virtual-host style; a custom endpoint defaults to path style
    loc = parse_s3_url("s3://bucket", {})
    assert (loc.prefix, loc.endpoint, loc.region, loc.path_style) == ("", None, "us-east-1", False)
    assert loc.url == "s3://bucket?region=us-east-1&path_style=false"
    env = {"AWS_ENDPOINT_URL": "https://minio.example:9000", "AWS_DEFAULT_REGION": "eu-central-1"}
    loc = parse_s3_url("s3://bucket/p", env)
    assert (loc.endpoint, loc.region, loc.path_style) == ("https://minio.example:9000", "eu-central-1", True)
    assert parse_s3_url("s3://bucket/p", {**env, "AWS_REGION": "ap-south-1"}).region == "ap-south-1"
    # the URL's own parameters win over the environment
    loc = parse_s3_url("s3://bucket/p?endpoint=http://localhost:1234&region=us-west-2", env)
    assert (loc.endpoint, loc.region) == ("http://localhost:1234", "us-west-2")


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/p?endpint=http://127.0.0.1:9000",  # unknown parameter (a typo)
        "s3://bucket/p?region=us-east-1&region=eu-west-1",
        "s3://bucket/p?path_style=maybe",
        "s3://bucket/p?endpoint=ftp://host",
        "s3://bucket/p?endpoint=127.0.0.1:9000",
        "s3://bucket/p?region=../x",
        "s3://Bad_Bucket/p",
        "s3://b/p",
        "s3:///p",
        "s3://bucket/a/../b",
        "s3://key:secret@bucket/p",
    ],
)
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(BunkerError) as exc:
        open_backend(url)
    assert exc.value.exit_code == ExitCode.USAGE, exc.value
    assert exc.value.hint


def test_missing_credentials_name_the_variables(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}  # no keys, no profile, no ~/.aws
    with pytest.raises(BunkerError) as exc:
        open_s3("s3://bucket/p?endpoint=http://127.0.0.1:1", env=env)
    assert exc.value.exit_code == ExitCode.FATAL
    assert "AWS_ACCESS_KEY_ID" in exc.value.hint and "AWS_SECRET_ACCESS_KEY" in exc.value.hint
    assert "AWS_PROFILE" in exc.value.hint
    with pytest.raises(BunkerError) as exc:
        open_s3("s3://bucket/p", env={**env, "AWS_ACCESS_KEY_ID": "AKIA"})
    assert "AWS_SECRET_ACCESS_KEY is not set" in exc.value.message


# ------------------------------------------------------------------------------------ end to end


def _s3_env(server: S3Server, base: Path, **extra: str) -> dict[str, str]:
    env = make_env(base)
    for k in AWS_SCRUB:
        env.pop(k, None)
    env.update(server.env(**extra))
    return env


def test_init_backup_restore_check_on_s3(s3_server: S3Server, s3_prefix: str, tmp_path: Path) -> None:
    url = s3_server.url(s3_prefix)
    repo = init_repo(tmp_path / "r", url=url, env_extra=_s3_env(s3_server, tmp_path / "r"))
    src = tmp_path / "src"
    files = make_tree(src)
    doc = repo.backup(src)
    assert doc["stats"]["files"] == len(files) and doc["stats"]["errors"] == 0
    assert doc["repository"].startswith(f"s3://{s3_server.bucket}/{s3_prefix}?")
    # a second run stores (almost) nothing new
    again = repo.backup(src)
    assert again["stats"]["files_new"] == 0

    target = tmp_path / "target"
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))

    check = js(repo.ok("check", "--read-data", "--json"))
    assert check["ok"] is True, check
    keyless = js(repo.ok("check", "--keyless", "--expect", repo.id, "--json"))
    assert keyless["ok"] is True, keyless

    # every object went up with one plain PUT: no multipart upload anywhere
    reqs = [r for r in s3_server.requests() if f"/{s3_prefix}/" in r]
    assert any(r.startswith("PUT ") and "/packs/" in r for r in reqs)
    assert not [r for r in reqs if "uploads" in r or "partNumber" in r]

    # `init` refuses a prefix that holds a repository, but not a bucket that holds other things
    cp = run_bunker("init", "--repo", url, "--client", "again", env=repo.env)
    assert cp.returncode == ExitCode.BAD_REPOSITORY, describe(cp)
    assert "already exists" in cp.stderr
    other = init_repo(tmp_path / "r2", url=s3_server.url(s3_prefix + "-other"), env_extra=_s3_env(s3_server, tmp_path))
    assert other.id != repo.id


def test_restore_from_s3_batches_its_reads(s3_server: S3Server, s3_prefix: str, tmp_path: Path) -> None:
    """A restore of many directories and small files from an object store reads trees a pack at a
    time and files in merged range reads: requests grow with packs, not with files or directories."""
    url = s3_server.url(s3_prefix)
    repo = init_repo(tmp_path / "r", url=url, env_extra=_s3_env(s3_server, tmp_path / "r"))
    src = tmp_path / "src"
    for d in range(120):
        sub = src / f"dir{d:03d}" / "inner"
        sub.mkdir(parents=True)
        for f in range(4):
            (sub / f"f{f}.txt").write_bytes(f"directory {d} file {f}\n".encode() * (d + f + 1))
    big = os.urandom(6 << 20)  # a file of several chunks: read ahead, not one request per chunk
    (src / "big.bin").write_bytes(big)
    repo.backup(src)

    before = len(s3_server.requests())
    target = tmp_path / "target"
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    gets = [r for r in s3_server.requests()[before:] if r.startswith("GET ") and "/packs/" in r]
    # 241 directories and 481 files: one request each would be over 700
    assert len(gets) < 40, f"{len(gets)} pack reads for 241 directories and 481 files"


def test_repository_url_from_the_environment(s3_server: S3Server, s3_prefix: str, tmp_path: Path) -> None:
    """BUNKER_REPO=s3://bucket/prefix with the endpoint from AWS_ENDPOINT_URL."""
    env = _s3_env(s3_server, tmp_path / "e", AWS_ENDPOINT_URL=s3_server.endpoint)
    url = f"s3://{s3_server.bucket}/{s3_prefix}"
    cp = run_bunker("init", "--repo", url, "--client", "c", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    env["BUNKER_REPO"] = url
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"hello s3\n" * 1000)
    cp = run_bunker("backup", str(tmp_path / "d"), "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    cp = run_bunker("restore", "latest", "--target", str(tmp_path / "t"), env=env)
    assert cp.returncode == 0, describe(cp)
    assert (restored_path(tmp_path / "t", tmp_path / "d") / "f").read_bytes() == b"hello s3\n" * 1000


# ---------------------------------------------------------------------------------------- errors


def _assert_clear(cp: object, code: int, *needles: str) -> None:
    assert cp.returncode == code, describe(cp)  # type: ignore[attr-defined]
    err: str = cp.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in err, err
    assert "next step:" in err, err
    for n in needles:
        assert n in err, err


def test_unreachable_endpoint_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"s3://bucket/p?endpoint=http://127.0.0.1:{port}"
    env = make_env(tmp_path)
    for k in AWS_SCRUB:
        env.pop(k, None)
    env.update(S3_CREDENTIALS, BUNKER_STORAGE_RETRIES="2", BUNKER_STORAGE_RETRY_DELAY="0.05")
    for args in (("init", "--client", "c"), ("backup", str(tmp_path)), ("check", "--keyless")):
        t0 = time.monotonic()
        cp = run_bunker(*args, "--repo", url, env=env, timeout=60)
        assert time.monotonic() - t0 < 30
        # nothing listens: a short try, then unreachable (issue 11 point 18; test_no_answer.py)
        _assert_clear(cp, ExitCode.NO_REPOSITORY, f"127.0.0.1:{port}", "nothing answers there", "start the server")
        assert "Connection refused" in cp.stderr
    # --json carries the same error
    cp = run_bunker("check", "--keyless", "--json", "--repo", url, env=env, timeout=60)
    assert js(cp)["exit_code"] == ExitCode.NO_REPOSITORY


def test_wrong_credentials_are_refused_clearly(tmp_path: Path) -> None:
    server = start_moto(tmp_path / "moto-auth", check_credentials=True)
    try:
        env = _s3_env(server, tmp_path / "e")
        cp = run_bunker("init", "--repo", server.url("p"), "--client", "c", env=env, timeout=60)
        _assert_clear(cp, ExitCode.FATAL, "access denied", "InvalidAccessKeyId", "AWS_SECRET_ACCESS_KEY")
    finally:
        server.stop()


def test_wrong_credentials_are_refused_clearly_by_rgw(rgw_server: S3Server, tmp_path: Path) -> None:
    """RGW checks every signature (moto only with check_credentials): an unknown key and a wrong
    secret are both refused, with the service's own code."""
    env = _s3_env(rgw_server, tmp_path / "e", AWS_ACCESS_KEY_ID="nosuchkey")
    cp = run_bunker("init", "--repo", rgw_server.url("p"), "--client", "c", env=env, timeout=60)
    _assert_clear(cp, ExitCode.FATAL, "access denied", "InvalidAccessKeyId", "AWS_SECRET_ACCESS_KEY")
    env = _s3_env(rgw_server, tmp_path / "e", AWS_SECRET_ACCESS_KEY="wrong" * 8)
    cp = run_bunker("check", "--keyless", "--repo", rgw_server.url("p"), env=env, timeout=60)
    _assert_clear(cp, ExitCode.FATAL, "access denied", "SignatureDoesNotMatch")


def test_missing_credentials_and_bucket_via_the_cli(s3_server: S3Server, tmp_path: Path) -> None:
    env = _s3_env(s3_server, tmp_path / "e")
    for k in S3_CREDENTIALS:
        del env[k]
    cp = run_bunker("init", "--repo", s3_server.url("p"), "--client", "c", env=env)
    _assert_clear(cp, ExitCode.FATAL, "no credentials", "AWS_ACCESS_KEY_ID")
    env = _s3_env(s3_server, tmp_path / "e")
    cp = run_bunker("init", "--repo", s3_server.url("p").replace(s3_server.bucket, "no-such-bucket"), env=env)
    _assert_clear(cp, ExitCode.NO_REPOSITORY, "bucket does not exist", "no-such-bucket")
    cp = run_bunker("check", "--keyless", "--repo", s3_server.url("p") + "&colour=blue", env=env)
    _assert_clear(cp, ExitCode.USAGE, "unknown parameter 'colour'")
    cp = run_bunker("backup", str(tmp_path / "e"), "--repo", s3_server.url("empty-prefix"), env=env)
    _assert_clear(cp, ExitCode.NO_REPOSITORY, "no bunker repository")


# --------------------------------------------------------------------------------------- retries


def _through(proxy: FlakyProxy, server: S3Server, prefix: str) -> ObjectStoreBackend:
    b = open_s3(f"s3://{server.bucket}/{prefix}?endpoint={proxy.endpoint}")
    assert isinstance(b, ObjectStoreBackend)
    return b


@pytest.mark.parametrize("mode", ["drop", "busy"])
def test_transient_faults_are_retried(
    mode: str, s3_server: S3Server, s3_env: dict[str, str], s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUNKER_STORAGE_RETRIES", "4")
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    proxy = FlakyProxy(port, faults=3, mode=mode)
    try:
        b = _through(proxy, s3_server, s3_prefix)
        assert b.put("packs/" + H, b"survives a flaky network") is True
        assert proxy.spoiled == 3
        assert b.get("packs/" + H) == b"survives a flaky network"
    finally:
        proxy.close()


def test_retries_are_bounded(
    s3_server: S3Server, s3_env: dict[str, str], s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUNKER_STORAGE_RETRIES", "2")
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    proxy = FlakyProxy(port, faults=1000, mode="busy")
    try:
        b = _through(proxy, s3_server, s3_prefix)
        with pytest.raises(BunkerError) as exc:
            b.put("packs/" + H, b"x")
        assert proxy.spoiled == 3  # the first attempt and two retries
        e = exc.value
        assert e.exit_code == ExitCode.NO_REPOSITORY
        assert "packs/" + H in e.message and proxy.endpoint in e.message and "SlowDown" in e.message, e.message
    finally:
        proxy.close()


def test_a_stalled_server_does_not_hang(
    s3_server: S3Server, s3_env: dict[str, str], s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUNKER_STORAGE_RETRIES", "1")
    monkeypatch.setenv("BUNKER_STORAGE_TIMEOUT", "0.5")
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    proxy = FlakyProxy(port, faults=1000, mode="stall")
    try:
        b = _through(proxy, s3_server, s3_prefix)
        t0 = time.monotonic()
        with pytest.raises(BunkerError) as exc:
            b.stat("packs/" + H)
        assert time.monotonic() - t0 < 10
        assert exc.value.exit_code == ExitCode.NO_REPOSITORY
        assert proxy.spoiled == 2
    finally:
        proxy.close()


@pytest.mark.parametrize("kind", ["moto", "rgw"])
def test_permanent_errors_are_not_retried(kind: str, request: pytest.FixtureRequest, s3_prefix: str) -> None:
    """A missing bucket (NoSuchBucket, from both servers): one request, then a clear error."""
    s3_server: S3Server = request.getfixturevalue("rgw_server" if kind == "rgw" else "s3_server")
    request.getfixturevalue("rgw_env" if kind == "rgw" else "s3_env")
    b = open_s3(s3_server.url(s3_prefix).replace(s3_server.bucket, "no-such-bucket"))
    t0 = time.monotonic()
    with pytest.raises(BunkerError) as exc:
        b.put("packs/" + H, b"x")
    assert time.monotonic() - t0 < 5
    # RGW's error answers carry the code without moto's message ("The specified bucket does not
    # exist"): the error is recognised by the code either way
    assert exc.value.exit_code == ExitCode.NO_REPOSITORY
    assert "the bucket or container does not exist (NoSuchBucket" in exc.value.message, exc.value.message
    # radosgw writes its access log after answering: wait for the line, then count
    deadline = time.monotonic() + 10
    while not any(f"/no-such-bucket/{s3_prefix}/" in r for r in s3_server.requests()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert len([r for r in s3_server.requests() if f"/no-such-bucket/{s3_prefix}/" in r]) == 1
    with pytest.raises(BunkerError) as exc:
        list(b.list("packs/"))
    assert exc.value.exit_code == ExitCode.NO_REPOSITORY
    assert "the bucket or container does not exist (NoSuchBucket" in exc.value.message, exc.value.message


def test_listing_pages_past_a_thousand_objects(s3_server: S3Server, s3_env: dict[str, str], s3_prefix: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    b = open_backend(s3_server.url(s3_prefix))
    names = [f"index/{i:064x}" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: b.put(n, b"i"), names))
    assert sorted(i.name for i in b.list("index/")) == names
