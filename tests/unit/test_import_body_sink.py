"""The import's body sink (storage/artifacts/hfimport.py): after a write fails, nothing more of the
body reaches the target -- a later batch written at the failed one's offset would shift the file
(a reservoir file has no hash to catch it)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from storage.artifacts.hfimport import WRITE_BATCH, _BodySink
from storage.bgtasks import Progress


class Pool:
    """Runs each call only when ``flush()`` says, as the real pool runs it later on a thread:
    the body's later batches are queued behind a write that will fail."""

    def __init__(self) -> None:
        self.queue: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def run(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((d, f, args))
        return d

    def flush(self) -> None:
        while self.queue:
            d, f, args = self.queue.pop(0)
            try:
                result = f(*args)
            except Exception as exc:  # noqa: BLE001
                d.errback(Failure(exc))
            else:
                d.callback(result)


class Transport:
    def __init__(self) -> None:
        self.stopped = 0

    def stopProducing(self) -> None:
        self.stopped += 1

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class Target:
    def __init__(self, fail_at: int) -> None:
        self.calls: list[int] = []
        self.fail_at = fail_at
        self.offset = 0

    def write(self, data: bytes) -> None:
        self.calls.append(len(data))
        if len(self.calls) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.offset += len(data)


def _run(fail_at: int, batches: int) -> tuple[Target, list[Failure], Transport, Progress]:
    target = Target(fail_at)
    progress = Progress()
    pool = Pool()
    sink = _BodySink(target, pool, progress, Clock(), idle=60)  # type: ignore[arg-type]
    transport = Transport()
    sink.makeConnection(transport)  # type: ignore[arg-type]
    outcome: list[Failure] = []
    sink.done.addErrback(outcome.append)
    for _ in range(batches):
        sink.dataReceived(b"x" * WRITE_BATCH)  # all arrive before the first write ran
    sink.connectionLost(Failure(ResponseDone()))
    pool.flush()
    return target, outcome, transport, progress


def test_nothing_is_written_after_a_failed_write() -> None:
    target, outcome, transport, progress = _run(fail_at=2, batches=5)
    assert target.calls == [WRITE_BATCH, WRITE_BATCH]  # the third to fifth batches never reach it
    assert target.offset == WRITE_BATCH and progress.current == WRITE_BATCH
    assert len(outcome) == 1 and outcome[0].check(OSError) and transport.stopped >= 1


def test_every_batch_is_written_in_order_without_a_failure() -> None:
    target, outcome, _, progress = _run(fail_at=0, batches=4)
    assert target.calls == [WRITE_BATCH] * 4 and not outcome and progress.current == 4 * WRITE_BATCH
