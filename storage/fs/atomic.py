"""Replacing a small file whole or not at all, durably.

``write_atomic`` writes a temporary file beside the target, fsyncs it and
renames it over the target, so a reader sees the old content or the new one,
never a mix; with ``sync_dir`` the directory is fsynced too, so the rename
itself survives a power loss.  On failure the temporary file is removed and
the target is left as it was.  The upload state files, the event outbox and
task journal, the XFS project registry, the VFS metadata and layout files
and the generated secrets file all go through it.

Temporary names are ``NAME.<pid>.<tag>.<n>.tmp`` (``.NAME...`` with
``hidden``): the pid lets a later process tell a dead writer's leftover from
a live one's (see ``storage.uploads``), the tag and counter make names unique
without a system call each.  Blocking: pool threads (or start-up) only.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _TempTags:
    """Unique temp-file name parts: this process's pid and a random tag, then
    a counter (no system call per name; a forked child draws its own tag)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = f"{os.getpid()}.{secrets.token_hex(4)}"
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}.{next(self.counter)}"


temp_tag = _TempTags()


def fsync_dir(path: Path | str) -> None:
    """A rename or a new entry in the directory ``path`` survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(
    path: Path,
    data: bytes | Iterable[bytes],
    *,
    mode: int = 0o600,
    exact_mode: bool = False,
    sync_dir: bool = True,
    hidden: bool = False,
) -> None:
    """Replace ``path`` with ``data`` (bytes, or pieces of it): temp file in
    the same directory, fsync, rename; then fsync the directory if ``sync_dir``.

    The file gets ``mode`` less the umask, or exactly ``mode`` with
    ``exact_mode`` (one more system call).
    """
    tmp = path.with_name(f"{'.' if hidden else ''}{path.name}.{temp_tag()}.tmp")
    fd = os.open(tmp, CREATE_FLAGS, mode)
    try:
        try:
            if isinstance(data, bytes):
                write_all(fd, data)
            else:
                for piece in data:
                    write_all(fd, piece)
            if exact_mode:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(path.parent)
