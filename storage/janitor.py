"""Removes abandoned tus uploads: a periodic sweep of every volume's staging dirs.

An upload whose state says it has expired (``upload-expire`` after creation,
or, once complete, when its token expires) loses its staging file and state;
one being written (its lock held) is left for the next sweep.  Completion
records (of uploads whose target cannot carry the completion xattr) go when
their token expires.  Staging files without a state file (a crash while
creating one) and stale temporary state files go after a grace period.
The sweep runs in the I/O pool.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from storage.uploads import (
    STAGING_DIR,
    STATE_SUFFIX,
    UploadBusy,
    completion_records_dir,
    is_session_id,
    read_state,
    remove_expired_completion_records,
    remove_staging_dir_if_empty,
    remove_upload,
)

log = Logger()

ORPHAN_GRACE = 86400.0  # a staging file with no state, or a leftover temp file


def staging_dirs(root: Path) -> Iterator[Path]:
    """Every ``.upload`` dir of the volume, in both vfolder layouts."""
    for pattern in (f"*/*/*/{STAGING_DIR}", f"*/*/*/*/{STAGING_DIR}"):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                yield path


def sweep_vfolder(vfolder: Path, now: float) -> int:
    """Remove the expired uploads of one vfolder (blocking); returns how many went."""
    sdir = vfolder / STAGING_DIR
    removed = 0
    try:
        names = os.listdir(sdir)
    except OSError:
        return 0
    states = {n[: -len(STATE_SUFFIX)] for n in names if n.endswith(STATE_SUFFIX)}
    for name in names:
        path = sdir / name
        if name.endswith(STATE_SUFFIX):
            session = name[: -len(STATE_SUFFIX)]
            state = read_state(vfolder, session)
            expired = state.expires < now if state is not None else _older_than(path, now, ORPHAN_GRACE)
            if expired:
                try:
                    remove_upload(vfolder, session)
                    removed += 1
                except UploadBusy:
                    pass
        elif is_session_id(name) and name not in states:
            if _older_than(path, now, ORPHAN_GRACE):
                try:
                    remove_upload(vfolder, name)
                    removed += 1
                except UploadBusy:
                    pass
        elif name.endswith(".tmp") and _older_than(path, now, ORPHAN_GRACE):
            try:
                path.unlink()
            except OSError:
                pass
    remove_staging_dir_if_empty(vfolder)
    return removed


def _older_than(path: Path, now: float, age: float) -> bool:
    try:
        return path.lstat().st_mtime + age < now
    except OSError:
        return False


def sweep_volume(root: Path, now: float) -> int:
    removed = sum(sweep_vfolder(sdir.parent, now) for sdir in staging_dirs(root))
    return removed + remove_expired_completion_records(completion_records_dir(root), now, ORPHAN_GRACE)


class UploadJanitor(TimerService):
    name = "upload-janitor"  # type: ignore[assignment]

    def __init__(self, volumes: Any, pool: Any, interval: float = 3600.0, clock: Any = None) -> None:
        super().__init__(interval, self.sweep)
        if clock is not None:
            self.clock = clock
        self.volumes = volumes
        self.pool = pool

    def sweep(self, now: float | None = None) -> Deferred[list[int]]:
        now = time.time() if now is None else now
        work = []
        for volume in self.volumes:
            d = self.pool.run(sweep_volume, Path(volume.root), now)
            d.addCallback(self._report, volume.name)
            d.addErrback(lambda f, name=volume.name: log.failure("upload janitor: volume {volume}", f, volume=name))
            work.append(d)
        return gatherResults(work)

    def _report(self, removed: int, name: str) -> int:
        if removed:
            log.info("upload janitor: removed {n} expired uploads on volume {volume}", n=removed, volume=name)
        return removed
