"""Walking directory trees below a descriptor, with a bounded number of open ones.

``walk_tree`` goes down one or more parallel trees (a source and its copy)
without recursion, opening each subdirectory with ``O_NOFOLLOW`` relative to
its parent: a directory swapped for a symlink mid-walk is skipped, never
entered.  Depth is unlimited while at most ``MAX_OPEN_LEVELS`` levels keep
their descriptors; a level closed to make room is re-opened through ``..``
and checked to be the same directory.  Blocking: pool threads only.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

# Flags for walking directories without ever following a symlink.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

MAX_OPEN_LEVELS = 64  # directory levels whose descriptors stay open during a walk


class _Frame:
    __slots__ = ("fds", "ids", "names", "name")

    def __init__(self, fds: list[int] | None, ids: list[tuple[int, int]], names: Iterator[str], name: str | None):
        self.fds = fds
        self.ids = ids
        self.names = names
        self.name = name


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def open_children(fds: Sequence[int], name: str) -> list[int] | None:
    """The default way down: ``name`` in every tree, never through a symlink;
    None (skip it) if it vanished or is no longer a directory."""
    opened: list[int] = []
    try:
        for fd in fds:
            opened.append(os.open(name, DIR_FLAGS, dir_fd=fd))
    except OSError as exc:
        for fd in opened:
            os.close(fd)
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    return opened


def walk_tree(
    roots: Sequence[int],
    visit: Callable[[Sequence[int]], Iterable[str]],
    leave: Callable[[Sequence[int], Sequence[int], str], None] | None = None,
    *,
    descend: Callable[[Sequence[int], str], list[int] | None] = open_children,
    max_open: int = MAX_OPEN_LEVELS,
) -> None:
    """Depth-first walk of one or more parallel trees (e.g. a source and its
    copy), each given as a directory descriptor (not closed here).

    ``visit(fds)`` handles one directory and returns the names of the
    subdirectories to go down into (``descend`` opens them, without following
    symlinks); ``leave(parent_fds, child_fds, name)`` runs when a subtree is
    done.  Depth is unlimited while at most ``max_open`` levels keep their
    descriptors open: a level closed to make room is re-opened through the
    ``..`` of its child, and the walk fails (ESTALE) rather than continue if
    that is no longer the same directory (the tree was moved under us).
    """
    first = [os.dup(fd) for fd in roots]
    stack: list[_Frame] = []
    try:
        stack.append(_Frame(first, [_identity(fd) for fd in first], iter(()), None))
        stack[0].names = iter(list(visit(first)))
        open_levels = 1
        while stack:
            top = stack[-1]
            name = next(top.names, None)
            assert top.fds is not None
            if name is not None:
                child = descend(top.fds, name)
                if child is None:
                    continue
                frame = _Frame(child, [_identity(fd) for fd in child], iter(()), name)
                stack.append(frame)
                open_levels += 1
                if open_levels > max_open:
                    for old in stack[:-2]:
                        if old.fds is not None:
                            for fd in old.fds:
                                os.close(fd)
                            old.fds = None
                            open_levels -= 1
                            break
                frame.names = iter(list(visit(child)))
                continue
            stack.pop()
            open_levels -= 1
            try:
                if stack:
                    parent = stack[-1]
                    if parent.fds is None:
                        parent.fds = [os.open("..", DIR_FLAGS, dir_fd=fd) for fd in top.fds]
                        open_levels += 1
                        if [_identity(fd) for fd in parent.fds] != parent.ids:
                            raise OSError(errno.ESTALE, "the tree was moved while it was walked")
                    if leave is not None and top.name is not None:
                        leave(parent.fds, top.fds, top.name)
            finally:
                for fd in top.fds:
                    os.close(fd)
    finally:
        for frame in stack:
            if frame.fds is not None:
                for fd in frame.fds:
                    os.close(fd)
