"""The tus requests over treq, on one pool of keep-alive connections.

Every response body is read to the end (so the connection goes back to the
pool), non-success statuses become ``TusError`` subclasses, and network
failures become ``ConnectionFailed``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urljoin

from treq.client import HTTPClient
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from storage.tus_client.errors import (
    ConnectionFailed,
    ProtocolViolation,
    TusError,
    error_for_status,
    parse_problem,
)
from storage.tus_client.headers import (
    TUS_VERSION,
    ServerInfo,
    checksum_header,
    encode_metadata,
    parse_offset,
)
from storage.tus_client.producer import PIECE_SIZE, RangeBodyProducer
from storage.tus_client.sources import ByteSource
from storage.tus_client.transfer import UploadStatus

NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    net_error.ConnectError,
    net_error.ConnectionLost,
    net_error.ConnectionDone,
    net_error.TimeoutError,
    net_error.DNSLookupError,
    _newclient.ResponseFailed,
    _newclient.RequestTransmissionFailed,
    _newclient.ResponseNeverReceived,
    _newclient.RequestNotSent,
    _newclient.RequestGenerationFailed,
    ConnectionError,
)


def _unwrap_network_error(exc: BaseException) -> BaseException:
    """twisted.web wraps the real cause in lists of Failures: find what matters."""
    reasons = getattr(exc, "reasons", None) or []
    for reason in reasons:
        inner = reason.value if isinstance(reason, Failure) else reason
        if isinstance(inner, (TusError, CancelledError)):
            return inner
    return exc


def _single_headers(headers: Headers) -> dict[str, str]:
    return {k.decode("latin-1"): v[-1].decode("latin-1")
            for k, v in headers.getAllRawHeaders()}


class HttpEndpoint:
    """tus over HTTP/1.1 with treq; ``max_connections`` per host stay open."""

    def __init__(self, reactor: Any, *, max_connections: int = 4,
                 extra_headers: Mapping[str, str] | None = None,
                 connect_timeout: float = 30.0, timeout: float = 120.0,
                 piece_size: int = PIECE_SIZE) -> None:
        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_connections
        self.pool.retryAutomatically = False  # retries are ours, with a fresh HEAD
        self.http = HTTPClient(Agent(reactor, pool=self.pool, connectTimeout=connect_timeout))
        self.extra_headers = dict(extra_headers or {})
        self.timeout = timeout  # longest silence: no byte sent, no answer
        self.piece_size = piece_size

    async def close(self) -> None:
        await self.pool.closeCachedConnections()

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"Tus-Resumable": TUS_VERSION, **self.extra_headers}
        headers.update({k.replace("_", "-"): v for k, v in extra.items()})
        return headers

    async def _request(self, method: str, url: str, headers: Mapping[str, str],
                       data: Any = None, watchdog: Watchdog | None = None,
                       ) -> tuple[int, dict[str, str], bytes]:
        watchdog = watchdog or Watchdog(self.reactor, self.timeout)
        pending: Any = self.http.request(
            method, url, headers=Headers({k: [v] for k, v in headers.items()}), data=data,
            allow_redirects=False)
        where = f"{method} {redact(url)}"
        watchdog.watch(pending)
        try:
            response = await pending
            pending = response.content()
            watchdog.watch(pending)
            body = await pending
        except CancelledError:
            if watchdog.fired:
                raise ConnectionFailed(f"{where}: stalled for {self.timeout}s", url=url) from None
            raise
        except NETWORK_ERRORS as exc:
            inner = _unwrap_network_error(exc)
            if isinstance(inner, CancelledError) and watchdog.fired:
                raise ConnectionFailed(f"{where}: stalled for {self.timeout}s", url=url) from exc
            if isinstance(inner, (TusError, CancelledError)):
                raise inner from exc
            raise ConnectionFailed(f"{where}: {_describe(exc)}", url=url) from exc
        finally:
            watchdog.stop()
        return response.code, _single_headers(response.headers), body

    def _raise_for_status(self, status: int, headers: dict[str, str], body: bytes,
                          url: str) -> None:
        if 200 <= status < 300:
            return
        content_type = headers.get("Content-Type")
        raise error_for_status(status, parse_problem(body, content_type), headers, url)

    async def options(self, url: str) -> ServerInfo:
        """What the server advertises; empty when it refuses OPTIONS (4xx).
        A 5xx raises (retryable): guessing "no extensions" would drop checksums."""
        headers = dict(self.extra_headers)
        status, response_headers, body = await self._request("OPTIONS", url, headers)
        if status >= 500:
            self._raise_for_status(status, response_headers, body, url)
        if not 200 <= status < 300:
            return ServerInfo(headers=response_headers)
        return ServerInfo.from_headers(response_headers)

    async def head(self, url: str) -> UploadStatus:
        status, headers, body = await self._request("HEAD", url, self._headers())
        self._raise_for_status(status, headers, body, url)
        lowered = {k.lower(): v for k, v in headers.items()}
        return UploadStatus(
            offset=parse_offset(lowered.get("upload-offset")),
            length=parse_offset(lowered.get("upload-length")),
            concat=lowered.get("upload-concat"),
        )

    async def patch(self, url: str, offset: int, source: ByteSource, start: int, end: int,
                    checksum: tuple[str, bytes] | None,
                    on_bytes: Callable[[int], None]) -> int:
        headers = self._headers(Upload_Offset=str(offset),
                                Content_Type="application/offset+octet-stream")
        if checksum is not None:
            headers["Upload-Checksum"] = checksum_header(*checksum)
        watchdog = Watchdog(self.reactor, self.timeout)

        def sent(count: int) -> None:
            watchdog.reset()  # a big body may take long: only a stall is a failure
            on_bytes(count)

        producer = RangeBodyProducer(source, start, end, sent, self.piece_size)
        status, response_headers, body = await self._request("PATCH", url, headers, producer,
                                                             watchdog)
        self._raise_for_status(status, response_headers, body, url)
        raw = {k.lower(): v for k, v in response_headers.items()}.get("upload-offset")
        new_offset = parse_offset(raw)
        if new_offset is None:
            raise ProtocolViolation(
                f"PATCH answered {status} with Upload-Offset {raw!r}" if raw is not None
                else f"PATCH answered {status} without Upload-Offset",
                status=status, headers=response_headers, url=url)
        return new_offset

    async def create(self, url: str, length: int | None, metadata: Mapping[str, str] | None,
                     concat: str | None = None) -> tuple[str, str]:
        """POST to a creation URL; returns (absolute URL, Location as sent)."""
        headers = self._headers()
        if length is not None:
            headers["Upload-Length"] = str(length)
        if metadata:
            headers["Upload-Metadata"] = encode_metadata(metadata)
        if concat is not None:
            headers["Upload-Concat"] = concat
        status, response_headers, body = await self._request("POST", url, headers)
        self._raise_for_status(status, response_headers, body, url)
        location = {k.lower(): v for k, v in response_headers.items()}.get("location")
        if not location:
            raise ProtocolViolation(f"creation answered {status} without Location",
                                    status=status, headers=response_headers, url=url)
        return urljoin(url, location), location

    async def create_final(self, url: str, partial_locations: Sequence[str],
                           metadata: Mapping[str, str] | None) -> tuple[str, str]:
        return await self.create(url, None, metadata,
                                 concat="final;" + " ".join(partial_locations))

    async def delete(self, url: str) -> None:
        status, headers, body = await self._request("DELETE", url, self._headers())
        self._raise_for_status(status, headers, body, url)


class Watchdog:
    """Cancels the request it watches after ``timeout`` seconds without ``reset()``."""

    def __init__(self, reactor: Any, timeout: float | None) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.fired = False
        self.pending: Any = None
        self.call: Any = None

    def watch(self, pending: Any) -> None:
        self.pending = pending
        if self.timeout and self.call is None:
            self.call = self.reactor.callLater(self.timeout, self._fire)

    def reset(self) -> None:
        if self.call is not None and self.call.active():
            self.call.reset(self.timeout)

    def _fire(self) -> None:
        self.fired = True
        if self.pending is not None:
            self.pending.cancel()

    def stop(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()


def redact(url: str) -> str:
    """The URL without its token (for messages and logs)."""
    return re.sub(r"(token=)[^&]+", r"\1…", url)


def _describe(exc: BaseException) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(str(r.value if isinstance(r, Failure) else r) for r in reasons)
    return str(exc) or type(exc).__name__
