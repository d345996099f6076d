"""The reservoir registry: a second storage-proxy daemon's VFS storage as the import source.

The importing daemon reaches the source's manager API (``/v1/storages/vfs/<storage>/files``
and ``/download``, the routes a manager calls for upstream's reservoir) through
``support/relay.py``, which counts the requests per file and cuts answers on demand.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import StorageProxyProcess
from support.relay import Relay

RES = "/v1/registries/reservoir"


def call(daemon: StorageProxyProcess, method: str, path: str, body: object = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=60)
    conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                 headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(payload) if payload else None


def stored(base: Path, prefix: str) -> dict[str, bytes]:
    root = base / prefix
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
MODEL, REVISION = "acme/tiny", "v1"
BIG = "weights/model.bin"


def _model_files() -> dict[str, bytes]:
    rng = hashlib.sha256(b"reservoir")
    big = b"".join(hashlib.sha256(rng.digest() + i.to_bytes(4, "big")).digest() for i in range(6 * 1024 * 1024 // 32))
    files = {BIG: big, "config.json": b'{"layers": 2}\n', "README.md": b"# tiny\n", "empty.txt": b""}
    for i in range(12):
        files[f"shards/part-{i:02d}.bin"] = bytes([i]) * (37_000 + 1000 * i)
    return files


FILES = _model_files()
SOURCE_TOKEN: list[str] = []


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StorageProxyProcess, Path, Relay, Path]]:
    work = tmp_path_factory.mktemp("reservoir")
    source_base = work / "source-models"
    for rel, data in FILES.items():
        path = source_base / MODEL / REVISION / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    source = StorageProxyProcess(work / "source", extra_config={
        "artifact-storages": {"published": {"type": "vfs_storage", "vfs-storage": {"base-path": str(source_base)}}},
    })
    source.start()
    SOURCE_TOKEN[:] = [source.manager_secret]
    relay = Relay(("127.0.0.1", source.manager_port))
    base = work / "dest"  # one artifact storage per test below it: a reservoir's prefix is the source's too
    reservoir = {"storage-proxy-endpoint": relay.url, "storage-proxy-token": source.manager_secret,
                 "storage-name": "published"}
    daemon = StorageProxyProcess(work / "proxy", extra_config={
        "artifact-storages": {name: {"type": "vfs_storage", "vfs-storage": {"base-path": str(base / name)}}
                              for name in DESTINATIONS},
        "artifact-registries": {
            "res": {"type": "reservoir", "reservoir": reservoir},
            "wrong-token": {"type": "reservoir", "reservoir": dict(reservoir, **{"storage-proxy-token": "nope"})},
            "impatient": {"type": "reservoir", "reservoir": dict(reservoir, **{"read-timeout": 1})},
        },
    })
    daemon.start()
    yield daemon, base, relay, source_base
    daemon.stop(timeout=10)
    source.stop(timeout=10)
    relay.stop()
    assert "Traceback" not in daemon.log, daemon.log[-4000:]
    assert "Traceback" not in source.log, source.log[-4000:]


DESTINATIONS = ("models", "changed", "dropped", "stalled", "killed", "partial", "refused", "prefixed")


def body(dest: str = "models", registry: str = "res", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"registry_name": registry, "models": [{"model_id": MODEL, "revision": REVISION}],
                           "storage_step_target_mappings": {"download": {"storage_name": dest}},
                           "artifact_revision_ids": ["3f5d0ad4-5e8a-4c1c-9e57-3c4a2a1f4b21"]}
    out.update(extra)
    return out


def model_dir(base: Path, dest: str) -> Path:
    return base / dest / MODEL / REVISION


def run_import(daemon: StorageProxyProcess, payload: dict[str, Any], timeout: float = 40) -> dict[str, Any]:
    status, _, answer = call(daemon, "POST", f"{RES}/import", payload)
    assert status == 202, answer
    return wait_task(daemon, answer["task_id"], timeout)


def wait_task(daemon: StorageProxyProcess, task_id: str, timeout: float = 40) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, _, task = call(daemon, "GET", f"/bgtask/{task_id}")
        if status == 200 and task["status"] != "running":
            return task
        assert time.monotonic() < deadline, f"import {task_id} still running after {timeout}s: {task}"
        time.sleep(0.05)


def remote(rel: str) -> str:
    return f"{MODEL}/{REVISION}/{rel}"


def test_import_copies_every_file_then_skips_them(pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> None:
    daemon, base, relay, _ = pair
    before = {rel: relay.stat(remote(rel))["gets"] for rel in FILES}
    task = run_import(daemon, body())
    assert task["status"] == "done", task
    assert stored(base / "models", f"{MODEL}/{REVISION}") == FILES  # upstream's key: {model_id}/{revision}/{path}
    assert task["progress"]["current"] == task["progress"]["total"] == sum(map(len, FILES.values()))
    [result] = task["result"]["models"]
    assert result["success"] and result["files"] == len(FILES) and result["skipped"] == 0
    assert result["commit_hash"] is None  # upstream: a reservoir's digest comes from the manager's scan
    # each file downloaded once (the empty one needs no request)
    assert {rel: relay.stat(remote(rel))["gets"] - before[rel] for rel in FILES} == {
        rel: int(bool(data)) for rel, data in FILES.items()}
    middle = {rel: relay.stat(remote(rel))["gets"] for rel in FILES}
    task = run_import(daemon, body())
    assert task["status"] == "done" and task["result"]["models"][0]["skipped"] == len(FILES), task
    assert {rel: relay.stat(remote(rel))["gets"] for rel in FILES} == middle  # nothing downloaded again


def test_a_changed_source_file_is_fetched_again(pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> None:
    daemon, base, _, source_base = pair
    assert run_import(daemon, body("changed"))["status"] == "done"
    src = source_base / MODEL / REVISION / "config.json"
    original = src.read_bytes()
    try:
        src.write_bytes(b'{"layers": 3}\n')  # same size, other bytes, a new mtime
        os.utime(src, (time.time() + 5, time.time() + 5))
        task = run_import(daemon, body("changed"))
        assert task["status"] == "done" and task["result"]["models"][0]["skipped"] == len(FILES) - 1, task
        assert (model_dir(base, "changed") / "config.json").read_bytes() == b'{"layers": 3}\n'
    finally:
        src.write_bytes(original)


def test_import_survives_dropped_connections(pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> None:
    daemon, base, relay, _ = pair
    relay.fault(remote(BIG), drop_after=1_500_000, times=2)
    relay.fault(remote("shards/part-03.bin"), drop_after=20_000, times=1)
    before = relay.stat(remote(BIG))
    task = run_import(daemon, body("dropped"))
    assert task["status"] == "done", task
    assert stored(base / "dropped", f"{MODEL}/{REVISION}") == FILES  # byte-identical after resuming
    assert task["result"]["models"][0]["retries"] == 3
    after = relay.stat(remote(BIG))
    assert after["gets"] - before["gets"] == 3 and after["ranged"] - before["ranged"] == 2  # the rest only


def test_a_stalled_download_is_retried(pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> None:
    daemon, base, relay, _ = pair
    relay.fault(remote(BIG), drop_after=1_200_000, times=1, stall=True)
    task = run_import(daemon, body("stalled", registry="impatient"))
    assert task["status"] == "done", task
    assert task["result"]["models"][0]["retries"] == 1
    assert stored(base / "stalled", f"{MODEL}/{REVISION}") == FILES


def test_import_resumes_after_the_daemon_is_killed(pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> None:
    daemon, base, relay, _ = pair
    relay.fault(remote(BIG), drop_after=2_500_000, times=1, stall=True)
    status, _, answer = call(daemon, "POST", f"{RES}/import", body("killed"))
    assert status == 202, answer
    deadline = time.monotonic() + 20
    while not [p for p in (model_dir(base, "killed") / "weights").glob(".model.bin.*.part") if p.stat().st_size >= 2_000_000]:
        assert time.monotonic() < deadline, "the import did not start writing"
        time.sleep(0.02)
    daemon.kill()  # SIGKILL mid-file
    daemon.start()
    before = relay.stat(remote(BIG))
    task = run_import(daemon, body("killed"))
    assert task["status"] == "done", task
    assert stored(base / "killed", f"{MODEL}/{REVISION}") == FILES
    after = relay.stat(remote(BIG))
    assert after["gets"] == before["gets"] + 1 and after["ranged"] == before["ranged"] + 1  # from the staged bytes
    assert not list((base / "killed").rglob(".*.part"))


def test_a_missing_model_fails_its_task(pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> None:
    daemon, base, _, _ = pair
    payload = body("partial")
    payload["models"] = [{"model_id": "acme/missing", "revision": "v1"}, {"model_id": MODEL, "revision": REVISION}]
    payload["artifact_revision_ids"] = ["a", "b"]
    task = run_import(daemon, payload)
    assert task["status"] == "failed", task
    models = task["error"]["data"]["models"]
    assert [(m["model_id"], m["success"]) for m in models] == [("acme/missing", False), (MODEL, True)]
    assert "not found" in models[0]["error"]


def test_a_source_refusing_our_token_fails_the_model(pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> None:
    daemon, base, _, _ = pair
    task = run_import(daemon, body("refused", registry="wrong-token"))
    assert task["status"] == "failed", task
    [model] = task["error"]["data"]["models"]
    assert not model["success"] and "HTTP 403" in model["error"], model
    assert not list((base / "refused").rglob("*"))


def test_a_storage_prefix_names_the_directory_at_both_ends(pair: tuple[StorageProxyProcess, Path, Relay, Path]
                                                           ) -> None:
    """Upstream: the prefix (default {model_id}/{revision}) is the source's directory and the destination's."""
    daemon, base, _, _ = pair
    prefix = f"{MODEL}/{REVISION}/shards"
    task = run_import(daemon, body("prefixed", storage_prefix=prefix))
    assert task["status"] == "done", task
    assert stored(base / "prefixed", prefix) == {k[len("shards/"):]: v for k, v in FILES.items()
                                                  if k.startswith("shards/")}


@pytest.mark.parametrize("payload,status,code", [
    (body(registry="nope"), 404, "artifact-registry_read_not-found"),
    (dict(body(), models=[{"model_id": MODEL}]), 400, "artifact_read_invalid-parameters"),
    (dict(body(), artifact_revision_ids=["a", "b"]), 400, None),
    (dict(body(), storage_step_target_mappings=None), 400, "storage_setup_invalid-parameters"),
    (dict(body(), storage_step_target_mappings={"download": {"storage_name": "nowhere"}}), 404,
     "storage_read_not-found"),
    (dict(body(), storage_prefix="../out"), 400, None),
])
def test_import_refuses(pair: tuple[StorageProxyProcess, Path, Relay, Path], payload: dict[str, Any], status: int,
                        code: str | None) -> None:
    daemon, _, _, _ = pair
    got, headers, answer = call(daemon, "POST", f"{RES}/import", payload)
    assert got == status and headers["content-type"] == "application/problem+json", answer
    if code:
        assert answer["error_code"] == code


def test_source_download_honours_range_and_if_range(pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> None:
    """What the resume relies on, at the source: Range, an If-Range on the Last-Modified date."""
    _, _, relay, _ = pair
    token = relay_token(pair)

    def download(headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
        conn.request("POST", "/v1/storages/vfs/published/download", body=json.dumps({"filepath": remote(BIG)}),
                     headers={"X-BackendAI-Storage-Auth-Token": token, **headers})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    status, headers, data = download({})
    assert status == 200 and data == FILES[BIG] and headers["accept-ranges"] == "bytes"
    status, part_headers, part = download({"Range": "bytes=1000-", "If-Range": headers["last-modified"]})
    assert status == 206 and part == FILES[BIG][1000:]
    assert part_headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    status, _, whole = download({"Range": "bytes=1000-", "If-Range": "Tue, 01 Jan 2002 00:00:00 GMT"})
    assert status == 200 and whole == FILES[BIG]  # another version: the whole file
    status, _, _ = download({"Range": f"bytes={len(data)}-"})
    assert status == 416


def relay_token(pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> str:
    return SOURCE_TOKEN[0]


def test_import_events_and_resume_after_a_kill(tmp_path: Path, pair: tuple[StorageProxyProcess, Path, Relay, Path]
                                               ) -> None:
    """With [redis]: a daemon SIGKILLed mid-import resumes the task by itself (same id) from the
    staged bytes, and the manager's stream gets model_verifying / model_import_done for a reservoir."""
    from support.redis import REDIS_SERVER, RedisServer, stream_entries

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    _, _, relay, _ = pair
    redis = RedisServer(tmp_path / "redis").start()
    base = tmp_path / "models"
    daemon = StorageProxyProcess(tmp_path / "proxy", extra_config={
        "redis": {"addr": redis.addr},
        "artifact-storages": {"models": {"type": "vfs_storage", "vfs-storage": {"base-path": str(base)}}},
        "artifact-registries": {"res": {"type": "reservoir", "reservoir": {
            "storage-proxy-endpoint": relay.url, "storage-proxy-token": relay_token(pair),
            "storage-name": "published"}}},
    })
    try:
        daemon.start()
        relay.fault(remote(BIG), drop_after=2_500_000, times=1, stall=True)
        payload = body("models")
        payload["models"].append({"model_id": "acme/missing", "revision": "v1"})
        payload["artifact_revision_ids"] = ["a", "b"]
        status, _, answer = call(daemon, "POST", f"{RES}/import", payload)
        assert status == 202, answer
        deadline = time.monotonic() + 20
        while not [p for p in (base / MODEL / REVISION / "weights").glob(".model.bin.*.part") if p.stat().st_size >= 2_000_000]:
            assert time.monotonic() < deadline, "the import did not start writing"
            time.sleep(0.02)
        before = relay.stat(remote(BIG))
        daemon.kill()
        daemon.start()
        task = wait_task(daemon, answer["task_id"])
        assert task["status"] == "failed", task  # the missing model
        assert [(m["model_id"], m["success"]) for m in task["error"]["data"]["models"]] == [
            (MODEL, True), ("acme/missing", False)]
        assert stored(base, f"{MODEL}/{REVISION}") == FILES
        after = relay.stat(remote(BIG))
        assert after["gets"] == before["gets"] + 1 and after["ranged"] == before["ranged"] + 1

        deadline = time.monotonic() + 10
        while True:
            with redis.client() as client:
                entries = [(e[b"name"].decode(), json.loads(e[b"payload"])) for e in stream_entries(client)]
            artifact = [(n, p) for n, p in entries if n.startswith("model_")]
            if len(artifact) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        common = {"registry_type": "reservoir", "registry_name": "res"}
        assert ("model_verifying", {"model_id": MODEL, "revision": REVISION, **common}) in artifact
        assert ("model_import_done", {"model_id": MODEL, "revision": REVISION, **common, "success": True,
                                      "digest": None, "verification_result": None}) in artifact
        assert ("model_import_done", {"model_id": "acme/missing", "revision": "v1", **common, "success": False,
                                      "digest": None, "verification_result": None}) in artifact
        assert len(artifact) == 3, artifact  # once each, though the task ran twice
    finally:
        daemon.stop(timeout=10)
        redis.stop()


