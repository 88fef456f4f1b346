"""Bad input and failures: clear messages and the documented exit codes (README, errors.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from conftest import Unprivileged
from helpers import Repo, describe, init_repo, js, make_env, restored_path, run_bunker


def test_first_run_without_tty_or_passphrase_fails_at_once(tmp_path: Path) -> None:
    env = make_env(tmp_path / "e", passphrase=None)
    assert "BUNKER_PASSPHRASE" not in env
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    t0 = time.monotonic()
    cp = run_bunker("backup", src, env=env, stdin=subprocess.DEVNULL, timeout=30)
    assert time.monotonic() - t0 < 30
    assert cp.returncode == 10, describe(cp)
    assert "BUNKER_PASSPHRASE" in cp.stderr
    # nothing was left behind: no repository, no key
    assert not (tmp_path / "e" / "data" / "bunker" / "repo").exists()
    assert not list((tmp_path / "e" / "config").rglob("*.master"))

    cp = run_bunker("init", "--repo", tmp_path / "r", env=env, stdin=subprocess.DEVNULL, timeout=30)
    assert cp.returncode == 10 and "BUNKER_PASSPHRASE" in cp.stderr
    assert not (tmp_path / "r").exists()


def test_wrong_passphrase(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    repo.backup(src)
    bad = dict(repo.env, BUNKER_PASSPHRASE="not the passphrase")
    cp = repo.run("restore", "latest", "--target", tmp_path / "t", env=bad)
    assert cp.returncode == 11, describe(cp)
    assert "passphrase does not open" in cp.stderr
    cp = repo.run("ls", "latest", "--json", env=bad)
    assert cp.returncode == 11 and js(cp)["exit_code"] == 11
    cp = repo.run("key", "export", "--shares", "2-of-3", env=bad)
    assert cp.returncode == 11
    # the backup needs no passphrase at all
    nopw = {k: v for k, v in repo.env.items() if k != "BUNKER_PASSPHRASE"}
    (src / "g").write_bytes(b"y")
    cp = repo.run("backup", src, env=nopw)
    assert cp.returncode == 0, describe(cp)


def test_repository_not_found(env: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for args in (
        ("snapshots", "--repo", "/nonexistent/bunker-repo"),
        ("backup", str(src), "--repo", "/nonexistent/bunker-repo"),
        ("restore", "latest", "--target", str(tmp_path / "t"), "--repo", "/nonexistent/bunker-repo"),
        ("check", "--keyless", "--repo", "/nonexistent/bunker-repo"),
    ):
        cp = run_bunker(*args, env=env)
        assert cp.returncode == 13, describe(cp)
        assert "/nonexistent/bunker-repo" in cp.stderr
    assert not Path("/nonexistent").exists()
    # an existing directory that holds no repository
    empty = tmp_path / "empty"
    empty.mkdir()
    cp = run_bunker("snapshots", "--repo", empty, "--json", env=env)
    assert cp.returncode == 13 and js(cp)["exit_code"] == 13
    assert "no bunker repository" in js(cp)["error"]


def test_backup_of_missing_path_is_usage_error(repo: Repo, tmp_path: Path) -> None:
    cp = repo.run("backup", tmp_path / "does-not-exist")
    assert cp.returncode == 2 and "does not exist" in cp.stderr
    assert repo.objects("snapshots") == []


def test_unreadable_source_file(unprivileged: Unprivileged) -> None:
    base = unprivileged.base
    src = base / "src"
    (src / "sub").mkdir(parents=True)
    (src / "readable.txt").write_bytes(b"readable\n")
    (src / "sub" / "also.bin").write_bytes(os.urandom(20_000))
    secret = src / "sub" / "secret.key"
    secret.write_bytes(b"nobody may read this\n")
    env = make_env(base / "env")
    unprivileged.own(base)  # everything belongs to the unprivileged user ...
    os.chown(secret, 0, 0)  # ... but this file: root's, and readable by nobody
    os.chmod(secret, 0o000)
    pre = unprivileged.prefix
    # with the rights bunker will run with, that file cannot be read and the others can
    probe = subprocess.run([*pre, "cat", str(secret)], capture_output=True, check=False)
    assert probe.returncode != 0 and b"denied" in probe.stderr, probe
    probe = subprocess.run([*pre, "cat", str(src / "readable.txt")], capture_output=True, check=False)
    assert probe.returncode == 0, probe

    cp = run_bunker("init", "--repo", base / "repo", "--json", env=env, prefix=pre)
    assert cp.returncode == 0, describe(cp)
    cp = run_bunker("backup", src, "--repo", base / "repo", "--json", env=env, prefix=pre)
    assert cp.returncode == 3, describe(cp)
    doc = js(cp)
    assert doc["level"] == "err"
    errs = [e for e in doc["events"] if e["level"] == "err"]
    assert len(errs) == 1 and errs[0]["path"] == str(secret), errs
    assert errs[0]["code"] == "read-failed" and "denied" in errs[0]["message"].lower()
    assert doc["stats"]["errors"] == 1
    cp = run_bunker("backup", src, "--repo", base / "repo", env=env, prefix=pre)
    assert cp.returncode == 3
    assert "secret.key" in cp.stderr and "err" in cp.stderr

    # every other file restores; the unreadable one is not claimed by the snapshot
    target = base / "t"
    cp = run_bunker("restore", "latest", "--repo", base / "repo", "--target", target, "--json", env=env, prefix=pre)
    assert cp.returncode == 0, describe(cp)
    out = restored_path(target, src)
    assert (out / "readable.txt").read_bytes() == b"readable\n"
    assert (out / "sub" / "also.bin").read_bytes() == (src / "sub" / "also.bin").read_bytes()
    assert not (out / "sub" / "secret.key").exists()


def test_first_run_creates_default_repository(tmp_path: Path) -> None:
    env = make_env(tmp_path / "e")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_bytes(b"first run\n")
    cp = run_bunker("backup", src, "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    default = tmp_path / "e" / "data" / "bunker" / "repo"
    assert (default / "config").is_dir() and len(list((default / "config").iterdir())) == 1
    doc = js(cp)
    assert doc["repository"] == str(default)
    masters = list((tmp_path / "e" / "config" / "bunker" / "keys").glob("*.master"))
    assert len(masters) == 1
    assert str(masters[0]) in cp.stderr  # says where the master key is
    assert "bunker key export" in cp.stderr
    assert doc["level"] == "note"
    notes = [e for e in doc["events"] if e["code"] == "master-key-on-client"]
    assert notes and notes[0]["level"] == "note" and "bunker key export" in notes[0]["message"]

    # a second run uses the same repository and still reports the key
    doc2 = js(run_bunker("backup", src, "--json", env=env))
    assert doc2["repository"] == str(default) and doc2["seq"] == 2
    assert any(e["code"] == "master-key-on-client" for e in doc2["events"])
    info = js(run_bunker("key", "info", "--json", env=env))
    assert info["master_key_on_this_machine"] is True

    dest = tmp_path / "usb" / "master.key"
    cp = run_bunker("key", "export", "--master", dest, "--remove", env=env)
    assert cp.returncode == 0, describe(cp)
    assert not masters[0].exists() and dest.exists()
    cp = run_bunker("backup", src, "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    doc3 = js(cp)
    assert doc3["level"] == "ok"
    assert not any(e["code"] == "master-key-on-client" for e in doc3["events"])
    assert "master key is at" not in cp.stderr
    assert js(run_bunker("key", "info", "--json", env=env))["master_key_on_this_machine"] is False
    # restore with the exported key from the default repository
    cp = run_bunker("restore", "latest", "--target", tmp_path / "t", "--master-key", dest, env=env)
    assert cp.returncode == 0, describe(cp)
    assert restored_path(tmp_path / "t", src / "f.txt").read_bytes() == b"first run\n"


def test_put_key_of_another_repository_is_refused(repo: Repo, tmp_path: Path) -> None:
    other = init_repo(tmp_path / "other")
    src = tmp_path / "src"
    src.mkdir()
    cp = repo.run("backup", src, "--put-key", other.put_key)
    assert cp.returncode == 14, describe(cp)
    assert "not the one your key is for" in cp.stderr
    assert repo.objects("snapshots") == []
    # a master key file given as put key is refused with a clear message
    cp = repo.run("backup", src, "--put-key", repo.master_key)
    assert cp.returncode == 15, describe(cp)
    assert "master key" in cp.stderr


def test_put_key_alone_never_creates_the_default_repository(repo: Repo, tmp_path: Path) -> None:
    """With BUNKER_PUT_KEY (or --put-key) but no --repo/BUNKER_REPO on a machine without a default
    repository, backup must not make a new repository: it cannot be the key's."""
    env = make_env(tmp_path / "fresh-machine")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    default = tmp_path / "fresh-machine" / "data" / "bunker" / "repo"
    cp = run_bunker("backup", src, env=dict(env, BUNKER_PUT_KEY=str(repo.put_key)))
    assert cp.returncode == 13, describe(cp)
    cp = run_bunker("backup", src, "--put-key", repo.put_key, env=env)
    assert cp.returncode == 13, describe(cp)
    assert not default.exists()
    assert not list((tmp_path / "fresh-machine" / "config").rglob("*.master"))
    # with the repository named, the same key backs up
    cp = run_bunker("backup", src, "--repo", repo.path, env=dict(env, BUNKER_PUT_KEY=str(repo.put_key)))
    assert cp.returncode == 0, describe(cp)


