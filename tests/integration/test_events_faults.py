"""Nothing lost: events made while Redis is down reach it later, also across a daemon restart."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.redis import (
    FAULT_SUITE,
    REDIS_SERVER,
    SKIP_REASON,
    RedisServer,
    RespClient,
    stream_entries,
)
from test_events_redis import create_vfolder, daemon_with_redis, manager_call, new_vfid, wait_for

pytestmark = [FAULT_SUITE, pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)]


def get(daemon: Any, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def bus_check(daemon: Any, path: str) -> tuple[int, dict[str, Any]]:
    status, data = get(daemon, path)
    body = json.loads(data)
    [check] = [c for c in body["connectivity"]["connectivity_checks"] if c["service_group"] == "redis"]
    assert check["component_id"] == "stream"
    return status, check


def metric(daemon: Any, name: str, labels: str = "") -> float:
    _, data = get(daemon, "/metrics")
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(pattern, data.decode(), re.M)
    return float(m.group(1)) if m else 0.0


def start(factory: Any, redis: RedisServer, tmp: Path) -> Any:
    return factory(extra_config={
        "redis": {"addr": redis.addr},
        "storage-proxy": {"state-dir": str(tmp)},
    })


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis-burst").start()
    yield server
    server.stop()


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
        # The probes and /metrics say so.
        status, check = bus_check(daemon, "/health")
        assert status == 200 and check["is_healthy"] is False and "Redis unreachable" in check["error_message"]
        assert bus_check(daemon, "/readyz")[0] == 503
        assert bus_check(daemon, "/livez")[0] == 200  # a restart would not bring Redis back
        assert metric(daemon, "storage_proxy_event_bus_connected") == 0
        assert metric(daemon, "storage_proxy_events_queued_total", 'name="vfolder_deletion_success"') == 1
        assert metric(daemon, "storage_proxy_events_outbox_pending") == 2
        time.sleep(0.5)
        redis.start()
        with redis.client() as c:
            entries = wait_for(lambda: stream_entries(c), timeout=20, what="the event after Redis came back")
            assert [e[b"name"] for e in entries] == [b"vfolder_deletion_success"]
            assert json.loads(entries[0][b"payload"]) == {"vfid": vfid}
            cached = wait_for(lambda: c.command("GET", f"bgtask.{body['bgtask_id']}"), what="the bgtask cache")
            assert json.loads(cached)["name"] == "bgtask_done"
        wait_for(lambda: "Redis reachable again" in daemon.log, what="the recovery log line")
        wait_for(lambda: bus_check(daemon, "/readyz")[0] == 200, what="ready")
        status, check = bus_check(daemon, "/readyz")
        assert status == 200 and check["is_healthy"] is True and check["error_message"] is None
        assert metric(daemon, "storage_proxy_events_sent_total", 'name="vfolder_deletion_success"') == 1
        assert metric(daemon, "storage_proxy_events_sent_total", 'name="bgtask_done"') == 1
        assert metric(daemon, "storage_proxy_events_outbox_pending") == 0
        assert metric(daemon, "storage_proxy_event_bus_connected") == 1
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


def test_a_burst_of_200_deletes_while_a_consumer_reads(storage_proxy_factory: Any, redis_server: RedisServer) -> None:
    daemon = daemon_with_redis(storage_proxy_factory, redis_server)
    vfids = [new_vfid() for _ in range(200)]
    for vfid in vfids:
        create_vfolder(daemon, vfid, files=1)
    seen: list[str] = []
    stop = threading.Event()

    def consume() -> None:
        with RespClient(redis_server.port, db=4, timeout=10) as c:
            last = "0"
            while not stop.is_set():
                reply = c.command("XREAD", "COUNT", "500", "BLOCK", "200", "STREAMS", "events", last)
                for _stream, entries in reply or []:
                    for entry_id, flat in entries:
                        last = entry_id.decode()
                        fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
                        assert fields[b"name"] == b"vfolder_deletion_success"
                        seen.append(json.loads(fields[b"payload"])["vfid"])

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        for vfid in vfids:
            assert manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": vfid})[0] == 202
        wait_for(lambda: len(seen) >= 200, timeout=60, what="200 events read")
    finally:
        stop.set()
        reader.join(5)
    assert sorted(seen) == sorted(vfids)  # every one, none twice
    with redis_server.client() as c:
        length = c.command("XLEN", "events")
    assert 128 <= length < 200  # trimmed as upstream trims it (MAXLEN ~ 128)
