"""A snapshot body is bound to the run that sealed it, and hosts cannot be claimed by anyone
(issue 10, point 2; docs/security.md "Binding").

The attack: another client's backup-only key (of another dedup domain) wraps an old body of
client ``vm`` in an envelope of its own chain, newer than vm's newest snapshot; before format 2,
`restore latest --host vm` restored it and both check modes stayed clean."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from bunker.crypto.keyfile import load_put_key
from helpers import Repo, describe, init_repo, js, make_env, resign_snapshot, restored_path, run_bunker


def _vm(tmp_path: Path) -> tuple[Repo, Path, dict, dict]:
    """Client ``vm`` (certificate bound to host vm) with two snapshots of one file."""
    repo = init_repo(tmp_path / "r", client="vm", host="vm")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_bytes(b"old and stale\n")
    s1 = repo.backup(src)
    (src / "f.txt").write_bytes(b"current\n")
    s2 = repo.backup(src)
    return repo, src, s1, s2


def _resign(repo: Repo, tmp_path: Path, victim: str, *, domain: str, key_args: tuple[str, ...] = ()) -> str:
    """Mallory (a backup-only key) wraps the body of snapshot ``victim`` in her own envelope,
    dated after everything else; ``domain``: "victim" to copy vm's dedup domain into it, "own"
    for hers. Returns the forged snapshot's id."""
    key = tmp_path / "mallory.put"
    if not key.exists():
        repo.ok("key", "new-client", "mallory", "--out", key, *key_args)
    put = load_put_key(str(key))
    own = {} if domain == "victim" else {"domain": put.secrets.domain_id}
    return resign_snapshot(repo.path, victim, put, seq=1, prev="", time=time.time() + 5, **own)


@pytest.mark.parametrize(
    ("domain", "key_args"),
    [("victim", ("--domain", "other")), ("own", ("--domain", "other")), ("victim", ())],
    ids=["other-domain-key-claims-vm-domain", "other-domain-key", "same-domain-key"],
)
def test_body_moved_into_another_chain_is_refused(tmp_path: Path, domain: str, key_args: tuple[str, ...]) -> None:
    repo, src, s1, s2 = _vm(tmp_path)
    forged = _resign(repo, tmp_path, s1["snapshot"], domain=domain, key_args=key_args)

    # latest --host vm is vm's own newest snapshot, not the old body under the newer envelope
    target = tmp_path / "t"
    cp = repo.ok("restore", "latest", "--host", "vm", "--target", target)
    assert restored_path(target, src / "f.txt").read_bytes() == b"current\n", describe(cp)

    # the listing (master key) does not trust it
    rows = {r["id"]: r for r in js(repo.ok("snapshots", "--master-key", repo.master_key, "--json"))["snapshots"]}
    assert rows[forged]["trusted"] is False and rows[forged]["client"] == "mallory"
    assert rows[s2["snapshot"]]["host"] == "vm"
    # it cannot be restored by id either
    cp = repo.run("restore", forged[:12], "--target", tmp_path / "t2")
    assert cp.returncode in (2, 14), describe(cp)
    assert not restored_path(tmp_path / "t2", src / "f.txt").exists()

    # check with the master key names it; keylessly, a wrapped envelope is caught by its domain
    doc = js(repo.run("check", "--read-data", "--json"))
    assert f"snapshots/{forged}" in {p["object"] for p in doc["problems"] if p["severity"] == "err"}, doc
    cp = repo.run("check", "--keyless", "--expect", repo.id, "--json")
    assert cp.returncode == 14, describe(cp)
    assert f"snapshots/{forged}" in {p["object"] for p in js(cp)["problems"]}


def test_hosts_are_bound_not_claimed(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r", client="admin", host="admin-host")
    keys = {}
    for name in ("u1", "u2"):
        keys[name] = tmp_path / f"{name}.put"
        repo.ok("key", "new-client", name, "--out", keys[name])
    srcs = {}
    for name in ("u1", "u2"):
        srcs[name] = tmp_path / f"src-{name}"
        srcs[name].mkdir()
        (srcs[name] / "who.txt").write_bytes(name.encode())
        repo.backup(srcs[name], args=("--host", "shared", "--put-key", str(keys[name])))

    # two clients without a bound host claim it: refused, both named, nothing guessed
    cp = repo.run("restore", "latest", "--host", "shared", "--target", tmp_path / "t0")
    assert cp.returncode == 2, describe(cp)
    assert "'u1'" in cp.stderr and "'u2'" in cp.stderr and "--client" in cp.stderr
    cp = repo.run("snapshots", "--host", "shared")
    assert cp.returncode == 2 and "claimed by several clients" in cp.stderr
    # narrowed to one claimant it works
    t = tmp_path / "t1"
    repo.ok("restore", "latest", "--host", "shared", "--client", "u2", "--target", t)
    assert restored_path(t, srcs["u2"] / "who.txt").read_bytes() == b"u2"

    # the master key binds the host to a new client: from now on only that client answers it
    keys["bound"] = tmp_path / "bound.put"
    repo.ok("key", "new-client", "bound", "--out", keys["bound"], "--host", "shared")
    cp = repo.run("restore", "latest", "--host", "shared", "--target", tmp_path / "t0")
    assert cp.returncode == 2 and "bound to client 'bound'" in cp.stderr and "'u1'" in cp.stderr, describe(cp)
    # a backup with a bound key cannot claim another host
    sb = tmp_path / "src-bound"
    sb.mkdir()
    (sb / "who.txt").write_bytes(b"bound")
    cp = repo.run("backup", sb, "--host", "elsewhere", "--put-key", keys["bound"])
    assert cp.returncode == 2 and "bound to host 'shared'" in cp.stderr, describe(cp)
    doc = repo.backup(sb, args=("--put-key", str(keys["bound"])))
    rows = {r["id"]: r for r in js(repo.ok("snapshots", "--master-key", repo.master_key, "--json"))["snapshots"]}
    assert rows[doc["snapshot"]]["host"] == "shared" and rows[doc["snapshot"]]["client"] == "bound"

    # once a certificate binds the host, the unbound claims no longer count
    t = tmp_path / "t2"
    repo.ok("restore", "latest", "--host", "shared", "--target", t)
    assert restored_path(t, sb / "who.txt").read_bytes() == b"bound"
    rows = js(repo.ok("snapshots", "--host", "shared", "--json"))["snapshots"]
    assert {r["client"] for r in rows} == {"bound"}


def test_default_client_name_is_a_pseudonym(tmp_path: Path) -> None:
    """The client name is public (certificates, envelopes): by default it is not the host name."""
    env = make_env(tmp_path / "home")
    doc = js(run_bunker("init", "--repo", tmp_path / "r", "--json", env=env))
    assert doc["client"].startswith("client-") and socket.gethostname() not in doc["client"]
    src = tmp_path / "src"
    src.mkdir()
    run_bunker("backup", src, "--repo", tmp_path / "r", env=env)
    keyless = {k: v for k, v in env.items() if k != "BUNKER_PASSPHRASE"}
    listing = run_bunker("snapshots", "--repo", tmp_path / "r", env=keyless)
    assert doc["client"] in listing.stdout and socket.gethostname() not in listing.stdout, listing.stdout
