"""Request bodies that are not buffered: streamed to a sink, capped, or refused early.

twisted.web reads a whole body (into memory or a temp file) before any
resource sees the request.  ``StreamingRequest`` hooks in where the headers
are in and no body byte has been read (``gotLength``) and lets the site:

* cap the body (``max_body``): a declared or received size over the cap is
  answered with 413 at once, without reading the rest;
* hand the body to a ``BodySink`` of its choosing (``body_handler``), such as
  an ``UploadSink`` that writes it to a file as it arrives, with backpressure;
* refuse it early: discard a small body and answer when it ends, or answer at
  once and half-close when the rest is large.

Twisted has no public hook for this (twisted/twisted#4688, #10190, #5511);
the private attributes relied on are read in ``request_line`` and
``pause_reading``, pinned by tests/web/test_twisted_internals.py.
"""

from __future__ import annotations

import json
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request

from storage.errors import RequestTooLarge, StorageError

log = Logger()

# An early refusal discards up to this much body to answer cleanly at its end;
# past it the answer goes out at once and the connection is half-closed.
DISCARD_LIMIT = 16 << 20
# How long a half-closed connection may keep sending before it is aborted.
ABORT_AFTER = 10.0
# A streamed upload body wakes the reactor only once this much of it waits in
# the socket (SO_RCVLOWAT), or the rest of the body does.  A slow client's
# small TCP segments then cost one read, one pool write and one GIL hand-over
# per 64 KiB instead of one per segment; the bytes wait in the kernel's
# socket buffer, not in the daemon's memory.  (The kernel still wakes the
# reader early when the buffer or the TCP window runs short.)
READ_LOWAT = 64 << 10


def keep_body_buffers_in_the_heap() -> bool:
    """Stop glibc from mapping and unmapping every socket-read buffer.

    A streamed body arrives as ~1 MiB ``bytes`` objects that are freed in a
    pool thread once written.  With glibc's defaults such blocks come from
    fresh ``mmap``s or a heap top that is trimmed and regrown, so every read
    page-faults and the kernel zeroes its pages again: ~30% more CPU per
    byte.  Fixed thresholds keep them in the heap, reused (allocations under
    16 MiB; up to 16 MiB of free heap top kept).  No-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 16 << 20) and libc.mallopt(m_trim_threshold, 16 << 20))
    except (OSError, AttributeError):
        return False


def request_line(channel: Any) -> tuple[bytes, bytes]:
    """The method and URI of the request whose headers ``channel`` just parsed.

    Before ``requestReceived`` they live only on the channel, as the private
    ``_command`` and ``_path`` (Twisted 16.3 to 26.10 at least).
    """
    return channel._command, channel._path


def body_decoder(channel: Any) -> Any:
    """The channel's decoder of the body being received (private ``_transferDecoder``)."""
    return getattr(channel, "_transferDecoder", None)


def plain_socket(channel: Any) -> Any:
    """The socket under a plain-TCP channel, or None (TLS, tests' fake transports)."""
    from twisted.internet.interfaces import ISSLTransport

    transport = channel.transport
    if transport is None or ISSLTransport.providedBy(transport) or getattr(transport, "disconnecting", True):
        return None
    sock = getattr(transport, "socket", None)
    return sock if sock is not None and hasattr(sock, "recv_into") else None


def consumed_elsewhere(channel: Any, n: int) -> bool:
    """Tell the body decoder that ``n`` body bytes were read from the socket
    behind its back; True when that was the rest of the body (then the
    request is complete, as if the bytes had come through dataReceived)."""
    decoder = body_decoder(channel)
    decoder.contentLength -= n
    if decoder.contentLength == 0:
        decoder.dataReceived(b"")  # runs the finish callback: allContentReceived
        return True
    return False


