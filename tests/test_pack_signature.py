"""One flipped bit in a pack's signature costs who wrote it, not its blobs (issue 11, point 12).

Each blob authenticates on its own (its AEAD tag, and its plaintext against its chunk id) and the
trailer with the dedup domain's secret (AEAD bound to the body hash): a restore uses every blob
of a pack whose writer's signature fails, reports the pack as damaged (err, exit 3), and `check`
names the pack, once, without calling the snapshot's chunks lost (docs/security.md, "A pack whose
signature fails").
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bunker.crypto.keyfile import load_put_key
from bunker.errors import ExitCode
from bunker.repo.pack import decrypt_trailer, fetch_footer
from bunker.storage.local import LocalBackend
from helpers import Repo, describe, js, make_tree, restored_path, snapshot_tree


def _packs_by_kind(repo: Repo) -> dict[str, list[Path]]:
    put = load_put_key(str(repo.put_key))
    backend = LocalBackend(str(repo.path))
    out: dict[str, list[Path]] = {}
    for p in repo.objects("packs"):
        kind = decrypt_trailer(fetch_footer(backend, f"packs/{p.name}"), put.secrets).kind
        out.setdefault(kind, []).append(p)
    return out


def _flip_in_footer(pack: Path, field: str) -> None:
    """Flip a bit of the footer's signature, or change one hex digit of its signer's name."""
    footer = fetch_footer(LocalBackend(str(pack.parent.parent)), f"packs/{pack.name}")
    data = bytearray(pack.read_bytes())
    if field == "sig":
        at = data.rindex(footer.sig) + 17
        data[at] ^= 0x04
    else:
        at = data.rindex(footer.signer.encode()) + len("clients/") + 5
        data[at] = ord("0") if data[at] != ord("0") else ord("1")
    pack.write_bytes(bytes(data))


def test_restore_uses_the_blobs_of_a_pack_whose_signature_fails(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    snap = repo.backup(src)["snapshot"]
    packs = _packs_by_kind(repo)
    meta, data = packs["meta"][0], packs["data"][0]
    _flip_in_footer(meta, "sig")  # every tree in it: before, "0 files" restored
    _flip_in_footer(data, "signer")  # the signer names no certificate

    target = tmp_path / "t"
    cp = repo.run("restore", snap, "--target", target, "--json")
    assert cp.returncode == ExitCode.ERR, describe(cp)
    doc = js(cp)
    assert doc["stats"]["failed"] == 0
    assert snapshot_tree(restored_path(target, src)) == snapshot_tree(src)
    shutil.rmtree(target)
    damaged = sorted(e["message"].split(" ", 1)[0] for e in doc["events"] if e["code"] == "pack-damaged")
    assert damaged == sorted(f"packs/{p.name}" for p in (meta, data)), doc["events"]
    assert [e for e in doc["events"] if e["level"] == "err" and e["code"] != "pack-damaged"] == []
    assert all("each checked against its chunk id" in e["message"] for e in doc["events"])

    cp = repo.run("check", "--json")
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    problems = js(cp)["problems"]
    errs = [p for p in problems if p["severity"] == "err"]
    assert sorted(p["object"] for p in errs) == sorted(f"packs/{p.name}" for p in (meta, data)), errs
    assert all("restore still uses them" in p["problem"] for p in errs)
    by_pack = {p["object"]: p["problem"] for p in errs}
    assert "pack signature does not verify" in by_pack[f"packs/{meta.name}"]
    assert "not usable" in by_pack[f"packs/{data.name}"]

    # ls and export-tar read the same way, and say so
    cp = repo.run("ls", snap, "--recursive")
    assert cp.returncode == ExitCode.ERR and "f" in cp.stdout and "is damaged" in cp.stderr, describe(cp)


def test_a_trailer_that_does_not_authenticate_is_not_used(repo: Repo, tmp_path: Path) -> None:
    """What the AEAD protects stays protected: a flipped bit in the trailer itself makes the pack
    unreadable, and restore says which items it could not restore."""
    src = tmp_path / "src"
    make_tree(src)
    snap = repo.backup(src)["snapshot"]
    data = _packs_by_kind(repo)["data"][0]
    footer = fetch_footer(LocalBackend(str(repo.path)), f"packs/{data.name}")
    raw = bytearray(data.read_bytes())
    raw[raw.rindex(footer.trailer_ct) + 20] ^= 1
    data.write_bytes(bytes(raw))
    cp = repo.run("restore", snap, "--target", tmp_path / "t", "--json")
    assert cp.returncode == ExitCode.ERR, describe(cp)
    assert js(cp)["stats"]["failed"] > 0
