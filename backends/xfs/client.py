"""The proxy's side of the helper connection: reconnecting, bounded, typed errors.

A ``ClientService`` keeps one AMP connection to the helper's socket and
reconnects with backoff (the helper may be starting, or restarting after a
crash).  A call waits up to ``timeout`` seconds for a connection; a call cut
by a lost connection is sent once more (every command is idempotent).
Helper errors become ``storage.errors`` exceptions.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from storage.errors import ExecutionError, QuotaScopeNotFound

from . import protocol as p

log = Logger()

_LOST = (error.ConnectionDone, error.ConnectionLost, error.ConnectionClosed, amp.ProtocolSwitched)


class HelperUnavailable(ExecutionError):
    title = "XFS quota helper unavailable"


class HelperClient(Service):
    name = "xfs-helper-client"  # type: ignore[assignment]

    def __init__(self, reactor: Any, socket_path: str, timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.socket_path = socket_path
        self.timeout = timeout
        self._service: ClientService | None = None

    def startService(self) -> None:
        super().startService()
        endpoint = UNIXClientEndpoint(self.reactor, self.socket_path, timeout=5)
        self._service = ClientService(
            endpoint,
            Factory.forProtocol(amp.AMP),
            retryPolicy=backoffPolicy(initialDelay=0.05, maxDelay=1.0, factor=1.5),
            clock=self.reactor,
        )
        self._service.startService()

    def stopService(self):
        super().stopService()
        if self._service is not None:
            service, self._service = self._service, None
            return service.stopService()
        return None

    async def _connection(self, timeout: float | None = None) -> amp.AMP:
        if self._service is None:
            raise HelperUnavailable("the XFS volume is not started")
        timeout = self.timeout if timeout is None else timeout
        d = self._service.whenConnected()
        d.addTimeout(timeout, self.reactor)
        try:
            proto: amp.AMP = await d  # type: ignore[assignment]
            return proto
        except defer.TimeoutError:
            raise HelperUnavailable(
                f"no XFS quota helper answered on {self.socket_path} within {timeout:g}s"
            ) from None

    async def call(self, command: type[amp.Command], *, _wait: float | None = None, **kwargs: Any) -> dict[str, Any]:
        for attempt in (1, 2):
            proto = await self._connection(_wait)
            try:
                return await proto.callRemote(command, **kwargs)
            except _LOST:
                if attempt == 2:
                    raise HelperUnavailable("the XFS quota helper went away during the call") from None
                log.warn("XFS helper connection lost during {cmd}; retrying", cmd=command.__name__)
                # Let the ClientService see the loss first, or whenConnected
                # would hand back the dead connection.
                await task.deferLater(self.reactor, 0.05, lambda: None)
            except p.ProjectNotFound as exc:
                raise QuotaScopeNotFound(str(exc)) from None
            except p.HelperError as exc:
                raise ExecutionError(f"XFS quota helper: {type(exc).__name__}: {exc}") from None
            except amp.UnknownRemoteError as exc:
                raise ExecutionError(f"XFS quota helper failed: {exc}") from None
        raise AssertionError("unreachable")

    # -- the commands -----------------------------------------------------

    async def ping(self, wait: float | None = None) -> int:
        return (await self.call(p.Ping, _wait=wait))["version"]

    async def create_project(self, name: str, path: str, limit_bytes: int) -> int:
        return (await self.call(p.CreateProject, name=name, path=path, limit_bytes=limit_bytes))["project_id"]

    async def set_limit(self, name: str, limit_bytes: int) -> int:
        return (await self.call(p.SetLimit, name=name, limit_bytes=limit_bytes))["project_id"]

    async def report(self, name: str) -> dict[str, int]:
        return await self.call(p.Report, name=name)

    async def remove_project(self, name: str) -> int:
        return (await self.call(p.RemoveProject, name=name))["project_id"]
