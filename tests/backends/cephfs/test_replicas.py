"""Replicas over one CephFS behind a real HAProxy (round robin, no stickiness).

Replica A serves the volume through the session's ceph-fuse mount, replica B
through a second ceph-fuse mount of the same filesystem (a second CephFS
client, as on another host): what one writes the other sees through the
MDS, and the upload locks (flock) exclude across the two clients.  Every
upload's bytes are checked through both mounts; no daemon answers 5xx; no
upload is blocked after a kill.

Runs in the cephfs CI stage (``.ci/cephfs-tests``, which sets ``$CEPHFS_MNT``)
or with ``STORAGE_PROXY_REPLICAS=1``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import storage_proxy_factory as storage_proxy_factory  # noqa: F401 (a fixture)
from support.redis import REDIS_SERVER, RedisServer, stream_entries
from support.replicas import HAPROXY, HAPROXY_SKIP, HAProxy, manager_call, replica, wait_for

from storage.vfid import VFolderID

pytestmark = [
    pytest.mark.cephfs,
    pytest.mark.skipif(not (os.environ.get("CEPHFS_MNT") or os.environ.get("STORAGE_PROXY_REPLICAS")),
                       reason="the replica tests run in the cephfs CI stage (.ci/cephfs-tests sets CEPHFS_MNT) "
                              "or with STORAGE_PROXY_REPLICAS=1"),
    pytest.mark.skipif(HAPROXY is None, reason=HAPROXY_SKIP),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

TUS = {"Tus-Resumable": "1.0.0"}


@dataclass
class Rig:
    a: Any
    b: Any
    lb: HAProxy
    redis: RedisServer
    mounts: dict[str, Path]  # replica name -> its view of the shared dir
    answers: list[tuple[str, int, str]] = field(default_factory=list)  # (what, status, served by)

    def daemon(self, name: str) -> Any:
        return self.a if name == "a" else self.b

    def manager(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        return manager_call(self.lb.manager_port, self.a.manager_secret, path, body)

    def new_vfolder(self) -> VFolderID:
        vfid = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")
        status, body = self.manager("/folder/create", {"volume": "local", "vfid": str(vfid)})
        assert status == 204, body
        return vfid

    def token(self, vfid: VFolderID, relpath: str, size: int) -> str:
        status, body = self.manager("/folder/file/upload",
                                    {"volume": "local", "vfid": str(vfid), "relpath": relpath, "size": size})
        assert status == 200, body
        return str(body["token"])

    def record(self, what: str, status: int, served_by: str) -> None:
        self.answers.append((what, status, served_by))
        assert status < 500, (what, status, served_by)


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (so round robin is per request)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def patch(rig: Rig, port: int, token: str, offset: int, data: bytes) -> tuple[int, dict[str, str]]:
    headers = dict(TUS, **{"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)})
    status, h, _ = request(port, "PATCH", f"/upload?token={token}", data, headers)
    rig.record("PATCH", status, h.get("x-served-by", "direct"))
    return status, h


def head(rig: Rig, port: int, token: str) -> tuple[int, int]:
    status, h, _ = request(port, "HEAD", f"/upload?token={token}", headers=TUS)
    rig.record("HEAD", status, h.get("x-served-by", "direct"))
    return status, int(h.get("upload-offset", -1))


def target(mount: Path, vfid: VFolderID, relpath: str) -> Path:
    return mount / vfid.relative_path() / relpath


def staging(mount: Path, vfid: VFolderID, token: str) -> Path:
    import jwt

    session = jwt.decode(token, options={"verify_signature": False})["session"]
    return mount / vfid.relative_path() / ".upload" / session


def assert_bytes_everywhere(rig: Rig, vfid: VFolderID, relpath: str, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    for name, mount in rig.mounts.items():
        # Another client sees a new name after its kernel's dentry cache is told
        # (ceph-fuse invalidates it asynchronously: 10-30 ms measured).
        wait_for(target(mount, vfid, relpath).exists, timeout=5, what=f"{relpath} through {name}")
        got = target(mount, vfid, relpath).read_bytes()
        assert len(got) == len(data) and hashlib.sha256(got).hexdigest() == digest, f"{relpath} through {name}"
    # And through a replica's download, behind the load balancer.
    status, body = rig.manager("/folder/file/download", {"volume": "local", "vfid": str(vfid), "relpath": relpath})
    assert status == 200, body
    status, _, got = request(rig.lb.client_port, "GET", f"/download?token={body['token']}")
    assert status == 200 and hashlib.sha256(got).hexdigest() == digest


@pytest.fixture
def rig(storage_proxy_factory: Any, cephfs_dir: Path, cephfs_second_mount: Path, tmp_path: Path) -> Iterator[Rig]:
    shared_b = cephfs_second_mount / cephfs_dir.name
    wait_for(shared_b.is_dir, timeout=10, what="the test dir through the second client")
    redis = RedisServer(tmp_path / "redis").start()
    a = replica(storage_proxy_factory, cephfs_dir, "replica-a", redis, backend="cephfs")
    b = replica(storage_proxy_factory, shared_b, "replica-b", redis, backend="cephfs")
    lb = HAProxy(tmp_path / "haproxy", clients=[("a", a.client_port), ("b", b.client_port)],
                 managers=[("a", a.manager_port), ("b", b.manager_port)]).start()
    try:
        yield Rig(a, b, lb, redis, {"a": cephfs_dir, "b": shared_b})
    finally:
        lb.stop()
        redis.stop()


def test_patches_alternating_between_replicas_complete_byte_exact(rig: Rig) -> None:
    vfid = rig.new_vfolder()
    uploads = {f"dir/file{i}.bin": os.urandom(3 << 20) for i in range(6)}
    served: dict[str, list[str]] = {relpath: [] for relpath in uploads}
    errors: list[BaseException] = []

    def upload(relpath: str, data: bytes) -> None:
        try:
            token = rig.token(vfid, relpath, len(data))
            offset, chunk = 0, 512 << 10
            while offset < len(data):
                status, h = patch(rig, rig.lb.client_port, token, offset, data[offset:offset + chunk])
                assert status == 204, status
                served[relpath].append(h["x-served-by"])
                offset = int(h["upload-offset"])
            status, at = head(rig, rig.lb.client_port, token)
            assert (status, at) == (200, len(data))
        except BaseException as exc:  # reported below
            errors.append(exc)

    items = list(uploads.items())
    # One at a time: round robin sends each PATCH of an upload to the other replica.
    for item in items[:2]:
        upload(*item)
    assert not errors, errors
    for relpath, _ in items[:2]:
        order = served[relpath]
        assert all(x != y for x, y in zip(order, order[1:], strict=False)), order  # a, b, a, b, ...
    # Four at once: their PATCHes interleave over both replicas in any order.
    threads = [threading.Thread(target=upload, args=item) for item in items[2:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert {by for relpath, _ in items[2:] for by in served[relpath]} == {"a", "b"}
    for relpath, data in uploads.items():
        assert_bytes_everywhere(rig, vfid, relpath, data)


@pytest.mark.skipif(os.environ.get("STORAGE_PROXY_REPLICA_RACE") != "1",
                    reason="known to hang, not in CI (docs/replicas.md): set STORAGE_PROXY_REPLICA_RACE=1")
def test_two_patches_at_two_replicas_at_once_one_writes_the_other_is_refused(rig: Rig) -> None:
    vfid = rig.new_vfolder()
    # Deterministic overlap: A's PATCH is in and holds the lock (bytes staged) when B's comes.
    data = os.urandom(2 << 20)
    token = rig.token(vfid, "held.bin", len(data))
    s = socket.create_connection(("127.0.0.1", rig.a.client_port), timeout=60)
    s.sendall(f"PATCH /upload?token={token} HTTP/1.1\r\nHost: a\r\nTus-Resumable: 1.0.0\r\n"
              f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:4096])
    path = staging(rig.mounts["b"], vfid, token)
    wait_for(lambda: path.exists() and path.stat().st_size >= 4096, timeout=20, what="A writing")
    t0 = time.monotonic()
    status, _ = patch(rig, rig.b.client_port, token, 0, os.urandom(1 << 20))
    assert status in (409, 423), status
    assert time.monotonic() - t0 < 3.0  # at once: no lease, no waiting for A
    s.sendall(data[4096:])
    assert b" 204 " in s.recv(4096)
    s.close()
    assert_bytes_everywhere(rig, vfid, "held.bin", data)


@pytest.mark.skipif(os.environ.get("STORAGE_PROXY_REPLICA_RACE") != "1",
                    reason="known flaky, not in CI (docs/replicas.md): set STORAGE_PROXY_REPLICA_RACE=1")
def test_two_patches_racing_at_two_replicas_one_wins_never_interleaved(rig: Rig) -> None:
    # Both PATCHes of the same offset sent together, 8 rounds.  In about 1 run
    # of 5 the winner's next open(2) in a .upload/ the other client removed and
    # made again blocked 30 s on this ceph-fuse and failed with ENOENT (a 500);
    # no bytes ever interleaved.  Not understood yet.
    vfid = rig.new_vfolder()
    for round_ in range(8):
        size = 1 << 20
        token = rig.token(vfid, f"race{round_}.bin", size)
        bodies = {"a": os.urandom(size), "b": os.urandom(size)}
        statuses: dict[str, int] = {}
        barrier = threading.Barrier(2)

        def send(name: str, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            statuses[name] = patch(rig, rig.daemon(name).client_port, token, 0, bodies[name])[0]  # noqa: B023

        threads = [threading.Thread(target=send, args=(n,)) for n in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [n for n, st in statuses.items() if st == 204]
        assert len(winners) == 1, statuses
        loser = "b" if winners[0] == "a" else "a"
        assert statuses[loser] in (409, 423), statuses
        assert_bytes_everywhere(rig, vfid, f"race{round_}.bin", bodies[winners[0]])  # never interleaved


def stream_patch(port: int, token: str, offset: int, data: bytes, rate: int) -> socket.socket:
    """Start a PATCH and keep sending at about ``rate`` bytes/s from a thread; the socket."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"PATCH /upload?token={token} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
              f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode())

    def pump() -> None:
        step = 64 << 10
        try:
            for i in range(0, len(data), step):
                s.sendall(data[i:i + step])
                time.sleep(step / rate)
        except OSError:
            pass  # the replica was killed

    threading.Thread(target=pump, daemon=True).start()
    return s


