"""A backup told to stop (SIGINT, SIGTERM) keeps what it finished (docs/format.md section 17,
"Interrupted runs").

The signal is recorded while the run archives (interrupt.deferred); at the archiver's next tick
(at most about 0.2 s later) :class:`Stopper` halts the reads, writes a last checkpoint of
everything finished, and ends the walk. The run then commits that checkpoint as an incomplete
snapshot of its own session with the checkpoint's counter, exactly as its next run would have
done after a kill, and releases its lease. A second signal stops at once: the lease then keeps
its last checkpoint for the next run.
"""

from __future__ import annotations

from bunker import interrupt
from bunker.backup.archiver import Archiver
from bunker.backup.checkpoint import Checkpointer, checkpoint_snapshot
from bunker.backup.commit import Committed
from bunker.crypto.keyfile import PutKey
from bunker.repo.certs import Certificate
from bunker.repo.leases import Lease
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.runlog import RunLog, display_path


class Stopper:
    """The archiver's ``stop`` hook (called on its main thread at every tick): once a signal is
    pending, halt the archiver, persist what was finished and raise Interrupted."""

    def __init__(
        self, archiver: Archiver, checkpointer: Checkpointer | None, writer: SessionWriter, log: RunLog
    ) -> None:
        self.archiver, self.checkpointer, self.writer, self.log = archiver, checkpointer, writer, log

    def __call__(self) -> None:
        signum = interrupt.pending()
        if signum is None:
            return
        where = display_path(self.archiver.progress.current)
        self.log.add(
            "warn",
            "interrupted",
            f"the run was interrupted by {interrupt.signal_name(signum)} at {where}: this snapshot is incomplete, "
            "it holds what the run had finished",
        )
        self.archiver.halt()
        if self.checkpointer is not None:
            self.checkpointer.write()
        # what was stored is indexed for the next run also when there was nothing finished to
        # checkpoint, or no checkpoints (after a checkpoint this finds nothing new)
        self.writer.flush()
        raise interrupt.Interrupted(signum)


def keep_interrupted(
    repo: Repository, put: PutKey, cert: Certificate, lease: Lease, state_dir: str, log: RunLog
) -> Committed | None:
    """The lease's last checkpoint as an incomplete snapshot of this run's own session (None
    when the run had none)."""
    if lease.checkpoint is None:
        return None
    return checkpoint_snapshot(repo, put, cert, lease.session, lease.checkpoint, state_dir, log, lease=lease)


def interval_text(seconds: float) -> str:
    """A checkpoint interval as the user gave it (10 s, 2 min)."""
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
