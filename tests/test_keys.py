"""Key management: passphrase change, SLIP-39 shares and recovery, key info, new clients."""

from __future__ import annotations

from pathlib import Path

from helpers import PASSPHRASE, Repo, describe, js, make_env, restored_path, run_bunker


def _one_backup(repo: Repo, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "doc.txt").write_bytes(b"precious\n")
    repo.backup(src)
    return src


def test_key_passwd(repo: Repo, tmp_path: Path) -> None:
    src = _one_backup(repo, tmp_path)
    new_pw = "a new and better passphrase"
    old_file = repo.master_key.read_text()
    cp = repo.run("key", "passwd", "--json", env=dict(repo.env, BUNKER_NEW_PASSPHRASE=new_pw))
    assert cp.returncode == 0, describe(cp)
    assert js(cp)["changed"] is True
    assert repo.master_key.read_text() != old_file
    assert (repo.master_key.stat().st_mode & 0o777) == 0o600
    # the old passphrase no longer opens it; the new one does
    cp = repo.run("restore", "latest", "--target", tmp_path / "t-old")
    assert cp.returncode == 11, describe(cp)
    cp = repo.run("restore", "latest", "--target", tmp_path / "t-new", env=dict(repo.env, BUNKER_PASSPHRASE=new_pw))
    assert cp.returncode == 0, describe(cp)
    assert restored_path(tmp_path / "t-new", src / "doc.txt").read_bytes() == b"precious\n"
    # no new passphrase and no terminal: a clear failure, the key is unchanged
    before = repo.master_key.read_text()
    cp = repo.run("key", "passwd", env=dict(repo.env, BUNKER_PASSPHRASE=new_pw))
    assert cp.returncode == 10 and "BUNKER_NEW_PASSPHRASE" in cp.stderr
    assert repo.master_key.read_text() == before
    # an empty new passphrase is refused
    cp = repo.run("key", "passwd", env=dict(repo.env, BUNKER_PASSPHRASE=new_pw, BUNKER_NEW_PASSPHRASE=""))
    assert cp.returncode == 2
    assert repo.master_key.read_text() == before


def test_shares_export_and_recover(repo: Repo, tmp_path: Path) -> None:
    src = _one_backup(repo, tmp_path)
    doc = js(repo.ok("key", "export", "--shares", "2-of-3", "--json"))
    shares = doc["shares"]
    assert doc["threshold"] == 2 and len(shares) == 3 and doc["id"] == repo.id
    assert len(set(shares)) == 3 and all(len(s.split()) >= 20 for s in shares)

    # the local master key is gone (e.g. a lost laptop): recover it from two shares
    repo.master_key.unlink()
    cp = repo.run("restore", "latest", "--target", tmp_path / "t0")
    assert cp.returncode == 12
    rec = tmp_path / "recovered.key"
    recover_env = dict(repo.env, BUNKER_PASSPHRASE="recovered passphrase")
    shares_in = f"\n{shares[2]}\n  {shares[0]}  \n\n"  # blank lines first are skipped; one after the shares ends
    cp = repo.run("key", "recover", "--out", rec, "--json", input=shares_in, env=recover_env)
    assert cp.returncode == 0, describe(cp)
    assert js(cp)["id"] == repo.id
    assert (rec.stat().st_mode & 0o777) == 0o600
    target = tmp_path / "t"
    cp = repo.run("restore", "latest", "--target", target, "--master-key", rec, env=recover_env)
    assert cp.returncode == 0, describe(cp)
    assert restored_path(target, src / "doc.txt").read_bytes() == b"precious\n"
    # the recovered key can also make new put keys
    cp = repo.run("key", "new-client", "laptop2", "--out", tmp_path / "l2.put", "--master-key", rec, env=recover_env)
    assert cp.returncode == 0, describe(cp)

    # one share is not enough; a share with a wrong word is refused
    cp = repo.run("key", "recover", "--out", tmp_path / "bad.key", input=shares[1] + "\n", env=recover_env)
    assert cp.returncode == 11, describe(cp)
    assert "do not recover" in cp.stderr and not (tmp_path / "bad.key").exists()
    words = shares[1].split()
    words[5] = "academic" if words[5] != "academic" else "acid"
    cp = repo.run(
        "key", "recover", "--out", tmp_path / "bad2.key", input=f"{shares[0]}\n{' '.join(words)}\n", env=recover_env
    )
    assert cp.returncode == 11 and not (tmp_path / "bad2.key").exists()


