"""Blocking tree operations on directory descriptors: copy, remove, count.

Everything here works relative to an open directory (``dir_fd``) and opens
each subdirectory with ``O_NOFOLLOW``: a symlink is copied as a link or
removed as a link, never entered, so a tree that changes under us (a
container renaming a directory to a symlink mid-walk) cannot lead outside.
Walks go through ``storage.fs.walk.walk_tree``: no recursion, and a bounded
number of open descriptors however deep or wide the tree is.

Files are copied with ``storage.fastio.copy_range`` (``copy_file_range``:
a reflink on XFS and Btrfs), preserving mode, mtime/atime and, when running
as root, ownership (best effort).  ``progress.check()`` runs between entries
and chunks, so a cancelled background task stops soon.

Two kinds of copy use the same walk.  A clone (the default) recreates FIFOs,
skips sockets and devices and entries that vanish or turn into symlinks
under it.  A copy for a move (``strict`` and ``durable``, see
``storage.fs.crossmove``) skips nothing it listed: a special file, or a file
that vanished or was swapped for a symlink, fails it; and every file and
directory is fsynced before it returns.

Only pool threads call these.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from storage import fastio
from storage.fs.walk import DIR_FLAGS, open_children, walk_tree

if TYPE_CHECKING:
    from storage.bgtasks import Progress

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
    """Mode, ownership (root only, best effort) and times of ``st`` onto the open ``fd``."""
    if owner:
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except OSError:
            pass  # the data matters more than the owner (an unmapped id, a refusing filesystem)
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
    progress: Progress | None = None, *, owner: bool | None = None, durable: bool = False,
) -> int:
    """Copy one regular file; the destination must not exist.  Returns the bytes copied.

    With ``durable`` the copy is fsynced.  On failure the partial
    destination is removed.
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
            if durable:
                os.fsync(dfd)
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
    """A symlink as a link; its owner (root only) and times are best effort."""
    target = os.readlink(src_name, dir_fd=src_dir)
    os.symlink(target, dst_name, dir_fd=dst_dir)
    if owner:
        try:
            os.chown(dst_name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        except OSError:
            pass
    try:
        os.utime(dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)
    except (OSError, NotImplementedError):
        pass


def _refuse_special(name: str) -> OSError:
    return OSError(errno.EINVAL, "cannot copy a special file across a quota boundary", name)


def copy_tree_contents(src_fd: int, dst_fd: int, progress: Progress | None = None,
                       *, owner: bool | None = None, strict: bool = False, durable: bool = False) -> int:
    """Copy everything inside directory ``src_fd`` into the (existing) directory ``dst_fd``.

    Directories get their mode and times after their contents are written
    (so a read-only directory can still be filled).  Sockets and devices are
    skipped and FIFOs recreated, or with ``strict`` any of them fails the
    copy, as does a listed file that vanished or became a symlink.  With
    ``durable`` every file and subdirectory is fsynced (``dst_fd`` itself is
    the caller's).  Returns the number of entries copied.
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
                    copy_file_at(sfd, name, dfd, name, progress, owner=owner, durable=durable)
                except OSError as exc:
                    if not strict and exc.errno in (errno.ENOENT, errno.ELOOP):
                        continue  # removed or swapped for a symlink under us
                    raise
            elif strict:
                raise _refuse_special(name)
            elif stat.S_ISFIFO(mode):
                os.mkfifo(name, 0o600, dir_fd=dfd)
                _apply_stat_special(dfd, name, st)
            else:
                continue  # sockets and devices are not copied
            copied += 1
            if progress is not None:
                progress.message = f"copied {copied} entries"
        return subdirs

    def descend(fds: Sequence[int], name: str) -> list[int] | None:
        child = open_children(fds, name)
        if child is None and strict:
            raise OSError(errno.ENOENT, "a directory vanished or changed while it was copied", name)
        return child

    def leave(_parent: Sequence[int], child: Sequence[int], _name: str) -> None:
        nonlocal copied
        apply_stat_fd(child[1], os.fstat(child[0]), owner=owner)
        if durable:
            os.fsync(child[1])
        copied += 1

    walk_tree([src_fd, dst_fd], visit, leave, descend=descend)
    return copied


def copy_entry_at(src_dir: int, src_name: str, dst_dir: int, dst_name: str,
                  progress: Progress | None = None, *, st: os.stat_result | None = None,
                  strict: bool = False, durable: bool = False) -> None:
    """Copy one entry (file, symlink or whole directory) to the new name ``dst_name``.

    ``strict`` and ``durable`` as for ``copy_tree_contents``; with
    ``durable`` the new directory is fsynced too (not ``dst_dir``: the
    caller renames the copy into place and fsyncs that).
    On failure a partly copied directory stays: the caller removes it.
    """
    owner = _preserve_owner()
    if st is None:
        st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        copy_symlink_at(src_dir, src_name, dst_dir, dst_name, st, owner=owner)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst_name, 0o700, dir_fd=dst_dir)  # opened up once the content is in
        sfd = os.open(src_name, DIR_FLAGS, dir_fd=src_dir)
        try:
            dfd = os.open(dst_name, DIR_FLAGS, dir_fd=dst_dir)
            try:
                copy_tree_contents(sfd, dfd, progress, owner=owner, strict=strict, durable=durable)
                apply_stat_fd(dfd, os.fstat(sfd), owner=owner)
                if durable:
                    os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    elif stat.S_ISREG(st.st_mode):
        copy_file_at(src_dir, src_name, dst_dir, dst_name, progress, owner=owner, durable=durable)
    elif strict:
        raise _refuse_special(src_name)
    else:
        raise OSError(errno.EINVAL, "not a file, a directory or a symlink", src_name)


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
        pass
    except PermissionError:
        # Linux answers EISDIR for unlink(dir); some filesystems EPERM.
        try:
            is_dir = stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False
        if not is_dir:
            raise
    remove_at(dir_fd, name)  # a directory now (it was not when listed)
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
