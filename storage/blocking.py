"""The bounded thread pool every blocking filesystem call runs in.

The reactor thread never touches the disk: backends call ``pool.run(f, ...)``
and get a Deferred.  Threads cannot be cancelled, so the functions run here
must be idempotent and clean up after themselves.
"""

from __future__ import annotations

from collections import deque
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

    def lane(self, width: int, name: str = "lane") -> Lane:
        """A view of this pool that runs at most ``width`` of its calls at once."""
        return Lane(self, width, name)


class Lane:
    """At most ``width`` calls at once in a shared ``BlockingPool``; the rest
    wait, in order, on the reactor.

    Upload bodies go through one: a thousand PATCHes starting or ending at
    once then occupy a few pool threads, not all of them, so the manager
    API's filesystem calls find a free thread at once, and few threads fight
    the reactor thread for the GIL (each of them can make the reactor wait a
    switch interval, 5 ms, every time it comes back from a system call).
    """

    def __init__(self, pool: BlockingPool, width: int, name: str = "lane") -> None:
        self.pool = pool
        self.width = max(1, width)
        self.name = name
        self.running = 0
        self.waiting: deque[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque()

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        if self.running < self.width:
            return self._start(f, args, kwargs)
        d: Deferred[T] = Deferred()
        self.waiting.append((d, f, args, kwargs))
        return d

    def _start(self, f: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Deferred[T]:
        self.running += 1
        return self.pool.run(f, *args, **kwargs).addBoth(self._finished)

    def _finished(self, result: Any) -> Any:
        self.running -= 1
        if self.waiting:
            d, f, args, kwargs = self.waiting.popleft()
            self._start(f, args, kwargs).chainDeferred(d)
        return result

    async def __call__(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.run(f, *args, **kwargs)
