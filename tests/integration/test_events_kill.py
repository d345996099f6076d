"""A daemon SIGKILLed in the middle of a background task finishes it cleanly after its restart.

The task journal (``state-dir/tasks.journal``) says which tasks were running:
a delete runs again under its task id and sends its events; a clone removes
its partial destination and sends ``vfolder_clone_failure``.  Either way the
task's events arrive exactly as for an uninterrupted task, once.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.redis import FAULT_SUITE, REDIS_SERVER, SKIP_REASON, RedisServer, stream_entries
from test_events_redis import create_vfolder, manager_call, new_vfid, wait_for

from storage.vfid import VFolderID

pytestmark = [FAULT_SUITE, pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)]

FILES = 6000


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def start(factory: Any, redis: RedisServer, state: Path) -> Any:
    return factory(extra_config={"redis": {"addr": redis.addr}, "storage-proxy": {"state-dir": str(state)}})


def fill(path: Path, n: int = FILES) -> None:
    for d in range(n // 500):
        sub = path / f"d{d}"
        sub.mkdir()
        for i in range(500):
            (sub / f"f{i}").write_bytes(b"y")


def bgtask(daemon: Any, task_id: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=10)
    conn.request("GET", f"/bgtask/{task_id}", headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    return body


def kill_when_running(daemon: Any, task_id: str) -> bool:
    """SIGKILL once the task has made progress; False if it ended first."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = bgtask(daemon, task_id)
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


def test_kill_during_delete_then_restart_completes_it(storage_proxy_factory: Any, redis_server: RedisServer,
                                                      tmp_path: Path) -> None:
    daemon = start(storage_proxy_factory, redis_server, tmp_path / "state")
    vfid = new_vfid()
    path = create_vfolder(daemon, vfid, files=0)
    fill(path)
    status, body = manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": vfid})
    assert status == 202
    task_id = body["bgtask_id"]
    killed = kill_when_running(daemon, task_id)
    if killed:
        assert path.exists()  # killed part-way
        daemon.start()
        wait_for(lambda: "resuming background task delete-vfolder " + task_id in daemon.log, what="the resume")
    done = wait_for(lambda: terminal(redis_server, task_id), timeout=20, what="the terminal event")
    assert done["name"] == "bgtask_done"
    assert json.loads(done["payload"])["task_id"] == task_id
    assert not path.exists()
    with redis_server.client() as c:
        entries = stream_entries(c)
    assert [(e[b"name"], json.loads(e[b"payload"])) for e in entries] == [(b"vfolder_deletion_success", {"vfid": vfid})]
    # Nothing is resumed twice.
    daemon.restart()
    time.sleep(0.5)
    assert "resuming background task" not in daemon.log.split("storage-proxy ready")[-1]
    with redis_server.client() as c:
        assert len(stream_entries(c)) == 1


def test_kill_during_clone_removes_the_partial_copy(storage_proxy_factory: Any, redis_server: RedisServer,
                                                    tmp_path: Path) -> None:
    daemon = start(storage_proxy_factory, redis_server, tmp_path / "state")
    src, dst = new_vfid(), new_vfid()
    fill(create_vfolder(daemon, src, files=0))
    dst_path = daemon.volume_path("local") / VFolderID.parse(dst).relative_path()
    status, body = manager_call(daemon, "/folder/clone",
                                {"src_volume": "local", "src_vfid": src, "dst_volume": None, "dst_vfid": dst})
    assert status == 200
    task_id = body["bgtask_id"]
    if not kill_when_running(daemon, task_id):
        pytest.skip("the clone finished before it could be killed (a fast disk); nothing to recover")
    daemon.start()
    failed = wait_for(lambda: terminal(redis_server, task_id), timeout=20, what="the terminal event")
    assert failed["name"] == "bgtask_failed"
    assert not dst_path.exists()  # the partial copy is gone
    with redis_server.client() as c:
        entries = stream_entries(c)
    assert [e[b"name"] for e in entries] == [b"vfolder_clone_failure"]
    payload = json.loads(entries[0][b"payload"])
    assert payload["vfid"] == src and payload["dst_vfid"] == dst
    assert "stopped during the clone" in payload["message"]


