"""End to end: the real daemon (``twistd -n storage-proxy``) on loopback,
driven through every manager route by ``ManagerClient`` over real treq.

Each route is checked for its status, its Content-Type and its body.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from support.daemon import StorageProxyProcess

from storage import API_VERSION
from storage.manager_client import (
    AUTH_HEADER,
    BadRequest,
    Conflict,
    ManagerClient,
    NotFound,
    Unprocessable,
)
from storage.vfid import VFolderID

JSON = "application/json"
PROBLEM = "application/problem+json"
BASE = "https://api.backend.ai/probs/storage/"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageProxyProcess]:
    proc = StorageProxyProcess(tmp_path_factory.mktemp("e2e-manager"), volumes=("local", "other"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def client(daemon: StorageProxyProcess) -> ManagerClient:
    return ManagerClient(daemon.manager_url, daemon.manager_secret)


def content_type(client: ManagerClient) -> str | None:
    values = client.last_response.headers.getRawHeaders("content-type")
    return values[0] if values else None


def new_vfid(scope: str = "user") -> str:
    return f"{scope}:{uuid.uuid4()}/{uuid.uuid4().hex}"


def on_disk(daemon: StorageProxyProcess, vfid: str, volume: str = "local") -> Path:
    return daemon.volume_path(volume) / VFolderID.parse(vfid).relative_path()


async def raw(daemon: StorageProxyProcess, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, str | None, bytes]:
    kwargs: dict[str, Any] = {"headers": headers or {}}
    if body is not None:
        kwargs["data"] = json.dumps(body).encode()
    response = await treq.request(method, daemon.manager_url + path, **kwargs)
    data = await treq.content(response)
    ctype = response.headers.getRawHeaders("content-type")
    return response.code, ctype[0] if ctype else None, data


# -- unauthenticated routes ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_and_probes(daemon: StorageProxyProcess, client: ManagerClient) -> None:
    expected = {"status": "ok", "type": "manager-facing", "storage-proxy": API_VERSION}
    for path in ("/", "/status"):
        code, ctype, body = await raw(daemon, "GET", path)
        assert (code, ctype, json.loads(body)) == (200, JSON, expected)
    assert await client.status() == expected
    for probe in (client.health, client.livez, client.readyz):
        state = await probe()
        assert content_type(client) == JSON
        assert state["status"] == "ok" and state["component"] == "storage-proxy"
        checks = state["connectivity"]["connectivity_checks"]
        assert sorted(c["component_id"] for c in checks) == ["local", "other"]
        assert all(c["is_healthy"] for c in checks)


@pytest_twisted.ensureDeferred
async def test_metrics(client: ManagerClient) -> None:
    await client.volumes()
    text = await client.metrics()
    assert content_type(client).startswith("text/plain")
    assert 'storage_proxy_manager_requests_total{method="GET",route="/volumes",status="200"}' in text
    assert "process_resident_memory_bytes" in text


# -- auth ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_failures(daemon: StorageProxyProcess) -> None:
    code, ctype, body = await raw(daemon, "GET", "/volumes")
    assert (code, ctype) == (403, PROBLEM)
    assert json.loads(body) == {"type": BASE + "forbidden", "title": "Forbidden (missing auth token)",
                                "error_code": "vfolder_auth_forbidden"}
    code, ctype, body = await raw(daemon, "GET", "/volumes", headers={AUTH_HEADER: "wrong"})
    assert (code, ctype) == (403, PROBLEM)
    assert json.loads(body) == {"type": BASE + "forbidden", "title": "Forbidden (invalid auth token)",
                                "error_code": "vfolder_auth_forbidden"}
    code, _, body = await raw(daemon, "POST", "/folder/create", {"volume": "local", "vfid": new_vfid()},
                              headers={AUTH_HEADER: daemon.manager_secret[:-1]})
    assert code == 403


# -- volumes ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_volume_routes(daemon: StorageProxyProcess, client: ManagerClient) -> None:
    volumes = await client.volumes()
    assert content_type(client) == JSON
    assert {v["name"] for v in volumes} == {"local", "other"}
    local = next(v for v in volumes if v["name"] == "local")
    assert local["backend"] == "vfs" and "vfolder" in local["capabilities"]
    assert local["path"] == str(daemon.volume_path("local"))

    hwinfo = await client.hwinfo("local")
    assert content_type(client) == JSON
    assert hwinfo["status"] == "healthy"

    usage = await client.fs_usage("local")
    assert content_type(client) == JSON
    st = os.statvfs(daemon.volume_path("local"))
    assert usage["capacity_bytes"] == st.f_blocks * st.f_frsize
    assert 0 < usage["used_bytes"] <= usage["capacity_bytes"]

    with pytest.raises(BadRequest) as info:
        await client.performance_metric("local")
    assert info.value.problem_type == BASE + "unsupported-operation"
    for call in (client.get_quota("local"), client.set_quota("local", "1g")):
        with pytest.raises(BadRequest) as info:
            await call
        assert "deprecated API" in info.value.body["msg"]
    with pytest.raises(BadRequest) as info:
        await client.fs_usage("nowhere")
    assert info.value.problem_type == BASE + "volume/invalid"


# -- quota scopes (vfs: accepted, no real limit) ---------------------------------


@pytest_twisted.ensureDeferred
async def test_quota_scope_routes(client: ManagerClient) -> None:
    qsid = f"project:{uuid.uuid4()}"
    with pytest.raises(NotFound) as info:
        await client.get_quota_scope("local", qsid)
    assert info.value.problem_type == BASE + "quota/scope/not-found"

    assert await client.create_quota_scope("local", qsid, limit_bytes=1 << 30) is None
    assert client.last_response.code == 204
    with pytest.raises(Conflict) as info:
        await client.create_quota_scope("local", qsid)
    assert info.value.body["msg"] == "Volume already exists with given quota scope."

    state = await client.get_quota_scope("local", qsid)
    assert content_type(client) == JSON
    assert set(state) == {"used_bytes", "limit_bytes"}
    assert state["limit_bytes"] is None  # vfs has no quota

    await client.update_quota_scope("local", qsid, 2 << 30)
    assert client.last_response.code == 204
    fresh = f"user:{uuid.uuid4()}"
    await client.update_quota_scope("local", fresh, 1 << 20)  # creates a missing scope
    await client.get_quota_scope("local", fresh)
    await client.unset_quota("local", qsid)
    assert client.last_response.code == 204
    with pytest.raises(NotFound):
        await client.unset_quota("local", f"user:{uuid.uuid4()}")
    with pytest.raises(BadRequest) as info:
        await client.create_quota_scope("local", "group:nope")
    assert "qsid" in info.value.data


# -- the vfolder lifecycle -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_vfolder_lifecycle(daemon: StorageProxyProcess, client: ManagerClient) -> None:
    vfid = new_vfid()
    # create (the quota scope is created on the way), twice → 409
    assert await client.create_folder("local", vfid) is None
    assert client.last_response.code == 204
    path = on_disk(daemon, vfid)
    assert path.is_dir()
    with pytest.raises(Conflict) as info:
        await client.create_folder("local", vfid)
    assert info.value.body["type"] == BASE + "vfolder/already-exists"
    assert client.last_response.headers.getRawHeaders("content-type") == [PROBLEM]

    # mkdir: a batch (200), a batch with one existing (207), all existing (422)
    result = await client.mkdir("local", vfid, ["a", "b/c", "d"])
    assert client.last_response.code == 200 and content_type(client) == JSON
    assert sorted(r["item"] for r in result["results"]["success"]) == ["a", "b/c", "d"]
    assert result["results"]["failed"] == []
    result = await client.mkdir("local", vfid, ["a", "e"])
    assert client.last_response.code == 207
    assert [r["item"] for r in result["results"]["failed"]] == ["a"]
    assert result["results"]["failed"][0]["msg"]
    with pytest.raises(Unprocessable) as unprocessable:
        await client.mkdir("local", vfid, ["a", "d"])
    assert len(unprocessable.value.body["results"]["failed"]) == 2
    result = await client.mkdir("local", vfid, "a", exist_ok=True)
    assert client.last_response.code == 200

    # files to work with, written as a container would
    (path / "a" / "log.txt").write_bytes(b"hello\n" * 1000)
    (path / "top.bin").write_bytes(os.urandom(300_000))
    os.symlink("top.bin", path / "link")

    items = await client.list_files("local", vfid, ".")
    assert content_type(client) == JSON
    by_name = {i["name"]: i for i in items}
    assert set(by_name) == {"a", "b", "d", "e", "top.bin", "link"}
    assert by_name["a"]["type"] == "DIRECTORY" and by_name["top.bin"]["type"] == "FILE"
    assert by_name["link"]["type"] == "SYMLINK"
    assert by_name["top.bin"]["stat"]["size"] == 300_000
    assert set(by_name["top.bin"]["stat"]) == {"mode", "size", "created", "modified"}
    assert by_name["top.bin"]["stat"]["modified"].endswith("+00:00")
    assert [i["name"] for i in await client.list_files("local", vfid, "a")] == ["log.txt"]

    # rename, move
    assert await client.rename("local", vfid, "a", "logs") is None
    assert client.last_response.code == 204
    assert (path / "logs" / "log.txt").is_file() and not (path / "a").exists()
    await client.move("local", vfid, "top.bin", "b/c/moved.bin")
    assert client.last_response.code == 204
    assert (path / "b" / "c" / "moved.bin").stat().st_size == 300_000

    # fetch (streamed)
    data = await client.fetch("local", vfid, "b/c/moved.bin")
    assert data == (path / "b" / "c" / "moved.bin").read_bytes()
    code, ctype, body = await raw(daemon, "POST", "/folder/file/fetch",
                                  {"volume": "local", "vfid": vfid, "relpath": "logs/log.txt"},
                                  headers={AUTH_HEADER: daemon.manager_secret})
    assert (code, ctype, body) == (200, "application/octet-stream", b"hello\n" * 1000)
    # a missing file is an empty 200, as upstream (docs/manager-api.md says why)
    assert await client.fetch("local", vfid, "no/such/file") == b""

    # usage
    usage = await client.usage("local", vfid)
    assert content_type(client) == JSON
    assert usage["file_count"] >= 2
    assert usage["used_bytes"] >= 306_000
    used = await client.used_bytes("local", vfid)
    assert used >= 306_000
    fs = await client.fs_usage("local")
    assert fs["capacity_bytes"] >= fs["used_bytes"] > 0

    # metadata and mount
    assert (await client.get_metadata("local", vfid)) == {"status": "ok", "payload": None}
    assert await client.set_metadata("local", vfid, '{"owner": "me"}') == {"status": "ok"}
    assert await client.get_metadata("local", vfid) == {"status": "ok", "payload": '{"owner": "me"}'}
    assert Path(await client.mount("local", vfid)) == path.resolve()
    assert content_type(client) == JSON

    # clone (background), poll it
    clone = new_vfid()
    task_id = await client.clone_folder("local", vfid, clone)
    assert client.last_response.code == 200
    uuid.UUID(task_id)
    state = await client.wait_bgtask(task_id)
    assert state["status"] == "done" and state["name"] == "clone-vfolder"
    clone_path = on_disk(daemon, clone)
    assert (clone_path / "b" / "c" / "moved.bin").read_bytes() == (path / "b" / "c" / "moved.bin").read_bytes()
    original = sorted(i["name"] for i in await client.list_files("local", vfid, "."))
    assert sorted(i["name"] for i in await client.list_files("local", clone, ".")) == original
    # an existing destination fails the task (as upstream), leaving both untouched
    state = await client.wait_bgtask(await client.clone_folder("local", vfid, clone), raise_on_failure=False)
    assert state["status"] == "failed" and state["error"]["type"] == BASE + "vfolder/already-exists", state
    assert sorted(i["name"] for i in await client.list_files("local", clone, ".")) == original

    # delete files, sync and async
    with pytest.raises(BadRequest):  # a directory needs recursive (upstream silently skips it)
        await client.delete_files("local", vfid, ["d"])
    assert (path / "d").is_dir()
    assert await client.delete_files("local", vfid, ["link", "no-such-file"]) == {"status": "ok"}
    assert content_type(client) == JSON
    assert not os.path.lexists(path / "link")
    assert await client.delete_files("local", vfid, ["d"], recursive=True) == {"status": "ok"}
    assert not (path / "d").exists()
    task_id = await client.delete_files_async("local", vfid, ["logs"], recursive=True)
    assert client.last_response.code == 202
    assert (await client.wait_bgtask(task_id))["status"] == "done"
    assert not (path / "logs").exists()

    # delete the vfolders (background), poll
    for target, target_path in ((vfid, path), (clone, clone_path)):
        task_id = await client.delete_folder("local", target)
        assert client.last_response.code == 202
        assert (await client.wait_bgtask(task_id))["status"] == "done"
        assert not target_path.exists()
    with pytest.raises(NotFound) as info:
        await client.list_files("local", vfid, ".")
    assert info.value.problem_type == BASE + "vfolder/not-found"


@pytest_twisted.ensureDeferred
async def test_bare_uuid_vfolders(daemon: StorageProxyProcess, client: ManagerClient) -> None:
    vfid = str(uuid.uuid4())
    await client.create_folder("local", vfid)
    assert client.last_response.code == 204
    assert on_disk(daemon, vfid).is_dir()
    hexid = uuid.UUID(vfid).hex
    assert on_disk(daemon, vfid) == daemon.volume_path("local") / hexid[:2] / hexid[2:4] / hexid[4:]
    await client.mkdir("local", vfid, "x")
    assert [i["name"] for i in await client.list_files("local", vfid, ".")] == ["x"]
    task_id = await client.delete_folder("local", vfid)
    assert (await client.wait_bgtask(task_id))["status"] == "done"


@pytest_twisted.ensureDeferred
async def test_tokens(daemon: StorageProxyProcess, client: ManagerClient) -> None:
    vfid = new_vfid()
    await client.create_folder("local", vfid)

    token = await client.download_token("local", vfid, "dir//file.txt", archive=True)
    assert content_type(client) == JSON
    claims = jwt.decode(token, daemon.secret, algorithms=["HS256"])
    assert set(claims) == {"op", "volume", "vfid", "relpath", "exp"}
    assert claims["op"] == "download" and claims["vfid"] == vfid and claims["relpath"] == "dir/file.txt"

    token = await client.upload_token("local", vfid, "up/file.bin", 1234)
    claims = jwt.decode(token, daemon.secret, algorithms=["HS256"])
    assert set(claims) == {"op", "volume", "vfid", "relpath", "size", "session", "exp"}
    assert claims["op"] == "upload" and claims["size"] == 1234 and len(claims["session"]) == 32
    staging = on_disk(daemon, vfid) / ".upload" / claims["session"]
    assert staging.is_file() and staging.stat().st_size == 0

    token = await client.archive_download_token("local", vfid, ["a", "b/c"], filename="bundle.zip")
    claims = jwt.decode(token, daemon.secret, algorithms=["HS256"])
    assert set(claims) == {"operation", "volume", "virtual_folder_id", "files", "filename", "exp"}
    assert claims["files"] == ["a", "b/c"] and claims["filename"] == "bundle.zip"
    for bad in ("a/b.zip", "..", "x\ny"):
        with pytest.raises(BadRequest) as info:
            await client.archive_download_token("local", vfid, ["a"], filename=bad)
        assert "filename" in info.value.data
    with pytest.raises(BadRequest) as info:
        await client.archive_download_token("local", vfid, [])
    assert "files" in info.value.data
    with pytest.raises(BadRequest) as info:
        await client.upload_token("local", vfid, "../escape", 1)
    assert "relpath" in info.value.data


@pytest_twisted.ensureDeferred
async def test_bad_paths_touch_nothing(daemon: StorageProxyProcess, client: ManagerClient) -> None:
    vfid = new_vfid()
    await client.create_folder("local", vfid)
    outside = daemon.workdir / "outside.txt"
    outside.write_text("keep me")
    for relpath in ("../../../../../outside.txt", "/etc/passwd", "a\x00b"):
        with pytest.raises(BadRequest):
            await client.delete_files("local", vfid, [relpath])
        with pytest.raises(BadRequest):
            await client.fetch("local", vfid, relpath)
    os.symlink(daemon.workdir, on_disk(daemon, vfid) / "escape")
    with pytest.raises(BadRequest):
        await client.fetch("local", vfid, "escape/outside.txt")
    with pytest.raises(BadRequest):
        await client.list_files("local", vfid, "escape")
    assert outside.read_text() == "keep me"


@pytest_twisted.ensureDeferred
async def test_unknown_vfolder_is_404(client: ManagerClient) -> None:
    vfid = new_vfid()
    for call in (client.list_files("local", vfid, "."), client.usage("local", vfid),
                 client.fetch("local", vfid, "x"), client.mkdir("local", vfid, "x"),
                 client.upload_token("local", vfid, "x", 1)):
        with pytest.raises(NotFound) as info:
            await call
        assert info.value.problem_type == BASE + "vfolder/not-found"
    with pytest.raises(BadRequest) as info:
        await client.mount("local", vfid)
    assert info.value.body["msg"] == "VFolder not found"


@pytest_twisted.ensureDeferred
async def test_cross_volume_clone(client: ManagerClient, daemon: StorageProxyProcess) -> None:
    vfid = new_vfid()
    await client.create_folder("local", vfid)
    await client.mkdir("local", vfid, "sub")
    (on_disk(daemon, vfid) / "sub" / "data.bin").write_bytes(b"cross" * 1000)
    dst = new_vfid()
    task_id = await client.clone_folder("local", vfid, dst, dst_volume="other")
    state = await client.wait_bgtask(task_id)
    assert state["status"] == "done", state
    assert (on_disk(daemon, dst, "other") / "sub" / "data.bin").read_bytes() == b"cross" * 1000
    assert not on_disk(daemon, dst, "local").exists()
    # the same vfid may live on two volumes; an unknown destination volume is refused
    task_id = await client.clone_folder("local", vfid, vfid, dst_volume="other")
    failed = await client.clone_folder("local", vfid, new_vfid(), dst_volume="nowhere")
    state = await client.wait_bgtask(failed, raise_on_failure=False)
    assert state["status"] == "failed" and state["error"]["type"] == BASE + "volume/invalid", state
    assert (await client.wait_bgtask(task_id))["status"] == "done"


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413_problem_json(daemon: StorageProxyProcess) -> None:
    body = {"volume": "local", "vfid": new_vfid(), "relpaths": ["x" * 1000] * 2000}  # ~2 MB > the 1 MiB cap
    code, ctype, data = await raw(daemon, "POST", "/folder/file/delete", body,
                                  headers={AUTH_HEADER: daemon.manager_secret})
    assert (code, ctype) == (413, PROBLEM)
    assert json.loads(data)["type"].startswith(BASE)
    code, _, _ = await raw(daemon, "GET", "/")  # and the daemon is fine
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_every_route_status_content_type_and_body(daemon: StorageProxyProcess, client: ManagerClient) -> None:
    """One valid request per route on the real daemon: status, Content-Type and body shape."""
    vfid, qsid = new_vfid(), f"user:{uuid.uuid4()}"
    await client.create_folder("local", vfid)
    (on_disk(daemon, vfid) / "f.txt").write_bytes(b"data")
    v = {"volume": "local", "vfid": vfid}
    checks: list[tuple[str, str, Any, int, str | None, Any]] = [
        ("GET", "/", None, 200, JSON, lambda b: b["type"] == "manager-facing"),
        ("GET", "/status", None, 200, JSON, lambda b: b["status"] == "ok"),
        ("GET", "/health", None, 200, JSON, lambda b: b["component"] == "storage-proxy"),
        ("GET", "/livez", None, 200, JSON, lambda b: b["status"] == "ok"),
        ("GET", "/readyz", None, 200, JSON, lambda b: b["status"] == "ok"),
        ("GET", "/volumes", None, 200, JSON, lambda b: len(b["volumes"]) == 2),
        ("GET", "/volume/hwinfo", {"volume": "local"}, 200, JSON, lambda b: b["status"] == "healthy"),
        ("GET", "/volume/performance-metric", {"volume": "local"}, 400, PROBLEM,
         lambda b: b["type"] == BASE + "unsupported-operation"),
        ("GET", "/folder/fs-usage", {"volume": "local"}, 200, JSON, lambda b: b["capacity_bytes"] > 0),
        ("GET", "/volume/quota", {"volume": "local"}, 400, PROBLEM, lambda b: "deprecated" in b["msg"]),
        ("PATCH", "/volume/quota", {"volume": "local", "size_bytes": 10}, 400, PROBLEM,
         lambda b: "deprecated" in b["msg"]),
        ("POST", "/quota-scope", {"volume": "local", "qsid": qsid}, 204, None, None),
        ("GET", "/quota-scope", {"volume": "local", "qsid": qsid}, 200, JSON,
         lambda b: set(b) == {"used_bytes", "limit_bytes"}),
        ("PATCH", "/quota-scope", {"volume": "local", "qsid": qsid, "options": {"limit_bytes": 1}}, 204, None, None),
        ("DELETE", "/quota-scope/quota", {"volume": "local", "qsid": qsid}, 204, None, None),
        ("POST", "/folder/create", {"volume": "local", "vfid": new_vfid()}, 204, None, None),
        ("GET", "/folder/mount", v, 200, JSON, lambda b: b["path"].endswith(VFolderID.parse(vfid).folder_id.hex[4:])),
        ("POST", "/folder/metadata", {**v, "payload": "m"}, 200, JSON, lambda b: b == {"status": "ok"}),
        ("GET", "/folder/metadata", v, 200, JSON, lambda b: b == {"status": "ok", "payload": "m"}),
        ("GET", "/folder/usage", v, 200, JSON, lambda b: b["file_count"] >= 1),
        ("GET", "/folder/used-bytes", v, 200, JSON, lambda b: b["used_bytes"] >= 4),
        ("POST", "/folder/file/mkdir", {**v, "relpath": ["d1", "d2"]}, 200, JSON,
         lambda b: len(b["results"]["success"]) == 2),
        ("POST", "/folder/file/list", {**v, "relpath": "."}, 200, JSON,
         lambda b: {i["name"] for i in b["items"]} == {"f.txt", "d1", "d2"}),
        ("POST", "/folder/file/rename", {**v, "relpath": "d1", "new_name": "d3"}, 204, None, None),
        ("POST", "/folder/file/move", {**v, "src_relpath": "d3", "dst_relpath": "d2/d3"}, 204, None, None),
        ("POST", "/folder/file/fetch", {**v, "relpath": "f.txt"}, 200, "application/octet-stream", b"data"),
        ("POST", "/folder/file/download", {**v, "relpath": "f.txt"}, 200, JSON, lambda b: b["token"].count(".") == 2),
        ("POST", "/folder/file/archive-download-token", {"volume": "local", "virtual_folder_id": vfid,
                                                          "files": ["f.txt"]}, 200, JSON, lambda b: "token" in b),
        ("POST", "/folder/file/upload", {**v, "relpath": "u.bin", "size": 3}, 200, JSON, lambda b: "token" in b),
        ("POST", "/folder/file/delete", {**v, "relpaths": ["f.txt"]}, 200, JSON, lambda b: b == {"status": "ok"}),
        ("POST", "/folder/file/delete-async", {**v, "relpaths": ["d2"], "recursive": True}, 202, JSON,
         lambda b: uuid.UUID(b["bgtask_id"])),
        ("POST", "/folder/clone", {"src_volume": "local", "src_vfid": vfid, "dst_volume": None,
                                   "dst_vfid": new_vfid()}, 200, JSON, lambda b: uuid.UUID(b["bgtask_id"])),
        ("POST", "/folder/delete", {"volume": "local", "vfid": new_vfid()}, 202, JSON,
         lambda b: uuid.UUID(b["bgtask_id"])),
    ]
    headers = {AUTH_HEADER: daemon.manager_secret}
    last_task = None
    for method, path, body, status, ctype, check in checks:
        code, got_type, data = await raw(daemon, method, path, body, headers=headers)
        assert (code, got_type) == (status, ctype), (method, path, data[:300])
        if isinstance(check, bytes):
            assert data == check, path
        elif check is not None:
            parsed = json.loads(data)
            assert check(parsed), (path, parsed)
            last_task = parsed.get("bgtask_id", last_task) if isinstance(parsed, dict) else last_task
        else:
            assert data == b"", path
    code, got_type, data = await raw(daemon, "GET", f"/bgtask/{last_task}", headers=headers)
    assert (code, got_type) == (200, JSON) and json.loads(data)["task_id"] == last_task
    code, got_type, data = await raw(daemon, "POST", f"/bgtask/{last_task}/cancel", headers=headers)
    assert code in (200, 202) and got_type == JSON
    code, got_type, data = await raw(daemon, "GET", "/metrics")
    assert code == 200 and got_type.startswith("text/plain") and b"storage_proxy_manager_requests_total" in data


@pytest_twisted.ensureDeferred
async def test_odd_urls_get_problem_json_never_html(daemon: StorageProxyProcess) -> None:
    for path, status in (("/%ff", 400), ("/no/such/route", 404), ("/volumes/", 404)):
        response = await treq.request("GET", daemon.manager_url.encode() + path.encode(),
                                      headers={AUTH_HEADER: daemon.manager_secret})
        await treq.content(response)
        assert response.code == status, path
        assert response.headers.getRawHeaders("content-type") == [PROBLEM], path
