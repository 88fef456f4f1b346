"""One rule for ~/.ssh (issue 11, point 16): ssh:// (OpenSSH) and sftp:// (asyncssh) both read
~/.ssh in the home directory of the user's passwd entry, never $HOME, and the advice for an
unknown server key names that exact file, so that running it as printed makes both work.

The user's passwd entry gets a home of the test's own (helpers.passwd_home_prefix: a private
mount namespace with a copy of /etc/passwd), while $HOME points elsewhere and holds a decoy
~/.ssh: a key the server refuses and a known_hosts entry with another host key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from helpers import BUNKER, PASSWD_HOME_VAR, SSH_SCRUB, SshServer, describe, make_env, run_bunker, ssh_keygen


def _env(base: Path, sshd: SshServer) -> tuple[dict[str, str], Path]:
    """An environment whose passwd home has the test server's client key and no known_hosts
    yet, and whose $HOME has a decoy ~/.ssh; and the passwd home's ~/.ssh."""
    env = make_env(base)
    for k in SSH_SCRUB:
        env.pop(k, None)
    env.update(BUNKER_REMOTE_PATH=BUNKER or "bunker", BUNKER_STORAGE_RETRIES="1")
    home = base / "passwd-home"
    sshd.install_home(home)
    (home / ".ssh" / "known_hosts").write_text("")
    env[PASSWD_HOME_VAR] = str(home)
    decoy = Path(env["HOME"]) / ".ssh"
    decoy.mkdir(parents=True)
    stranger = ssh_keygen(base / "stranger")
    shutil.copyfile(stranger, decoy / "id_ed25519")
    os.chmod(decoy / "id_ed25519", 0o600)
    other = ssh_keygen(base / "other_host_key")
    key_type, key_b64 = other.with_suffix(".pub").read_text().split()[:2]
    (decoy / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key_b64}\n")
    return env, home / ".ssh"


def test_ssh_and_sftp_read_the_passwd_homes_ssh_directory(sshd: SshServer, tmp_path: Path) -> None:
    env, ssh = _env(tmp_path / "e", sshd)
    known_hosts = ssh / "known_hosts"
    urls = {
        "sftp": sshd.url(tmp_path / "server-sftp"),
        "ssh": f"ssh://root@127.0.0.1:{sshd.port}{tmp_path / 'server-ssh'}",
    }
    keyscans = set()
    for scheme, url in urls.items():
        cp = run_bunker("init", "--repo", url, "--client", scheme, env=env, timeout=90)
        assert cp.returncode == 4, describe(cp)
        assert "Traceback" not in cp.stderr
        assert "host key is unknown" in cp.stderr and sshd.fingerprint() in cp.stderr, describe(cp)
        m = re.search(r"`(ssh-keyscan [^`]*>> [^`]*)`", cp.stderr)
        assert m, describe(cp)
        assert m.group(1).endswith(f">> {known_hosts}"), (scheme, m.group(1))  # the file bunker reads
        keyscans.add(m.group(1))
    assert len(keyscans) == 1  # one rule: the same advice for both
    subprocess.run(["sh", "-c", keyscans.pop()], check=True, capture_output=True, timeout=30)  # as printed

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"the same keys for both\n")
    for scheme, url in urls.items():
        cp = run_bunker("init", "--repo", url, "--client", scheme, env=env, timeout=90)
        assert cp.returncode == 0, describe(cp)
        cp = run_bunker("backup", src, "--repo", url, env=env, timeout=90)
        assert cp.returncode == 0, describe(cp)
