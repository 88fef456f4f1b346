"""The documents say what the code does (issue 11, points 24 and 25).

Runnable blocks: a fenced ``sh`` or ``console`` block in README.md or docs/*.md on the line after
``<!-- runnable -->`` is run by this test. The runnable blocks of one document run in order as
one bash script (``set -e``; an ``export`` carries on to later blocks, as in a reader's shell),
in an isolated home (tests/helpers.py make_env, with the XDG variables left to their defaults
under that home, as on a fresh machine; ``~/Documents`` and ``~/Projects`` hold a few files;
``scripts/install`` installs into ``~/.local``, as for a user, and ``~/.local/bin`` is first on
PATH). In an ``sh`` block every line runs; in a ``console`` block the lines that start with
``$ `` are the commands (a trailing ``\\`` continues one) and the rest is sample output, not
compared (ids, times and sizes differ on every run). ``<!-- runnable exit=N -->`` expects exit
code N from a console block's last command (an example of a failure). Paths the examples use
for media and scratch space (/media/usb, /mnt/usb, /mnt/nas, /tmp/) are mapped into the test's
directory. Blocks that need a server, the network, root on the real machine, another machine or
a terminal stay unmarked.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import BUNKER, init_repo, make_env

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"<!--\s*runnable(?:\s+exit=(\d+))?\s*-->")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    exit_code: int

    @property
    def name(self) -> str:
        return f"{self.doc.name}:{self.line}"

    def script(self) -> str:
        """The block as one bash script."""
        if self.lang == "sh":
            return self.body
        commands: list[str] = []
        pending = ""
        for line in self.body.splitlines():
            if pending:
                pending += "\n" + line
            elif line.startswith("$ "):
                pending = line[2:]
            else:
                continue
            if not pending.endswith("\\"):
                commands.append(pending)
                pending = ""
        if pending:
            commands.append(pending)
        last = commands.pop() if self.exit_code else None
        script = "\n".join(commands)
        if last is not None:
            want = self.exit_code
            script += f"\nset +e\n{last}\nrc=$?\n[ $rc -eq {want} ] || {{ echo \"exit $rc, not {want}\" >&2; exit 1; }}"
        return script


def runnable_blocks(doc: Path) -> list[Block]:
    """The blocks of ``doc`` marked runnable, in order."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = MARK.fullmatch(lines[i].strip())
        if m and i + 1 < len(lines) and lines[i + 1].startswith("```"):
            lang = lines[i + 1][3:].strip()
            assert lang in ("sh", "console"), f"{doc.name}:{i + 2}: a runnable block must be sh or console"
            end = i + 2
            while not lines[end].startswith("```"):
                end += 1
            out.append(Block(doc, i + 2, lang, "\n".join(lines[i + 2 : end]), int(m.group(1) or 0)))
            i = end
        i += 1
    return out


# where the examples put media and scratch files, and where the test puts them
PATH_MAP = ("/media/usb", "/mnt/usb", "/mnt/nas", "/tmp/")


def document_script(blocks: list[Block], scratch: Path) -> str:
    """One bash script of the blocks: each announces itself on stderr before it runs."""
    parts = []
    for b in blocks:
        # the examples' paths first: the checkout itself may live under /tmp (a CI clone)
        text = re.sub("|".join(map(re.escape, PATH_MAP)), lambda m: str(scratch) + m.group(0), b.script())
        text = text.replace("sh scripts/install", f"sh {ROOT}/scripts/install")
        parts.append(f"echo '@@ {b.name}' >&2\n{text}")
    return "\n".join(parts) + "\n"


def _home(base: Path) -> dict[str, str]:
    env = make_env(base)
    for k in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        env.pop(k)  # the defaults under HOME, as the documents show them
    home = Path(env["HOME"])
    for d, names in (("Documents", ["report.txt", "notes.txt", "photo.raw"]), ("Projects", ["main.py", "README"])):
        (home / d).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(names):
            (home / d / n).write_text(f"{d} {n}\n" * (i + 1) * 100)
    (home / "Projects" / "node_modules").mkdir(exist_ok=True)
    (home / "Projects" / "node_modules" / "dep.js").write_text("x\n")
    assert BUNKER
    env["PREFIX"] = str(home / ".local")  # scripts/install as a user's install
    env["PATH"] = f"{home / '.local' / 'bin'}:{Path(BUNKER).parent}:{env['PATH']}"
    env["LOGNAME"] = env.get("LOGNAME", "root")
    return env


@pytest.mark.parametrize("doc", [d for d in DOCS if runnable_blocks(d)], ids=lambda d: d.name)
def test_runnable_blocks(doc: Path, tmp_path: Path) -> None:
    env = _home(tmp_path / "env")
    scratch = tmp_path / "scratch"
    for p in PATH_MAP:
        (scratch / p.strip("/")).mkdir(parents=True, exist_ok=True)
    work = tmp_path / "work"
    work.mkdir()
    script = document_script(runnable_blocks(doc), scratch)
    cp = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    failed = re.findall(r"^@@ (\S+)$", cp.stderr, re.M)
    where = failed[-1] if failed else "(before the first block)"
    assert cp.returncode == 0, f"{where} failed (exit {cp.returncode})\n--- stderr\n{cp.stderr[-4000:]}"


def test_every_runnable_mark_is_on_a_block() -> None:
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if MARK.fullmatch(line.strip()):
                assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"{doc.name}:{i + 1}"


def test_code_cites_only_the_projects_own_documents() -> None:
    """Comments and docstrings name docs/format.md, docs/security.md..., never a file outside
    the repository (which a reader of the code does not have)."""
    bad = []
    for top in ("src", "tests"):
        for p in (ROOT / top).rglob("*.py"):
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if "DESIGN" + ".md" in line or "../" + "shared" in line:
                    bad.append(f"{p.relative_to(ROOT)}:{n}")
    assert bad == []


def test_recovery_md_names_the_source_not_a_package_index(tmp_path: Path) -> None:
    """A stranger is told to install Bunker from its source, checked by the commit that wrote the
    repository (`bunker --version` names the same), never from a package index."""
    repo = init_repo(tmp_path / "r")
    text = (repo.path / "RECOVERY.md").read_text()
    version = subprocess.run([BUNKER or "bunker", "--version"], capture_output=True, text=True, check=True).stdout
    m = re.fullmatch(r"bunker, version (\S+) \(commit ([0-9a-f]{40}(?:\+local-changes)?|unknown)\)\n", version)
    assert m, version
    assert "pip install" not in text
    assert "not published in any package index" in text
    assert "sh bunker/scripts/install" in text
    if m.group(2) != "unknown":
        assert f"\n    {m.group(2)}\n" in text
    assert "AWS_ACCESS_KEY_ID" in text  # the credentials a remote repository needs
