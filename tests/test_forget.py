"""bunker forget: the retention policy (pure unit tests of the period arithmetic), trusted times,
retirement records and who may write them, against real repositories and the real CLI.

Snapshots at different times are written the way a client writes them: a second client's put key
signs envelopes (copied from a real backup, with another sequence number, chain link and time),
and the test, playing the storage, sets each object's modification time to when it "arrived"."""

from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
import time
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bunker.crypto.keyfile import PutKey, load_master_key, load_put_key
from bunker.crypto.sign import SigningKey
from bunker.errors import ExitCode
from bunker.repo import refs
from bunker.repo.objects import MAGIC_RETIRED, name_for, parse_signed
from bunker.repo.records import make_retirement, parse_retirement
from bunker.repo.retention import (
    FUTURE_TOLERANCE,
    Item,
    Policy,
    Stamp,
    apply_policy,
    chain_times,
    parse_duration,
    period_of,
    signed_time_in_future,
    trusted_time,
)
from bunker.repo.snapshot import (
    BodyBinding,
    ParsedSnapshot,
    make_snapshot,
    open_body,
    parse_snapshot,
    path_set_id,
    seal_body,
)
from helpers import PASSPHRASE, Repo, js, restored_path

UTC = datetime.UTC
DAY = 86400.0


def ts(*args: int) -> float:
    return datetime.datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def kept(decisions: list[Any]) -> dict[str, list[str]]:
    return {d.item.key: d.reasons for d in decisions if d.keep}


# ------------------------------------------------------------------------------------ durations
@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("2d", (0, 0, 2, 0)),
        ("12h", (0, 0, 0, 12)),
        ("1w", (0, 0, 7, 0)),
        ("3m", (0, 3, 0, 0)),
        ("1y", (1, 0, 0, 0)),
        ("1y6m2w3d4h", (1, 6, 17, 4)),
        (" 2D ", (0, 0, 2, 0)),
    ],
)
def test_parse_duration(text: str, fields: tuple[int, int, int, int]) -> None:
    d = parse_duration(text)
    assert (d.years, d.months, d.days, d.hours) == fields


@pytest.mark.parametrize("text", ["", "2", "d", "2x", "0d", "1.5d", "-1d", "2d 3h", "1y0"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("start", "text", "expected"),
    [
        (ts(2024, 3, 31, 12), "1m", ts(2024, 2, 29, 12)),  # no 31 February: the month's last day
        (ts(2024, 2, 29), "1y", ts(2023, 2, 28)),
        (ts(2025, 1, 15), "2m", ts(2024, 11, 15)),
        (ts(2025, 1, 1, 1), "2h", ts(2024, 12, 31, 23)),
        (ts(2025, 1, 8), "1w1d", ts(2024, 12, 31)),
    ],
)
def test_duration_before_is_calendar_arithmetic(start: float, text: str, expected: float) -> None:
    assert parse_duration(text).before(start, UTC) == expected


def test_duration_beyond_the_calendar_covers_everything() -> None:
    assert parse_duration("99999y").before(ts(2025, 1, 1), UTC) == float("-inf")


# ------------------------------------------------------------------------------------ periods
def test_iso_weeks_cross_the_calendar_year() -> None:
    # Monday 30 December 2024 is in ISO week 1 of 2025; the Sunday before is in week 52 of 2024
    assert period_of("weekly", ts(2024, 12, 30, 8), UTC) == period_of("weekly", ts(2025, 1, 5, 20), UTC) == 202501
    assert period_of("weekly", ts(2024, 12, 29, 23, 59), UTC) == 202452
    assert period_of("yearly", ts(2024, 12, 31, 23, 59), UTC) == 2024
    assert period_of("monthly", ts(2024, 2, 29, 23), UTC) == 202402
    assert period_of("daily", ts(2024, 2, 29, 23), UTC) == 20240229
    assert period_of("hourly", ts(2024, 2, 29, 23, 59), UTC) == 2024022923


def test_period_follows_the_time_zone() -> None:
    t = ts(2025, 1, 1, 3)  # 3:00 UTC is still 31 December in New York
    ny = datetime.timezone(datetime.timedelta(hours=-5))
    assert period_of("daily", t, UTC) == 20250101
    assert period_of("daily", t, ny) == 20241231


def test_daily_keeps_newest_of_each_day_and_names_every_rule() -> None:
    items = [
        Item("mon-morning", ts(2025, 3, 3, 8), 1),
        Item("mon-evening", ts(2025, 3, 3, 20), 2),
        Item("tue", ts(2025, 3, 4, 9), 3),
        Item("thu-1", ts(2025, 3, 6, 9), 4),
        Item("thu-2", ts(2025, 3, 6, 10), 5),
    ]
    res = apply_policy(items, Policy(daily=2, last=1, within=parse_duration("2d")), UTC)
    assert [d.item.key for d in res] == ["thu-2", "thu-1", "tue", "mon-evening", "mon-morning"]  # newest first
    # within 2d of Thursday 10:00 reaches back to Tuesday 10:00 (the Tuesday backup is at 9:00)
    assert kept(res) == {
        "thu-2": ["last #1", "daily #1", "within 2d"],
        "thu-1": ["within 2d"],
        "tue": ["daily #2"],
    }
    res = apply_policy(items, Policy(daily=3), UTC)
    assert kept(res) == {"thu-2": ["daily #1"], "tue": ["daily #2"], "mon-evening": ["daily #3"]}


def test_each_rule_counts_only_periods_that_have_a_snapshot() -> None:
    # months with no backup (March, April) are not counted: monthly 3 reaches back to January
    items = [Item(f"m{m}", ts(2025, m, 10), m) for m in (1, 2, 5)] + [Item("dec", ts(2024, 12, 10), 0)]
    assert kept(apply_policy(items, Policy(monthly=3), UTC)) == {
        "m5": ["monthly #1"],
        "m2": ["monthly #2"],
        "m1": ["monthly #3"],
    }
    assert kept(apply_policy(items, Policy(yearly=5), UTC)) == {"m5": ["yearly #1"], "dec": ["yearly #2"]}


def test_equal_times_are_ordered_by_sequence_number() -> None:
    items = [Item("a", 1000.0, 1), Item("c", 1000.0, 3), Item("b", 1000.0, 2)]
    assert kept(apply_policy(items, Policy(last=1), UTC)) == {"c": ["last #1"]}


def test_within_is_measured_from_the_groups_newest_and_is_strict() -> None:
    newest = ts(2025, 6, 10, 12)
    items = [Item("new", newest, 3), Item("edge", newest - 2 * DAY, 2), Item("inside", newest - 2 * DAY + 1, 1)]
    assert kept(apply_policy(items, Policy(within=parse_duration("2d")), UTC)) == {
        "new": ["within 2d"],
        "inside": ["within 2d"],
    }


def test_newest_complete_snapshot_survives_newer_incomplete_ones() -> None:
    items = [
        Item("complete", ts(2025, 1, 1), 1),
        Item("broken-1", ts(2025, 1, 2), 2, complete=False),
        Item("broken-2", ts(2025, 1, 3), 3, complete=False),
    ]
    assert kept(apply_policy(items, Policy(last=1), UTC)) == {"broken-2": ["last #1"], "complete": ["newest complete"]}


def test_empty_policy_is_refused() -> None:
    assert Policy().empty() and not Policy(within=parse_duration("1h")).empty()
    with pytest.raises(ValueError):
        apply_policy([Item("a", 1.0)], Policy(), UTC)
    with pytest.raises(ValueError):
        Policy(daily=-1)


_times = st.lists(st.integers(0, 4_000_000_000), min_size=1, max_size=40, unique=True)
_rules = st.sampled_from(["hourly", "daily", "weekly", "monthly", "yearly"])


@settings(max_examples=200, deadline=None)
@given(_times, _rules, st.integers(1, 8))
def test_period_rule_matches_a_reference(times: list[int], rule: str, n: int) -> None:
    """The rule keeps exactly the newest snapshot of each of the n newest periods that have one."""
    items = [Item(str(t), float(t), i) for i, t in enumerate(sorted(times))]
    newest_per_period: dict[int, Item] = {}
    for it in items:  # ascending: the last one seen in a period is its newest
        newest_per_period[period_of(rule, it.time, UTC)] = it
    expected = [newest_per_period[p] for p in sorted(newest_per_period, reverse=True)[:n]]
    res = kept(apply_policy(items, Policy(**{rule: n}), UTC))
    assert res == {it.key: [f"{rule} #{k}"] for k, it in enumerate(expected, 1)}


@settings(max_examples=200, deadline=None)
@given(_times, st.integers(1, 10), st.integers(1, 1000))
def test_last_and_within_match_a_reference(times: list[int], n: int, hours: int) -> None:
    items = [Item(str(t), float(t), i) for i, t in enumerate(sorted(times))]
    res = kept(apply_policy(items, Policy(last=n), UTC))
    assert set(res) == {it.key for it in items[-n:]}
    res = kept(apply_policy(items, Policy(within=parse_duration(f"{hours}h")), UTC))
    assert set(res) == {it.key for it in items if it.time > items[-1].time - hours * 3600}
    # every non-empty policy keeps the newest snapshot
    assert str(max(times)) in res


# ------------------------------------------------------------------------------------ trusted times
def test_trusted_time_is_never_after_the_storage_time() -> None:
    assert trusted_time(100.0, 200.0) == 100.0
    assert trusted_time(5e9, 200.0) == 200.0
    assert trusted_time(float("nan"), 200.0) == 0.0
    assert trusted_time(1e300, 0.0) < 3e11  # unknown storage time: still a time a calendar can show
    assert signed_time_in_future(200.0 + FUTURE_TOLERANCE + 1, 200.0)
    assert not signed_time_in_future(200.0 + FUTURE_TOLERANCE, 200.0)
    assert not signed_time_in_future(5e9, 0.0)  # the storage gave no time: nothing to compare


def test_chain_times_follow_the_chain() -> None:
    stamps = [
        Stamp("a1", "A", 1, 1000.0, 1010.0),
        Stamp("a2", "A", 2, 9e9, 2000.0),  # forged far future: the storage's time
        Stamp("a3", "A", 3, 10.0, 3000.0),  # forged far past: not before its predecessor
        Stamp("b1", "B", 1, 500.0, 600.0),
    ]
    assert chain_times(stamps) == {"a1": 1000.0, "a2": 2000.0, "a3": 2000.0, "b1": 500.0}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(allow_nan=True), st.floats(1, 4e9)), min_size=1, max_size=20))
def test_chain_times_never_exceed_the_storage_times(pairs: list[tuple[float, float]]) -> None:
    """Whatever times a client signs, none is later than the storage's time for it or for an
    earlier snapshot of its chain, and the times never decrease along the chain."""
    stamps = [Stamp(str(i), "c", i + 1, signed, stored) for i, (signed, stored) in enumerate(pairs)]
    times = chain_times(stamps)
    for i in range(len(pairs)):
        assert 0.0 <= times[str(i)] <= max(s for _, s in pairs[: i + 1])
        if i:
            assert times[str(i)] >= times[str(i - 1)]


# ------------------------------------------------------------------------------------ CLI helpers
def _env(repo: Repo) -> dict[str, str]:
    return {**repo.env, "TZ": "UTC"}


def _forget(repo: Repo, *args: str | os.PathLike[str], rc: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = js(repo.ok("forget", "--json", *args, rc=rc, env=_env(repo)))
    return doc


def _actions(doc: dict[str, Any]) -> dict[str, list[str] | None]:
    """snapshot id -> reasons it is kept, or None when it is forgotten."""
    return {s["id"]: (s["reasons"] if s["keep"] else None) for g in doc["groups"] for s in g["snapshots"]}


def _listed(repo: Repo, *args: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in js(repo.ok("snapshots", "--json", *args))["snapshots"]}


def _files(repo: Repo) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(repo.path)): (p.stat().st_size, p.stat().st_mtime) for p in repo.all_files()}


@dataclasses.dataclass
class Crafted:
    put: PutKey
    key_path: Path
    template: ParsedSnapshot
    genuine: str  # testclient's real backup the template comes from
    names: list[str] = dataclasses.field(default_factory=list)  # hex names, seq 1, 2, ...
    body: dict[str, Any] = dataclasses.field(default_factory=dict)  # the template's, opened once

    def add(self, repo: Repo, signed: float, stored: float, paths: list[str] | None = None, **changes: Any) -> str:
        """Sign the client's next snapshot with time ``signed``; the storage stored it at ``stored``.
        Its body is the template's, sealed anew for this client's own run (format 2 binds a body
        to its run); ``paths``: the body names these paths instead (and the envelope their
        path-set id). ``changes``: other envelope fields (``path_set=""``: one written before
        path-set ids)."""
        cert = name_for("clients", self.put.certificate)
        if not self.body:
            master = load_master_key(str(repo.master_key), PASSPHRASE)
            self.body = open_body(self.template, master.data_private)
        body = self.body
        if paths is not None:
            body = {**body, "paths": paths}
            changes = {"path_set": path_set_id(self.put.secrets, paths), **changes}
        session = secrets.token_hex(12)
        binding = BodyBinding(repo.id, cert, self.put.secrets.domain_id, session, 0)
        sealed, body_ct = seal_body(body, self.put.data_public, binding)
        env = dataclasses.replace(
            self.template.env,
            client="crafted",
            cert=cert,
            seq=len(self.names) + 1,
            prev=f"snapshots/{self.names[-1]}" if self.names else "",
            time=signed,
            session=session,
            sealed_key=sealed,
            body_hash=blake3.blake3(body_ct).digest(),
            **changes,
        )
        data = make_snapshot(env, body_ct, self.put.client_key)
        path = repo.path / name_for("snapshots", data)
        path.write_bytes(data)
        os.utime(path, (stored, stored))
        self.names.append(path.name)
        return path.name