def test_a_journaled_task_resumes_under_its_id(storage_proxy_factory: Any, redis_server: RedisServer,
                                               tmp_path: Path) -> None:
    """Deterministic: the journal a killed daemon left (a start, no end), then a start."""
    state = tmp_path / "state"
    daemon = start(storage_proxy_factory, redis_server, state)
    vfid, other = new_vfid(), new_vfid()
    path = create_vfolder(daemon, vfid)
    other_path = create_vfolder(daemon, other)
    daemon.stop()
    task_id = str(uuid.uuid4())
    files_task = str(uuid.uuid4())
    with open(state / "tasks.journal", "ab") as f:
        f.write(json.dumps({"start": files_task, "name": "delete-files", "attempt": 1,
                            "context": {"volume": "local", "vfid": other, "relpaths": ["f1.txt"],
                                        "recursive": False}}).encode() + b"\n")
        f.write(json.dumps({"start": task_id, "name": "delete-vfolder", "attempt": 1,
                            "context": {"volume": "local", "vfid": vfid}}).encode() + b"\n")
        f.write(b'{"start": "torn')  # a kill mid-write
    daemon.start()
    done = wait_for(lambda: terminal(redis_server, task_id), timeout=20, what="the resumed delete's end")
    assert done["name"] == "bgtask_done"
    files_done = wait_for(lambda: terminal(redis_server, files_task), timeout=20, what="the delete-files end")
    assert files_done["name"] == "bgtask_done"
    assert not path.exists()
    assert not (other_path / "f1.txt").exists() and (other_path / "f0.txt").exists()
    with redis_server.client() as c:
        assert [e[b"name"] for e in stream_entries(c)] == [b"vfolder_deletion_success"]


def test_a_task_that_keeps_killing_the_daemon_is_given_up(storage_proxy_factory: Any, redis_server: RedisServer,
                                                          tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    task_id = str(uuid.uuid4())
    vfid = new_vfid()
    (state / "tasks.journal").write_text(json.dumps({
        "start": task_id, "name": "delete-vfolder", "attempt": 3, "context": {"volume": "local", "vfid": vfid},
    }) + "\n")
    start(storage_proxy_factory, redis_server, state)
    failed = wait_for(lambda: terminal(redis_server, task_id), timeout=20, what="the given-up task's end")
    assert failed["name"] == "bgtask_failed"
    assert "giving up" in json.loads(failed["payload"])["message"]
    with redis_server.client() as c:
        [entry] = stream_entries(c)
    assert entry[b"name"] == b"vfolder_deletion_failure"


def test_sigterm_during_delete_resumes_it_at_the_next_start(storage_proxy_factory: Any, redis_server: RedisServer,
                                                            tmp_path: Path) -> None:
    daemon = start(storage_proxy_factory, redis_server, tmp_path / "state")
    vfid = new_vfid()
    path = create_vfolder(daemon, vfid, files=0)
    fill(path)
    status, body = manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": vfid})
    task_id = body["bgtask_id"]
    deadline = time.monotonic() + 10
    while bgtask(daemon, task_id)["progress"]["current"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    if bgtask(daemon, task_id)["status"] != "running":
        pytest.skip("the delete finished before the stop (a fast disk)")
    daemon.stop()  # SIGTERM: the running delete is interrupted, not failed
    assert "interrupted by the stop" in daemon.log
    assert path.exists()
    assert terminal(redis_server, task_id) is None  # no bgtask_cancelled, no failure
    daemon.start()
    done = wait_for(lambda: terminal(redis_server, task_id), timeout=20, what="the resumed delete's end")
    assert done["name"] == "bgtask_done"
    assert not path.exists()
    with redis_server.client() as c:
        assert [e[b"name"] for e in stream_entries(c)] == [b"vfolder_deletion_success"]
