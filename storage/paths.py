"""Confining client-supplied paths to their vfolder.

Three steps.  ``validate_relpath`` (and ``validate_name`` for a single new
name) is pure and runs on the reactor: it rejects what no request may name
(absolute paths, ``..``, NUL bytes, absurd lengths) before anything touches
the disk.  ``resolve_inside`` / ``resolve_rel`` touch the disk (run them in
the pool): they resolve symlinks and refuse any path whose real location is
outside the vfolder root.  Finally ``open_dir_beneath`` / ``open_parent``
re-walk the *resolved* path from a descriptor of the root, one component at
a time with ``O_NOFOLLOW``: if a directory was swapped for a symlink after
the resolution (a container racing the proxy), the walk fails with
ELOOP/ENOTDIR instead of leaving the vfolder.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from .errors import InvalidPath

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255

# Flags for walking directories without ever following a symlink.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def validate_relpath(relpath: object, field: str = "relpath") -> PurePosixPath:
    """Return ``relpath`` as a normalized relative path, or raise ``InvalidPath``."""
    if not isinstance(relpath, str):
        raise InvalidPath(f"{field}: expected a string, got {type(relpath).__name__}", data={field: "not a string"})
    if "\x00" in relpath:
        raise InvalidPath(f"{field}: contains a NUL byte", data={field: "contains a NUL byte"})
    try:
        encoded = relpath.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPath(f"{field}: not valid UTF-8", data={field: "not valid UTF-8"}) from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidPath(f"{field}: longer than {MAX_PATH_BYTES} bytes", data={field: "too long"})
    if relpath.startswith("/"):
        raise InvalidPath(f"{field}: must be relative to the vfolder: {relpath!r}", data={field: "absolute path"})
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise InvalidPath(f"{field}: must not contain '..': {relpath!r}", data={field: "contains '..'"})
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidPath(f"{field}: a name is longer than {MAX_NAME_BYTES} bytes", data={field: "name too long"})
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def validate_name(name: object, field: str = "new_name") -> str:
    """A single directory entry name (for rename): no ``/``, not ``.``/``..``/empty."""
    if not isinstance(name, str):
        raise InvalidPath(f"{field}: expected a string, got {type(name).__name__}", data={field: "not a string"})
    if name in ("", ".", ".."):
        raise InvalidPath(f"{field}: not a valid file name: {name!r}", data={field: "not a valid file name"})
    if "/" in name:
        raise InvalidPath(f"{field}: must be a single name, without '/': {name!r}", data={field: "contains '/'"})
    validate_relpath(name, field)  # NUL, encoding, length
    return name


def is_inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _outside(field: str, relpath: object) -> InvalidPath:
    return InvalidPath(f"{field}: leads outside the vfolder: {relpath!r}", data={field: "leads outside the vfolder"})


def resolve_rel(
    root: Path | str, relpath: object, *, field: str = "relpath", follow_final: bool = True
) -> PurePosixPath:
    """Resolve ``relpath`` under ``root`` and return the real path *relative to
    the real root* (``.`` for the root itself); blocking, so call it from the pool.

    With ``follow_final=False`` the last component is not resolved, for
    operations on a symlink itself (delete, rename, lstat) that never touch
    its target.  Every directory on the way must still resolve inside.
    """
    rel = validate_relpath(relpath, field)
    real_root = os.path.realpath(root)
    joined = os.path.join(real_root, str(rel))
    if follow_final or str(rel) == ".":
        real = os.path.realpath(joined)
    else:
        real = os.path.join(os.path.realpath(os.path.dirname(joined)), os.path.basename(joined))
    if not is_inside(real_root, real):
        raise _outside(field, relpath)
    if real == real_root:
        return PurePosixPath(".")
    tail = PurePosixPath(os.path.relpath(real, real_root))
    if ".." in tail.parts:  # cannot happen after realpath; refuse rather than trust it
        raise _outside(field, relpath)
    return tail


def resolve_inside(root: Path, relpath: object, *, field: str = "relpath", follow_final: bool = True) -> Path:
    """Like ``resolve_rel`` but returns the absolute real path."""
    tail = resolve_rel(root, relpath, field=field, follow_final=follow_final)
    real_root = Path(os.path.realpath(root))
    return real_root if str(tail) == "." else real_root / tail


def open_root(root: Path | str) -> int:
    """A descriptor of the vfolder root (the root itself is the operator's, so it may be a symlink)."""
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir_beneath(root_fd: int, rel: PurePosixPath | str) -> int:
    """Open the directory ``rel`` below ``root_fd`` without following any symlink.

    ``rel`` must be a resolved path (from ``resolve_rel``): it has no ``..`` and
    no symlinks, so a symlink met here was planted after the resolution and
    the walk fails (ELOOP/ENOTDIR) rather than leaving the root.
    """
    parts = [p for p in PurePosixPath(rel).parts if p not in (".", "")]
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if part == ".." or "/" in part:
                raise _outside("path", str(rel))
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_parent(root_fd: int, rel: PurePosixPath | str) -> tuple[int, str]:
    """``(fd of the parent directory, final name)`` of ``rel`` below ``root_fd``.

    The caller closes the descriptor and acts on the name with ``dir_fd=``,
    never following it unless it means to.
    """
    rel = PurePosixPath(rel)
    if str(rel) in (".", ""):
        raise InvalidPath("the vfolder root itself cannot be used here", data={"relpath": "the vfolder root"})
    return open_dir_beneath(root_fd, rel.parent), rel.name


# -- walking a tree below a descriptor -------------------------------------------

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
            opened.append(os.open(name, _DIR_FLAGS, dir_fd=fd))
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
                        parent.fds = [os.open("..", _DIR_FLAGS, dir_fd=fd) for fd in top.fds]
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
