"""Response bodies that never block the reactor and never grow memory.

* ``SendfileProducer``: a file range goes from the page cache to a plain TCP
  socket with ``sendfile(2)`` (``storage.fastio``), called in the pool.
* ``ChunkProducer``: anything else (TLS, in-memory test transports, zip
  archives) is pulled one blocking chunk at a time in the pool and written
  through twisted.web, pausing when the transport says so.

How ``SendfileProducer`` shares the socket with Twisted: twisted.web writes
the status line and headers into the transport's buffer; the producer must
not write to the fd before they are on the wire.  The transport tells its
producer (the ``HTTPChannel``, which forwards to ours) that its buffer has
drained only while the producer is "paused", so the producer sets
``transport.producerPaused`` and ``startWriting()``: when the socket is
writable and the buffer empty, ``doWrite`` calls ``resumeProducing`` and the
producer moves to the pool, where it calls sendfile on its own ``dup`` of
the socket until the range is sent or the socket is full (EAGAIN).  On
EAGAIN the pool thread first polls the socket for up to ``SPIN_WAIT_MS`` (a
fast reader drains it within that, and the hop through the reactor costs
more than the wait); if it is still full, the same arming hands the wait to
the reactor, so a slow client holds no thread.  The socket is corked
(``TCP_CORK``, nginx's ``tcp_nopush``) while the body streams.  The ``dup`` keeps the fd number
valid even if Twisted closes the connection while a pool thread uses it.
This relies on ``twisted.internet.abstract.FileDescriptor``'s documented
``producerPaused`` / ``startWriting`` behaviour; ``sendfile_socket`` checks
the transport is that kind and answers None (use ``ChunkProducer``) otherwise.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import abstract, tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from storage import fastio

log = Logger()

# Responses and bytes per path, for tests and the benchmark to see which ran.
stats: Counter[str] = Counter()

DISCONNECT_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED}


class SourceShrank(Exception):
    """The file ended before the bytes Content-Length promised."""


def is_disconnect(failure: Failure) -> bool:
    exc = failure.value
    return isinstance(exc, OSError) and exc.errno in DISCONNECT_ERRNOS


def sendfile_socket(request: Any) -> int | None:
    """The socket fd of ``request``'s connection if sendfile can write to it
    directly: plain TCP under the reactor's own FileDescriptor buffering."""
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    if not isinstance(transport, tcp.Connection) or not isinstance(transport, abstract.FileDescriptor):
        return None
    if ISSLTransport.providedBy(transport) or getattr(transport, "TLS", False):
        return None
    if transport.producer is not channel or not transport.streamingProducer:
        return None  # not the HTTPChannel-over-TCP layout the flush signal relies on
    try:
        return transport.getHandle().fileno()
    except (AttributeError, OSError):
        return None


# Like nginx's tcp_nopush: full segments while the body streams, the tail pushed at the end.
CORK = True
# How long a pool thread waits for a full socket to drain before handing the
# wait to the reactor (milliseconds).
SPIN_WAIT_MS = 5
# A client that takes no bytes for this long (seconds) has its download aborted.
IDLE_TIMEOUT = 120.0


def _set_cork(sock: socket.socket, value: int) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, value)
    except OSError:
        pass  # the peer is gone: nothing left to push


def _unregister(request: Any) -> None:
    # After the connection is lost twisted.web has dropped request.channel.
    if getattr(request, "channel", None) is not None:
        request.unregisterProducer()
    else:
        request.producer = None


def _abort(request: Any) -> None:
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if transport is not None:
        transport.abortConnection()


class IdleTimer:
    """Aborts the connection if a download makes no progress for ``IDLE_TIMEOUT``
    (twisted.web turns its own idle timeout off while a response is produced)."""

    def __init__(self, reactor: Any, request: Any) -> None:
        self.reactor = reactor
        self.request = request
        self.call: Any = None

    def start(self) -> None:
        if self.reactor is not None and self.call is None:
            self.call = self.reactor.callLater(IDLE_TIMEOUT, self._expired)

    def stop(self) -> None:
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None

    def _expired(self) -> None:
        self.call = None
        stats["idle_aborts"] += 1
        log.info("download: the client took nothing for {timeout}s; closing the connection", timeout=IDLE_TIMEOUT)
        _abort(self.request)


