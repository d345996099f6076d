"""Run an external command from the reactor: no shell, bounded time and output.

``run_command`` spawns the executable directly (arguments as bytes, never
through a shell), collects stdout and stderr, and kills the process when it
exceeds its time limit, floods more output than allowed, or the caller
cancels the Deferred (a cancelled clone must not leave a ``pcp`` running).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[bytes, ...]
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class CommandTimeout(Exception):
    def __init__(self, argv: Sequence[bytes], timeout: float) -> None:
        super().__init__(f"{os.fsdecode(argv[0])} did not finish within {timeout:g} s")
        self.argv = tuple(argv)
        self.timeout = timeout


class CommandOutputTooLarge(Exception):
    def __init__(self, argv: Sequence[bytes], limit: int) -> None:
        super().__init__(f"{os.fsdecode(argv[0])} wrote more than {limit} bytes")
        self.argv = tuple(argv)


class _Collector(ProcessProtocol):
    def __init__(self, reactor: Any, argv: tuple[bytes, ...], timeout: float | None, max_output: int) -> None:
        self.reactor = reactor
        self.argv = argv
        self.timeout = timeout
        self.max_output = max_output
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self.size = 0
        self.abort_reason: Exception | None = None
        self.finished: Deferred[CommandResult] = Deferred(self._cancel)
        self.timer = None

    def _transport(self) -> Any:
        return self.transport  # an IProcessTransport once connected

    def connectionMade(self) -> None:
        self._transport().closeStdin()
        if self.timeout is not None:
            self.timer = self.reactor.callLater(self.timeout, self._kill, CommandTimeout(self.argv, self.timeout))

    def _add(self, sink: list[bytes], data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_output:
            self._kill(CommandOutputTooLarge(self.argv, self.max_output))
            return
        sink.append(data)

    def outReceived(self, data: bytes) -> None:
        self._add(self.stdout, data)

    def errReceived(self, data: bytes) -> None:
        self._add(self.stderr, data)

    def _kill(self, reason: Exception) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
        try:
            self._transport().signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def _cancel(self, d: Deferred[CommandResult]) -> None:
        # The Deferred already errbacked with CancelledError; just stop the child.
        self.abort_reason = self.abort_reason or Exception("cancelled")
        try:
            self._transport().signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.finished.called:
            return  # cancelled
        if self.abort_reason is not None:
            self.finished.errback(Failure(self.abort_reason))
            return
        exit_code: int | None = 0
        sig: int | None = None
        if isinstance(reason.value, ProcessTerminated):
            exit_code = reason.value.exitCode
            sig = reason.value.signal
        elif not isinstance(reason.value, ProcessDone):
            exit_code = None
        self.finished.callback(
            CommandResult(self.argv, exit_code, sig, b"".join(self.stdout), b"".join(self.stderr))
        )


def run_command(
    reactor: Any,
    executable: str | bytes,
    args: Sequence[str | bytes],
    *,
    timeout: float | None = 60.0,
    max_output: int = 64 << 20,
    env: dict[str, str] | None = None,
) -> Deferred[CommandResult]:
    """Run ``executable args...``; the Deferred fires with a ``CommandResult``.

    ``executable`` should be an absolute path (resolve it once with
    ``shutil.which``).  A non-zero exit is a result, not an error; a timeout,
    too much output or a cancellation kills the process.
    """
    exe = os.fsencode(executable)
    argv = (exe, *(os.fsencode(a) for a in args))
    proto = _Collector(reactor, argv, timeout, max_output)
    reactor.spawnProcess(proto, exe, list(argv), env=dict(os.environ if env is None else env))
    return proto.finished
