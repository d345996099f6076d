"""Progress on stderr: a redrawn bar on a terminal, a few plain lines otherwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressDisplay:
    """``update(sent, total, rate)`` as often as you like; it draws sparingly.

    On a terminal: one bar redrawn at most every ``redraw`` seconds.  Elsewhere
    (a log, a pipe): a line at every 10 % step or every ``line_interval``
    seconds, whichever comes first.
    """

    def __init__(self, stream: TextIO, label: str, is_tty: bool, now: Callable[[], float],
                 line_interval: float = 5.0, redraw: float = 0.1, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.is_tty = is_tty
        self.now = now
        self.line_interval = line_interval
        self.redraw = redraw
        self.width = width
        self.last_draw = float("-inf")
        self.last_step = -1
        self.drew_bar = False

    def _numbers(self, sent: int, total: int | None, rate: float) -> tuple[str, str, str]:
        eta = (total - sent) / rate if total is not None and rate > 0 else None
        amount = f"{human_bytes(sent)} of {human_bytes(total)}" if total is not None \
            else human_bytes(sent)
        return amount, f"{human_bytes(rate)}/s", human_duration(eta)

    def update(self, sent: int, total: int | None, rate: float, final: bool = False) -> None:
        now = self.now()
        fraction = 1.0 if not total else min(1.0, sent / total)
        amount, speed, eta = self._numbers(sent, total, rate)
        if self.is_tty:
            if not final and now - self.last_draw < self.redraw:
                return
            filled = int(fraction * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            percent = f"{fraction * 100:5.1f}%" if total is not None else "   ?  "
            self.stream.write(f"\r{self.label} [{bar}] {percent} {amount}  {speed}  ETA {eta} \x1b[K")
            if final:
                self.stream.write("\n")
            self.stream.flush()
            self.drew_bar = True
            self.last_draw = now
            return
        step = int(fraction * 10) if total else -1
        if final or step > self.last_step or now - self.last_draw >= self.line_interval:
            percent = f"{fraction * 100:.0f}%" if total is not None else "?"
            self.stream.write(f"{self.label}: {percent} {amount}, {speed}, ETA {eta}\n")
            self.stream.flush()
            self.last_step = max(self.last_step, step)
            self.last_draw = now

    def message(self, text: str) -> None:
        """A line of its own (ends a bar in progress first)."""
        if self.is_tty and self.drew_bar:
            self.stream.write("\n")
            self.drew_bar = False
        self.stream.write(text + "\n")
        self.stream.flush()
