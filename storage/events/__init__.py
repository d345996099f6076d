"""The manager's event bus: what storage-proxy publishes on the manager's Redis.

One job per module:

* ``encoding`` -- the events and their wire encodings (26.9 / 26.8 / 26.4);
* ``settings`` -- the ``[redis]`` (or ``[etcd]``) table;
* ``etcd`` -- ``config/redis`` read from etcd's v3 JSON gateway (treq);
* ``link`` -- the txredisapi connection (lazy, reconnects with backoff);
* ``outbox`` -- the durable on-disk outbox (at-least-once);
* ``delivery`` -- the ordered queue and pump (a service);
* ``journal`` -- the running tasks on disk, resumed after a kill;
* ``takeover`` -- the state dir's owner lock; a live replica takes over a dead one's;
* ``publisher`` -- the ``storage.bgtasks`` listener that makes the events.

``make_event_bus(config, pool, reactor)`` composes them; None without ``[redis]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EventBus:
    delivery: Any  # storage.events.delivery.Delivery (a service)
    publisher: Any  # storage.events.publisher.EventPublisher (a bgtasks listener)
    journal: Any  # storage.events.journal.TaskJournal
    journal_service: Any  # storage.events.journal.JournalService
    owner: Any  # storage.events.takeover.StateOwner (a service): our state dir, and dead replicas'


def make_event_bus(config: Any, pool: Any, reactor: Any) -> EventBus | None:
    """The event bus for ``config.redis`` (or the Redis that ``config.etcd`` names), or None."""
    redis: Any = getattr(config, "redis", None)
    etcd: Any = getattr(config, "etcd", None)
    if redis is None and etcd is None:
        return None
    from storage.events import journal as j
    from storage.events.delivery import Delivery
    from storage.events.link import RedisLink
    from storage.events.outbox import FILE_NAME, Outbox, default_state_dir
    from storage.events.publisher import EventPublisher

    state = default_state_dir(config)
    outbox = Outbox(state / FILE_NAME, pool)
    if redis is not None:
        delivery = Delivery(RedisLink(redis), outbox, redis.event_format, reactor)
    else:
        from storage.events.etcd import read_redis_tree
        from storage.events.settings import redis_from_etcd

        async def resolve() -> Any:
            return redis_from_etcd(await read_redis_tree(etcd), etcd.event_format)

        delivery = Delivery(RedisLink(None), outbox, etcd.event_format, reactor, resolve=resolve)
    from storage.events.takeover import StateOwner

    owner = StateOwner(state, pool, reactor, getattr(config, "peer_probe_interval", 1.0))
    outbox.claimed = owner.claimed
    journal = j.TaskJournal(state / j.FILE_NAME, pool, claimed=owner.claimed)
    return EventBus(delivery, EventPublisher(delivery, reactor, journal), journal, j.JournalService(journal), owner)
