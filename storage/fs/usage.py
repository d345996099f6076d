"""Usage of a directory tree: a bounded walk in the pool, and a cache of its results.

One walk yields both numbers upstream reports:

* ``/folder/usage`` (upstream: a Python walk): ``file_count`` is every entry
  below the root (files, directories, symlinks), ``used_bytes`` the sum of
  their apparent sizes (``st_size``, directories included); an empty vfolder
  is ``0, 0``.
* ``/folder/used-bytes`` (upstream: ``du -hs``): allocated bytes
  (``st_blocks * 512``) of every entry *and* the root, each inode counted
  once like du does with hard links; an empty vfolder on ext4/XFS is 4096.
  Upstream parses du's human-readable output, so it is rounded; ours is exact.

The walk never follows a symlink: it descends with ``openat(O_NOFOLLOW)`` from
the descriptor of the parent (``storage.fs.walk.walk_tree``), so a directory
swapped for a symlink mid-walk is skipped, never entered; it needs no
recursion and a bounded number of descriptors however deep or wide the tree.

Large trees are slow, so ``UsageCache`` bounds how long a request waits
(``timeout``) while the walk itself may go on (up to ``max_walk``) and fills
the cache for the next request; concurrent requests for the same tree share
one walk, and at most ``concurrency`` walks run at a time so that usage never
takes every pool thread.  When a request times out it gets the last cached
result if there is one (its ``observed_at`` tells how old), else upstream's
"too many" marker: ``-1`` for every number.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger
from twisted.python.failure import Failure

from storage.fs.walk import walk_tree
from storage.paths import open_dir_beneath, open_root

log = Logger()

# How many entries between two looks at the clock and the stop flag.
_CHECK_EVERY = 256


class UsageWalkAborted(Exception):
    """The walk passed its deadline or the service is stopping."""


@dataclass(frozen=True)
class TreeUsage:
    file_count: int
    apparent_bytes: int
    allocated_bytes: int
    observed_at: float  # wall-clock time the walk finished
    duration: float = 0.0

    @property
    def complete(self) -> bool:
        return self.file_count >= 0

    @classmethod
    def too_many(cls) -> TreeUsage:
        """Upstream's answer when the walk is too slow: -1 everywhere."""
        return cls(-1, -1, -1, time.time())


def walk_usage(
    path: Path | str,
    *,
    deadline: float | None = None,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
    beneath: Path | str | None = None,
) -> TreeUsage:
    """Walk ``path`` (blocking: call it from the pool).

    With ``beneath`` (a directory holding ``path``, e.g. the vfolder), the
    part of ``path`` below it is opened without following any symlink, so a
    directory swapped for a symlink since the caller resolved ``path`` is
    refused (ELOOP) instead of walked.  Raises ``UsageWalkAborted`` past
    ``deadline`` (a ``clock()`` value) or when ``stop`` is set, and OSError
    if ``path`` itself cannot be opened.
    """
    started = clock()
    if beneath is None:
        root_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        base_fd = open_root(beneath)
        try:
            root_fd = open_dir_beneath(base_fd, os.path.relpath(path, beneath))
        finally:
            os.close(base_fd)
    count = 0
    apparent = 0
    allocated = os.fstat(root_fd).st_blocks * 512
    seen: set[tuple[int, int]] = set()  # (dev, ino) of hard-linked inodes already counted

    def visit(fds: Sequence[int]) -> list[str]:
        nonlocal count, apparent, allocated
        try:
            with os.scandir(fds[0]) as it:
                entries = list(it)
        except OSError:
            return []  # vanished or unreadable: count what we can, as upstream does
        subdirs: list[str] = []
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # the tree changes while we walk it
            count += 1
            apparent += st.st_size
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    allocated += st.st_blocks * 512
            else:
                allocated += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.name)
            if count % _CHECK_EVERY == 0:
                if stop is not None and stop.is_set():
                    raise UsageWalkAborted("stopping")
                if deadline is not None and clock() > deadline:
                    raise UsageWalkAborted("deadline passed")
        return subdirs

    try:
        walk_tree([root_fd], visit)
    finally:
        os.close(root_fd)
    return TreeUsage(count, apparent, allocated, time.time(), clock() - started)


@dataclass
class _Entry:
    usage: TreeUsage
    stored_at: float  # monotonic


@dataclass
class _Walk:
    generation: int
    waiters: list[Deferred[TreeUsage | None]]


