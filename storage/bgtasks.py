"""Background tasks: delete, clone and delete-async run here, pollable by id.

Upstream reports their progress on a Redis event bus; we keep a bounded table
in memory that ``GET /bgtask`` (manager API) reads.  Finished tasks are kept
for ``retention`` seconds so a manager can still see how they ended.

Listener hooks (the seam for the event bus and anything else that must see a
task's life): ``registry.add_listener(obj)`` where ``obj`` has the methods of
:class:`TaskListener` -- ``task_started(task)`` before the task's first step,
``task_progress(task)`` whenever its ``Progress`` advances or changes message,
``task_finished(task)`` once, with ``task.status`` set to ``done``, ``failed``
or ``cancelled`` (and ``task.error``, ``task.exception`` for a failure).  Progress reported from a
pool thread reaches ``task_progress`` on the reactor thread.  ``task.context`` holds the
keyword arguments given to ``start`` (volume, vfid, ...).  Listeners run on the
reactor and must not block; an exception in one is logged and ignored.
``storage.events.publisher.EventPublisher`` is the listener that turns these
into the manager's Redis events.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.python import threadable

log = Logger()

PROGRESS_HOP = 0.25  # seconds between progress notices coming from pool threads


class TaskCancelled(Exception):
    pass


@dataclass
class Progress:
    """What a long operation reports, and how it learns it should stop."""

    current: int = 0
    total: int | None = None
    message: str | None = None
    cancelled: bool = False
    on_change: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def advance(self, n: int = 1) -> None:
        self.current += n
        self.changed()

    def changed(self) -> None:
        """Tell the registry's listeners (called by ``advance``; call it after setting ``total``/``message``)."""
        if self.on_change is not None:
            self.on_change()

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
    context: dict[str, Any] = field(default_factory=dict)
    exception: BaseException | None = field(default=None, repr=False)  # why it failed (listeners)
    interrupted: bool = False  # cancelled because the daemon stops (a journal resumes it at the next start)
    recorded: Deferred[Any] | None = field(default=None, repr=False)  # listeners' durable records of the start

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


class TaskListener(Protocol):
    def task_started(self, task: BackgroundTask) -> Any: ...  # may return a Deferred (task.recorded)

    def task_progress(self, task: BackgroundTask) -> None: ...

    def task_finished(self, task: BackgroundTask) -> None: ...


class BackgroundTaskRegistry:
    def __init__(self, retention: float = 3600.0, max_finished: int = 10000) -> None:
        self.retention = retention
        self.max_finished = max_finished
        self._tasks: OrderedDict[uuid.UUID, BackgroundTask] = OrderedDict()
        self._listeners: list[TaskListener] = []

    def add_listener(self, listener: TaskListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: TaskListener) -> None:
        self._listeners.remove(listener)

    def _notify(self, hook: str, task: BackgroundTask) -> list[Deferred[Any]]:
        waits: list[Deferred[Any]] = []
        for listener in list(self._listeners):
            try:
                result = getattr(listener, hook)(task)
            except Exception:
                log.failure("background task listener {listener!r} failed in {hook} ({task_id})",
                            listener=listener, hook=hook, task_id=task.task_id)
                continue
            if isinstance(result, Deferred):
                waits.append(result)
        return waits

    def start(self, name: str, fn: Callable[[Progress], Coroutine[Any, Any, Any]], *,
              task_id: uuid.UUID | None = None, **context: Any) -> BackgroundTask:
        """Run ``fn(progress)``; ``task_id`` resumes a task a former run left unfinished."""
        task = BackgroundTask(task_id or uuid.uuid4(), name, context=dict(context))
        self._tasks[task.task_id] = task
        self._prune()

        last_hop = [0.0]

        def progressed() -> None:
            # Tree operations advance from pool threads, once per entry: hop to
            # the reactor (where listeners run) at most every PROGRESS_HOP seconds.
            if not threadable.isInIOThread():
                now = time.monotonic()
                if now - last_hop[0] < PROGRESS_HOP:
                    return
                last_hop[0] = now
                from twisted.internet import reactor

                reactor.callFromThread(progressed)  # type: ignore[attr-defined]
                return
            if task.status == "running":
                self._notify("task_progress", task)

        task.progress.on_change = progressed
        # A listener may return a Deferred (a journal's fsync): ``task.recorded``
        # fires once all have, so an API can answer only when the task is on disk.
        waits = self._notify("task_started", task)
        task.recorded = DeferredList(waits, consumeErrors=True) if waits else None
        d: Deferred[Any] = ensureDeferred(fn(task.progress))
        task.deferred = d

        def done(result: Any) -> None:
            task.status = "done"
            task.result = result if isinstance(result, (dict, list, int, str, type(None))) else None
            task.finished_at = time.time()
            self._notify("task_finished", task)

        def failed(failure: Any) -> None:
            task.finished_at = time.time()
            if failure.check(TaskCancelled, CancelledError):
                task.status = "cancelled"
                self._notify("task_finished", task)
                return
            task.status = "failed"
            task.exception = failure.value
            from .errors import StorageError

            exc = failure.value
            if isinstance(exc, StorageError):
                task.error = exc.body()
            else:
                task.error = {"type": "internal", "title": repr(exc)}
                log.failure("background task {name} {task_id} failed ({context})", failure,
                            name=name, task_id=task.task_id, context=context)
            self._notify("task_finished", task)

        d.addCallbacks(done, failed)
        return task

    def get(self, task_id: uuid.UUID) -> BackgroundTask | None:
        return self._tasks.get(task_id)

    def cancel(self, task_id: uuid.UUID, *, interrupted: bool = False) -> BackgroundTask | None:
        """Ask a running task to stop; ``interrupted``: because the daemon stops (not a user's cancel)."""
        task = self._tasks.get(task_id)
        if task is not None and task.status == "running":
            task.progress.cancelled = True
            task.interrupted = interrupted
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
