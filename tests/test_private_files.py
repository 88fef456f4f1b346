"""What bunker keeps on this machine is private to its user: key files are never written through a
name another user planted, and every file and directory under the config, data and cache
directories is 0600/0700 whatever the umask (docs/security.md, section 12, "Permissions")."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bunker.backup.files_cache import FilesCache
from helpers import describe, init_repo, js, make_env, make_tree, run_bunker

NOBODY = 65534

# Runs as the test (root), plants what an attacker (user nobody) could have put at every name a
# writer of DEST could guess, then becomes the bunker command: its pid is the one the old writer
# put in its temp name (DEST.tmp-PID).
PLANTER = """
import os, sys
kind, loot_dir = sys.argv[1], sys.argv[2]
sep = sys.argv.index("--")
dests, cmd = sys.argv[3:sep], sys.argv[sep + 1:]
pid = os.getpid()
n = 0
for dest in dests:
    d, name = os.path.split(dest)
    for planted in (f"{dest}.tmp-{pid}", f"{dest}.tmp", os.path.join(d, f".{name}.tmp"), dest):
        if kind == "symlink":
            loot = os.path.join(loot_dir, f"loot-{n}")
            n += 1
            with open(loot, "w"):
                pass
            os.chmod(loot, 0o666)
            os.chown(loot, 65534, 65534)
            os.symlink(loot, planted)
        else:
            with open(planted, "w"):
                pass
            os.chmod(planted, 0o666)
        os.chown(planted, 65534, 65534, follow_symlinks=False)
os.execv(cmd[0], cmd)
"""


def _planter(tmp_path: Path, kind: str, *dests: Path) -> list[str]:
    script = tmp_path / "planter.py"
    script.write_text(PLANTER)
    loot = tmp_path / "loot"
    loot.mkdir(exist_ok=True)
    os.chown(loot, NOBODY, NOBODY)
    return [sys.executable, str(script), kind, str(loot), *map(str, dests), "--"]


def _assert_private_key(path: Path, label: str, repo_id: str) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), f"{path} is not a regular file (a planted link was kept)"
    assert st.st_uid == os.geteuid(), f"{path} belongs to uid {st.st_uid}, not the writer"
    assert stat.S_IMODE(st.st_mode) == 0o600, f"{path} has mode {oct(st.st_mode)}"
    text = path.read_text()
    assert f"-----BEGIN {label}-----" in text and repo_id in text


def _run_umask(
    umask: int, *args: str | os.PathLike[str], env: dict[str, str], prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run bunker under ``umask`` (behind ``prefix``)."""
    wrap = ["sh", "-c", f'umask {umask:03o}; exec "$@"', "sh"]
    return run_bunker(*args, env=env, prefix=[*wrap, *(prefix or [])])


@pytest.mark.skipif(os.geteuid() != 0, reason="planting files of another user needs root")
@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_key_files_are_never_written_through_planted_names(tmp_path: Path, kind: str) -> None:
    """A put key or an exported master key written with --out into a directory another user can
    write to: the old writer's DEST.tmp-PID (and every other guessable name) was planted as a
    symlink to the attacker's file, or as the attacker's own file; the key lands in a new file of
    the writer's, mode 0600, and nothing reaches the attacker's files."""
    repo = init_repo(tmp_path / "r")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # a group or scratch directory without the sticky bit
    put = shared / "laptop.put"
    cp = _run_umask(
        0o022, "key", "new-client", "laptop", "--out", put, "--repo", repo.path, "--json",
        env=repo.env, prefix=_planter(tmp_path, kind, put),
    )  # fmt: skip
    assert cp.returncode == 0, describe(cp)
    _assert_private_key(put, "BUNKER PUT KEY", repo.id)
    master = shared / "master.key"
    cp = _run_umask(
        0o022, "key", "export", "--master", master, "--repo", repo.path, "--json",
        env=repo.env, prefix=_planter(tmp_path, kind, master),
    )  # fmt: skip
    assert cp.returncode == 0, describe(cp)
    _assert_private_key(master, "BUNKER MASTER KEY", repo.id)

    # nothing was written through a planted name, and the writer's temp files are gone
    for loot in (tmp_path / "loot").iterdir():
        assert loot.stat().st_size == 0, f"the key was written through a planted link into {loot}"
    for p in shared.iterdir():
        st = os.lstat(p)
        if p in (put, master):
            continue
        assert st.st_uid == NOBODY, f"{p} is the writer's: a temp file left behind"
        assert stat.S_ISLNK(st.st_mode) or st.st_size == 0, f"the key was written into the planted file {p}"
    # the put key works for a backup
    src = tmp_path / "src"
    make_tree(src)
    cp = run_bunker("backup", src, "--repo", repo.path, "--put-key", put, "--json", env=repo.env)
    assert cp.returncode in (0, 1), describe(cp)