class UsageCache:
    """Bounded, cached, de-duplicated usage walks for one volume.

    ``run(f, *args)`` runs ``f`` in the blocking pool and returns a Deferred;
    ``call_later(seconds, f)`` is the reactor's.  ``walker`` is ``walk_usage``
    (tests pass a slower one).
    """

    def __init__(
        self,
        run: Callable[..., Deferred[Any]],
        call_later: Callable[..., Any],
        *,
        timeout: float = 30.0,
        ttl: float = 10.0,
        max_walk: float = 600.0,
        concurrency: int = 4,
        max_entries: int = 10000,
        walker: Callable[..., TreeUsage] = walk_usage,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self._call_later = call_later
        self.timeout = timeout
        self.ttl = ttl
        self.max_walk = max_walk
        self.max_entries = max_entries
        self._walker = walker
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, _Walk] = {}
        self._generation: dict[str, int] = {}
        self._semaphore = DeferredSemaphore(max(1, concurrency))
        self._stop = threading.Event()

    def stop(self) -> None:
        """Make running walks give up (the pool can then stop promptly)."""
        self._stop.set()

    def cached(self, path: Path | str) -> TreeUsage | None:
        entry = self._cache.get(str(path))
        return entry.usage if entry else None

    def walking(self, path: Path | str) -> bool:
        return str(path) in self._inflight

    def invalidate(self, prefix: Path | str) -> None:
        """Forget results for ``prefix``, everything below it and its ancestors
        (a change inside a tree changes the usage of the trees holding it)."""
        p = str(prefix).rstrip("/")
        for key in set(self._cache) | set(self._inflight):
            if key == p or key.startswith(p + "/") or p.startswith(key + "/"):
                self._cache.pop(key, None)
                self._generation[key] = self._generation.get(key, 0) + 1

    async def get(self, path: Path | str, *, beneath: Path | str | None = None) -> TreeUsage:
        """The usage of ``path`` (see the module docstring); ``beneath`` is passed
        to the walker (``walk_usage``: open ``path`` without following symlinks
        below it)."""
        key = str(path)
        entry = self._cache.get(key)
        if entry is not None and self._clock() - entry.stored_at < self.ttl:
            return entry.usage
        result = await self._wait(key, beneath)
        if result is not None:
            return result
        entry = self._cache.get(key)
        if entry is not None:
            log.info(
                "usage of {path}: walk still running after {timeout}s; answering with the "
                "result from {age:.0f}s ago", path=key, timeout=self.timeout,
                age=self._clock() - entry.stored_at,
            )
            return entry.usage
        log.warn("usage of {path}: walk still running after {timeout}s; answering -1",
                 path=key, timeout=self.timeout)
        return TreeUsage.too_many()

    def _store(self, key: str, usage: TreeUsage) -> None:
        # Newest last; past max_entries the oldest results (the least useful
        # even as a stale answer) are forgotten.
        self._cache.pop(key, None)
        self._cache[key] = _Entry(usage, self._clock())
        while len(self._cache) > self.max_entries:
            del self._cache[next(iter(self._cache))]
        if len(self._generation) > 4 * self.max_entries:
            self._generation = {k: v for k, v in self._generation.items() if k in self._inflight}

    def _wait(self, key: str, beneath: Path | str | None = None) -> Deferred[TreeUsage | None]:
        """Join (or start) the walk of ``key``; None if it is not done within ``timeout``."""
        walk = self._inflight.get(key)
        if walk is None:
            walk = self._start_walk(key, beneath)
        waiter: Deferred[TreeUsage | None] = Deferred()
        walk.waiters.append(waiter)

        def expire() -> None:
            if waiter in walk.waiters:
                walk.waiters.remove(waiter)
                waiter.callback(None)

        timer = self._call_later(self.timeout, expire)
        waiter.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return waiter

    def _start_walk(self, key: str, beneath: Path | str | None) -> _Walk:
        walk = _Walk(self._generation.get(key, 0), [])
        self._inflight[key] = walk

        def run_walk() -> Deferred[TreeUsage]:
            deadline = self._clock() + self.max_walk
            extra = {} if beneath is None else {"beneath": beneath}
            return self._run(self._walker, key, deadline=deadline, stop=self._stop, clock=self._clock, **extra)

        def finish(result: Any) -> None:
            if self._inflight.get(key) is walk:
                del self._inflight[key]
            if isinstance(result, Failure) and result.check(UsageWalkAborted):
                log.warn("usage walk of {path} aborted: {why}", path=key, why=result.value)
                result = TreeUsage.too_many()
            elif not isinstance(result, Failure) and self._generation.get(key, 0) == walk.generation:
                self._store(key, result)
            waiters, walk.waiters = walk.waiters, []
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        self._semaphore.run(run_walk).addBoth(finish)
        return walk