@pytest.mark.rgw
@pytest.mark.skipif(not os.environ.get("RGW_ENDPOINT"), reason="no radosgw: set RGW_ENDPOINT/RGW_ACCESS_KEY/"
                    "RGW_SECRET_KEY (../shared/cephfs/rgw-up.sh)")
def test_import_into_an_object_storage(tmp_path: Path, pair: tuple[StorageProxyProcess, Path, Relay, Path]) -> None:
    """From the second daemon into a real S3 (radosgw), its first bucket, through a dropped connection;
    a second import finds every object tagged with the source's version and downloads nothing."""
    import botocore.session
    from botocore.config import Config

    _, _, relay, _ = pair
    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=os.environ["RGW_ENDPOINT"], region_name="us-east-1",
        aws_access_key_id=os.environ["RGW_ACCESS_KEY"], aws_secret_access_key=os.environ["RGW_SECRET_KEY"],
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
    bucket = f"res-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    daemon = StorageProxyProcess(tmp_path / "proxy", extra_config={
        "artifact-storages": {"s3": {"type": "object_storage", "object-storage": {
            "endpoint": os.environ["RGW_ENDPOINT"], "access-key": os.environ["RGW_ACCESS_KEY"],
            "secret-key": os.environ["RGW_SECRET_KEY"], "region": "us-east-1", "buckets": [bucket]}}},
        "artifact-registries": {"res": {"type": "reservoir", "reservoir": {
            "storage-proxy-endpoint": relay.url, "storage-proxy-token": relay_token(pair),
            "storage-name": "published"}}},
    })
    try:
        daemon.start()
        relay.fault(remote(BIG), drop_after=1_500_000, times=1)
        payload = dict(body(), storage_step_target_mappings={"download": {"storage_name": "s3"}})
        task = run_import(daemon, payload, timeout=60)
        assert task["status"] == "done", task
        assert task["result"]["models"][0]["retries"] == 1
        for rel, data in FILES.items():
            obj = s3.get_object(Bucket=bucket, Key=remote(rel))
            assert obj["Body"].read() == data, rel
            assert obj["Metadata"]["reservoir-version"].startswith(f"{len(data)}-")
        before = {rel: relay.stat(remote(rel))["gets"] for rel in FILES}
        task = run_import(daemon, payload, timeout=60)
        assert task["status"] == "done" and task["result"]["models"][0]["skipped"] == len(FILES), task
        assert {rel: relay.stat(remote(rel))["gets"] for rel in FILES} == before
    finally:
        daemon.stop(timeout=10)
        for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=bucket)


