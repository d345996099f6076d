"""Confining client-supplied paths to their vfolder.

Two steps.  ``validate_relpath`` is pure and runs on the reactor: it rejects
what no request may name (absolute paths, ``..``, NUL bytes, absurd lengths).
``resolve_inside`` touches the disk (run it in the pool): it resolves symlinks
and refuses any path whose real location is outside the vfolder root.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import InvalidPath

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


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


def is_inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_inside(root: Path, relpath: object, *, field: str = "relpath", follow_final: bool = True) -> Path:
    """Resolve ``relpath`` under ``root``; blocking, so call it from the pool.

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
        raise InvalidPath(f"{field}: leads outside the vfolder: {relpath!r}", data={field: "leads outside the vfolder"})
    return Path(real)
