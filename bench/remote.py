#!/usr/bin/env python3
"""Backup and restore of the `mixed` corpus over each storage backend, against the local one.

    python3 bench/remote.py [--corpus DIR] [--backends local,s3,rgw] [--rgw] [--reps N] [--out DIR]
                            [--split-cores]

The S3 server is a real `moto` server process on 127.0.0.1 (started here, as the tests do), so
it shares the machine's cores with bunker: the figures are what loopback allows, not what a real
object store gives. `rgw` is a real S3 implementation, Ceph's RADOS Gateway on a throw-away
one-node cluster (in-memory OSD) on loopback, started as the tests start it (with TCP_NODELAY);
it is in the default list where ../shared/services/ceph-rgw.sh and Ceph are installed (else the
script says what is missing), and `--rgw` asks for it explicitly. Per backend and repetition:
`bunker init`, a timed first `backup` of the corpus, a timed `restore` of it into an empty
directory (checked with `diff -r`), then the repository is deleted, so that every repetition
meets a server as empty as the first did. Prints MB/s (corpus bytes over wall seconds), the ratio
to the local backend (issue 4's targets: S3 backup and restore >= 0.7x local, sftp >= 0.3x; issue
14's for RGW: backup >= 0.8x, restore >= 0.7x), the CPU time of bunker's whole process tree (run
under reap.py) and of the S3 server (RGW: monitor, OSD and radosgw together), and from them the
least time the op can take while both share this machine's cores, and the best ratio to local
that allows. With --split-cores bunker runs on the first half of the cores and the S3 servers
(every thread) on the rest, so the client's loss against a local repository is measured without
the server taking its CPU, as with an object store on other machines. The sftp variant starts a
real OpenSSH sshd on 127.0.0.1 (as the tests do; needs root). Writes `remote.csv` into --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import S3_REGION, SSH_SCRUB, S3Server, rgw_unavailable, start_moto, start_rgw, start_sshd  # noqa: E402 - the tests' own launchers

DEFAULT_CORPUS = Path(os.environ.get("BENCH_WORK", "/dev/shm/bunker-bench")) / "corpus-mixed-s1.0" / "mixed"


def corpus_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def proc_cpu(pids: list[int] | None) -> float:
    """CPU seconds (user + system) processes have used so far (0 when there are none)."""
    total = 0.0
    for pid in pids or []:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def drop_s3_repo(srv: S3Server, prefix: str) -> None:
    """Delete a repetition's repository from the S3 server, so that every repetition meets a
    server holding as much as the first did: Ceph's memstore OSD slowed down as repositories
    piled up in it (a restore from RGW took 2.3-2.6 s while it held three copies of the corpus,
    3.6-4.3 s from the fourth on, with the same requests)."""
    import opendal

    op = opendal.Operator(
        "s3",
        bucket=srv.bucket,
        endpoint=srv.endpoint,
        region=S3_REGION,
        access_key_id=srv.credentials["AWS_ACCESS_KEY_ID"],
        secret_access_key=srv.credentials["AWS_SECRET_ACCESS_KEY"],
        root=f"/{prefix}/",
    )
    op.remove_all("/")


def pin(pids: list[int], cpus: set[int]) -> None:
    """Put every thread of ``pids`` on ``cpus`` (threads they start later inherit it)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)


