"""Our events, consumed by the manager's own event bus code (backend.ai-common 26.9.6).

A real redis-server on a loopback port; the daemon points at it with
``[redis] addr``; the manager side is common's ``RedisQueue`` with the
arguments the manager's ``MessageQueueDependency`` gives it (anycast stream
``events``, broadcast channel ``events_all``, consumer group ``manager``,
database 4) under common's ``EventDispatcher``, with the event classes the
manager registers (``consume`` for the vfolder anycast events, ``subscribe``
for the bgtask broadcasts).  The test deletes, clones and deletes files
through the daemon's manager API (the manager's request bodies), and each
task must reach a handler as the right event class with the right vfid and
task id.

It needs backend.ai-common only: ``tox -e manager`` runs it with 26.9.6
(``event-format = "26.9"``, the default), ``manager-common268`` and
``manager-common264`` with 26.8.3 and 26.4.16, the daemon then set to that
line's encoding (chosen from the installed common's version).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from ai.backend.common.defs import REDIS_STREAM_DB
from ai.backend.common.events.dispatcher import EventDispatcher
from ai.backend.common.events.event_types.bgtask.broadcast import (
    BgtaskCancelledEvent,
    BgtaskDoneEvent,
    BgtaskFailedEvent,
    BgtaskPartialSuccessEvent,
    BgtaskUpdatedEvent,
)
from ai.backend.common.events.event_types.vfolder.anycast import (
    VFolderCloneFailureEvent,
    VFolderCloneSuccessEvent,
    VFolderDeletionFailureEvent,
    VFolderDeletionSuccessEvent,
)
from ai.backend.common.message_queue.redis_queue import RedisMQArgs, RedisQueue
from ai.backend.common.types import (
    HostPortPair,
    QuotaScopeID,
    QuotaScopeType,
    RedisTarget,
    VFolderID,
)
from calls import manager_call, run
from support.daemon import StorageProxyProcess
from support.redis import REDIS_SERVER, SKIP_REASON, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

VFOLDER_EVENTS = (VFolderDeletionSuccessEvent, VFolderDeletionFailureEvent,
                  VFolderCloneSuccessEvent, VFolderCloneFailureEvent)
BGTASK_EVENTS = (BgtaskUpdatedEvent, BgtaskDoneEvent, BgtaskFailedEvent,
                 BgtaskCancelledEvent, BgtaskPartialSuccessEvent)
TERMINAL = (BgtaskDoneEvent, BgtaskFailedEvent, BgtaskCancelledEvent, BgtaskPartialSuccessEvent)
COMMON = importlib.metadata.version("backend.ai-common")
EVENT_FORMAT = ".".join(COMMON.split(".")[:2])  # "26.9", "26.8", "26.4": the daemon's event-format


def new_vfid() -> VFolderID:
    return VFolderID(QuotaScopeID(QuotaScopeType.USER, uuid.uuid4()), uuid.uuid4())


class ManagerSide:
    """What the manager runs: its RedisQueue and EventDispatcher, handlers recording events."""

    def __init__(self) -> None:
        self.received: dict[type, list[Any]] = defaultdict(list)
        self.changed = asyncio.Event()

    async def handler(self, _context: None, _source: Any, event: Any) -> None:
        self.received[type(event)].append(event)
        self.changed.set()

    async def start(self, redis: RedisServer) -> None:
        target = RedisTarget(addr=HostPortPair("127.0.0.1", redis.port))
        self.queue = await RedisQueue.create(target, RedisMQArgs(
            anycast_stream_key="events",
            broadcast_channel="events_all",
            consume_stream_keys={"events"},
            subscribe_channels={"events_all"},
            group_name="manager",
            node_id="test-manager",
            db=REDIS_STREAM_DB,
        ))
        self.dispatcher = EventDispatcher(self.queue)
        for cls in VFOLDER_EVENTS:
            self.dispatcher.consume(cls, None, self.handler)
        for cls in BGTASK_EVENTS:
            self.dispatcher.subscribe(cls, None, self.handler)
        await self.dispatcher.start()

    async def close(self) -> None:
        await self.dispatcher.close()
        await self.queue.close()

    def terminal(self, task_id: uuid.UUID) -> list[Any]:
        return [e for cls in TERMINAL for e in self.received[cls] if e.task_id == task_id]

    def vfolder_events(self, vfid: VFolderID) -> list[Any]:
        return [e for cls in VFOLDER_EVENTS for e in self.received[cls] if e.vfid == vfid]

    async def wait(self, predicate: Any, what: str, timeout: float = 20.0) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise AssertionError(f"the manager never received {what}: {dict(self.received)}") from None


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_each_task_reaches_the_managers_handlers(redis_server: RedisServer, daemon_factory: Any) -> None:
    daemon: StorageProxyProcess = daemon_factory(
        extra_config={"redis": {"addr": redis_server.addr, "event-format": EVENT_FORMAT}})
    deleted, source, clone, files, missing = (new_vfid() for _ in range(5))

    async def call(path: str, body: dict[str, Any], expect: int) -> Any:
        status, answer = await manager_call(daemon, "POST", path, body)
        assert status == expect, (path, status, answer)
        return answer

    async def go() -> None:
        side = ManagerSide()
        await side.start(redis_server)
        try:
            for vfid in (deleted, source, files):
                await call("/folder/create", {"volume": "local", "vfid": str(vfid), "options": {}}, 204)
                await call("/folder/file/mkdir", {"volume": "local", "vfid": str(vfid), "relpath": ["a/b", "c"],
                                                  "exist_ok": False}, 200)
            t_delete = uuid.UUID((await call("/folder/delete", {"volume": "local", "vfid": str(deleted)},
                                             202))["bgtask_id"])
            clone_body = {"src_volume": "local", "src_vfid": str(source), "dst_volume": "local",
                          "dst_vfid": str(clone)}
            t_clone = uuid.UUID((await call("/folder/clone", clone_body, 200))["bgtask_id"])
            fail_body = {"src_volume": "local", "src_vfid": str(missing), "dst_volume": "local",
                         "dst_vfid": str(new_vfid())}
            t_clone_fail = uuid.UUID((await call("/folder/clone", fail_body, 200))["bgtask_id"])
            t_files = uuid.UUID((await call("/folder/file/delete-async", {
                "volume": "local", "vfid": str(files), "relpaths": ["a"], "recursive": True}, 202))["bgtask_id"])
            tasks = (t_delete, t_clone, t_clone_fail, t_files)

            # the vfolder anycast events, consumed by group "manager"
            await side.wait(lambda: side.vfolder_events(deleted) and side.vfolder_events(source)
                            and side.vfolder_events(missing), "the vfolder events")
            [deletion] = side.vfolder_events(deleted)
            assert type(deletion) is VFolderDeletionSuccessEvent
            [cloned] = side.vfolder_events(source)
            assert type(cloned) is VFolderCloneSuccessEvent and cloned.dst_vfid == clone
            [failed] = side.vfolder_events(missing)
            assert type(failed) is VFolderCloneFailureEvent and failed.message

            # the bgtask broadcasts: exactly one terminal event per task, of the right class
            await side.wait(lambda: all(side.terminal(t) for t in tasks), "a terminal bgtask event for each task")
            assert [type(e) for e in side.terminal(t_delete)] == [BgtaskDoneEvent]
            assert [type(e) for e in side.terminal(t_clone)] == [BgtaskDoneEvent]
            assert [type(e) for e in side.terminal(t_clone_fail)] == [BgtaskFailedEvent]
            assert [type(e) for e in side.terminal(t_files)] == [BgtaskDoneEvent]
            assert set(tasks) <= {e.task_id for e in side.received[BgtaskUpdatedEvent]}

            # and the filesystem agrees with what the events say
            status, _ = await manager_call(daemon, "GET", "/folder/usage", {"volume": "local", "vfid": str(deleted)})
            assert status == 404
            status, listing = await manager_call(daemon, "POST", "/folder/file/list",
                                                 {"volume": "local", "vfid": str(files), "relpath": "."})
            assert status == 200 and [i["name"] for i in listing["items"]] == ["c"]
            status, listing = await manager_call(daemon, "POST", "/folder/file/list",
                                                 {"volume": "local", "vfid": str(clone), "relpath": "a"})
            assert status == 200 and [i["name"] for i in listing["items"]] == ["b"]
        finally:
            await side.close()

    run(go(), timeout=90)


def test_a_burst_of_deletes_is_handled_once_each(redis_server: RedisServer, daemon_factory: Any) -> None:
    """200 deletes while the manager's consumer reads: each handled once, the stream trimmed."""
    daemon: StorageProxyProcess = daemon_factory(
        extra_config={"redis": {"addr": redis_server.addr, "event-format": EVENT_FORMAT}})
    vfids = [new_vfid() for _ in range(200)]

    async def go() -> None:
        side = ManagerSide()
        await side.start(redis_server)
        try:
            for vfid in vfids:
                status, _ = await manager_call(daemon, "POST", "/folder/create",
                                               {"volume": "local", "vfid": str(vfid), "options": {}})
                assert status == 204
            answers = await asyncio.gather(*(
                manager_call(daemon, "POST", "/folder/delete", {"volume": "local", "vfid": str(v)})
                for v in vfids))
            assert all(status == 202 for status, _ in answers)
            tasks = {uuid.UUID(body["bgtask_id"]) for _, body in answers}
            await side.wait(lambda: len(side.received[VFolderDeletionSuccessEvent]) >= len(vfids)
                            and all(side.terminal(t) for t in tasks), "every delete's events", timeout=60)
            handled = [e.vfid for e in side.received[VFolderDeletionSuccessEvent]]
            assert sorted(map(str, handled)) == sorted(map(str, vfids))  # each once, none lost
            assert all(len(side.terminal(t)) == 1 for t in tasks)
            # the stream is trimmed as upstream trims it (MAXLEN ~ 128)
            resp = redis_server.client(4)
            try:
                length = resp.command("XLEN", "events")
            finally:
                resp.close()
            assert length <= 128 + 100, length  # "~": Redis trims whole nodes (100 entries)
        finally:
            await side.close()

    run(go(), timeout=120)