def test_a_replica_killed_mid_patch_the_upload_resumes_on_the_other_at_once(rig: Rig) -> None:
    vfid = rig.new_vfolder()
    rng = random.Random(12)
    for round_ in range(4):
        victim = rig.daemon("ab"[round_ % 2])
        data = os.urandom(6 << 20)
        relpath = f"killed{round_}.bin"
        token = rig.token(vfid, relpath, len(data))
        s = stream_patch(victim.client_port, token, 0, data, rate=8 << 20)
        time.sleep(rng.uniform(0.1, 0.6))  # a random point of the body
        victim.kill()
        s.close()
        t0 = time.monotonic()
        status, offset = head(rig, rig.lb.client_port, token)
        assert status == 200 and 0 <= offset <= len(data), (status, offset)
        status, h = patch(rig, rig.lb.client_port, token, offset, data[offset:])
        took = time.monotonic() - t0
        assert status == 204 and int(h["upload-offset"]) == len(data), (status, h)
        assert took < 10, f"resuming took {took:.1f}s"  # no lease to expire
        assert_bytes_everywhere(rig, vfid, relpath, data)
        victim.start()  # same ports: back in HAProxy's rotation
        wait_for(lambda: request(victim.client_port, "OPTIONS", "/upload")[0] == 204,  # noqa: B023
                 timeout=10, what="the replica back")
    assert all(status < 500 for _, status, _ in rig.answers)


