"""Background tasks: state, progress, failures and cancellation."""

import pytest_twisted
from twisted.internet import defer, task

from storage.bgtasks import BackgroundTaskRegistry, Progress
from storage.errors import VFolderNotFound


@pytest_twisted.ensureDeferred
async def test_task_runs_and_reports_progress():
    registry = BackgroundTaskRegistry()
    gate = defer.Deferred()

    async def work(progress: Progress):
        progress.total = 2
        progress.advance()
        await gate
        progress.advance()
        return {"copied": 2}

    t = registry.start("clone", work)
    assert registry.get(t.task_id).as_json()["status"] == "running"
    assert t.as_json()["progress"] == {"current": 1, "total": 2, "message": None}
    gate.callback(None)
    await t.deferred
    state = t.as_json()
    assert state["status"] == "done" and state["result"] == {"copied": 2}
    assert state["progress"]["current"] == 2 and state["finished_at"] is not None


@pytest_twisted.ensureDeferred
async def test_failed_task_keeps_the_problem_body():
    registry = BackgroundTaskRegistry()

    async def work(progress):
        raise VFolderNotFound("gone")

    t = registry.start("delete", work)
    await t.deferred
    assert t.status == "failed"
    assert t.error["type"].endswith("vfolder/not-found")


@pytest_twisted.ensureDeferred
async def test_cancel_is_cooperative():
    registry = BackgroundTaskRegistry()
    clock = task.Clock()

    async def work(progress):
        while True:
            progress.check()
            await task.deferLater(clock, 1, lambda: None)

    t = registry.start("clone", work)
    registry.cancel(t.task_id)
    clock.advance(1)
    await t.deferred
    assert t.status == "cancelled"


def test_finished_tasks_are_pruned():
    registry = BackgroundTaskRegistry(retention=3600, max_finished=3)

    async def ok(progress):
        return None

    ids = [registry.start("x", ok).task_id for _ in range(6)]
    registry.start("x", ok)
    assert registry.get(ids[0]) is None
    assert registry.get(ids[-1]) is not None


class Recorder:
    def __init__(self):
        self.calls = []

    def task_started(self, t):
        self.calls.append(("started", t.status, t.progress.current))

    def task_progress(self, t):
        self.calls.append(("progress", t.status, t.progress.current))

    def task_finished(self, t):
        self.calls.append(("finished", t.status, type(t.exception).__name__ if t.exception else None))


class Broken:
    def __getattr__(self, name):
        def fail(t):
            raise RuntimeError(name)
        return fail


@pytest_twisted.ensureDeferred
async def test_listeners_see_start_progress_and_one_end():
    registry = BackgroundTaskRegistry()
    rec = Recorder()
    registry.add_listener(Broken())  # a failing listener does not stop the others
    registry.add_listener(rec)
    gate = defer.Deferred()

    async def work(progress):
        progress.advance()
        await gate
        raise OSError(5, "I/O error")

    t = registry.start("delete-vfolder", work, vfid="v")
    assert t.context == {"vfid": "v"}
    gate.callback(None)
    await t.deferred
    assert rec.calls == [("started", "running", 0), ("progress", "running", 1), ("finished", "failed", "OSError")]


@pytest_twisted.ensureDeferred
async def test_progress_from_a_pool_thread_reaches_listeners_on_the_reactor():
    from twisted.internet import reactor, threads
    from twisted.python import threadable

    registry = BackgroundTaskRegistry()
    seen = []

    class OnReactor(Recorder):
        def task_progress(self, t):
            seen.append(threadable.isInIOThread())

    registry.add_listener(OnReactor())

    async def work(progress):
        def many():
            for _ in range(1000):
                progress.advance()
        await threads.deferToThread(many)
        await task.deferLater(reactor, 0.05, lambda: None)

    t = registry.start("delete-files", work)
    await t.deferred
    assert seen and all(seen)
    assert len(seen) < 10  # hops are rate-limited, not one per entry


@pytest_twisted.ensureDeferred
async def test_recorded_waits_for_the_listeners_deferreds_and_cancel_marks_interruption():
    registry = BackgroundTaskRegistry()
    journal_write = defer.Deferred()

    class Journal(Recorder):
        def task_started(self, t):
            return journal_write

    registry.add_listener(Journal())
    gate = defer.Deferred()

    async def work(progress):
        await gate
        progress.check()

    t = registry.start("delete-vfolder", work)
    assert t.recorded is not None and not t.recorded.called
    journal_write.callback(None)
    assert t.recorded.called
    registry.cancel(t.task_id, interrupted=True)
    gate.callback(None)
    await t.deferred
    assert t.status == "cancelled" and t.interrupted
    assert registry.start("x", work).recorded is not None  # only listeners that return one
    plain = BackgroundTaskRegistry().start("y", work)
    assert plain.recorded is None and not plain.interrupted
