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

import os
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
