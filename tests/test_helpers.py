"""The tree comparison the roundtrip tests rely on must itself notice every kind of difference."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import compare_trees, flip_bit, make_tree


def _touch_ns(p: bytes) -> None:
    st = os.lstat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1), follow_symlinks=False)


def _relink(p: bytes) -> None:
    os.unlink(p)
    os.symlink(b"elsewhere", p)


def _content(p: bytes) -> None:
    st = os.lstat(p)
    flip_bit(os.fsdecode(p), 0)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


CHANGES: dict[str, tuple[bytes, Callable[[bytes], None]]] = {
    "content, same size and mtime": (b"sub/random-1m.bin", _content),
    "one ns of mtime": (b"small.txt", _touch_ns),
    "directory mtime": (b"sub/deeper", _touch_ns),
    "mode bit": (b"exec.sh", lambda p: os.chmod(p, 0o744)),
    "setuid bit": (b"setuid-bin", lambda p: os.chmod(p, 0o755)),
    "symlink target": (b"link-rel", _relink),
    "missing odd name": (b"\xff\xfe", os.unlink),
    "extra file": (b"empty-dir", lambda p: open(os.path.join(p, b"new"), "wb").close()),  # noqa: SIM115
    "file became empty dir": (b"empty", lambda p: (os.unlink(p), os.mkdir(p))),
}


@pytest.mark.parametrize("what", list(CHANGES))
def test_compare_trees_notices(tmp_path: Path, what: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a)
    make_tree(b)  # deterministic: the same names, contents, modes and ns times
    compare_trees(a, b)  # identical copies compare equal
    rel, change = CHANGES[what]
    target = os.path.join(os.fsencode(b), rel)
    parent = os.path.dirname(target)
    pst = os.lstat(parent)
    change(target)
    if what not in ("directory mtime",):  # keep the parent's mtime: only the change itself may differ
        os.utime(parent, ns=(pst.st_atime_ns, pst.st_mtime_ns))
    with pytest.raises(AssertionError):
        compare_trees(a, b)
