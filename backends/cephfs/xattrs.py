"""CephFS's virtual ``ceph.*`` extended attributes: quotas and recursive stats.

Every function here blocks (a getxattr on ceph-fuse is a round trip to the
client's cache, sometimes to the MDS): call them through the volume's pool.

Facts these rely on (see ``docs/cephfs.md``):

* ``ceph.quota.max_bytes`` / ``max_files`` are set on a directory; the value
  ``0`` removes the limit, after which reading it fails with ENODATA.
* ``ceph.dir.rbytes`` / ``rfiles`` / ``rsubdirs`` / ``rentries`` are the
  MDS's recursive totals: O(1) to read, but lazily propagated (seconds).
  ``rentries`` and ``rsubdirs`` count the directory itself.
* None of them is listed by listxattr: they must be asked for by name, and
  they exist on directories only (a regular file answers ENODATA).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import xattr

MAX_BYTES = "ceph.quota.max_bytes"
MAX_FILES = "ceph.quota.max_files"
RBYTES = "ceph.dir.rbytes"
RFILES = "ceph.dir.rfiles"
RSUBDIRS = "ceph.dir.rsubdirs"
RENTRIES = "ceph.dir.rentries"


class NotCephFS(Exception):
    """The path does not answer CephFS's virtual xattrs."""


@dataclass(frozen=True)
class RStats:
    """A directory's recursive totals, as the MDS last propagated them."""

    rbytes: int
    rfiles: int
    rsubdirs: int  # includes the directory itself

    @property
    def entries_below(self) -> int:
        """Files, links and directories under the directory (not itself)."""
        return self.rfiles + self.rsubdirs - 1


def _get(path: os.PathLike[str] | str | int, name: str) -> bytes:
    try:
        return xattr.get(path if isinstance(path, int) else os.fspath(path), name)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise NotCephFS(f"{path}: no {name} (not on CephFS?)") from None
        raise


def _parse_int(raw: bytes, name: str) -> int:
    try:
        return int(raw.strip(b"\0 \n").decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"unexpected value of {name}: {raw!r}") from None


def read_int(path: os.PathLike[str] | str | int, name: str) -> int | None:
    """The attribute as an integer, or None where it is not set (ENODATA)."""
    try:
        raw = _get(path, name)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise
    return _parse_int(raw, name)


def read_quota(path: os.PathLike[str] | str) -> tuple[int | None, int | None]:
    """``(max_bytes, max_files)``; None means no limit (unset or 0)."""
    max_bytes = read_int(path, MAX_BYTES)
    max_files = read_int(path, MAX_FILES)
    return (max_bytes or None, max_files or None)


def set_max_bytes(path: os.PathLike[str] | str, limit: int | None) -> None:
    """Set (or with None/0 remove) the byte quota of a directory."""
    _set_limit(path, MAX_BYTES, limit)


def set_max_files(path: os.PathLike[str] | str, limit: int | None) -> None:
    """Set (or with None/0 remove) the entry quota; the directory counts as one."""
    _set_limit(path, MAX_FILES, limit)


def _set_limit(path: os.PathLike[str] | str, name: str, limit: int | None) -> None:
    value = 0 if limit is None else int(limit)
    if value < 0:
        raise ValueError(f"{name} cannot be negative: {value}")
    try:
        xattr.set(os.fspath(path), name, str(value).encode("ascii"))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise NotCephFS(f"{path}: cannot set {name} (not on CephFS?)") from None
        raise


def read_rstats(path: os.PathLike[str] | str) -> RStats:
    """The recursive totals of a directory (ENODATA for a non-directory)."""
    return RStats(
        rbytes=_parse_int(_get(path, RBYTES), RBYTES),
        rfiles=_parse_int(_get(path, RFILES), RFILES),
        rsubdirs=_parse_int(_get(path, RSUBDIRS), RSUBDIRS),
    )


def read_rbytes(path: os.PathLike[str] | str | int) -> int:
    return _parse_int(_get(path, RBYTES), RBYTES)


def is_cephfs(path: os.PathLike[str] | str) -> bool:
    """Whether ``path`` (a directory) answers ``ceph.dir.rbytes``."""
    try:
        read_rbytes(path)
    except (NotCephFS, OSError, ValueError):
        return False
    return True
