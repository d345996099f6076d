"""The task journal: which background tasks were running when the daemon died.

One append-only file of JSON lines, ``<state-dir>/tasks.journal``:

* ``{"start": "<task id>", "name": ..., "context": {...}, "attempt": N}`` --
  fsync'ed when a task starts;
* ``{"end": "<task id>"}`` -- once the task's last events are in the outbox
  (so a kill between the two re-runs the end, never loses it).

At the next start the tasks with a start and no end are handed to
``recover``: a delete (vfolder or files) is run again under its task id
(deletes are idempotent), a clone removes its partial destination and
fails (the manager then gets ``vfolder_clone_failure`` and may clone
again).  A task already resumed ``max_attempts`` times fails instead of
running again, so a task that kills the daemon cannot do so for ever.
The file is rewritten at load with only the unfinished records.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from storage.events.jsonlines import (
    LineFile,
    append,
    encode_line,
    open_append,
    rewrite_lines,
    truncate,
)

log = Logger()

FILE_NAME = "tasks.journal"


def read_unfinished(path: Path) -> list[dict[str, Any]]:
    """Blocking: the start records without an end (latest per task); [] without a file."""
    starts: dict[str, dict[str, Any]] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "end" in record:
                starts.pop(str(record["end"]), None)
            elif "start" in record:
                starts[str(record["start"])] = record
        except (ValueError, KeyError, TypeError):
            log.warn("task journal {path}: skipping a damaged line", path=str(path))
    return list(starts.values())


def _load(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Blocking: ``read_unfinished``, the file rewritten with only those and reopened."""
    unfinished = read_unfinished(path)
    if path.exists() and path.stat().st_size:
        rewrite_lines(path, [encode_line(r) for r in unfinished])
    return unfinished, open_append(path)


class TaskJournal(LineFile):
    max_attempts = 3
    compact_size = 1 << 20

    def __init__(self, path: Path, pool: Any, claimed: Any = None) -> None:
        super().__init__(path, pool)
        self.claimed = claimed
        self._attempts: dict[str, int] = {}

    async def load(self) -> list[dict[str, Any]]:
        if self.claimed is not None:
            await self.claimed()
        await self._lock.acquire()
        try:
            unfinished, self._fd = await self.pool.run(_load, self.path)
            self._size = sum(len(encode_line(r)) for r in unfinished)
        finally:
            self._lock.release()
        for record in unfinished:
            self._attempts[str(record["start"])] = int(record.get("attempt", 1))
        return unfinished

    async def _write(self, record: dict[str, Any], sync: bool) -> None:
        await self._lock.acquire()
        try:
            if self._fd is None:
                return
            data = encode_line(record)
            if "end" in record and not self._attempts and self._size >= self.compact_size:
                await self.pool.run(truncate, self._fd)  # nothing is running: start afresh
                self._size = 0
                return
            await self.pool.run(append, self._fd, data, sync)
            self._size += len(data)
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror or exc}"
            log.error("task journal: cannot write {path}: {exc}", path=str(self.path), exc=exc)
        finally:
            self._lock.release()

    @property
    def active(self) -> bool:
        """Open and writable: what it records will be resumed."""
        return self._fd is not None and self.last_error is None

    def inherit(self, task_id: str, attempts: int) -> None:
        """A dead replica's task, started ``attempts`` times there, continues here."""
        self._attempts[task_id] = max(attempts, self._attempts.get(task_id, 0))

    def attempt_of(self, task_id: str) -> int:
        """How many times this task has started (1 for a new one)."""
        return self._attempts.get(task_id, 0) + 1

    async def started(self, task_id: str, name: str, context: dict[str, Any]) -> None:
        attempt = self.attempt_of(task_id)
        self._attempts[task_id] = attempt
        await self._write({"start": task_id, "name": name, "context": context, "attempt": attempt}, True)

    async def ended(self, task_id: str) -> None:
        self._attempts.pop(task_id, None)
        await self._write({"end": task_id}, False)


class JournalService(Service):
    """Closes the journal at stop; set up before the event bus so it stops after it."""

    name = "task-journal"  # type: ignore[assignment]

    def __init__(self, journal: TaskJournal) -> None:
        self.journal = journal

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.journal.close())


async def resume_unfinished(journal: TaskJournal, delivery: Any, bgtasks: Any, runner_for: Any) -> int:
    """Start again, under their ids, the tasks a former run left unfinished; how many."""
    unfinished = await journal.load()
    await delivery.loaded()
    resumed = 0
    for record in unfinished:
        tid = str(record["start"])
        if tid in delivery.outbox.ended_task_ids:
            # Its end is already in the outbox (killed before the journal heard of it).
            await journal.ended(tid)
            continue
        start_recorded(record, journal, bgtasks, runner_for)
        resumed += 1
    return resumed


def start_recorded(record: dict[str, Any], journal: TaskJournal, bgtasks: Any, runner_for: Any) -> Any:
    """Start the task of a journal's start ``record`` again, under its id (this run's or a
    dead replica's: ``storage.events.takeover``); the ``BackgroundTask``."""
    tid, name, context = str(record["start"]), str(record["name"]), dict(record.get("context") or {})
    attempt = journal.attempt_of(tid)
    runner: Any
    try:
        runner = runner_for(name, context, resumed=True)
    except (ValueError, KeyError):
        runner = _failing(f"storage-proxy stopped during this {name} task and cannot resume it")
    if attempt > journal.max_attempts:
        if name != "clone-vfolder":  # a clone's runner already removes the copy and fails
            runner = _failing(f"storage-proxy stopped during this task {attempt - 1} times; giving up")
    log.warn("resuming background task {name} {task_id} (attempt {attempt}) left by a stopped daemon",
             name=name, task_id=tid, attempt=attempt)
    return bgtasks.start(name, runner, task_id=uuid.UUID(tid), **context)


def _failing(message: str) -> Any:
    async def fail(progress: Any) -> None:
        from storage.errors import ExecutionError

        raise ExecutionError(message)

    return fail