def send_now(channel: Any) -> None:
    """Write a finished response to the socket now rather than on the
    reactor's next iteration (when that iteration is busy starting many
    uploads, small answers would wait tens of ms).  Plain TCP, an open
    keep-alive connection, no paused or pull producer; anything not sent
    goes out as usual."""
    from twisted.internet.tcp import Connection

    transport = getattr(channel, "transport", None)
    if (
        not isinstance(transport, Connection) or not transport.connected or transport.disconnecting
        or transport._writeDisconnecting or not (transport.dataBuffer or transport._tempDataLen)
    ):
        return
    if transport.producer is not None and (not transport.streamingProducer or transport.producerPaused):
        return  # doWrite would resume a producer (a download): leave it to the reactor
    result = transport.doWrite()
    if result is not None:
        # The peer is gone: let the reactor notice on its own (the socket is
        # still registered for writing, so the next iteration reports it).
        transport.startWriting()


# Bound on the reads ``read_what_is_queued`` makes (each up to the transport's bufferSize).
QUEUED_READS_MAX = 256


def _socket_queue(sock: Any) -> int:
    """Bytes waiting unread in a socket's receive queue (FIONREAD)."""
    import fcntl
    import sys
    import termios

    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(raw, sys.byteorder, signed=True)


def read_what_is_queued(channel: Any) -> None:
    """Deliver to the channel now what its socket already holds, unread (the
    socket may be paused): the reads the reactor would make, through the
    same transport (and TLS layer), as many as the queue needs, bounded.
    Nothing is waited for."""
    from twisted.internet.tcp import Connection

    tcp = getattr(channel, "transport", None)
    for _ in range(3):  # under TLS the TCP connection is the TLS protocol's transport
        if isinstance(tcp, Connection):
            break
        tcp = getattr(tcp, "transport", None)
    if not isinstance(tcp, Connection):
        return
    for _ in range(QUEUED_READS_MAX):
        if not tcp.connected or tcp.disconnecting or _socket_queue(tcp.socket) <= 0:
            return
        if tcp.doRead() is not None:
            return  # end of stream or an error: the reactor sees it as usual


def pause_reading(channel: Any) -> None:
    channel.transport.pauseProducing()


def resume_reading(channel: Any) -> None:
    transport = channel.transport
    if transport is not None:
        transport.resumeProducing()
    channel.resetTimeout()


class BodySink(Protocol):
    """What twisted.web calls on ``request.content``, plus the end-of-body events."""

    def write(self, data: bytes) -> None: ...
    def body_received(self) -> None: ...  # the last byte is in
    def connection_lost(self) -> None: ...  # the client left before the end
    def tell(self) -> int: ...
    def seek(self, offset: int, whence: int = 0) -> int: ...
    def read(self, size: int = -1) -> bytes: ...
    def close(self) -> None: ...


class _NotAFile:
    """What twisted.web calls on ``request.content`` besides ``write``; a
    streamed body is never read back, so these do nothing."""

    def tell(self) -> int:
        return 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class DiscardSink(_NotAFile):
    """Counts and drops a body that will not be used."""

    def __init__(self) -> None:
        self.received = 0

    def write(self, data: bytes) -> None:
        self.received += len(data)

    def body_received(self) -> None:
        pass

    def connection_lost(self) -> None:
        pass



