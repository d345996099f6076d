"""A PATCH body streamed from a ``ByteSource`` range in bounded pieces.

It is a push producer registered with the TCP transport (twisted.web's client
does that for bodies of known length): the transport pauses it when its buffer
fills, so at most one piece is being read and about one piece is buffered,
whatever the size of the range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from storage.tus_client.errors import SourceError
from storage.tus_client.sources import ByteSource

PIECE_SIZE = 1 << 20


@implementer(IBodyProducer)
class RangeBodyProducer:
    def __init__(self, source: ByteSource, start: int, end: int,
                 on_bytes: Callable[[int], None] | None = None,
                 piece_size: int = PIECE_SIZE) -> None:
        self.source = source
        self.position = start
        self.end = end
        self.length = end - start
        self.on_bytes = on_bytes
        self.piece_size = piece_size
        self._consumer: Any = None
        self._finished: Deferred[None] | None = None
        self._paused = False
        self._stopped = False
        self._reading = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        self._finished = Deferred(lambda _: self.stopProducing())
        self._next()
        return self._finished

    def _next(self) -> None:
        if self._stopped or self._paused or self._reading or self._finished is None:
            return
        if self.position >= self.end:
            self._stopped = True
            self._finished.callback(None)
            return
        self._reading = True
        want = min(self.piece_size, self.end - self.position)
        self.source.read(self.position, want).addCallbacks(self._got, self._failed)

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if not data:
            self._failed(Failure(SourceError(
                f"the data ended at byte {self.position}, before {self.end}")))
            return
        data = data[: self.end - self.position]
        self.position += len(data)
        self._consumer.write(data)  # may pause us synchronously
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        self._next()

    def _failed(self, failure: Failure) -> None:
        self._reading = False
        if self._stopped or self._finished is None:
            return
        self._stopped = True
        self._finished.errback(failure)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._next()

    def stopProducing(self) -> None:
        # IBodyProducer: after stopProducing the Deferred must never fire
        # (a cancel fires it with CancelledError itself).
        self._stopped = True
