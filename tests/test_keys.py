"""Key management: passphrase change, SLIP-39 shares and recovery, key info, new clients."""

from __future__ import annotations

from pathlib import Path

from helpers import PASSPHRASE, Repo, describe, js, restored_path


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
