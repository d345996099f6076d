"""Every manager route, socket-free: ``ManagerAPI`` on a real vfs volume in a
tmp dir (real blocking pool), driven through ``StubTreq``."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import pytest_twisted
from support.manager import StubManager, stub_manager_fixture

from storage.manager_client import BadRequest, NotFound, Unprocessable
from storage.vfid import VFolderID

JSON = "application/json"
PROBLEM = "application/problem+json"
BASE = "https://api.backend.ai/probs/storage/"


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[StubManager]:
    yield from stub_manager_fixture(tmp_path, volumes=("local", "other"))


def new_vfid(scope: str = "user") -> str:
    return f"{scope}:{uuid.uuid4()}/{uuid.uuid4().hex}"


def on_disk(manager: StubManager, vfid: str) -> Path:
    return manager.volume_path("local") / VFolderID.parse(vfid).relative_path()


async def made(manager: StubManager, vfid: str | None = None) -> tuple[str, Path]:
    vfid = vfid or new_vfid()
    await manager.client.create_folder("local", vfid)
    return vfid, on_disk(manager, vfid)


@pytest_twisted.ensureDeferred
async def test_volumes_and_volume_info(manager: StubManager) -> None:
    r = await manager.request("GET", "/volumes")
    assert (r.code, r.content_type) == (200, JSON)
    names = [v["name"] for v in r.json()["volumes"]]
    assert sorted(names) == ["local", "other"]
    r = await manager.request("GET", "/volumes", {"volume": "local"})
    assert r.code == 400  # no parameters: a body is refused, as upstream
    r = await manager.request("GET", "/volume/hwinfo", {"volume": "local"})
    assert (r.code, r.content_type) == (200, JSON)
    assert r.json() == {"status": "healthy", "status_info": None, "metadata": {}}
    r = await manager.request("GET", "/folder/fs-usage", {"volume": "local"})
    assert set(r.json()) == {"capacity_bytes", "used_bytes"}
    r = await manager.request("GET", "/volume/performance-metric", {"volume": "local"})
    assert (r.code, r.json()["type"]) == (400, BASE + "unsupported-operation")


@pytest_twisted.ensureDeferred
async def test_quota_scopes(manager: StubManager) -> None:
    qsid = f"user:{uuid.uuid4()}"
    body = {"volume": "local", "qsid": qsid}
    r = await manager.request("GET", "/quota-scope", body)
    assert (r.code, r.content_type) == (404, PROBLEM)
    r = await manager.request("POST", "/quota-scope", {**body, "options": {"limit_bytes": 10}})
    assert (r.code, r.body) == (204, b"")
    r = await manager.request("POST", "/quota-scope", body)
    assert (r.code, r.json()["msg"]) == (409, "Volume already exists with given quota scope.")
    r = await manager.request("GET", "/quota-scope", body)
    assert r.code == 200 and r.json()["limit_bytes"] is None
    r = await manager.request("PATCH", "/quota-scope", body)
    assert (r.code, set(r.json()["data"])) == (400, {"options"})  # options is required
    r = await manager.request("PATCH", "/quota-scope", {**body, "options": {"limit_bytes": "x"}})
    assert r.code == 400 and "options" in r.json()["data"]
    r = await manager.request("PATCH", "/quota-scope", {**body, "options": {"limit_bytes": 1 << 30}})
    assert r.code == 204
    r = await manager.request("DELETE", "/quota-scope/quota", body)
    assert r.code == 204
    r = await manager.request("DELETE", "/quota-scope/quota", {"volume": "local", "qsid": f"project:{uuid.uuid4()}"})
    assert (r.code, r.json()["type"]) == (404, BASE + "quota/scope/not-found")


@pytest_twisted.ensureDeferred
async def test_create_vfolder(manager: StubManager) -> None:
    vfid = new_vfid("project")
    r = await manager.request("POST", "/folder/create", {"volume": "local", "vfid": vfid, "mode": 0o750,
                                                         "options": {"initial_max_size_for_quota_scope": 1 << 20}})
    assert (r.code, r.body) == (204, b"")
    path = on_disk(manager, vfid)
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    r = await manager.request("POST", "/folder/create", {"volume": "local", "vfid": vfid})
    assert (r.code, r.content_type, r.json()["type"]) == (409, PROBLEM, BASE + "vfolder/already-exists")
    bare = str(uuid.uuid4())
    r = await manager.request("POST", "/folder/create", {"volume": "local", "vfid": bare, "mode": None})
    assert r.code == 204
    assert stat.S_IMODE(on_disk(manager, bare).stat().st_mode) == 0o775  # upstream's default
    for bad in ({"mode": 0o77777}, {"mode": "rwx"}, {"vfid": "user:nope/abc"}, {"options": []}):
        r = await manager.request("POST", "/folder/create", {"volume": "local", "vfid": new_vfid(), **bad})
        assert r.code == 400 and set(r.json()["data"]) == set(bad), bad


@pytest_twisted.ensureDeferred
async def test_no_auto_quota_scope_when_disabled(tmp_path: Path) -> None:
    strict = StubManager(tmp_path / "strict",
                         extra_config={"storage-proxy": {"allow-auto-quota-scope-creation": False}})
    try:
        vfid = new_vfid()
        r = await strict.request("POST", "/folder/create", {"volume": "local", "vfid": vfid})
        assert (r.code, r.json()["type"]) == (404, BASE + "quota/scope/not-found")
        qsid = vfid.split("/")[0]
        await strict.client.create_quota_scope("local", qsid)
        r = await strict.request("POST", "/folder/create", {"volume": "local", "vfid": vfid})
        assert r.code == 204
    finally:
        strict.close()


@pytest_twisted.ensureDeferred
async def test_mkdir_results(manager: StubManager) -> None:
    vfid, path = await made(manager)
    body = {"volume": "local", "vfid": vfid}
    r = await manager.request("POST", "/folder/file/mkdir", {**body, "relpath": "one"})
    assert (r.code, r.json()) == (200, {"results": {"success": [{"msg": None, "item": "one"}], "failed": []}})
    r = await manager.request("POST", "/folder/file/mkdir", {**body, "relpath": ["one", "two/three"]})
    assert r.code == 207
    assert r.json()["results"]["success"] == [{"msg": None, "item": "two/three"}]
    assert r.json()["results"]["failed"][0]["item"] == "one"
    r = await manager.request("POST", "/folder/file/mkdir", {**body, "relpath": ["x/y"], "parents": False})
    assert r.code == 422 and r.json()["results"]["failed"][0]["item"] == "x/y"
    r = await manager.request("POST", "/folder/file/mkdir", {**body, "relpath": [f"d{i}" for i in range(51)]})
    assert r.code == 400 and "relpath" in r.json()["data"]
    r = await manager.request("POST", "/folder/file/mkdir", {**body, "relpath": []})
    assert r.code == 400
    r = await manager.request("POST", "/folder/file/mkdir", {**body, "relpath": [f"d{i}" for i in range(50)]})
    assert r.code == 200 and len(r.json()["results"]["success"]) == 50
    assert all((path / f"d{i}").is_dir() for i in range(50))
    with pytest.raises(Unprocessable):
        await manager.client.mkdir("local", vfid, ["one"])


@pytest_twisted.ensureDeferred
async def test_list_rename_move_fetch(manager: StubManager) -> None:
    vfid, path = await made(manager)
    (path / "dir").mkdir()
    (path / "dir" / "f.txt").write_bytes(b"x" * 1000)
    os.symlink("dir/f.txt", path / "ln")
    items = await manager.client.list_files("local", vfid, ".")
    by_name = {i["name"]: i for i in items}
    assert {n: i["type"] for n, i in by_name.items()} == {"dir": "DIRECTORY", "ln": "SYMLINK"}
    assert by_name["ln"]["stat"]["mode"] == os.lstat(path / "ln").st_mode

    await manager.client.rename("local", vfid, "dir/f.txt", "g.txt", is_dir="false")
    assert (path / "dir" / "g.txt").is_file()
    with pytest.raises(BadRequest) as info:
        await manager.client.rename("local", vfid, "dir/g.txt", "../escape")
    assert "new_name" in info.value.data
    await manager.client.move("local", vfid, "dir/g.txt", "moved.txt")
    assert (path / "moved.txt").read_bytes() == b"x" * 1000
    with pytest.raises(BadRequest):
        await manager.client.move("local", vfid, "moved.txt", "../../out.txt")

    assert await manager.client.fetch("local", vfid, "moved.txt") == b"x" * 1000
    r = await manager.request("POST", "/folder/file/fetch", {"volume": "local", "vfid": vfid, "relpath": "moved.txt"})
    assert (r.code, r.content_type, r.body) == (200, "application/octet-stream", b"x" * 1000)
    big = os.urandom(1 << 20)
    (path / "big.bin").write_bytes(big)
    assert await manager.client.fetch("local", vfid, "big.bin") == big
    r = await manager.request("POST", "/folder/file/fetch", {"volume": "local", "vfid": vfid, "relpath": "dir"})
    assert (r.code, r.content_type) == (400, PROBLEM)
    # a missing file is an empty 200, as upstream (the manager shows a task log
    # not written yet as empty); in a missing directory too
    for missing in ("nope", "no/such/dir/file"):
        r = await manager.request("POST", "/folder/file/fetch", {"volume": "local", "vfid": vfid, "relpath": missing})
        assert (r.code, r.content_type, r.body) == (200, "application/octet-stream", b"")
    r = await manager.request("POST", "/folder/file/fetch", {"volume": "local", "vfid": new_vfid(), "relpath": "x"})
    assert (r.code, r.json()["type"]) == (404, BASE + "vfolder/not-found")


@pytest_twisted.ensureDeferred
async def test_usage_metadata_mount(manager: StubManager) -> None:
    vfid, path = await made(manager)
    (path / "a").write_bytes(b"a" * 5000)
    usage = await manager.client.usage("local", vfid)
    assert usage["file_count"] >= 1 and usage["used_bytes"] >= 5000
    assert await manager.client.used_bytes("local", vfid) >= 5000

    assert await manager.client.get_metadata("local", vfid) == {"status": "ok", "payload": None}
    assert await manager.client.set_metadata("local", vfid, "héllo") == {"status": "ok"}
    assert await manager.client.get_metadata("local", vfid) == {"status": "ok", "payload": "héllo"}
    r = await manager.request("POST", "/folder/metadata", {"volume": "local", "vfid": vfid, "payload": 3})
    assert r.code == 400 and "payload" in r.json()["data"]

    r = await manager.request("GET", "/folder/mount", {"volume": "local", "vfid": vfid})
    assert (r.code, r.json()) == (200, {"path": str(path.resolve())})
    r = await manager.request("GET", "/folder/mount", {"volume": "local", "vfid": vfid, "subpath": "../.."})
    assert r.code == 400
    assert r.json()["msg"] == "Invalid vfolder subpath" and r.json()["subpath"] == "../.."
    r = await manager.request("GET", "/folder/mount", {"volume": "local", "vfid": new_vfid()})
    assert (r.code, r.json()["msg"]) == (400, "VFolder not found")


@pytest_twisted.ensureDeferred
async def test_tokens_and_upload_staging(manager: StubManager) -> None:
    vfid, path = await made(manager)
    token = await manager.client.download_token("local", vfid, "a/./b", unmanaged_path="/x")
    claims = jwt.decode(token, manager.secret, algorithms=["HS256"])
    assert {k: claims[k] for k in ("op", "volume", "vfid", "relpath")} == {
        "op": "download", "volume": "local", "vfid": vfid, "relpath": "a/b"}
    assert "archive" not in claims and "unmanaged_path" not in claims

    token = await manager.client.upload_token("local", vfid, "dir/up.bin", 10)
    claims = jwt.decode(token, manager.secret, algorithms=["HS256"])
    assert claims["size"] == 10 and claims["relpath"] == "dir/up.bin"
    assert (path / ".upload" / claims["session"]).is_file()
    for bad in ({"size": -1}, {"size": "ten"}, {"relpath": "."}, {"relpath": "/abs"}):
        r = await manager.request("POST", "/folder/file/upload",
                                  {"volume": "local", "vfid": vfid, "relpath": "f", "size": 1, **bad})
        assert r.code == 400 and set(r.json()["data"]) == set(bad), bad

    token = await manager.client.archive_download_token("local", vfid, ["a", "b"])
    claims = jwt.decode(token, manager.secret, algorithms=["HS256"])
    assert claims["operation"] == "download" and claims["filename"] is None
    assert claims["virtual_folder_id"] == vfid


@pytest_twisted.ensureDeferred
async def test_delete_files_sync_and_async(manager: StubManager) -> None:
    vfid, path = await made(manager)
    (path / "d" / "e").mkdir(parents=True)
    (path / "f").write_bytes(b"f")
    assert await manager.client.delete_files("local", vfid, ["f"]) == {"status": "ok"}
    assert not (path / "f").exists()
    r = await manager.request("POST", "/folder/file/delete", {"volume": "local", "vfid": vfid, "relpaths": "d"})
    assert r.code == 400 and "relpaths" in r.json()["data"]
    r = await manager.request("POST", "/folder/file/delete-async",
                              {"volume": "local", "vfid": vfid, "relpaths": ["d"], "recursive": True})
    assert (r.code, r.content_type) == (202, JSON)
    state = await manager.client.wait_bgtask(r.json()["bgtask_id"])
    assert state["status"] == "done" and state["name"] == "delete-files"
    assert not (path / "d").exists()


@pytest_twisted.ensureDeferred
async def test_clone_and_delete_vfolder(manager: StubManager) -> None:
    vfid, path = await made(manager)
    (path / "sub").mkdir()
    (path / "sub" / "data").write_bytes(b"payload")
    clone = new_vfid()
    r = await manager.request("POST", "/folder/clone", {"src_volume": "local", "src_vfid": vfid,
                                                        "dst_volume": None, "dst_vfid": clone, "extra": 1})
    assert (r.code, r.content_type) == (200, JSON)  # extra keys are allowed here, as upstream
    state = await manager.client.wait_bgtask(r.json()["bgtask_id"])
    assert state["status"] == "done"
    assert (on_disk(manager, clone) / "sub" / "data").read_bytes() == b"payload"

    # A missing source, an existing destination, an unknown volume: accepted, and
    # the task fails (as upstream; the manager only releases its CLONING source on
    # a clone event, so a refusal here would leave it stuck).
    for body, problem in [
        ({"src_volume": "local", "src_vfid": new_vfid(), "dst_volume": "local", "dst_vfid": new_vfid()},
         "vfolder/not-found"),
        ({"src_volume": "local", "src_vfid": vfid, "dst_volume": None, "dst_vfid": clone}, "vfolder/already-exists"),
        ({"src_volume": "local", "src_vfid": vfid, "dst_volume": None, "dst_vfid": vfid}, "vfolder/already-exists"),
        ({"src_volume": "local", "src_vfid": vfid, "dst_volume": "nowhere", "dst_vfid": new_vfid()}, "volume/invalid"),
        ({"src_volume": "nowhere", "src_vfid": vfid, "dst_volume": None, "dst_vfid": new_vfid()}, "volume/invalid"),
    ]:
        r = await manager.request("POST", "/folder/clone", body)
        assert r.code == 200, r.body
        state = await manager.client.wait_bgtask(r.json()["bgtask_id"], raise_on_failure=False)
        assert state["status"] == "failed" and state["error"]["type"] == BASE + problem, (body, state)
    assert (on_disk(manager, clone) / "sub" / "data").read_bytes() == b"payload"  # untouched
    r = await manager.request("POST", "/folder/clone", {"src_volume": "local", "src_vfid": vfid, "dst_vfid": clone})
    assert r.code == 400 and "dst_volume" in r.json()["data"]  # a required key, even if null

    r = await manager.request("POST", "/folder/delete", {"volume": "local", "vfid": vfid})
    assert (r.code, r.content_type) == (202, JSON)
    state = await manager.client.wait_bgtask(r.json()["bgtask_id"])
    assert state["status"] == "done" and state["name"] == "delete-vfolder"
    assert not path.exists()
    with pytest.raises(NotFound):
        await manager.client.list_files("local", vfid)
    # Deleting again (a retry) is accepted and done.
    state = await manager.client.wait_bgtask(await manager.client.delete_folder("local", vfid))
    assert state["status"] == "done"


@pytest_twisted.ensureDeferred
async def test_request_records_the_volume_for_logging(manager: StubManager, monkeypatch) -> None:
    seen = []
    volume = manager.volume()
    original = volume.get_fs_usage

    async def spy():
        return await original()

    monkeypatch.setattr(volume, "get_fs_usage", spy)
    from storage.api import manager as manager_module

    real = manager_module.ManagerAPI._volume

    def record(self, request, name):
        result = real(self, request, name)
        seen.append(getattr(request, "storage_volume", None))
        return result

    monkeypatch.setattr(manager_module.ManagerAPI, "_volume", record)
    await manager.client.fs_usage("local")
    assert seen == ["local"]


@pytest_twisted.ensureDeferred
async def test_os_errors_of_file_operations_are_upstreams_400(manager: StubManager, monkeypatch) -> None:
    vfid, path = await made(manager)
    volume = manager.volume()

    async def denied(vfid_, relpath, new_name):
        raise PermissionError(13, "Permission denied", str(path / "a" / "b"), None, "/elsewhere/secret/c")

    monkeypatch.setattr(volume, "rename", denied)
    r = await manager.request("POST", "/folder/file/rename",
                              {"volume": "local", "vfid": vfid, "relpath": "a/b", "new_name": "c"})
    assert (r.code, r.content_type) == (400, PROBLEM)
    body = r.json()
    assert (body["msg"], body["errno"], body["paths"]) == ("Permission denied", 13, ["a/b", "c"])


@pytest_twisted.ensureDeferred
async def test_an_integer_parameter_with_two_signs_is_400_not_500(manager: StubManager) -> None:
    qsid = f"user:{uuid.uuid4()}"
    for bad in ("+-5", "²"):
        r = await manager.request("PATCH", "/quota-scope",
                                  {"volume": "local", "qsid": qsid, "options": {"limit_bytes": bad}})
        assert (r.code, r.content_type) == (400, PROBLEM), bad
        assert "options" in r.json()["data"]
        r = await manager.request("POST", "/folder/file/upload",
                                  {"volume": "local", "vfid": new_vfid(), "relpath": "a", "size": bad})
        assert (r.code, r.content_type) == (400, PROBLEM), bad
        assert set(r.json()["data"]) == {"size"}
