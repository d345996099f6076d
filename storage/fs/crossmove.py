"""Rename that survives EXDEV: copy, then swap into place.

CephFS refuses ``rename(2)`` across a quota-realm boundary (a directory with
``ceph.quota.*`` set) with EXDEV, although both paths are on one mount.
``rename_at`` then copies the source to a hidden temporary name in the
target's directory (same directory, hence same realm), fsyncs it, renames it
onto the target, and only then removes the source.  From outside, the target
appears complete in one step and the source stays intact until it has; a
failure (e.g. EDQUOT in the destination realm) removes the temporary copy and
leaves the source untouched.  Only a crash between the swap and the removal
can leave both (never neither).

The copy and the removal are ``storage.fs.tree``'s (a copy ``strict``, so a
special file or an entry that changes under it fails the move, and
``durable``: every file and directory fsynced before the swap), walked
relative to directory descriptors, never following a symlink and with a
bounded number of them open.  Everything here blocks: call it from the pool.  Nothing is
CephFS-specific: any EXDEV (a bind mount inside a vfolder) is handled alike.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from storage.fs.tree import copy_entry_at, count_tree, remove_at
from storage.fs.walk import DIR_FLAGS

TEMP_PREFIX = ".moving-"


# Called before a copy: (source's directory, target's directory, bytes to
# copy); raises (e.g. EDQUOT) where they cannot fit.
FitCheck = Callable[[int, int, int], None]


def rename_at(src_dir: int, src_name: str, dst_dir: int, dst_name: str, fits: FitCheck | None = None) -> bool:
    """``renameat(2)``; on EXDEV copy + swap + remove instead.

    The target follows rename(2) rules: an existing file (or empty
    directory) is replaced, a non-empty directory is ENOTEMPTY.  ``fits``
    vets the copy's size before a byte is copied (the caller knows where
    quotas are).  Returns True when the copy was needed.
    """
    try:
        os.rename(src_name, dst_name, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    if fits is not None:
        fits(src_dir, dst_dir, _apparent_bytes(src_dir, src_name))
    swap_in_at(src_dir, src_name, dst_dir, dst_name)
    return True


def _apparent_bytes(dir_fd: int, name: str) -> int:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        return count_tree(fd).bytes
    finally:
        os.close(fd)


def move_path(src: Path, dst: Path) -> bool:
    """``rename_at`` for two absolute paths (the final components are not followed)."""
    sdir = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ddir = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return rename_at(sdir, src.name, ddir, dst.name)
        finally:
            os.close(ddir)
    finally:
        os.close(sdir)


def swap_in_at(src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
    st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
    _check_swappable(st, dst_dir, dst_name)
    tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    try:
        copy_entry_at(src_dir, src_name, dst_dir, tmp, st=st, strict=True, durable=True)
        os.rename(tmp, dst_name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
    except BaseException:
        remove_at(dst_dir, tmp)
        raise
    _fsync_quiet(dst_dir)
    remove_at(src_dir, src_name)
    _fsync_quiet(src_dir)


def _check_swappable(src_st: os.stat_result, dst_dir: int, dst_name: str) -> None:
    """Fail before copying anything where the final rename would fail anyway."""
    try:
        dst_st = os.stat(dst_name, dir_fd=dst_dir, follow_symlinks=False)
    except FileNotFoundError:
        return
    src_is_dir = stat.S_ISDIR(src_st.st_mode)
    dst_is_dir = stat.S_ISDIR(dst_st.st_mode)
    if src_is_dir and not dst_is_dir:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), dst_name)
    if dst_is_dir and not src_is_dir:
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), dst_name)
    if dst_is_dir:
        fd = os.open(dst_name, DIR_FLAGS, dir_fd=dst_dir)
        try:
            with os.scandir(fd) as it:
                if any(True for _ in it):
                    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), dst_name)
        finally:
            os.close(fd)


def _fsync_quiet(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # not every filesystem fsyncs directories; the rename is done
