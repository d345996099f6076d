"""The Site both APIs are served by.

* It counts work in flight (requests, and streamed bodies still being made
  durable after their client left) so a graceful stop can wait for them
  (bounded) after the listener closes: ``drain()``, which also ends upload
  bodies still arriving (their bytes are kept; tus clients resume).
* ``max_body`` caps request bodies: a larger one is answered 413 without
  being read (the manager API's JSON bodies).
* ``body_handler`` may take a request's body before twisted.web buffers it
  (tus PATCH bodies are streamed to disk): see ``storage.web.streaming``.
* ``guard_connections`` limits open connections and times request headers
  (``storage.web.connections``).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Site

from storage.web.connections import ConnectionGuard, RefusedConnection
from storage.web.streaming import BodyHandler, StreamingRequest

# Bodies of streamed uploads are read from the socket in chunks this large
# (twisted's default is 64 KiB): fewer, larger reads cost less CPU per byte.
UPLOAD_READ_SIZE = 1 << 20

log = Logger()


PROBLEM_BASE = "https://api.backend.ai/probs/storage/"


class StorageChannel(HTTPChannel):
    """twisted.web's channel, answering what it refuses before a request exists with problem+json.

    A request line or header line over ``MAX_LENGTH`` (16 KiB) was a connection
    closed without an answer (``LineReceiver``'s default); headers over
    ``totalHeadersSize`` or a malformed request line a bare ``400`` without a body.
    """

    def _problem_and_disconnect(self, status: int, reason: bytes, slug: str, title: str, msg: str) -> None:
        body = json.dumps({"type": PROBLEM_BASE + slug, "title": title, "msg": msg,
                           "error_code": "storage-proxy_request_bad-request"}).encode()
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: application/problem+json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        if getattr(self, "_HTTPChannel__first_line", 0) == 1:
            self._problem_and_disconnect(414, b"URI Too Long", "uri-too-long", "URI Too Long",
                                         f"the request line is longer than {self.MAX_LENGTH} bytes")
        else:
            self._problem_and_disconnect(431, b"Request Header Fields Too Large", "headers-too-large",
                                         "Request Header Fields Too Large",
                                         f"a header line is longer than {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802 - twisted's name
        self._problem_and_disconnect(400, b"Bad Request", "bad-request", "Bad Request",
                                     "the request line or headers are malformed or too large")


class StorageSite(Site):
    requestFactory = StreamingRequest
    displayTracebacks = False
    cors: Any = None  # a storage.web.cors.CORSPolicy applied to every answer, or None
    guard: ConnectionGuard | None = None

    def __init__(
        self,
        resource: Any,
        *args: Any,
        max_body: int | None = None,
        body_handler: BodyHandler | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, *args, **kwargs)
        self.max_body = max_body
        self.body_handler = body_handler
        self.in_flight: set[Any] = set()
        # Called with each request once its answer is finished or its client left (worker metrics).
        self.finished_hooks: list[Any] = []
        self._drained: list[Deferred[None]] = []

    def guard_connections(self, guard: ConnectionGuard) -> None:
        """Apply ``guard``'s limits and timeouts to every connection from now on."""
        self.guard = guard
        self.timeOut = guard.limits.idle_timeout

    def buildProtocol(self, addr: Any) -> Any:
        guard = self.guard
        if guard is None:
            return super().buildProtocol(addr)
        refusal = guard.refusal(addr)
        if refusal is not None:
            return RefusedConnection(refusal)
        protocol = super().buildProtocol(addr)
        guard.watch(protocol, addr)
        return protocol

    def protocol(self) -> Any:  # type: ignore[override]  # twisted's factory function, with our channel
        return _GenericHTTPChannelProtocol(StorageChannel())

    def request_started(self, request: Any) -> None:
        if request in self.in_flight:
            return
        self.in_flight.add(request)
        request.notifyFinish().addBoth(lambda _: self._finished(request))

    def _finished(self, request: Any) -> None:
        for hook in self.finished_hooks:
            try:
                hook(request)
            except Exception:
                log.failure("request hook {hook!r} failed", hook=hook)
        self._done(request)

    def track(self, work: Deferred[Any]) -> None:
        """Count ``work`` (e.g. making an interrupted upload durable) as in flight."""
        token = object()
        self.in_flight.add(token)

        def finished(result: Any) -> Any:
            self._done(token)
            return result

        work.addBoth(finished)

    def _done(self, item: Any) -> None:
        self.in_flight.discard(item)
        if not self.in_flight:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Fires when nothing is in flight (the caller bounds the wait).

        Streamed upload bodies still arriving are ended at once: what came is
        made durable and the client resumes from it later, so a stop does
        not wait out the grace period for a slow or stalled upload.
        """
        for item in list(self.in_flight):
            stop_body = getattr(item, "stop_body", None)
            if stop_body is not None:
                stop_body()
        if not self.in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d
