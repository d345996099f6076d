"""The manager's event bus: what storage-proxy publishes on the manager's Redis.

One job per module:

* ``encoding`` -- the events and their wire encodings (26.9 / 26.8 / 26.4);
* ``settings`` -- the ``[redis]`` table;
* ``link`` -- the txredisapi connection (lazy, reconnects with backoff);
* ``outbox`` -- the durable on-disk outbox (at-least-once);
* ``delivery`` -- the ordered queue and pump (a service);
* ``publisher`` -- the ``storage.bgtasks`` listener that makes the events.

``make_event_bus(config, pool, reactor)`` composes them; None without ``[redis]``.
"""

from __future__ import annotations

from typing import Any


def make_event_bus(config: Any, pool: Any, reactor: Any) -> tuple[Any, Any] | None:
    """``(Delivery, EventPublisher)`` for ``config.redis``, or None when there is none."""
    if getattr(config, "redis", None) is None:
        return None
    from storage.events.delivery import Delivery
    from storage.events.link import RedisLink
    from storage.events.outbox import FILE_NAME, Outbox, default_state_dir
    from storage.events.publisher import EventPublisher

    outbox = Outbox(default_state_dir(config) / FILE_NAME, pool)
    delivery = Delivery(RedisLink(config.redis), outbox, config.redis.event_format, reactor)
    return delivery, EventPublisher(delivery, reactor)