@implementer(IPushProducer)
class SendfileProducer:
    """Sends ``count`` bytes of ``file_fd`` from ``offset`` with sendfile.

    Owns ``file_fd`` (closes it).  ``start()`` writes the headers and returns
    a Deferred that fires with the bytes sent once the body is out, or when
    the client went away or the transfer had to be aborted (already logged):
    the caller then just lets the request finish.
    """

    def __init__(self, request: Any, file_fd: int, offset: int, count: int, pool: Any, reactor: Any = None) -> None:
        self.request = request
        self._idle = IdleTimer(reactor, request)
        self.file_fd = file_fd
        self.offset = offset
        self.remaining = count
        self.sent = 0
        self.pool = pool
        self.transport = request.channel.transport
        self.sock = -1
        self.sock_obj: socket.socket | None = None
        self._corked = False
        self._poller: Any = None
        self._in_pool = False
        self._stopped = False
        self._closed = False
        self._done: Deferred[int] = Deferred(self._cancel)

    def start(self) -> Deferred[int]:
        fd = sendfile_socket(self.request)
        if fd is None:
            raise RuntimeError("SendfileProducer needs a plain TCP connection")
        # Our own descriptor of the socket: valid even if Twisted closes its one.
        self.sock_obj = socket.socket(fileno=os.dup(fd))
        self.sock = self.sock_obj.fileno()
        stats["sendfile_responses"] += 1
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.request.write(b"")  # the status line and headers, into the transport's buffer
        self._wait_writable()
        return self._done

    def _wait_writable(self) -> None:
        # The transport calls its producer's resumeProducing once its buffer
        # is empty and the socket writable, if it believes the producer paused.
        if self._stopped or self.transport.disconnected:
            self._close()
            return
        stats["sendfile_waits"] += 1
        self._idle.start()
        self.transport.producerPaused = True
        self.transport.startWriting()

    # IPushProducer, called on the reactor by the HTTPChannel

    def resumeProducing(self) -> None:
        if self._in_pool or self._closed or self._stopped:
            return
        self._idle.stop()
        self._in_pool = True
        self.pool.run(self._send_blocking).addBoth(self._after_send)

    def pauseProducing(self) -> None:
        # Nothing to pause: we do not write through the transport, and we only
        # send again when the transport tells us the socket is writable.
        pass

    def stopProducing(self) -> None:
        self._stopped = True
        if not self._in_pool:
            self._close()

    def _cancel(self, _: Deferred[int]) -> None:
        self.stopProducing()

    # in the pool

    def _send_blocking(self) -> bool:
        """Send until done (True) or the socket is full (False)."""
        if CORK and not self._corked and self.sock_obj is not None:
            self._corked = True
            _set_cork(self.sock_obj, 1)
        while self.remaining > 0 and not self._stopped:
            try:
                n = fastio.sendfile(self.sock, self.file_fd, self.offset, self.remaining)
            except BlockingIOError:
                # A fast reader frees room within moments: wait briefly here
                # rather than bouncing through the reactor; a slow one gets
                # the reactor's wait and does not hold this thread.
                if self._poller is None:
                    self._poller = select.poll()
                    self._poller.register(self.sock, select.POLLOUT)
                if self._poller.poll(SPIN_WAIT_MS):
                    continue
                return False
            if n == 0:
                raise SourceShrank(f"the file ended {self.remaining} bytes early")
            self.offset += n
            self.remaining -= n
            self.sent += n
        return True

    # back on the reactor

    def _after_send(self, result: bool | Failure) -> None:
        self._in_pool = False
        if isinstance(result, Failure):
            if not (self._stopped or is_disconnect(result)):
                log.failure("download: sendfile failed after {sent} bytes; aborting the response",
                            result, sent=self.sent)
                _abort(self.request)
            self._close()
        elif self._stopped or result:
            self._close()
        else:
            self._wait_writable()

    def _close(self) -> None:
        if self._closed or self._in_pool:
            return
        self._closed = True
        self._idle.stop()
        stats["sendfile_bytes"] += self.sent
        self.request.sentLength = getattr(self.request, "sentLength", 0) + self.sent  # for the access log
        if self.sock_obj is not None:
            if self._corked:
                _set_cork(self.sock_obj, 0)  # push out the last partial segment now
            self.sock_obj.close()
            self.sock_obj = None
        if self.file_fd >= 0:
            os.close(self.file_fd)
        self.sock = self.file_fd = -1
        _unregister(self.request)
        if not self._done.called:
            self._done.callback(self.sent)


@implementer(IPushProducer)
class ChunkProducer:
    """Writes what ``next_chunk()`` returns until it returns ``b""``.

    ``next_chunk`` blocks (reads a file, builds zip records): it runs in the
    pool, one call in flight, and only while the transport wants more.
    ``close`` (optional) runs on the reactor at the end, whatever happened.
    ``start()`` returns a Deferred firing with the bytes written (as
    ``SendfileProducer.start``).
    """

    def __init__(
        self, request: Any, next_chunk: Callable[[], bytes], pool: Any,
        close: Callable[[], None] | None = None, kind: str = "push", reactor: Any = None,
    ) -> None:
        self.request = request
        self._idle = IdleTimer(reactor, request)
        self.next_chunk = next_chunk
        self.pool = pool
        self.close_source = close
        self.kind = kind
        self.sent = 0
        self._paused = False
        self._in_pool = False
        self._stopped = False
        self._closed = False
        self._done: Deferred[int] = Deferred(lambda _: self.stopProducing())

    def start(self) -> Deferred[int]:
        stats[f"{self.kind}_responses"] += 1
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._schedule()
        return self._done

    def _schedule(self) -> None:
        if self._paused or self._in_pool or self._stopped or self._closed:
            return
        self._in_pool = True
        self.pool.run(self.next_chunk).addBoth(self._got)

    def _got(self, result: bytes | Failure) -> None:
        self._in_pool = False
        if self._stopped:
            self._close()
        elif isinstance(result, Failure):
            if not result.check(CancelledError):
                log.failure("download: reading the body failed after {sent} bytes; aborting the response",
                            result, sent=self.sent)
            _abort(self.request)
            self._close()
        elif not result:
            self._close()
        else:
            self.sent += len(result)
            self.request.write(result)  # may call pauseProducing at once
            self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True
        self._idle.start()

    def resumeProducing(self) -> None:
        self._paused = False
        self._idle.stop()
        self._schedule()

    def stopProducing(self) -> None:
        self._stopped = True
        if not self._in_pool:
            self._close()

    def _close(self) -> None:
        if self._closed or self._in_pool:
            return
        self._closed = True
        self._idle.stop()
        stats[f"{self.kind}_bytes"] += self.sent
        if self.close_source is not None:
            try:
                self.close_source()
            except Exception:
                log.failure("download: closing the body source failed")
        _unregister(self.request)
        if not self._done.called:
            self._done.callback(self.sent)


class FileRangeReader:
    """``next_chunk`` for ``ChunkProducer``: ``count`` bytes of a file, by pread."""

    def __init__(self, fd: int, offset: int, count: int, chunk_size: int = 1 << 18) -> None:
        self.fd = fd
        self.offset = offset
        self.remaining = count
        self.chunk_size = chunk_size

    def __call__(self) -> bytes:
        if self.remaining <= 0:
            return b""
        data = os.pread(self.fd, min(self.chunk_size, self.remaining), self.offset)
        if not data:
            raise SourceShrank(f"the file ended {self.remaining} bytes early")
        self.offset += len(data)
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
