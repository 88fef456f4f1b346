"""Objects written with another secret: what a damaged put key left behind.

Before every put key was checked against its certificate (issue 11), a put key whose secret was
damaged wrote packs, index objects and snapshots under a secret no other key has: its writer's
signatures hold, but no key opens their trailers, index entries or chunk sets, and the master key
cannot restore them. A current bunker refuses such a key before it writes anything; these
functions recognise what older runs wrote, so `check` names it for what it is and `prune` can
remove it.
"""

from __future__ import annotations

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.objects import MAGIC_INDEX, MAGIC_SNAPSHOT, SignedObject
from bunker.repo.pack import WrongTrailerKey, decrypt_trailer, fetch_footer, verify_footer
from bunker.repo.records import make_retirement
from bunker.repo.repository import Repository
from bunker.repo.snapshot import ParsedSnapshot

NEXT_STEP = (
    "back up again with a good put key (bunker refuses a damaged one now, and the next backup reads the files "
    "again); `bunker prune` with a prune-capable key then retires such snapshots and deletes the packs that no "
    "trusted snapshot needs"
)


def certificate_domains(repo: Repository) -> set[str]:
    """The dedup domain ids of every valid certificate of the repository."""
    return {c.domain for c in repo.certificates()}


def snapshot_with_other_secret(
    repo: Repository, snap: ParsedSnapshot, domains: set[str], writers_domain: str = ""
) -> bool:
    """True for a snapshot whose writer's signature holds but whose dedup domain is no
    certificate's (``domains``): its client's put key was damaged when it wrote it. With
    ``writers_domain``, only when that client's certificate is of that dedup domain."""
    env = snap.env
    if env.version < 2 or env.adopted is not None or env.domain in domains or env.repo_id != repo.repo_id:
        return False
    try:
        cert = repo.certificate(env.cert)
        verify(cert.verify_key, MAGIC_SNAPSHOT, snap.env_bytes, snap.sig)
    except (CorruptObject, ObjectMissing, BadSignature):
        return False
    return env.client == cert.client and writers_domain in ("", cert.domain)


def retire(repo: Repository, names: list[str], signer: SigningKey, cert: str) -> None:
    """Retire the snapshots ``names`` written with another secret (a prune-capable signer)."""
    for name in names:
        repo.put_object("retired", make_retirement(name, "written with another secret", signer, cert))


def pack_with_other_secret(repo: Repository, pack: str, secrets: PutSecrets) -> bool:
    """True for a pack signed by a writer of ``secrets``' dedup domain (the signature holds, so
    its trailer is as written) whose trailer does not open with that domain's secret."""
    try:
        footer = fetch_footer(repo.backend, f"packs/{pack}")
        cert = repo.certificate(footer.signer)
        if cert.domain != secrets.domain_id:
            return False
        verify_footer(footer, cert.verify_key)
        decrypt_trailer(footer, secrets)
    except WrongTrailerKey:
        return True
    except (encoding.FormatError, CorruptObject, ObjectMissing):
        pass
    return False


def index_with_other_secret(repo: Repository, obj: SignedObject, domain_id: str) -> bool:
    """True for an index object signed by a writer of dedup domain ``domain_id`` that names
    another domain: no key reads its entries."""
    try:
        cert = repo.certificate(obj.signer)
        if cert.domain != domain_id or obj.body.get("domain") == domain_id:
            return False
        verify(cert.verify_key, MAGIC_INDEX, obj.body_bytes, obj.sig)
    except (CorruptObject, ObjectMissing, BadSignature):
        return False
    return True
