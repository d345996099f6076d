"""Background tasks: delete, clone and delete-async run here, pollable by id.

Upstream reports their progress on a Redis event bus; we keep a bounded table
in memory that ``GET /bgtask`` (manager API) reads.  Finished tasks are kept
for ``retention`` seconds so a manager can still see how they ended.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger

log = Logger()


class TaskCancelled(Exception):
    pass


@dataclass
class Progress:
    """What a long operation reports, and how it learns it should stop."""

    current: int = 0
    total: int | None = None
    message: str | None = None
    cancelled: bool = False

    def advance(self, n: int = 1) -> None:
        self.current += n

    def check(self) -> None:
        """Called by the operation between steps: raises once cancelled."""
        if self.cancelled:
            raise TaskCancelled()


@dataclass
class BackgroundTask:
    task_id: uuid.UUID
    name: str
    progress: Progress = field(default_factory=Progress)
    status: str = "running"  # running | done | failed | cancelled
    error: dict[str, Any] | None = None
    result: Any = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    deferred: Deferred[Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "task_id": str(self.task_id),
            "name": self.name,
            "status": self.status,
            "progress": {
                "current": self.progress.current,
                "total": self.progress.total,
                "message": self.progress.message,
            },
            "result": self.result,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class BackgroundTaskRegistry:
    def __init__(self, retention: float = 3600.0, max_finished: int = 10000) -> None:
        self.retention = retention
        self.max_finished = max_finished
        self._tasks: OrderedDict[uuid.UUID, BackgroundTask] = OrderedDict()

    def start(self, name: str, fn: Callable[[Progress], Coroutine[Any, Any, Any]], **context: Any) -> BackgroundTask:
        task = BackgroundTask(uuid.uuid4(), name)
        self._tasks[task.task_id] = task
        self._prune()
        d: Deferred[Any] = ensureDeferred(fn(task.progress))
        task.deferred = d

        def done(result: Any) -> None:
            task.status = "done"
            task.result = result if isinstance(result, (dict, list, int, str, type(None))) else None
            task.finished_at = time.time()

        def failed(failure: Any) -> None:
            task.finished_at = time.time()
            if failure.check(TaskCancelled, CancelledError):
                task.status = "cancelled"
                return
            task.status = "failed"
            from .errors import StorageError

            exc = failure.value
            if isinstance(exc, StorageError):
                task.error = exc.body()
            else:
                task.error = {"type": "internal", "title": repr(exc)}
                log.failure("background task {name} {task_id} failed ({context})", failure,
                            name=name, task_id=task.task_id, context=context)

        d.addCallbacks(done, failed)
        return task

    def get(self, task_id: uuid.UUID) -> BackgroundTask | None:
        return self._tasks.get(task_id)

    def cancel(self, task_id: uuid.UUID) -> BackgroundTask | None:
        task = self._tasks.get(task_id)
        if task is not None and task.status == "running":
            task.progress.cancelled = True
        return task

    def all(self) -> list[BackgroundTask]:
        return list(self._tasks.values())

    def running(self) -> list[BackgroundTask]:
        return [t for t in self._tasks.values() if t.status == "running"]

    def _prune(self) -> None:
        now = time.time()
        finished = [t for t in self._tasks.values() if t.finished_at is not None]
        excess = len(finished) - self.max_finished
        for t in finished:  # oldest first: the dict keeps insertion order
            if excess > 0 or now - (t.finished_at or now) > self.retention:
                del self._tasks[t.task_id]
                excess -= 1