def test_a_vanished_default_repository_is_never_replaced_silently(tmp_path: Path) -> None:
    """Issue 11, point 3: the default repository is created only on a machine that holds no key;
    otherwise a backup says that the repository is gone (exit 13) and makes nothing."""
    env = make_env(tmp_path / "e")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    assert run_bunker("backup", src, env=env).returncode == 0
    default = tmp_path / "e" / "data" / "bunker" / "repo"
    keys = sorted((tmp_path / "e" / "config" / "bunker" / "keys").iterdir())
    repo_id = keys[0].name.split(".")[0]
    shutil.rmtree(default)
    cp = run_bunker("backup", src, env=env)
    assert cp.returncode == 13, describe(cp)
    assert f"your repository at {default} is gone" in cp.stderr and repo_id in cp.stderr
    assert "--repo" in cp.stderr and "bunker init" in cp.stderr  # the next steps
    assert not default.exists()
    assert sorted((tmp_path / "e" / "config" / "bunker" / "keys").iterdir()) == keys

    # a machine whose key is for a repository elsewhere (BUNKER_REPO forgotten in a cron job)
    other = make_env(tmp_path / "o")
    cp = run_bunker("init", "--repo", tmp_path / "elsewhere", env=other)
    assert cp.returncode == 0, describe(cp)
    cp = run_bunker("backup", src, env=other)
    assert cp.returncode == 13, describe(cp)
    assert "is gone" in cp.stderr
    assert not (tmp_path / "o" / "data" / "bunker" / "repo").exists()
    # starting over is one explicit command away
    assert run_bunker("init", env=env).returncode == 0
    assert run_bunker("backup", src, env=env).returncode == 0


