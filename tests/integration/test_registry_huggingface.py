"""The /v1 HuggingFace registry routes on the real daemon, against the local hub (``support/hub.py``).

No hub is reachable here: the hub is tested only through that contract
server, which implements the documented HTTP API ``huggingface_hub`` calls.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from support.daemon import StorageProxyProcess
from support.hubserver import MODEL, OTHER, HubServer, model_import_config, running_hub

pytest.importorskip("huggingface_hub", reason="huggingface-hub is not installed")



@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with running_hub(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, hub: HubServer) -> Iterator[tuple[StorageProxyProcess, Path]]:
    work = tmp_path_factory.mktemp("hfproxy")
    base = work / "models"
    daemon = StorageProxyProcess(work / "proxy", extra_config=model_import_config(base, {
        "hf": {"endpoint": hub.url},
        "down": {"endpoint": "http://127.0.0.1:9"},
        "impatient": {"endpoint": hub.url, "read-timeout": 1},
        "parts": {"endpoint": hub.url, "part-size": 1 << 20},
    }), extra_env={"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5"})
    daemon.start()
    yield daemon, base
    daemon.stop(timeout=10)
    assert "Traceback" not in daemon.log, daemon.log[-4000:]


def call(daemon: StorageProxyProcess, method: str, path: str, body: object = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=60)
    hdrs = {"X-BackendAI-Storage-Auth-Token": daemon.manager_secret}
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers=hdrs)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    headers = {k.lower(): v for k, v in response.getheaders()}
    return response.status, headers, json.loads(payload) if payload else None


HF = "/v1/registries/huggingface"


def model_path(model_id: str, suffix: str = "", **query: str) -> str:
    # The manager quotes the id with safe="" (org%2Fname).
    qs = "&".join(f"{k}={quote(v)}" for k, v in query.items())
    return f"{HF}/model/{quote(model_id, safe='')}{suffix}?{qs}"


def test_scan_lists_every_revision_of_each_model(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, _ = proxy
    status, _, body = call(daemon, "POST", f"{HF}/scan", {"registry_name": "hf", "limit": 10, "order": "downloads"})
    assert status == 200, body
    pairs = [(m["id"], m["revision"]) for m in body["models"]]
    # most downloaded first; every branch and tag of a model
    assert [p[0] for p in pairs][0] == MODEL
    assert sorted(r for i, r in pairs if i == MODEL) == ["dev", "main", "v1.0"]
    first = body["models"][0]
    assert first["name"] == "tiny-llm" and first["author"] == "acme"
    assert first["tags"] == ["pytorch", "text-generation"]
    assert first["created_at"].startswith("2025-01-02T03:04:05") and first["modified_at"].startswith("2025-06-07")
    assert first["extra"] == {"gated": False} and first["readme"] is None

    status, _, body = call(daemon, "POST", f"{HF}/scan", {"registry_name": "hf", "limit": 1, "order": "downloads",
                                                          "search": "other"})
    assert status == 200 and [(m["id"], m["revision"]) for m in body["models"]] == [(OTHER, "main")]


def test_scan_refuses_bad_parameters(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, _ = proxy
    status, headers, body = call(daemon, "POST", f"{HF}/scan", {"registry_name": "hf", "limit": 0, "order": "nope"})
    assert status == 400 and headers["content-type"] == "application/problem+json"
    assert set(body["data"]) == {"limit", "order"}


def test_retrieve_model_with_readme_and_size(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, _ = proxy
    status, _, body = call(daemon, "GET", model_path(MODEL, registry_name="hf", revision="main"))
    assert status == 200, body
    model = body["model"]
    files = hub.content[f"{MODEL}@main"]
    assert model["id"] == MODEL and model["revision"] == "main"
    assert model["readme"] == files["README.md"].decode()
    assert model["size"] == sum(len(d) for d in files.values())


@pytest.mark.parametrize("spelling", ["acme/tiny-llm", "acme%2Ftiny-llm", "acme%252Ftiny-llm"])
def test_model_id_spellings(proxy: tuple[StorageProxyProcess, Path], spelling: str) -> None:
    """The manager quotes the id (safe=""), and its aiohttp quotes the %2F again."""
    daemon, _ = proxy
    for suffix, key in (("", "model"), ("/commit-hash", "commit_hash")):
        status, _, body = call(daemon, "GET", f"{HF}/model/{spelling}{suffix}?registry_name=hf&revision=main")
        assert status == 200 and body[key], (spelling, suffix, body)


def test_invalid_model_id_is_a_400(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, _ = proxy
    status, _, body = call(daemon, "GET", model_path("not a/valid id!", registry_name="hf", revision="main"))
    assert status == 400, body


def test_commit_hash(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, _ = proxy
    status, _, main = call(daemon, "GET", model_path(MODEL, "/commit-hash", registry_name="hf"))
    assert status == 200, main
    status, _, tagged = call(daemon, "GET", model_path(MODEL, "/commit-hash", registry_name="hf", revision="v1.0"))
    status2, _, dev = call(daemon, "GET", model_path(MODEL, "/commit-hash", registry_name="hf", revision="dev"))
    assert status == status2 == 200
    assert len(main["commit_hash"]) == 40 and tagged == main
    assert dev["commit_hash"] == hashlib.sha1(b"dev").hexdigest()


def test_models_batch(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, _ = proxy
    status, _, body = call(daemon, "POST", f"{HF}/models/batch", {"registry_name": "hf", "models": [
        {"model_id": MODEL, "revision": "dev"}, {"model_id": OTHER, "revision": None}]})
    assert status == 200, body
    assert [(m["id"], m["revision"], m["readme"], m["size"]) for m in body["models"]] == [
        (MODEL, "dev", None, None), (OTHER, "main", None, None)]
    assert body["models"][1]["extra"] == {"gated": "auto"}


@pytest.mark.parametrize("path,code", [
    (model_path("acme/missing", registry_name="hf", revision="main"), "artifact_read_not-found"),
    (model_path(MODEL, registry_name="hf", revision="no-such-branch"), "artifact_read_not-found"),
    (model_path(MODEL, registry_name="nope", revision="main"), "artifact-registry_read_not-found"),
    (model_path(MODEL, "/commit-hash", registry_name="nope"), "artifact-registry_read_not-found"),
])
def test_not_found_is_a_problem(proxy: tuple[StorageProxyProcess, Path], path: str, code: str) -> None:
    daemon, _ = proxy
    status, headers, body = call(daemon, "GET", path)
    assert status == 404 and headers["content-type"] == "application/problem+json", body
    assert body["error_code"] == code


def test_unreachable_hub_is_a_problem(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, _ = proxy
    status, headers, body = call(daemon, "GET", model_path(MODEL, registry_name="down", revision="main"))
    assert status == 502 and headers["content-type"] == "application/problem+json", body
    assert body["error_code"] == "artifact-registry_request_unreachable"
    # (scan and the file listing fail the same way, after huggingface_hub's own
    # retries of paginated calls: ~23 s, too slow for this suite)


# -- import ------------------------------------------------------------------------

ALL_STEPS = {step: {"storage_name": "models"} for step in ("download", "verify", "archive")}


def run_import(daemon: StorageProxyProcess, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    status, _, answer = call(daemon, "POST", f"{HF}/import", body)
    assert status == 202, answer
    task_id = answer["task_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, task = call(daemon, "GET", f"/bgtask/{task_id}")
        assert status == 200, task
        if task["status"] != "running":
            return task
        time.sleep(0.05)
    raise AssertionError(f"import {task_id} still running after {timeout}s: {task}")


def stored(base: Path, prefix: str) -> dict[str, bytes]:
    root = base / prefix
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_import_writes_every_file_verified_then_skips_them(proxy: tuple[StorageProxyProcess, Path],
                                                            hub: HubServer) -> None:
    daemon, base = proxy
    before = hub.get("/_stats")
    task = run_import(daemon, {"registry_name": "hf", "models": [{"model_id": MODEL, "revision": "main"}],
                               "storage_step_target_mappings": ALL_STEPS})
    assert task["status"] == "done", task
    files = hub.content[f"{MODEL}@main"]
    assert stored(base, f"{MODEL}/main") == files  # upstream's default key: {model_id}/{revision}/{path}
    assert task["progress"]["current"] == task["progress"]["total"] == sum(len(d) for d in files.values())
    [result] = task["result"]["models"]
    assert result["success"] and result["files"] == len(files) and result["skipped"] == 0
    assert result["commit_hash"] == call(daemon, "GET", model_path(MODEL, "/commit-hash", registry_name="hf"))[2][
        "commit_hash"]

    middle = hub.get("/_stats")
    assert all(middle[p]["gets"] == before.get(p, {}).get("gets", 0) + 1 for p in files)
    # Again: everything is there and verified, nothing is downloaded.
    task = run_import(daemon, {"registry_name": "hf", "models": [{"model_id": MODEL, "revision": "main"}],
                               "storage_step_mappings": {"download": "models"}})
    assert task["status"] == "done" and task["result"]["models"][0]["skipped"] == len(files), task
    assert hub.get("/_stats") == middle


def test_import_a_corrupted_file_again(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, base = proxy
    body = {"registry_name": "hf", "models": [{"model_id": OTHER}], "storage_step_mappings": {"download": "models"},
            "storage_prefix": "other"}
    assert run_import(daemon, body)["status"] == "done"
    target = base / "other" / "weights.bin"
    data = target.read_bytes()
    target.write_bytes(b"X" + data[1:])  # same size, other bytes: not verified, so fetched again
    task = run_import(daemon, body)
    assert task["status"] == "done" and task["result"]["models"][0]["skipped"] == 0, task
    assert target.read_bytes() == data == hub.content[f"{OTHER}@main"]["weights.bin"]


def test_import_survives_dropped_connections(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, base = proxy
    hub.post("/_faults", {"path": "model.safetensors", "drop_after": 1_000_000, "times": 2})
    hub.post("/_faults", {"path": "shards/part-2.bin", "drop_after": 100_000, "times": 1})
    before = hub.get("/_stats")
    task = run_import(daemon, {"registry_name": "hf", "models": [{"model_id": MODEL, "revision": "main"}],
                               "storage_step_mappings": {"download": "models"}, "storage_prefix": "dropped"})
    assert task["status"] == "done", task
    assert stored(base, "dropped") == hub.content[f"{MODEL}@main"]  # byte-identical after resuming
    assert task["result"]["models"][0]["retries"] == 3
    after = hub.get("/_stats")
    # the retries asked for the rest only (Range), not the whole file again
    assert after["model.safetensors"]["ranged"] - before["model.safetensors"]["ranged"] == 2
    assert after["shards/part-2.bin"]["ranged"] - before["shards/part-2.bin"]["ranged"] == 1


def test_import_resumes_a_staged_file(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, base = proxy
    data = hub.content[f"{MODEL}@main"]["model.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    (base / "staged").mkdir()
    (base / "staged" / f".model.safetensors.{sha[:16]}.part").write_bytes(data[:2_000_000])  # an earlier run's
    before = hub.get("/_stats")["model.safetensors"]
    task = run_import(daemon, {"registry_name": "hf", "models": [{"model_id": MODEL, "revision": "main"}],
                               "storage_step_mappings": {"download": "models"}, "storage_prefix": "staged"})
    assert task["status"] == "done", task
    assert (base / "staged" / "model.safetensors").read_bytes() == data
    assert not [p for p in (base / "staged").iterdir() if p.name.endswith(".part")]
    after = hub.get("/_stats")["model.safetensors"]
    assert after["ranged"] == before["ranged"] + 1 and after["gets"] == before["gets"] + 1


def _parts(hub: HubServer, path: str = "model.safetensors") -> int:
    return int(hub.get("/_stats").get(path, {}).get("parts", 0))


def test_a_large_file_comes_in_ranged_parts(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, base = proxy
    before = _parts(hub)
    task = run_import(daemon, {"registry_name": "parts", "models": [{"model_id": MODEL}],
                               "storage_step_mappings": {"download": "models"}, "storage_prefix": "ranged"})
    assert task["status"] == "done", task
    assert stored(base, "ranged") == hub.content[f"{MODEL}@main"]  # verified whole (sha256) after the parts
    # 3 MiB + 17 bytes in 1 MiB parts: 4 bounded ranges; the files under 1 MiB in one stream each
    assert _parts(hub) - before == 4 and task["result"]["models"][0]["parts"] == 4
    assert _parts(hub, "shards/part-2.bin") == 0
    assert not [p for p in (base / "ranged").rglob(".*") if p.is_file()]  # no staging file or journal left


def test_ranged_parts_survive_dropped_connections(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, base = proxy
    hub.post("/_faults", {"path": "model.safetensors", "drop_after": 300_000, "times": 2})
    before = _parts(hub)
    task = run_import(daemon, {"registry_name": "parts", "models": [{"model_id": MODEL}],
                               "storage_step_mappings": {"download": "models"}, "storage_prefix": "ranged-dropped"})
    assert task["status"] == "done", task
    assert stored(base, "ranged-dropped") == hub.content[f"{MODEL}@main"]
    assert task["result"]["models"][0]["retries"] == 2 and _parts(hub) - before == 6  # each cut part asked again


def test_ranged_parts_resume_after_the_daemon_is_killed(proxy: tuple[StorageProxyProcess, Path],
                                                        hub: HubServer) -> None:
    """Two parts stall, two finish and are journaled; after a SIGKILL only the two are fetched again."""
    daemon, base = proxy
    data = hub.content[f"{MODEL}@main"]["model.safetensors"]
    journal = base / "ranged-killed" / f".model.safetensors.{hashlib.sha256(data).hexdigest()[:16]}.ranged-parts.part"
    hub.post("/_faults", {"path": "model.safetensors", "drop_after": 500_000, "times": 2, "stall": True})
    body = {"registry_name": "parts", "models": [{"model_id": MODEL}], "storage_step_mappings": {"download": "models"},
            "storage_prefix": "ranged-killed"}
    status, _, answer = call(daemon, "POST", f"{HF}/import", body)
    assert status == 202, answer
    sizes = [1 << 20, 1 << 20, 1 << 20, len(data) - (3 << 20)]

    def whole_parts() -> int:
        try:
            done = json.loads(journal.read_bytes())["done"]
        except (OSError, ValueError):
            return 0
        return sum(1 for n, size in zip(done, sizes, strict=True) if n == size)

    deadline = time.monotonic() + 20
    while whole_parts() < 2:
        assert time.monotonic() < deadline, "two parts were not journaled as whole"
        time.sleep(0.02)
    daemon.kill()  # SIGKILL with two parts stalled mid-way
    daemon.start()
    before = _parts(hub)
    task = run_import(daemon, body)
    assert task["status"] == "done", task
    assert stored(base, "ranged-killed") == hub.content[f"{MODEL}@main"]
    assert _parts(hub) - before == 2  # the journaled parts were not fetched again
    assert not journal.exists()


def test_import_of_a_missing_model_fails_its_task(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, base = proxy
    task = run_import(daemon, {"registry_name": "hf", "storage_step_mappings": {"download": "models"},
                               "models": [{"model_id": "acme/missing"}, {"model_id": OTHER}],
                               "storage_prefix": "partial"})
    assert task["status"] == "failed", task
    models = task["error"]["data"]["models"]
    assert [(m["model_id"], m["success"]) for m in models] == [("acme/missing", False), (OTHER, True)]
    assert (base / "partial" / "weights.bin").exists()


@pytest.mark.parametrize("body,status,code", [
    ({"registry_name": "nope", "models": [], "storage_step_mappings": {"download": "models"}}, 404,
     "artifact-registry_read_not-found"),
    ({"registry_name": "hf", "models": [{"model_id": MODEL}]}, 400, "storage_setup_invalid-parameters"),
    ({"registry_name": "hf", "models": [{"model_id": MODEL}], "storage_step_mappings": {"download": "nowhere"}}, 404,
     "storage_read_not-found"),
    ({"registry_name": "hf", "models": [{"revision": "main"}], "storage_step_mappings": {"download": "models"}}, 400,
     None),
    ({"registry_name": "hf", "models": [{"model_id": MODEL}], "storage_step_mappings": {"download": "models"},
      "storage_prefix": "../out"}, 400, None),
])
def test_import_refuses(proxy: tuple[StorageProxyProcess, Path], body: dict[str, Any], status: int,
                        code: str | None) -> None:
    daemon, _ = proxy
    got, headers, answer = call(daemon, "POST", f"{HF}/import", body)
    assert got == status and headers["content-type"] == "application/problem+json", answer
    if code:
        assert answer["error_code"] == code


def test_import_retries_a_stalled_download(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, base = proxy
    hub.post("/_faults", {"path": "shards/part-1.bin", "drop_after": 300_000, "times": 1, "stall": True})
    task = run_import(daemon, {"registry_name": "impatient", "models": [{"model_id": MODEL}],
                               "storage_step_mappings": {"download": "models"}, "storage_prefix": "stalled"})
    assert task["status"] == "done", task
    assert task["result"]["models"][0]["retries"] == 1
    assert stored(base, "stalled") == hub.content[f"{MODEL}@main"]


def start_stalled_import(daemon: StorageProxyProcess, base: Path, hub: HubServer,
                         prefix: str) -> tuple[dict, dict, Path]:
    """An import whose model.safetensors stalls after 2.5 MB, started and waited on
    until its first 2 MB are staged: (the request body, the 202 answer, the staged file)."""
    data = hub.content[f"{MODEL}@main"]["model.safetensors"]
    staged = base / prefix / f".model.safetensors.{hashlib.sha256(data).hexdigest()[:16]}.part"
    hub.post("/_faults", {"path": "model.safetensors", "drop_after": 2_500_000, "times": 1, "stall": True})
    body = {"registry_name": "hf", "models": [{"model_id": MODEL}], "storage_step_mappings": {"download": "models"},
            "storage_prefix": prefix}
    status, _, answer = call(daemon, "POST", f"{HF}/import", body)
    assert status == 202, answer
    deadline = time.monotonic() + 20
    while not (staged.exists() and staged.stat().st_size >= 2_000_000):  # the first 2 MiB batch written
        assert time.monotonic() < deadline, "the import did not start writing"
        time.sleep(0.02)
    return body, answer, staged


def test_import_resumes_after_the_daemon_is_killed(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, base = proxy
    body, _, _ = start_stalled_import(daemon, base, hub, "killed")
    daemon.kill()  # SIGKILL mid-file
    daemon.start()
    before = hub.get("/_stats")["model.safetensors"]
    task = run_import(daemon, body)
    assert task["status"] == "done", task
    assert stored(base, "killed") == hub.content[f"{MODEL}@main"]
    after = hub.get("/_stats")["model.safetensors"]
    assert after["ranged"] == before["ranged"] + 1  # resumed from the staged bytes, not from 0


def test_import_events_and_resume_after_a_kill(tmp_path: Path, hub: HubServer) -> None:
    """With [redis]: a daemon SIGKILLed mid-import resumes the task by itself (same id) from the staged
    bytes, and the manager's stream gets upstream's model_verifying / model_import_done."""
    from support.redis import REDIS_SERVER, RedisServer, stream_entries

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    redis = RedisServer(tmp_path / "redis").start()
    base = tmp_path / "models"
    daemon = StorageProxyProcess(tmp_path / "proxy", extra_config={
        "redis": {"addr": redis.addr}, **model_import_config(base, {"hf": {"endpoint": hub.url}})})
    try:
        daemon.start()
        data = hub.content[f"{MODEL}@main"]["model.safetensors"]
        staged = base / "j" / f".model.safetensors.{hashlib.sha256(data).hexdigest()[:16]}.part"
        hub.post("/_faults", {"path": "model.safetensors", "drop_after": 2_500_000, "times": 1, "stall": True})
        status, _, answer = call(daemon, "POST", f"{HF}/import", {
            "registry_name": "hf", "models": [{"model_id": MODEL}, {"model_id": "acme/missing"}],
            "storage_step_mappings": {"download": "models"}, "storage_prefix": "j"})
        assert status == 202, answer
        deadline = time.monotonic() + 20
        while not (staged.exists() and staged.stat().st_size >= 2_000_000):
            assert time.monotonic() < deadline, "the import did not start writing"
            time.sleep(0.02)
        before = hub.get("/_stats")["model.safetensors"]
        daemon.kill()
        daemon.start()
        deadline = time.monotonic() + 30
        while True:
            status, _, task = call(daemon, "GET", f"/bgtask/{answer['task_id']}")
            if status == 200 and task["status"] != "running":
                break
            assert time.monotonic() < deadline, task
            time.sleep(0.05)
        assert task["status"] == "failed", task  # the missing model
        assert [(m["model_id"], m["success"]) for m in task["error"]["data"]["models"]] == [
            (MODEL, True), ("acme/missing", False)]
        assert stored(base, "j") == hub.content[f"{MODEL}@main"]
        assert hub.get("/_stats")["model.safetensors"]["ranged"] == before["ranged"] + 1

        commit = call(daemon, "GET", model_path(MODEL, "/commit-hash", registry_name="hf"))[2]["commit_hash"]
        deadline = time.monotonic() + 10
        while True:
            with redis.client() as client:
                entries = [(e[b"name"].decode(), json.loads(e[b"payload"])) for e in stream_entries(client)]
            artifact = [(n, p) for n, p in entries if n.startswith("model_")]
            if len(artifact) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        status, _, _ = call(daemon, "POST", f"{HF}/scan", {"registry_name": "hf", "limit": 10, "order": "likes"})
        assert status == 200
        files = hub.content[f"{MODEL}@main"]
        wanted = {"model_id": MODEL, "revision": "main", "readme_content": files["README.md"].decode(),
                  "registry_type": "huggingface", "registry_name": "hf", "size": sum(map(len, files.values()))}
        deadline = time.monotonic() + 10
        while True:
            with redis.client() as client:
                metadata = [json.loads(e[b"payload"])["model"] for e in stream_entries(client)
                            if e[b"name"] == b"models_metadata_fetch_done"]
            if wanted in metadata or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert wanted in metadata  # after the scan, for the revisions with a README only
        assert {(m["model_id"], m["revision"]) for m in metadata} == {(MODEL, "main"), (MODEL, "v1.0")}
        common = {"registry_type": "huggingface", "registry_name": "hf"}
        assert ("model_verifying", {"model_id": MODEL, "revision": "main", **common}) in artifact
        assert ("model_import_done", {"model_id": MODEL, "revision": "main", **common, "success": True,
                                      "digest": commit, "verification_result": None}) in artifact
        assert ("model_import_done", {"model_id": "acme/missing", "revision": "main", **common, "success": False,
                                      "digest": None, "verification_result": None}) in artifact
    finally:
        daemon.stop(timeout=10)
        redis.stop()


def test_a_hanging_hub_leaves_the_filesystem_routes_alone(tmp_path: Path) -> None:
    """Hub calls block threads of their own pool: 20 requests to a hub that never answers
    do not hold the threads the VFS (and vfolder) routes need."""
    import socket
    import threading

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(128)  # connections complete in the kernel; nobody ever answers
    base = tmp_path / "models"
    daemon = StorageProxyProcess(tmp_path / "proxy", extra_config={
        "artifact-storages": {"models": {"type": "vfs_storage", "vfs-storage": {"base-path": str(base)}}},
        "artifact-registries": {"hole": {"type": "huggingface", "huggingface": {
            "endpoint": f"http://127.0.0.1:{hole.getsockname()[1]}"}}},
    })
    try:
        daemon.start()

        def stuck() -> None:
            try:
                call(daemon, "GET", model_path(MODEL, registry_name="hole", revision="main"))
            except OSError:
                pass

        for _ in range(20):
            threading.Thread(target=stuck, daemon=True).start()
        time.sleep(1.0)  # every hub thread is now waiting on the hole
        started = time.monotonic()
        status, _, body = call(daemon, "GET", "/v1/storages/vfs/models/files", {"directory": ""})
        assert status == 200, body
        assert time.monotonic() - started < 2.0
    finally:
        daemon.kill()
        hole.close()


def test_a_cancelled_import_keeps_its_staged_bytes(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, base = proxy
    body, answer, staged = start_stalled_import(daemon, base, hub, "cancelled")
    # the stalled download sends nothing more: cancelling must not wait for its next byte
    status, _, _ = call(daemon, "POST", f"/bgtask/{answer['task_id']}/cancel")
    assert status in (200, 202)
    deadline = time.monotonic() + 10
    while (task := call(daemon, "GET", f"/bgtask/{answer['task_id']}")[2])["status"] == "running":
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
    assert task["status"] == "cancelled", task
    assert staged.stat().st_size >= 2_000_000 and not (base / "cancelled" / "model.safetensors").exists()
    before = hub.get("/_stats")["model.safetensors"]
    task = run_import(daemon, body)
    assert task["status"] == "done", task
    assert stored(base, "cancelled") == hub.content[f"{MODEL}@main"]
    assert hub.get("/_stats")["model.safetensors"]["ranged"] == before["ranged"] + 1


@pytest.mark.rgw
@pytest.mark.skipif(not os.environ.get("RGW_ENDPOINT"), reason="no radosgw: set RGW_ENDPOINT/RGW_ACCESS_KEY/"
                    "RGW_SECRET_KEY (../shared/cephfs/rgw-up.sh)")
def test_import_into_an_object_storage(tmp_path: Path, hub: HubServer) -> None:
    """Into a real S3 (radosgw), the storage's first bucket, through a dropped connection; a second
    import finds every object tagged with its hash and downloads nothing."""
    import uuid

    import botocore.session
    from botocore.config import Config

    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=os.environ["RGW_ENDPOINT"], region_name="us-east-1",
        aws_access_key_id=os.environ["RGW_ACCESS_KEY"], aws_secret_access_key=os.environ["RGW_SECRET_KEY"],
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
    bucket = f"hf-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    daemon = StorageProxyProcess(tmp_path / "proxy", extra_config={
        "artifact-storages": {"s3": {"type": "object_storage", "object-storage": {
            "endpoint": os.environ["RGW_ENDPOINT"], "access-key": os.environ["RGW_ACCESS_KEY"],
            "secret-key": os.environ["RGW_SECRET_KEY"], "region": "us-east-1", "buckets": [bucket]}}},
        "artifact-registries": {"hf": {"type": "huggingface", "huggingface": {"endpoint": hub.url}}},
    })
    try:
        daemon.start()
        hub.post("/_faults", {"path": "model.safetensors", "drop_after": 1_500_000, "times": 1})
        body = {"registry_name": "hf", "models": [{"model_id": MODEL}],
                "storage_step_target_mappings": {"download": {"storage_name": "s3"}}}
        task = run_import(daemon, body, timeout=60)
        assert task["status"] == "done", task
        assert task["result"]["models"][0]["retries"] == 1
        for path, data in hub.content[f"{MODEL}@main"].items():
            got = s3.get_object(Bucket=bucket, Key=f"{MODEL}/main/{path}")["Body"].read()
            assert got == data, path
        before = hub.get("/_stats")
        task = run_import(daemon, body, timeout=60)
        assert task["status"] == "done" and task["result"]["models"][0]["skipped"] == 6, task
        assert hub.get("/_stats") == before
    finally:
        daemon.stop(timeout=10)
        for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=bucket)


def test_import_into_a_vfolder(proxy: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    """The manager's vfolder target ({vfolder_id, volume_name} for every step), as it sends it."""
    import uuid

    from storage.vfid import VFolderID

    daemon, _ = proxy
    vfid = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
    status, _, body = call(daemon, "POST", "/folder/create", {"volume": "local", "vfid": vfid})
    assert status == 204, body
    target = {"vfolder_id": vfid, "volume_name": "local"}
    task = run_import(daemon, {"registry_name": "hf", "models": [{"model_id": OTHER}],
                               "storage_step_target_mappings": {s: target for s in ("download", "verify", "archive")},
                               "storage_prefix": "/"})
    assert task["status"] == "done", task
    path = daemon.volume_path("local") / VFolderID.parse(vfid).relative_path()
    assert (path / "weights.bin").read_bytes() == hub.content[f"{OTHER}@main"]["weights.bin"]

    missing = {"vfolder_id": f"user:{uuid.uuid4()}/{uuid.uuid4().hex}", "volume_name": "local"}
    status, _, body = call(daemon, "POST", f"{HF}/import", {"registry_name": "hf", "models": [{"model_id": OTHER}],
                                                            "storage_step_target_mappings": {"download": missing}})
    assert status == 404 and body["error_code"] == "vfolder_read_not-found", body
