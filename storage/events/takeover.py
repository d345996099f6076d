"""Replicas over one shared volume: each owns its state dir, a live one takes over a dead one's.

Every daemon with an event bus holds an exclusive ``flock`` on
``<state-dir>/owner.lock`` for as long as it runs (``StateOwner``, a
service started before the outbox and the journal are read).  A lock dies
with its process: the kernel, or on CephFS the process's ceph-fuse client
through the MDS, releases it the moment the holder is killed, so a lock
that can be taken means its owner is gone -- no lease to wait out.

The replicas' state dirs are siblings (the default
``<first volume>/.storage-proxy/state/<node-id>``, one per node id).  Every
``peer-probe-interval`` each daemon looks at its siblings: one whose task
journal or outbox is not empty and whose lock it can take is a dead
replica's.  Holding that lock (so no other survivor, and not the dead
replica restarting, can read those files meanwhile) it

1. appends the dead replica's undelivered events to its own outbox (they go
   to the manager's Redis from here, in their order),
2. starts the dead replica's unfinished tasks under their ids, as the dead
   replica would have at its restart (a delete runs again, a clone removes
   its partial copy and fails), and waits until its own journal records
   them,
3. empties the dead replica's journal and outbox, and releases the lock.

A survivor killed between 2 and 3 leaves the tasks in both journals: they
run again (deletes are idempotent; a clone fails once more), the events
are sent at least once, never lost.  A dead replica that restarts waits
(``claim_wait``) for a takeover in progress and then finds its files empty.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from storage.events import journal as j
from storage.events import outbox as ob
from storage.events.encoding import Event
from storage.fs.atomic import fsync_dir

log = Logger()

LOCK_NAME = "owner.lock"


class StateDirBusy(OSError):
    """Another live daemon holds this state dir (two daemons with one node id)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(errno.EWOULDBLOCK, f"state dir {path} is held by another live daemon ({holder})")
        self.path = path


def _open_lock(state_dir: Path, create: bool) -> int:
    if create:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    return os.open(state_dir / LOCK_NAME, flags, 0o600)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(state_dir: Path) -> str:
    try:
        return (state_dir / LOCK_NAME).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def claim(state_dir: Path) -> int | None:
    """Blocking: lock our own state dir; the held fd, or None while someone holds it."""
    fd = _open_lock(state_dir, create=True)
    if not _try_flock(fd):
        os.close(fd)
        return None
    # Who holds it, for the operator (and the error of a second daemon with this node id).
    text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    return fd


@dataclass
class Orphan:
    """A dead replica's state, read under its lock (which ``fd`` holds)."""

    state_dir: Path
    fd: int
    tasks: list[dict[str, Any]] = field(default_factory=list)  # journal start records without an end
    events: list[Event] = field(default_factory=list)  # outbox events without an ack, in order
    ended: set[str] = field(default_factory=set)  # task ids whose terminal event is among them


def _has_content(path: Path) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def probe(state_dir: Path) -> Orphan | None:
    """Blocking: a sibling state dir with work left whose owner is dead, locked; else None.

    Cheap for a live or an empty peer: a stat of its two files, and for a
    live one a refused ``flock``.
    """
    journal_path, outbox_path = state_dir / j.FILE_NAME, state_dir / ob.FILE_NAME
    if not (_has_content(journal_path) or _has_content(outbox_path)):
        return None
    try:
        fd = _open_lock(state_dir, create=False)
    except FileNotFoundError:
        # A state dir of a daemon from before owner locks: nothing says it is dead.
        return None
    if not _try_flock(fd):
        os.close(fd)
        return None  # alive
    try:
        events_raw, _next, ended = ob._read(outbox_path)
        events: list[Event] = []
        for seq, raw in events_raw:
            try:
                events.append(Event.from_json(raw))
            except (ValueError, KeyError, TypeError):
                log.warn("takeover: {path}: dropping an unreadable event {seq}", path=str(outbox_path), seq=seq)
        tasks = j.read_unfinished(journal_path)
    except BaseException:
        os.close(fd)
        raise
    return Orphan(state_dir, fd, tasks, events, ended)


