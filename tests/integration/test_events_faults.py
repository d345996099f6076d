"""Nothing lost: events made while Redis is down reach it later, also across a daemon restart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from support.redis import REDIS_SERVER, SKIP_REASON, RedisServer, stream_entries
from test_events_redis import create_vfolder, manager_call, new_vfid, wait_for

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)


def start(factory: Any, redis: RedisServer, tmp: Path) -> Any:
    return factory(extra_config={
        "redis": {"addr": redis.addr},
        "storage-proxy": {"state-dir": str(tmp)},
    })


def test_redis_down_during_delete_then_back(storage_proxy_factory: Any, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        daemon = start(storage_proxy_factory, redis, tmp_path / "state")
        vfid = new_vfid()
        path = create_vfolder(daemon, vfid)
        redis.stop()
        status, body = manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": vfid})
        assert status == 202  # Redis down never blocks the manager API
        wait_for(lambda: not path.exists(), what="the delete")
        wait_for(lambda: "Redis unreachable" in daemon.log, what="the daemon noticing")
        pending = (tmp_path / "state" / "events.outbox").read_text()
        assert "vfolder_deletion_success" in pending and "bgtask_done" in pending
        time.sleep(0.5)
        redis.start()
        with redis.client() as c:
            entries = wait_for(lambda: stream_entries(c), timeout=20, what="the event after Redis came back")
            assert [e[b"name"] for e in entries] == [b"vfolder_deletion_success"]
            assert json.loads(entries[0][b"payload"]) == {"vfid": vfid}
            cached = wait_for(lambda: c.command("GET", f"bgtask.{body['bgtask_id']}"), what="the bgtask cache")
            assert json.loads(cached)["name"] == "bgtask_done"
        wait_for(lambda: "Redis reachable again" in daemon.log, what="the recovery log line")
    finally:
        redis.stop()


def test_restart_with_a_non_empty_outbox_delivers(storage_proxy_factory: Any, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")  # not started: the first daemon sees no Redis at all
    try:
        daemon = start(storage_proxy_factory, redis, tmp_path / "state")
        vfids = [new_vfid() for _ in range(3)]
        for vfid in vfids:
            create_vfolder(daemon, vfid)
            assert manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": vfid})[0] == 202
        outbox = tmp_path / "state" / "events.outbox"
        wait_for(lambda: outbox.exists() and outbox.read_text().count("vfolder_deletion_success") == 3,
                 what="three deletions in the outbox")
        daemon.kill()  # SIGKILL: nothing is flushed at stop
        redis.start()
        daemon.start()
        with redis.client() as c:
            entries = wait_for(lambda: len(stream_entries(c)) >= 3 and stream_entries(c), timeout=20,
                               what="the three events after the restart")
        assert [json.loads(e[b"payload"])["vfid"] for e in entries] == vfids  # in order
        assert all(e[b"name"] == b"vfolder_deletion_success" for e in entries)
        # Acknowledged: a further restart sends nothing again.
        wait_for(lambda: daemon.log.count("event(s) from the outbox") == 1, what="the replay log line")
        time.sleep(0.3)
        daemon.restart()
        time.sleep(1.0)
        with redis.client() as c:
            assert len(stream_entries(c)) == 3
    finally:
        redis.stop()
