"""Connection limits and timeouts of one listener, and their counters.

A production daemon must not let idle or slow clients use up its file
descriptors: each Site takes a ``ConnectionGuard`` that

* refuses a connection over ``max_total`` open connections, or over
  ``max_per_address`` from one client address, with a complete 503
  problem+json (``Retry-After``) and closes it, before reading a byte;
* gives every request ``header_timeout`` seconds from its first byte (or a
  new connection from its accept) to complete its headers — a client
  dribbling them (slowloris) gets 408 and the connection closes;
* leaves the idle timeout between requests to twisted.web's own
  (``HTTPFactory.timeOut``, which ``idle_timeout`` sets).

It counts what it did for ``/metrics`` (``storage.metrics``).  The guard
knows connections only through the protocol twisted.web builds for them:
``watch`` hooks its connectionMade/connectionLost, which is the one piece
of twisted.web internals here.
"""

from __future__ import annotations

import resource
from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from storage.errors import StorageError
from storage.web.streaming import problem_response

log = Logger()


class TooManyConnections(StorageError):
    status = 503
    problem = "too-many-connections"
    title = "Too many connections"
    error_code = "storage-proxy_check-limit_unavailable"


class RequestHeaderTimeout(StorageError):
    status = 408
    problem = "request-timeout"
    title = "Request Timeout"
    error_code = "storage-proxy_request_timeout"


@dataclass(frozen=True)
class ConnectionLimits:
    max_total: int
    max_per_address: int = 0  # 0: no limit per address
    header_timeout: float = 30.0
    idle_timeout: float = 60.0


# Descriptors kept for files, pipes, the event bus and the pool when the
# listeners take their share of the open-file limit.
FD_RESERVE = 1024
# The share of what is left each API may hold open by default: the client
# API's uploads and downloads are many, the manager's calls few.
DEFAULT_SHARES = {"client": 0.9, "manager": 0.1}
# Descriptors one connection may hold: its socket and, for an upload, the
# staging file twice (the read-only descriptor holding its lock and the one
# writing it: storage.uploads.open_writer); a download holds one file.
FDS_PER_CONNECTION = 3


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (as
    nginx's worker_rlimit_nofile); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def default_max_connections(label: str, open_file_limit: int) -> int:
    """An API's connection limit when the config sets none: its share of the
    open-file limit beyond ``FD_RESERVE``, at ``FDS_PER_CONNECTION`` each, so
    the daemon refuses a connection with a clear 503 before accept(2) or an
    upload's open(2) fails with EMFILE."""
    share = (open_file_limit - FD_RESERVE) * DEFAULT_SHARES.get(label, 0.1)
    return max(64, int(share / FDS_PER_CONNECTION))


def limits_for(api: Any, label: str, open_file_limit: int) -> ConnectionLimits:
    """The limits of one ``[api.*]`` table (a ``storage.config.APIConfig``)."""
    total = api.max_connections
    return ConnectionLimits(
        max_total=total if total is not None else default_max_connections(label, open_file_limit),
        max_per_address=api.max_connections_per_address,
        header_timeout=api.request_header_timeout,
        idle_timeout=api.idle_timeout,
    )


def peer_host(addr: Any) -> str:
    """The client address a limit counts by (its host; "" for a UNIX socket)."""
    return str(getattr(addr, "host", "") or "")


class ConnectionGuard:
    def __init__(self, limits: ConnectionLimits, reactor: Any, label: str) -> None:
        self.limits = limits
        self.reactor = reactor
        self.label = label
        self.open = 0
        self.by_address: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # by reason: "total", "per-address"
        self.timed_out: Counter[str] = Counter()  # by phase: "headers"

    def refusal(self, addr: Any) -> StorageError | None:
        """Why a new connection from ``addr`` is refused, or None (it is counted then)."""
        host = peer_host(addr)
        limits = self.limits
        if self.open >= limits.max_total:
            reason, message = "total", f"the {self.label} API has {self.open} connections open, its limit"
        elif limits.max_per_address and self.by_address[host] >= limits.max_per_address:
            reason, message = "per-address", (
                f"{host} has {self.by_address[host]} connections open to the {self.label} API, its limit"
            )
        else:
            self.open += 1
            self.by_address[host] += 1
            return None
        self.refused[reason] += 1
        if sum(self.refused.values()) in (1, 10, 100) or sum(self.refused.values()) % 1000 == 0:
            log.warn("{label} API: refusing connections ({reason}): {message}",
                     label=self.label, reason=reason, message=message)
        return TooManyConnections(message + "; retry later")

    def released(self, addr: Any) -> None:
        host = peer_host(addr)
        self.open -= 1
        self.by_address[host] -= 1
        if self.by_address[host] <= 0:
            del self.by_address[host]

    def watch(self, protocol: Any, addr: Any) -> None:
        """Count ``protocol``'s connection until it is lost, and time its headers."""
        channel = getattr(protocol, "_channel", protocol)  # twisted.web's H1/H2 proxy
        timer = HeaderTimer(self, channel, protocol)
        channel.storage_header_timer = timer
        made, lost = protocol.connectionMade, protocol.connectionLost

        def connection_made() -> None:
            made()
            timer.start()

        def connection_lost(reason: Any) -> None:
            timer.cancel()
            self.released(addr)
            lost(reason)

        protocol.connectionMade = connection_made
        protocol.connectionLost = connection_lost


class HeaderTimer:
    """The deadline for the headers of a connection's next request."""

    def __init__(self, guard: ConnectionGuard, channel: Any, protocol: Any) -> None:
        self.guard = guard
        self.channel = channel
        self.protocol = protocol
        self.call: Any = None

    def start(self) -> None:
        self.cancel()
        self.call = self.guard.reactor.callLater(self.guard.limits.header_timeout, self._expired)

    def cancel(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def _expired(self) -> None:
        self.call = None
        if getattr(self.protocol, "_channel", self.channel) is not self.channel:
            return  # the connection switched to HTTP/2, whose streams this does not time
        transport = getattr(self.channel, "transport", None)
        if transport is None:
            return
        self.guard.timed_out["headers"] += 1
        timeout = self.guard.limits.header_timeout
        error = RequestHeaderTimeout(f"the request's headers did not arrive within {timeout:g} s")
        transport.write(problem_response(error))
        transport.loseConnection()


class RefusedConnection(Protocol):
    """Answers a refused connection with its 503 and closes it, reading nothing."""

    def __init__(self, error: StorageError) -> None:
        self.error = error

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(problem_response(self.error, {b"Retry-After": b"1"}))
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass
