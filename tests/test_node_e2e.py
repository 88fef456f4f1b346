"""The hierarchy end to end, with real processes (issue 12's proof; docs/hierarchy.md):

two clients → node office (daemon, unix socket, a store small enough to force eviction) → a local
folder standing for a USB disk, carried by moving its files → node hq (its server on demand through
a real sshd forced command) → the repository of record on a real S3-compatible server (moto).

Backups flow up and record receipts down, office evicts to its bound, a prune at the top while a
client's session runs on office deletes nothing that session uses, a revocation made at the top
reaches office, and `check --keyless` passes on every copy."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bunker.errors import ExitCode
from helpers import (
    AWS_SCRUB,
    BUNKER,
    S3Server,
    compare_trees,
    expect_rc,
    init_repo,
    js,
    make_env,
    restored_path,
    run_bunker,
    start_sshd,
)
from test_node_links import _move


def _wait(pred: Callable[[], bool], what: str, seconds: float = 90, poll: float = 0.1) -> None:
    deadline = time.monotonic() + seconds
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def test_two_clients_office_daemon_carried_disk_hq_over_ssh_top_on_s3(
    tmp_path: Path, s3_server: S3Server, s3_prefix: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("starts sshd, which needs root (CI runs as root)")
    base = tmp_path / "admin"
    env = make_env(base)
    for k in AWS_SCRUB:
        env.pop(k, None)
    env.update(s3_server.env())
    url = s3_server.url(s3_prefix)
    top = init_repo(base, url=url, env_extra=env)
    env = top.env

    def bunker(*args: str | Path, rc: int | tuple[int, ...] = 0, **kw: Any) -> Any:
        codes = (rc,) if isinstance(rc, int) else rc
        return expect_rc(run_bunker(*args, env=kw.pop("env", env), **kw), *codes)

    # the nodes, certified at the top and seeded from it
    office, hq = tmp_path / "office", tmp_path / "hq"
    bunker("node", "init", office, "--name", "office", "--max-size", "40M")
    bunker("node", "init", hq, "--name", "hq")
    for n, caps in ((office, "relay"), (hq, "relay,record")):
        bunker("node", "card", n, "--out", tmp_path / f"{n.name}.card")
        bunker("key", "new-node", tmp_path / f"{n.name}.card", "--caps", caps, "--repo", url)
    second_key = tmp_path / "second.put"
    bunker("key", "new-client", "second", "--out", second_key, "--repo", url)
    seed = tmp_path / "top.seed"
    bunker("node", "export-seed", seed, "--repo", url)
    for n in (office, hq):
        bunker("node", "seed", n, seed)
    disk_office, disk_hq = tmp_path / "usb-at-office", tmp_path / "usb-at-hq"
    disk_office.mkdir()
    disk_hq.mkdir()
    bunker("node", "upstream", "add", hq, "top", "--direct", url)
    bunker("node", "upstream", "add", office, "hq", "--link", disk_office, "--card", tmp_path / "hq.card")
    bunker("node", "downstream", "add", hq, "office", "--link", disk_hq, "--card", tmp_path / "office.card")

    # hq's server runs on demand, through sshd: a forced command pins the node
    sshd = start_sshd(tmp_path / "sshd")
    pub = sshd.client_key.with_suffix(".pub").read_text().strip()
    (sshd.workdir / "authorized_keys").write_text(f'command="{BUNKER} node serve {hq} --stdio",restrict {pub}\n')
    ssh_env = dict(env, **sshd.env())
    hq_url = f"ssh://root@127.0.0.1:{sshd.port}/anything/the/client/asks"

    sock = tmp_path / "office.sock"

    def start_daemon() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [BUNKER, "node", "run", str(office), "--socket", str(sock), "--interval", "1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        _wait(sock.exists, "office's socket")
        return proc

    def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert not sock.exists()

    daemon = start_daemon()
    try:
        src1, src2 = tmp_path / "src1", tmp_path / "src2"
        for i, src in enumerate((src1, src2)):
            src.mkdir()
            for f in range(3):
                (src / f"f{f}").write_bytes(random.Random(i * 10 + f).randbytes(1_200_000))
        office_url = f"unix://{sock}"
        one = js(bunker("backup", src1, "--json", "--repo", office_url))
        two = js(bunker("backup", src2, "--json", "--repo", office_url, "--put-key", second_key))
        assert not one.get("spooled") and not two.get("spooled")

        def carry() -> None:
            """office's daemon wrote pieces: carry them to hq, which imports and delivers; then
            carry hq's answer back, which office's daemon imports on its own."""
            _wait(lambda: any(disk_office.iterdir()), "office's daemon to write pieces")
            time.sleep(1.5)  # a piece being written is a dot file: let the cycle finish
            _move(disk_office, disk_hq)
            bunker("node", "import", hq, rc=(0, 1))
            bunker("node", "forward", hq, rc=(0, 1))
            _move(disk_hq, disk_office)
            _wait(lambda: not any(disk_office.iterdir()) or _recorded(office, top.id) > 0, "office to import")

        carry()
        snaps = js(bunker("snapshots", "--json", "--repo", url))["snapshots"]
        assert {s["client"] for s in snaps} == {top.client, "second"}
        _wait(lambda: _recorded(office, top.id) > 0, "record receipts at office")
        # hq, on demand over ssh: it lists what arrived, and a check through it passes
        listed = js(bunker("snapshots", "--json", "--repo", hq_url, env=ssh_env))["snapshots"]
        assert len(listed) == 2

        # a prune at the top while a session runs on office deletes nothing that session uses
        pruner = tmp_path / "pruner.put"
        bunker("key", "new-client", "pruner", "--prune", "--out", pruner, "--repo", url)
        (src1 / "big").write_bytes(os.urandom(12_000_000))
        held = subprocess.Popen(
            [BUNKER, "backup", str(src1), "--json", "--repo", office_url],
            env=dict(env, BUNKER_PROGRESS="never"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        leases = office / "store" / top.id / "sessions"
        _wait(lambda: any(not p.name.startswith(".") for p in leases.iterdir()), "the session's lease", poll=0.005)
        os.killpg(held.pid, signal.SIGSTOP)
        try:
            bunker("forget", one["snapshot"].split("/")[-1][:12], "--master-key", top.master_key, "--repo", url)
            bunker("prune", "--put-key", pruner, "--grace", "0s", "--repo", url)
            doc = js(bunker("prune", "--put-key", pruner, "--grace", "0s", "--json", "--repo", url))
            assert doc["deleted"] == 0 and doc["waiting"], doc
        finally:
            os.killpg(held.pid, signal.SIGCONT)
        out, err = held.communicate(timeout=300)
        assert held.returncode in (0, 1), err.decode()
        for _ in range(3):
            carry()
        bunker("prune", "--put-key", pruner, "--grace", "0s", "--repo", url)

        # office evicts to its bound, and only what the top holds: a smaller bound, the daemon
        # restarted (SIGTERM: a clean stop, socket removed)
        stop_daemon(daemon)
        conf = office / "node.json"
        conf.write_text(conf.read_text().replace(f'"max_size": {40 << 20}', f'"max_size": {6 << 20}'))
        daemon = start_daemon()
        _wait(lambda: _store_bytes(office, top.id) <= 6 << 20, "office to evict to its bound")

        # a revocation made at the top reaches office: the revoked client cannot back up there
        bunker("key", "revoke", "second", "--repo", url, "--master-key", top.master_key)
        bunker("node", "forward", hq, rc=(0, 1))
        _move(disk_hq, disk_office)
        _wait(lambda: _config_versions(office, top.id) >= _config_versions_at(url, env), "the new config at office")
        cp = run_bunker("backup", src2, "--repo", office_url, "--put-key", second_key, env=env)
        assert cp.returncode == ExitCode.KEY_MISSING and "revoked" in cp.stderr, cp.stderr

        # every copy checks without keys
        for where, e in ((url, env), (office_url, env), (hq_url, ssh_env)):
            doc = js(bunker("check", "--keyless", "--expect", top.id, "--json", "--repo", where, env=e))
            assert doc["ok"] is True, (where, doc["problems"])
        bunker("check", "--read-data", "--repo", url)
        target = tmp_path / "restored"
        bunker("restore", "latest", "--target", target, "--repo", url)
        compare_trees(src1, restored_path(target, src1))
        shutil.rmtree(target)
    finally:
        try:
            stop_daemon(daemon)
        finally:
            sshd.stop()


def _recorded(node: Path, repo_id: str) -> int:
    import json

    total = 0
    for p in (node / "state" / repo_id / "up").glob("*/recorded.json"):
        with contextlib.suppress(OSError, ValueError):
            total += len(json.loads(p.read_text()))
    return total


def _store_bytes(node: Path, repo_id: str) -> int:
    held = ("packs", "index", "refs", "snapshots", "config", "clients", "nodes", "retired", "gc")
    return sum(p.stat().st_size for d in held for p in (node / "store" / repo_id / d).glob("*") if p.is_file())


def _config_versions(node: Path, repo_id: str) -> int:
    return len([p for p in (node / "store" / repo_id / "config").iterdir() if not p.name.startswith(".")])


def _config_versions_at(url: str, env: dict[str, str]) -> int:
    doc = js(run_bunker("key", "info", "--json", "--repo", url, env=env))
    return int(doc["config_version"])
