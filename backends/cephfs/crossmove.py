"""Rename that survives EXDEV: copy, then swap into place.

CephFS refuses ``rename(2)`` across a quota-realm boundary (a directory with
``ceph.quota.*`` set) with EXDEV, although both paths are on one mount.
``move_path`` then copies ``src`` to a hidden temporary name beside ``dst``
(same directory, hence same realm), fsyncs it, renames it onto ``dst`` and
only then removes ``src``.  From outside, ``dst`` appears complete in one
step and ``src`` stays intact until it does; a failure (e.g. EDQUOT in the
destination realm) removes the temporary copy and leaves ``src`` untouched.

Everything here blocks: call it from the pool.  It is generic (any
filesystem that answers EXDEV) and the vfs backend may use it as well.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from storage.fastio import copy_range

TEMP_PREFIX = ".moving-"

# Called with the byte count of each finished file (progress reporting).
ProgressFn = Callable[[int], None]


def move_path(src: Path, dst: Path, on_bytes: ProgressFn | None = None) -> bool:
    """``rename(src, dst)``; on EXDEV copy + swap + delete instead.

    ``dst`` follows rename(2) rules: an existing file is replaced, an
    existing non-empty directory is an error.  Returns True when the copy
    path was taken (the caller may want to log it).
    """
    try:
        os.rename(src, dst)
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    copy_then_swap(src, dst, on_bytes)
    return True


def copy_then_swap(src: Path, dst: Path, on_bytes: ProgressFn | None = None) -> None:
    src_st = os.lstat(src)
    _check_swappable(src_st, dst)
    tmp = dst.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}-{dst.name}"[:255]
    try:
        copy_entry(src, tmp, src_st, on_bytes)
        os.rename(tmp, dst)
    except BaseException:
        remove_tree(tmp)
        raise
    _fsync_dir(dst.parent)
    remove_tree(src)
    _fsync_dir(src.parent)


def _check_swappable(src_st: os.stat_result, dst: Path) -> None:
    """Fail before copying anything where the final rename would fail anyway."""
    try:
        dst_st = os.lstat(dst)
    except FileNotFoundError:
        return
    src_is_dir = stat.S_ISDIR(src_st.st_mode)
    dst_is_dir = stat.S_ISDIR(dst_st.st_mode)
    if src_is_dir and not dst_is_dir:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(dst))
    if dst_is_dir and not src_is_dir:
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(dst))
    if dst_is_dir and any(os.scandir(dst)):
        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(dst))


def copy_entry(
    src: Path, dst: Path, src_st: os.stat_result | None = None, on_bytes: ProgressFn | None = None
) -> None:
    """Copy a file, symlink or directory tree to a new path ``dst``.

    Keeps modes, mtimes and (as root) owners; symlinks are copied as links;
    file data goes through ``copy_file_range`` where the kernel allows it
    and is fsynced.
    """
    st = src_st or os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, 0o700)  # opened up by _copy_meta once the content is in
        with os.scandir(src) as entries:
            for entry in entries:
                copy_entry(Path(entry.path), dst / entry.name, entry.stat(follow_symlinks=False), on_bytes)
    elif stat.S_ISREG(st.st_mode):
        _copy_file(src, dst, st, on_bytes)
    else:
        raise OSError(errno.EINVAL, "cannot move a special file across a quota boundary", str(src))
    _copy_meta(dst, st)


def _copy_file(src: Path, dst: Path, st: os.stat_result, on_bytes: ProgressFn | None) -> None:
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            done = copy_range(src_fd, dst_fd, 0, 0, st.st_size)
            # The file may have grown since lstat: copy the rest too.
            while True:
                more = copy_range(src_fd, dst_fd, done, done, 1 << 24)
                if not more:
                    break
                done += more
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    if on_bytes is not None:
        on_bytes(done)


def _copy_meta(dst: Path, st: os.stat_result) -> None:
    if os.geteuid() == 0:
        try:
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        except OSError:
            pass  # best effort: the data matters more than the owner
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    except (NotImplementedError, OSError):
        pass


def remove_tree(path: Path) -> None:
    """Remove a file, link or tree; a missing path is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass  # removed concurrently
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem fsyncs directories; the rename is done
    finally:
        os.close(fd)
