"""The client's spool for one upstream repository: where a backup goes while the repository
cannot be reached (docs/user-guide.md, "When the repository cannot be reached"; docs/reliability.md).

A spool is a partial repository in the same format under the data directory
(``spool/<hash of the upstream URL>/``). It holds the *seed* (the upstream's config versions and
this client's certificate, copied on every successful run so that a later run can open the
repository without the upstream) and the objects written while the upstream was unreachable,
until ``bunker forward`` has delivered them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

from bunker import dirs, encoding
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError, ExitCode, ObjectMissing
from bunker.private_files import private_dirs, tighten_own, write_private_file
from bunker.repo.objects import content_hash, is_hash_name
from bunker.repo.records import parse_lease
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot
from bunker.storage.backend import FIXED_NAMES, Backend, ObjectInfo
from bunker.storage.local import LocalBackend
from bunker.storage.refused import StorageRefused
from bunker.storage.spooling import SpoolingBackend, pending_objects

UPSTREAM_FILE = "UPSTREAM"  # the upstream URL, for people looking into the directory
# what ``Spool.delivering`` finds: this delivery holds the object, another holds it, or it is gone
MINE, BUSY, GONE = "mine", "busy", "gone"


class Spool:
    """The spool directory for ``upstream_url``."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.root = dirs.spool_dir(upstream_url)
        tighten_own(self.root, children=True)  # one an older version made with the umask's mode

    def seeded(self) -> bool:
        """True once a run reached the upstream and copied its config here."""
        try:
            return any(not n.startswith(".") for n in os.listdir(os.path.join(self.root, "config")))
        except OSError:
            return False

    def backend(self) -> LocalBackend:
        """The spool as a local backend (created on first use)."""
        fresh = not os.path.isdir(self.root)
        private_dirs(self.root)  # 0700 from the data directory down, whatever the umask
        b = LocalBackend(self.root, create=True)
        if fresh:
            write_private_file(os.path.join(self.root, UPSTREAM_FILE), self.upstream_url + "\n")
        return b

    def pending(self) -> list[ObjectInfo]:
        """Objects waiting for the upstream, in forwarding order (empty when there is no spool)."""
        if not os.path.isdir(self.root):
            return []
        return pending_objects(LocalBackend(self.root))

    @contextlib.contextmanager
    def delivering(self, name: str, *, wait: bool) -> Iterator[str]:
        """Hold the spooled object ``name`` for one delivery while the block runs: MINE (send
        it, then delete it inside the block), BUSY (another delivery holds it; only when not
        ``wait``ing) or GONE (delivered by another). The hold is an flock on the object's file:
        the kernel releases it when its process ends, however it ends."""
        try:
            fd = os.open(os.path.join(self.root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            yield GONE
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                yield BUSY
                return
            # the delivery that held it deleted it: this descriptor names a file without a name
            yield MINE if os.fstat(fd).st_nlink > 0 else GONE
        finally:
            os.close(fd)

    def seed(self, repo: Repository, put: PutKey) -> str:
        """Copy what opening the repository offline needs: every config version and this client's
        certificate (objects are immutable: only missing ones are fetched). Returns why the spool
        could not be written ("" when it could): a full or read-only disk under the data
        directory costs only the fallback, never the backup at hand. The upstream's failures
        are raised."""
        cert = repo.check_put_key(put)
        wanted = [i.name for i in repo.backend.list("config/")] + [cert.name]
        try:
            spool = self.backend()
            missing = [name for name in wanted if spool.stat(name) is None]
        except (BunkerError, OSError) as exc:
            return self._unwritable(exc)
        for name in missing:
            try:
                data = repo.get_object(name)
            except ObjectMissing:
                continue
            try:
                spool.put(name, data)
            except (BunkerError, OSError) as exc:
                return self._unwritable(exc)
        return ""

    def _unwritable(self, exc: BaseException) -> str:
        why = exc.message if isinstance(exc, BunkerError) else (getattr(exc, "strerror", None) or str(exc))
        return (
            f"the local spool {self.root} cannot be written ({why}): were the repository unreachable, a backup could "
            "not be kept there; free space on that disk (or make it writable)"
        )

    def pending_snapshots(self) -> dict[str, dict[int, tuple[str, str]]]:
        """The snapshots waiting here for the upstream: certificate -> seq -> (name, prev), as
        their envelopes say (`bunker check` takes them as pending, not withheld)."""
        out: dict[str, dict[int, tuple[str, str]]] = {}
        if not os.path.isdir(self.root):
            return out
        spool = LocalBackend(self.root)
        for info in spool.list("snapshots/"):
            try:
                env = parse_snapshot(spool.get(info.name)).env
            except (encoding.FormatError, ObjectMissing):
                continue
            out.setdefault(env.cert, {})[env.seq] = (info.name, env.prev)
        return out

    def clear_leftovers(self) -> int:
        """Remove what is never forwarded: leases of finished offline runs, recovery documents
        (every run that reaches the upstream rewrites those there)."""
        if not os.path.isdir(self.root):
            return 0
        spool = LocalBackend(self.root)
        gone = 0
        carrying = _sessions_with_checkpoints(spool)
        for info in list(spool.list("sessions/")):
            if info.name.split("/", 1)[1].rpartition(".")[0] in carrying:
                continue  # a killed offline run: this machine's next backup adopts its checkpoint
            spool.delete(info.name)
            gone += 1
        for name in FIXED_NAMES:
            if spool.stat(name) is not None:
                spool.delete(name)
                gone += 1
        return gone


def offline_repository(spool: Spool, expected_id: str | None, exc: BunkerError) -> Repository:
    """Open the repository from its spool while the upstream cannot be reached (``exc`` says
    why); without a seed (no run ever reached the upstream) the original error stands."""
    if not spool.seeded():
        raise BunkerError(
            exc.message,
            (exc.hint + "; " if exc.hint else "")
            + "no backup has reached this repository from this machine yet, so there is nothing to store "
            "the backup against locally: no backup was taken",
            exit_code=exc.exit_code,
        ) from None
    refused = exc if isinstance(exc, StorageRefused) else None
    backend = SpoolingBackend(None, spool.backend(), reason=exc.message, url=spool.upstream_url, refused=refused)
    return Repository.open(backend, expected_id)


def spooling_repository(repo: Repository, spool: Spool) -> Repository:
    """``repo`` with writes falling back to ``spool`` if its backend stops answering."""
    return repo.with_backend(SpoolingBackend(repo.backend, spool.backend()))


def verify_by_name(backend: Backend, name: str, size: int, block: int = 8 << 20) -> bool:
    """True if ``backend`` holds ``name`` with ``size`` bytes whose hash is the name (read in
    blocks: a pack is never held in memory twice). An object a node evicted under record
    receipts counts as held."""
    info = backend.stat(name)
    if info is None or info.size != size:
        return False
    if not is_hash_name(name):
        return True
    try:
        if size <= block:
            return content_hash(backend.get(name)) == name.split("/", 1)[1]
        return _hash_in_blocks(backend, name, size, block) == name.split("/", 1)[1]
    except ObjectMissing:
        # a node lists what it evicted once the repository of record recorded it (a run killed
        # after its put went through, then the node forwarded and evicted): held upstream is held
        upstream_names = getattr(backend, "upstream_names", None)
        if upstream_names is not None and name in upstream_names(name.split("/", 1)[0] + "/"):
            return True
        raise


def _hash_in_blocks(backend: Backend, name: str, size: int, block: int) -> str:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    off = 0
    while off < size:
        piece = backend.get(name, off, min(block, size - off))
        if not piece:
            return ""
        h.update(piece)
        off += len(piece)
    return h.hexdigest()


def parse_age(text: str) -> float:
    """``90``, ``90s``, ``45m``, ``12h``, ``3d`` -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    t = text.strip().lower()
    mult = units.get(t[-1:])
    try:
        value = float(t[:-1] if mult else t) * (mult or 1.0)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise BunkerError(
            f"{text!r} is not an age",
            "give seconds or a number with s, m, h or d (e.g. 3d)",
            exit_code=ExitCode.USAGE,
        )
    return value


def _sessions_with_checkpoints(spool: LocalBackend) -> set[str]:
    """Session ids whose newest lease object in the spool carries a checkpoint."""
    newest: dict[str, tuple[int, str]] = {}
    for info in spool.list("sessions/"):
        sid, _, counter = info.name.split("/", 1)[1].rpartition(".")
        if counter.isdigit() and int(counter) >= newest.get(sid, (-1, ""))[0]:
            newest[sid] = (int(counter), info.name)
    out = set()
    for sid, (_, name) in newest.items():
        try:
            body, _signer = parse_lease(spool.get(name))
        except (encoding.FormatError, ObjectMissing):
            continue
        if body.get("checkpoint"):
            out.add(sid)
    return out
