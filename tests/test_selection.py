"""Backup options (--exclude, --exclude-file, --tag, --host, --one-file-system) and choosing
snapshots (id prefix, latest, --client, sealed filters that need the master key)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import Repo, describe, js, restored_path


def _ls_paths(repo: Repo, spec: str, path: Path, *extra: str) -> set[str]:
    doc = js(repo.ok("ls", spec, str(path), "-R", "--json", *extra))
    return {it["path"] for it in doc["items"]}


def test_excludes(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in ("keep", "node_modules/pkg", "logs", "deep/cache"):
        (src / d).mkdir(parents=True)
    files = {
        "keep/a.txt": b"a",
        "keep/b.tmp": b"tmp",
        "top.tmp": b"tmp",
        "node_modules/pkg/index.js": b"js",
        "logs/app.log": b"log",
        "logs/keep.txt": b"kept",
        "deep/cache/blob": b"cache",
        "deep/file": b"deep",
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    exf = tmp_path / "excludes"
    exf.write_text("# comment line\n\nnode_modules\n" + str(src / "deep" / "cache") + "\n")
    doc = repo.backup(
        src, args=("--exclude", "*.tmp", "--exclude", str(src / "logs" / "*.log"), "--exclude-file", str(exf))
    )
    assert doc["stats"]["files"] == 3
    paths = _ls_paths(repo, "latest", src)
    assert {p for p in paths if os.path.basename(p) in {"a.txt", "keep.txt", "file"}} == {
        str(src / "keep/a.txt"),
        str(src / "logs/keep.txt"),
        str(src / "deep/file"),
    }
    for rel in ("keep/b.tmp", "top.tmp", "node_modules", "node_modules/pkg/index.js", "logs/app.log", "deep/cache"):
        assert str(src / rel) not in paths, rel

    cp = repo.run("backup", src, "--exclude-file", tmp_path / "missing-file")
    assert cp.returncode == 2 and "exclude file" in cp.stderr


def _mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0:
        return False
    cp = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "bunker-test", str(where)], capture_output=True, check=False
    )
    return cp.returncode == 0


def test_one_file_system(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    mnt = src / "mnt"
    mnt.mkdir(parents=True)
    (src / "here.txt").write_bytes(b"same fs")
    # the option is accepted in both spellings
    assert repo.backup(src, args=("--one-file-system",))["stats"]["files"] == 1
    assert repo.backup(src, args=("-x",))["stats"]["files"] == 1
    if not _mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here: only checked that --one-file-system is accepted")
    try:
        assert os.stat(mnt).st_dev != os.stat(src).st_dev
        (mnt / "other-fs.txt").write_bytes(b"on another filesystem")
        crossing = repo.backup(src)
        s1 = crossing["snapshot"]
        staying = repo.backup(src, args=("--one-file-system",))
        s2 = staying["snapshot"]
        (mnt / "deeper").mkdir()
        (mnt / "deeper" / "below.txt").write_bytes(b"below the mount point")
        # a mount point named on the command line is crossed into (`backup -x / /boot`), whole
        named = repo.backup(src, mnt, args=("--one-file-system",))
        s3 = named["snapshot"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert crossing["stats"]["files"] == 2
    assert staying["stats"]["files"] == 1
    assert str(mnt / "other-fs.txt") in _ls_paths(repo, s1[:12], src)
    p2 = _ls_paths(repo, s2[:12], src)
    assert str(mnt) in p2  # the mount point itself is kept ...
    assert str(mnt / "other-fs.txt") not in p2  # ... its contents are not crossed
    assert named["stats"]["files"] == 3
    p3 = _ls_paths(repo, s3[:12], src)
    assert {str(src / "here.txt"), str(mnt / "other-fs.txt"), str(mnt / "deeper" / "below.txt")} <= p3


def test_exclude_caches_and_if_present(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in ("cache", "fake-cache", "project/build", "plain"):
        (src / d).mkdir(parents=True)
        (src / d / "data.bin").write_bytes(b"x" * 100)
    (src / "cache" / "CACHEDIR.TAG").write_bytes(b"Signature: 8a477f597d28d172789f06886806bc55\n# a cache\n")
    (src / "fake-cache" / "CACHEDIR.TAG").write_bytes(b"not the signature\n")
    (src / "project" / ".nobackup").write_bytes(b"")

    everything = _ls_paths(repo, repo.backup(src)["snapshot"][:12], src)
    assert str(src / "cache" / "data.bin") in everything and str(src / "project" / "build" / "data.bin") in everything

    snap = repo.backup(src, args=("--exclude-caches", "--exclude-if-present", ".nobackup"))["snapshot"]
    p = _ls_paths(repo, snap[:12], src)
    assert str(src / "cache") in p and str(src / "project") in p  # the tagged directories are kept ...
    for gone in ("cache/data.bin", "cache/CACHEDIR.TAG", "project/.nobackup", "project/build"):
        assert str(src / gone) not in p  # ... empty
    assert str(src / "fake-cache" / "data.bin") in p  # a tag without the signature is no cache tag
    assert str(src / "plain" / "data.bin") in p


def test_pseudo_filesystems_are_not_read(repo: Repo, tmp_path: Path) -> None:
    """A kernel-made filesystem (here a devpts instance) below a backed-up path is kept as an
    empty mount point, without -x; named on the command line, it is read."""
    src = tmp_path / "src"
    pts = src / "pts"
    pts.mkdir(parents=True)
    (src / "here.txt").write_bytes(b"real file")
    if os.geteuid() != 0:
        pytest.skip("mounting a devpts instance needs root (CI runs the tests as root)")
    cp = subprocess.run(["mount", "-t", "devpts", "-o", "newinstance", "devpts", str(pts)], capture_output=True)
    if cp.returncode != 0:
        pytest.skip(f"cannot mount devpts here: {cp.stderr.decode(errors='replace').strip()}")
    try:
        assert (pts / "ptmx").exists()
        default = _ls_paths(repo, repo.backup(src)["snapshot"][:12], src)
        named = _ls_paths(repo, repo.backup(src, pts)["snapshot"][:12], src)
    finally:
        subprocess.run(["umount", str(pts)], check=False)
    assert str(src / "here.txt") in default and str(pts) in default
    assert str(pts / "ptmx") not in default
    assert str(pts / "ptmx") in named


@pytest.fixture
def multi(repo: Repo, tmp_path: Path) -> dict:
    """Three snapshots: two of the default client (tags, hosts) and one of client web1."""
    s = {}
    for name in ("one", "two", "web"):
        d = tmp_path / f"src-{name}"
        d.mkdir()
        (d / f"{name}.txt").write_bytes(f"content {name}\n".encode())
        s[f"src_{name}"] = d
    # a client without a bound host may claim any host in its snapshots
    free_key = tmp_path / "free.put"
    repo.ok("key", "new-client", repo.client + "-free", "--out", free_key)
    s["one"] = repo.backup(
        s["src_one"], args=("--tag", "alpha", "--tag", "daily", "--host", "hostA", "--put-key", str(free_key))
    )
    s["two"] = repo.backup(s["src_two"], args=("--tag", "beta", "--host", "hostB", "--put-key", str(free_key)))
    web_key = tmp_path / "web1.put"
    doc = js(repo.ok("key", "new-client", "web1", "--out", web_key, "--json"))
    assert doc["client"] == "web1" and doc["capabilities"] == ["backup"]
    s["web"] = repo.backup(s["src_web"], args=("--put-key", str(web_key)))
    s["web_key"] = web_key
    return s


def test_snapshot_selection(repo: Repo, tmp_path: Path, multi: dict) -> None:
    rows = js(repo.ok("snapshots", "--json"))["snapshots"]
    free = repo.client + "-free"
    assert [(r["client"], r["seq"]) for r in rows] == [(free, 1), (free, 2), ("web1", 1)]
    assert all(r["trusted"] for r in rows)

    # on this machine `latest` is its own client's, which has none (issue 11 point 11); on a
    # machine without a put key, latest overall is web1's; latest --client picks per client
    cp = repo.run("restore", "latest", "--target", tmp_path / "t-own")
    assert cp.returncode == 2 and f"this machine's client {repo.client!r}" in cp.stderr, describe(cp)
    assert "--client NAME" in cp.stderr
    keys = Path(repo.env["XDG_CONFIG_HOME"]) / "bunker" / "keys"
    reader = {**repo.env, "XDG_CONFIG_HOME": str(tmp_path / "reader-config")}  # the master key only
    t = tmp_path / "t-latest"
    repo.ok("restore", "latest", "--target", t, "--master-key", str(next(keys.glob("*.master"))), env=reader)
    assert restored_path(t, multi["src_web"] / "web.txt").exists()
    t = tmp_path / "t-client"
    repo.ok("restore", "latest", "--client", repo.client + "-free", "--target", t)
    assert restored_path(t, multi["src_two"] / "two.txt").read_bytes() == b"content two\n"
    assert not restored_path(t, multi["src_web"]).exists()
    t = tmp_path / "t-web"
    repo.ok("restore", "latest", "--client", "web1", "--target", t)
    assert restored_path(t, multi["src_web"] / "web.txt").read_bytes() == b"content web\n"
    rows = js(repo.ok("snapshots", "--client", "web1", "--json"))["snapshots"]
    assert [r["id"] for r in rows] == [multi["web"]["snapshot"]]

    # by id prefix
    one = multi["one"]["snapshot"]
    t = tmp_path / "t-prefix"
    repo.ok("restore", one[:8], "--target", t)
    assert restored_path(t, multi["src_one"] / "one.txt").read_bytes() == b"content one\n"
    assert not restored_path(t, multi["src_two"]).exists()
    assert str(multi["src_one"] / "one.txt") in _ls_paths(repo, one[:6], multi["src_one"])
    assert str(multi["src_one"] / "one.txt") in _ls_paths(repo, "snapshots/" + one[:8].upper(), multi["src_one"])
    cp = repo.run("restore", one[:3], "--target", tmp_path / "x")
    assert cp.returncode == 2 and "too short" in cp.stderr
    cp = repo.run("ls", "ffffffffffff")
    if not any(r["id"].startswith("ffffffffffff") for r in js(repo.ok("snapshots", "--json"))["snapshots"]):
        assert cp.returncode == 2 and "no snapshot" in cp.stderr
    cp = repo.run("ls", "latest", "/no/such/path", "--client", "web1")
    assert cp.returncode == 2 and "not in this snapshot" in cp.stderr

    # sealed filters, with the master key
    rows = js(repo.ok("snapshots", "--tag", "alpha", "--json"))["snapshots"]
    assert [r["id"] for r in rows] == [one]
    assert rows[0]["tags"] == ["alpha", "daily"] and rows[0]["host"] == "hostA"
    assert rows[0]["paths"] == [str(multi["src_one"])]
    rows = js(repo.ok("snapshots", "--host", "hostB", "--json"))["snapshots"]
    assert [r["id"] for r in rows] == [multi["two"]["snapshot"]]
    rows = js(repo.ok("snapshots", "--tag", "alpha", "--tag", "beta", "--json"))["snapshots"]
    assert rows == []
    rows = js(repo.ok("snapshots", "--path", str(multi["src_two"]), "--json"))["snapshots"]
    assert [r["id"] for r in rows] == [multi["two"]["snapshot"]]
    t = tmp_path / "t-tag"
    repo.ok("restore", "latest", "--tag", "alpha", "--client", repo.client + "-free", "--target", t)
    assert restored_path(t, multi["src_one"] / "one.txt").exists()
    assert not restored_path(t, multi["src_two"]).exists()


def test_sealed_filters_need_the_master_key(repo: Repo, tmp_path: Path, multi: dict) -> None:
    dest = tmp_path / "usb" / "master.key"
    repo.ok("key", "export", "--master", dest, "--remove")
    for args in (("--tag", "alpha"), ("--host", "hostA"), ("--path", str(multi["src_one"]))):
        cp = repo.run("snapshots", *args)
        assert cp.returncode == 12, describe(cp)
        assert "master key" in cp.stderr
    # public filters still work without it
    rows = js(repo.ok("snapshots", "--client", "web1", "--json"))["snapshots"]
    assert [r["client"] for r in rows] == ["web1"]
    assert "tags" not in rows[0]
    # and the sealed ones work with the exported key
    rows = js(repo.ok("snapshots", "--tag", "alpha", "--master-key", dest, "--json"))["snapshots"]
    assert [r["id"] for r in rows] == [multi["one"]["snapshot"]]


def test_client_put_key_backs_up_on_its_own_chain(repo: Repo, tmp_path: Path, multi: dict) -> None:
    again = repo.backup(multi["src_web"], args=("--put-key", str(multi["web_key"])))
    assert again["seq"] == 2 and again["stats"]["files_unchanged"] == 1
    mine = repo.backup(multi["src_one"])
    assert mine["seq"] == 1  # the default client's first: the others were backed up with other put keys
    info = js(repo.ok("key", "info", "--put-key", multi["web_key"], "--json"))
    assert info["client"]["name"] == "web1" and info["client"]["capabilities"] == ["backup"]
    cp = repo.run("check", "--put-key", multi["web_key"], "--json")
    assert cp.returncode == 0, describe(cp)
