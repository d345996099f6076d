"""Prometheus metrics of the manager API (``GET /metrics``).

Each ``ManagerAPI`` owns a ``CollectorRegistry`` (so several can live in one
test process): request counts and latencies by route, method and status,
request/response bytes by route, background tasks by name and status, the
volumes' filesystem usage (refreshed in the pool when ``/metrics`` is read),
and the standard process metrics.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

PREFIX = "storage_proxy"


class _BackgroundTaskCollector(Collector):
    """Reads the task table at scrape time; nothing to keep in sync."""

    def __init__(self, bgtasks: Any) -> None:
        self.bgtasks = bgtasks

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{PREFIX}_bgtasks", "Background tasks known to this proxy, by name and status",
            labels=["name", "status"],
        )
        tally: Tally[tuple[str, str]] = Tally()
        for task in self.bgtasks.all():
            tally[(task.name, task.status)] += 1
        for (name, status), count in sorted(tally.items()):
            family.add_metric([name, status], count)
        yield family


class _EventBusCollector(Collector):
    """The event bus's counters (storage.events.delivery.Delivery), read at scrape time."""

    def __init__(self, delivery: Any) -> None:
        self.delivery = delivery

    def collect(self) -> Iterable[Any]:
        d = self.delivery
        for attr, help_text in (
            ("sent", "Events the manager's Redis accepted, by event name"),
            ("queued", "Events that had to wait because Redis was unreachable, by event name"),
            ("failed", "Events that could not be kept in the outbox or encoded, by event name"),
            ("dropped", "Progress events dropped while Redis was unreachable, by event name"),
        ):
            family = CounterMetricFamily(f"{PREFIX}_events_{attr}", help_text, labels=["name"])
            for name, count in sorted(getattr(d, attr).items()):
                family.add_metric([name], count)
            yield family
        state = d.state()
        yield GaugeMetricFamily(f"{PREFIX}_events_backlog", "Events waiting to be sent", value=state["backlog"])
        yield GaugeMetricFamily(f"{PREFIX}_events_outbox_pending", "Events in the durable outbox not yet acknowledged",
                                value=state["outbox_pending"])
        yield GaugeMetricFamily(f"{PREFIX}_event_bus_connected", "1 while the link to the manager's Redis is up",
                                value=1 if state["connected"] else 0)


class _WorkersCollector(Collector):
    """The client-API workers (num-proc > 1): their own metrics, each sample labelled
    ``worker``, as they answered the last ``WorkerPool.collect_metrics``; and the pool's state."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import Metric

        pool = self.pool
        up = GaugeMetricFamily(f"{PREFIX}_worker_up", "1 while the client-API worker accepts connections",
                               labels=["worker"])
        restarts = CounterMetricFamily(f"{PREFIX}_worker_restarts", "Client-API worker restarts after it exited",
                                       labels=["worker"])
        pid = GaugeMetricFamily(f"{PREFIX}_worker_pid", "The client-API worker's process id (0 while it is down)",
                                labels=["worker"])
        for w in pool.status():
            up.add_metric([str(w["index"])], 1 if w["ready"] else 0)
            restarts.add_metric([str(w["index"])], w["restarts"])
            pid.add_metric([str(w["index"])], w["pid"] or 0)
        yield up
        yield restarts
        yield pid
        merged: dict[str, Any] = {}
        for index, families in sorted(pool.families.items()):
            for family in families:
                name = str(family["name"])
                rename = name.startswith("process_")  # not to clash with this process's own
                full = f"{PREFIX}_worker_{name}" if rename else name
                metric = merged.get(full)
                if metric is None:
                    metric = merged[full] = Metric(full, f"{family['help']} (per client-API worker)", family["type"])
                for sample_name, labels, value in family["samples"]:
                    if rename:
                        sample_name = f"{PREFIX}_worker_{sample_name}"
                    metric.add_sample(sample_name, {**labels, "worker": str(index)}, value)
        yield from merged.values()


class ConnectionCollector(Collector):
    """Each listener's connections (storage.web.connections.ConnectionGuard), read at scrape time."""

    def __init__(self, guards: dict[str, Any]) -> None:
        self.guards = guards

    def collect(self) -> Iterable[Any]:
        open_now = GaugeMetricFamily(f"{PREFIX}_connections_open", "Connections open, by API", labels=["api"])
        limit = GaugeMetricFamily(f"{PREFIX}_connections_limit", "The most connections an API keeps open",
                                  labels=["api"])
        addresses = GaugeMetricFamily(f"{PREFIX}_connections_client_addresses",
                                      "Client addresses with a connection open, by API", labels=["api"])
        refused = CounterMetricFamily(f"{PREFIX}_connections_refused",
                                      "Connections refused with 503, by API and the limit they hit",
                                      labels=["api", "reason"])
        timed_out = CounterMetricFamily(f"{PREFIX}_connections_timed_out",
                                        "Connections closed because a request's headers came too slowly, by API",
                                        labels=["api", "phase"])
        for api, guard in sorted(self.guards.items()):
            if guard is None:
                continue
            open_now.add_metric([api], guard.open)
            limit.add_metric([api], guard.limits.max_total)
            addresses.add_metric([api], len(guard.by_address))
            for reason in ("total", "per-address"):
                refused.add_metric([api, reason], guard.refused[reason])
            timed_out.add_metric([api, "headers"], guard.timed_out["headers"])
        yield from (open_now, limit, addresses, refused, timed_out)


