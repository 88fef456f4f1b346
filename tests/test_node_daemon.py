"""`bunker node run` (docs/hierarchy.md, "Running a node"): a node as a standing service that
serves its clients on a unix socket and moves their backups upstream by itself, also while a
backup is still running, retries an upstream that is away with a growing wait and never exits
for it, stops cleanly on SIGTERM (and at once on a second signal), runs once per node directory,
and survives kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bunker.errors import ExitCode
from bunker.storage import wire
from helpers import BUNKER, compare_trees, make_tree, restored_path
from test_node import backup_into, node_cmd, office_with_top

DEADLINE = 90.0  # seconds: only against hangs, never a measure of speed


class NodeDaemon:
    """`bunker node run NODE ARGS` as its own process; its log (stderr) goes to a file."""

    def __init__(self, node: Path, env: dict[str, str], *args: str | Path, log: Path) -> None:
        assert BUNKER
        self.log_path = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [BUNKER, "node", "run", str(node), *(str(a) for a in args)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.wait_for(lambda: "running as pid" in self.log(), "the daemon to start")

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_for(self, done: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not done():
            rc = self.proc.poll()
            assert rc is None, f"the daemon exited ({rc}) waiting for {what}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {what} within {DEADLINE:g} s:\n{self.log()}"
            time.sleep(0.05)

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(DEADLINE)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)


@contextlib.contextmanager
def daemon(node: Path, env: dict[str, str], *args: str | Path, log: Path) -> Iterator[NodeDaemon]:
    d = NodeDaemon(node, env, *args, log=log)
    try:
        yield d
    finally:
        d.kill()


def children_of(pid: int) -> list[int]:
    """The live (not zombie) children of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != b"Z":
                    out.append(int(entry))
    return out


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


