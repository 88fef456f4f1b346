"""Repository URLs of GCS, Azure Blob and Backblaze B2 (no server needed: nothing is sent until
the first request): canonical forms, and missing credentials or bad URLs as usage errors that
name what to set."""

from __future__ import annotations

from pathlib import Path

import pytest

from bunker.errors import BunkerError, ExitCode
from bunker.storage.services import open_azblob, open_b2, open_gcs
from bunker.storage.url import open_backend

AZ_KEY = "a2V5a2V5a2V5a2V5"  # any base64 will do: nothing is signed here
B2_ENV = {"B2_APPLICATION_KEY_ID": "0012ab", "B2_APPLICATION_KEY": "K001secret"}


def test_gcs(tmp_path: Path) -> None:
    key = tmp_path / "sa.json"
    key.write_text("{}")
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(key)}
    b = open_gcs("gcs://my-backups/laptop/", env=env)
    assert b.url == "gcs://my-backups/laptop" and "bucket my-backups, prefix laptop/" in b.endpoint
    b = open_gcs("gcs://my-backups?endpoint=http://127.0.0.1:4443/", env=env)
    assert b.url == "gcs://my-backups?endpoint=http://127.0.0.1:4443"
    caps = b.capabilities()
    assert caps.create_if_absent and caps.remote  # GCS has ifGenerationMatch=0
    for env, needs in (
        ({}, "GOOGLE_APPLICATION_CREDENTIALS"),
        ({"GOOGLE_APPLICATION_CREDENTIALS": "/nope"}, "JSON key"),
    ):
        with pytest.raises(BunkerError) as exc:
            open_gcs("gcs://my-backups/laptop", env=env)
        assert exc.value.exit_code == ExitCode.USAGE and needs in str(exc.value), exc.value


def test_azblob() -> None:
    env = {"AZURE_STORAGE_ACCOUNT": "acct1", "AZURE_STORAGE_KEY": AZ_KEY}
    b = open_azblob("azblob://backups/laptop", env=env)
    assert b.url == "azblob://backups/laptop?account=acct1&endpoint=https://acct1.blob.core.windows.net"
    assert open_azblob(b.url, env=env).url == b.url
    assert b.capabilities().create_if_absent
    # a connection string; Azurite's development shortcut; a SAS token
    conn = f"DefaultEndpointsProtocol=https;AccountName=acct2;AccountKey={AZ_KEY};EndpointSuffix=core.chinacloudapi.cn"
    b = open_azblob("azblob://backups", env={"AZURE_STORAGE_CONNECTION_STRING": conn})
    assert b.url == "azblob://backups?account=acct2&endpoint=https://acct2.blob.core.chinacloudapi.cn"
    b = open_azblob("azblob://backups", env={"AZURE_STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true"})
    assert b.url == "azblob://backups?account=devstoreaccount1&endpoint=http://127.0.0.1:10000/devstoreaccount1"
    sas = {"AZURE_STORAGE_ACCOUNT": "acct1", "AZURE_STORAGE_SAS_TOKEN": "?sv=2022&sig=abc"}
    assert open_azblob("azblob://backups/p", env=sas).url.startswith("azblob://backups/p?account=acct1")


@pytest.mark.parametrize(
    ("url", "env", "needs"),
    [
        ("azblob://backups/p", {"AZURE_STORAGE_KEY": AZ_KEY}, "AZURE_STORAGE_ACCOUNT"),
        ("azblob://backups/p", {"AZURE_STORAGE_ACCOUNT": "acct1"}, "AZURE_STORAGE_KEY"),
        ("azblob://backups/p", {"AZURE_STORAGE_CONNECTION_STRING": "garbage"}, "AZURE_STORAGE_ACCOUNT"),
        ("azblob://Bad_Container/p", {}, "azblob://CONTAINER"),
        ("azblob://backups/p?acount=x", {}, "account, endpoint"),
        ("azblob://acct1:key@backups/p", {}, "AZURE_STORAGE_KEY"),
        ("b2://my-backups/p", B2_ENV, "bucket_id"),
        ("b2://my-backups/p?bucket_id=abc", {"B2_APPLICATION_KEY_ID": "x"}, "B2_APPLICATION_KEY"),
        ("b2://my-backups/p?bucket_id=abc", {}, "B2_APPLICATION_KEY_ID"),
        ("b2://b/p?bucket_id=abc", B2_ENV, "b2://BUCKET"),
        ("gcs://B/p", {}, "gcs://BUCKET"),
        ("gcs://bucket/p?region=x", {}, "endpoint"),
        ("gcs://bucket/a/../b", {}, "plain names"),
        ("gcs://bucket/p?endpoint=ftp://h", {}, "gcs://BUCKET"),
    ],
)
def test_missing_credentials_and_bad_urls_are_usage_errors(url: str, env: dict[str, str], needs: str) -> None:
    opener = {"azblob": open_azblob, "b2": open_b2, "gcs": open_gcs}[url.split(":", 1)[0]]
    with pytest.raises(BunkerError) as exc:
        opener(url, env=env)
    assert exc.value.exit_code == ExitCode.USAGE, exc.value
    assert needs in str(exc.value), exc.value


def test_b2() -> None:
    b = open_b2("b2://my-backups/laptop?bucket_id=4a48fe8875c6214145260818", env=B2_ENV)
    assert b.url == "b2://my-backups/laptop?bucket_id=4a48fe8875c6214145260818"
    caps = b.capabilities()
    assert not caps.create_if_absent and caps.remote  # B2 has no conditional upload


def test_every_scheme_is_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"AZURE_STORAGE_ACCOUNT": "acct1", "AZURE_STORAGE_KEY": AZ_KEY, **B2_ENV}.items():
        monkeypatch.setenv(k, v)
    assert open_backend("azblob://backups/p").url.startswith("azblob://")
    assert open_backend("b2://my-backups/p?bucket_id=abc").url.startswith("b2://")
    with pytest.raises(BunkerError) as exc:
        open_backend("swift://container/p")
    assert exc.value.exit_code == ExitCode.USAGE and "webdav+https://" in exc.value.hint
