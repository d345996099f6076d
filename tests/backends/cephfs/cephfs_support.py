"""Waiting for CephFS's lazy recursive stats without blocking the reactor."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred

T = TypeVar("T")


def rstats_timeout() -> float:
    """How long lazy rstats may take to settle (README: ~2.4 s fast, ~20 s default)."""
    return 20.0 if os.environ.get("CEPHFS_FAST_RSTATS") == "1" else 60.0


def sleep(seconds: float) -> Deferred[None]:
    """Wait without blocking the reactor (the pool's results arrive through it)."""
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def poll_until(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout: float | None = None
) -> T:
    """Await ``probe()`` until ``accept(result)``; the last result on timeout (the assert shows it)."""
    deadline = time.monotonic() + (timeout or rstats_timeout())
    while True:
        value = await probe()
        if accept(value) or time.monotonic() > deadline:
            return value
        await sleep(0.25)
