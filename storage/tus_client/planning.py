"""Pure arithmetic of an upload: chunk ranges, partial splits, retry delays.

Nothing here does I/O, so all of it is property-tested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Range = tuple[int, int]  # [start, end)


def plan_chunks(size: int, offset: int, chunk_size: int | None) -> list[Range]:
    """The PATCH ranges that send ``[offset, size)``: ``chunk_size`` bytes each
    (the last may be shorter), or one range when ``chunk_size`` is None."""
    if size < 0 or not 0 <= offset <= size:
        raise ValueError(f"offset {offset} outside [0, {size}]")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if offset == size:
        return []
    step = chunk_size or size - offset
    return [(start, min(start + step, size)) for start in range(offset, size, step)]


def next_chunk(offset: int, size: int, chunk_size: int | None) -> Range:
    """The next PATCH range when the server is at ``offset``."""
    return (offset, size if chunk_size is None else min(size, offset + chunk_size))


def split_parts(size: int, parallel: int, min_part: int = 1) -> list[Range]:
    """Split ``[0, size)`` into at most ``parallel`` contiguous parts whose lengths
    differ by at most one byte, none shorter than ``min_part`` (unless there is
    only one part)."""
    if parallel < 1:
        raise ValueError("parallel must be >= 1")
    if size <= 0:
        return [(0, 0)] if size == 0 else []
    count = max(1, min(parallel, size // max(1, min_part)))
    base, extra = divmod(size, count)
    parts: list[Range] = []
    start = 0
    for index in range(count):
        end = start + base + (1 if index < extra else 0)
        parts.append((start, end))
        start = end
    return parts


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    ``retries`` bounds the consecutive failed attempts without progress (an
    attempt that moved the server's offset resets it); ``checksum_attempts``
    how often one chunk is re-sent after 460.  Delays are exponential with full
    jitter: ``uniform(0, min(max_delay, base_delay * 2**(n-1)))``.
    """

    retries: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    checksum_attempts: int = 3

    def delay(self, attempt: int, random: Callable[[], float]) -> float:
        cap = min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1)))
        return random() * cap


def parse_size(text: str) -> int:
    """``"64m"``, ``"1.5GiB"``, ``"4096"`` → bytes (binary units)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in units:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"size must be positive: {text!r}")
    return max(1, int(value * units[unit]))