def test_export_refuses_bad_arguments(repo: Repo, tmp_path: Path) -> None:
    cp = repo.run("key", "export", "--shares", "three-of-five")
    assert cp.returncode == 2 and "T-of-N" in cp.stderr
    cp = repo.run("key", "export", "--shares", "4-of-3")
    assert cp.returncode == 2
    cp = repo.run("key", "export")
    assert cp.returncode == 2
    assert repo.master_key.exists()
    # export without --remove keeps the local copy
    dest = tmp_path / "copy.key"
    repo.ok("key", "export", "--master", dest)
    assert dest.read_text() == repo.master_key.read_text()
    # and the exported copy opens with the same passphrase
    cp = repo.run(
        "key",
        "export",
        "--shares",
        "1-of-1",
        "--master-key",
        dest,
        "--json",
        env=dict(repo.env, BUNKER_PASSPHRASE=PASSPHRASE),
    )
    assert cp.returncode == 0 and len(js(cp)["shares"]) == 1


def test_key_info(repo: Repo) -> None:
    doc = js(repo.ok("key", "info", "--json"))
    assert doc["id"] == repo.id
    assert doc["put_key"] == str(repo.put_key) and doc["master_key"] == str(repo.master_key)
    assert doc["master_key_on_this_machine"] is True
    assert doc["client"]["name"] == repo.client
    assert doc["client"]["capabilities"] == ["backup"]  # init's own client is backup-only
    human = repo.ok("key", "info").stdout
    assert repo.id in human and "bunker key export" in human


def test_check_with_only_the_master_key(repo: Repo, tmp_path: Path) -> None:
    """An administrator's machine holds the master key and no put key: `check --master-key`
    checks with it instead of asking for a put key; without either key the error names both."""
    from helpers import make_env

    _one_backup(repo, tmp_path)
    admin = make_env(tmp_path / "admin")
    cp = repo.run("check", "--master-key", repo.master_key, "--json", env=admin)
    assert cp.returncode == 0, describe(cp)
    doc = js(cp)
    assert doc["ok"] and doc["authenticated"] and doc["counts"]["snapshots"] == 1, doc
    cp = repo.run("check", env=admin)
    assert cp.returncode == 12 and "no put key" in cp.stderr, describe(cp)


def _kdf(path: Path) -> dict[str, object]:
    from bunker.crypto.keyfile import _master_payload

    kdf = _master_payload(str(path))["kdf"]
    return {k: kdf[k] for k in ("t", "m", "p")}


def test_kdf_memory_is_chosen_at_init_kept_by_passwd_and_changed_on_request(tmp_path: Path) -> None:
    """`init` seals the master key with Argon2id's 64 MiB unless told otherwise (and warns when
    told less); `key passwd` keeps the file's cost unless given --kdf-memory; out of range is a
    usage error that writes nothing."""
    env = make_env(tmp_path / "e")
    cp = run_bunker("init", "--repo", tmp_path / "strong", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    assert js(cp)["kdf_memory_mib"] == 64 and "warn" not in cp.stderr
    assert _kdf(Path(js(cp)["master_key"])) == {"t": 3, "m": 65536, "p": 4}

    cp = run_bunker("init", "--repo", tmp_path / "r", "--kdf-memory", "2", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    assert "warn: the master key's passphrase is protected by Argon2id with 2 MiB instead of 64" in cp.stderr
    assert "bunker key passwd --kdf-memory 64" in cp.stderr
    repo = Repo(tmp_path / "r", env, js(cp)["id"], Path(js(cp)["master_key"]), Path(js(cp)["put_key"]), tmp_path)
    assert _kdf(repo.master_key) == {"t": 3, "m": 2048, "p": 4}
    cp = repo.ok("key", "info")
    assert f"master key   {repo.master_key} (Argon2id, 2 MiB)" in cp.stdout
    assert js(repo.ok("key", "info", "--json"))["master_key_kdf_memory_mib"] == 2
    src = _one_backup(repo, tmp_path)
    repo.ok("restore", "latest", "--target", tmp_path / "t1")  # the cheap file opens like any other
    assert restored_path(tmp_path / "t1", src / "doc.txt").read_bytes() == b"precious\n"

    repo.ok("key", "passwd", env=dict(env, BUNKER_NEW_PASSPHRASE="second"))
    assert _kdf(repo.master_key)["m"] == 2048  # kept
    back = dict(env, BUNKER_PASSPHRASE="second", BUNKER_NEW_PASSPHRASE=PASSPHRASE)
    cp = repo.ok("key", "passwd", "--kdf-memory", "64", "--json", env=back)
    assert js(cp)["kdf_memory_mib"] == 64 and _kdf(repo.master_key)["m"] == 65536
    repo.ok("restore", "latest", "--target", tmp_path / "t2")
    assert restored_path(tmp_path / "t2", src / "doc.txt").read_bytes() == b"precious\n"

    before = repo.master_key.read_bytes()
    for bad in ("0", "4097", "many"):
        cp = repo.run("key", "passwd", "--kdf-memory", bad)
        assert cp.returncode == 2 and "--kdf-memory" in cp.stderr, describe(cp)
        cp = run_bunker("init", "--repo", tmp_path / f"bad-{bad}", "--kdf-memory", bad, env=env)
        assert cp.returncode == 2 and not (tmp_path / f"bad-{bad}").exists(), describe(cp)
    assert repo.master_key.read_bytes() == before
