"""Our events, consumed by the manager's own event bus code (backend.ai-common 26.9.6).

A real redis-server on a loopback port; the daemon points at it with
``[redis] addr``; the manager side is common's ``RedisQueue`` with the
arguments the manager's ``MessageQueueDependency`` gives it (anycast stream
``events``, broadcast channel ``events_all``, consumer group ``manager``,
database 4) under common's ``EventDispatcher``, with the event classes the
manager registers (``consume`` for the vfolder anycast events, ``subscribe``
for the bgtask broadcasts).  The test deletes, clones and deletes files
through the daemon with the manager's own client, and each task must reach a
handler as the right event class with the right vfid and task id.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from ai.backend.common.defs import REDIS_STREAM_DB
from ai.backend.common.dto.storage.request import FileDeleteAsyncRequest
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
from harness import manager_for, run
from support.daemon import StorageProxyProcess
from support.redis import REDIS_SERVER, SKIP_REASON, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

VFOLDER_EVENTS = (VFolderDeletionSuccessEvent, VFolderDeletionFailureEvent,
                  VFolderCloneSuccessEvent, VFolderCloneFailureEvent)
BGTASK_EVENTS = (BgtaskUpdatedEvent, BgtaskDoneEvent, BgtaskFailedEvent,
                 BgtaskCancelledEvent, BgtaskPartialSuccessEvent)
TERMINAL = (BgtaskDoneEvent, BgtaskFailedEvent, BgtaskCancelledEvent, BgtaskPartialSuccessEvent)


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
    daemon: StorageProxyProcess = daemon_factory(extra_config={"redis": {"addr": redis_server.addr}})
    deleted, source, clone, files = new_vfid(), new_vfid(), new_vfid(), new_vfid()

    async def go() -> None:
        side = ManagerSide()
        await side.start(redis_server)
        try:
            async with manager_for(daemon) as (_sm, client):
                for vfid in (deleted, source, files):
                    await client.create_folder("local", str(vfid))
                    await client.mkdir(volume="local", vfid=str(vfid), relpath=["a/b", "c"], exist_ok=False)

                t_delete = (await client.delete_folder("local", str(deleted)))
                # the manager's delete_folder returns nothing: the task is found by its vfid
                t_clone = (await client.clone_folder("local", str(source), "local", str(clone))).bgtask_id
                missing = new_vfid()
                t_clone_fail = (await client.clone_folder("local", str(missing), "local", str(new_vfid()))).bgtask_id
                t_files = (await client.delete_files_async(FileDeleteAsyncRequest(
                    volume="local", vfid=files, relpaths=[Path("a")], recursive=True))).bgtask_id
                assert t_delete is None

                # the vfolder anycast events, consumed by group "manager"
                await side.wait(lambda: side.received[VFolderDeletionSuccessEvent]
                                and side.received[VFolderCloneSuccessEvent]
                                and side.received[VFolderCloneFailureEvent], "the vfolder events")
                [deletion] = side.vfolder_events(deleted)
                assert type(deletion) is VFolderDeletionSuccessEvent
                [cloned] = side.vfolder_events(source)
                assert type(cloned) is VFolderCloneSuccessEvent and cloned.dst_vfid == clone
                [failed] = side.vfolder_events(missing)
                assert type(failed) is VFolderCloneFailureEvent and failed.message

                # the bgtask broadcasts: exactly one terminal event per task, of the right class
                await side.wait(lambda: all(side.terminal(t) for t in (t_clone, t_clone_fail, t_files)),
                                "a terminal bgtask event for each task")
                assert [type(e) for e in side.terminal(t_clone)] == [BgtaskDoneEvent]
                assert [type(e) for e in side.terminal(t_clone_fail)] == [BgtaskFailedEvent]
                assert [type(e) for e in side.terminal(t_files)] == [BgtaskDoneEvent]
                updated = {e.task_id for e in side.received[BgtaskUpdatedEvent]}
                assert {t_clone, t_clone_fail, t_files} <= updated
                # the delete's task: the one terminal event left, a BgtaskDoneEvent
                others = [e for cls in TERMINAL for e in side.received[cls]
                          if e.task_id not in (t_clone, t_clone_fail, t_files)]
                assert [type(e) for e in others] == [BgtaskDoneEvent]

                # and the filesystem agrees with what the events say
                root = Path((await client.get_mount_path("local", str(clone)))["path"])
                assert (root / "a" / "b").is_dir() and (root / "c").is_dir()
                assert [i["name"] for i in (await client.list_files("local", str(files), "."))["items"]] == ["c"]
        finally:
            await side.close()

    run(go(), timeout=90)
