"""Faults in the node hierarchy (issue 12, "Proof"): kill -9 of every process of the three-level
setup of tests/test_node_links.py (clients -> office -> a folder link carried by moving files ->
hq -> direct -> the repository of record) at random moments, with eviction on.

A seeded random schedule (BUNKER_NODE_FAULTS_SEED) of steps: a client's backup into office
(forked: the node's server is the client's child), a client's `bunker forward` of its spool,
`node forward office`, carrying the disk up or down (all its files, or only some: an interrupted
move), `node import hq`, `node forward hq`, `node import office`, now and then a backup beside
`node forward office` (as the daemon runs them) and the courier's whole trip in order. A step
that runs a process may be killed with SIGKILL after a random part of its usual duration (mostly
past the interpreter's start): the whole process group, and for a backup the forked server too, or
only the client (its server must go by itself), or only the server (the client must finish or
fail cleanly). After each step no process of it is left.

Then a settle phase runs every step without kills until nothing moves, and the test asserts:
nothing lost (every snapshot a client completed is at the top and restores byte-identical), the
top checks clean with --read-data and office checks clean (evicted packs counted as upstream), no
client chain is forked, every record receipt office accepted names only objects the top holds (and
every hop receipt only objects hq holds), office's store is within its bound (or it says why not),
and no run that was not killed reported an error.

tests/test_node_kill_points.py kills at named points of the node code that random timing rarely
hits."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bunker.repo.snapshot import parse_snapshot
from bunker.storage.mailbox import is_piece_name
from helpers import BUNKER, _descendants, js, make_env, restored_path, run_bunker
from test_node_links import Hierarchy, build

MAX_SIZE = 2 << 20  # office's bound: a few backups fill it, so eviction runs all the time
STEP_TIMEOUT = 300.0  # a hung step fails the test (generous: never a measure of speed)
LEFTOVER_WAIT = 30.0  # for the processes of a killed step to go (generous: never a measure of speed)
SETTLE_ROUNDS = 12
PR_SET_CHILD_SUBREAPER = 36
NODE_OK = (0, 1)  # a node command not killed: ok, note or warn (err is a finding)
BACKUP_DONE = (0, 1, 3)  # a backup that names its snapshot (3: taken, some items or the spool at err)

Manifest = dict[str, str]  # relative path -> BLAKE2 of the file's bytes


def manifest(root: Path) -> Manifest:
    return {
        str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass
class Client:
    name: str
    env: dict[str, str]
    src: Path
    made: int = 0  # files made so far (their names)


@dataclass
class Outcome:
    rc: int | None  # None: killed
    out: str
    err: str
    how: str = ""  # what was killed


@dataclass
class Lab:
    tmp: Path
    seed: int
    h: Hierarchy
    clients: list[Client]
    rng: random.Random
    kills: int = 0
    spooled_backups: int = 0  # completed backups that went to the client's spool (office full)
    killed: dict[str, int] = field(default_factory=dict)  # step kind -> kills
    steps: int = 0
    typical: dict[str, float] = field(default_factory=dict)  # step kind -> usual duration (s)
    taken: dict[str, tuple[str, Manifest]] = field(default_factory=dict)  # run (run_key) -> (client, manifest)
    findings: list[str] = field(default_factory=list)  # errors of runs that were not killed
    log: list[str] = field(default_factory=list)  # what each step did, for the failure message
    baseline: set[int] = field(default_factory=set)  # processes below the test from before it

    # ------------------------------------------------------------------ processes

    def run(self, kind: str, argv: list[str], env: dict[str, str], kill: bool, victim: str = "all") -> Outcome:
        """Run ``argv``; with ``kill``, SIGKILL it after a random part of its usual duration:
        ``victim`` "all" (the process group and every descendant, the forked server too),
        "client" (the process group only) or "server" (only the forked node server)."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            p = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
            how = ""
            try:
                if kill:
                    # mostly past the interpreter's start (most of a quick step's time; a kill
                    # there tests nothing), into the work; scaled by the step's usual duration,
                    # which follows the machine's load
                    try:
                        p.wait(self.rng.uniform(0.55, 1.05) * self.typical.get(kind, 1.0))
                    except subprocess.TimeoutExpired:
                        how = self._kill(p, victim)
                p.wait(STEP_TIMEOUT)
            finally:
                if p.poll() is None:
                    self._kill(p, "all")
                    p.wait()
            took = time.monotonic() - t0
            out.seek(0)
            err.seek(0)
            o, e = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
        killed = p.returncode == -signal.SIGKILL
        if how and (killed or victim == "server"):
            self.kills += 1
            self.killed[kind] = self.killed.get(kind, 0) + 1
        elif how:
            how = ""  # it ended by itself before the signal landed
        if not how:
            self.typical[kind] = took if kind not in self.typical else 0.7 * self.typical[kind] + 0.3 * took
        self._no_leftovers(f"{kind} ({how or 'not killed'})")
        return Outcome(None if killed else p.returncode, o, e, how)

    def _kill(self, p: subprocess.Popen[bytes], victim: str) -> str:
        below = _descendants(p.pid)
        servers = [pid for pid in below if b"node\0serve" in _cmdline(pid)]
        if victim == "server":
            if not servers:
                return ""
            targets = servers
        elif victim == "client":
            targets = []
        else:
            targets = below
        for pid in targets:
            _sigkill(pid)
        if victim != "server":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        return victim + (f" ({len(servers)} server)" if victim != "client" and servers else "")

    def _no_leftovers(self, what: str) -> None:
        """No process of the step is left: orphans (reparented to this test, a subreaper) must
        end by themselves soon, e.g. a forked server whose client was killed."""
        deadline = time.monotonic() + LEFTOVER_WAIT
        while True:
            left = [pid for pid in _descendants(os.getpid()) if pid not in self.baseline]
            for pid in left:
                _reap(pid)
            left = [pid for pid in left if _alive(pid)]
            if not left:
                return
            if time.monotonic() > deadline:
                names = [_cmdline(pid).replace(b"\0", b" ").decode("utf-8", "replace") for pid in left]
                for pid in left:
                    _sigkill(pid)
                pytest.fail(f"seed {self.seed}: processes left after step {what}: {names}\n" + self.history())
            time.sleep(0.05)

    def evicted(self) -> int:
        path = self.h.office / "state" / self.h.top.id / "evicted.json"
        return len(json.loads(path.read_text())) if path.exists() else 0

    def history(self) -> str:
        return "steps:\n" + "\n".join(self.log[-60:])

    # ------------------------------------------------------------------ steps

    def node(self, kind: str, *args: str | Path, kill: bool = False) -> dict[str, Any] | None:
        """A `bunker node` command; its JSON document unless it was killed."""
        got = self.run(kind, [BUNKER, "node", *map(str, args), "--json"], self.h.top.env, kill)
        self.log.append(f"{self.steps}: {kind} rc={got.rc} {got.how}")
        if got.rc is None:
            return None
        doc: dict[str, Any] = json.loads(got.out) if got.out.strip() else {}
        if got.rc not in NODE_OK:
            errs = [p["message"] for p in doc.get("problems", []) if p["level"] in ("err", "fatal")]
            self.findings.append(f"step {self.steps} {kind} rc={got.rc}: {errs or got.err.strip()[-800:]}")
        return doc

    def change(self, c: Client) -> None:
        """Change the client's files before a backup: a new file (incompressible), and now and
        then a copy of an old one (deduplicated, maybe against a pack office evicted), a
        rewritten or a removed one."""
        c.made += 1
        r = self.rng
        (c.src / f"f{c.made:04d}").write_bytes(r.randbytes(r.randrange(20_000, 500_000)))
        old = sorted(c.src.iterdir())
        if len(old) > 3 and r.random() < 0.3:
            shutil.copyfile(r.choice(old), c.src / f"copy{c.made:04d}")
        if len(old) > 3 and r.random() < 0.2:
            victim = r.choice(old)
            with open(victim, "r+b") as f:
                f.write(r.randbytes(4096))
        if len(old) > 6 and r.random() < 0.15:
            r.choice(old).unlink()

    def backup(self, c: Client, kill: bool, victim: str = "all", beside: bool = False) -> None:
        self.change(c)
        before = manifest(c.src)
        argv = [BUNKER, "backup", str(c.src), "--json", "--repo", str(self.h.office)]
        got = self.run("backup", argv, c.env, kill, victim)
        self._backup_done(c, got, before, beside)

    def _backup_done(self, c: Client, got: Outcome, before: Manifest, beside: bool = False) -> None:
        doc = js_or_none(got.out)
        note = f"spooled={doc.get('spooled')} snapshot={str(doc.get('snapshot'))[:12]}" if doc else got.err[-300:]
        what = "backup beside forward" if beside else "backup"
        self.log.append(f"{self.steps}: {what} {c.name} rc={got.rc} {got.how} {note}")
        if got.rc in BACKUP_DONE and doc and doc.get("snapshot"):
            self.taken[self.run_of(c, doc)] = (c.name, before)
            self.spooled_backups += bool(doc.get("spooled"))
        elif got.rc is not None and not got.how:
            self.findings.append(f"step {self.steps} backup {c.name} rc={got.rc}: {got.err.strip()[-800:]}")

    def run_of(self, c: Client, doc: dict[str, Any]) -> str:
        """What names a backup's run wherever its snapshot goes: a spooled snapshot is signed
        again under another number when its place in the chain was taken (node/deliver.py), so
        its name changes; its session and checkpoint counter do not."""
        name = f"snapshots/{doc['snapshot']}"
        if doc.get("spooled"):
            (where,) = (Path(c.env["XDG_DATA_HOME"]) / "bunker" / "spool").glob(f"*/{name}")
        else:
            where = self.h.office / "store" / self.h.top.id / name
        return run_key(where.read_bytes())

    def client_forward(self, c: Client, kill: bool) -> None:
        argv = [BUNKER, "forward", "--json", "--repo", str(self.h.office)]
        got = self.run("client-forward", argv, c.env, kill)
        self.log.append(f"{self.steps}: forward {c.name} rc={got.rc} {got.how}")
        if got.rc is not None and got.rc not in NODE_OK and not got.how:
            self.findings.append(f"step {self.steps} forward {c.name} rc={got.rc}: {got.err.strip()[-800:]}")

    def backup_beside_forward(self, c: Client) -> None:
        """A backup while `node forward office` runs (the daemon does both at once); either
        may be killed."""
        self.change(c)
        before = manifest(c.src)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            b = subprocess.Popen(
                [BUNKER, "backup", str(c.src), "--json", "--repo", str(self.h.office)],
                env=c.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            time.sleep(self.rng.uniform(0, 0.6))
            fwd = self.node("forward-office", "forward", self.h.office, kill=self.rng.random() < 0.5)
            if fwd is not None:
                self.log.append(f"{self.steps}:   (beside) forward office pieces={pieces_written(fwd)}")
            how = ""
            if self.rng.random() < 0.4 and b.poll() is None:
                how = self._kill(b, "all")
            b.wait(STEP_TIMEOUT)
            out.seek(0)
            err.seek(0)
            killed = b.returncode == -signal.SIGKILL
            if killed:
                self.kills += 1
                self.killed["backup"] = self.killed.get("backup", 0) + 1
            o, e = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
            got = Outcome(None if killed else b.returncode, o, e, how if killed else "")
        self._no_leftovers("backup beside forward")
        self._backup_done(c, got, before, beside=True)

    def carry(self, up: bool, partial: bool) -> int:
        """Move the disk's files to the other site: all, or only some (an interrupted move)."""
        src, dst = (self.h.disk_office, self.h.disk_hq) if up else (self.h.disk_hq, self.h.disk_office)
        files = sorted(src.iterdir())
        if partial and files:
            files = self.rng.sample(files, self.rng.randrange(len(files)))
        for p in files:
            shutil.move(str(p), str(dst / p.name))
        # a killed writer's temp file goes along (swept once stale): it is no piece
        pieces = sum(1 for p in files if is_piece_name(p.name))
        where = "up" if up else "down"
        self.log.append(f"{self.steps}: carry {where} {pieces} pieces{' (partial)' if partial else ''}")
        return pieces

    def random_step(self, kill_rate: float) -> None:
        r = self.rng
        self.steps += 1
        kill = r.random() < kill_rate
        step = r.choices(
            [
                "backup",
                "beside",
                "client-forward",
                "forward-office",
                "carry-up",
                "import-hq",
                "forward-hq",
                "carry-down",
                "import-office",
                "trip",
            ],
            weights=[4, 1, 1, 2, 1.5, 2, 2, 1.5, 2, 1],
        )[0]
        h = self.h
        if step == "backup":
            # fewer backups killed than other steps: the completed ones are what must not be lost
            kill = r.random() < kill_rate * 0.7
            self.backup(r.choice(self.clients), kill, r.choice(["all", "all", "client", "server"]))
        elif step == "beside":
            self.backup_beside_forward(r.choice(self.clients))
        elif step == "client-forward":
            self.client_forward(r.choice(self.clients), kill)
        elif step == "forward-office":
            self.node("forward-office", "forward", h.office, kill=kill)
        elif step == "carry-up":
            self.carry(True, partial=r.random() < 0.4)
        elif step == "carry-down":
            self.carry(False, partial=r.random() < 0.4)
        elif step == "trip":
            self.trip(kill_rate / 3)
        elif step == "import-hq":
            self.node("import-hq", "import", h.hq, kill=kill)
        elif step == "forward-hq":
            self.node("forward-hq", "forward", h.hq, kill=kill)
        else:
            self.node("import-office", "import", h.office, kill=kill)

    def trip(self, kill_rate: float) -> None:
        """The courier's whole trip in order (up, imported, to the top, receipts down), so that
        office evicts often; each of its commands may be killed."""
        r, h = self.rng, self.h
        self.node("forward-office", "forward", h.office, kill=r.random() < kill_rate)
        self.carry(True, partial=False)
        self.node("import-hq", "import", h.hq, kill=r.random() < kill_rate)
        self.node("forward-hq", "forward", h.hq, kill=r.random() < kill_rate)
        self.carry(False, partial=False)
        self.node("import-office", "import", h.office, kill=r.random() < kill_rate)

    def settle(self) -> None:
        """Every step without kills, round after round, until a round moves nothing."""
        h = self.h
        for n in range(SETTLE_ROUNDS):
            self.steps += 1
            self.log.append(f"-- settle round {n}")
            moved = 0
            for c in self.clients:
                if self.spooled(c):
                    self.client_forward(c, kill=False)
            fo = self.node("forward-office", "forward", h.office)
            moved += self.carry(True, partial=False)
            ih = self.node("import-hq", "import", h.hq)
            fh = self.node("forward-hq", "forward", h.hq)
            moved += self.carry(False, partial=False)
            io = self.node("import-office", "import", h.office)
            assert fo is not None and ih is not None and fh is not None and io is not None
            moved += pieces_written(fo) + pieces_written(fh) + _imported(ih) + _imported(io)
            moved += sum(d.get("sent", 0) for d in fh["deliveries"])
            if moved == 0 and not any(self.spooled(c) for c in self.clients):
                return
        on_disk = sorted(p.name for d in (h.disk_office, h.disk_hq) for p in d.iterdir())
        pytest.fail(
            f"seed {self.seed}: still moving after {SETTLE_ROUNDS} settle rounds (on the disk: {on_disk}; "
            f"last imports: hq {ih['imports']}, office {io['imports']}; spooled: "
            f"{[self.spooled(c) for c in self.clients]}); failed runs:\n"
            + "\n".join(self.findings[-5:])
            + "\n"
            + self.history()
        )

    def spooled(self, c: Client) -> list[Path]:
        """Objects still waiting in the client's spool for office."""
        spool = Path(c.env["XDG_DATA_HOME"]) / "bunker" / "spool"
        return [
            p
            for p in spool.glob("*/*/*")
            if p.parent.name in ("packs", "index", "refs", "snapshots") and not p.name.startswith(".")
        ]


def held_bytes(store: Path) -> int:
    """What a node's store holds as eviction counts it (node/eviction.py: not sessions/)."""
    return sum(
        p.stat().st_size
        for d in store.iterdir()
        if d.is_dir() and d.name != "sessions"
        for p in d.iterdir()
        if not p.name.startswith(".")
    )


def run_key(data: bytes) -> str:
    env = parse_snapshot(data).env
    return f"{env.cert[:12]}/{env.session}/{env.counter}"


def js_or_none(text: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def pieces_written(doc: dict[str, Any]) -> int:
    return sum(len(d.get("pieces", [])) for d in doc.get("deliveries", []))


def _imported(doc: dict[str, Any]) -> int:
    return sum(i["pieces"] + i["duplicates"] for i in doc.get("imports", []))


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> None:
    """Collect an orphan that was reparented to this process and has ended."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"  # a zombie has ended: its parent (or this test, once it is an orphan) collects it


def _subreaper(on: bool) -> None:
    """Orphans of the steps (a forked server whose client was killed) become children of this
    test, so that the test sees and collects them."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


@pytest.fixture
def subreaper() -> Iterator[None]:
    _subreaper(True)
    try:
        yield
    finally:
        _subreaper(False)


def make_lab(tmp_path: Path, seed: int) -> Lab:
    h = build(tmp_path, max_size=str(MAX_SIZE))
    second = tmp_path / "second.put"
    h.top.ok("key", "new-client", "second", "--out", second)
    # office learns of the second client's certificate from a fresh seed (else only after the
    # records come down the link)
    h.top.ok("node", "export-seed", tmp_path / "top2.seed")
    assert run_bunker("node", "seed", h.office, tmp_path / "top2.seed", env=h.top.env).returncode == 0
    clients = [
        Client("testclient", h.top.env, tmp_path / "src-a"),
        Client("second", make_env(tmp_path / "second-home", BUNKER_PUT_KEY=str(second)), tmp_path / "src-b"),
    ]
    for c in clients:
        c.src.mkdir()
    lab = Lab(tmp_path, seed, h, clients, random.Random(seed))
    lab.baseline = set(_descendants(os.getpid()))
    return lab


def verify(lab: Lab) -> None:
    """Nothing lost, no fork, every receipt true, office within its bound, no error."""
    h, top = lab.h, lab.h.top
    ctx = f"seed {lab.seed}"
    failed = "\n".join(lab.findings)
    assert not lab.findings, f"{ctx}: runs that were not killed failed:\n{failed}\n{lab.history()}"

    listed = js(top.ok("snapshots", "--json"))["snapshots"]
    runs = {run_key((top.path / "snapshots" / s["id"]).read_bytes()): s for s in listed}
    lost = sorted(set(lab.taken) - set(runs))
    assert not lost, f"{ctx}: completed backups missing at the top: {lost}\n" + lab.history()
    places: dict[tuple[str, int], list[str]] = {}
    for s in listed:
        places.setdefault((s["client"], s["seq"]), []).append(s["id"])
    forks = {k: v for k, v in places.items() if len(v) > 1}
    assert not forks, f"{ctx}: forked chains at the top: {forks}"

    top.ok("check", "--read-data")
    cp = run_bunker("check", "--json", "--repo", h.office, env=top.env)
    assert cp.returncode == 0, f"{ctx}: check through office: {cp.stdout[-2000:]} {cp.stderr[-2000:]}"

    # every object a record receipt named (and every evicted one) is at the top
    repo_state = h.office / "state" / top.id
    recorded = json.loads((repo_state / "up" / "hq" / "recorded.json").read_text())
    evicted = json.loads((repo_state / "evicted.json").read_text()) if (repo_state / "evicted.json").exists() else {}
    # (session acknowledgements, gc/, are superseded by the next one of their node and removed:
    # hq keeps one per node, a prune at the top the newest; the data objects are what counts)
    untrue = [n for n in [*recorded, *evicted] if not n.startswith("gc/") and not (top.path / n).is_file()]
    assert not untrue, f"{ctx}: office holds record receipts for objects the top lacks: {untrue[:10]}"
    assert set(evicted) <= set(recorded), f"{ctx}: office evicted what no record receipt names"
    # ... and every object a hop receipt named is at hq (hq never evicts; settled, nothing is staged)
    delivered = json.loads((repo_state / "up" / "hq" / "delivered.json").read_text())
    hq_store = h.hq / "store" / top.id
    untrue = [n for n in delivered if not n.startswith("gc/") and not (hq_store / n).is_file()]
    assert not untrue, f"{ctx}: office holds hop receipts for objects hq lacks: {untrue[:10]}"

    # office's store is within its bound once everything is recorded, or says why not
    store = h.office / "store" / top.id
    used = held_bytes(store)
    if used > MAX_SIZE:
        packs = [f"packs/{p.name}" for p in (store / "packs").iterdir() if not p.name.startswith(".")]
        last = js(run_bunker("node", "import", h.office, "--json", env=top.env))
        full = [p["message"] for p in last["problems"] if p["code"] == "store-full"]
        evictable = [n for n in packs if n in recorded]
        assert full and not evictable, (
            f"{ctx}: office's store holds {used} bytes, over its bound {MAX_SIZE}, with {len(evictable)} recorded "
            f"packs it could evict; it says: {full}"
        )

    assert evicted, f"{ctx}: office never evicted: the run did not test eviction"

    # a few snapshots restore byte for byte: each client's newest and one older one
    by_client: dict[str, list[str]] = {}
    for run in lab.taken:
        by_client.setdefault(runs[run]["client"], []).append(run)
    chosen = [max(v, key=lambda r: runs[r]["seq"]) for v in by_client.values()]
    older = [r for r in lab.taken if r not in chosen]
    if older:
        chosen.append(lab.rng.choice(older))
    for run in chosen:
        s = runs[run]
        client, want = lab.taken[run]
        src = next(c.src for c in lab.clients if c.name == client)
        target = lab.tmp / "restored"
        top.ok("restore", s["id"], "--target", target)
        got = manifest(restored_path(target, src))
        assert got == want, f"{ctx}: snapshot {s['id'][:12]} of {client} does not restore as taken"
        shutil.rmtree(target)


def schedule(tmp_path: Path, seed: int, kills: int, max_steps: int, kill_rate: float) -> Lab:
    lab = make_lab(tmp_path, seed)
    print(f"node faults: seed {seed} (BUNKER_NODE_FAULTS_SEED)")
    t0 = time.monotonic()
    while (lab.kills < kills or not lab.evicted()) and lab.steps < max_steps:
        lab.random_step(kill_rate)
    schedule_s = time.monotonic() - t0
    lab.settle()
    settle_s = time.monotonic() - t0 - schedule_s
    verify(lab)
    usual = {k: round(v, 2) for k, v in sorted(lab.typical.items())}
    # what killed runs left behind that nothing sweeps (reported, not judged)
    left = {
        f"{n.name}/{d}": len(list((n / "state" / d).iterdir()))
        for n in (lab.h.office, lab.h.hq)
        for d in ("outgoing", "incoming")
        if (n / "state" / d).is_dir()
    }
    print(
        f"node faults: seed {seed}: {lab.steps} steps, {lab.kills} kills {dict(sorted(lab.killed.items()))}, "
        f"{len(lab.taken)} snapshots taken ({lab.spooled_backups} spooled), {lab.evicted()} packs evicted; "
        f"schedule {schedule_s:.0f} s, settle {settle_s:.0f} s, total {time.monotonic() - t0:.0f} s; "
        f"usual durations {usual}; left in state: {left}"
    )
    if os.environ.get("BUNKER_NODE_FAULTS_LOG"):
        print(lab.history())
    assert lab.kills >= kills, f"seed {seed}: only {lab.kills} kills in {lab.steps} steps"
    return lab


SEED = int(os.environ.get("BUNKER_NODE_FAULTS_SEED", "1"))


KILLS = int(os.environ.get("BUNKER_NODE_FAULTS_KILLS", "30"))


@pytest.mark.slow
@pytest.mark.usefixtures("subreaper")
def test_kill_nine_at_random_moments(tmp_path: Path) -> None:
    """CI's run: 30 kills. A longer run: BUNKER_NODE_FAULTS_KILLS=150 (and another
    BUNKER_NODE_FAULTS_SEED); docs/reliability.md has the figures of the last one."""
    schedule(tmp_path, SEED, kills=KILLS, max_steps=max(160, KILLS * 4), kill_rate=0.9)
