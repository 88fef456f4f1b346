"""Key files that are damaged, truncated, swapped or foreign: each error says what is wrong with
the key (not with the repository), shows differing ids in full, and nothing is written with a
key that does not fit together (issue 11, point 17). New passphrases typed on a terminal
(point 21)."""

from __future__ import annotations

import base64
import os
import pty
import re
import select
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bunker import encoding
from helpers import BUNKER, Repo, describe, init_repo, make_env, run_bunker

MASTER = "BUNKER MASTER KEY"
PUT = "BUNKER PUT KEY"


def read_key(path: Path) -> tuple[str, list[str], dict[str, Any]]:
    """(label, comment lines, map) of a key file."""
    text = path.read_text()
    label = MASTER if f"BEGIN {MASTER}" in text else PUT
    body = text.split(f"-----BEGIN {label}-----")[1].split(f"-----END {label}-----")[0]
    comment = [line for line in text.splitlines() if line.startswith("# ")]
    return label, comment, encoding.unpack(base64.b64decode("".join(body.split())))


def write_key(path: Path, label: str, comment: list[str], fields: dict[str, Any]) -> Path:
    body = base64.b64encode(encoding.pack(fields)).decode()
    lines = [*comment, f"-----BEGIN {label}-----", *(body[i : i + 64] for i in range(0, len(body), 64))]
    path.write_text("\n".join([*lines, f"-----END {label}-----"]) + "\n")
    return path