def _walk_private(*bases: Path) -> list[str]:
    """Every path below ``bases`` that is not a directory 0700 or a regular file 0600 of ours."""
    wrong = []
    for base in bases:
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                mode = stat.S_IMODE(st.st_mode)
                ok = (stat.S_ISDIR(st.st_mode) and mode == 0o700) or (stat.S_ISREG(st.st_mode) and mode == 0o600)
                if not ok or st.st_uid != os.geteuid():
                    wrong.append(f"{p} {stat.filemode(st.st_mode)} uid {st.st_uid}")
    return wrong


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_everything_bunker_keeps_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """init (default repository in the data directory), backups (state, files cache, index
    cache), a second repository that goes away after one backup (the spool), and `forward`: then
    every path under the three XDG directories is 0700 or 0600, including the directories bunker
    made on the way (a cache base directory that did not exist)."""
    env = make_env(tmp_path / "e")
    xdg = [Path(env["XDG_CONFIG_HOME"]), Path(env["XDG_DATA_HOME"])]
    cache_base = tmp_path / "e" / "not-yet" / "cache"
    env["XDG_CACHE_HOME"] = str(cache_base)
    src = tmp_path / "src"
    make_tree(src)

    cp = _run_umask(umask, "init", "--client", "c", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    cp = _run_umask(umask, "backup", src, "--json", env=env)
    assert cp.returncode in (0, 1), describe(cp)

    away = tmp_path / "usb" / "repo"
    cp = _run_umask(umask, "init", "--repo", away, "--client", "c", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    assert _run_umask(umask, "backup", src, "--repo", away, "--json", env=env).returncode in (0, 1)
    moved = tmp_path / "usb" / "unplugged"
    away.rename(moved)
    (src / "new-file").write_bytes(b"written while the disk was away\n")
    cp = _run_umask(umask, "backup", src, "--repo", away, "--json", env=env)
    assert cp.returncode in (0, 1) and "spooled" in {e["code"] for e in js(cp)["events"]}, describe(cp)
    spool = Path(env["XDG_DATA_HOME"]) / "bunker" / "spool"
    assert any(spool.iterdir())

    names = {p.name for base in [*xdg, cache_base] for p in base.rglob("*")}
    assert {"files.sqlite", "chain.json", "UPSTREAM", "index"} <= names, names
    assert [p for p in xdg[0].rglob("*.master")] and [p for p in xdg[0].rglob("*.put")]
    wrong = _walk_private(*xdg, tmp_path / "e" / "not-yet")
    assert not wrong, "\n".join(wrong)
    for created in (tmp_path / "e" / "not-yet", cache_base):  # made by bunker: 0700 too
        assert stat.S_IMODE(created.stat().st_mode) == 0o700, created

    moved.rename(away)
    cp = _run_umask(umask, "forward", "--repo", away, "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    wrong = _walk_private(*xdg, tmp_path / "e" / "not-yet")
    assert not wrong, "\n".join(wrong)


def test_files_cache_and_its_sqlite_side_files_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files cache (every backed-up path in plaintext), opened with umask 000: the database
    and the -wal and -shm files sqlite makes next to it while it is open are 0600."""
    old = os.umask(0)
    try:
        path = tmp_path / "cache" / "bunker" / "r" / "c" / "files.sqlite"
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        cache = FilesCache(str(path))
        cache.save_dir(b"/home/alice/secret-plans", {b"a.txt": [1, 2, 3, 4, [], None]})
        cache.flush()
        side = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
        assert all(p.exists() for p in side)
        for p in [path, *side]:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
        cache.close()
    finally:
        os.umask(old)
    for d in (path.parent, path.parent.parent, path.parent.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_directories_an_older_version_left_open_are_tightened(tmp_path: Path) -> None:
    """Bunker's own directories (and the files cache) left 0755/0644 by an older version are
    0700/0600 after the next backup; the XDG base directories themselves are left as they are."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    bases = [Path(repo.env[k]) for k in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME")]
    for base in bases:
        os.chmod(base, 0o755)
        for p in base.rglob("*"):
            if p.is_dir():
                os.chmod(p, 0o755)
    (fc,) = bases[2].rglob("files.sqlite")
    os.chmod(fc, 0o644)
    repo.backup(src)
    for base in bases:
        assert stat.S_IMODE(base.stat().st_mode) == 0o755, base  # not bunker's to change
        opened = [p for p in base.rglob("*") if p.is_dir() and stat.S_IMODE(p.stat().st_mode) != 0o700]
        assert not opened, opened
    assert stat.S_IMODE(fc.stat().st_mode) == 0o600
    shutil.rmtree(src)
