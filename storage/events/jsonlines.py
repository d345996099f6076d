"""Append-only files of JSON lines, kept durable: the outbox's and the task journal's.

Every function blocks: callers run them in the blocking pool.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import DeferredLock

from storage.fs.atomic import fsync_dir, write_atomic


def rewrite_lines(path: Path, lines: list[bytes]) -> None:
    """Blocking: replace ``path`` atomically (and durably) with ``lines``.

    Called when the file is loaded, before anything else writes it: the temp
    files of a rewrite that a kill interrupted are removed first.
    """
    for stale in path.parent.glob(glob.escape(path.name) + ".*tmp"):
        stale.unlink(missing_ok=True)
    write_atomic(path, lines)


def encode_line(record: dict[str, Any]) -> bytes:
    """One record, compact, newline-terminated (a torn last line is skipped when read)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def open_append(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    fsync_dir(path.parent)
    return fd


def append(fd: int, data: bytes, sync: bool) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    if sync:
        os.fsync(fd)


def truncate(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.fsync(fd)


class LineFile:
    """What the outbox and the journal share: the file, the pool its
    operations run in, one at a time in order (``_lock``), the open
    descriptor (None until ``load``, and after ``close``), the bytes written
    since the last compaction, the last write error, and ``claimed`` (async:
    returns once this daemon owns the state dir, ``takeover.StateOwner``; None
    where nothing is shared)."""

    def __init__(self, path: Path, pool: Any) -> None:
        self.path = Path(path)
        self.pool = pool
        self._lock = DeferredLock()
        self._fd: int | None = None
        self._size = 0
        self.last_error: str | None = None
        self.claimed: Any = None

    async def close(self) -> None:
        await self._lock.acquire()
        try:
            fd, self._fd = self._fd, None
            if fd is not None:
                await self.pool.run(os.close, fd)
        finally:
            self._lock.release()
