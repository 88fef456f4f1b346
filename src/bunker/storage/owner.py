"""Writing into a folder as its owner, for a root process (docs/hierarchy.md, "Up": a root node
writes into a link's folder as the folder's owner; storage/mailbox_local.py uses it).

Each change runs in a short forked child that sets its groups, gid and uid to the owner's, makes
its system calls on descriptors it inherited, and exits. A child rather than a per-thread
credential switch (setfsuid, or raw setresuid calls): it drops every capability, so that user's
quotas and the disk's reserved blocks apply and CAP_DAC_OVERRIDE is gone; the rest of the
process, other threads included, never runs with changed credentials; and it needs no exec (that
user need not be able to run this Python). Forking a process with threads is safe here because
the child takes no lock: it only makes system calls, then ``_exit`` (Python 3.12+ warns about
such forks all the same, as a DeprecationWarning hidden by default).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import signal
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Owner"]


@dataclass(frozen=True)
class Owner:
    """The user whose folder root writes into, and the credentials to write with."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str

    @classmethod
    def of(cls, st: os.stat_result) -> Owner | None:
        """Who must write into the folder ``st`` describes: its owner when this process is root
        and the folder is not root's, else None (this process writes as itself)."""
        if os.geteuid() != 0 or st.st_uid == 0:
            return None
        try:
            pw = pwd.getpwuid(st.st_uid)
        except KeyError:  # a carried disk's user unknown here: its uid, the folder's group
            return cls(st.st_uid, st.st_gid, (st.st_gid,), f"uid {st.st_uid}")
        try:
            groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
        except OSError:
            groups = (pw.pw_gid,)
        return cls(pw.pw_uid, pw.pw_gid, groups, f"{pw.pw_name}, uid {pw.pw_uid}")

    def run(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (system calls on inherited descriptors) in a forked child with this user's
        credentials; an OSError it raises is raised here (its errno and text)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's lines are not traced
            code = 1
            try:
                os.close(r)
                with contextlib.suppress(ValueError):  # these end fn through its cleanup (temp files go)
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        signal.signal(sig, signal.default_int_handler)
                os.setgroups(list(self.groups))
                os.setresgid(self.gid, self.gid, self.gid)
                os.setresuid(self.uid, self.uid, self.uid)
                fn()
                code = 0
            except OSError as exc:
                os.write(w, f"{exc.errno or 0}\0{exc.strerror or exc}".encode(errors="replace"))
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    os.write(w, f"{errno.EINTR}\0stopped ({type(exc).__name__})".encode())
            finally:
                os._exit(code)
        os.close(w)
        try:
            try:
                _, status = os.waitpid(pid, 0)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)  # the child removes its temp file and exits
                    os.waitpid(pid, 0)
                raise
            os.set_blocking(r, False)  # another thread's child may hold the pipe's write end
            data = b""
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(r, 4096):
                    data += chunk
        finally:
            os.close(r)
        if os.waitstatus_to_exitcode(status) == 0:
            return
        code_text, _, text = data.decode(errors="replace").partition("\0")
        if not code_text:
            raise OSError(errno.EINTR, f"the writer running as {self.name} stopped (wait status {status})")
        raise OSError(int(code_text), text)
