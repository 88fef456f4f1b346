"""A property-based adversary against authenticity (issue 10, "Proof"; docs/security.md).

The adversary holds a backup-only put key of another dedup domain (``mallory``) and full write
access to the storage. It applies random sequences of: copying or replaying any object under any
name, deleting objects, rolling the config back, re-signing other clients' snapshot bodies into
its own chain (with or without an adoption claim, a copied session, the victim's domain), forking
its chain, and putting back old leases of a killed run. After each sequence, for every client:

- every snapshot the reader trusts is one its client really wrote (its name is one of the genuine
  objects), or its body does not open for the reader (so it is never restored as someone's data);
  nothing the adversary made is listed under a genuine client;
- `latest` of each client is one of that client's genuine snapshots;
- no replayed checkpoint could become a snapshot (its session is used, or its run is older than
  the head the client remembers);
- `check` (keyless, with the client's remembered head as witness) reports a problem whenever a
  trusted snapshot lost something it needs, or the client's newest snapshot went missing; and a
  config rollback is refused when the repository is opened.

CI runs ``BUNKER_ADVERSARY_EXAMPLES`` sequences (default 60); docs/security.md records a longer run.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bunker.backup.checkpoint import stale_checkpoint, used_sessions
from bunker.crypto.keyfile import MasterKey, PutKey, load_master_key, load_put_key
from bunker.errors import BunkerError, ExitCode
from bunker.repo.check import Checker
from bunker.repo.leases import sessions
from bunker.repo.objects import name_for
from bunker.repo.records import ChainBase
from bunker.repo.repository import Repository
from bunker.repo.selection import Filters, owner, select
from bunker.repo.snapshot import Adoption, make_snapshot, open_body, parse_snapshot
from bunker.repo.witnesses import Witness
from bunker.storage.local import LocalBackend
from helpers import PASSPHRASE, Repo, init_repo, js
from test_checkpoint import _kill_after_checkpoint, _tree

EXAMPLES = int(os.environ.get("BUNKER_ADVERSARY_EXAMPLES", "60"))
PREFIXES = ("snapshots", "sessions", "config", "clients", "refs", "packs", "index", "retired", "gc")


@dataclass(repr=False)
class World:
    """The genuine repository the adversary starts from, made once by the real CLI."""

    repo: Repo
    master: MasterKey
    mallory: PutKey
    genuine: dict[str, tuple[str, int]]  # snapshot name -> (client, seq)
    heads: dict[str, tuple[str, int, str]]  # client -> (cert, seq, name): what the client remembers
    secrets: dict[str, PutKey]
    replays: list[Path]  # lease objects of a killed run whose checkpoint was adopted since
    floor_home: Path
    revoked: str  # certificate of client "old", revoked in the newest config


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("adversary")
    repo = init_repo(base / "r", client="alice", host="alice-host")
    keys = {"alice": repo.put_key}
    for name, extra in (("bob", ("--host", "bob-host")), ("mallory", ("--domain", "evil")), ("old", ())):
        keys[name] = base / f"{name}.put"
        repo.ok("key", "new-client", name, "--out", keys[name], *extra)
    repo.ok("key", "revoke", "old")  # a second config version: a rollback would undo this revocation
    src = base / "src"
    # a killed run of alice's, adopted by her next run: its leases are what a replay puts back
    _tree(src / "big")
    _kill_after_checkpoint(repo, src)
    saved = base / "saved-leases"
    saved.mkdir()
    for p in repo.objects("sessions"):
        shutil.copy2(p, saved / p.name)
    for i in range(2):
        (src / "note.txt").write_bytes(f"alice {i}\n".encode())
        repo.backup(src)
    bob_src = base / "bob-src"
    bob_src.mkdir()
    for i in range(2):
        (bob_src / "b.txt").write_bytes(f"bob {i}\n".encode())
        repo.backup(bob_src, args=("--put-key", str(keys["bob"])))
    rows = js(repo.ok("snapshots", "--json"))["snapshots"]
    assert all(r["trusted"] for r in rows)
    genuine = {f"snapshots/{r['id']}": (r["client"], r["seq"]) for r in rows}
    puts = {name: load_put_key(str(k)) for name, k in keys.items()}
    heads: dict[str, tuple[str, int, str]] = {}
    for name, (client, seq) in genuine.items():
        if client not in heads or seq > heads[client][1]:
            heads[client] = (name_for("clients", puts[client].certificate), seq, name)
    yield World(
        repo,
        load_master_key(str(repo.master_key), PASSPHRASE),
        puts["mallory"],
        genuine,
        heads,
        puts,
        sorted(saved.iterdir()),
        base / "floor-home",
        name_for("clients", puts["old"].certificate),
    )
    shutil.rmtree(base, ignore_errors=True)  # half a gigabyte of copied repositories: gone once the module passed


# ------------------------------------------------------------------------------------- operations

OPS = st.lists(
    st.tuples(
        st.sampled_from(["copy", "delete", "rollback", "resign", "fork", "replay", "truncate"]),
        st.integers(0, 2**32 - 1),
    ),
    min_size=1,
    max_size=6,
)


def _objects(root: Path, prefix: str | None = None) -> list[str]:
    out = []
    for p in PREFIXES if prefix is None else (prefix,):
        d = root / p
        if d.is_dir():
            out += sorted(f"{p}/{f.name}" for f in d.iterdir() if not f.name.startswith("."))
    return out


class Adversary:
    def __init__(self, world: World, root: Path) -> None:
        self.w, self.root = world, root
        self.chain: list[str] = []  # mallory's snapshots so far (her own chain)
        self.touched: set[str] = set()  # genuine objects deleted or altered
        self.config_changed = False

    def apply(self, op: str, seed: int) -> None:
        rng = random.Random(seed)
        getattr(self, op)(rng)

    def _genuine_snapshot(self, rng: random.Random) -> tuple[str, bytes] | None:
        names = [n for n in self.w.genuine if (self.root / n).exists()]
        if not names:
            return None
        n = rng.choice(sorted(names))
        return n, (self.root / n).read_bytes()

    def copy(self, rng: random.Random) -> None:
        objs = _objects(self.root)
        src = rng.choice(objs)
        prefix = rng.choice(PREFIXES)
        leaf = rng.choice([f"{rng.getrandbits(256):064x}", src.split("/", 1)[1], f"{rng.getrandbits(96):024x}.3"])
        dst = self.root / prefix / leaf
        if dst.exists():
            return
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(self.root / src, dst)
        if prefix == "config":
            self.config_changed = True

    def delete(self, rng: random.Random) -> None:
        objs = [o for o in _objects(self.root) if not o.startswith("config/")]
        victim = rng.choice(objs)
        (self.root / victim).unlink()
        self.touched.add(victim)

    def truncate(self, rng: random.Random) -> None:
        objs = [o for o in _objects(self.root) if not o.startswith(("config/", "sessions/"))]
        victim = rng.choice(objs)
        data = (self.root / victim).read_bytes()
        (self.root / victim).unlink()  # the case's files are hard links to the world's: never write through
        (self.root / victim).write_bytes(data[: rng.randrange(max(len(data), 1))])
        self.touched.add(victim)

    def rollback(self, rng: random.Random) -> None:
        configs = _objects(self.root, "config")
        if len(configs) > 1:
            newest = max(configs, key=lambda n: parse_snapshot_safe_version(self.root / n))
            (self.root / newest).unlink()
            self.config_changed = True

    def resign(self, rng: random.Random, fork: bool = False) -> None:
        got = self._genuine_snapshot(rng)
        if got is None:
            return
        _, data = got
        try:
            tmpl = parse_snapshot(data)
        except ValueError:  # truncated by an earlier step: nothing to re-sign
            return
        m = self.w.mallory
        cert = name_for("clients", m.certificate)
        if fork and self.chain:
            seq, prev = 1, ""  # a second #1: a fork of her own chain
        else:
            seq, prev = len(self.chain) + 1, self.chain[-1] if self.chain else ""
        env = dataclasses.replace(
            tmpl.env,
            client="mallory",
            cert=cert,
            seq=seq,
            prev=prev,
            time=time.time() + rng.choice([0, 5, 86400 * 365]),
            domain=rng.choice([tmpl.env.domain, m.secrets.domain_id]),
            session=rng.choice([tmpl.env.session, f"{rng.getrandbits(96):024x}"]),
        )
        if rng.random() < 0.4:  # claim to have adopted the victim's run
            a_cert = tmpl.env.original_cert
            env = dataclasses.replace(
                env, adopted=Adoption(a_cert, tmpl.env.client, env.session), complete=False, counter=max(env.counter, 1)
            )
        out = make_snapshot(env, tmpl.body_ct, m.client_key)
        name = name_for("snapshots", out)
        (self.root / name).write_bytes(out)
        if not fork:
            self.chain.append(name)

    def fork(self, rng: random.Random) -> None:
        self.resign(rng, fork=True)

    def replay(self, rng: random.Random) -> None:
        lease = rng.choice(self.w.replays)
        name = rng.choice([lease.name, f"{rng.getrandbits(96):024x}.{rng.randrange(1, 9)}"])
        dst = self.root / "sessions" / name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy2(lease, dst)
        t = time.time() - rng.choice([60, 3 * 3600, 5 * 86400])
        os.utime(dst, (t, t))


def parse_snapshot_safe_version(path: Path) -> int:
    from bunker.repo.config import parse_config

    try:
        return parse_config(path.read_bytes()).version
    except Exception:  # noqa: BLE001 - junk copied under config/ sorts first
        return -1


# ----------------------------------------------------------------------------------------- oracle


@contextmanager
def _isolated_state(home: Path) -> Iterator[None]:
    """This process's view of a machine that has seen the genuine repository (its floor)."""
    saved = {k: os.environ.get(k) for k in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    for k, sub in (("XDG_DATA_HOME", "data"), ("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache")):
        os.environ[k] = str(home / sub)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _oracle(w: World, root: Path, adv: Adversary) -> None:
    backend = LocalBackend(str(root))
    try:
        repo = Repository.open(backend, w.repo.id)
    except BunkerError as exc:
        assert adv.config_changed and exc.exit_code in (ExitCode.INTEGRITY, ExitCode.BAD_REPOSITORY), exc.message
        return
    assert w.revoked in repo.revoked, "a revocation was undone"
    records = repo.snapshots()
    for rec in records:
        if not rec.trusted or rec.name in w.genuine:
            continue
        who = owner(repo, rec)
        assert who not in ("alice", "bob"), f"{rec.name} listed under genuine client {who}"
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do: it must not open as data
            open_body(rec.snap, w.master.data_private)
    for rec in records:
        if rec.trusted and rec.name in w.genuine:
            assert (rec.snap.env.client, rec.snap.env.seq) == w.genuine[rec.name] or rec.snap.env.adopted

    used = used_sessions(repo)
    for s in sessions(repo):
        if s.checkpoint is None or s.cert != w.heads["alice"][0]:
            continue
        remembered = ChainBase(w.heads["alice"][1], w.heads["alice"][2])
        assert s.session in used or stale_checkpoint(s.base, remembered), f"replayed {s.names} is adoptable"

    for client in ("alice", "bob"):
        cert, seq, head = w.heads[client]
        try:
            latest = select(repo, "latest", Filters(client=client), w.master)
        except BunkerError:
            latest = None
        if latest is not None:
            assert latest.name in w.genuine and w.genuine[latest.name][0] == client, latest.name
        damaged = not (root / head).exists() or any(t in adv.touched for t in _needed(w, root, head))
        report = Checker(backend, w.repo.id, heads=[Witness(cert, seq, head)]).run(keyless=True)
        if damaged or latest is None or latest.name != head:
            assert not report.ok, f"check found nothing wrong for {client} after {sorted(adv.touched)}"


def _needed(w: World, root: Path, head: str) -> set[str]:
    """Objects the genuine snapshot ``head`` stands on (as far as the keyless reader sees)."""
    out = {head}
    try:
        env = parse_snapshot((root / head).read_bytes()).env
    except (OSError, ValueError):
        return out
    out |= {env.packset, env.chunkset, env.cert}
    return out


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=os.environ.get("BUNKER_ADVERSARY_RANDOM") is None,
)
@given(ops=OPS)
def test_adversary_cannot_make_a_client_trust_what_it_did_not_write(world: World, ops: list[Any]) -> None:
    case = world.floor_home.parent / f"case-{random.getrandbits(64):016x}"
    shutil.copytree(world.repo.path, case / "repo", copy_function=os.link)
    try:
        with _isolated_state(case / "home"):
            Repository.open(LocalBackend(str(case / "repo")), world.repo.id)  # the machine sees the genuine config
            adv = Adversary(world, case / "repo")
            for op, seed in ops:
                adv.apply(op, seed)
            _oracle(world, case / "repo", adv)
    finally:
        shutil.rmtree(case, ignore_errors=True)
