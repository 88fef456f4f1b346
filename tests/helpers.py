"""Shared helpers for the test suite: an isolated environment, running the real `bunker` CLI as a
subprocess, generating and comparing file trees, and damaging repository objects on disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import pytest

PASSPHRASE = "correct horse battery staple"
# the console script of the Python running the tests (not a version-manager shim found on PATH,
# which costs a shell and ~0.1 s per run), else whatever `bunker` is on PATH
_candidate = Path(sys.executable).with_name("bunker")
BUNKER = str(_candidate) if os.access(_candidate, os.X_OK) else shutil.which("bunker")
HERE = Path(__file__).resolve().parent

# environment variables that must never leak from the developer's shell into a test
_SCRUB = (
    "BUNKER_REPO",
    "BUNKER_PASSPHRASE",
    "BUNKER_NEW_PASSPHRASE",
    "BUNKER_MASTER_KEY",
    "BUNKER_PUT_KEY",
    "BUNKER_CLIENT",
    "XDG_DATA_HOME",
    "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME",
)


def make_env(base: Path, passphrase: str | None = PASSPHRASE, **extra: str) -> dict[str, str]:
    """An environment whose XDG directories and HOME live under ``base`` (never the real home)."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    for name in ("data", "config", "cache", "home"):
        (base / name).mkdir(parents=True, exist_ok=True)
    env.update(
        XDG_DATA_HOME=str(base / "data"),
        XDG_CONFIG_HOME=str(base / "config"),
        XDG_CACHE_HOME=str(base / "cache"),
        HOME=str(base / "home"),
        PYTHONDONTWRITEBYTECODE="1",
        LC_ALL="C.UTF-8",
    )
    if passphrase is not None:
        env["BUNKER_PASSPHRASE"] = passphrase
    env.update(extra)
    return env


# an environment entry for run_bunker (never passed on): run the command with this directory as
# the home directory of the user's passwd entry (see passwd_home_prefix)
PASSWD_HOME_VAR = "TEST_PASSWD_HOME"


def passwd_home_prefix(home: Path) -> list[str]:
    """A command prefix that runs the command as this user with ``home`` as the home directory
    of its passwd entry, where OpenSSH (and bunker, for both ssh:// and sftp://) find ~/.ssh: in a
    mount namespace of its own, /etc/passwd is a copy that says so (needs root)."""
    me = pwd.getpwuid(os.getuid()).pw_name
    lines = []
    with open("/etc/passwd", encoding="utf-8") as f:
        for line in f.read().splitlines():
            fields = line.split(":")
            if len(fields) == 7 and fields[0] == me:
                fields[5] = str(home)
            lines.append(":".join(fields))
    copy = home.parent / f".passwd-for-{home.name}"
    copy.write_text("\n".join(lines) + "\n")
    script = 'mount --bind "$0" /etc/passwd && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, str(copy)]


