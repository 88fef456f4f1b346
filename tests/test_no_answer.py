"""A stopped server is unreachable after a short try, not after the full backoff (issue 11, point 18).

The retries with backoff (BUNKER_STORAGE_RETRIES, default 5: 15 to 31 s) are for a server that
stumbles. A host that refuses the connection and has not answered once during the command (a
stopped `bunker serve`, sshd or S3 server, a wrong port) is retried for at most 3 s
(NO_ANSWER_SECONDS), then the repository is unreachable: exit 13, or for a backup the local spool.
Each test runs with the default retry settings, and reads the time bunker says it tried.
"""

from __future__ import annotations

import re
from pathlib import Path

from bunker.errors import ExitCode
from bunker.storage.object_store import NO_ANSWER_SECONDS
from helpers import describe, free_port, init_repo, js, make_env, make_tree, run_bunker, serve_socket

DEFAULTS = ("BUNKER_STORAGE_RETRIES", "BUNKER_STORAGE_RETRY_DELAY", "BUNKER_STORAGE_TIMEOUT")


def _tried(text: str) -> float:
    """The time the message says bunker tried: "nothing answers there (...; tried for 1.4 s)"."""
    m = re.search(r"nothing answers there \(.*; tried for ([0-9.]+) s\)", text)
    assert m, text
    return float(m.group(1))


def _nothing_answers(url: str, env: dict[str, str], *needles: str) -> None:
    for k in DEFAULTS:
        env.pop(k, None)
    cp = run_bunker("check", "--keyless", "--repo", url, env=env, timeout=120)
    assert cp.returncode == ExitCode.NO_REPOSITORY, describe(cp)
    assert _tried(cp.stderr) <= NO_ANSWER_SECONDS
    assert "Traceback" not in cp.stderr and "next step:" in cp.stderr
    for n in needles:
        assert n in cp.stderr, cp.stderr


def test_stopped_bunker_serve_sends_the_backup_to_the_spool(tmp_path: Path) -> None:
    sock = tmp_path / "bunker.sock"
    with serve_socket(sock, tmp_path / "repo"):
        repo = init_repo(tmp_path / "home", url=f"unix://{sock}")
        src = tmp_path / "src"
        make_tree(src)
        repo.backup(src, args=("--no-progress",))
    for k in DEFAULTS:
        repo.env.pop(k, None)
    # the socket file may stay behind (refused) or be gone (no such file): nothing answers either way
    doc = repo.backup(src, args=("--no-progress",))
    assert doc["spooled"] is True and doc["level"] == "note"
    spooled = [e for e in doc["events"] if e["code"] == "spooled"]
    assert spooled and _tried(spooled[0]["message"]) <= NO_ANSWER_SECONDS, doc["events"]
    assert "cannot be reached" in spooled[0]["message"] and "no bunker server listens" in spooled[0]["message"]


def test_closed_port_over_ssh(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    (tmp_path / "known_hosts").write_text("")
    env["BUNKER_SSH_KNOWN_HOSTS"] = str(tmp_path / "known_hosts")
    port = free_port()  # nothing listens there
    _nothing_answers(f"ssh://root@127.0.0.1:{port}/srv/repo", env, "Connection refused", f"127.0.0.1:{port}")


def test_closed_port_over_sftp(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    (tmp_path / "known_hosts").write_text("")
    env["BUNKER_SSH_KNOWN_HOSTS"] = str(tmp_path / "known_hosts")
    port = free_port()
    _nothing_answers(f"sftp://root@127.0.0.1:{port}/srv/repo", env, "Connection refused", "start the ssh server")


def test_closed_port_of_an_object_store(tmp_path: Path) -> None:
    env = make_env(tmp_path, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    port = free_port()
    url = f"s3://bucket/p?endpoint=http://127.0.0.1:{port}"
    _nothing_answers(url, env, "Connection refused", "the S3 server is not running or the endpoint is wrong")
    # --json says the same
    cp = run_bunker("check", "--keyless", "--json", "--repo", url, env=env, timeout=120)
    assert js(cp)["exit_code"] == ExitCode.NO_REPOSITORY and _tried(js(cp)["error"]) <= NO_ANSWER_SECONDS
