"""Health probes: is every volume's root reachable?

Each check stats the volume root in the blocking pool, bounded by a timeout.
A hung mount must not eat the pool: at most one check per volume is in
flight; a probe arriving while one runs waits for that one (or for the
timeout) instead of starting another.  Results younger than ``max_age`` are
reused, so probes polled every second cost almost nothing.

The body has upstream's shape: ``status``, ``version``, ``component`` and
``connectivity {overall_healthy, connectivity_checks[...], timestamp}``.
``/health`` always answers 200 (``ok``/``degraded``); ``/livez`` and
``/readyz`` answer 503 (``error``) when a gating check fails.  All volume
checks gate both.

With an event bus (``[redis]``) there is one more check, service group
``redis``, component ``stream`` (the manager's stream database, as upstream
names its Redis checks): healthy while the link is up and nothing waits for
Redis.  It gates ``/readyz`` only: a restart would not bring Redis back,
and the events wait in the outbox meanwhile; ``/health`` shows it as
``degraded``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed

from storage import API_VERSION

SERVICE_GROUP = "storage-volume"
EVENT_BUS_GROUP = "redis"
EVENT_BUS_COMPONENT = "stream"
WORKERS_GROUP = "storage-proxy"
WORKERS_COMPONENT = "client-workers"


@dataclass
class CheckResult:
    component_id: str
    is_healthy: bool
    checked_at: float
    error_message: str | None = None
    service_group: str = SERVICE_GROUP

    def as_json(self) -> dict[str, Any]:
        return {
            "service_group": self.service_group,
            "component_id": self.component_id,
            "is_healthy": self.is_healthy,
            "last_checked_at": iso(self.checked_at),
            "error_message": self.error_message,
        }


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def _stat_root(path: str) -> None:
    """Blocking: the root must be a readable, searchable directory."""
    os.stat(path)
    if not os.path.isdir(path):
        raise NotADirectoryError(f"not a directory: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"not readable: {path}")


class HealthChecker:
    def __init__(self, volumes: Any, pool: Any, reactor: Any, timeout: float = 5.0, max_age: float = 2.0) -> None:
        self.volumes = volumes
        self.pool = pool
        self.reactor = reactor
        self.timeout = timeout
        self.max_age = max_age
        self._last: dict[str, CheckResult] = {}
        self._running: dict[str, Deferred[CheckResult]] = {}
        self.event_bus: Any = None  # storage.events.delivery.Delivery, set by the daemon
        self.workers: Any = None  # storage.workers.WorkerPool (num-proc > 1), set by the daemon

    def _check_event_bus(self) -> CheckResult:
        state = self.event_bus.state()
        error = None
        if not state["connected"]:
            error = f"Redis unreachable: {state['last_error'] or 'not connected'}"
        elif state["down_since"] is not None:
            error = f"Redis does not take events: {state['last_error'] or 'unknown error'}"
        if error is not None and state["backlog"]:
            error += f"; {state['backlog']} event(s) waiting ({state['outbox_pending']} in the outbox)"
        if error is None and state["outbox_error"]:
            error = f"event outbox: {state['outbox_error']}"
        return CheckResult(EVENT_BUS_COMPONENT, error is None, time.time(), error, EVENT_BUS_GROUP)

    def _check_workers(self) -> CheckResult:
        """The client API is served while at least one worker accepts on its socket."""
        ready = self.workers.ready_count
        error = None
        if ready == 0:
            down = "; ".join(f"worker {w['index']}: {w['last_exit'] or 'starting'}" for w in self.workers.status())
            error = f"no client-API worker is running ({down})"
        return CheckResult(WORKERS_COMPONENT, error is None, time.time(), error, WORKERS_GROUP)

    def _check_volume(self, volume: Any) -> Deferred[CheckResult]:
        name = volume.name
        last = self._last.get(name)
        if last is not None and time.time() - last.checked_at < self.max_age:
            return succeed(last)
        running = self._running.get(name)
        if running is None:
            running = self.pool.run(_stat_root, str(volume.root))

            def ok(_: Any) -> CheckResult:
                return CheckResult(name, True, time.time())

            def failed(failure: Any) -> CheckResult:
                return CheckResult(name, False, time.time(), failure.getErrorMessage() or repr(failure.value))

            def store(result: CheckResult) -> CheckResult:
                self._last[name] = result
                self._running.pop(name, None)
                return result

            running.addCallbacks(ok, failed).addCallback(store)
            self._running[name] = running
        return self._wait(running, name)

    def _wait(self, running: Deferred[CheckResult], name: str) -> Deferred[CheckResult]:
        """A view of ``running`` that gives up after the timeout (the check keeps going)."""
        view: Deferred[CheckResult] = Deferred()

        def give_up() -> None:
            view.callback(CheckResult(name, False, time.time(), f"no answer within {self.timeout}s"))

        timer = self.reactor.callLater(self.timeout, give_up)

        def forward(result: CheckResult) -> CheckResult:
            if timer.active():
                timer.cancel()
                view.callback(result)
            return result

        running.addCallback(forward)
        return view

    async def connectivity(self, event_bus_gates: bool = True) -> dict[str, Any]:
        """``event_bus_gates=False`` (``/livez``): the event bus is reported but does not gate."""
        volumes = list(self.volumes)
        results = await DeferredList([self._check_volume(v) for v in volumes], consumeErrors=True)
        checks = [r for ok, r in results if ok]
        healthy = all(c.is_healthy for c in checks)
        if self.event_bus is not None:
            bus = self._check_event_bus()
            checks.append(bus)
            healthy = healthy and (bus.is_healthy or not event_bus_gates)
        if self.workers is not None:
            workers = self._check_workers()
            checks.append(workers)
            healthy = healthy and workers.is_healthy
        return {
            "overall_healthy": healthy,
            "connectivity_checks": [c.as_json() for c in checks],
            "timestamp": iso(time.time()),
        }


def health_body(connectivity: dict[str, Any], *, probe: bool) -> tuple[int, dict[str, Any]]:
    """The status code and body: ``/health`` (probe=False) or ``/livez``/``/readyz``."""
    healthy = connectivity["overall_healthy"]
    if healthy:
        status, code = "ok", 200
    elif probe:
        status, code = "error", 503
    else:
        status, code = "degraded", 200
    return code, {
        "status": status,
        "version": API_VERSION,
        "component": "storage-proxy",
        "connectivity": connectivity,
    }
