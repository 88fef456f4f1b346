"""Retention policies (``bunker forget``) and the times they may trust. Pure logic: no I/O.

A policy is applied to one group of snapshots (one client and path set) at a time, newest first,
like restic's forget policy: each ``keep-<period> N`` rule keeps the newest snapshot of each of the
last N periods (hour, day, ISO week, month, year, in local time) that have one; ``keep-last N``
keeps the N newest; ``keep-within D`` keeps every snapshot less than D older than the group's
newest. A snapshot kept by several rules lists every one of them. One addition: when the group's
newest snapshots are incomplete, the newest complete one is kept too ("newest complete"), so an
interrupted run never pushes the last full backup out. A group's newest snapshot is always kept,
and an item may be *held* (kept whatever the rules say: a snapshot brought back by `bunker
unforget`).

Times (docs/security.md section 13): a snapshot's signed time is written by a client, which may be compromised.
The time a policy uses is ``min(signed time, the storage's own time for the snapshot object)``,
made non-decreasing along each client's signed chain (sequence numbers). A forged far-future time
therefore lands at the time the storage received it, and cannot push other snapshots out of their
periods or out of a ``keep-within`` window.
"""

from __future__ import annotations

import calendar
import datetime
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

# how far a snapshot's signed time may lie after the time the storage stored it before `check`
# flags it: clocks of healthy machines agree to within seconds, and a backup stores its snapshot
# after it started, so anything beyond this is a wrong clock or a forgery
FUTURE_TOLERANCE = 10 * 60

# the range of times a policy works with: datetime cannot represent times after the year 9999,
# and a forged envelope may carry any float
_MAX_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


# ------------------------------------------------------------------------------------- durations
_DURATION_PART = re.compile(r"(\d+)([hdwmy])")
_DURATION = re.compile(r"^(?:\d+[hdwmy])+$")


@dataclass(frozen=True)
class Duration:
    """A calendar duration for ``keep-within``: years, months, days and hours (weeks are 7 days)."""

    text: str
    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def before(self, t: float, tz: datetime.tzinfo | None = None) -> float:
        """The time ``self`` before ``t``: years and months on the calendar (a day that does not
        exist in the target month becomes that month's last day), then days, then hours."""
        try:
            dt = datetime.datetime.fromtimestamp(t, tz)
            total = dt.year * 12 + (dt.month - 1) - (self.years * 12 + self.months)
            year, month0 = divmod(total, 12)
            day = min(dt.day, calendar.monthrange(year, month0 + 1)[1])
            dt = dt.replace(year=year, month=month0 + 1, day=day) - datetime.timedelta(days=self.days)
            return dt.timestamp() - self.hours * 3600
        except (ValueError, OverflowError, OSError):
            return -math.inf  # further back than any calendar: every snapshot is within


def parse_duration(text: str) -> Duration:
    """Parse ``2d``, ``12h``, ``1w``, ``3m`` (months), ``1y`` or a sum such as ``1y6m``; raise
    ValueError saying what is accepted."""
    s = text.strip().lower()
    if not _DURATION.match(s):
        raise ValueError(
            f"duration {text!r} is not understood: use a number and a unit, h (hours), d (days), w (weeks), "
            "m (months) or y (years), e.g. 2d, 12h, 1w, 3m, 1y or 1y6m"
        )
    parts = {"h": 0, "d": 0, "w": 0, "m": 0, "y": 0}
    for n, unit in _DURATION_PART.findall(s):
        parts[unit] += int(n)
    if not any(parts.values()):
        raise ValueError(f"duration {text!r} is zero: give a positive duration such as 2d")
    return Duration(s, parts["y"], parts["m"], parts["d"] + 7 * parts["w"], parts["h"])


# ------------------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class Policy:
    """How many snapshots to keep per rule (0: rule not used) and the ``keep-within`` window."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None

    def __post_init__(self) -> None:
        for rule in RULES:
            if getattr(self, rule) < 0:
                raise ValueError(f"keep-{rule} must not be negative")

    def empty(self) -> bool:
        """True when no rule is given (such a policy would forget everything: refuse it)."""
        return self.within is None and not any(getattr(self, r) for r in RULES)

    def describe(self) -> str:
        """The policy as command-line options, e.g. ``--keep-daily 7 --keep-within 2d``."""
        parts = [f"--keep-{r} {getattr(self, r)}" for r in RULES if getattr(self, r)]
        if self.within is not None:
            parts.append(f"--keep-within {self.within.text}")
        return " ".join(parts)


@dataclass(frozen=True)
class Item:
    """One snapshot of a group as a policy sees it."""

    key: str  # unique within the group (the snapshot's object name)
    time: float  # the trusted time (see chain_times), seconds since the epoch
    seq: int = 0  # chain sequence number: breaks ties of equal times (a later number is newer)
    complete: bool = True
    held: str = ""  # a reason to keep it whatever the rules say ("" when there is none)


@dataclass
class Decision:
    """Whether a policy keeps one snapshot, and every rule that keeps it."""

    item: Item
    reasons: list[str] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def _hour(d: datetime.datetime) -> int:
    return d.year * 1000000 + d.month * 10000 + d.day * 100 + d.hour


def _day(d: datetime.datetime) -> int:
    return d.year * 10000 + d.month * 100 + d.day


def _week(d: datetime.datetime) -> int:
    iso = d.isocalendar()  # the ISO year of a week may differ from the calendar year of its days
    return iso[0] * 100 + iso[1]


def _month(d: datetime.datetime) -> int:
    return d.year * 100 + d.month


def _year(d: datetime.datetime) -> int:
    return d.year


PERIODS: dict[str, Callable[[datetime.datetime], int]] = {
    "hourly": _hour,
    "daily": _day,
    "weekly": _week,
    "monthly": _month,
    "yearly": _year,
}


def period_of(rule: str, t: float, tz: datetime.tzinfo | None = None) -> int:
    """The period (hour, day, ISO week, month or year) that time ``t`` falls in, as a sortable int."""
    return PERIODS[rule](datetime.datetime.fromtimestamp(clamp_time(t), tz))


def newest_first(items: Iterable[Item]) -> list[Item]:
    """Items ordered newest first: by trusted time, then by chain sequence number."""
    return sorted(items, key=lambda i: (i.time, i.seq, i.key), reverse=True)


def apply_policy(items: Iterable[Item], policy: Policy, tz: datetime.tzinfo | None = None) -> list[Decision]:
    """Decide for every item of one group (returned newest first) whether ``policy`` keeps it.

    ``tz`` is the time zone periods are counted in (None: the local one)."""
    if policy.empty():
        raise ValueError("an empty policy would forget every snapshot")
    ordered = newest_first(items)
    decisions = [Decision(i) for i in ordered]
    if not ordered:
        return decisions
    for rule in RULES:
        count = getattr(policy, rule)
        kept = 0
        last_period: int | None = None
        for i, d in enumerate(decisions):
            if kept >= count:
                break
            period = i if rule == "last" else period_of(rule, d.item.time, tz)
            if period != last_period:
                kept += 1
                last_period = period
                d.reasons.append(f"{rule} #{kept}")
    if policy.within is not None:
        cutoff = policy.within.before(ordered[0].time, tz)
        for d in decisions:
            if d.item.time > cutoff:
                d.reasons.append(f"within {policy.within.text}")
    newest_complete = next((d for d in decisions if d.item.complete), None)
    if newest_complete is not None and not newest_complete.keep:
        newest_complete.reasons.append("newest complete")
    # a policy never forgets a group's newest snapshot (every rule keeps it: this says so in code,
    # for any rule added later); only `bunker forget ID` retires it
    if not decisions[0].keep:
        decisions[0].reasons.append("newest")
    for d in decisions:
        if d.item.held:
            d.reasons.append(d.item.held)
    return decisions


# ------------------------------------------------------------------------------------- trusted times
def clamp_time(t: float) -> float:
    """``t`` limited to the range a calendar can show (a non-finite time becomes 0)."""
    if not math.isfinite(t):
        return 0.0
    return min(max(t, 0.0), _MAX_TIME)


def trusted_time(signed: float, stored: float) -> float:
    """The time a policy may use for one snapshot: its signed time, but never later than the time
    the storage stored it (``stored`` <= 0 means the storage did not say)."""
    signed = clamp_time(signed)
    if stored > 0 and math.isfinite(stored):
        return min(signed, clamp_time(stored))
    return signed


def signed_time_in_future(signed: float, stored: float) -> bool:
    """True when a snapshot's signed time lies more than FUTURE_TOLERANCE after the time the
    storage stored it (a wrong clock or a forgery)."""
    return stored > 0 and (not math.isfinite(signed) or signed > stored + FUTURE_TOLERANCE)


@dataclass(frozen=True)
class Stamp:
    """What chain_times needs to know of one snapshot."""

    key: str
    chain: str  # the signing certificate: sequence numbers count per certificate
    seq: int
    signed: float
    stored: float


def chain_times(stamps: Sequence[Stamp]) -> dict[str, float]:
    """The trusted time of every snapshot: trusted_time, then made non-decreasing along each chain
    (a snapshot cannot predate one its client signed before it). Going up the chain, not down:
    a forged far-past time then takes its predecessor's time instead of dragging every earlier
    snapshot back with it."""
    chains: dict[str, list[Stamp]] = defaultdict(list)
    for s in stamps:
        chains[s.chain].append(s)
    out: dict[str, float] = {}
    for chain in chains.values():
        floor = 0.0
        for s in sorted(chain, key=lambda s: s.seq):
            floor = max(floor, trusted_time(s.signed, s.stored))
            out[s.key] = floor
    return out
