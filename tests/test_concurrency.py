"""Concurrent writers without locks (issue 5): several clients back up into one repository at
once while a prune loop (grace 0, the harshest setting) condemns and deletes; afterwards every
snapshot restores byte-identical and the repository checks clean. Real processes, real storage:
a local directory, a moto S3 server and a real S3 implementation (Ceph's RADOS Gateway)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from helpers import (
    AWS_SCRUB,
    Repo,
    S3Server,
    expect_rc,
    init_repo,
    js,
    make_env,
    make_tree,
    restored_path,
    run_bunker,
    snapshot_tree,
)

CLIENTS = 4
RUNS = 3


def _mutate(src: Path, rng: random.Random) -> None:
    """Change a tree a little between runs: new, rewritten and deleted files."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    for p in rng.sample(files, min(3, len(files))):
        p.unlink()
    (src / f"new-{rng.randrange(1 << 30)}.bin").write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
    (src / "shared.bin").write_bytes(rng.randbytes(64) + b"shared by all clients " * 20_000)


def _run_clients_and_prune(repo: Repo, tmp_path: Path, url: str, extra_env: dict[str, str]) -> None:
    prune_key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", prune_key)
    clients = []
    for i in range(CLIENTS):
        key = tmp_path / f"c{i}.put"
        repo.ok("key", "new-client", f"client{i}", "--out", key)
        env = make_env(tmp_path / f"c{i}-home", BUNKER_PUT_KEY=str(key), **extra_env)
        for k in AWS_SCRUB:
            if k not in extra_env:
                env.pop(k, None)
        src = tmp_path / f"c{i}-src"
        make_tree(src, seed=i + 10)
        clients.append((i, env, src))

    expected: dict[str, tuple[Path, dict[bytes, tuple[object, ...]]]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def client(i: int, env: dict[str, str], src: Path) -> None:
        rng = random.Random(i)
        try:
            for run in range(RUNS):
                _mutate(src, rng)
                cp = run_bunker("backup", "--repo", url, "--no-progress", "--json", src, env=env, timeout=300)
                if cp.returncode != 0:
                    raise AssertionError(
                        f"client {i} run {run}: exit {cp.returncode}: {cp.stderr[-2000:]} {cp.stdout[-3000:]}"
                    )
                snap = js(cp)["snapshot"]
                state = snapshot_tree(src, dir_mtimes=False)  # what the snapshot must restore
                with lock:
                    expected[snap] = (src, state)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            with lock:
                errors.append(f"client {i}: {exc}")

    prunes = 0
    repacked = 0  # packs whose blobs a prune copied while backups ran (small ones merged)

    def pruner() -> None:
        nonlocal prunes, repacked
        env = dict(repo.env)
        env.update(extra_env)
        while not done.is_set():
            cp = run_bunker("prune", "--repo", url, "--put-key", prune_key, "--grace", "0s", "--json", env=env)
            if cp.returncode != 0:
                with lock:
                    errors.append(f"prune: exit {cp.returncode}: {cp.stderr[-2000:]}")
                return
            prunes += 1
            repacked += js(cp)["repacked"]

    threads = [threading.Thread(target=client, args=c) for c in clients]
    pt = threading.Thread(target=pruner)
    pt.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    pt.join()
    assert not errors, "\n".join(errors)
    assert prunes >= 1 and len(expected) == CLIENTS * RUNS

    # two more prunes with every backup finished: whatever was condemned is deleted now
    env = {**repo.env, **extra_env}
    for _ in range(2):
        cp = expect_rc(
            run_bunker("prune", "--repo", url, "--put-key", prune_key, "--grace", "0s", "--json", env=env), 0
        )
        repacked += js(cp)["repacked"]
    assert repacked >= 4, "no prune merged the small packs of the backups: repack went untested"
    check = js(expect_rc(run_bunker("check", "--repo", url, "--read-data", "--json", env=env), 0))
    assert check["ok"] is True
    for snap, (src, state) in expected.items():
        target = tmp_path / "restored" / snap
        doc = js(expect_rc(run_bunker("restore", "--repo", url, snap, "--target", target, "--json", env=env), 0))
        assert doc["stats"]["failed"] == 0
        assert snapshot_tree(restored_path(target, src), dir_mtimes=False) == state, snap


@pytest.mark.slow
def test_concurrent_backups_and_prune_local(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "owner")
    _run_clients_and_prune(repo, tmp_path, str(repo.path), {})


@pytest.mark.slow
@pytest.mark.parametrize("server", ["s3_server", "rgw_server"], ids=["moto", "rgw"])
def test_concurrent_backups_and_prune_s3(
    server: str, request: pytest.FixtureRequest, s3_prefix: str, tmp_path: Path
) -> None:
    s3: S3Server = request.getfixturevalue(server)
    url = s3.url(s3_prefix)
    extra = s3.env()
    env = make_env(tmp_path / "owner")
    for k in AWS_SCRUB:
        env.pop(k, None)
    env.update(extra)
    repo = init_repo(tmp_path / "owner", url=url, env_extra=env)
    _run_clients_and_prune(repo, tmp_path, url, extra)
