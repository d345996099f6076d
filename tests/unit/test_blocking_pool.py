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