def problem_response(error: StorageError, extra_headers: dict[bytes, bytes] | None = None) -> bytes:
    """A complete HTTP/1.1 response for ``error``, for writing to the transport directly."""
    body = json.dumps(error.body(client=True)).encode()
    reason = http.RESPONSES.get(error.status, b"Error")
    lines = [
        b"HTTP/1.1 %d %s" % (error.status, reason),
        b"Content-Type: application/problem+json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    for name, value in (extra_headers or {}).items():
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


BodyHandler = Callable[["StreamingRequest", "int | None"], "BodySink | None"]


class StreamingRequest(Request):
    """A Request whose body may go to a sink chosen once the headers are in."""

    content: Any = None
    channel: Any
    early_error: StorageError | None = None
    early_headers: dict[bytes, bytes] | None = None
    # Whatever a body handler keeps with the request (tus: the PATCH in progress).
    body_context: Any = None
    _answered_early = False
    _body_done = False
    _abort_call: Any = None
    _lowat = 1  # the socket's SO_RCVLOWAT as this request last set it
    declared_length: int | None = None
    received_bytes = 0

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # The request's headers are due within the listener's header timeout
        # from its first line (storage.web.connections).
        timer = getattr(channel, "storage_header_timer", None)
        if timer is not None:
            timer.start()

    def gotLength(self, length: int | None) -> None:
        timer = getattr(self.channel, "storage_header_timer", None)
        if timer is not None:
            timer.cancel()
        self.method, self.uri = request_line(self.channel)
        self.path = self.uri.split(b"?", 1)[0]
        self.received_bytes = 0
        self.declared_length = length
        site = self.channel.site
        self.body_limit = getattr(site, "max_body", None)
        site_started = getattr(site, "request_started", None)
        handler: BodyHandler | None = getattr(site, "body_handler", None)
        sink = handler(self, length) if handler is not None else None
        if self.early_error is not None:
            return  # the handler refused the body
        if sink is None:
            if self.body_limit is not None and length is not None and length > self.body_limit:
                super().gotLength(0)
                self.refuse(RequestTooLarge(f"the body is larger than {self.body_limit} bytes"), now=True)
                return
            super().gotLength(length)
            return
        self.body_limit = None  # a streamed body: its sink applies its own limits
        self.content = sink
        if site_started is not None:
            # A streamed body is work in flight from its first byte.
            site_started(self)
        self.tune_lowat()

    def tune_lowat(self) -> None:
        """Set the socket's SO_RCVLOWAT for what is left of a streamed body:
        ``READ_LOWAT`` or the rest of the body if less, and 1 (the default)
        once the body is in or no longer streamed to a sink that wants it, so
        the next request on the connection (or the rest of a refused body)
        is read at once."""
        want = 1
        sink = self.content
        if (
            self.early_error is None and not self._body_done and self.declared_length is not None
            and getattr(sink, "batches_reads", False)
        ):
            want = max(1, min(READ_LOWAT, self.declared_length - self.received_bytes))
        if want == self._lowat or self.channel is None:
            return
        sock = plain_socket(self.channel)
        if sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
        except OSError:
            return
        self._lowat = want

    def refuse(self, error: StorageError, headers: dict[bytes, bytes] | None = None, *, now: bool = False) -> None:
        """Refuse the body: discard it and answer ``error`` at its end, or now if it is large."""
        if self.early_error is not None:
            return
        self.early_error = error
        self.early_headers = headers
        old = self.content
        self.content = DiscardSink()
        self.content.received = getattr(old, "received", 0)
        self.tune_lowat()
        remaining = None if self.declared_length is None else self.declared_length - self.received_bytes
        if now or remaining is None or remaining > DISCARD_LIMIT:
            self.answer_now()

    def answer_now(self) -> None:
        """Send the early error at once, stop the 100-continue, half-close, drain a while."""
        if self._answered_early or self.channel is None or self.early_error is None:
            return
        self._answered_early = True
        self.requestHeaders.removeHeader(b"Expect")
        channel = self.channel
        transport = channel.transport
        headers = self.early_headers
        policy = getattr(getattr(channel, "site", None), "cors", None)
        if policy is not None:
            headers = policy.early_headers(self, headers)
        transport.write(problem_response(self.early_error, headers))
        channel.persistent = False
        resume_reading(channel)
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        else:
            transport.loseConnection()
        reactor = getattr(channel, "callLater", None)
        if reactor is not None and hasattr(transport, "abortConnection"):
            self._abort_call = channel.callLater(ABORT_AFTER, transport.abortConnection)

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.channel is not None:
            # The headers go out with this first write: CORS for every answer (storage.web.cors).
            policy = getattr(getattr(self.channel, "site", None), "cors", None)
            if policy is not None:
                policy.apply(self)
        super().write(data)

    def handleContentChunk(self, data: bytes) -> None:
        self.received_bytes += len(data)
        if self.body_limit is not None and self.received_bytes > self.body_limit:
            self.refuse(RequestTooLarge(f"the body is larger than {self.body_limit} bytes"), now=True)
        self.content.write(data)
        if self._lowat != 1 or self.declared_length is not None:
            self.tune_lowat()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._body_done = True
        self.tune_lowat()
        if self._answered_early:
            # The answer is out; the rest was only drained.
            self.channel.loseConnection()
            return
        sink = self.content
        if hasattr(sink, "body_received"):
            sink.body_received()
        super().requestReceived(command, path, version)

    def process(self) -> None:
        site = self.channel.site if self.channel is not None else None
        started = getattr(site, "request_started", None)
        if started is not None:
            started(self)
        if self.early_error is not None:
            self._answer_early_error()
            return
        super().process()

    def _answer_early_error(self) -> None:
        error = self.early_error
        assert error is not None
        self.setResponseCode(error.status)
        for name, value in (self.early_headers or {}).items():
            self.setHeader(name, value)
        self.setHeader(b"Content-Type", b"application/problem+json")
        self.write(json.dumps(error.body(client=True)).encode())
        self.finish()

    def finish(self) -> None:
        channel = self.channel  # finish() detaches the request from it
        super().finish()
        send_now(channel)

    def stop_body(self) -> None:
        """The daemon is stopping: end a streamed body now, keeping what came."""
        sink = self.content
        if not self._body_done and hasattr(sink, "stop"):
            sink.stop()

    def connectionLost(self, reason: Failure) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        sink = self.content
        if not self._body_done and sink is not None and hasattr(sink, "connection_lost"):
            sink.connection_lost()
        super().connectionLost(reason)


# A body with at least this much left is read by a thread (see UploadSink._hand_off).
DIRECT_MIN = 256 << 10

DirectReceive = Callable[[Any, int], "Deferred[Any] | None"]


class UploadTarget(Protocol):
    """Where an ``UploadSink`` puts bytes; every method runs its work off the reactor."""

    def write(self, buffers: list[bytes]) -> Deferred[int]: ...


# What all streamed bodies together may hold in memory waiting for the writer
# (each gets an equal share, at most its ``high_water``).
BODY_BUFFER_BUDGET = 64 << 20


class UploadSink(_NotAFile):
    """Streams a body into an ``UploadTarget``: ordered writes, bounded memory.

    Until ``ready`` fires with the target, chunks queue with the socket
    paused.  Then at most one write (of up to ``max_batch`` bytes) is in
    flight; chunks arriving meanwhile are batched into the next one (one pool
    hop and one ``pwritev`` for many socket reads).  Above ``high_water``
    bytes waiting for the writer the socket is paused; at ``low_water`` or
    below it resumes and the idle timeout restarts, so reading the socket
    and writing the disk overlap.  Memory held: at most ``max_batch`` +
    ``high_water`` + one socket read.

    ``done`` fires with the bytes written once the body has ended (or the
    client left) and every write has finished; or, as soon as no write is in
    flight, fails with the first error (``ready`` failing, a write failing,
    or the body passing ``limit``).  After an error the rest of the body is
    counted and dropped; nothing past ``limit`` is ever written.
    """

    streaming = 0  # sinks whose ``done`` has not fired yet, in this process

    def __init__(
        self,
        channel: Any,
        ready: Deferred[Any],
        *,
        limit: int | None = None,
        too_long: Callable[[], StorageError] | None = None,
        high_water: int = 4 << 20,
        low_water: int = 1 << 20,
        max_batch: int = 4 << 20,
        expected: int | None = None,
        direct: DirectReceive | None = None,
        request: Any = None,
    ) -> None:
        self.channel = channel
        self.expected = expected  # the declared body length, if any
        self.direct = direct
        self.request = request
        self.direct_runs = 0
        self.direct_active = False
        self.stop_requested = False
        self.stop_signal: Any = None  # set while a thread receives: has .set()
        self.handoff_pending = False
        self.limit = limit
        self.too_long = too_long
        self.high_water = high_water
        self.low_water = low_water
        self.max_batch = max_batch
        self.target: UploadTarget | None = None
        self.queue: deque[bytes] = deque()
        self.queued = 0  # bytes waiting in ``queue``
        self.writing = 0  # bytes in the write in flight
        self.received = 0
        self.written = 0
        self.paused = False
        self.pauses = 0
        self.error: Failure | None = None
        self.ended = False  # body complete or connection lost
        self.complete = False  # body complete
        self.done: Deferred[int] = Deferred()
        self._fired = False
        UploadSink.streaming += 1
        self._pause()
        ready.addCallbacks(self._ready, self._fail)

    def high_mark(self) -> int:
        """``high_water``, or this body's share of ``BODY_BUFFER_BUDGET`` when
        many bodies stream at once: with a thousand slow uploads each keeps at
        most one read waiting for the writer and the rest stays in the
        kernel's socket buffer (then the client's TCP window closes)."""
        share = BODY_BUFFER_BUDGET // max(1, UploadSink.streaming)
        return min(self.high_water, share)

    def low_mark(self) -> int:
        return min(self.low_water, self.high_mark() // 4)

    @property
    def batches_reads(self) -> bool:
        """Whether the reactor should read this body in ``READ_LOWAT`` pieces."""
        return self.error is None and not self.direct_active and not self.ended

    # -- the file-like face twisted.web sees -------------------------------------

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.received += len(data)
        if self.error is not None:
            return
        if self.limit is not None and self.received > self.limit:
            error = self.too_long() if self.too_long else RequestTooLarge("the body is too long")
            self._fail(Failure(error))
            return
        self.queue.append(data)
        self.queued += len(data)
        self._pump()
        if self.queued > self.high_mark():
            self._pause()


    # -- end-of-body events (from StreamingRequest) -------------------------

    def body_received(self) -> None:
        self.complete = True
        self.ended = True
        self._maybe_done()

    def connection_lost(self) -> None:
        self.ended = True
        self._maybe_done()

    def stop(self) -> None:
        """End the body now (the daemon is stopping, or a newer request for
        the upload came): keep what came, what the socket already holds
        included, drop the connection; a receiving thread is told through
        ``stop_signal`` (and does the same)."""
        if self.ended:
            return
        self.stop_requested = True
        if self.direct_active:
            if self.stop_signal is not None:
                self.stop_signal.set()
            return
        if self.channel is not None:
            read_what_is_queued(self.channel)  # received (acknowledged): it counts
            if self.ended:
                return  # that was the rest of the body
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        self.connection_lost()

    # -- internals ----------------------------------------------------------

    def _pause(self) -> None:
        # Idempotent: twisted.web itself may resume the transport behind our back.
        if self.channel is not None and self.channel.transport is not None:
            pause_reading(self.channel)
            if not self.paused:
                self.pauses += 1
            self.paused = True

    def _resume(self) -> None:
        if not self.paused or self.handoff_pending:
            return
        self.paused = False
        if self.channel is not None and self.channel.transport is not None:
            resume_reading(self.channel)

    def _ready(self, target: UploadTarget) -> None:
        if self.error is not None:
            return
        self.target = target
        self.handoff_pending = self._wants_direct()
        self._pump()
        if self._hand_off():
            return
        if self.queued <= self.low_mark():
            self._resume()
        self._maybe_done()

    def _pump(self) -> None:
        if self.target is None or self.writing or not self.queue or self.error is not None:
            return
        batch: list[bytes] = []
        size = 0
        while self.queue and size < self.max_batch:
            chunk = self.queue.popleft()
            batch.append(chunk)
            size += len(chunk)
        self.queued -= size
        self.writing = size
        self.target.write(batch).addCallbacks(self._wrote, self._write_failed)

    def _wrote(self, n: int) -> None:
        self.written += n
        self.writing = 0
        self._pump()
        if self._hand_off():
            return
        if self.queued <= self.low_mark():
            self._resume()
        self._maybe_done()

    # -- direct mode: a thread reads the rest of the body off the socket ----------

    def _wants_direct(self) -> bool:
        return (
            self.direct is not None and self.expected is not None and self.error is None
            and not self.ended and self.channel is not None
            and self.expected - self.received >= DIRECT_MIN and plain_socket(self.channel) is not None
        )

    def _hand_off(self) -> bool:
        """Let ``direct`` move the rest of a large body straight from the socket
        to the file, off the reactor (plain TCP, known length).  The socket
        stays paused until what the reactor already read is written.  True
        while that is pending or the thread runs."""
        if not self.handoff_pending:
            return False
        if self.writing or self.queue:
            return True  # drain first; reading stays paused
        self.handoff_pending = False
        if self.error is not None or self.ended or self.channel is None or self.expected is None:
            return False
        remaining = self.expected - self.received
        decoder = body_decoder(self.channel)
        sock = plain_socket(self.channel)
        if remaining <= 0 or getattr(decoder, "contentLength", None) != remaining or sock is None:
            return False
        started = self.direct(sock, remaining) if self.direct is not None else None
        if started is None:
            return False  # no thread free: stay on the reactor
        self.writing = remaining
        self.direct_runs += 1
        self.direct_active = True
        saved_timeout = self.channel.setTimeout(None)
        started.addBoth(self._direct_done, remaining, saved_timeout)
        return True

    def _direct_done(self, result: Any, remaining: int, saved_timeout: Any) -> None:
        channel = self.channel
        self.writing = 0
        self.direct_active = False
        if self.request is not None and getattr(self.request, "_lowat", None) is not None:
            self.request._lowat = 1  # the thread left the socket's SO_RCVLOWAT at 1
        error: Failure | None
        if isinstance(result, Failure):
            consumed, written, error, eof, stopped = 0, 0, result, False, None
        else:
            consumed, written, eof, stopped = result.consumed, result.written, result.eof, result.stopped
            error = Failure(result.error) if result.error is not None else None
        self.received += consumed
        self.written += written
        if self.request is not None:
            self.request.received_bytes = getattr(self.request, "received_bytes", 0) + consumed
            tune = getattr(self.request, "tune_lowat", None)
            if tune is not None:
                tune()
        if channel is None or channel.transport is None:
            self._maybe_done()
            return
        channel.setTimeout(saved_timeout)
        if error is not None:
            if consumed:
                consumed_elsewhere(channel, consumed)
            self._fail(error)
            return
        if consumed == remaining:
            self._resume()
            consumed_elsewhere(channel, consumed)  # -> requestReceived -> body_received
            self._maybe_done()
            return
        if consumed:
            consumed_elsewhere(channel, consumed)
        if eof or stopped:
            # The client left or went idle (or we are stopping): end the connection.
            channel.transport.loseConnection()
            self.connection_lost()
            return
        self._resume()
        self._maybe_done()

    def _write_failed(self, failure: Failure) -> None:
        self.writing = 0
        self._fail(failure)

    def _fail(self, failure: Failure) -> None:
        if self.error is None:
            self.error = failure
            self.handoff_pending = False
            self.queue.clear()
            self.queued = 0
            # Read (and drop) the rest: the request answers when it decides to.
            tune = getattr(self.request, "tune_lowat", None)
            if tune is not None:
                tune()
            self._resume()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._fired or self.writing:
            return
        if self.error is None and not (self.ended and self.target is not None and not self.queue):
            return
        self._fired = True
        UploadSink.streaming -= 1
        if self.error is not None:
            self.done.errback(self.error)
        else:
            self.done.callback(self.written)
