"""What a background task tells the manager: the listener on ``storage.bgtasks``.

For every task (``delete-vfolder``, ``clone-vfolder``, ``delete-files``):

* at start, ``bgtask_updated`` 0/0 "Task started" (as upstream);
* while it runs, ``bgtask_updated`` with its progress, at most every
  ``progress_interval`` seconds (the latest state is sent at the end of the
  interval);
* at the end, ``bgtask_updated`` with the final progress, then the vfolder
  event of a delete (``vfolder_deletion_success``/``_failure``) or a clone
  (``vfolder_clone_success``/``_failure``), then exactly one of
  ``bgtask_done`` "Task completed successfully", ``bgtask_failed``
  ``repr(exception)`` or ``bgtask_cancelled`` "Task cancelled".

The vfolder and terminal events are durable (outbox); progress is not.

A task the daemon's stop interrupts sends nothing yet: the journal resumes it
at the next start (as upstream revives its retriable tasks), and that run
sends the events.

One deliberate difference: upstream sends no vfolder event for a cancelled
delete or clone (the manager's vfolder then stays ``DELETE_ONGOING`` or
``CLONING`` for ever).  Here a cancelled task ends with the failure event,
message "Task cancelled", so the manager marks the delete failed (it can be
retried) or the clone's source ready again: a task never ends silently.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from storage.bgtasks import BackgroundTask
from storage.events import encoding as enc
from storage.events.delivery import Delivery
from storage.vfid import InvalidID, VFolderID

log = Logger()

MSG_STARTED = "Task started"
MSG_DONE = "Task completed successfully"
MSG_CANCELLED = "Task cancelled"


def wire_vfid(text: str) -> str:
    """A vfolder id as upstream's ``str(VFolderID)`` writes it (a bare folder id as hex)."""
    try:
        vfid = VFolderID.parse(text)
    except InvalidID:
        return text
    if vfid.quota_scope_id is None:
        return vfid.folder_id.hex
    return f"{vfid.quota_scope_id}/{vfid.folder_id.hex}"


def _exc_message(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno:{exc.errno})"
    return str(exc) or repr(exc)


def vfolder_event(task: BackgroundTask) -> enc.Event | None:
    """The anycast event that ends ``task`` for the manager's vfolder table, if any."""
    tid = str(task.task_id)
    if task.status == "done":
        error = None
    elif task.status == "cancelled":
        error = MSG_CANCELLED
    else:
        error = _exc_message(task.exception)
    ctx = task.context
    if task.name == "delete-vfolder" and "vfid" in ctx:
        return enc.vfolder_deletion(wire_vfid(ctx["vfid"]), tid, error)
    if task.name == "clone-vfolder" and "src_vfid" in ctx and "dst_vfid" in ctx:
        return enc.vfolder_clone(wire_vfid(ctx["src_vfid"]), wire_vfid(ctx["dst_vfid"]), tid, error)
    return None


def terminal_event(task: BackgroundTask) -> enc.Event:
    tid = str(task.task_id)
    if task.status == "done":
        return enc.bgtask_finished(tid, "done", MSG_DONE)
    if task.status == "cancelled":
        return enc.bgtask_finished(tid, "cancelled", MSG_CANCELLED)
    exc = task.exception
    return enc.bgtask_finished(tid, "failed", repr(exc) if exc is not None else "unknown error")


def progress_event(task: BackgroundTask, message: str | None = None) -> enc.Event:
    p = task.progress
    return enc.bgtask_updated(str(task.task_id), p.current, p.total or 0, message if message is not None else p.message)


class EventPublisher:
    """A ``TaskListener``: turns the registry's hooks into events for ``Delivery``."""

    progress_interval = 0.5

    def __init__(self, delivery: Delivery, reactor: Any, journal: Any = None) -> None:
        self.delivery = delivery
        self.reactor = reactor
        self.journal = journal  # storage.events.journal.TaskJournal: which tasks are running
        self._last_progress: dict[uuid.UUID, float] = {}
        self._trailing: dict[uuid.UUID, Any] = {}

    def task_started(self, task: BackgroundTask) -> Deferred[None] | None:
        """Returns the journal write (the registry's ``task.recorded`` waits for it)."""
        self._last_progress[task.task_id] = time.monotonic()
        self.delivery.publish([enc.bgtask_updated(str(task.task_id), 0, 0, MSG_STARTED)], durable=False)
        if self.journal is None:
            return None
        d = Deferred.fromCoroutine(self.journal.started(str(task.task_id), task.name, task.context))
        d.addErrback(lambda f: log.failure("task journal: cannot record {task_id}", f, task_id=task.task_id))
        return d

    def task_progress(self, task: BackgroundTask) -> None:
        tid = task.task_id
        wait = self._last_progress.get(tid, 0.0) + self.progress_interval - time.monotonic()
        if wait > 0:
            if tid not in self._trailing:
                self._trailing[tid] = self.reactor.callLater(wait, self._trailing_progress, task)
            return
        self._send_progress(task)

    def _trailing_progress(self, task: BackgroundTask) -> None:
        self._trailing.pop(task.task_id, None)
        if task.status == "running":
            self._send_progress(task)

    def _send_progress(self, task: BackgroundTask) -> None:
        self._last_progress[task.task_id] = time.monotonic()
        self.delivery.publish([progress_event(task)], durable=False)

    def task_finished(self, task: BackgroundTask) -> None:
        self._last_progress.pop(task.task_id, None)
        trailing = self._trailing.pop(task.task_id, None)
        if trailing is not None and trailing.active():
            trailing.cancel()
        if task.interrupted and task.status == "cancelled" and self.journal is not None and self.journal.active:
            # Stopped with the daemon: no end yet; the journal resumes it at the next start.
            log.info("background task {name} {task_id} interrupted by the stop; resumed at the next start",
                     name=task.name, task_id=task.task_id)
            return
        self.delivery.publish([progress_event(task)], durable=False)
        durable = [e for e in (vfolder_event(task), terminal_event(task)) if e is not None]
        d = self.delivery.publish(durable)
        if self.journal is not None:
            # Only once the end is in the outbox: a kill before this re-runs the task's end.
            journal, tid = self.journal, str(task.task_id)
            d.addCallback(lambda _: Deferred.fromCoroutine(journal.ended(tid)))
        d.addErrback(lambda f: log.failure("event bus: cannot publish the end of {task_id}", f, task_id=task.task_id))
