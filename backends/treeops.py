"""Blocking tree operations on directory descriptors: copy, remove, count.

Everything here works relative to an open directory (``dir_fd``) and opens
each subdirectory with ``O_NOFOLLOW``: a symlink is copied as a link or
removed as a link, never entered, so a tree that changes under us (a
container renaming a directory to a symlink mid-walk) cannot lead outside.
Walks go through ``storage.paths.walk_tree``: no recursion, and a bounded
number of open descriptors however deep or wide the tree is.

Files are copied with ``storage.fastio.copy_range`` (``copy_file_range``:
a reflink on XFS and Btrfs), preserving mode, mtime/atime and, when running
as root, ownership.  ``progress.check()`` runs between entries, so a
cancelled background task stops at the next file.

Only pool threads call these.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage import fastio
from storage.paths import walk_tree

if TYPE_CHECKING:
    from storage.bgtasks import Progress

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the stat must not block the open.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Bytes per copy_range call: large enough for reflinks and in-kernel copies to
# run at full speed, small enough that a cancel is noticed soon.
COPY_CHUNK = 64 << 20


def _check(progress: Progress | None) -> None:
    if progress is not None:
        progress.check()


def _listdir(fd: int) -> list[os.DirEntry[str]]:
    with os.scandir(fd) as it:
        return list(it)


@dataclass
class TreeCount:
    files: int = 0  # every entry to copy (files, dirs, symlinks)
    bytes: int = 0  # apparent size of the regular files


def count_tree(dir_fd: int, progress: Progress | None = None) -> TreeCount:
    """What copying the contents of ``dir_fd`` will move (for progress totals)."""
    total = TreeCount()

    def visit(fds: Sequence[int]) -> list[str]:
        subdirs = []
        for entry in _listdir(fds[0]):
            _check(progress)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            total.files += 1
            if stat.S_ISREG(st.st_mode):
                total.bytes += st.st_size
            elif stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.name)
        return subdirs

    walk_tree([dir_fd], visit)
    return total


# -- copying -----------------------------------------------------------------

def _preserve_owner() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def apply_stat_fd(fd: int, st: os.stat_result, *, owner: bool) -> None:
    """Mode, ownership (root only) and times of ``st`` onto the open ``fd``."""
    if owner:
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:
            pass
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _apply_stat_special(dir_fd: int, name: str, st: os.stat_result) -> None:
    """Mode and times of a FIFO, which cannot be opened without blocking:
    through an ``O_PATH`` descriptor (never a name that could be swapped for
    a symlink) and its /proc alias."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        alias = f"/proc/self/fd/{fd}"
        if os.path.exists(alias):
            os.chmod(alias, stat.S_IMODE(st.st_mode))
            os.utime(alias, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


def copy_file_at(
    src_dir: int, src_name: str, dst_dir: int, dst_name: str,
    progress: Progress | None = None, *, owner: bool | None = None,
) -> int:
    """Copy one regular file; the destination must not exist.  Returns the bytes copied.

    On failure the partial destination is removed.
    """
    owner = _preserve_owner() if owner is None else owner
    sfd = os.open(src_name, READ_FLAGS, dir_fd=src_dir)
    try:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", src_name)
        dfd = os.open(dst_name, CREATE_FLAGS, 0o600, dir_fd=dst_dir)
        try:
            copied = 0
            while True:
                # In chunks (a cancel is noticed between them), until end of
                # file: a file that grew since the stat is copied whole.
                n = fastio.copy_range(sfd, dfd, copied, copied, COPY_CHUNK)
                copied += n
                if progress is not None:
                    progress.advance(n)
                if n < COPY_CHUNK:
                    break
                _check(progress)
            apply_stat_fd(dfd, st, owner=owner)
        except BaseException:
            os.close(dfd)
            try:
                os.unlink(dst_name, dir_fd=dst_dir)
            except OSError:
                pass
            raise
        os.close(dfd)
        return copied
    finally:
        os.close(sfd)


def copy_symlink_at(src_dir: int, src_name: str, dst_dir: int, dst_name: str, st: os.stat_result,
                    *, owner: bool) -> None:
    target = os.readlink(src_name, dir_fd=src_dir)
    os.symlink(target, dst_name, dir_fd=dst_dir)
    if owner:
        try:
            os.chown(dst_name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        except PermissionError:
            pass
    try:
        os.utime(dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)
    except NotImplementedError:
        pass


def copy_tree_contents(src_fd: int, dst_fd: int, progress: Progress | None = None,
                       *, owner: bool | None = None) -> int:
    """Copy everything inside directory ``src_fd`` into the (existing) directory ``dst_fd``.

    Directories get their mode and times after their contents are written
    (so a read-only directory can still be filled).  Sockets and devices are
    skipped; FIFOs are recreated.  Returns the number of entries copied.
    """
    owner = _preserve_owner() if owner is None else owner
    copied = 0

    def visit(fds: Sequence[int]) -> list[str]:
        nonlocal copied
        sfd, dfd = fds
        subdirs = []
        for entry in _listdir(sfd):
            _check(progress)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while we copy: nothing to copy
            name, mode = entry.name, st.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(name, 0o700, dir_fd=dfd)
                subdirs.append(name)
            elif stat.S_ISLNK(mode):
                copy_symlink_at(sfd, name, dfd, name, st, owner=owner)
            elif stat.S_ISREG(mode):
                try:
                    copy_file_at(sfd, name, dfd, name, progress, owner=owner)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP):
                        continue  # removed or swapped for a symlink under us
                    raise
            elif stat.S_ISFIFO(mode):
                os.mkfifo(name, 0o600, dir_fd=dfd)
                _apply_stat_special(dfd, name, st)
            else:
                continue  # sockets and devices are not copied
            copied += 1
            if progress is not None:
                progress.message = f"copied {copied} entries"
        return subdirs

    def leave(_parent: Sequence[int], child: Sequence[int], _name: str) -> None:
        nonlocal copied
        apply_stat_fd(child[1], os.fstat(child[0]), owner=owner)
        copied += 1

    walk_tree([src_fd, dst_fd], visit, leave)
    return copied


def copy_entry_at(src_dir: int, src_name: str, dst_dir: int, dst_name: str,
                  progress: Progress | None = None) -> None:
    """Copy one entry (file, symlink or whole directory) to a new name."""
    owner = _preserve_owner()
    st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        copy_symlink_at(src_dir, src_name, dst_dir, dst_name, st, owner=owner)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
        try:
            sfd = os.open(src_name, DIR_FLAGS, dir_fd=src_dir)
            try:
                dfd = os.open(dst_name, DIR_FLAGS, dir_fd=dst_dir)
                try:
                    copy_tree_contents(sfd, dfd, progress, owner=owner)
                    apply_stat_fd(dfd, os.fstat(sfd), owner=owner)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        except BaseException:
            remove_at(dst_dir, dst_name)
            raise
    else:
        copy_file_at(src_dir, src_name, dst_dir, dst_name, progress, owner=owner)


# -- removing ----------------------------------------------------------------

def remove_tree_contents(dir_fd: int, progress: Progress | None = None) -> int:
    """Remove everything inside directory ``dir_fd`` (not the directory itself).

    Symlinks are unlinked, never followed.  Entries that vanish meanwhile are
    fine.  Returns the number of entries removed.
    """
    removed = 0

    def visit(fds: Sequence[int]) -> list[str]:
        nonlocal removed
        subdirs = []
        for entry in _listdir(fds[0]):
            _check(progress)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                subdirs.append(entry.name)
                continue
            if _unlink_quiet(fds[0], entry.name):
                removed += 1
                if progress is not None:
                    progress.advance(1)
                    progress.message = f"removed {removed} entries"
        return subdirs

    def descend(fds: Sequence[int], name: str) -> list[int] | None:
        try:
            return [os.open(name, DIR_FLAGS, dir_fd=fds[0])]
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _unlink_quiet(fds[0], name)  # swapped for a symlink or a file since the listing
            return None

    def leave(parent: Sequence[int], _child: Sequence[int], name: str) -> None:
        nonlocal removed
        try:
            os.rmdir(name, dir_fd=parent[0])
        except FileNotFoundError:
            return
        removed += 1
        if progress is not None:
            progress.advance(1)

    walk_tree([dir_fd], visit, leave, descend=descend)
    return removed


def _unlink_quiet(dir_fd: int, name: str) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        remove_at(dir_fd, name)
        return True


def remove_at(dir_fd: int, name: str, progress: Progress | None = None) -> bool:
    """Remove ``name`` below ``dir_fd``, recursively if it is a directory
    (never following a symlink).  False if it did not exist."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return _unlink_quiet(dir_fd, name)
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        remove_tree_contents(fd, progress)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True
