"""The manager's event bus, end to end: the real daemon, a real redis-server.

Each test drives the manager API over HTTP (delete, clone, delete-async)
and reads what a manager would: the ``events`` stream of database 4
(XRANGE), the ``bgtask.<id>`` keys and a SUBSCRIBE on ``events_all``, for
each wire encoding (26.9, 26.8, 26.4), field by field.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
from support.daemon import StorageProxyProcess
from support.redis import REDIS_SERVER, SKIP_REASON, RedisServer, RespClient, stream_entries

from storage.vfid import VFolderID

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

METADATA = {
    "26.9": {"request_id": None, "user": None, "triggered_user": None, "traceparent": None},
    "26.8": {"request_id": None, "user": None, "triggered_user": None},
    "26.4": {"request_id": None, "user": None},
}


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def manager_call(daemon: StorageProxyProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=30)
    conn.request("POST", path, body=json.dumps(body),
                 headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (json.loads(data) if data else None)


def new_vfid() -> str:
    return f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"


def create_vfolder(daemon: StorageProxyProcess, vfid: str, files: int = 3) -> Path:
    status, _ = manager_call(daemon, "/folder/create", {"volume": "local", "vfid": vfid})
    assert status == 204
    path = daemon.volume_path("local") / VFolderID.parse(vfid).relative_path()
    for i in range(files):
        (path / f"f{i}.txt").write_bytes(b"x" * 100)
    return path


class Subscriber(threading.Thread):
    """SUBSCRIBE events_all in a thread; ``messages`` are the decoded JSON bodies."""

    def __init__(self, redis: RedisServer) -> None:
        super().__init__(daemon=True)
        self.client = RespClient(redis.port, timeout=30)
        self.client.command("SUBSCRIBE", "events_all")
        self.messages: list[dict[str, Any]] = []
        self.start()

    def run(self) -> None:
        try:
            while True:
                kind, _channel, data = self.client.read()
                if kind == b"message":
                    self.messages.append(json.loads(data))
        except (OSError, ConnectionError, ValueError):
            return

    def close(self) -> None:
        self.client.close()


def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def daemon_with_redis(factory: Any, redis: RedisServer, fmt: str | None = None, **redis_extra: Any):
    table: dict[str, Any] = {"addr": redis.addr, **redis_extra}
    if fmt is not None:
        table["event-format"] = fmt
    return factory(extra_config={"redis": table})


def decode_body(fields: dict[str, Any], fmt: str, broadcast: bool) -> Any:
    """The event's fields as the manager's library of line ``fmt`` decodes them."""
    if fmt == "26.9":
        return json.loads(fields["payload"])
    raw = fields["args"]
    packed = base64.b64decode(raw) if broadcast else raw
    return msgpack.unpackb(packed, raw=False)


def bgtask_messages(sub: Subscriber, task_id: str, fmt: str) -> list[tuple[str, Any]]:
    out = []
    for m in list(sub.messages):
        body = decode_body(m, fmt, broadcast=True)
        tid = body["task_id"] if fmt == "26.9" else body[0]
        if tid == task_id:
            out.append((m["name"], body))
    return out


def assert_broadcast_shape(message: dict[str, Any], fmt: str) -> None:
    expected_keys = ["name", "source", "payload" if fmt == "26.9" else "args", "metadata"]
    assert list(message) == expected_keys
    assert message["source"] == "storage"
    assert json.loads(message["metadata"]) == METADATA[fmt]
    assert list(json.loads(message["metadata"])) == list(METADATA[fmt])


@pytest.mark.parametrize("fmt", ["26.9", "26.8", "26.4"])
def test_delete_publishes_anycast_and_bgtask_events(storage_proxy_factory: Any, redis_server: RedisServer,
                                                    fmt: str) -> None:
    daemon = daemon_with_redis(storage_proxy_factory, redis_server, None if fmt == "26.9" else fmt)
    assert "no [redis] or [etcd] table" not in daemon.log
    vfid = new_vfid()
    path = create_vfolder(daemon, vfid)
    sub = Subscriber(redis_server)
    try:
        status, body = manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": vfid})
        assert status == 202
        task_id = body["bgtask_id"]
        with redis_server.client() as c:
            entries = wait_for(lambda: stream_entries(c), what="an entry in stream events")
            terminal = wait_for(lambda: [n for n, _ in bgtask_messages(sub, task_id, fmt) if n != "bgtask_updated"],
                                what="the terminal bgtask event")
            cached = c.command("GET", f"bgtask.{task_id}")
            ttl = c.command("TTL", f"bgtask.{task_id}")
        assert not path.exists()
        assert len(entries) == 1
        entry = entries[0]
        body_field = b"payload" if fmt == "26.9" else b"args"
        assert list(entry) == [b"name", b"source", body_field, b"metadata"]
        assert entry[b"name"] == b"vfolder_deletion_success"
        assert entry[b"source"] == b"storage"
        assert json.loads(entry[b"metadata"]) == METADATA[fmt]
        if fmt == "26.9":
            assert entry[b"payload"] == json.dumps({"vfid": vfid}, separators=(",", ":")).encode()
        else:
            assert msgpack.unpackb(entry[b"args"], raw=False) == [vfid]

        assert terminal == ["bgtask_done"]
        messages = bgtask_messages(sub, task_id, fmt)
        names = [n for n, _ in messages]
        assert names[0] == "bgtask_updated" and names[-1] == "bgtask_done"
        assert set(names[:-1]) == {"bgtask_updated"} and len(names) >= 3  # start, end, done
        for m in sub.messages:
            assert_broadcast_shape(m, fmt)
        first, done = messages[0][1], messages[-1][1]
        if fmt == "26.9":
            assert json.loads(sub.messages[0]["payload"]) == first
            assert first == {"task_id": task_id, "current_progress": 0.0, "total_progress": 0.0,
                             "message": "Task started"}
            assert isinstance(first["current_progress"], float)
            assert done == {"task_id": task_id, "message": "Task completed successfully"}
        else:
            assert first == [task_id, 0, 0, "Task started"]
            assert done == [task_id, "Task completed successfully"]
        # The cache key holds the last message, for 300 s.
        assert json.loads(cached)["name"] == "bgtask_done"
        assert 0 < ttl <= 300
    finally:
        sub.close()


def test_clone_success_and_failure(storage_proxy_factory: Any, redis_server: RedisServer) -> None:
    daemon = daemon_with_redis(storage_proxy_factory, redis_server)
    src, dst = new_vfid(), new_vfid()
    create_vfolder(daemon, src)
    sub = Subscriber(redis_server)
    try:
        status, body = manager_call(daemon, "/folder/clone",
                                    {"src_volume": "local", "src_vfid": src, "dst_volume": None, "dst_vfid": dst})
        assert status == 200
        task_id = body["bgtask_id"]
        with redis_server.client() as c:
            entries = wait_for(lambda: stream_entries(c), what="the clone event")
        assert entries[0][b"name"] == b"vfolder_clone_success"
        assert entries[0][b"payload"] == json.dumps({"vfid": src, "dst_vfid": dst}, separators=(",", ":")).encode()
        wait_for(lambda: any(n == "bgtask_done" for n, _ in bgtask_messages(sub, task_id, "26.9")), what="done")

        # A clone that fails in its task: the destination's parent is a file.
        src2 = new_vfid()
        create_vfolder(daemon, src2)
        dst2 = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
        blocker = daemon.volume_path("local") / VFolderID.parse(dst2).relative_path().parts[0]
        blocker.write_bytes(b"not a directory")
        status, body = manager_call(daemon, "/folder/clone",
                                    {"src_volume": "local", "src_vfid": src2, "dst_volume": None, "dst_vfid": dst2})
        assert status == 200
        task2 = body["bgtask_id"]
        with redis_server.client() as c:
            entries = wait_for(lambda: stream_entries(c)[1:], what="the clone failure event")
        assert entries[0][b"name"] == b"vfolder_clone_failure"
        payload = json.loads(entries[0][b"payload"])
        assert list(payload) == ["vfid", "dst_vfid", "message"]
        assert payload["vfid"] == src2 and payload["dst_vfid"] == dst2 and payload["message"]
        failed = wait_for(lambda: [b for n, b in bgtask_messages(sub, task2, "26.9") if n == "bgtask_failed"],
                          what="bgtask_failed")
        assert failed[0]["task_id"] == task2
        # bgtask_failed carries repr(exception), the vfolder event its message.
        assert failed[0]["message"].endswith(")") and "(" in failed[0]["message"]
        assert payload["message"] in failed[0]["message"]
    finally:
        sub.close()


def test_delete_files_async_sends_only_bgtask_events(storage_proxy_factory: Any, redis_server: RedisServer) -> None:
    daemon = daemon_with_redis(storage_proxy_factory, redis_server, "26.8")
    vfid = new_vfid()
    path = create_vfolder(daemon, vfid)
    sub = Subscriber(redis_server)
    try:
        status, body = manager_call(daemon, "/folder/file/delete-async",
                                    {"volume": "local", "vfid": vfid, "relpaths": ["f0.txt"], "recursive": False})
        assert status == 202
        task_id = body["bgtask_id"]
        done = wait_for(lambda: [b for n, b in bgtask_messages(sub, task_id, "26.8") if n == "bgtask_done"],
                        what="bgtask_done")
        assert done == [[task_id, "Task completed successfully"]]
        assert not (path / "f0.txt").exists()
        with redis_server.client() as c:
            assert stream_entries(c) == []
    finally:
        sub.close()


def test_without_redis_table_the_daemon_says_so_once(storage_proxy: StorageProxyProcess) -> None:
    assert storage_proxy.log.count("no [redis] or [etcd] table") == 1


def test_redis_flushed_between_tasks(storage_proxy_factory: Any, redis_server: RedisServer) -> None:
    daemon = daemon_with_redis(storage_proxy_factory, redis_server)
    first, second = new_vfid(), new_vfid()
    for vfid in (first, second):
        create_vfolder(daemon, vfid)
    assert manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": first})[0] == 202
    with redis_server.client() as c:
        wait_for(lambda: stream_entries(c), what="the first event")
        assert c.command("FLUSHALL") == b"OK"
        assert manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": second})[0] == 202
        [entry] = wait_for(lambda: stream_entries(c), what="the event after the flush")
    assert json.loads(entry[b"payload"]) == {"vfid": second}


def test_redis_with_a_password(storage_proxy_factory: Any, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis-pw", password="s3cret").start()
    try:
        daemon = daemon_with_redis(storage_proxy_factory, server, password="s3cret")
        vfid = new_vfid()
        create_vfolder(daemon, vfid)
        assert manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": vfid})[0] == 202
        with server.client() as c:
            [entry] = wait_for(lambda: stream_entries(c), what="the event")
        assert entry[b"name"] == b"vfolder_deletion_success"
        assert "s3cret" not in daemon.log
    finally:
        server.stop()
