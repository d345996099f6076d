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

The walk is relative to directory descriptors and never follows a symlink
(``O_NOFOLLOW``): a tree changing under us cannot redirect the copy or the
removal outside.  Everything here blocks: call it from the pool.  Nothing is
CephFS-specific: any EXDEV (a bind mount inside a vfolder) is handled alike.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from storage.fastio import copy_range

TEMP_PREFIX = ".moving-"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Called with the byte count of each copied file (progress reporting).
ProgressFn = Callable[[int], None]


def rename_at(
    src_dir: int, src_name: str, dst_dir: int, dst_name: str, on_bytes: ProgressFn | None = None
) -> bool:
    """``renameat(2)``; on EXDEV copy + swap + remove instead.

    The target follows rename(2) rules: an existing file (or empty
    directory) is replaced, a non-empty directory is ENOTEMPTY.  Returns
    True when the copy was needed.
    """
    try:
        os.rename(src_name, dst_name, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    swap_in_at(src_dir, src_name, dst_dir, dst_name, on_bytes)
    return True


def move_path(src: Path, dst: Path, on_bytes: ProgressFn | None = None) -> bool:
    """``rename_at`` for two absolute paths (the final components are not followed)."""
    sdir = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ddir = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return rename_at(sdir, src.name, ddir, dst.name, on_bytes)
        finally:
            os.close(ddir)
    finally:
        os.close(sdir)


def swap_in_at(
    src_dir: int, src_name: str, dst_dir: int, dst_name: str, on_bytes: ProgressFn | None = None
) -> None:
    st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
    _check_swappable(st, dst_dir, dst_name)
    tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    try:
        copy_entry_at(src_dir, src_name, dst_dir, tmp, st, on_bytes)
        os.rename(tmp, dst_name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
    except BaseException:
        remove_at(dst_dir, tmp)
        raise
    _fsync(dst_dir)
    remove_at(src_dir, src_name)
    _fsync(src_dir)


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


def copy_entry_at(
    src_dir: int, src_name: str, dst_dir: int, dst_name: str,
    st: os.stat_result | None = None, on_bytes: ProgressFn | None = None,
) -> None:
    """Copy a file, symlink or directory tree to the new name ``dst_name``.

    Keeps modes, times and (as root) owners; symlinks are copied as links;
    file data goes through ``copy_file_range`` where the kernel allows it,
    and everything is fsynced before this returns.
    """
    if st is None:
        st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src_name, dir_fd=src_dir), dst_name, dir_fd=dst_dir)
        if os.geteuid() == 0:
            _quiet(os.chown, dst_name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        _quiet(os.utime, dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst_name, 0o700, dir_fd=dst_dir)  # opened up once the content is in
        sfd = os.open(src_name, DIR_FLAGS, dir_fd=src_dir)
        try:
            dfd = os.open(dst_name, DIR_FLAGS, dir_fd=dst_dir)
            try:
                with os.scandir(sfd) as it:
                    entries = list(it)
                for entry in entries:
                    try:
                        child_st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    copy_entry_at(sfd, entry.name, dfd, entry.name, child_st, on_bytes)
                _apply_stat(dfd, os.fstat(sfd))
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    elif stat.S_ISREG(st.st_mode):
        _copy_file_at(src_dir, src_name, dst_dir, dst_name, on_bytes)
    else:
        raise OSError(errno.EINVAL, "cannot copy a special file across a quota boundary", src_name)


def _copy_file_at(src_dir: int, src_name: str, dst_dir: int, dst_name: str, on_bytes: ProgressFn | None) -> None:
    sfd = os.open(src_name, READ_FLAGS, dir_fd=src_dir)
    try:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", src_name)
        dfd = os.open(dst_name, CREATE_FLAGS, 0o600, dir_fd=dst_dir)
        try:
            done = 0
            while True:
                # Up to the size seen at open, then whatever was appended since.
                want = max(st.st_size - done, 1 << 20)
                n = copy_range(sfd, dfd, done, done, want)
                done += n
                if n < want:
                    break
            _apply_stat(dfd, st)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    if on_bytes is not None:
        on_bytes(done)


def _apply_stat(fd: int, st: os.stat_result) -> None:
    if os.geteuid() == 0:
        _quiet(os.fchown, fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _quiet(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    try:
        fn(*args, **kwargs)
    except (OSError, NotImplementedError):
        pass  # best effort: the data matters more than owner and times of a link


def remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` below ``dir_fd`` (a tree too), never following a symlink."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    except PermissionError:
        # Linux answers EISDIR for unlink(dir); some filesystems EPERM.
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    try:
        with os.scandir(fd) as it:
            children = [e.name for e in it]
        for child in children:
            remove_at(fd, child)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _fsync(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # not every filesystem fsyncs directories; the rename is done


def remove_path(path: Path) -> None:
    """``remove_at`` for an absolute path (its final component is not followed)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        remove_at(fd, path.name)
    finally:
        os.close(fd)