def run(
    cmd: list[str], env: dict[str, str], cwd: Path | None = None, cpus: set[int] | None = None
) -> tuple[float, float]:
    """Run a bunker command under reap.py (on ``cpus`` only, when given); its wall time and the
    CPU time of its whole process tree (its forkserver workers included: reap.py waits for them)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cp = subprocess.run(
        [sys.executable, "-S", str(HERE / "reap.py"), *cmd],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cp.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({cp.returncode}):\n{cp.stderr[-2000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    default = "local,s3,sftp" if os.geteuid() == 0 else "local,s3"
    ap.add_argument("--backends", default=default + ("" if rgw_unavailable() else ",rgw"))
    ap.add_argument("--rgw", action="store_true", help="add rgw to --backends (an error where it cannot start)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--bunker", default=shutil.which("bunker") or "bunker")
    ap.add_argument(
        "--split-cores",
        action="store_true",
        help="bunker (local runs too) on the first half of the cores, the S3 servers on the rest: "
        "the client measured as if its server ran elsewhere",
    )
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    client_cpus = server_cpus = None
    if args.split_cores:
        if len(cores) < 2:
            raise SystemExit("--split-cores needs at least 2 cores")
        client_cpus, server_cpus = set(cores[: len(cores) // 2]), set(cores[len(cores) // 2 :])
        if not set(args.backends.split(",")) <= {"local", "s3", "rgw"}:
            raise SystemExit("--split-cores pins S3 servers only: use it with --backends of local, s3 and rgw")
    if not args.corpus.is_dir():
        raise SystemExit(f"no corpus at {args.corpus}: build it with bench/run.sh (or pass --corpus)")
    backends = list(dict.fromkeys(args.backends.split(",") + (["rgw"] if args.rgw else [])))
    if "rgw" in backends and rgw_unavailable():
        raise SystemExit(f"rgw: {rgw_unavailable()}")
    if "rgw" not in backends:
        print(f"(no rgw: {rgw_unavailable() or 'not asked for'})")
    size = corpus_bytes(args.corpus)
    work = Path(tempfile.mkdtemp(prefix="bunker-remote-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    servers = []
    rows: list[tuple[str, int, str, float, float, float]] = []
    try:
        urls: dict[str, tuple[str, dict[str, str]]] = {}
        s3_server: dict[str, S3Server] = {}
        for b in backends:
            if b == "local":
                urls[b] = (str(work / "repo-local"), {})
            elif b in ("s3", "rgw"):
                srv = (
                    start_moto(work / "moto", bucket="bench") if b == "s3" else start_rgw(work / "rgw", bucket="bench")
                )
                servers.append(srv)
                s3_server[b] = srv
                if server_cpus:
                    pin(srv.pids(), server_cpus)
                urls[b] = (srv.url("repo"), {k: v for k, v in srv.env().items() if not k.startswith("BUNKER_STORAGE")})
            elif b == "sftp":  # needs root: sshd logs in as root with a generated key
                ssh = start_sshd(work / "sshd")
                servers.append(ssh)
                urls[b] = (
                    ssh.url(work / "repo-sftp"),
                    {k: v for k, v in ssh.env().items() if k.startswith("BUNKER_SSH")},
                )
            elif b == "ssh":  # `bunker serve --stdio` through the same kind of sshd (needs root)
                ssh = start_sshd(work / "sshd-serve")
                servers.append(ssh)
                extra = {k: v for k, v in ssh.env().items() if k.startswith("BUNKER_SSH")}
                urls[b] = (
                    f"ssh://root@127.0.0.1:{ssh.port}{work / 'repo-ssh'}",
                    {**extra, "BUNKER_REMOTE_PATH": args.bunker},
                )
            else:
                raise SystemExit(f"unknown backend {b!r} (local, s3, rgw, sftp, ssh)")
        for rep in range(1, args.reps + 1):
            for b, (url, extra) in urls.items():
                home = work / f"home-{b}-{rep}"
                env = {
                    **{k: v for k, v in os.environ.items() if k not in SSH_SCRUB},
                    **extra,
                    "HOME": str(home),
                    "XDG_CONFIG_HOME": str(home / "config"),
                    "XDG_DATA_HOME": str(home / "data"),
                    "XDG_STATE_HOME": str(home / "state"),
                    "XDG_CACHE_HOME": str(home / "cache"),
                    "BUNKER_PASSPHRASE": "bench",
                }
                repo_url = url.replace("/repo?", f"/repo-{rep}?") if b in ("s3", "rgw") else f"{url}-{rep}"
                run([args.bunker, "init", "--repo", repo_url], env, cpus=client_cpus)
                server_pids = s3_server[b].pids() if b in s3_server else None
                subprocess.run(["cat", *map(str, args.corpus.rglob("*"))], capture_output=True)  # warm cache
                c0 = proc_cpu(server_pids)
                t_backup, cpu_backup = run(
                    [args.bunker, "backup", "--no-progress", "--repo", repo_url, args.corpus.name],
                    env,
                    cwd=args.corpus.parent,
                    cpus=client_cpus,
                )
                c1 = proc_cpu(server_pids)
                dest = work / f"dest-{b}-{rep}"
                t_restore, cpu_restore = run(
                    [args.bunker, "restore", "--repo", repo_url, "latest", "--target", str(dest)], env, cpus=client_cpus
                )
                c2 = proc_cpu(server_pids)
                restored = dest / args.corpus.resolve().relative_to("/")  # snapshots hold absolute paths
                same = subprocess.run(["diff", "-r", "-q", str(args.corpus), str(restored)]).returncode
                rows += [
                    (b, rep, "backup", t_backup, cpu_backup, c1 - c0),
                    (b, rep, "restore", t_restore, cpu_restore, c2 - c1),
                ]
                print(
                    f"{b:6} rep {rep}: backup {t_backup:6.2f} s (CPU: bunker {cpu_backup:5.2f} s, server"
                    f" {c1 - c0:5.2f} s), restore {t_restore:6.2f} s (bunker {cpu_restore:5.2f} s, server"
                    f" {c2 - c1:5.2f} s), identical: {same == 0}"
                )
                shutil.rmtree(dest, ignore_errors=True)
                if b in s3_server:
                    drop_s3_repo(s3_server[b], f"repo-{rep}")
                else:  # local, sftp and ssh keep their repositories in this directory
                    shutil.rmtree(work / f"repo-{b}-{rep}", ignore_errors=True)
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)

    if server_cpus:
        print(
            f"\ncorpus {args.corpus} ({size / 2**20:.1f} MiB), median of {args.reps}; bunker on cores"
            f" {sorted(client_cpus)}, the S3 servers on {sorted(server_cpus)}"
        )
        print(
            "'floor s' is the larger of bunker's CPU time over its cores and the server's over its\n"
            "own, the least the op can take; 'best' is local's wall time over it."
        )
    else:
        print(f"\ncorpus {args.corpus} ({size / 2**20:.1f} MiB), median of {args.reps}, {len(cores)} cores")
        print(
            "'floor s' is the CPU time of bunker and of the server (where it runs here: moto, RGW) over the\n"
            "cores, the least the op can take when both share them; 'best' is local's wall time over it."
        )
    print(
        f"{'backend':8} {'op':8} {'wall s':>8} {'MB/s':>8} {'vs local':>9}"
        f" {'cpu s':>7} {'server':>7} {'floor s':>8} {'best':>6}"
    )
    for b in dict.fromkeys(r[0] for r in rows):
        for op in ("backup", "restore"):
            mine = [r for r in rows if r[0] == b and r[2] == op]
            local = [r[3] for r in rows if r[0] == "local" and r[2] == op]
            t = statistics.median(r[3] for r in mine)
            cpu = statistics.median(r[4] for r in mine)
            server = statistics.median(r[5] for r in mine)
            if client_cpus and server_cpus:  # both set together: --split-cores
                floor = max(cpu / len(client_cpus), server / len(server_cpus))
            else:
                floor = (cpu + server) / len(cores)
            lt = statistics.median(local) if local else float("nan")
            print(
                f"{b:8} {op:8} {t:8.2f} {size / t / 1e6:8.1f} {lt / t:9.2f} {cpu:7.2f} {server:7.2f}"
                f" {floor:8.2f} {lt / floor:6.2f}"
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "remote.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["backend", "rep", "op", "wall_s", "bunker_cpu_s", "server_cpu_s", "corpus_bytes"])
            for b, rep, op, t, cpu, server in rows:
                w.writerow([b, rep, op, f"{t:.3f}", f"{cpu:.3f}", f"{server:.3f}", size])


if __name__ == "__main__":
    main()
