"""Restore: recreate a snapshot's tree (or parts of it) under a target directory.

The main thread walks the trees, creates directories, symlinks and special files, and locates
every file's chunks in their packs' trailers, opening each pack's key groups (this needs the
master key). Files are written by worker processes (small files, in batches: a worker unwraps
each blob's key with the key groups it is given) or threads (large files: decryption and
decompression release the GIL). A file that cannot be fully restored is written with its
damaged ranges left as holes and reported; the rest goes on.

Order across the tree: every name first (items, then the further names of hard-linked inodes,
linked once all data is written), then directory metadata bottom-up (so writing into a directory
does not change its times, and its default ACL is not inherited by the restored items), then
inode flags last of all (immutable and append-only forbid linking, utime and setxattr). Per
inode, file_writer.py applies owner, mode, xattrs, ACL and times in the order that keeps each.

Without root, what cannot be restored (owners, devices, trusted.* xattrs, security.capability,
immutable/append-only flags) is listed as ``note`` events that say how to get it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing, RequestedUpstream
from bunker.fs import deep_path
from bunker.fs.fsmeta import flag_letters, locked_flags, locked_message, set_flags, unlock
from bunker.repo.blob_reader import BlobReader, BlobRef, OpenPack, ReadAhead
from bunker.repo.tree import MAX_TREE, TreeBudget, decode_tree
from bunker.restore.file_writer import (
    MetaNote,
    Piece,
    WriteResult,
    apply_meta,
    open_part,
    owner_ids,
    remove_existing,
    write_file,
)
from bunker.restore.workers import RETRY, BatchResult, RestorePool, WireItem, WirePiece
from bunker.runlog import RunLog, display_path
from bunker.storage import Backend

SMALL_FILE = 256 << 10  # files up to this size go to worker processes ...
SMALL_POOL_AFTER = 1000  # ... once this many were seen
BATCH_FILES = 1024
BATCH_BYTES = 8 << 20


# a small file waiting for its batch: (path, chunk ids, metadata entry without them, fresh)
BatchFile = tuple[bytes, list[bytes], dict[str, Any], bool]


class DiskFull(BunkerError):
    exit_code = ExitCode.ERR


_TARGET_HINTS = {
    errno.EROFS: "the filesystem is mounted read-only: restore into a --target on a writable filesystem",
    errno.EACCES: "this user may not write there: choose a --target you own, or restore as a user who may write there",
    errno.EPERM: "the target does not take new files (an immutable directory?): choose another --target",
    errno.ENOSPC: "the target's filesystem is full: free space there, or choose a --target with room",
    errno.EDQUOT: "your disk quota is used up: free space, or choose a --target on another filesystem",
    errno.ENOTDIR: "a part of that path is a file, not a directory: choose another --target",
}


def target_unusable(target: bytes, exc: OSError) -> BunkerError:
    """The fatal error for a restore target that takes nothing: what failed, and where to go."""
    shown = display_path(target)
    return BunkerError(
        f"cannot restore into {shown}: {exc.strerror or exc}; nothing was restored",
        _TARGET_HINTS.get(exc.errno or 0, f"check that {shown} can be written to, or choose another --target"),
        exit_code=ExitCode.FATAL,
    )


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    hardlinks: int = 0
    other: int = 0
    bytes: int = 0
    failed: int = 0
    requested: int = 0  # of the failed: files waiting for data a node requested upstream
    kept: int = 0  # files an earlier run of a batched restore wrote (restore/batches.py)


def small_files_before_workers(backend: Backend) -> int:
    """How many small files a restore from ``backend`` writes itself before the worker processes
    take them: :data:`SMALL_POOL_AFTER`, none from a remote repository (each read there costs a
    round trip: small files are batched from the start)."""
    return 0 if backend.capabilities().remote else SMALL_POOL_AFTER


@dataclass
class Restorer:
    reader: BlobReader
    target: bytes
    log: RunLog
    numeric_owner: bool = False
    threads: int = 3
    stats: RestoreStats = field(default_factory=RestoreStats)
    # caps each walk at the snapshot's signed statistics; the default has only the cycle rule
    budget: TreeBudget = field(default_factory=TreeBudget)
    # a batched restore (restore/batches.py): packs not at hand now; a file with data in one is
    # left for a later batch (listed in ``deferred`` with its packs) ...
    unavailable: set[str] | None = None
    # ... files (paths below the target) an earlier run's batches wrote, left as they are ...
    done_before: set[bytes] = field(default_factory=set)
    # ... and directory metadata and flags wait for :meth:`finish_tree`
    hold_final: bool = False

    def __post_init__(self) -> None:
        self._as_root = os.geteuid() == 0
        self._disk_full = threading.Event()
        self._lock = threading.Lock()
        self._requested: set[bytes] = set()  # files with data a node requested upstream
        self._small_seen = 0
        self._pool_after = small_files_before_workers(self.reader.repo.backend)
        self._batch: list[BatchFile] = []
        self._batch_bytes = 0
        self._procs: RestorePool | None = None
        # only pending work is kept: a finished batch's paths and entries are released at once
        self._pending: set[Future[Any]] = set()
        self._all_done = threading.Condition(self._lock)
        self._worker_error: BaseException | None = None
        self._slots = threading.BoundedSemaphore(2 * (os.cpu_count() or 2) + 2)
        self._links: dict[int, bytes] = {}  # hard links: ino -> the name restored first
        self._more_names: list[tuple[bytes, dict[str, Any], bool]] = []  # further names, linked at the end
        self._flagged: list[tuple[bytes, int]] = []  # inode flags, set last
        self._ids = (os.geteuid(), os.getegid())
        self._owners_lost = 0
        self._owner_example: tuple[bytes, dict[str, Any]] | None = None
        self._dirs: list[tuple[bytes, dict[str, Any]]] = []
        self.deferred: list[tuple[bytes, set[str]]] = []  # (path below the target, its packs)
        self._deferred_inos: dict[int, set[str]] = {}

    # ------------------------------------------------------------------ trees
    def tree(self, tid: bytes) -> list[dict[str, Any]]:
        try:
            return decode_tree(self.reader.read(tid, max_raw=MAX_TREE))
        except encoding.FormatError as exc:
            raise CorruptObject(f"tree {tid.hex()[:16]}", str(exc)) from None

    def walk_tree(self, depth: int, tid: bytes, where: str) -> list[dict[str, Any]]:
        """A tree read by a walk (restore, export, ls): ``depth`` below the walk's first tree,
        ``where`` the directory as shown; counted by :attr:`budget` (FORMAT.md section 14)."""
        self.budget.enter(depth, tid, where)
        entries = self.tree(tid)
        self.budget.count(entries, where)
        return entries

    def find(self, root: bytes, path: str) -> dict[str, Any]:
        """The entry at ``path`` inside the snapshot (a synthetic dir entry for the root)."""
        chain = self.chain(root, path)
        return chain[-1] if chain else {"n": b"", "t": "d", "st": root}

    def chain(self, root: bytes, path: str) -> list[dict[str, Any]]:
        """The entries of ``path``'s components inside the snapshot, from the root's child down
        to the entry of ``path`` itself (empty for the root)."""
        out: list[dict[str, Any]] = []
        entry: dict[str, Any] = {"n": b"", "t": "d", "st": root}
        for comp in [c for c in os.fsencode(path).split(b"/") if c]:
            match = [e for e in self.tree(entry["st"]) if e["n"] == comp] if entry["t"] == "d" else []
            if not match:
                raise BunkerError(
                    f"{path} is not in this snapshot", "list it with `bunker ls SNAPSHOT`", exit_code=ExitCode.USAGE
                )
            entry = match[0]
            out.append(entry)
        return out

    # ------------------------------------------------------------------ restoring
    def restore(self, root: bytes, paths: list[str]) -> RestoreStats:
        """Restore ``paths`` of the snapshot whose root tree is ``root`` (all of it without
        paths) below the target. Every path below the target is reached from the target's
        descriptor without following symlinks (deep_path.confined); the directories above a
        restored path are made like every other directory (:meth:`_mkdir`)."""
        deep_path.forget()  # directories cached by an earlier run in this process may be gone
        try:
            deep_path.makedirs(self.target)  # the target itself as the user named it
            target_id = deep_path.confine(self.target)
        except OSError as exc:  # the target itself: nothing can be restored at all
            raise target_unusable(self.target, exc) from None
        try:
            self._probe_target()
            self._restore_below(root, paths, target_id)
        finally:
            deep_path.release(self.target)
        return self.stats

    def _probe_target(self) -> None:
        """Create and remove a file in the target: a target that takes nothing (read-only,
        not permitted, full) stops the restore before it starts, as one fatal error."""
        try:
            fd, part = open_part(os.path.join(self.target, b"probe"))
            os.close(fd)
            deep_path.unlink(part)
        except OSError as exc:
            raise target_unusable(self.target, exc) from None

    def _restore_below(self, root: bytes, paths: list[str], target_id: tuple[int, int]) -> None:
        dirs: list[tuple[bytes, dict[str, Any]]] = []
        self._procs = RestorePool(
            self.reader.repo.backend.url, self.reader.secrets, self._as_root, self.numeric_owner, self.target, target_id
        )
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="bunker-restore") as pool:
                self._threads = pool
                for p in paths or ["/"]:
                    self.budget.reset()
                    chain = self.chain(root, p)
                    if not chain:
                        self._restore_dir(root, self.target, dirs)
                        continue
                    parent = self._parents(chain[:-1], dirs)
                    if parent is not None:
                        self._restore_entry(chain[-1], os.path.join(parent, chain[-1]["n"]), dirs, False)
                self._flush_batch()
                with self._all_done:
                    self._all_done.wait_for(lambda: not self._pending)
                if self._worker_error is not None:
                    raise self._worker_error
        finally:
            self._procs.shutdown()
        for path, e, fresh in self._more_names:
            self._hardlink(path, e, fresh)
        self._dirs = dirs
        if not self.hold_final:
            self.finish_tree()
        if self._owners_lost and self._owner_example is not None:
            path, e = self._owner_example
            self.log.add(
                "note",
                "owner-not-restored",
                f"{self._owners_lost} restored items belong to another user or group in the snapshot (this one: "
                f"{e.get('U') or e['u']}:{e.get('G') or e['g']}) and now belong to the user who restored them: "
                "only root can give them back their owners, so restore as root to get owners, devices, trusted.* "
                "xattrs, file capabilities and immutable/append-only flags",
                path,
            )
        if self._disk_full.is_set():
            raise DiskFull(
                f"the target's disk is full: {self.stats.files} files restored, {self.stats.failed} not (no file "
                "is left half-written under its name)",
                f"free space under {display_path(self.target)} (or choose another --target) and run the restore again",
                # nothing restored at all is fatal, as a target that takes nothing is
                exit_code=ExitCode.ERR if self.stats.files else ExitCode.FATAL,
            )

    def finish_tree(self) -> None:
        """Directory metadata bottom-up, then inode flags: last, once every item is written (a
        batched restore calls it when its last batch is done: docs/hierarchy.md)."""
        for path, e in reversed(self._dirs):
            self._meta(path, e)
        for path, fl in reversed(self._flagged):
            lost, why = set_flags(path, fl, self._as_root)
            if lost:
                self.log.add(
                    "note",
                    "flags-not-restored",
                    f"inode flags {flag_letters(lost) or hex(lost)} not restored ({why})"
                    + ("; restore as root to set them" if not self._as_root else ""),
                    path,
                )

    def _parents(self, chain: list[dict[str, Any]], dirs: list[tuple[bytes, dict[str, Any]]]) -> bytes | None:
        """Make the directories above a path restored alone, each as the full restore makes a
        directory of the snapshot (:meth:`_mkdir`: an existing directory is kept, a symlink or
        anything else in its place replaced, never followed); those it creates get their
        snapshot metadata. The path of the last one, or None when one could not be made (reported)."""
        path = self.target
        for e in chain:
            path = os.path.join(path, e["n"])
            created = self._mkdir(path, False)
            if created is None:
                return None
            if created:
                self._dir_done(path, e, dirs)
        return path

    def _restore_dir(
        self, tid: bytes, path: bytes, dirs: list[tuple[bytes, dict[str, Any]]], fresh: bool = False
    ) -> None:
        """Restore a directory's contents; ``fresh``: ``path`` was created empty by this restore."""
        stack = [(tid, path, fresh, 0)]
        while stack:
            t, p, fresh, depth = stack.pop()
            try:
                entries = self.walk_tree(depth, t, display_path(p))
            except (CorruptObject, ObjectMissing) as exc:
                if isinstance(exc, RequestedUpstream):  # a wait, not damage: the rerun restores it
                    self.log.add("err", "restore-requested", f"directory contents not restored yet: {exc.message}", p)
                    self.stats.requested += 1
                else:
                    self.log.add("err", "tree-damaged", f"directory contents cannot be restored: {exc.message}", p)
                self.stats.failed += 1
                continue
            names: set[bytes] = set()
            head = p if p.endswith(b"/") else p + b"/"  # (a name holds no "/": tree.py checked it)
            for e in entries:
                full = head + e["n"]
                if e["n"] in names:  # never from a valid snapshot: the first one stays
                    self._failed(full, FileExistsError(errno.EEXIST, "a name twice in one directory"), "skipped")
                    continue
                names.add(e["n"])
                if e["t"] == "d":
                    created = self._mkdir(full, fresh)
                    if created is not None:
                        self._dir_done(full, e, dirs)
                        stack.append((e["st"], full, created, depth + 1))
                else:
                    self._restore_entry(e, full, dirs, fresh)

    def _dir_done(self, full: bytes, e: dict[str, Any], dirs: list[tuple[bytes, dict[str, Any]]]) -> None:
        dirs.append((full, e))
        if "fl" in e:
            self._flagged.append((full, e["fl"]))
        if not self._as_root:
            self._owner_check(full, e)

    def _owner_check(self, path: bytes, e: dict[str, Any]) -> None:
        """Without root, count the items whose owner cannot be restored."""
        if "u" in e and (owner_ids(e) if not self.numeric_owner else (e["u"], e["g"])) != self._ids:
            self._owners_lost += 1
            if self._owner_example is None:
                self._owner_example = (path, e)

    def _restore_entry(
        self, e: dict[str, Any], full: bytes, dirs: list[tuple[bytes, dict[str, Any]]], fresh: bool
    ) -> None:
        """Restore one item; ``fresh``: its parent was created empty by this restore."""
        t = e["t"]
        if t == "f" and self.unavailable is not None and self._left_for_later(e, full):
            return
        if "ino" in e and t != "d":
            if e["ino"] in self._links:  # a further name of an inode restored already: linked at the end
                self._more_names.append((full, e, fresh))
                return
            self._links[e["ino"]] = full
        if t != "d":
            if "fl" in e and t == "f":
                self._flagged.append((full, e["fl"]))
            if not self._as_root:
                self._owner_check(full, e)
        if t == "d":
            created = self._mkdir(full, fresh)
            if created is not None:
                self._dir_done(full, e, dirs)
                self._restore_dir(e["st"], full, dirs, created)
        elif t == "f":
            self._restore_file(e, full, fresh)
        elif t == "l":
            try:
                if not fresh:
                    remove_existing(full, as_root=self._as_root)
                deep_path.symlink(e["lt"], full)
            except OSError as exc:
                self._failed(full, exc, "cannot create symlink")
                return
            self._meta(full, e)
            self.stats.links += 1
        else:
            self._restore_special(e, full, fresh)

    def _left_for_later(self, e: dict[str, Any], full: bytes) -> bool:
        """In a batched restore: whether this file waits for a later batch (its data is in a pack
        not at hand; further names of its inode wait with it) or an earlier run wrote it."""
        rel = os.path.relpath(full, self.target)
        if rel in self.done_before:
            self.stats.kept += 1
            return True
        ino = e.get("ino")
        packs = self._deferred_inos.get(ino) if ino is not None else None
        if packs is None:
            locations = self.reader.locations
            packs = {loc.pack for cid in e.get("c", []) if (loc := locations.get(cid)) is not None}
            assert self.unavailable is not None
            if not packs & self.unavailable:
                return False
            if ino is not None:
                self._deferred_inos[ino] = packs
        self.deferred.append((rel, packs))
        return True

    def _mkdir(self, path: bytes, parent_fresh: bool) -> bool | None:
        """Create a directory: True if created empty, False if an existing one is reused, None on failure."""
        created = True
        try:
            deep_path.mkdir(path, 0o700)
        except FileExistsError:
            if parent_fresh:  # a name twice in one tree: never from a valid snapshot
                self._failed(path, FileExistsError(errno.EEXIST, "duplicate name in the snapshot"), "skipped")
                return None
            created = False
            try:
                mode = deep_path.lstat(path).st_mode  # a symlink to a directory is not one
            except OSError:
                mode = 0
            if not stat.S_ISDIR(mode):
                try:
                    remove_existing(path, as_root=self._as_root)
                except OSError as exc:
                    what = "a symlink" if stat.S_ISLNK(mode) else "an item that is not a directory"
                    self._failed(
                        path,
                        exc,
                        f"{what} is where the snapshot has a directory and cannot be replaced, so nothing is "
                        "restored below it (it is never followed); remove it, or restore into another --target",
                    )
                    return None
                try:
                    deep_path.mkdir(path, 0o700)
                    created = True
                except OSError as exc:
                    self._failed(path, exc, "cannot create directory")
                    return None
            elif locked_flags(path) and not (self._as_root and unlock(path)):
                # an immutable or append-only directory of an earlier restore: nothing can go in
                self._failed(path, PermissionError(errno.EPERM, locked_message(path)), "cannot restore into it")
                return None
        except OSError as exc:
            self._failed(path, exc, "cannot create directory")
            return None
        self.stats.dirs += 1
        return created

    # ------------------------------------------------------------------ files
    def _pieces(self, e: dict[str, Any], path: bytes) -> list[Piece]:
        return self._pieces_of(e.get("c", []), path)

    def _pieces_of(self, cids: list[bytes], path: bytes) -> list[Piece]:
        return self._as_pieces(cids, self.reader.refs(cids), path)

    def _as_pieces(self, cids: list[bytes], refs: Iterable[BlobRef | BunkerError], path: bytes) -> list[Piece]:
        """The pieces of a file from its chunks' :meth:`BlobReader.refs`: a chunk that cannot be
        read becomes its length (where the index knows it) and why."""
        out: list[Piece] = []
        for cid, ref in zip(cids, refs, strict=True):
            if type(ref) is BlobRef:
                out.append(ref)
                continue
            assert isinstance(ref, BunkerError)
            if isinstance(ref, RequestedUpstream):  # a wait, not damage (see _done)
                with self._lock:
                    self._requested.add(path)
            loc = self.reader.locations.get(cid)
            out.append((loc.raw_length if loc else 0, ref.message))
        return out

    def _restore_file(self, e: dict[str, Any], path: bytes, fresh: bool) -> None:
        if self._disk_full.is_set():
            self.stats.failed += 1
            return
        meta = dict(e)  # a copy without the chunk list (its pieces go separately)
        cids = meta.pop("c", [])
        size = e.get("sz", 0)
        self._small_seen += size <= SMALL_FILE
        if size <= SMALL_FILE and self._small_seen > self._pool_after:
            # located when the batch is sent, all its chunks at once
            self._batch.append((path, cids, meta, fresh))
            self._batch_bytes += size
            if len(self._batch) >= BATCH_FILES or self._batch_bytes >= BATCH_BYTES:
                self._flush_batch()
        else:
            pieces = self._pieces(e, path)
            self._track(self._threads.submit(self._write_in_thread, path, pieces, meta, fresh))

    def _track(self, fut: Future[Any], errors_handled: bool = False) -> None:
        """Keep ``fut`` until it is done; an exception it ends with (unless ``errors_handled`` by
        its own callback) is raised when the restore finishes."""
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(lambda f: self._untrack(f, errors_handled))

    def _untrack(self, fut: Future[Any], errors_handled: bool) -> None:
        with self._all_done:
            self._pending.discard(fut)
            exc = None if errors_handled or fut.cancelled() else fut.exception()
            if exc is not None and self._worker_error is None:
                self._worker_error = exc
            self._all_done.notify_all()

    def _write_in_thread(self, path: bytes, pieces: list[Piece], e: dict[str, Any], fresh: bool) -> None:
        meta = lambda fd: apply_meta(fd, e, self._as_root, self.numeric_owner)  # noqa: E731
        r = write_file(
            path,
            pieces,
            ReadAhead(self.reader.repo.backend, self.reader.secrets, [p for p in pieces if isinstance(p, BlobRef)]),
            fresh=fresh,
            meta=meta,
            size=e.get("sz", 0),
            holes=e.get("hole"),
            as_root=self._as_root,
        )
        self._done(path, r)

    def _flush_batch(self) -> None:
        """Send the batch to a worker process. Its chunks are located here all at once and found
        in their packs' trailers (the master key that opens the packs' key groups stays in this
        process); the worker unwraps the blobs' keys. A file with a chunk that is not located or
        not found, or in a pack that cannot be opened, is resolved here whole (its pieces say why)."""
        if not self._batch or self._procs is None:
            return
        files, self._batch, self._batch_bytes = self._batch, [], 0
        packs = self.reader.packs_of([cid for _, cids, _, _ in files for cid in cids])
        opened: dict[str | None, OpenPack] = {}
        keys: dict[str, list[bytes]] = {}
        for pack in set(packs):
            if pack is None:
                continue
            try:
                op = self.reader.open_pack(pack)
            except BunkerError:
                continue
            opened[pack] = op
            keys[pack] = [c.key for c in op.group_keys]
        items: list[WireItem] = []
        at = 0
        none = OpenPack([], [])
        for path, cids, meta, fresh in files:
            pieces: list[WirePiece] = []
            for cid, pack in zip(cids, packs[at : at + len(cids)], strict=True):
                entry = opened.get(pack, none).get(cid)
                if entry is None:
                    pieces = [tuple(p) if type(p) is BlobRef else p for p in self._pieces_of(cids, path)]  # type: ignore[misc]
                    break
                pieces.append((pack, *entry))  # type: ignore[arg-type]
            at += len(cids)
            items.append((path, pieces, meta, fresh))
        self._slots.acquire()
        fut = self._procs.submit(keys, items)
        fut.add_done_callback(lambda f: self._batch_done(f, files))
        self._track(fut, errors_handled=True)

    def _batch_done(self, fut: Future[BatchResult], files: list[BatchFile]) -> None:
        try:
            try:
                ok, nbytes, others = fut.result()
            except Exception as exc:  # noqa: BLE001 - a dead worker must not stop the restore
                failed = WriteResult("error", 0, f"worker failed: {exc}")
                ok, nbytes, others = 0, 0, [(i, failed) for i in range(len(files))]
            with self._lock:
                self.stats.files += ok
                self.stats.bytes += nbytes
            for i, r in others:
                path, cids, meta, fresh = files[i]
                if r.status == RETRY:  # a blob key the worker could not unwrap: resolved here, with why
                    pieces = self._pieces_of(cids, path)
                    self._track(self._threads.submit(self._write_in_thread, path, pieces, meta, fresh))
                else:
                    self._done(path, r)
        finally:
            self._slots.release()

    def _done(self, path: bytes, r: WriteResult) -> None:
        if r.errno == errno.ENOSPC:
            self._disk_full.set()
        requested = False
        with self._lock:
            self.stats.bytes += r.nbytes
            if r.status == "ok":
                self.stats.files += 1
            else:
                self.stats.failed += 1
                # (a file's pieces name data its node requested: a wait, not damage)
                requested = r.requested or path in self._requested
                self._requested.discard(path)
                self.stats.requested += requested
        if requested:
            self.log.add(
                "err",
                "restore-requested",
                f"restored with holes where data is not here yet (requested from upstream): {r.message}",
                path,
            )
        elif r.status == "damaged":
            self.log.add("err", "file-damaged", f"restored with damaged parts left as holes: {r.message}", path)
        elif r.status == "error":
            self.log.add("err", "restore-failed", r.message, path)
        self._notes(path, r.meta_notes)

    # ------------------------------------------------------------------ other items
    def _hardlink(self, path: bytes, e: dict[str, Any], fresh: bool) -> None:
        """Give an inode restored under another name this name too."""
        first = self._links[e["ino"]]
        try:
            if not fresh:
                remove_existing(path, as_root=self._as_root)
            deep_path.link(first, path)
        except OSError as exc:
            if deep_path.lexists(first):
                if exc.errno == errno.ENOSPC:
                    self._failed(path, exc, "cannot create hard link")
                    return
                self.log.os_error(
                    "note",
                    "hardlink-copied",
                    path,
                    exc,
                    "cannot link it to its other name: restored as a separate copy",
                )
            # the other name could not be restored (or not linked): this one gets the inode itself
            self._links[e["ino"]] = path
            self._restore_whole(e, path, fresh)
            return
        self.stats.hardlinks += 1

    def _restore_whole(self, e: dict[str, Any], path: bytes, fresh: bool) -> None:
        """Restore an item at the end of the restore, in this thread."""
        if e["t"] == "f":
            if "fl" in e:
                self._flagged.append((path, e["fl"]))
            if not self._as_root:
                self._owner_check(path, e)
            self._write_in_thread(path, self._pieces(e, path), {k: v for k, v in e.items() if k != "c"}, fresh)
        else:
            self._restore_entry({k: v for k, v in e.items() if k != "ino"}, path, [], fresh)

    def _restore_special(self, e: dict[str, Any], path: bytes, fresh: bool) -> None:
        t = e["t"]
        try:
            if not fresh:
                remove_existing(path, as_root=self._as_root)
            if t == "p":
                deep_path.mkfifo(path, 0o600)
            elif t in "cb":
                major, minor = e["dev"]
                deep_path.mknod(path, (stat.S_IFCHR if t == "c" else stat.S_IFBLK) | 0o600, os.makedev(major, minor))
            else:
                deep_path.mknod(path, stat.S_IFSOCK | 0o600)  # a socket file needs no root (nor bind)
        except PermissionError as exc:
            if t not in "cb":
                self._failed(path, exc, "cannot create special file")
                return
            self.log.add(
                "note",
                "special-skipped",
                f"cannot create this device without root ({exc.strerror}); restore as root to recreate devices",
                path,
            )
            return
        except OSError as exc:
            self._failed(path, exc, "cannot create special file")
            return
        self._meta(path, e)
        self.stats.other += 1

    def _meta(self, path: bytes, e: dict[str, Any]) -> None:
        self._notes(path, apply_meta(path, e, self._as_root, self.numeric_owner))

    def _notes(self, path: bytes, notes: tuple[MetaNote, ...] | list[MetaNote]) -> None:
        for code, message in notes:
            if not self._as_root and code in ("xattr-not-restored", "acl-not-restored"):
                message += "; restore as root to set them"
            self.log.add("note", code, message, path)

    def _failed(self, path: bytes, exc: OSError, what: str) -> None:
        if exc.errno == errno.ENOSPC:
            self._disk_full.set()
        self.log.os_error("err", "restore-failed", path, exc, what)
        with self._lock:
            self.stats.failed += 1
