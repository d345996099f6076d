"""Delivery of events to the manager's Redis, in order, at least once.

``Delivery`` is a service with one FIFO queue and one pump that sends the
queue's head (``encoding.commands`` in the configured format) and moves on
only once Redis accepted it; while Redis is unreachable it retries with
backoff and keeps everything after the head waiting, so the events of one
task arrive in the order they were made.

``publish(events, durable=True)`` first writes the events to the outbox
(fsync'ed), then queues them; the outbox entry is acknowledged once Redis
has the event.  Events a former run left in the outbox are queued at start,
before any new one.  ``durable=False`` (progress notices) skips the outbox,
and while Redis is down such an event is dropped rather than queued: it
would be stale by the time it arrived.

Counters (``sent``, ``queued``, ``failed``, ``dropped``) feed ``/metrics``;
``state()`` feeds the health checks.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from storage.events.encoding import Event, commands
from storage.events.link import LinkDown, RedisLink
from storage.events.outbox import Outbox

log = Logger()


class Delivery(Service):
    name = "event-bus"  # type: ignore[assignment]

    retry_initial = 0.25
    retry_max = 2.0
    warn_after = 1.0  # seconds of outage before it is logged
    flush_timeout = 3.0  # at stop: how long the pump may go on sending

    def __init__(self, link: RedisLink, outbox: Outbox, event_format: str, reactor: Any,
                 resolve: Any = None) -> None:
        """``resolve``: an async callable returning the RedisSettings when ``link`` has none (etcd)."""
        self.link = link
        self.resolve = resolve
        self._resolving: Deferred[None] | None = None
        self.outbox = outbox
        self.event_format = event_format
        self.reactor = reactor
        self._queue: deque[tuple[Event, int | None]] = deque()
        self._pump: Deferred[None] | None = None
        self._wake: Deferred[None] | None = None
        self._loaded: Deferred[None] | None = None
        self._is_loaded = False
        self._publishing: set[Deferred[Any]] = set()
        self.sent: Counter[str] = Counter()  # by event name
        self.queued: Counter[str] = Counter()  # kept for later: Redis was unreachable when they came
        self.failed: Counter[str] = Counter()  # could not be written to the outbox or encoded
        self.dropped: Counter[str] = Counter()  # progress notices dropped while Redis was down
        self.down_since: float | None = None

    # -- service ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.link.settings is not None:
            self._open_link()
        elif self.resolve is not None:
            self._resolving = Deferred.fromCoroutine(self._resolve())
        self._loaded = Deferred.fromCoroutine(self._load())
        self._pump = Deferred.fromCoroutine(self._run())
        self._pump.addErrback(lambda f: None if f.check(CancelledError) else log.failure("event pump died", f))

    def _open_link(self) -> None:
        assert self.link.settings is not None
        self.event_format = self.link.settings.event_format
        self.link.open()
        log.info("event bus: publishing to {where}; outbox {path}",
                 where=self.link.settings.describe(), path=str(self.outbox.path))

    async def _resolve(self) -> None:
        """Ask for the Redis settings (etcd) until they come; events wait in the outbox meanwhile."""
        assert self.resolve is not None
        delay, warned = 0.5, False
        self.link.note_down("waiting for the Redis settings from etcd")
        while self.running:
            try:
                self.link.settings = await self.resolve()
            except Exception as exc:
                self.link.note_down(f"cannot read the Redis settings from etcd: {exc}")
                if not warned:
                    warned = True
                    log.warn("event bus: cannot read the Redis settings from etcd ({exc}); retrying with backoff",
                             exc=exc)
                await deferLater(self.reactor, delay)
                delay = min(delay * 2, 30.0)
                continue
            if self.running:
                self._open_link()
            return

    async def _load(self) -> None:
        try:
            old = await self.outbox.load()
        except OSError as exc:
            log.error("event bus: cannot open the outbox {path}: {exc}; events are kept in memory only",
                      path=str(self.outbox.path), exc=exc)
            old = []
        if old:
            log.info("event bus: {n} event(s) from the outbox of a former run to deliver", n=len(old))
        # Before anything queued meanwhile (publish waits for the load).
        entries: list[tuple[Event, int | None]] = [(event, seq) for seq, event in old]
        self._queue.extendleft(reversed(entries))
        for event, _ in entries:
            self.queued[event.name] += 1
        self._is_loaded = True
        self._poke()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # Tasks cancelled by the services that stopped before us publish now.
        if self._publishing:
            await DeferredList(list(self._publishing), consumeErrors=True)
        deadline = self.reactor.seconds() + self.flush_timeout
        while self._queue and self.link.connected and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05)
        if self._queue:
            durable = sum(1 for _, seq in self._queue if seq is not None)
            log.warn("event bus: stopping with {n} event(s) undelivered; {d} kept in the outbox for the next start",
                     n=len(self._queue), d=durable)
        if self._pump is not None:
            self._pump.cancel()
        if self._resolving is not None and not self._resolving.called:
            self._resolving.cancel()
        await ensureDeferred(self.outbox.close())
        closing = self.link.close()
        if closing is not None:
            try:
                await closing
            except Exception:
                pass

    def loaded(self) -> Deferred[None]:
        """Fires once the outbox of a former run is loaded (and queued)."""
        d: Deferred[None] = Deferred()
        if self._is_loaded or self._loaded is None:
            d.callback(None)
        else:
            self._loaded.addBoth(lambda _: d.callback(None))
        return d

    # -- publishing ------------------------------------------------------

    def publish(self, events: Iterable[Event], durable: bool = True) -> Deferred[None]:
        batch = list(events)
        if not durable:
            for event in batch:
                if self._is_loaded and self.link.connected:
                    self._queue.append((event, None))
                else:
                    self.dropped[event.name] += 1
            self._poke()
            return Deferred.fromCoroutine(_noop())
        d = Deferred.fromCoroutine(self._publish_durable(batch))
        self._publishing.add(d)

        def settled(result: Any) -> Any:
            self._publishing.discard(d)
            return result

        d.addBoth(settled)
        return d

    async def _publish_durable(self, batch: list[Event]) -> None:
        if not self._is_loaded and self._loaded is not None:
            await self._loaded
        # One write, one fsync: a kill leaves all of a task's end or a prefix of it.
        try:
            seqs: list[int | None] = list(await self.outbox.append_many(batch))
        except OSError as exc:
            for event in batch:
                self.failed[event.name] += 1
            log.error("event bus: cannot write {names} to the outbox ({exc}); kept in memory only",
                      names=[e.name for e in batch], exc=exc)
            seqs = [None] * len(batch)
        entries: list[tuple[Event, int | None]] = list(zip(batch, seqs, strict=True))
        for entry in entries:
            if not self.link.connected:
                self.queued[entry[0].name] += 1
            self._queue.append(entry)
        self._poke()

    # -- the pump ----------------------------------------------------------

    def _poke(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(None)

    async def _idle(self, timeout: float | None) -> None:
        self._wake = Deferred()
        timer = self.reactor.callLater(timeout, self._poke) if timeout is not None else None
        try:
            await self._wake
        finally:
            if timer is not None and timer.active():
                timer.cancel()

    async def _run(self) -> None:
        delay = self.retry_initial
        warned = False
        while True:
            if not self._queue or not self._is_loaded:
                await self._idle(None)
                continue
            event, seq = self._queue[0]
            try:
                for command in commands(event, self.event_format):
                    await self.link.execute(*command)
            except (ValueError, TypeError) as exc:
                # Cannot be encoded: sending again would fail the same way.
                self._queue.popleft()
                self.failed[event.name] += 1
                log.error("event bus: cannot encode {name}: {exc}; dropped", name=event.name, exc=exc)
                if seq is not None:
                    await self.outbox.ack(seq)
                continue
            except Exception as exc:
                if self.down_since is None:
                    self.down_since = time.time()
                    warned = False
                # Not at every start (the first connection takes a moment): once it lasts.
                if not warned and time.time() - self.down_since >= self.warn_after:
                    warned = True
                    reason = str(exc) if isinstance(exc, LinkDown) else repr(exc)
                    log.warn("event bus: Redis unreachable ({reason}); {n} event(s) wait, retrying with backoff",
                             reason=reason, n=len(self._queue))
                await self._idle(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            if self.down_since is not None and warned:
                log.info("event bus: Redis reachable again after {s:.1f}s; delivering {n} event(s)",
                         s=time.time() - self.down_since, n=len(self._queue))
            self.down_since = None
            delay = self.retry_initial
            self._queue.popleft()
            self.sent[event.name] += 1
            if seq is not None:
                await self.outbox.ack(seq)

    # -- state -------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def state(self) -> dict[str, Any]:
        return {
            "connected": self.link.connected,
            "backlog": len(self._queue),
            "outbox_pending": self.outbox.pending,
            "last_error": self.link.last_error,
            "outbox_error": self.outbox.last_error,
            "down_since": self.down_since,
        }


async def _noop() -> None:
    return None
