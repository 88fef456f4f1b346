"""User and group names of numeric ids, as stored in trees beside the ids."""

from __future__ import annotations

import grp
import pwd


class OwnerNames:
    """uid/gid -> name, cached (lookups are slow and repeat); "" when the id has no name."""

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        n = self.users.get(uid)
        if n is None:
            try:
                n = pwd.getpwuid(uid).pw_name
            except KeyError:
                n = ""
            self.users[uid] = n
        return n

    def group(self, gid: int) -> str:
        n = self.groups.get(gid)
        if n is None:
            try:
                n = grp.getgrgid(gid).gr_name
            except KeyError:
                n = ""
            self.groups[gid] = n
        return n