def run_bunker(
    *args: str | os.PathLike[str],
    env: Mapping[str, str],
    input: bytes | str | None = None,
    timeout: float = 120,
    prefix: Iterable[str] = (),
    stdin: int | None = None,
    cwd: str | os.PathLike[str] | None = None,
    argv0: Iterable[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `bunker` console script; stdout/stderr are decoded text (raw bytes are kept
    as ``stdout_bytes``). ``prefix`` wraps the command (e.g. setpriv to drop privileges)."""
    assert BUNKER, "the bunker console script is not installed (pip install -e .)"
    env = dict(env)
    home = env.pop(PASSWD_HOME_VAR, None)
    if home is not None:
        prefix = [*passwd_home_prefix(Path(home)), *prefix]
    cmd = [*prefix, *(argv0 if argv0 is not None else [BUNKER]), *(os.fspath(a) for a in args)]
    if isinstance(input, str):
        input = input.encode()
    kw: dict[str, Any] = {}
    if input is None:
        kw["stdin"] = subprocess.DEVNULL if stdin is None else stdin
    else:
        kw["input"] = input
    cp = subprocess.run(cmd, env=dict(env), capture_output=True, timeout=timeout, cwd=cwd, check=False, **kw)
    raw = cp.stdout
    out = subprocess.CompletedProcess(
        cp.args, cp.returncode, raw.decode("utf-8", "backslashreplace"), cp.stderr.decode("utf-8", "backslashreplace")
    )
    out.stdout_bytes = raw  # type: ignore[attr-defined]
    return out


RUN_SLICE, HOLD = 0.02, 0.08  # a paced run goes at a fifth of its speed, its timers alike


def kill_run_when(
    *args: str | os.PathLike[str], env: Mapping[str, str], reached: Any, paced: bool = False, timeout: float = 120
) -> tuple[int | None, str]:
    """Run `bunker *args` and SIGKILL it and every process below it once ``reached()`` holds.

    ``paced``: the run is let go for RUN_SLICE at a time and held (SIGSTOP) while ``reached`` is
    checked, so that on a loaded machine the test's own checks keep up with the run. Returns the
    run's exit code if it ended by itself (None when killed) and its stderr, for the caller's
    assertion message."""
    assert BUNKER, "the bunker console script is not installed (pip install -e .)"
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [BUNKER, *(os.fspath(a) for a in args)],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        ended: int | None = None
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                time.sleep(RUN_SLICE if paced else 0.005)
                if paced:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGSTOP)
                if reached():
                    break
                ended = proc.poll()
                if ended is not None:
                    break
                if paced:
                    time.sleep(HOLD)  # held: the run's interval timers (checkpoints) come due meanwhile
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGCONT)
        finally:
            # the whole tree at once, also children in sessions of their own (a forked node
            # server): one left alive would still carry out requests the run had sent it (a lease
            # refresh written after the caller judged the run dead)
            below = _descendants(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in below:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        err.seek(0)
        return ended, err.read().decode("utf-8", "backslashreplace")


def js(cp: subprocess.CompletedProcess[str]) -> Any:
    """The one JSON document a --json command printed on stdout."""
    try:
        return json.loads(cp.stdout)
    except ValueError:
        raise AssertionError(
            f"no JSON on stdout (exit {cp.returncode}):\nstdout: {cp.stdout}\nstderr: {cp.stderr}"
        ) from None


def describe(cp: subprocess.CompletedProcess[str]) -> str:
    return f"command {cp.args!r} exited {cp.returncode}\n--- stdout\n{cp.stdout}\n--- stderr\n{cp.stderr}"


def expect_rc(cp: subprocess.CompletedProcess[str], *codes: int) -> subprocess.CompletedProcess[str]:
    assert cp.returncode in codes, describe(cp)
    return cp


@dataclass
class Repo:
    """A repository made by `bunker init` in an isolated environment."""

    path: Path
    env: dict[str, str]
    id: str
    master_key: Path
    put_key: Path
    base: Path
    client: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    url: str = ""  # a repository URL (s3://...) when it does not live at ``path``

    def run(self, *args: str | os.PathLike[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run bunker with ``--repo`` pointing at this repository (the option goes after the
        command words, as every command accepts it)."""
        env = kw.pop("env", self.env)
        return run_bunker(*args, "--repo", self.url or str(self.path), env=env, **kw)

    def ok(self, *args: str | os.PathLike[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run and require exit 0 (or the codes given as ``rc=``)."""
        codes = kw.pop("rc", (0,))
        if isinstance(codes, int):
            codes = (codes,)
        return expect_rc(self.run(*args, **kw), *codes)

    def backup(self, *paths: str | os.PathLike[str], rc: int | tuple[int, ...] = 0, **kw: Any) -> dict[str, Any]:
        extra = kw.pop("args", ())
        doc: dict[str, Any] = js(self.ok("backup", *paths, "--json", *extra, rc=rc, **kw))
        return doc

    def objects(self, prefix: str) -> list[Path]:
        d = self.path / prefix
        return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def all_files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file())


def init_repo(
    base: Path,
    client: str = "testclient",
    name: str = "repo",
    url: str = "",
    env_extra: Mapping[str, str] | None = None,
    host: str = "",
) -> Repo:
    """`bunker init` a fresh repository under ``base`` (or at ``url``, e.g. an s3:// URL) with its
    own XDG directories; ``env_extra`` is added to the environment of every command. ``host``:
    the host the client's certificate binds (default: this machine's name, as `init` does)."""
    base.mkdir(parents=True, exist_ok=True)
    env = make_env(base, **(env_extra or {}))
    path = base / name
    extra = ("--host", host) if host else ()
    # the master key opens with 1 MiB of Argon2id, not 64: ~5 ms instead of ~0.3 s of CPU for each
    # command that opens it (most of the suite's key work; `init` tests keep the default)
    args = ("--client", client, *extra, "--kdf-memory", "1", "--json")
    cp = expect_rc(run_bunker("init", "--repo", url or str(path), *args, env=env), 0)
    doc = js(cp)
    return Repo(path, env, doc["id"], Path(doc["master_key"]), Path(doc["put_key"]), base, client, url=url)


# ---------------------------------------------------------------------------------------- trees

ODD_NAMES = [
    b"\xff\xfe",  # not UTF-8 at all
    b"with\nnewline",
    b"with space and  two",
    b" leading space",
    "caf\u00e9-\u65e5\u672c".encode(),
    b"latin1-\xe9t\xe9",
    b"-dash-first",
    b".hidden",
    b"tab\there",
    b"back\\slash",
    b"*star?and[brackets]",
]


def make_tree(root: Path | bytes | str, seed: int = 1) -> dict[bytes, bytes]:
    """Create a varied tree under ``root``: files of several sizes (incl. empty), odd non-UTF-8
    names, modes (setuid, sticky, 0600, 0755...), ns mtimes, relative/absolute/dangling symlinks,
    empty and nested directories, a fifo. Returns {relative path: content} of regular files."""
    rng = random.Random(seed)
    r = os.fsencode(os.fspath(root))
    os.makedirs(r, exist_ok=True)
    files: dict[bytes, bytes] = {}

    def mk(rel: bytes, data: bytes, mode: int = 0o644) -> None:
        p = os.path.join(r, rel)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        files[rel] = data

    dirs = [
        b"sub",
        b"sub/deeper",
        b"sub/deeper/deepest",
        b"empty-dir",
        b"nested-empty",
        b"nested-empty/inner",
        b"\xff\xfe-dir",
        b"sticky",
    ]
    for d in dirs:
        os.makedirs(os.path.join(r, d), exist_ok=True)
    mk(b"empty", b"")
    mk(b"sub/empty-too", b"", 0o600)
    mk(b"small.txt", b"hello bunker\n")
    mk(b"random-100k.bin", rng.randbytes(100_000), 0o600)
    mk(b"sub/random-1m.bin", rng.randbytes(1 << 20), 0o640)
    mk(b"sub/deeper/text.txt", b"line\n" * 5000, 0o444)
    mk(b"exec.sh", b"#!/bin/sh\necho hi\n", 0o755)
    mk(b"setuid-bin", b"\x7fELF fake", 0o4755)
    mk(b"sticky/odd-mode", b"x", 0o1604 & 0o7777)
    for i, name in enumerate(ODD_NAMES):
        mk(name, f"content of odd name {i}\n".encode() + rng.randbytes(rng.randrange(0, 5000)))
    mk(b"\xff\xfe-dir/\xfe\xff inner", rng.randbytes(3000))
    mk(b"sub/deeper/deepest/x", rng.randbytes(777))
    # many small files in one directory
    os.makedirs(os.path.join(r, b"many"), exist_ok=True)
    for i in range(40):
        mk(b"many/f%03d" % i, rng.randbytes(rng.randrange(1, 3000)))
    os.symlink(b"small.txt", os.path.join(r, b"link-rel"))
    os.symlink(b"/etc/passwd", os.path.join(r, b"link-abs"))
    os.symlink(b"does/not/exist", os.path.join(r, b"link-dangling"))
    os.symlink(b"../\xff\xfe", os.path.join(r, b"sub/link-to-odd\nname"))
    os.symlink(b"sub", os.path.join(r, b"link-to-dir"))
    os.mkfifo(os.path.join(r, b"fifo"), 0o640)
    # deterministic ns timestamps (with non-zero nanoseconds), files first, directories last
    base_ns = 1_600_000_000_123_456_789
    all_paths: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(r):
        for n in filenames + dirnames:
            all_paths.append(os.path.join(dirpath, n))
    non_dirs = [p for p in all_paths if not stat.S_ISDIR(os.lstat(p).st_mode)]
    dir_paths = [p for p in all_paths if stat.S_ISDIR(os.lstat(p).st_mode)]
    for i, p in enumerate(sorted(non_dirs)):
        t = base_ns + i * 1_000_003_007
        os.utime(p, ns=(t, t), follow_symlinks=False)
    os.chmod(os.path.join(r, b"sticky"), 0o1777)
    os.chmod(os.path.join(r, b"nested-empty/inner"), 0o700)
    for i, p in enumerate(sorted(dir_paths, key=lambda x: -x.count(b"/"))):
        t = base_ns - (i + 1) * 777_777_777
        os.utime(p, ns=(t, t), follow_symlinks=False)
    os.utime(r, ns=(base_ns - 5, base_ns - 5))
    return files


def _kind(mode: int) -> str:
    for test, k in (
        (stat.S_ISREG, "f"),
        (stat.S_ISDIR, "d"),
        (stat.S_ISLNK, "l"),
        (stat.S_ISFIFO, "p"),
        (stat.S_ISCHR, "c"),
        (stat.S_ISBLK, "b"),
        (stat.S_ISSOCK, "s"),
    ):
        if test(mode):
            return k
    return "?"


def snapshot_tree(root: Path | bytes | str, *, mtimes: bool = True, dir_mtimes: bool = True) -> dict[bytes, tuple]:
    """{relative bytes path: (kind, mode, mtime_ns, content digest | link target)} of a tree,
    walked with os.lstat on bytes paths (the root itself has the key b'')."""
    r = os.fsencode(os.fspath(root))
    out: dict[bytes, tuple] = {}

    def one(p: bytes, rel: bytes) -> None:
        st = os.lstat(p)
        k = _kind(st.st_mode)
        extra: Any = None
        if k == "f":
            with open(p, "rb") as f:
                extra = (st.st_size, hashlib.sha256(f.read()).hexdigest())
        elif k == "l":
            extra = os.readlink(p)
        mode = None if k == "l" else stat.S_IMODE(st.st_mode)
        mt = st.st_mtime_ns if (mtimes and (dir_mtimes or k != "d")) else None
        out[rel] = (k, mode, mt, extra)

    one(r, b"")
    for dirpath, dirnames, filenames in os.walk(r):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            one(p, os.path.relpath(p, r))
    return out


def compare_trees(a: Path | bytes | str, b: Path | bytes | str, **kw: Any) -> None:
    """Assert that two trees are identical: same names, kinds, modes, mtime_ns, file contents and
    symlink targets. The failure message lists every difference."""
    ta, tb = snapshot_tree(a, **kw), snapshot_tree(b, **kw)
    problems = []
    for rel in sorted(set(ta) | set(tb)):
        if rel not in tb:
            problems.append(f"missing in restored tree: {rel!r} {ta[rel]}")
        elif rel not in ta:
            problems.append(f"extra in restored tree: {rel!r} {tb[rel]}")
        elif ta[rel] != tb[rel]:
            problems.append(f"differs: {rel!r}: original {ta[rel]} restored {tb[rel]}")
    assert not problems, "trees differ:\n" + "\n".join(problems[:50])


def restored_path(target: Path, source: Path) -> Path:
    """Where `bunker restore --target target` puts ``source`` (the snapshot mirrors absolute
    paths: /a/b/src lands at target/a/b/src)."""
    return target / os.path.abspath(source).lstrip("/")


# ---------------------------------------------------------------------------------------- damage


def flip_bit(path: Path | str, offset: int | None = None, bit: int = 0) -> int:
    """Flip one bit of a file in place (``offset`` defaults to the middle; negative counts from
    the end). Returns the absolute offset flipped."""
    data = bytearray(Path(path).read_bytes())
    assert data, f"{path} is empty"
    if offset is None:
        offset = len(data) // 2
    if offset < 0:
        offset += len(data)
    data[offset] ^= 1 << bit
    Path(path).write_bytes(bytes(data))
    return offset


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def rename_to_hash(path: Path) -> Path:
    """Rename a (modified) object to the BLAKE3 of its bytes, so its name checks out again."""
    new = path.with_name(b3(path.read_bytes()))
    path.rename(new)
    return new


def obj_name(path: Path) -> str:
    """``prefix/leaf`` of an object file of a local repository."""
    return f"{path.parent.name}/{path.name}"


def tree_contains(haystack_root: Path, needles: Iterable[bytes]) -> list[tuple[str, bytes]]:
    """Every (file, needle) where a needle occurs in the raw bytes of a file below the root."""
    found = []
    needles = list(needles)
    for p in sorted(haystack_root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            for n in needles:
                if n in data:
                    found.append((str(p), n))
    return found


# ---------------------------------------------------------------------------------------- S3 (moto)

S3_REGION = "us-east-1"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bunker-test-key", "AWS_SECRET_ACCESS_KEY": "bunker-test-secret"}
# AWS settings of the developer's shell that must never reach a test
AWS_SCRUB = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "BUNKER_STORAGE_RETRIES",
    "BUNKER_STORAGE_RETRY_DELAY",
    "BUNKER_STORAGE_TIMEOUT",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """An S3 server on 127.0.0.1 with one bucket: a moto process (``proc``), or a Ceph RADOS
    Gateway cluster started by ceph-rgw.sh in ``workdir`` (start_rgw; ``kind`` "rgw")."""

    endpoint: str
    bucket: str
    proc: subprocess.Popen[bytes] | None
    log: Path
    credentials: dict[str, str] = field(default_factory=lambda: dict(S3_CREDENTIALS))
    kind: str = "moto"
    workdir: Path | None = None

    def url(self, prefix: str, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"endpoint": self.endpoint, "region": S3_REGION, **params}.items())
        return f"s3://{self.bucket}/{prefix}?{query}"

    def env(self, **extra: str) -> dict[str, str]:
        """Credentials, and a short retry budget (a test must not wait a minute for a refusal)."""
        return {**self.credentials, "BUNKER_STORAGE_RETRIES": "2", "BUNKER_STORAGE_RETRY_DELAY": "0.05", **extra}

    def requests(self) -> list[str]:
        """The request lines the server logged so far (``PUT /bucket/key HTTP/1.1" 200``)."""
        text = self.log.read_text("utf-8", "replace")
        if self.kind == "rgw":
            # radosgw's access lines (log level 1): `... beast: 0x..: 127.0.0.1 - tester [time]
            # "PUT /bucket/key HTTP/1.1" 412 247 - "user agent" - latency=...`; cut at the agent
            return [
                line.split('"', 1)[1].split(' "', 1)[0]
                for line in text.splitlines()
                if " beast: " in line and line.count('"') >= 2
            ]
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # werkzeug's colours
        return [line.split('"', 1)[1] for line in text.splitlines() if line.count('"') >= 2]

    def pids(self) -> list[int]:
        """The server's processes (RGW: monitor, OSD and radosgw)."""
        if self.proc is not None:
            return [self.proc.pid]
        assert self.workdir is not None
        return [int(p.read_text()) for p in sorted((self.workdir / "run").glob("*.pid")) if p.read_text().strip()]

    def stop(self) -> None:
        if self.proc is None:
            assert self.workdir is not None
            subprocess.run([str(RGW_SCRIPT), "stop", str(self.workdir)], capture_output=True, timeout=60, check=False)
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _http(method: str, url: str, timeout: float = 2.0) -> int:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def start_moto(workdir: Path, bucket: str = "bunker-test", *, check_credentials: bool = False) -> S3Server:
    """Start `python -m moto.server` on a free port, wait until it answers, create ``bucket`` with
    a plain S3 CreateBucket request. With ``check_credentials``, moto checks every request's
    signature against the keys its IAM knows (none: every key is refused) and no bucket is made."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in AWS_SCRUB}
    env.update(S3_CREDENTIALS, AWS_DEFAULT_REGION=S3_REGION)
    if check_credentials:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    last = ""
    for _ in range(3):
        port = free_port()
        log = workdir / f"moto-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=workdir,
            )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                _http("GET", endpoint + "/", timeout=1.0)
                break
            except OSError:
                time.sleep(0.1)
        if proc.poll() is None and time.monotonic() < deadline:
            if check_credentials:
                return S3Server(endpoint, bucket, proc, log)
            status = _http("PUT", f"{endpoint}/{bucket}", timeout=10)
            assert status == 200, f"moto refused to create bucket {bucket}: HTTP {status}"
            return S3Server(endpoint, bucket, proc, log)
        last = log.read_text("utf-8", "replace")[-2000:]
        proc.kill()
        proc.wait()
    raise AssertionError(f"the moto S3 server did not start:\n{last}")


# ------------------------------------------------------------------- S3 (Ceph RADOS Gateway)

# A real S3 implementation: a throw-away one-node Ceph cluster (monitor, one in-memory OSD,
# radosgw) on loopback, started by the launcher that CI keeps beside the repository
# (services/ceph-rgw.sh in the folder `shared` beside it; ~2 s to start). docs/reliability.md says
# what it adds to moto.
RGW_SCRIPT = HERE.parent.parent / "shared" / "services" / "ceph-rgw.sh"
RGW_INSTALL = "apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw ceph-common"
_RGW_TOOLS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
_RGW_PORTS = 10  # the launcher uses PORT (S3), PORT+1 (monitor), PORT+2..PORT+9 (OSD)


def rgw_unavailable() -> str | None:
    """Why no RADOS Gateway can be started here (what to install, where), or None."""
    where = (
        f"the Ceph RGW tests need the launcher {RGW_SCRIPT} (services/ceph-rgw.sh in the folder `shared` "
        f"beside the repository, as in CI) and Ceph's packages (as root: `{RGW_INSTALL}`; scripts/test installs "
        "them when the launcher is there)"
    )
    if not RGW_SCRIPT.is_file():
        return f"{where}: the launcher is missing"
    missing = [t for t in _RGW_TOOLS if shutil.which(t) is None]
    if missing:
        return f"{where}: Ceph is not installed (no {', '.join(missing)})"
    return None


def _port_block(n: int) -> int:
    """A port P with P..P+n-1 free on 127.0.0.1 right now, below the kernel's range for outgoing
    connections (so that no client socket takes one before the server binds it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        base = rng.randrange(max(1024, low - 16000), low - n)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError(f"found no {n} consecutive free ports on 127.0.0.1")


def _running(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _rgw_restart_nodelay(server: S3Server, port: int) -> None:
    """Replace the launcher's radosgw by one whose HTTP frontend sets TCP_NODELAY (beast's
    ``tcp_nodelay=1``; Ceph 16's default is off, and the launcher has no knob for it). Without
    it a response whose body is written after its headers and fits in one segment waits for
    the client's delayed ACK: ~40 ms per GET of a small object or range and per refused
    conditional PUT (measured: 45 ms against 1 ms; docs/reliability.md). The cluster and its
    S3 user stay; this costs ~2 s."""
    assert server.workdir is not None
    d = server.workdir
    pid_file = d / "run" / "client.rgw.pid"
    pid = int(pid_file.read_text())
    # a clean stop (~2 s) drops its watches on the cluster's control objects; a killed one's
    # stay until they time out (30 s), and the next radosgw waits for them
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # radosgw 16 can hang when stopped soon after its start
    frontends = f"beast endpoint=127.0.0.1:{port} tcp_nodelay=1"
    # detached as the launcher does it (its stop finds the process by this pid file)
    cp = subprocess.run(
        ["sh", "-c", 'setsid "$@" </dev/null >>"$LOG" 2>&1 & echo $!', "sh", "radosgw", "-c", str(d / "ceph.conf")]
        + ["-n", "client.rgw", "--rgw-frontends", frontends, "-f"],
        env={**os.environ, "LOG": str(d / "log" / "daemons.log")},
        capture_output=True,
        text=True,
        check=True,
    )
    pid_file.write_text(cp.stdout.strip() + "\n")
    deadline = time.monotonic() + 60
    while True:
        try:
            if _http("GET", server.endpoint + "/", timeout=1.0) == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"radosgw did not come back with tcp_nodelay (see {d / 'log'})"
        time.sleep(0.05)


def start_rgw(workdir: Path, bucket: str = "bunker-test", *, nodelay: bool = True) -> S3Server:
    """Start a RADOS Gateway cluster in ``workdir`` on free ports (the launcher refuses taken
    ones: then other ports), create ``bucket`` with a signed CreateBucket request. ``nodelay``:
    with TCP_NODELAY on its HTTP frontend, as a deployment should have it (_rgw_restart_nodelay)."""
    why = rgw_unavailable()
    assert why is None, why
    env = {k: v for k, v in os.environ.items() if k not in AWS_SCRUB}
    last = ""
    for _ in range(3):
        port = _port_block(_RGW_PORTS)
        cp = subprocess.run(
            [str(RGW_SCRIPT), "start", str(workdir), str(port)],
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        )
        if cp.returncode != 0:
            last = cp.stderr[-3000:]  # the launcher stopped what it started
            continue
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in cp.stdout.splitlines() if line.startswith("export ")
        )
        server = S3Server(
            exports["AWS_ENDPOINT_URL"],
            bucket,
            None,
            workdir / "log" / "client.rgw.log",
            credentials={k: exports[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
            kind="rgw",
            workdir=workdir,
        )
        try:
            if nodelay:
                _rgw_restart_nodelay(server, port)
            import boto3  # moto's dependency (the test extras)

            keys = server.credentials
            client = boto3.client(
                "s3",
                endpoint_url=server.endpoint,
                region_name=S3_REGION,
                aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
            )
            client.create_bucket(Bucket=bucket)
        except BaseException:
            server.stop()
            raise
        return server
    raise AssertionError(f"the Ceph RADOS Gateway did not start:\n{last}")


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port`` whose first ``faults`` connections go
    wrong, the way networks and busy object stores do: ``drop`` closes the connection at once,
    ``busy`` answers HTTP 503 SlowDown, ``stall`` accepts and never answers. Later connections are
    forwarded untouched. ``spoiled`` counts the connections that went wrong."""

    def __init__(self, target_port: int, faults: int, mode: str = "drop") -> None:
        assert mode in ("drop", "busy", "stall")
        self.target_port, self.faults, self.mode = target_port, faults, mode
        self.spoiled = 0
        self._held: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self.spoiled < self.faults:
                self.spoiled += 1
                self._spoil(conn)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _spoil(self, conn: socket.socket) -> None:
        if self.mode == "stall":
            self._held.append(conn)  # never answered, closed with the proxy
            return
        if self.mode == "busy":
            conn.settimeout(5)
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    head += piece
                body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                conn.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
            except OSError:
                pass
        conn.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for c in self._held:
            c.close()


# ------------------------------------------------------------------------------- WebDAV (wsgidav)

WEBDAV_USER, WEBDAV_PASSWORD = "bunker", "bunker-test-password"


@dataclass
class WebDavServer:
    """A wsgidav server process on 127.0.0.1 (basic auth) serving the directory ``root`` at
    ``/dav``; tests use prefixes below it."""

    endpoint: str  # http://127.0.0.1:PORT
    root: Path
    proc: subprocess.Popen[bytes]
    log: Path
    bucket: str = "dav"  # the first path segment, like an S3 bucket in request lines

    def url(self, prefix: str) -> str:
        return f"webdav+http://{WEBDAV_USER}@{self.endpoint.removeprefix('http://')}/{self.bucket}/{prefix}"

    def env(self, **extra: str) -> dict[str, str]:
        """The password, and a short retry budget (a test must not wait a minute for a refusal)."""
        return {
            "BUNKER_WEBDAV_PASSWORD": WEBDAV_PASSWORD,
            "BUNKER_STORAGE_RETRIES": "2",
            "BUNKER_STORAGE_RETRY_DELAY": "0.05",
            **extra,
        }

    def requests(self) -> list[str]:
        """The requests logged so far, as ``METHOD PATH STATUS`` (MOVE: ``MOVE PATH->DEST STATUS``)."""
        out = []
        for line in self.log.read_text("utf-8", "replace").splitlines():
            m = re.search(r'"([A-Z]+) ([^"]*)"(.*)-> (\d{3})', line)
            if m:
                dest = re.search(r'dest="[a-z]+://[^/]*([^"]*)"', m.group(3))
                path = m.group(2) + ("->" + dest.group(1) if dest else "")
                out.append(f"{m.group(1)} {path} {m.group(4)}")
        return out

    def stop(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_http(proc: subprocess.Popen[bytes], url: str, seconds: float) -> bool:
    """Whether ``url`` answers (any HTTP status) before ``proc`` dies or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            _http("GET", url, timeout=1.0)
            return True
        except OSError:
            time.sleep(0.05)
    return False


def start_wsgidav(workdir: Path) -> WebDavServer:
    """Start wsgidav (cheroot, filesystem provider, basic auth for WEBDAV_USER) on a free port."""
    root = workdir / "dav-root"
    root.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(3):
        port = free_port()
        config = {
            "host": "127.0.0.1",
            "port": port,
            "server": "cheroot",
            "provider_mapping": {"/dav": str(root)},
            "http_authenticator": {"accept_basic": True, "accept_digest": False, "default_to_digest": False},
            "simple_dc": {"user_mapping": {"*": {WEBDAV_USER: {"password": WEBDAV_PASSWORD}}}},
            "dir_browser": {"enable": False},
            "verbose": 3,  # one line per request
            "suppress_version_info": True,
        }
        cfg = workdir / f"wsgidav-{port}.json"
        cfg.write_text(json.dumps(config))
        log = workdir / f"wsgidav-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "wsgidav.server.server_cli", "--config", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
        endpoint = f"http://127.0.0.1:{port}"
        if _wait_http(proc, endpoint + "/", 30):
            return WebDavServer(endpoint, root, proc, log)
        last = log.read_text("utf-8", "replace")[-2000:]
        _stop(proc)
    raise AssertionError(f"the wsgidav WebDAV server did not start:\n{last}")


# --------------------------------------------------------------------------- Azure Blob (Azurite)

AZURITE_DIR = HERE.parent / ".cache" / "azurite"  # scripts/test installs it there (npm)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURE_SCRUB = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "BUNKER_STORAGE_RETRIES",
    "BUNKER_STORAGE_RETRY_DELAY",
    "BUNKER_STORAGE_TIMEOUT",
)


def azurite_command() -> str | None:
    """The azurite-blob command: the project-local npm install, else one on PATH."""
    local = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if os.access(local, os.X_OK) else shutil.which("azurite-blob")


@dataclass
class AzuriteServer:
    """An Azurite blob service process on 127.0.0.1 (in memory) with one container."""

    endpoint: str  # http://127.0.0.1:PORT/devstoreaccount1
    bucket: str  # the container
    proc: subprocess.Popen[bytes]
    log: Path

    def url(self, prefix: str) -> str:
        return f"azblob://{self.bucket}/{prefix}"

    def env(self, **extra: str) -> dict[str, str]:
        """The development account's connection string, and a short retry budget."""
        conn = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )
        return {
            "AZURE_STORAGE_CONNECTION_STRING": conn,
            "BUNKER_STORAGE_RETRIES": "2",
            "BUNKER_STORAGE_RETRY_DELAY": "0.05",
            **extra,
        }

    def requests(self) -> list[str]:
        """The request lines logged so far (``PUT /devstoreaccount1/container/key HTTP/1.1" 201``)."""
        text = self.log.read_text("utf-8", "replace")
        return [line.split('"', 1)[1] for line in text.splitlines() if line.count('"') >= 2]

    def stop(self) -> None:
        _stop(self.proc)


def _azure_create_container(endpoint: str, container: str) -> int:
    """Create Blob Container, signed with the account key (Shared Key): OpenDAL makes none."""
    import base64
    import email.utils
    import hmac

    date = email.utils.formatdate(usegmt=True)
    version = "2021-08-06"
    ctype = "application/octet-stream"
    to_sign = (
        f"PUT\n\n\n\n\n{ctype}\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n"
        f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container"
    )
    sig = base64.b64encode(hmac.new(base64.b64decode(AZURITE_KEY), to_sign.encode(), hashlib.sha256).digest())
    req = urllib.request.Request(
        f"{endpoint}/{container}?restype=container",
        method="PUT",
        data=b"",
        headers={
            "x-ms-date": date,
            "x-ms-version": version,
            "Content-Type": ctype,
            "Authorization": f"SharedKey {AZURITE_ACCOUNT}:{sig.decode()}",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def start_azurite(workdir: Path, container: str = "bunker-test") -> AzuriteServer:
    """Start azurite-blob on a free port (in memory, no telemetry), create ``container``."""
    cmd = azurite_command()
    assert cmd, "Azurite is not installed"
    workdir.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(3):
        port = free_port()
        log = workdir / f"azurite-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [cmd, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence"]
                + ["--skipApiVersionCheck", "--disableTelemetry"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
        endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        if _wait_http(proc, f"http://127.0.0.1:{port}/", 60):
            status = _azure_create_container(endpoint, container)
            assert status == 201, f"Azurite refused to create container {container}: HTTP {status}"
            return AzuriteServer(endpoint, container, proc, log)
        last = log.read_text("utf-8", "replace")[-2000:]
        _stop(proc)
    raise AssertionError(f"Azurite did not start:\n{last}")


# ---------------------------------------------------------------------------------- sshd (sftp)

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"  # Debian's; its log shows each request (fsync, rename...)
SFTP_LOG_USER = "bunker-sftp-test"  # logs in with /bin/sh: no shell startup file runs before sftp-server
# ssh settings of the developer's shell that must never reach a test
SSH_SCRUB = ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "BUNKER_SSH_IDENTITY", "BUNKER_SSH_KNOWN_HOSTS")


def ssh_keygen(path: Path) -> Path:
    """A new ed25519 key pair without passphrase at ``path`` (and ``path``.pub)."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def fingerprint(pub: Path) -> str:
    """``SHA256:...`` of a public key file, as ssh-keygen shows it."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True, text=True).stdout
    return out.split()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd forks one process per connection, and more below it)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@dataclass
class SshServer:
    """A real OpenSSH sshd on 127.0.0.1 (started as root; logins with a generated key only), with
    the known_hosts entry and the client key that trust it."""

    workdir: Path
    port: int
    config: Path
    host_key: Path
    client_key: Path
    known_hosts: Path
    log: Path
    user: str = "root"
    sftp_log: Path | None = None  # the external sftp-server's request log (see start_sshd)
    proc: subprocess.Popen[bytes] | None = None

    def url(self, path: Path | str) -> str:
        return f"sftp://{self.user}@127.0.0.1:{self.port}{path}"

    def env(self, **extra: str) -> dict[str, str]:
        """The client key and known_hosts through bunker's variables, and a short retry budget."""
        return {
            "BUNKER_SSH_IDENTITY": str(self.client_key),
            "BUNKER_SSH_KNOWN_HOSTS": str(self.known_hosts),
            "BUNKER_STORAGE_RETRIES": "2",
            "BUNKER_STORAGE_RETRY_DELAY": "0.05",
            **extra,
        }

    def install_home(self, home: Path) -> None:
        """Put the client key and the known_hosts entry where ssh (and asyncssh) look by default."""
        ssh = home / ".ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(self.client_key, ssh / "id_ed25519")
        os.chmod(ssh / "id_ed25519", 0o600)
        shutil.copyfile(self.client_key.with_suffix(".pub"), ssh / "id_ed25519.pub")
        shutil.copyfile(self.known_hosts, ssh / "known_hosts")

    def fingerprint(self) -> str:
        return fingerprint(self.host_key.with_suffix(".pub"))

    def start(self) -> None:
        """Start (or restart) sshd on this server's port; wait until it greets."""
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise OSError(f"sshd did not start on port {self.port}:\n" + self.log.read_text("utf-8", "replace")[-2000:])

    def drop_connections(self) -> int:
        """Kill the processes serving the current connections (the listener stays): to the client,
        every connection drops at once. Returns how many processes were killed."""
        assert self.proc is not None
        pids = _descendants(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def freeze_connections(self) -> list[int]:
        """Stop (SIGSTOP) the processes serving the current connections: they hang without closing
        anything, as a stuck server does. Kill them with drop_connections()."""
        assert self.proc is not None
        pids = _descendants(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        return pids

    def stop(self) -> None:
        """Kill the listener and every connection's processes: the server is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        # stopped first, so that it forks no new connection (which would hold the listening socket)
        os.kill(self.proc.pid, signal.SIGSTOP)
        for pid in _descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()


def _sftp_log_user() -> tuple[int, int]:
    """The account that logs in for the request-log server (made once: a system account with
    /bin/sh, unlocked for key logins, no home)."""
    try:
        pw = pwd.getpwnam(SFTP_LOG_USER)
    except KeyError:
        home = ["--no-create-home", "--home-dir", "/nonexistent"]
        cmd = ["useradd", "--system", *home, "--shell", "/bin/sh", SFTP_LOG_USER]
        subprocess.run(cmd, check=True, capture_output=True)
        subprocess.run(["usermod", "-p", "*", SFTP_LOG_USER], check=True, capture_output=True)  # not locked
        pw = pwd.getpwnam(SFTP_LOG_USER)
    return pw.pw_uid, pw.pw_gid


def start_sshd(workdir: Path, *, request_log: bool = False) -> SshServer:
    """Generate a host key and a client key, write an sshd_config that listens on a free port of
    127.0.0.1 and accepts only that client key, start `sshd -D` and wait for it.

    Logins are as root with sshd's internal-sftp (no shell runs: root's shell startup files are
    none of the tests' business). With ``request_log``, the login is SFTP_LOG_USER (shell /bin/sh)
    running Debian's sftp-server, whose log of every request is ``sftp_log``; ``workdir`` must then
    be reachable for that user, and the repository directory must belong to it (``chown_to_user``).
    """
    assert os.geteuid() == 0, "sshd must run as root"
    assert os.access(SSHD, os.X_OK), f"{SSHD} is missing: install Debian's openssh-server (bash scripts/test does)"
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = ssh_keygen(workdir / "host_ed25519")
    client_key = ssh_keygen(workdir / "client_ed25519")
    authorized = workdir / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized)
    os.chmod(authorized, 0o644)
    log = workdir / "sshd.log"
    user, sftp_log, subsystem = "root", None, "internal-sftp"
    if request_log:
        uid, gid = _sftp_log_user()
        user, sftp_log = SFTP_LOG_USER, workdir / "sftp.log"
        sftp_log.touch()
        os.chown(sftp_log, uid, gid)
        # an external subsystem runs through the user's shell: its log goes to a file
        subsystem = f"{SFTP_SERVER} -e -l VERBOSE 2>>{sftp_log}"
    last: OSError | None = None
    for _ in range(3):
        port = free_port()
        config = workdir / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{port}\n"
            f"HostKey {host_key}\n"
            "PidFile none\n"
            f"AuthorizedKeysFile {authorized}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "LogLevel VERBOSE\n"
            "MaxStartups 100:30:200\n"
            f"Subsystem sftp {subsystem}\n"
        )
        known_hosts = workdir / "known_hosts"
        key_type, key_b64 = host_key.with_suffix(".pub").read_text().split()[:2]
        known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_b64}\n")
        server = SshServer(workdir, port, config, host_key, client_key, known_hosts, log, user, sftp_log)
        try:
            server.start()
            return server
        except OSError as exc:  # the port was taken meanwhile
            last = exc
    raise AssertionError(f"sshd did not start: {last}")


# A ProxyCommand that appends its environment (one JSON line per connection) to a file, then
# relays the connection to 127.0.0.1:PORT: what a ProxyCommand (or anything ssh runs) can see.
_ENV_DUMPING_PROXY = """
import json, os, socket, sys, threading
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(dict(os.environ)) + "\\n")
s = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    os.write(1, data)
"""


def env_dumping_proxy(workdir: Path, dump: Path) -> str:
    """The ssh_config ProxyCommand line (``%p``: the port) of a relay that records its
    environment in ``dump`` (read it with ``read_env_dumps``)."""
    script = workdir / "env_dumping_proxy.py"
    script.write_text(_ENV_DUMPING_PROXY)
    return f"{sys.executable} {script} {dump} %p"


def read_env_dumps(dump: Path) -> list[dict[str, str]]:
    """The environments the ProxyCommand of ``env_dumping_proxy`` saw, one per connection."""
    return [json.loads(line) for line in dump.read_text().splitlines() if line.strip()]


def ssh_with_config(workdir: Path, config: str) -> str:
    """A directory holding an ``ssh`` that is OpenSSH's reading ``config`` as the user's
    ~/.ssh/config (OpenSSH takes ~ from the passwd entry, which a test cannot give it): put it
    first on PATH."""
    real = shutil.which("ssh")
    assert real, "the OpenSSH client is missing"
    bindir = workdir / "ssh-bin"
    bindir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "ssh_config"
    cfg.write_text(config)
    wrapper = bindir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {real} -F {cfg} "$@"\n')
    wrapper.chmod(0o755)
    return str(bindir)


def chown_to_user(path: Path, user: str) -> None:
    """Make ``path`` (a directory, made if needed) belong to ``user``."""
    pw = pwd.getpwnam(user)
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, pw.pw_uid, pw.pw_gid)


# ------------------------------------------------------------------ filesystem features and tools


def xattrs_supported(d: Path) -> bool:
    """Whether the filesystem of directory ``d`` takes user.* extended attributes."""
    p = d / ".probe"
    p.write_bytes(b"")
    try:
        os.setxattr(p, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        p.unlink()


def run_ok(cmd: list[str]) -> bool:
    """Whether ``cmd`` exists and exits 0 (output discarded)."""
    return shutil.which(cmd[0]) is not None and subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def getfacl(p: Path) -> list[str]:
    """`getfacl -n` of ``p`` without its comment lines."""
    out = subprocess.run(["getfacl", "-n", "-p", str(p)], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line and not line.startswith("#")]


def lsattr(p: Path) -> str:
    """The inode flag letters `lsattr -d` shows for ``p``."""
    return subprocess.run(["lsattr", "-d", str(p)], capture_output=True, text=True, check=True).stdout.split()[0]


def check_children_never_see_the_passphrase(url: str, env: dict[str, str], dump: Path, tmp_path: Path) -> None:
    """init, backup and restore (whose worker processes connect too) through a ProxyCommand that
    records its environment in ``dump`` (env_dumping_proxy; ``env`` sets PROXY_TEST_MARK=seen and
    BUNKER_NEW_PASSPHRASE="another secret phrase"): every connection went through it, and neither
    passphrase variable, nor the passphrase's text, ever reached it."""
    cp = run_bunker("init", "--repo", url, "--client", "c", env=env, timeout=60)
    assert cp.returncode == 0, describe(cp)
    src = tmp_path / "src"
    make_tree(src)
    cp = run_bunker("backup", src, "--repo", url, env=env, timeout=120)
    assert cp.returncode in (0, 1), describe(cp)
    cp = run_bunker("restore", "latest", "--target", tmp_path / "t", "--repo", url, env=env, timeout=120)
    assert cp.returncode == 0, describe(cp)
    compare_trees(src, restored_path(tmp_path / "t", src))
    shutil.rmtree(tmp_path / "t")
    seen = read_env_dumps(dump)
    assert len(seen) >= 3 and all(e.get("PROXY_TEST_MARK") == "seen" for e in seen)
    for e in seen:
        assert "BUNKER_PASSPHRASE" not in e and "BUNKER_NEW_PASSPHRASE" not in e, sorted(e)
    text = dump.read_text()
    assert env["BUNKER_PASSPHRASE"] not in text and "another secret phrase" not in text


def resign_snapshot(repo_path: Path, snapshot: str, put: Any, **changes: Any) -> str:
    """What a put-key holder can do with a snapshot it did not write: wrap its body in a new
    envelope signed with ``put`` (a loaded PutKey), the envelope's fields replaced by
    ``changes`` (``cert`` and ``client`` default to ``put``'s). Written into the repository at
    ``repo_path``; returns the new snapshot's id."""
    import dataclasses as dc

    from bunker.repo.certs import parse_certificate
    from bunker.repo.objects import name_for
    from bunker.repo.snapshot import make_snapshot, parse_snapshot

    tmpl = parse_snapshot((repo_path / "snapshots" / snapshot).read_bytes())
    cert = parse_certificate(put.certificate, put.master_verify, put.repo_id)
    fields = {"cert": name_for("clients", put.certificate), "client": cert.client, **changes}
    data = make_snapshot(dc.replace(tmpl.env, **fields), tmpl.body_ct, put.client_key)
    name = name_for("snapshots", data).split("/", 1)[1]
    (repo_path / "snapshots" / name).write_bytes(data)
    return name


@contextlib.contextmanager
def loop_ext4(size: int, prefix: str, without_root: str) -> Iterator[Path]:
    """A small ext4 filesystem of ``size`` bytes (no blocks reserved for root), loop-mounted
    for the block and removed afterwards: a real disk that fills. Skips the test with
    ``without_root`` (what covers the case otherwise) when not root or without mkfs.ext4."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip(f"needs root and mkfs.ext4 to mount a small filesystem ({without_root})")
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    img, mnt = base / "ext4.img", base / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size)
    mounted = False
    try:
        cp = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], capture_output=True, check=False)
        if cp.returncode == 0:
            cp = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, check=False)
        if cp.returncode != 0:
            pytest.skip(f"mounting an ext4 image failed: {cp.stderr.decode().strip()}")
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def serve_socket(sock: Path, repo_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`bunker serve --socket` on ``repo_path`` as its own process, for the block (ready once
    its socket exists); terminated afterwards."""
    assert BUNKER
    server = subprocess.Popen(
        [BUNKER, "serve", "--socket", str(sock), "--repo", str(repo_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        yield server
    finally:
        server.terminate()
        server.wait(10)


def processes_started(repo: Repo, *args: str | os.PathLike[str]) -> int:
    """Run ``bunker ARGS --repo REPO`` (it must succeed) and count the processes it started
    (a pool's forkserver and what that forks live until the command ends, so polling sees them)."""
    proc = subprocess.Popen(
        [BUNKER, *(os.fspath(a) for a in args), "--repo", str(repo.path)],
        env=repo.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen: set[int] = set()
    while proc.poll() is None:
        seen.update(_descendants(proc.pid))
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return len(seen)
