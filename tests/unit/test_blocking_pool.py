"""BlockingPool: every thread is running once the service has started, so a
burst of requests never makes the reactor wait for a new thread to start."""

from __future__ import annotations

import threading

from twisted.internet import reactor

from storage.blocking import BlockingPool


def test_every_thread_starts_with_the_service():
    pool = BlockingPool(reactor, max_threads=5)
    before = threading.active_count()
    pool.startService()
    try:
        assert len(pool.threadpool.threads) == 5
        assert threading.active_count() - before == 5
    finally:
        pool.threadpool.stop()
    assert not any(t.is_alive() for t in pool.threadpool.threads)


class _RecordingPool:
    """Stands in for BlockingPool: calls wait until the test fires them."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.Deferred = Deferred
        self.calls: list = []

    def run(self, f, *args, **kwargs):
        d = self.Deferred()
        self.calls.append((f, args, kwargs, d))
        return d


def test_a_lane_runs_at_most_its_width_at_once_and_the_rest_in_order():
    from storage.blocking import Lane

    pool = _RecordingPool()
    lane = Lane(pool, 2)  # type: ignore[arg-type]
    results: list = []
    errors: list = []
    for i in range(5):
        lane.run(str, i).addCallbacks(results.append, errors.append)
    assert [c[1] for c in pool.calls] == [(0,), (1,)]  # two started, three wait
    assert lane.running == 2 and len(lane.waiting) == 3
    pool.calls[1][3].callback("one")
    assert [c[1] for c in pool.calls] == [(0,), (1,), (2,)]  # a place freed: the next in order
    pool.calls[0][3].errback(ValueError("zero"))  # a failure frees its place too
    assert [c[1] for c in pool.calls][-1] == (3,)
    fired = 2
    while fired < len(pool.calls):  # each completion starts the next waiting call
        f, args, _, d = pool.calls[fired]
        d.callback(args[0])
        fired += 1
    assert fired == 5
    assert results == ["one", 2, 3, 4]
    assert [e.check(ValueError) for e in errors] == [ValueError]
    assert lane.running == 0 and not lane.waiting

