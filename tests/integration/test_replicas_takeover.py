"""A replica SIGKILLed in the middle of a delete or a clone: a live replica over the
same volume finishes or fails the task at once, and the manager gets its events.

Real daemons (distinct node ids, one shared volume, so sibling state dirs
``<volume>/.storage-proxy/state/<node-id>``) and a real redis-server.  No
restart of the killed replica is needed: a survivor finds its owner lock
free, takes over its journal and outbox (exactly one survivor does), runs
the delete again or fails the clone, and sends the events.  The same on
CephFS, two ceph-fuse clients: ``tests/backends/cephfs/test_replicas.py``.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.redis import FAULT_SUITE, REDIS_SERVER, SKIP_REASON, RedisServer, stream_entries
from support.replicas import manager_call, replica, wait_for

from storage.vfid import VFolderID

pytestmark = [FAULT_SUITE, pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)]

FILES = 6000
TAKEOVER_LOG = "takeover: the replica of"


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def new_vfid() -> str:
    return f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"


def call(daemon: Any, path: str, body: dict[str, Any], method: str = "POST") -> tuple[int, Any]:
    return manager_call(daemon.manager_port, daemon.manager_secret, path, body, method)


def create_vfolder(daemon: Any, shared: Path, vfid: str, files: int) -> Path:
    status, _ = call(daemon, "/folder/create", {"volume": "local", "vfid": vfid})
    assert status == 204
    path = shared / VFolderID.parse(vfid).relative_path()
    for d in range(files // 500):
        sub = path / f"d{d}"
        sub.mkdir()
        for i in range(500):
            (sub / f"f{i}").write_bytes(b"y")
    return path


def kill_when_running(daemon: Any, task_id: str) -> bool:
    """SIGKILL once the task has made progress; False if it ended first."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, state = call(daemon, f"/bgtask/{task_id}", {}, "GET")
        assert status == 200
        if state["status"] != "running":
            return False
        if state["progress"]["current"] > 0:
            daemon.kill()
            return True
        time.sleep(0.005)
    raise AssertionError("the task made no progress")


def terminal(redis: RedisServer, task_id: str) -> Any:
    with redis.client() as c:
        raw = c.command("GET", f"bgtask.{task_id}")
    message = json.loads(raw) if raw else None
    return message if message and message["name"] != "bgtask_updated" else None


def takers(daemons: list[Any]) -> list[Any]:
    return [d for d in daemons if TAKEOVER_LOG in d.log]


def test_a_dead_replicas_delete_is_finished_by_exactly_one_survivor(
        storage_proxy_factory: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    a, b, c = (replica(storage_proxy_factory, shared, f"replica-{n}", redis_server) for n in "abc")
    for _attempt in range(3):
        vfid = new_vfid()
        path = create_vfolder(a, shared, vfid, FILES)
        status, body = call(a, "/folder/delete", {"volume": "local", "vfid": vfid})
        assert status == 202
        task_id = body["bgtask_id"]
        if kill_when_running(a, task_id):
            break
        wait_for(lambda: terminal(redis_server, task_id), what="the delete that ended before the kill")  # noqa: B023
    else:
        pytest.fail("every delete finished before it could be killed")
    killed_at = time.monotonic()
    assert path.exists()  # killed part-way
    done = wait_for(lambda: terminal(redis_server, task_id), timeout=30, what="the survivor's terminal event")
    took = time.monotonic() - killed_at
    assert done["name"] == "bgtask_done"
    assert json.loads(done["payload"])["task_id"] == task_id
    assert not path.exists()
    assert took < 15, f"the takeover took {took:.1f}s"  # a probe a second, no lease to expire
    assert len(takers([b, c])) == 1, "exactly one survivor takes the dead replica over"
    taker = takers([b, c])[0]
    status, polled = call(taker, f"/bgtask/{task_id}", {}, "GET")
    assert status == 200 and polled["status"] == "done"
    with redis_server.client() as r:
        entries = [(e[b"name"], json.loads(e[b"payload"])) for e in stream_entries(r)]
    assert entries.count((b"vfolder_deletion_success", {"vfid": vfid})) == 1
    # The killed replica restarts with an empty journal: nothing runs twice.
    a.start()
    time.sleep(1.5)
    assert "resuming background task" not in a.log.split("storage-proxy ready")[-1]
    with redis_server.client() as r:
        assert len([e for e in stream_entries(r) if json.loads(e[b"payload"]).get("vfid") == vfid]) == 1


def test_a_dead_replicas_clone_is_failed_by_a_survivor(
        storage_proxy_factory: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    a, b = (replica(storage_proxy_factory, shared, f"replica-{n}", redis_server) for n in "ab")
    src = new_vfid()
    create_vfolder(a, shared, src, FILES)
    for _attempt in range(3):
        dst = new_vfid()
        dst_path = shared / VFolderID.parse(dst).relative_path()
        status, body = call(a, "/folder/clone",
                            {"src_volume": "local", "src_vfid": src, "dst_volume": None, "dst_vfid": dst})
        assert status == 200
        task_id = body["bgtask_id"]
        if kill_when_running(a, task_id):
            break
        wait_for(lambda: terminal(redis_server, task_id), what="the clone that ended before the kill")  # noqa: B023
    else:
        pytest.skip("every clone finished before it could be killed (a fast disk); nothing to take over")
    failed = wait_for(lambda: terminal(redis_server, task_id), timeout=30, what="the survivor's terminal event")
    assert failed["name"] == "bgtask_failed"
    assert not dst_path.exists()  # the partial copy is gone
    assert takers([b]) == [b]
    with redis_server.client() as r:
        clones = [json.loads(e[b"payload"]) for e in stream_entries(r) if e[b"name"] == b"vfolder_clone_failure"]
    assert [(p["vfid"], p["dst_vfid"]) for p in clones] == [(src, dst)]
    assert "stopped during the clone" in clones[0]["message"]


def test_undelivered_events_of_a_dead_replica_are_delivered_by_a_survivor(
        storage_proxy_factory: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    """Redis down while A's delete ends: its events wait in A's outbox; A is killed;
    Redis comes back; B delivers them (and does not run the finished delete again)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    a, b = (replica(storage_proxy_factory, shared, f"replica-{n}", redis_server) for n in "ab")
    vfid = new_vfid()
    path = create_vfolder(a, shared, vfid, 0)
    redis_server.stop()
    status, body = call(a, "/folder/delete", {"volume": "local", "vfid": vfid})
    assert status == 202
    task_id = body["bgtask_id"]
    wait_for(lambda: call(a, f"/bgtask/{task_id}", {}, "GET")[1]["status"] == "done", what="the delete")
    assert not path.exists()
    a.kill()
    redis_server.start()
    done = wait_for(lambda: terminal(redis_server, task_id), timeout=30, what="the forwarded terminal event")
    assert done["name"] == "bgtask_done"
    with redis_server.client() as r:
        assert [e[b"name"] for e in stream_entries(r)] == [b"vfolder_deletion_success"]
    assert takers([b]) == [b]
    assert "resuming background task" not in b.log


def test_two_daemons_with_one_node_id_over_one_volume_refuse_to_share_its_state(
        storage_proxy_factory: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    replica(storage_proxy_factory, shared, "same", redis_server)
    second = replica(storage_proxy_factory, shared, "same", redis_server, start=False)
    result = second.run_to_completion(timeout=30)
    assert result.returncode != 0
    assert "is held by another live daemon" in result.stderr + result.stdout
    assert "node-id" in result.stderr
