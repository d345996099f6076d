"""A loopback TCP proxy that can cut a connection after N client bytes.

Put it between the tus client and any server to kill a PATCH mid-body: the
server sees a real disconnect, the client a real network error.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol


class _ToServer(protocol.Protocol):
    def __init__(self, peer: _FromClient) -> None:
        self.peer = peer

    def connectionMade(self) -> None:
        self.peer.server = self
        self.peer.transport.resumeProducing()
        if self.peer.pending:
            self.transport.write(b"".join(self.peer.pending))
            self.peer.pending.clear()

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.peer.transport.loseConnection()
        self.peer.server = None


class _FromClient(protocol.Protocol):
    factory: DroppingProxy

    def connectionMade(self) -> None:
        self.server: _ToServer | None = None
        self.pending: list[bytes] = []
        self.forwarded = 0
        self.drop_at = self.factory.next_drop()
        self.transport.pauseProducing()
        client = protocol.ClientCreator(self.factory.reactor, _ToServer, self)
        d = client.connectTCP("127.0.0.1", self.factory.target_port)
        d.addErrback(lambda _: self.transport.abortConnection())

    def dataReceived(self, data: bytes) -> None:
        self.factory.forwarded += len(data)
        if self.drop_at is not None and self.forwarded + len(data) >= self.drop_at:
            data = data[: max(0, self.drop_at - self.forwarded)]
            self._send(data)
            self.factory.drops += 1
            self.transport.abortConnection()
            if self.server is not None:
                self.server.transport.abortConnection()
            return
        self.forwarded += len(data)
        self._send(data)

    def _send(self, data: bytes) -> None:
        if self.server is None:
            self.pending.append(data)
        else:
            self.server.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.server is not None:
            self.server.transport.loseConnection()


class DroppingProxy(protocol.Factory):
    """``drops``: byte counts; the n-th new connection is cut after the n-th count."""

    protocol = _FromClient

    def __init__(self, reactor: Any, target_port: int, drops: list[int | None] | None = None) -> None:
        self.reactor = reactor
        self.target_port = target_port
        self.plan = list(drops or [])
        self.drops = 0
        self.forwarded = 0
        self.port: Any = None

    def next_drop(self) -> int | None:
        return self.plan.pop(0) if self.plan else None

    def listen(self) -> DroppingProxy:
        self.port = self.reactor.listenTCP(0, self, interface="127.0.0.1")
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"
