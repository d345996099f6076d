"""Running a CLI coroutine under ``twisted.internet.task.react`` with clean exits.

``react`` exits 0 when the reactor is stopped from outside (Ctrl-C), so the
operation is cancelled in a before-shutdown trigger and its exit code kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import react


class Failed(Exception):
    """A failure to report in one line and exit 1."""


def run(operation: Callable[[Any], Coroutine[Any, Any, None]], prefix: str) -> None:
    """Run ``operation(reactor)``; exit 0 on success, 1 with ``prefix: <error>``."""
    outcome: dict[str, int] = {}

    async def main(reactor: Any) -> None:
        d = Deferred.fromCoroutine(operation(reactor))
        trigger = reactor.addSystemEventTrigger("before", "shutdown", d.cancel)
        try:
            await d
            outcome["code"] = 0
        except Exception as exc:  # every failure is reported in one line
            if isinstance(exc, CancelledError):
                sys.stderr.write(f"{prefix}: interrupted (run the same command again to resume)\n")
            else:
                sys.stderr.write(f"{prefix}: {describe(exc)}\n")
            outcome["code"] = 1
        finally:
            try:
                reactor.removeSystemEventTrigger(trigger)
            except (KeyError, ValueError):
                pass
        raise SystemExit(outcome["code"])

    try:
        react(main)
    except SystemExit as exc:
        raise SystemExit(outcome.get("code", exc.code if exc.code is not None else 1)) from None


def describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, (Failed, OSError)) or type(exc).__module__.startswith("storage."):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