def changed(fields: dict[str, Any], name: str, **extra: Any) -> dict[str, Any]:
    """``fields`` with one byte (or one hex digit) of ``name`` changed."""
    out = dict(fields, **extra)
    v = out[name]
    if isinstance(v, bytes):
        b = bytearray(v)
        b[len(b) // 2] ^= 0x01
        out[name] = bytes(b)
    else:
        i = len(v) // 3
        out[name] = v[:i] + ("0" if v[i] != "0" else "1") + v[i + 1 :]
    return out


def legacy(fields: dict[str, Any]) -> dict[str, Any]:
    """The same key as an older bunker wrote it: no checksum (a put key of version 1)."""
    out = {k: v for k, v in fields.items() if k not in ("sum", "config", "host", "host_salt")}
    if out["kind"] == "put":
        out["v"] = 1
    return out


def repository_files(repo: Repo) -> dict[str, bytes]:
    return {str(p.relative_to(repo.path)): p.read_bytes() for p in repo.all_files()}


@pytest.fixture
def backed_up(repo: Repo, tmp_path: Path) -> tuple[Repo, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(5000))
    repo.backup(src)
    return repo, src


def test_damaged_put_keys_say_what_is_wrong_and_write_nothing(backed_up: tuple[Repo, Path], tmp_path: Path) -> None:
    repo, src = backed_up
    label, comment, fields = read_key(repo.put_key)
    old = legacy(fields)
    text = repo.put_key.read_text()
    k = tmp_path / "keys"
    k.mkdir()
    cases: list[tuple[Path, list[str]]] = [
        (write_key(k / "v2-secret", label, comment, changed(fields, "secret")), ["its checksum does not match"]),
        (write_key(k / "v2-version", label, comment, dict(fields, v=1)), ["its checksum does not match"]),
        (
            write_key(k / "v1-secret", label, comment, changed(old, "secret")),
            ["its secret belongs to dedup domain", "could not be restored"],
        ),
        (
            write_key(k / "v1-repo", label, comment, changed(old, "repo")),
            [f"is not the fingerprint of the master verify key inside it ({repo.id})"],
        ),
        (write_key(k / "v1-cert", label, comment, changed(old, "cert")), ["the certificate inside it is not valid"]),
        (
            write_key(k / "v1-client-key", label, comment, changed(old, "client_key")),
            ["its signing key is not the one its certificate names"],
        ),
        (
            write_key(k / "v1-data-key", label, comment, changed(old, "data_x25519")),
            ["its data public key (to which backups are sealed) is not the repository's"],
        ),
        (write_key(k / "v1-domain", label, comment, changed(old, "domain")), ["its dedup domain is named"]),
    ]
    (k / "truncated").write_text(text[: len(text) // 2])
    cases.append((k / "truncated", ["is truncated: it has no -----END BUNKER PUT KEY----- line"]))
    (k / "empty").write_text("")
    cases.append((k / "empty", ["is not a put key file: it is empty"]))
    garbled = text.replace(text.splitlines()[5], "!" + text.splitlines()[5][1:])
    (k / "garbled").write_text(garbled)
    cases.append((k / "garbled", ["is damaged: its text is not valid base64"]))
    cases.append((repo.master_key, ["is a master key file, not a put key file", "--master-key"]))

    before = repository_files(repo)
    for path, expected in cases:
        for args in (("backup", src), ("check",), ("verify", src), ("key", "info")):
            cp = repo.run(*args, "--put-key", path)
            assert cp.returncode == 15, describe(cp)
            for e in expected:
                assert e in cp.stderr, describe(cp)
            assert str(path) in cp.stderr
            for wrong in ("substituted", "looks like", "object clients/"):
                assert wrong not in cp.stderr, describe(cp)
    # nothing reached the repository, not even a certificate
    assert repository_files(repo) == before
    # the good key still works: the damaged copies changed nothing
    assert repo.backup(src)["level"] in ("ok", "note")


def test_damaged_secret_domains_are_shown_in_full(backed_up: tuple[Repo, Path], tmp_path: Path) -> None:
    from bunker.crypto.derive import PutSecrets

    repo, src = backed_up
    label, comment, fields = read_key(repo.put_key)
    bad = changed(legacy(fields), "secret")
    path = write_key(tmp_path / "bad.put", label, comment, bad)
    cp = repo.run("backup", src, "--put-key", path)
    assert cp.returncode == 15, describe(cp)
    good, damaged = PutSecrets(fields["secret"]).domain_id, PutSecrets(bad["secret"]).domain_id
    assert f"dedup domain {damaged}, but its certificate to {good}" in cp.stderr


def test_damaged_master_keys_are_not_wrong_passphrases_nor_other_repositories(
    backed_up: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, _ = backed_up
    label, comment, fields = read_key(repo.master_key)
    text = repo.master_key.read_text()
    k = tmp_path / "keys"
    k.mkdir()
    damaged_repo = changed(fields, "repo")["repo"]
    cases: list[tuple[Path, int, list[str]]] = [
        (write_key(k / "repo", label, comment, changed(fields, "repo")), 15, ["its checksum does not match"]),
        (write_key(k / "box", label, comment, changed(fields, "box")), 15, ["its checksum does not match"]),
        (
            write_key(k / "old-repo", label, comment, changed(legacy(fields), "repo")),
            15,
            [f"the repository id inside it ({damaged_repo}) differs from the one in its first line ({repo.id})"],
        ),
        (
            write_key(k / "old-box", label, comment, changed(legacy(fields), "box")),
            11,
            ["the passphrase does not open", "if you are sure of the passphrase it may be damaged"],
        ),
        (repo.put_key, 15, ["is a put key file, not a master key file", "--put-key"]),
    ]
    (k / "truncated").write_text(text[: len(text) - 40])
    cases.append((k / "truncated", 15, ["is truncated: it has no -----END BUNKER MASTER KEY----- line"]))
    for path, code, expected in cases:
        for args in (("restore", "latest", "--target", tmp_path / "t"), ("snapshots",)):
            cp = repo.run(*args, "--master-key", path)
            assert cp.returncode == code, describe(cp)
            for e in expected:
                assert e in cp.stderr, describe(cp)
            for wrong in ("substituted", "looks like a put key", "not the one your key is for"):
                assert wrong not in cp.stderr, describe(cp)
    assert not (tmp_path / "t").exists()
    # a master key file written before checksums still opens
    old = write_key(k / "old", label, comment, legacy(fields))
    cp = repo.run("restore", "latest", "--target", tmp_path / "t", "--master-key", old)
    assert cp.returncode == 0, describe(cp)
    shutil.rmtree(tmp_path / "t")


def test_foreign_and_misplaced_keys_name_both_repositories_in_full(
    backed_up: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, src = backed_up
    other = init_repo(tmp_path / "other")
    for option, path in (("--put-key", other.put_key), ("--master-key", other.master_key)):
        args = ("backup", src) if option == "--put-key" else ("snapshots",)
        cp = repo.run(*args, option, path)
        assert cp.returncode == 14, describe(cp)
        assert "is not the one your key is for" in cp.stderr
        assert f"signed by the master key of repository {repo.id}" in cp.stderr
        assert f"{path} is for repository {other.id}" in cp.stderr
    # the machine's own key files hold another repository's keys (copied over by mistake)
    shutil.copy(other.put_key, repo.put_key)
    shutil.copy(other.master_key, repo.master_key)
    cp = repo.run("backup", src)
    assert cp.returncode == 12, describe(cp)
    assert f"is for repository {other.id}, but the repository at {repo.path} is {repo.id}" in cp.stderr
    cp = repo.run("restore", "latest", "--target", tmp_path / "t")
    assert cp.returncode == 12, describe(cp)
    assert f"is for repository {other.id}, but the repository at {repo.path} is {repo.id}" in cp.stderr


# ------------------------------------------------------------------------------ new passphrases


def run_in_terminal(args: list[str], env: dict[str, str], answers: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run bunker on a pseudo-terminal, typing the next answer at each passphrase prompt. Returns
    (exit code, everything it printed); a run still asking after ``timeout`` is killed (-9)."""
    assert BUNKER
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        os.execve(BUNKER, [BUNKER, *args], env)
    out = b""
    answered = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal (it exited)
                break
            if not chunk:
                break
            out += chunk
            prompts = len(re.findall(rb"(?:passphrase|confirmation): ", out))
            while answered < prompts:
                os.write(fd, (answers[answered] if answered < len(answers) else "never typed").encode() + b"\r")
                answered += 1
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


def test_a_confirmation_that_differs_asks_again_then_stops_with_exit_10(tmp_path: Path) -> None:
    env = make_env(tmp_path / "e", passphrase=None)
    target = tmp_path / "r"
    code, out = run_in_terminal(["init", "--repo", str(target)], env, ["one", "two", "one", "three", "x", "y"])
    assert code == 10, out
    assert out.count("Repeat for confirmation") == 3
    assert "2 more tries" in out and "1 more try)" in out
    assert "differed 3 times; nothing was changed" in out and "Aborted" not in out
    assert not target.exists()
    assert not list((tmp_path / "e" / "config").rglob("*.master"))
    # a mismatch, then the same passphrase twice: the repository is made with it
    code, out = run_in_terminal(["init", "--repo", str(target)], env, ["one", "two", "good", "good"])
    assert code == 0, out
    assert "created repository" in out
    master = next((tmp_path / "e" / "config").rglob("*.master"))
    cp = run_bunker("key", "export", "--shares", "2-of-3", "--repo", target, env=dict(env, BUNKER_PASSPHRASE="good"))
    assert cp.returncode == 0 and master.exists(), describe(cp)