def settle(orphan: Orphan) -> None:
    """Blocking: empty the dead replica's journal and outbox (now ours), then release its lock."""
    try:
        for name in (j.FILE_NAME, ob.FILE_NAME):
            path = orphan.state_dir / name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.ftruncate(fd, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(orphan.state_dir)
    finally:
        os.close(orphan.fd)  # releases the lock


def release(orphan: Orphan) -> None:
    os.close(orphan.fd)


def peers(own: Path) -> list[Path]:
    """Blocking: the sibling state dirs of ``own`` (the other replicas')."""
    parent = own.parent
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    own_name = own.name
    return [parent / n for n in names if n != own_name and (parent / n).is_dir()]


class StateOwner(Service):
    """Holds our state dir; once ``watch`` is called, takes over dead replicas' state dirs."""

    name = "state-owner"  # type: ignore[assignment]

    claim_wait = 5.0  # seconds a start waits for the dir (a survivor's takeover holds it briefly)

    def __init__(self, state_dir: Path, pool: Any, reactor: Any, interval: float = 1.0) -> None:
        self.state_dir = Path(state_dir)
        self.pool = pool
        self.reactor = reactor
        self.interval = interval
        self.fd: int | None = None
        self.error: BaseException | None = None
        self._claimed: Deferred[None] | None = None
        self._loop: LoopingCall | None = None
        self._adopt: Any = None
        self._busy = False
        self.adopted_tasks = 0  # counters for /metrics and tests
        self.adopted_events = 0

    # -- our own dir -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._claimed = Deferred.fromCoroutine(self._claim())
        self._claimed.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        self.error = failure.value
        log.error("state dir {path}: cannot hold it: {exc}", path=str(self.state_dir), exc=failure.value)

    async def _claim(self) -> None:
        deadline = self.reactor.seconds() + self.claim_wait
        while True:
            fd = await self.pool.run(claim, self.state_dir)
            if fd is not None:
                self.fd = fd
                return
            if self.reactor.seconds() >= deadline or not self.running:
                raise StateDirBusy(self.state_dir, await self.pool.run(_holder, self.state_dir))
            await deferLater(self.reactor, 0.2)

    async def claimed(self) -> None:
        """Returns once we hold our state dir; raises ``StateDirBusy`` (an OSError) if we cannot."""
        if self.error is not None:
            raise self.error
        assert self._claimed is not None, "StateOwner not started"
        if not self._claimed.called:
            d: Deferred[None] = Deferred()
            self._claimed.addBoth(lambda r: d.callback(None))
            await d
        if self.error is not None:
            raise self.error

    # -- the others' -------------------------------------------------------

    def watch(self, adopt: Any) -> None:
        """Probe the siblings every ``interval``; ``adopt(orphan)`` (async) takes one over.

        Called once our own journal is resumed (so its tasks are never mixed up
        with a dead replica's)."""
        if self.interval <= 0 or not self.running or self.fd is None:
            return
        self._adopt = adopt
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True).addErrback(lambda f: log.failure("takeover loop died", f))

    def _tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        d = Deferred.fromCoroutine(self._round())
        d.addErrback(lambda f: log.failure("takeover: probing the other replicas failed", f))
        d.addBoth(lambda _: setattr(self, "_busy", False))

    async def _round(self) -> None:
        for peer in await self.pool.run(peers, self.state_dir):
            if not self.running:
                return
            try:
                orphan = await self.pool.run(probe, peer)
            except OSError as exc:
                log.debug("takeover: cannot probe {peer}: {exc}", peer=str(peer), exc=exc)
                continue
            if orphan is None:
                continue
            if not orphan.tasks and not orphan.events:
                await self.pool.run(settle, orphan)  # acked only: emptied so we stop looking
                continue
            log.warn("takeover: the replica of {peer} is dead; taking over {t} task(s) and {e} undelivered event(s)",
                     peer=str(peer), t=len(orphan.tasks), e=len(orphan.events))
            try:
                await self._adopt(orphan)
            except BaseException:
                await self.pool.run(release, orphan)  # nothing emptied: the next round (or replica) retries
                raise
            await self.pool.run(settle, orphan)
            self.adopted_tasks += len(orphan.tasks)
            self.adopted_events += len(orphan.events)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # After the outbox and the journal are closed (we stop after them).
        while self._busy:
            await deferLater(self.reactor, 0.05)
        fd, self.fd = self.fd, None
        if fd is not None:
            await self.pool.run(os.close, fd)


async def adopt_orphan(orphan: Orphan, delivery: Any, journal: Any, bgtasks: Any, runner_for: Any) -> None:
    """Make a dead replica's events and tasks ours (on the reactor; ``settle`` empties its files after)."""
    if orphan.events:
        await delivery.publish(orphan.events)  # durable: in our outbox before theirs is emptied
    waits: list[Deferred[Any]] = []
    for record in orphan.tasks:
        tid = str(record["start"])
        if tid in orphan.ended:
            continue  # its end is among the events just forwarded
        existing = bgtasks.get(uuid.UUID(tid))
        if existing is not None and existing.status == "running":
            continue  # already ours (a takeover repeated after a kill)
        journal.inherit(tid, int(record.get("attempt", 1)))
        task = j.start_recorded(record, journal, bgtasks, runner_for)
        if task.recorded is not None:
            waits.append(task.recorded)
    if waits:
        await DeferredList(waits, consumeErrors=True)
    if not journal.active:
        # Not on record here: keep the dead replica's files (the next round, or another replica, retries).
        raise OSError(f"takeover of {orphan.state_dir}: our task journal is not writable ({journal.last_error})")
