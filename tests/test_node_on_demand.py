"""A node served on demand (docs/hierarchy.md, "Running a node"), with the files docs/examples
ships: the systemd units parse (`systemd-analyze verify`), the socket-activated and inetd command
serves a client when the connection is its standard input and output (what systemd does with
Accept=yes and inetd with nowait, emulated here: systemd is not PID 1 in the test machine), and
the authorized_keys forced command pins the node whatever the client asks, over a real sshd."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from bunker.errors import ExitCode
from helpers import BUNKER, compare_trees, init_repo, make_tree, restored_path, run_bunker, start_sshd
from test_node import backup_into, make_node, node_cmd, office_with_top

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
UNITS = ("bunker-node.service", "bunker-node.socket", "bunker-node@.service")
SHIPPED_BUNKER = "/usr/local/bin/bunker"


def _example(name: str, **paths: str) -> str:
    """An example file with the shipped paths replaced: the installed `bunker` by this test's,
    /srv/bunker/NODE by ``paths[NODE]``."""
    assert BUNKER
    text = (EXAMPLES / name).read_text()
    for node, path in paths.items():
        text = text.replace(f"/srv/bunker/{node}", path)
    return text.replace(SHIPPED_BUNKER, BUNKER)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_unit_files_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package; bash scripts/test installs it)")
    # verify needs the ExecStart program to exist: the shipped path becomes this test's bunker
    for name in UNITS:
        (tmp_path / name).write_text(_example(name))
    for name in UNITS:
        cp = subprocess.run([tool, "verify", f"./{name}"], cwd=tmp_path, capture_output=True, text=True, check=False)
        # verify exits 0 on unknown keys and bad values too; it only says so
        assert cp.returncode == 0 and cp.stdout == cp.stderr == "", f"{name}:\n{cp.stdout}{cp.stderr}"
    daemon = _example("bunker-node.service")
    assert "Type=simple" in daemon and "ExecStart=" + BUNKER + " node run /srv/bunker/office --socket " in daemon
    assert "ReadWritePaths=/srv/bunker/office" in daemon and "ProtectSystem=strict" in daemon
    assert "Accept=yes" in _example("bunker-node.socket")


def _on_demand_argv(office: Path) -> list[str]:
    """The command the socket unit and the inetd line start per connection (the same one)."""
    unit = _example("bunker-node@.service", office=str(office))
    (exec_start,) = [line.split("=", 1)[1] for line in _lines(unit) if line.startswith("ExecStart=")]
    argv = shlex.split(exec_start)
    (entry,) = _lines(_example("inetd.conf", office=str(office)))
    fields = entry.split()
    assert fields[0] == "/run/bunker/office.sock" and fields[1:4] == ["stream", "unix", "nowait"], fields
    assert fields[5] == argv[0] and fields[6] == "bunker" and fields[7:] == argv[1:], (fields, argv)
    assert argv[1:] == ["node", "serve", str(office), "--stdio"]
    return argv


class AcceptYes:
    """What systemd does for a socket unit with Accept=yes (and inetd for a `nowait` line): it
    listens, and starts the service once per connection with the connection as fds 0 and 1;
    systemd sends fd 2 to the journal (StandardError=journal), inetd makes it the connection too."""

    def __init__(self, path: Path, argv: list[str], env: dict[str, str], log: Path, *, inetd: bool = False) -> None:
        self.argv, self.env, self.log, self.inetd = argv, env, log, inetd
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.1)  # a closed listening socket does not wake accept()
        self.served: list[subprocess.Popen[bytes]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            with conn, open(self.log, "ab") as log:
                err = conn if self.inetd else log
                self.served.append(subprocess.Popen(self.argv, stdin=conn, stdout=conn, stderr=err, env=self.env))

    def close(self) -> list[int]:
        """Stop listening; the exit codes of every service started."""
        self.stop.set()
        self.thread.join(10)
        self.sock.close()
        return [p.wait(60) for p in self.served]


def test_socket_activation_and_inetd_serve_on_stdin_and_stdout(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    argv = _on_demand_argv(office)
    by_systemd = AcceptYes(tmp_path / "systemd.sock", argv, top.env, tmp_path / "journal.log")
    by_inetd = AcceptYes(tmp_path / "inetd.sock", argv, top.env, tmp_path / "unused.log", inetd=True)
    try:
        src = tmp_path / "src"
        make_tree(src)
        doc = backup_into(top, f"unix://{tmp_path / 'systemd.sock'}", src)
        assert not doc.get("spooled")
        inetd = f"unix://{tmp_path / 'inetd.sock'}"
        listed = run_bunker("snapshots", "--json", "--repo", inetd, env=top.env)
        assert listed.returncode == 0 and doc["snapshot"] in listed.stdout, listed.stderr
        # the server refuses a request and logs it: under inetd the log line must not reach the stream
        for url in (f"unix://{tmp_path / 'systemd.sock'}", inetd):
            cp = run_bunker("init", "--repo", url, env=top.env)
            assert cp.returncode != 0 and "does not create repositories" in cp.stderr, cp.stderr
            cp = run_bunker("forget", "--keep-last", "1", "--master-key", top.master_key, "--repo", url, env=top.env)
            assert cp.returncode == ExitCode.USAGE and "repository of record" in cp.stderr, cp.stderr
    finally:
        codes = by_systemd.close() + by_inetd.close()
    # each server ends 0, but the two asked to create a repository, which end with the refusal's code
    assert len(codes) >= 6 and sorted(codes).count(ExitCode.FATAL) == 2 and set(codes) == {0, ExitCode.FATAL}, codes
    assert "does not create repositories" in (tmp_path / "journal.log").read_text()
    # what the connections stored is the node's: it goes up with the node's forward
    assert top.objects("snapshots") == []
    node_cmd(top, "forward", office)
    target = tmp_path / "restored"
    top.ok("restore", "latest", "--target", target)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def test_ssh_forced_command_pins_the_node(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("starts sshd, which needs root")
    top = init_repo(tmp_path / "top")
    hq = make_node(top, tmp_path / "hq", "hq")
    own = start_sshd(tmp_path / "sshd")
    try:
        pub = own.client_key.with_suffix(".pub").read_text().strip()
        (entry,) = _lines(_example("authorized_keys", hq=str(hq)))
        assert entry.endswith(" ssh-ed25519 AAAA... root@office-pc"), entry
        entry = entry.replace("ssh-ed25519 AAAA... root@office-pc", pub)
        code = os.environ.get("PYTHONPATH")
        if code:  # sshd passes no environment: the far side runs the code under test all the same
            entry = entry.replace(f'command="{BUNKER}', f'command="/usr/bin/env PYTHONPATH={code} {BUNKER}')
        (own.workdir / "authorized_keys").write_text(entry + "\n")
        # the client asks to run another command: the forced command runs the node's server all the same
        env = {**top.env, **own.env(), "BUNKER_REMOTE_PATH": "/bin/false"}

        def url(path: Path | str) -> str:
            return f"ssh://root@127.0.0.1:{own.port}{path}"

        src = tmp_path / "src"
        make_tree(src)
        doc = js_backup(env, url(hq), src)
        assert (hq / "store" / top.id / "snapshots" / doc["snapshot"]).exists()
        listed = run_bunker("snapshots", "--json", "--repo", url(f"{hq}/{top.id}"), env=env)
        assert listed.returncode == 0 and doc["snapshot"] in listed.stdout, listed.stderr
        # whatever path the client asks for, even the repository of record's on the same machine,
        # it reaches hq's store and nothing else
        for path in ("/anything/the/client/asks", f"/anything/{top.id}", top.path):
            listed = run_bunker("snapshots", "--json", "--repo", url(path), env=env)
            assert listed.returncode == 0 and doc["snapshot"] in listed.stdout, (path, listed.stderr)
        assert top.objects("snapshots") == []
        # and what runs only at the top is refused with the node's explanation
        cp = run_bunker("forget", "--keep-last", "1", "--master-key", top.master_key, "--repo", url(hq), env=env)
        assert cp.returncode == ExitCode.USAGE, cp.stderr
        assert "node 'hq'" in cp.stderr and "repository of record" in cp.stderr, cp.stderr
    finally:
        own.stop()


def js_backup(env: dict[str, str], url: str, src: Path) -> dict[str, object]:
    cp = run_bunker("backup", src, "--json", "--repo", url, env=env)
    assert cp.returncode == 0, cp.stderr
    doc: dict[str, object] = json.loads(cp.stdout)
    assert not doc.get("spooled"), doc
    return doc