def test_a_url_typo_never_becomes_a_local_directory(env: dict[str, str], tmp_path: Path) -> None:
    """Issue 11, point 4: what starts like a URL is parsed as one or refused (exit 2)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for url, expect in (
        ("sftp:/root@host:22/x", "did you mean 'sftp://root@host:22/x'"),
        ("ssh:root@host/x", "did you mean 'ssh://root@host/x'"),
        ("backup-server:/srv/repo", "sftp://user@host/path"),
        ("sftps://host/x", "s3://"),
        ("file://relative/x", "file:///path"),
    ):
        for args in (("init", "--repo", url), ("backup", str(src), "--repo", url), ("snapshots", "--repo", url)):
            cp = run_bunker(*args, env=env, cwd=cwd)
            assert cp.returncode == 2, describe(cp)
            assert expect in cp.stderr, describe(cp)
        cp = run_bunker("backup", src, env=dict(env, BUNKER_REPO=url), cwd=cwd)
        assert cp.returncode == 2, describe(cp)
        cp = run_bunker("serve", "--stdio", "--repo", url, env=env, cwd=cwd)
        assert cp.returncode == 2, describe(cp)
    assert list(cwd.iterdir()) == []
    assert not (tmp_path / "env" / "data" / "bunker" / "spool").exists()
    # a local directory whose name holds a colon is a path with ./ in front
    cp = run_bunker("init", "--repo", "./sftp:/x", env=env, cwd=cwd)
    assert cp.returncode == 0, describe(cp)
    assert (cwd / "sftp:" / "x" / "config").is_dir()
