"""Append-only files of JSON lines, kept durable: the outbox's and the task journal's.

Every function blocks: callers run them in the blocking pool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from storage.fs.atomic import fsync_dir, write_atomic


def rewrite_lines(path: Path, lines: list[bytes]) -> None:
    """Blocking: replace ``path`` atomically (and durably) with ``lines``."""
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
