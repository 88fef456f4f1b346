"""Repository checks at three depths (all report every problem, naming the object).

- keyless: no key at all. Every object's bytes match its name; config and every signature chain
  to the master verify key (whose fingerprint must equal ``expect`` when given); each client's
  snapshot chain has no gap; every snapshot's pack set is complete (retired snapshots excepted).
- put key: the structural checks plus: every pack trailer of the client's dedup domain decrypts
  and agrees with the index; every chunk of every snapshot's chunk set is indexed in a pack of
  its pack set; the client's remembered chain head is still in the repository.
- read data (master key): additionally decrypt every blob of every pack and verify its chunk id,
  and hold every tree (the blobs of ``meta`` packs) to the rules restore and ls apply.
- at every depth: the chain heads nodes saw the repository of record hold (their witness
  statements, repo/witnesses.py) are still in it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import blake3

from bunker import encoding, heap
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import MasterKey
from bunker.crypto.sign import BadSignature, verify
from bunker.errors import BunkerError, CorruptObject, ObjectMissing, StorageError
from bunker.repo import refs
from bunker.repo.agreed_copies import AgreedCopies
from bunker.repo.certs import Certificate, parse_certificate
from bunker.repo.check_report import CheckReport
from bunker.repo.check_snapshots import Fresh, Pending, SnapshotChecks
from bunker.repo.checkpoint_roots import read_checkpoint_root
from bunker.repo.config import DEFAULT_PACKS, FORMAT_VERSION, parse_config
from bunker.repo.config_chain import missing_links
from bunker.repo.holding_records import read_holding
from bunker.repo.index import decrypt_index_ct, parse_index_frame
from bunker.repo.leases import sessions
from bunker.repo.location_arrays import ID, LocationColumns
from bunker.repo.node_acks import parse_ack, verify_ack
from bunker.repo.node_certs import parse_node_certificate, trusted_node
from bunker.repo.objects import (
    MAGIC_ACK,
    MAGIC_CKROOT,
    MAGIC_GC,
    MAGIC_HOLDING,
    MAGIC_INDEX,
    MAGIC_MOVED,
    content_hash,
    is_hash_name,
    parse_signed,
)
from bunker.repo.other_secret import NEXT_STEP
from bunker.repo.pack import (
    KIND_DATA,
    BlobEntry,
    WrongTrailerKey,
    decrypt_trailer,
    fetch_footer,
    open_group_key,
    parse_footer,
    verify_footer,
)
from bunker.repo.pack_verifier import IN_PROCESS_BYTES, PackJob, PackResult, PackVerifierPool
from bunker.repo.policy import read_policies
from bunker.repo.repository import Repository
from bunker.repo.status_records import status_problems
from bunker.repo.trailer_spans import OpenedTrailers, PackBlobs, span
from bunker.repo.witnesses import Source, Witness, statements_witnesses
from bunker.storage.backend import PREFIXES, Backend
from bunker.storage.prefixes import WRITTEN, rule_for

# a blob's place in its pack as the trailer gives it, packed into one int (offset, length, raw
# length): a tuple of three ints per chunk costs ~100 B more, for every chunk of the repository
# what a running prune deletes (packs, index objects it rewrites, its records) or a session
# removes when it ends (leases): such an object vanishing while the check runs is no damage
TRANSIENT = ("packs", "index", "gc", "sessions")
# listed in this order: everything an object names was stored before it (docs/format.md
# section 17), and a record explaining a pack's absence is stored before the pack is deleted
LIST_ORDER = (
    "status",  # names snapshots: listed before them
    *("config", "clients", "nodes", "policy", "snapshots", "refs", "index", "packs", "retired", "gc", "sessions"),
)


class Checker:
    def __init__(
        self,
        backend: Backend,
        expect: str | None,
        *,
        secrets: PutSecrets | None = None,
        master: MasterKey | None = None,
        heads: Iterable[Witness] = (),
        pending: Pending | None = None,
        progress: Callable[[str], None] | None = None,
        own_cert: str = "",
        statements: list[Source] | None = None,
    ) -> None:
        self.backend = backend
        self.expect = expect
        self.secrets = secrets
        self.master = master
        self.heads = list(heads)  # this machine's remembered chain heads: witnesses outside the storage
        self.statements = statements or []  # nodes' witness statements to read (repo/witnesses.py)
        self._witnesses: list[Witness] = []
        self.pending = pending  # this machine's snapshots waiting in its spool: not withheld
        self.report = CheckReport()
        self.progress = progress or (lambda s: None)
        self.repo: Repository | None = None
        self._domain_secrets: dict[str, PutSecrets] = {}
        self._stored: dict[str, float] = {}  # snapshot name -> the storage's own time for it
        self.own_cert = own_cert  # clients/<hash> of the put key checking, if any
        # pack hex -> its writer ("this client" or client 'x'): signed by a writer of a domain whose
        # secret this check has, trailer under another secret (repo/other_secret.py)
        self._other_secret: dict[str, str] = {}
        self._vanished: set[str] = set()  # transient objects gone between listing and reading
        self._trailers: dict[str, PackBlobs] = {}
        self._agreed = AgreedCopies()  # see _check_indexes
        self._read_before: set[str] = set()  # packs whose trailers the first pass read (see run)
        self._names: dict[str, list[str]] = {}
        self._pack_sizes: dict[str, int] = {}  # bytes of each pack listed at the start
        self._verifying: list[PackVerifierPool] = []  # pools whose workers may still verify blobs
        self._verify_error: StorageError | None = None  # the first storage failure a worker met

    # ------------------------------------------------------------------ entry point
    def run(self, keyless: bool) -> CheckReport:
        r = self.report
        r.mode = "read-data" if self.master else ("keyless" if keyless else "put-key")
        try:
            self.repo = Repository.open(self.backend, self.expect)
        except StorageError:
            raise  # an unreachable repository is not a damaged one
        except BunkerError as exc:
            r.add("config/", exc.message)
            return r
        repo = self.repo
        r.repo_id = repo.repo_id
        r.authenticated = self.expect is not None
        if self.expect is None:
            r.add(
                "config/",
                "no --expect FINGERPRINT given: the repository is only self-consistent; compare the "
                f"id {repo.repo_id} with the one on your key or in your own copy of RECOVERY.md",
                "warn",
            )
        infos = {p: list(self.backend.list(p + "/")) for p in LIST_ORDER if p in WRITTEN}
        names = {p: [i.name for i in infos[p]] for p in WRITTEN}
        self._names = names
        self._pack_sizes = {i.name: i.size for i in infos["packs"]}
        self._stored = {i.name: i.mtime for i in infos["snapshots"]}
        for p, ns in names.items():
            r.counts[p] = len(ns)
        self._report_strays()
        self.progress("configs and certificates")
        self._check_configs(names["config"])
        self._check_certs(names["clients"])
        self._check_node_certs(names["nodes"])
        for name, why, level in status_problems(repo):  # clients' run reports (repo/status_records.py)
            r.add(name, why, level)
        for name, why in read_policies(repo).problems:  # the owner's policy (repo/policy.py)
            r.add(name, f"policy refused: {why}" if "two policies" not in why else why)
        # this machine's heads first: a node's statement of the same head adds nothing
        self._witnesses = self.heads + statements_witnesses(repo, r, self.statements)
        if keyless or self.master:
            self._check_small_objects(names)
        self.progress("packs")
        self._full = keyless or self.master is not None
        # a node lists packs it evicted under record receipts: the repository of record holds
        # them (docs/hierarchy.md); they are named as upstream, never as missing or damaged
        upstream_names = getattr(self.backend, "upstream_names", None)
        upstream = upstream_names("packs/") if upstream_names is not None else set()
        self._upstream = upstream
        if upstream:
            r.counts["upstream"] = len(upstream)
            r.add(
                "packs/",
                f"{len(upstream)} packs are held upstream (evicted by this node under record receipts: "
                "the repository of record holds them; check it there)",
                "note",
            )
        try:
            # the workers go on verifying blobs while the index objects are checked against the
            # trailers (which are all read by then), and then the snapshots (nothing there waits
            # for what the workers find: they add their findings to the report)
            self._trailers = self._check_packs(
                [n for n in names["packs"] if n not in upstream], full=self._full, wait=False
            )
            self.progress("indexes")
            self._agreed = AgreedCopies()
            self._check_indexes(names["index"], self._trailers, self._agreed)
            # the trailers are not needed again unless index objects appear while the check runs:
            # dropped now, before the snapshots' chunks are looked up (a check of 10 M chunks
            # peaked at 1.17 GB with them kept, docs/performance.md); _settle reads again those
            # it needs
            self._read_before = set(self._trailers)
            self._trailers = {}
            heap.give_back()
            self.progress("snapshots")
            self._check_snapshots(names["snapshots"], names["retired"], set(names["packs"]), self._agreed)
            # where chunks are is not needed any more: gone before the wait for the workers (a
            # check of 200,000 chunks held ~10 MB of it while they verified)
            self._agreed, self._trailers = AgreedCopies(), {}
            heap.give_back()
        except BaseException:
            self._finish_verifying(cancel=True)  # stopped (Ctrl-C) or failed: not worth waiting for
            raise
        self._finish_verifying()
        self._check_records(names)
        r.counts["vanished_while_checking"] = len(self._vanished)
        return r

    def _vanish(self, name: str) -> None:
        with self.report._lock:
            self._vanished.add(name)

    # ------------------------------------------------------------------ pieces
    def _report_strays(self) -> None:
        """Names under a prefix that break its rule: no listing shows them, so nothing acts on
        them; bunker never writes one, so someone with access to the storage put it there."""
        for p in PREFIXES:
            strays = self.backend.strays(p + "/")
            what = f"not an object of format {FORMAT_VERSION} ({p}/ holds only files named by {rule_for(p)})"
            for name in strays.shown:
                self.report.add(name, f"{what}: bunker ignores it; find out who put it there, then remove it", "warn")
            if strays.count > len(strays.shown):
                self.report.add(f"{p}/", f"{strays.count - len(strays.shown)} more names there are {what}", "warn")

    def _get(self, name: str) -> bytes | None:
        try:
            data = self.backend.get(name)
        except ObjectMissing:
            if name.split("/", 1)[0] in TRANSIENT:
                self._vanish(name)  # a prune deleted it, or its session ended: see _settle
            else:
                self.report.add(name, "listed but cannot be read (vanished)")
            return None
        with self.report._lock:
            self.report.bytes_read += len(data)
        if is_hash_name(name) and content_hash(data) != name.split("/", 1)[1]:
            self.report.add(name, "its bytes do not match its name (altered, truncated or bit rot)")
            return None
        return data

    def _check_small_objects(self, names: dict[str, list[str]]) -> None:
        for prefix in ("refs",):
            for n in names[prefix]:
                data = self._get(n)
                if data is not None:
                    try:
                        refs.parse_refs(data)
                    except encoding.FormatError as exc:
                        self.report.add(n, f"malformed reference object: {exc}")

    def _check_configs(self, names: list[str]) -> None:
        assert self.repo
        for n in names:
            data = self._get(n)
            if data is None:
                continue
            try:
                cfg = parse_config(data)
            except encoding.FormatError as exc:
                self.report.add(n, f"invalid config: {exc}")
                continue
            if cfg.repo_id != self.repo.repo_id:
                self.report.add(
                    n, f"config signed by another master key (id {cfg.repo_id[:16]}…): substituted or foreign"
                )
        repo = self.repo
        if repo.chain.forked:
            self.report.add(
                repo.config_name,
                "the config history is forked: besides this version there are branches ending at "
                + ", ".join(repo.chain.fork)
                + "; every branch's revocations apply and writes are refused until the master key's holder runs "
                "`bunker key merge-configs`",
            )
        for cfg_name, missing in missing_links(repo.configs, repo.chain):
            self.report.add(cfg_name, f"it follows {missing}, which is missing (a config version was deleted)", "warn")

    def _check_certs(self, names: list[str]) -> None:
        assert self.repo
        for n in names:
            data = self._get(n)
            if data is None:
                continue
            try:
                self.repo._certs[n] = parse_certificate(data, self.repo.config.master_verify, self.repo.repo_id)
            except encoding.FormatError as exc:
                self.report.add(n, f"invalid client certificate: {exc}")

    def _check_ack(self, name: str, data: bytes) -> None:
        assert self.repo
        try:
            _, node, _, _, _ = parse_ack(data)
            cert = trusted_node(self.repo, node)
            if cert is None:
                raise encoding.FormatError(f"no trusted certificate of node {node[:16]} is in the repository")
            verify_ack(data, self.repo.repo_id, cert)
        except encoding.FormatError as exc:
            self.report.add(name, f"session acknowledgement not authentic: {exc}", "warn")

    def _check_node_certs(self, names: list[str]) -> None:
        assert self.repo
        for n in names:
            data = self._get(n)
            if data is None:
                continue
            try:
                parse_node_certificate(data, self.repo.config.master_verify, self.repo.repo_id)
            except encoding.FormatError as exc:
                self.report.add(n, f"invalid node certificate: {exc}")

    def _secrets_for_domain(self, domain_id: str) -> PutSecrets | None:
        if self.secrets is not None and self.secrets.domain_id == domain_id:
            return self.secrets
        if self.master is not None and self.repo is not None:
            if domain_id not in self._domain_secrets:
                try:
                    self._domain_secrets[domain_id] = self.repo.domain_secrets(self.master, domain_id)
                except BunkerError:
                    return None
            return self._domain_secrets[domain_id]
        return None

    def _check_packs(self, names: list[str], full: bool, data: bool = True, wait: bool = True) -> dict[str, PackBlobs]:
        """Verify every pack; return its trailer's blobs (pack hex -> blobs) where readable.
        With the master key (and ``data``), blobs are verified in worker processes (see
        pack_verifier); without ``wait`` some may still be when this returns: then
        :meth:`_finish_verifying` waits for them."""
        out: dict[str, PackBlobs] = {}
        lock = threading.Lock()
        # (not waiting: the jobs are handed to the workers from a thread of the pool's own while
        # the caller checks the index objects and the snapshots)
        verifier = None
        if self.master is not None and data:
            # few bytes: verified on a thread here, no worker process (a pack listed since the
            # start counts as a full one)
            few = sum(self._pack_sizes.get(n, DEFAULT_PACKS["target"]) for n in names) <= IN_PROCESS_BYTES
            verifier = PackVerifierPool(self.backend.url, queued=not wait, backend=self.backend if few else None)
        if verifier is not None:
            self._verifying.append(verifier)

        def one(n: str) -> None:
            try:
                self._check_pack(n, full, out, lock, verifier)
            except StorageError:
                raise
            except BunkerError as exc:
                self.report.add(n, exc.message)

        try:
            with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
                list(pool.map(one, names))
        except BaseException:
            self._finish_verifying(cancel=True)
            raise
        if verifier is not None:
            if wait:
                self._finish_verifying(verifier)
            else:
                verifier.close()
        return out

    def _finish_verifying(self, only: PackVerifierPool | None = None, cancel: bool = False) -> None:
        """Wait for the blobs being verified in worker processes (unless ``cancel``), then end
        the workers: those of pool ``only``, or of every pool."""
        verifying = [only] if only is not None else list(self._verifying)
        self._verifying = [v for v in self._verifying if v not in verifying]
        for verifier in verifying:
            verifier.shutdown(wait_for_jobs=not cancel)
        if cancel:
            return
        if self._verify_error is not None:
            error, self._verify_error = self._verify_error, None
            raise error

    def _check_pack(
        self,
        n: str,
        full: bool,
        out: dict[str, PackBlobs],
        lock: threading.Lock,
        verifier: PackVerifierPool | None,
    ) -> None:
        assert self.repo
        r = self.report
        # with the master key the worker reads the whole pack; here only its footer is needed
        data = self._get(n) if full and verifier is None else None
        try:
            if data is not None:
                footer = parse_footer(data, len(data))
            elif full and verifier is None:
                return
            else:
                footer = fetch_footer(self.backend, n)
        except ObjectMissing:
            self._vanish(n)
            return
        except encoding.FormatError as exc:
            r.add(n, f"pack footer unreadable: {exc}")
            return
        cert: Certificate | None = None
        unsigned = ""  # why the writer's signature cannot be verified, if it cannot
        try:
            cert = self.repo.certificate(footer.signer)
            verify_footer(footer, cert.verify_key)
        except (CorruptObject, ObjectMissing) as exc:
            unsigned = f"writer certificate {footer.signer} not usable: {exc.message}"
        except encoding.FormatError as exc:
            unsigned = f"{exc} (forged or altered)"
        if cert is not None and not unsigned and footer.signer in self.repo.revoked:
            r.add(n, f"written by revoked client {cert.client!r}", "warn")
        if data is not None and blake3.blake3(memoryview(data)[: footer.body_length]).digest() != footer.body_hash:
            r.add(n, "pack body does not match its signed hash (altered or bit rot)")
        secrets = self._secrets_for_domain(cert.domain) if cert is not None else self.secrets
        if secrets is None:
            if unsigned:
                r.add(n, unsigned)
            elif verifier is not None:  # the master key cannot open this domain: still check the bytes
                self._verify_in_worker(n, footer.body_length, footer.body_hash, [], [], b"\0" * 32, verifier)
            return
        try:
            trailer = decrypt_trailer(footer, secrets)
        except WrongTrailerKey:
            if unsigned or cert is None:  # without a valid signature a trailer that does not open is damage
                r.add(n, unsigned or "pack trailer does not decrypt (altered or bit rot)")
                return
            # the writer's signature holds, so the trailer is as written: under another secret
            with lock:
                self._other_secret[n.split("/", 1)[1]] = (
                    "this client" if footer.signer == self.own_cert else f"client {cert.client!r}"
                )
            return
        except encoding.FormatError as exc:
            r.add(n, unsigned or str(exc))
            return
        if unsigned:
            # docs/security.md, "A pack whose signature fails": authorship is lost, the blobs are not
            r.add(
                n,
                f"{unsigned}: who wrote it cannot be proven any more, but its trailer still authenticates with the "
                f"dedup domain's secret and each of its {len(trailer.blobs)} blobs with its chunk id, so restore "
                "still uses them; replace the pack from a mirror if you have one",
            )
        with lock:
            out[n.split("/", 1)[1]] = PackBlobs.of(trailer.blobs)
            r.counts["blobs"] += len(trailer.blobs)
        if verifier is None or self.master is None:
            return
        try:
            keys = [
                open_group_key(self.backend.get(n, o, ln), self.master.data_private, secrets.domain_id)
                for o, ln in trailer.groups
            ]
        except encoding.FormatError as exc:
            r.add(n, str(exc))
            return
        # (the worker takes the blobs from the trailer of the copy it reads: a job waiting for a
        # worker holds no list of them, so the trailers can go before the snapshots are checked)
        self._verify_in_worker(
            n, footer.body_length, footer.body_hash, keys, None, secrets.secret, verifier, trailer.kind
        )

    def _verify_in_worker(
        self,
        n: str,
        body_length: int,
        body_hash: bytes,
        keys: list[bytes],
        blobs: list[BlobEntry] | None,
        secret: bytes,
        verifier: PackVerifierPool,
        kind: str = KIND_DATA,
    ) -> None:
        info = self.backend.stat(n)
        if info is None:
            self._vanish(n)
            return
        job = PackJob(n, info.size, body_length, body_hash, keys, blobs, secret, kind)
        verifier.submit(job, lambda fut: self._verified(n, fut))

    def _verified(self, n: str, fut: Future[PackResult]) -> None:
        """Record what a worker found in pack ``n`` (on the thread that completed ``fut``)."""
        try:
            res = fut.result()
        except StorageError as exc:  # the storage failed, not the pack: the check ends (_finish_verifying)
            self._verify_error = self._verify_error or exc
            return
        except Exception as exc:  # noqa: BLE001 - a crashed worker is a finding, not the end of the check
            self.report.add(n, f"could not be verified (worker failed: {exc})")
            return
        if res.vanished:
            self._vanish(n)
            return
        for problem in res.problems:
            self.report.add(n, problem)
        with self.report._lock:
            self.report.bytes_read += res.bytes_read
            self.report.counts["blobs_verified"] += res.verified

    def _check_indexes(
        self, names: list[str], trailers: dict[str, PackBlobs], agreed: AgreedCopies
    ) -> None:
        """Check every index against the pack trailers; add chunk id and pack of the entries that
        agree to ``agreed`` (a chunk stored in more than one pack, because two writers stored the
        same chunk at once, has each: a snapshot that names any copy's pack is satisfied)."""
        assert self.repo
        opened = OpenedTrailers(trailers, self._trailer_again)
        for n in names:
            entries = self._index_entries(n)
            if entries is not None:
                agreed.add(self._agreeing(n, entries, opened))
                self.report.counts["index_entries"] += len(entries)
            # (the columns of one object at a time: a full object's are ~5 MB)
            del entries

    def _index_entries(self, n: str) -> LocationColumns | None:
        """The entries of index object ``n`` if it is authentic and decrypts (else reported);
        its bytes, ciphertext and plaintext (~5 MB each for a full object) are gone on return."""
        assert self.repo
        data = self._get(n)
        if data is None:
            return None
        try:
            obj = parse_index_frame(data)
            del data
            cert = self.repo.certificate(obj.signer)
            verify(cert.verify_key, MAGIC_INDEX, obj.body_bytes, obj.sig)
        except (encoding.FormatError, BadSignature, CorruptObject, ObjectMissing) as exc:
            self.report.add(n, f"index not authentic: {exc}")
            return None
        secrets = self._secrets_for_domain(obj.body["domain"])
        if secrets is None:
            return None
        # only the salt and the ciphertext are kept: the signed bytes go now, the ciphertext
        # once decrypted (~5 MB each for a full object)
        body = obj.body
        del obj
        try:
            return decrypt_index_ct(body["salt"], body.pop("ct"), secrets)
        except encoding.FormatError as exc:
            self.report.add(n, str(exc))
            return None

    def _agreeing(self, name: str, entries: LocationColumns, opened: OpenedTrailers) -> Iterator[tuple[bytes, str]]:
        """(chunk id, pack) of the entries of index object ``name`` that agree with their pack's
        trailer, one at a time (an object's 100,000 entries are never all held as objects);
        the first five that do not are reported."""
        wrong = 0
        ids, packs, cols = entries.ids, entries.packs, entries.cols
        # the columns read directly (a Location per entry cost more than its comparison), and
        # each pack looked up once per run of its entries (a writer lists them together)
        last, pack, spans, state = -1, "", None, ""
        for i, pno in enumerate(entries.pack_numbers):
            if pno != last:
                last, pack = pno, packs[pno]
                spans = opened.get(pack)
                if spans is not None:
                    state = "open"
                elif f"packs/{pack}" in self._vanished:
                    state = "vanished"  # deleted by a prune since it was listed (see _settle)
                elif f"packs/{pack}" in self._upstream:
                    state = "upstream"  # held upstream: checked there
                else:
                    state = "missing"
            cid = ids[ID * i : ID * (i + 1)]
            if state == "vanished":
                continue
            if state == "missing":
                wrong += 1
                if wrong <= 5:
                    self.report.add(
                        name, f"points chunk {cid.hex()[:16]} to pack {pack[:16]}… which is missing or unreadable"
                    )
                continue
            if spans is not None and spans.get(cid) != span(cols[3 * i], cols[3 * i + 1], cols[3 * i + 2]):
                wrong += 1
                if wrong <= 5:
                    self.report.add(name, f"entry for chunk {cid.hex()[:16]} disagrees with pack {pack[:16]}…")
                continue
            yield cid, pack

    def _trailer_again(self, pack: str) -> PackBlobs | None:
        """The trailer of a pack the first pass read, for an index object that appeared since
        (run() dropped them): read and verified again, what the first read found is reported
        already. None for a pack the first pass could not read (the entry is then reported)."""
        if pack not in self._read_before:
            return None
        report, self.report = self.report, CheckReport()
        try:
            return self._check_packs([f"packs/{pack}"], full=False, data=False).get(pack)
        finally:
            self.report = report

    def _check_snapshots(
        self, names: list[str], retired_names: list[str], packs: set[str], agreed: AgreedCopies
    ) -> None:
        assert self.repo
        needed = SnapshotChecks(
            self.repo,
            self.report,
            self._get,
            self._secrets_for_domain,
            self.master,
            self._witnesses,
            self._stored,
            self.pending,
        ).run(names, retired_names, packs, agreed, set(self._other_secret), self._settle)
        for pack, who in sorted(self._other_secret.items()):
            what = (
                f"written with another secret: its writer's signature holds, but its trailer does not open with the "
                f"secret of its dedup domain, so {who}'s put key was damaged when it wrote it; nothing in it can be "
                "restored"
            )
            users = needed.get(pack, [])
            if users:
                needs = f"{len(users)} trusted snapshot(s) need it (e.g. {users[0]})"
                self.report.add(f"packs/{pack}", f"{what}, and {needs}; {NEXT_STEP}", cause="other-secret")
            else:
                self.report.add(
                    f"packs/{pack}", f"{what}; no trusted snapshot needs it; {NEXT_STEP}", "warn", cause="other-secret"
                )

    def _settle(self) -> Fresh:
        """List packs, index objects, retirements again and read what appeared since the first
        listing (index objects a prune wrote anew, packs of a repack), so that what snapshots
        miss is judged on the repository as it is now, not on listings taken while a prune
        deleted what no snapshot needs any more."""
        # index objects before packs, as at the start (LIST_ORDER)
        index_now = [i.name for i in self.backend.list("index/")]
        listed = {i.name for i in self.backend.list("packs/")}
        start = set(self._names["packs"])
        new_packs = sorted(listed - start)
        if new_packs:
            self._trailers.update(self._check_packs(new_packs, full=self._full))
            self._names["packs"] += new_packs
        new_index = sorted(set(index_now) - set(self._names["index"]))
        if new_index:
            self._check_indexes(new_index, self._trailers, self._agreed)
            self._names["index"] += new_index
        gone = {n for n in start if n not in listed} | {n for n in self._vanished if n.startswith("packs/")}
        present = listed - {n for n in self._vanished if n.startswith("packs/")}
        return Fresh(
            packs=present,
            agreed=self._agreed,
            retired_names=[i.name for i in self.backend.list("retired/")],
            vanished={n.split("/", 1)[1] for n in gone},
        )

    def _check_records(self, names: dict[str, list[str]]) -> None:
        assert self.repo
        problems: list[tuple[str, str]] = []
        sessions(self.repo, problems)  # leases that name another object, or are not authentic
        for lease, why in problems:
            self.report.add(lease, f"{why}; it protects nothing, and `bunker prune` removes it once it is 6 h old")
        for n in names["gc"]:
            data = self._get(n)
            if data is None:
                continue
            if data[:4] == MAGIC_ACK:  # a node's session acknowledgement (repo/node_acks.py)
                self._check_ack(n, data)
                continue
            if data[:4] == MAGIC_CKROOT:  # a checkpoint held by a node (repo/checkpoint_roots.py)
                try:
                    read_checkpoint_root(self.repo, n, data)
                except encoding.FormatError as exc:
                    self.report.add(n, f"checkpoint root not usable: {exc}", "warn")
                continue
            if data[:4] == MAGIC_HOLDING:  # snapshots a node holds for its upstream (repo/holding_records.py)
                try:
                    read_holding(self.repo, n, data)
                except encoding.FormatError as exc:
                    why = "it is ignored, so it hides no gap in a chain; `bunker prune` removes it"
                    self.report.add(n, f"holding record not authentic: {exc}; {why}", "warn")
                continue
            # gc/ also holds the move records of repacks (repo/moves.py)
            m = MAGIC_MOVED if data[:4] == MAGIC_MOVED else MAGIC_GC
            try:
                obj = parse_signed(data, m)
                verify(self.repo.certificate(obj.signer).verify_key, m, obj.body_bytes, obj.sig)
            except (encoding.FormatError, BadSignature, CorruptObject, ObjectMissing) as exc:
                self.report.add(n, f"record not authentic: {exc}")
