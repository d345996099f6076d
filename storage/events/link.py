"""The connection to the manager's Redis (database 4), through txredisapi.

``RedisLink.open()`` returns at once: txredisapi connects in the background
and reconnects with exponential backoff (``initial_delay`` up to
``max_delay``) whenever the connection drops, so neither start-up nor a
request ever waits for Redis.  ``execute(*command)`` fails at once with
``LinkDown`` while no connection is up (the caller keeps the event and tries
again later) and with txredisapi's ``TimeoutError`` when Redis does not
answer within ``request_timeout`` (txredisapi then drops the connection and
reconnects).
"""

from __future__ import annotations

import time
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail

from storage.events.encoding import STREAM_DB
from storage.events.settings import RedisSettings


class LinkDown(Exception):
    """No connection to Redis right now."""


class RedisLink:
    initial_delay = 0.5
    max_delay = 2.0

    def __init__(self, settings: RedisSettings | None) -> None:
        self.settings = settings  # None until read from etcd (open() waits for it)
        self._handler: Any = None
        self._sentinel: Any = None
        self.last_error: str | None = "not connected yet"
        self.last_ok_at: float | None = None

    def open(self) -> None:
        s = self.settings
        assert s is not None
        if s.sentinel:
            self._sentinel = txredisapi.Sentinel(
                list(s.sentinel), password=s.sentinel_password or s.password,
            )
            self._handler = self._sentinel.master_for(
                s.service_name, dbid=STREAM_DB, password=s.password, replyTimeout=s.request_timeout,
                convertNumbers=False,
            )
        else:
            self._handler = txredisapi.lazyConnection(
                s.host, s.port, dbid=STREAM_DB, reconnect=True, password=s.password,
                ssl_context_factory=self._tls(), connectTimeout=min(5.0, s.request_timeout),
                replyTimeout=s.request_timeout, convertNumbers=False,
            )
        factory = self._handler._factory
        factory.initialDelay = self.initial_delay
        factory.maxDelay = self.max_delay

    def _tls(self) -> Any:
        assert self.settings is not None
        if not self.settings.use_tls:
            return False
        from twisted.internet import ssl

        if self.settings.tls_skip_verify:
            return ssl.CertificateOptions(verify=False)
        assert self.settings.host is not None
        return ssl.optionsForClientTLS(self.settings.host)

    @property
    def connected(self) -> bool:
        return self._handler is not None and self._handler._factory.size > 0

    def execute(self, *command: bytes | str) -> Deferred[Any]:
        if not self.connected:
            return fail(LinkDown(self.last_error or "not connected"))
        d: Deferred[Any] = self._handler.execute_command(*command)

        def ok(result: Any) -> Any:
            self.last_error = None
            self.last_ok_at = time.time()
            return result

        def failed(failure: Any) -> Any:
            self.last_error = failure.getErrorMessage() or repr(failure.value)
            return failure

        return d.addCallbacks(ok, failed)

    def note_down(self, message: str) -> None:
        self.last_error = message

    def close(self) -> Deferred[Any] | None:
        handler, self._handler = self._handler, None
        if handler is None:
            return None
        d: Deferred[Any] = handler.disconnect()
        if self._sentinel is not None:
            sentinel, self._sentinel = self._sentinel, None
            d.addBoth(lambda _: sentinel.disconnect())
        return d