def test_daemon_serves_forwards_runs_once_and_survives_kill_9(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    sock = tmp_path / "office.sock"
    src = tmp_path / "src"
    make_tree(src)
    with daemon(office, top.env, "--socket", sock, "--socket-mode", "660", log=tmp_path / "first.log") as first:
        assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o660
        doc = backup_into(top, f"unix://{sock}", src)
        assert not doc.get("spooled")
        # no `node forward`: the new snapshot in the store starts a cycle
        first.wait_for(lambda: len(top.objects("snapshots")) == 1, "the snapshot at the top")
        first.wait_for(lambda: re.search(r"top: sent \d+ objects .*, 1 snapshots", first.log()), "the cycle's line")

        # a second daemon on the same node directory, even on another socket, is refused
        assert BUNKER
        cp = subprocess.run(
            [BUNKER, "node", "run", str(office), "--socket", str(tmp_path / "other.sock")],
            env=top.env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert cp.returncode == ExitCode.USAGE, cp.stderr
        assert f"is already run by another `bunker node run` (pid {first.proc.pid})" in cp.stderr, cp.stderr
        assert "next step:" in cp.stderr and not (tmp_path / "other.sock").exists()
        assert sock.is_socket()  # the first one's socket is untouched

        first.proc.kill()  # kill -9: no cleanup at all
        first.proc.wait(DEADLINE)
    assert sock.exists()  # left behind; the lock went with the process
    with daemon(office, top.env, "--socket", sock, log=tmp_path / "second.log") as second:
        (src / "new file").write_bytes(b"after the restart\n" * 1000)
        backup_into(top, f"unix://{sock}", src)
        second.wait_for(lambda: len(top.objects("snapshots")) == 2, "the second snapshot at the top")
        assert second.stop() == 0
    assert not sock.exists()
    log = second.log()
    assert "node office stopped (SIGTERM)" in log and "Traceback" not in log, log
    target = tmp_path / "restored"
    top.ok("restore", "latest", "--target", target)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def test_a_backup_still_running_goes_up_while_it_runs(tmp_path: Path) -> None:
    """~60 MB of random data through standard input: the backup cannot end while the test holds
    its input open, and packs of it reach the top meanwhile; its snapshot follows once it ends."""
    top, office = office_with_top(tmp_path)
    sock = tmp_path / "office.sock"
    data = os.urandom(60 << 20)
    with daemon(office, top.env, "--socket", sock, "--interval", "1", log=tmp_path / "daemon.log") as d:
        assert BUNKER
        out, err = tmp_path / "backup.out", tmp_path / "backup.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            backup = subprocess.Popen(
                [BUNKER, "backup", "--stdin-name", "big.bin", "--json", "--repo", f"unix://{sock}"],
                env=top.env,
                stdin=subprocess.PIPE,
                stdout=o,
                stderr=e,
            )
        assert backup.stdin is not None
        try:
            backup.stdin.write(data[: 40 << 20])
            backup.stdin.flush()
            d.wait_for(lambda: top.objects("packs"), "a pack of the running backup at the top")
            assert backup.poll() is None and top.objects("snapshots") == []
            during = len(top.objects("packs"))
            backup.stdin.write(data[40 << 20 :])
            backup.stdin.close()
            backup.wait(DEADLINE)
        finally:
            if backup.poll() is None:
                backup.kill()
                backup.wait()
        assert backup.returncode == 0, err.read_text()
        assert not json.loads(out.read_text()).get("spooled")
        d.wait_for(lambda: re.search(r"top: sent \d+ objects .*, 1 snapshots", d.log()), "the snapshot's cycle")
        assert len(top.objects("snapshots")) == 1 and len(top.objects("packs")) > during
        assert d.stop() == 0
    sent = re.findall(r"top: sent (\d+) objects", d.log())
    assert len(sent) >= 2, d.log()  # at least one cycle during the backup, one after it
    target = tmp_path / "restored"
    top.ok("restore", "latest", "--target", target)
    assert (target / "big.bin").read_bytes() == data
    shutil.rmtree(target)


def test_upstream_away_is_retried_with_a_growing_wait(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    sock = tmp_path / "office.sock"
    away = top.path.with_name("repo-unplugged")
    top.path.rename(away)  # the repository of record's disk is unplugged
    env = {**top.env, "BUNKER_NODE_RETRY_DELAY": "0.3"}
    with daemon(office, env, "--socket", sock, "--interval", "2", log=tmp_path / "daemon.log") as d:
        src = tmp_path / "src"
        make_tree(src)
        backup_into(top, f"unix://{sock}", src)  # the node takes the backup all the same
        pattern = r"warn: upstream top cannot be reached .*next attempt in ([0-9.]+) s \((\d+) failed in a row"
        d.wait_for(lambda: len(re.findall(pattern, d.log())) >= 3, "three failed attempts")
        tries = [(float(w), int(n)) for w, n in re.findall(pattern, d.log())]
        assert [n for _, n in tries[:3]] == [1, 2, 3]
        waits = [w for w, _ in tries[:3]]
        assert waits == sorted(waits) and waits[2] > 2 * waits[0], waits  # doubling, with jitter
        assert d.proc.poll() is None  # an upstream away never ends the daemon
        away.rename(top.path)  # plugged in again
        d.wait_for(lambda: len(top.objects("snapshots")) == 1, "the snapshot at the top")
        d.wait_for(lambda: "upstream top works again after" in d.log(), "the recovery line")
        assert d.stop() == 0
    top.ok("check")


def _fake_ssh(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose `ssh` never answers (a server that hangs), writing its pid to a file."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    pid_file = tmp_path / "ssh.pid"
    script = bin_dir / "ssh"
    # written whole under another name, then renamed: a reader never sees it half written
    script.write_text(f"#!/bin/sh\necho $$ > {pid_file}.tmp\nmv {pid_file}.tmp {pid_file}\nexec sleep 600\n")
    script.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "BUNKER_STORAGE_TIMEOUT": "600"}
    return env, pid_file


def _upstream_over_ssh(office: Path) -> None:
    """The top moved behind ssh (node.json edited as an administrator would)."""
    conf = office / "node.json"
    doc = json.loads(conf.read_text())
    doc["upstreams"][0]["url"] = "ssh://bunker@127.0.0.1/srv/top"
    conf.write_text(json.dumps(doc))


def test_sigterm_stops_a_cycle_under_way_cleanly_and_a_second_signal_at_once(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    (src / "big").write_bytes(os.urandom(2 << 20))  # a pack larger than a socket's buffer
    backup_into(top, office, src)
    _upstream_over_ssh(office)
    extra, pid_file = _fake_ssh(tmp_path)
    sock = tmp_path / "office.sock"
    with daemon(office, {**top.env, **extra}, "--socket", sock, log=tmp_path / "first.log") as d:
        d.wait_for(pid_file.exists, "the cycle to reach the upstream")  # it now waits for ssh's answer
        ssh_pid = int(pid_file.read_text())
        assert ssh_pid in d.children()
        assert d.stop(signal.SIGTERM) == 0
    log = d.log()
    assert "the cycle under way stopped after the objects in flight" in log, log
    assert "node office stopped (SIGTERM)" in log and "Traceback" not in log, log
    assert not sock.exists()
    assert not running(ssh_pid), "the ssh the daemon started outlived it"
    # nothing half-written: the node's state reads back
    assert node_cmd(top, "status", office).returncode == 0

    # a client that asks for a pack again and again and never reads the answers: its session cannot
    # end when the daemon is told to stop, so the daemon waits for it; a second signal cuts that short
    conf = office / "node.json"
    conf.write_text(conf.read_text().replace("ssh://bunker@127.0.0.1/srv/top", str(top.path)))
    with daemon(office, top.env, "--socket", sock, log=tmp_path / "second.log") as d:
        pack = max((office / "store" / top.id / "packs").iterdir(), key=lambda p: p.stat().st_size)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sock))
        stream = wire.SocketStream(client)
        stream.write(wire.encode_hello({"create": False}))
        assert "error" not in wire.read_hello(stream, "the daemon").fields
        for rid in range(1, 17):
            wire.write_frame(stream, rid, wire.GET, {"n": f"packs/{pack.name}"})
        d.proc.send_signal(signal.SIGINT)
        d.wait_for(lambda: "SIGINT: stopping (a second signal exits at once)" in d.log(), "the stop")
        assert d.stop(signal.SIGTERM) == 128 + signal.SIGTERM
        client.close()
    assert "second SIGTERM: exiting at once" in d.log()
    assert not sock.exists()


def test_without_socket_it_only_moves_data_over_a_link(tmp_path: Path) -> None:
    """Two daemons without sockets and a mailbox folder both reach (an always-plugged disk):
    office's clients back up in forked mode, the daemons carry the data to the top through hq,
    and the record receipt comes back down to office."""
    from test_node_links import build

    h = build(tmp_path)
    shared = h.disk_office  # both ends of the link on one folder
    conf = h.hq / "node.json"
    doc = json.loads(conf.read_text())
    doc["downstreams"][0]["url"] = str(shared)
    conf.write_text(json.dumps(doc))
    src = tmp_path / "src"
    make_tree(src)
    backup_into(h.top, h.office, src)
    with (
        daemon(h.office, h.top.env, "--interval", "1", log=tmp_path / "office.log") as office_d,
        daemon(h.hq, h.top.env, "--interval", "1", log=tmp_path / "hq.log") as hq_d,
    ):
        office_d.wait_for(lambda: len(h.top.objects("snapshots")) == 1, "the snapshot at the top")

        def recorded() -> bool:
            status = json.loads(node_cmd(h.top, "status", h.office, "--json").stdout)
            ups = status["repositories"][0]["upstreams"]
            return bool(ups[0]["recorded"]) and ups[0]["owed_objects"] == 0

        office_d.wait_for(recorded, "the record receipt at office")
        assert office_d.stop() == 0 and hq_d.stop() == 0
    assert "not serving clients (no --socket)" in office_d.log()
    for log in (office_d.log(), hq_d.log()):
        assert "Traceback" not in log and ": err:" not in log, log


@pytest.mark.parametrize("interval", ["0", "x"])
def test_a_bad_interval_is_refused(tmp_path: Path, interval: str) -> None:
    assert BUNKER
    cp = subprocess.run(
        [BUNKER, "node", "run", str(tmp_path), "--interval", interval],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert cp.returncode == ExitCode.USAGE and "--interval" in cp.stderr, cp.stderr
