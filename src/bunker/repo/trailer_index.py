"""Index objects written anew from packs' own trailers (docs/format.md section 11: an index is
only a cache of them): for packs whose entries a rewrite left out although the packs stay, a
pack a prune rescued, or one a delivery sent again after a prune deleted it with its entries."""

from __future__ import annotations

from collections.abc import Iterable

from bunker.crypto.derive import PutSecrets
from bunker.crypto.sign import SigningKey
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.blob_reader import read_trailer
from bunker.repo.index import Location, make_index
from bunker.repo.repository import Repository


def index_from_trailers(
    repo: Repository, secrets: PutSecrets, signer: SigningKey, cert_name: str, packs: Iterable[str]
) -> tuple[str | None, int]:
    """Write one index object (signed by ``cert_name``) with every blob of ``packs`` as their
    trailers list it. A pack that is gone, damaged or of another dedup domain is left out (check
    reports it). Returns the object's name (None when nothing was indexed) and how many packs
    it indexes."""
    entries: list[tuple[bytes, Location]] = []
    done = 0
    for pack in packs:
        try:
            blobs, _, _ = read_trailer(repo, pack, secrets)
        except (CorruptObject, ObjectMissing):
            continue
        entries += [(b.chunk_id, Location(pack, b.offset, b.length, b.raw_length)) for b in blobs]
        done += 1
    if not entries:
        return None, 0
    return repo.put_object("index", make_index(entries, secrets, signer, cert_name)), done
