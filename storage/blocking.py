"""The bounded thread pool every blocking filesystem call runs in.

The reactor thread never touches the disk: backends call ``pool.run(f, ...)``
and get a Deferred.  Threads cannot be cancelled, so the functions run here
must be idempotent and clean up after themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class BlockingPool(Service):
    """A ``ThreadPool`` owned by a service: started first, stopped last."""

    name: str | None = "blocking-pool"  # type: ignore[assignment]

    def __init__(self, reactor: IReactorFromThreads, max_threads: int = 16) -> None:
        self.reactor = reactor
        self.max_threads = max_threads
        self.threadpool = ThreadPool(minthreads=0, maxthreads=max_threads, name="storage-io")

    def startService(self) -> None:
        super().startService()
        self.threadpool.start()
        # Every thread now, not when a burst of requests arrives: starting a
        # thread makes the reactor wait until the new thread runs, which on
        # busy cores can take tens of milliseconds.
        self.threadpool.adjustPoolsize(minthreads=self.max_threads, maxthreads=self.max_threads)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        # ThreadPool.stop joins the workers: do it off the reactor thread.
        if not self.threadpool.started:
            return None
        return threads.deferToThread(self.threadpool.stop)

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``f(*args, **kwargs)`` in the pool; the result arrives on the reactor."""
        if not self.threadpool.started:
            # Tests and start-up checks may use the pool before the service starts.
            self.threadpool.start()
        return threads.deferToThreadPool(self.reactor, self.threadpool, f, *args, **kwargs)

    async def __call__(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.run(f, *args, **kwargs)