class ManagerMetrics:
    def __init__(self, bgtasks: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_manager_requests", "Manager API requests answered",
            ["route", "method", "status"], registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_manager_request_duration_seconds", "Manager API request latency",
            ["route", "method"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.bytes_in = Counter(
            f"{PREFIX}_manager_request_bytes", "Manager API request body bytes", ["route"], registry=r,
        )
        self.bytes_out = Counter(
            f"{PREFIX}_manager_response_bytes", "Manager API response body bytes", ["route"], registry=r,
        )
        self.fs_capacity = Gauge(
            f"{PREFIX}_volume_capacity_bytes", "Capacity of the filesystem holding each volume",
            ["volume"], registry=r,
        )
        self.fs_used = Gauge(
            f"{PREFIX}_volume_used_bytes", "Used bytes of the filesystem holding each volume",
            ["volume"], registry=r,
        )
        if bgtasks is not None:
            r.register(_BackgroundTaskCollector(bgtasks))
        try:
            ProcessCollector(registry=r)
        except Exception:  # pragma: no cover - platforms without /proc
            pass

    def add_workers(self, pool: Any) -> None:
        self.registry.register(_WorkersCollector(pool))

    def add_event_bus(self, delivery: Any) -> None:
        self.registry.register(_EventBusCollector(delivery))

    def add_connections(self, guards: dict[str, Any]) -> None:
        self.registry.register(ConnectionCollector(guards))

    def track(self, request: Any, route: str) -> None:
        """Record ``request`` once its response is finished (or the client left)."""
        start = time.monotonic()
        method = request.method.decode("ascii", "replace")
        length = request.getHeader(b"content-length")
        try:
            self.bytes_in.labels(route).inc(int(length or 0))
        except ValueError:
            pass

        def done(_: Any) -> None:
            status = str(getattr(request, "code", 0) or 0)
            self.requests.labels(route, method, status).inc()
            self.latency.labels(route, method).observe(time.monotonic() - start)
            self.bytes_out.labels(route).inc(getattr(request, "sentLength", 0) or 0)

        request.notifyFinish().addBoth(done)

    def set_fs_usage(self, volume: str, capacity_bytes: int, used_bytes: int) -> None:
        self.fs_capacity.labels(volume).set(capacity_bytes)
        self.fs_used.labels(volume).set(used_bytes)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
