"""The Site both APIs are served by: it counts in-flight requests so a
graceful stop can wait for them (bounded) after the listener closes."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.web.server import Request, Site


class TrackingRequest(Request):
    def process(self) -> None:
        site = self.channel.site if self.channel is not None else None
        if isinstance(site, StorageSite):
            site.request_started(self)
        super().process()


class StorageSite(Site):
    requestFactory = TrackingRequest
    displayTracebacks = False

    def __init__(self, resource: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(resource, *args, **kwargs)
        self.in_flight: set[Request] = set()
        self._drained: list[Deferred[None]] = []

    def request_started(self, request: Request) -> None:
        self.in_flight.add(request)
        request.notifyFinish().addBoth(lambda _: self._request_done(request))

    def _request_done(self, request: Request) -> None:
        self.in_flight.discard(request)
        if not self.in_flight:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Fires when no request is in flight (the caller bounds the wait)."""
        if not self.in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d