def _crafted_client(repo: Repo, tmp_path: Path, *, prune: bool = False) -> Crafted:
    """A second client "crafted" whose snapshots copy the body of a real backup of src/."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "f.txt").write_bytes(b"kept by every snapshot\n")
    genuine = repo.backup(src)["snapshot"]
    key = tmp_path / "crafted.put"
    repo.ok("key", "new-client", "crafted", "--out", key, *(["--prune"] if prune else []))
    template = parse_snapshot((repo.path / "snapshots" / genuine).read_bytes())
    return Crafted(load_put_key(str(key)), key, template, genuine)


def _noon_yesterday() -> float:
    return (time.time() // DAY) * DAY - DAY / 2


# ------------------------------------------------------------------------------------ CLI tests
def test_forget_without_a_rule_is_a_usage_error(repo: Repo) -> None:
    cp = repo.run("forget")
    assert cp.returncode == ExitCode.USAGE, cp.stderr
    for option in ("--keep-last", "--keep-hourly", "--keep-daily", "--keep-weekly", "--keep-monthly"):
        assert option in cp.stderr
    assert "--keep-yearly" in cp.stderr and "--keep-within" in cp.stderr
    cp = repo.run("forget", "--keep-within", "2 days")
    assert cp.returncode == ExitCode.USAGE and "2d" in cp.stderr


def test_dry_run_changes_nothing_and_shows_every_decision(repo: Repo, tmp_path: Path) -> None:
    c = _crafted_client(repo, tmp_path)
    t0 = _noon_yesterday()
    for k in (4, 3, 2, 1, 0):
        c.add(repo, t0 - k * DAY, t0 - k * DAY + 5)
    before = _files(repo)
    doc = _forget(repo, "--client", "crafted", "--keep-daily", "2", "--keep-within", "1d", "--dry-run")
    assert _files(repo) == before
    assert doc["dry_run"] and doc["grouping"] == "client+path-set" and doc["forgotten"] == 3
    assert not doc["retirement_records"]
    assert _actions(doc) == {
        c.names[4]: ["daily #1", "within 1d"],
        c.names[3]: ["daily #2"],
        c.names[2]: None,
        c.names[1]: None,
        c.names[0]: None,
    }
    human = repo.ok("forget", "--client", "crafted", "--keep-daily", "2", "--dry-run", env=_env(repo)).stdout
    assert "grouped by client and path set (path-set ids" in human and "daily #2" in human
    assert sum(line.endswith(" forget") for line in human.splitlines()) == 3 and "nothing was written" in human
    assert "would be refused" in human and "--prune" in human  # this machine's put key may not forget
    assert _files(repo) == before
    assert set(_listed(repo)) >= set(c.names)


def test_forget_with_the_master_key_retires_but_deletes_nothing(repo: Repo, tmp_path: Path) -> None:
    c = _crafted_client(repo, tmp_path)
    t0 = _noon_yesterday()
    for k in (3, 2, 1, 0):
        c.add(repo, t0 - k * DAY, t0 - k * DAY + 5)
    objects_before = {str(p.relative_to(repo.path)) for p in repo.all_files()}
    doc = _forget(repo, "--client", "crafted", "--keep-last", "2", "--master-key", repo.master_key)
    assert doc["signer"] == "the master key" and doc["grouping"] == "client+paths"
    assert doc["forgotten"] == 2 and len(doc["retirement_records"]) == 2
    gone = {c.names[0], c.names[1]}
    # one master-signed record per forgotten snapshot; nothing removed
    retired = {}
    for name in doc["retirement_records"]:
        data = (repo.path / name).read_bytes()
        snap, signer = parse_retirement(data)
        assert signer == "" and "--keep-last 2" in parse_signed(data, MAGIC_RETIRED).body["reason"]
        retired[snap.split("/", 1)[1]] = name
    assert set(retired) == gone
    after = {str(p.relative_to(repo.path)) for p in repo.all_files()}
    assert objects_before <= after and after - objects_before == set(doc["retirement_records"])

    listed = _listed(repo)
    assert not gone & set(listed) and {c.names[2], c.names[3]} <= set(listed)
    cp = repo.ok("snapshots")
    assert "2 retired snapshot(s) not shown" in cp.stderr
    everything = _listed(repo, "--all")
    assert all(everything[n]["retired"] for n in gone) and not everything[c.names[3]]["retired"]
    assert "retired" in repo.ok("snapshots", "--all").stdout

    # a second run finds nothing more to forget (retired snapshots no longer count)
    assert _forget(repo, "--client", "crafted", "--keep-last", "2", "--master-key", repo.master_key)["forgotten"] == 0
    # the keyless check accepts the retired snapshots (their packs are still there anyway)
    cp = repo.run("check", "--keyless", "--expect", repo.id, "--json")
    assert cp.returncode == 0 and js(cp)["ok"], cp.stdout

    # a retired snapshot can still be restored by id while its data is stored
    target = tmp_path / "t"
    cp = repo.ok("restore", c.names[0][:16], "--target", target)
    assert "forgotten" in cp.stderr and "bunker prune" in cp.stderr
    assert restored_path(target, tmp_path / "src" / "f.txt").read_bytes() == b"kept by every snapshot\n"


def test_put_key_without_prune_is_refused(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"1")
    repo.backup(src)
    repo.backup(src)
    cp = repo.run("forget", "--keep-last", "1", env=_env(repo))
    assert cp.returncode == ExitCode.KEY_MISSING, cp.stderr
    assert "prune capability" in cp.stderr
    assert "bunker key new-client NAME --prune" in cp.stderr and "--master-key" in cp.stderr
    assert repo.objects("retired") == []
    assert len(_listed(repo)) == 2


def test_prune_capable_put_key_forgets(repo: Repo, tmp_path: Path) -> None:
    c = _crafted_client(repo, tmp_path, prune=True)
    t0 = _noon_yesterday()
    for k in (2, 1, 0):
        c.add(repo, t0 - k * DAY, t0 - k * DAY + 5)
    # the pruner forgets every client's snapshots here, the genuine testclient's included
    doc = _forget(repo, "--keep-last", "1", "--put-key", c.key_path)
    assert doc["signer"] == "client 'crafted' (prune)" and doc["forgotten"] == 2
    cert = name_for("clients", c.put.certificate)
    for name in doc["retirement_records"]:
        assert parse_retirement((repo.path / name).read_bytes())[1] == cert
    assert set(_listed(repo)) == {c.names[2], c.genuine}
    cp = repo.run("check", "--json")
    assert cp.returncode == 0 and js(cp)["ok"], cp.stdout


def test_record_by_a_client_without_prune_is_not_honoured(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"1")
    first = repo.backup(src)["snapshot"]
    repo.backup(src)
    put = load_put_key(str(repo.put_key))  # testclient: backup only
    record = make_retirement(f"snapshots/{first}", "forged", put.client_key, name_for("clients", put.certificate))
    (repo.path / name_for("retired", record)).write_bytes(record)
    # a record that claims the master key as signer, signed by another key
    forged = make_retirement(f"snapshots/{first}", "forged", SigningKey(b"\x42" * 32), "")
    (repo.path / name_for("retired", forged)).write_bytes(forged)
    assert first in _listed(repo)  # not hidden
    doc = js(repo.run("check", "--json"))
    bad = [p for p in doc["problems"] if p["object"] == name_for("retired", record)]
    assert bad and "prune" in bad[0]["problem"] and bad[0]["severity"] == "err"
    bad = [p for p in doc["problems"] if p["object"] == name_for("retired", forged)]
    assert bad and "signature" in bad[0]["problem"] and bad[0]["severity"] == "err"


def test_keyless_check_accepts_missing_packs_of_retired_snapshots(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    old = repo.backup(src)["snapshot"]
    (src / "f").write_bytes(os.urandom(300_000))
    new = repo.backup(src)["snapshot"]
    doc = _forget(repo, "--keep-last", "1", "--master-key", repo.master_key)
    assert _actions(doc) == {new: ["last #1"], old: None}

    def packs(snap: str) -> set[str]:
        env = parse_snapshot((repo.path / "snapshots" / snap).read_bytes()).env
        return set(refs.read_set(env.packset, lambda n: (repo.path / n).read_bytes()))

    only_old = packs(old) - packs(new)
    assert only_old
    for p in only_old:  # what prune will do later
        (repo.path / "packs" / p).unlink()
    cp = repo.run("check", "--keyless", "--expect", repo.id, "--json")
    assert cp.returncode == 0 and js(cp)["ok"], cp.stdout
    assert (repo.path / "snapshots" / old).exists()  # the tombstone: envelope and sealed log
    assert old in _listed(repo, "--all")
    # without its retirement record the same state is damage
    for p in repo.objects("retired"):
        p.unlink()
    cp = repo.run("check", "--keyless", "--expect", repo.id, "--json")
    assert cp.returncode == ExitCode.INTEGRITY
    assert any(p["object"] == f"snapshots/{old}" and "missing" in p["problem"] for p in js(cp)["problems"])


def test_forged_future_times_cannot_push_others_out(repo: Repo, tmp_path: Path) -> None:
    """A client signs three snapshots dated a year ahead, on three different days. The storage
    received them today: forget uses that time, so they share one day and one keep-within window
    with the genuine snapshots, and check names them."""
    c = _crafted_client(repo, tmp_path)
    t0 = _noon_yesterday()
    for k in (3, 2, 1):
        c.add(repo, t0 - k * DAY, t0 - k * DAY + 5)  # seq 1..3: genuine, one a day
    for k in (1, 2, 3):
        c.add(repo, t0 + 365 * DAY + k * DAY, t0)  # seq 4..6: forged far-future times
    n = c.names
    doc = _forget(repo, "--client", "crafted", "--keep-daily", "3", "--dry-run")
    # untrusted times would make 4..6 the three newest days and drop every genuine snapshot
    assert _actions(doc) == {
        n[5]: ["daily #1"],
        n[4]: None,
        n[3]: None,
        n[2]: ["daily #2"],
        n[1]: ["daily #3"],
        n[0]: None,
    }
    row = next(s for s in doc["groups"][0]["snapshots"] if s["id"] == n[5])
    assert row["time"] == t0 and row["signed_time"] > t0 + 365 * DAY
    human = repo.ok("forget", "--client", "crafted", "--keep-daily", "3", "--dry-run", env=_env(repo)).stdout
    assert "later than the storage stored it" in human
    # keep-within counts back from the newest trusted time (t0), not from a year ahead
    doc = _forget(repo, "--client", "crafted", "--keep-within", "2d", "--dry-run")
    assert {k for k, v in _actions(doc).items() if v} == {n[5], n[4], n[3], n[2]}

    cp = repo.run("check", "--json")
    assert cp.returncode == 0, cp.stdout  # a warning, not damage
    flagged = {p["object"]: p for p in js(cp)["problems"] if "signed time" in p["problem"]}
    assert set(flagged) == {f"snapshots/{x}" for x in n[3:]}
    p = flagged[f"snapshots/{n[3]}"]
    assert p["severity"] == "warn" and "crafted" in p["problem"]
    stored = datetime.datetime.fromtimestamp(t0, UTC).strftime("%Y-%m-%d %H:%M:%S")
    signed = datetime.datetime.fromtimestamp(t0 + 366 * DAY, UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert stored in p["problem"] and signed in p["problem"]
    keyless = js(repo.run("check", "--keyless", "--expect", repo.id, "--json"))
    assert {p["object"] for p in keyless["problems"] if "signed time" in p["problem"]} == set(flagged)


def test_put_key_groups_by_path_set_as_the_master_key_does(repo: Repo, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "f").write_bytes(d.name.encode())
    snaps = {"a": [repo.backup(a)["snapshot"] for _ in range(2)], "b": [repo.backup(b)["snapshot"] for _ in range(2)]}
    doc = _forget(repo, "--keep-last", "1", "--dry-run", "--master-key", repo.master_key)
    assert doc["grouping"] == "client+paths"
    assert sorted(g["paths"] for g in doc["groups"]) == [[str(a)], [str(b)]]
    for name, path in (("a", a), ("b", b)):
        acts = _actions({"groups": [g for g in doc["groups"] if g["paths"] == [str(path)]]})
        assert acts == {snaps[name][1]: ["last #1"], snaps[name][0]: None}
    # with only the put key the groups are the same, named by their path-set ids (the paths are sealed)
    put = _forget(repo, "--keep-last", "1", "--dry-run")
    assert put["grouping"] == "client+path-set" and all(g["paths"] is None for g in put["groups"])
    assert sorted(g["path_set"] for g in put["groups"]) == sorted(g["path_set"] for g in doc["groups"])
    assert _actions(put) == _actions(doc)