@pytest.mark.rgw
@pytest.mark.skipif(not os.environ.get("RGW_ENDPOINT"), reason="no radosgw: set RGW_ENDPOINT/RGW_ACCESS_KEY/"
                    "RGW_SECRET_KEY (../shared/cephfs/rgw-up.sh)")
@pytest.mark.parametrize("changed", [False, True])
def test_an_object_storage_import_reuses_the_upload_a_killed_daemon_left(
        tmp_path: Path, pair: tuple[StorageProxyProcess, Path, Relay, Path], changed: bool) -> None:
    """SIGKILL after the first 5 MiB part of the large file went up: the next run checks that part's
    MD5 against its ETag while it downloads the file again, uploads only the rest, and completes.
    If the source's file changed meanwhile, the part differs: that upload is dropped and the file
    goes up anew, whole and new."""
    import botocore.session
    from botocore.config import Config

    _, _, relay, source_base = pair
    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=os.environ["RGW_ENDPOINT"], region_name="us-east-1",
        aws_access_key_id=os.environ["RGW_ACCESS_KEY"], aws_secret_access_key=os.environ["RGW_SECRET_KEY"],
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
    bucket = f"res-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    daemon = StorageProxyProcess(tmp_path / "proxy", extra_config={
        "artifact-storages": {"s3": {"type": "object_storage", "object-storage": {
            "endpoint": os.environ["RGW_ENDPOINT"], "access-key": os.environ["RGW_ACCESS_KEY"],
            "secret-key": os.environ["RGW_SECRET_KEY"], "region": "us-east-1", "buckets": [bucket]}}},
        "artifact-registries": {"res": {"type": "reservoir", "reservoir": {
            "storage-proxy-endpoint": relay.url, "storage-proxy-token": relay_token(pair),
            "storage-name": "published"}}},
    })
    key = remote(BIG)
    source = source_base / key
    expected = dict(FILES)
    if changed:
        expected[BIG] = bytes(b ^ 0x5A for b in FILES[BIG])
    try:
        daemon.start()
        relay.fault(key, drop_after=5_800_000, times=1, stall=True)
        payload = dict(body(), storage_step_target_mappings={"download": {"storage_name": "s3"}})
        status, _, answer = call(daemon, "POST", f"{RES}/import", payload)
        assert status == 202, answer
        deadline = time.monotonic() + 30
        while True:
            uploads = [u for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) if u["Key"] == key]
            parts = s3.list_parts(Bucket=bucket, Key=key, UploadId=uploads[0]["UploadId"]).get("Parts", []) \
                if uploads else []
            if parts:
                break
            assert time.monotonic() < deadline, "the first part never went up"
            time.sleep(0.05)
        daemon.kill()  # SIGKILL: the unfinished upload stays at S3
        if changed:
            source.write_bytes(expected[BIG])
        daemon.start()
        task = run_import(daemon, payload, timeout=60)
        assert task["status"] == "done", task
        assert "reusing 1 parts of an unfinished upload" in daemon.log
        assert ("differs; uploading anew" in daemon.log) == changed
        for rel, data in expected.items():
            assert s3.get_object(Bucket=bucket, Key=remote(rel))["Body"].read() == data, rel
        assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")  # nothing left behind
    finally:
        source.write_bytes(FILES[BIG])
        daemon.stop(timeout=10)
        for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=bucket)
