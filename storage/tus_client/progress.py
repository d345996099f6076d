"""Progress of an upload: bytes on the server or on their way, and the rate."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    sent: int  # bytes the server confirmed plus bytes of the PATCHes in flight
    total: int
    rate: float  # bytes per second over the last few seconds

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else min(1.0, self.sent / self.total)

    @property
    def eta(self) -> float | None:
        if self.rate <= 0:
            return None
        return max(0.0, (self.total - self.sent) / self.rate)


class RateMeter:
    """Bytes per second over a sliding window of ``window`` seconds."""

    def __init__(self, now: Callable[[], float], window: float = 5.0) -> None:
        self.now = now
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()
        self.transferred = 0

    def add(self, nbytes: int) -> None:
        self.transferred += nbytes
        now = self.now()
        self.samples.append((now, self.transferred))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


class ProgressTracker:
    """Adds up the parts of an upload (one, or N partial uploads)."""

    def __init__(self, total: int, callback: Callable[[Progress], None] | None,
                 now: Callable[[], float]) -> None:
        self.total = total
        self.callback = callback
        self.meter = RateMeter(now)
        self.confirmed: dict[Hashable, int] = {}
        self.inflight: dict[Hashable, int] = {}

    @property
    def sent(self) -> int:
        return sum(self.confirmed.values()) + sum(self.inflight.values())

    def snapshot(self) -> Progress:
        return Progress(min(self.sent, self.total), self.total, self.meter.rate())

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.snapshot())

    def confirm(self, part: Hashable, offset: int) -> None:
        self.confirmed[part] = offset
        self.inflight[part] = 0
        self._report()

    def produced(self, part: Hashable, nbytes: int) -> None:
        self.inflight[part] = self.inflight.get(part, 0) + nbytes
        self.meter.add(nbytes)
        self._report()