def fill(path: Path, n: int) -> None:
    for d in range(n // 250):
        sub = path / f"d{d}"
        sub.mkdir()
        for i in range(250):
            (sub / f"f{i}").write_bytes(b"y")


def kill_when_running(daemon: Any, task_id: str) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, state = manager_call(daemon.manager_port, daemon.manager_secret, f"/bgtask/{task_id}", {}, "GET")
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


def test_a_replica_killed_mid_delete_or_clone_the_other_ends_the_task(rig: Rig) -> None:
    a, b = rig.a, rig.b
    src = rig.new_vfolder()
    fill(rig.mounts["a"] / src.relative_path(), 1500)
    # A clone killed part-way: B removes the partial copy and fails it.
    dst = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")
    status, body = manager_call(a.manager_port, a.manager_secret, "/folder/clone",
                                {"src_volume": "local", "src_vfid": str(src), "dst_volume": None,
                                 "dst_vfid": str(dst)})
    assert status == 200, body
    clone_id = body["bgtask_id"]
    killed = kill_when_running(a, clone_id)
    if killed:
        failed = wait_for(lambda: terminal(rig.redis, clone_id), timeout=30, what="B failing the clone")
        assert failed["name"] == "bgtask_failed"
        assert not (rig.mounts["b"] / dst.relative_path()).exists()
        a.start()
    # A delete killed part-way: B runs it again to the end.
    status, body = manager_call(a.manager_port, a.manager_secret, "/folder/delete",
                                {"volume": "local", "vfid": str(src)})
    assert status == 202, body
    delete_id = body["bgtask_id"]
    assert kill_when_running(a, delete_id), "the delete of 1500 files on CephFS ended before the kill"
    t0 = time.monotonic()
    done = wait_for(lambda: terminal(rig.redis, delete_id), timeout=30, what="B finishing the delete")
    assert done["name"] == "bgtask_done" and time.monotonic() - t0 < 20
    for mount in rig.mounts.values():
        assert not (mount / src.relative_path()).exists()
    assert "takeover: the replica of" in b.log
    with rig.redis.client() as c:
        names = [(e[b"name"], json.loads(e[b"payload"]).get("vfid")) for e in stream_entries(c)]
    assert names.count((b"vfolder_deletion_success", str(src))) == 1
    if killed:
        assert (b"vfolder_clone_failure", str(src)) in names
