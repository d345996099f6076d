"""Manager API: auth, bad input and error shapes (socket-free, StubTreq)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.manager import StubManager, stub_manager_fixture
from twisted.logger import globalLogPublisher

from storage.vfid import VFolderID

PROBLEM = "application/problem+json"
BASE = "https://api.backend.ai/probs/storage/"

@pytest.fixture
def manager(tmp_path) -> Iterator[StubManager]:
    yield from stub_manager_fixture(tmp_path)


# Every authenticated route with a minimal body (what goes first is the auth check).
AUTHED_ROUTES = [
    ("GET", "/volumes"), ("GET", "/volume/hwinfo"), ("POST", "/quota-scope"), ("GET", "/quota-scope"),
    ("PATCH", "/quota-scope"), ("DELETE", "/quota-scope/quota"), ("POST", "/folder/create"),
    ("POST", "/folder/delete"), ("POST", "/folder/clone"), ("GET", "/folder/mount"),
    ("GET", "/volume/performance-metric"), ("GET", "/folder/metadata"), ("POST", "/folder/metadata"),
    ("GET", "/volume/quota"), ("PATCH", "/volume/quota"), ("GET", "/folder/usage"),
    ("GET", "/folder/used-bytes"), ("GET", "/folder/fs-usage"), ("POST", "/folder/file/mkdir"),
    ("POST", "/folder/file/list"), ("POST", "/folder/file/rename"), ("POST", "/folder/file/move"),
    ("POST", "/folder/file/fetch"), ("POST", "/folder/file/download"),
    ("POST", "/folder/file/archive-download-token"), ("POST", "/folder/file/upload"),
    ("POST", "/folder/file/delete"), ("POST", "/folder/file/delete-async"),
    ("GET", f"/bgtask/{uuid.uuid4()}"), ("POST", f"/bgtask/{uuid.uuid4()}/cancel"),
]


@pytest.mark.parametrize("method,path", AUTHED_ROUTES)
@pytest_twisted.ensureDeferred
async def test_missing_token_is_upstreams_403(manager: StubManager, method: str, path: str) -> None:
    r = await manager.request(method, path, {"volume": "local"}, auth=False)
    assert r.code == 403
    assert r.content_type == PROBLEM
    assert r.json() == {"type": BASE + "forbidden", "title": "Forbidden (missing auth token)",
                        "error_code": "vfolder_auth_forbidden"}


@pytest.mark.parametrize("method,path", AUTHED_ROUTES)
@pytest_twisted.ensureDeferred
async def test_wrong_token_is_upstreams_403(manager: StubManager, method: str, path: str) -> None:
    r = await manager.request(method, path, {"volume": "local"}, auth="not-the-secret")
    assert r.code == 403
    assert r.content_type == PROBLEM
    assert r.json() == {"type": BASE + "forbidden", "title": "Forbidden (invalid auth token)",
                        "error_code": "vfolder_auth_forbidden"}


@pytest_twisted.ensureDeferred
async def test_token_prefix_or_extension_is_refused(manager: StubManager) -> None:
    for token in (manager.manager_secret[:-1], manager.manager_secret + "x", "x" + manager.manager_secret):
        r = await manager.request("GET", "/volumes", auth=token)
        assert r.code == 403, token


@pytest.mark.parametrize("path", ["/", "/status", "/health", "/livez", "/readyz", "/metrics"])
@pytest_twisted.ensureDeferred
async def test_unauthenticated_routes(manager: StubManager, path: str) -> None:
    r = await manager.request("GET", path, auth=False)
    assert r.code == 200
    assert "html" not in (r.content_type or "")


@pytest_twisted.ensureDeferred
async def test_status_refuses_a_body_as_upstream(manager: StubManager) -> None:
    r = await manager.request("GET", "/status", {"x": 1}, auth=False)
    assert r.code == 400
    assert r.json() == {"type": BASE + "malformed-request",
                        "title": "Malformed request (request body should be empty)",
                        "error_code": "vfolder_request_bad-request"}


@pytest_twisted.ensureDeferred
async def test_malformed_json_names_the_body(manager: StubManager) -> None:
    r = await manager.request("GET", "/folder/fs-usage", raw=b'{"volume": "local"')
    assert r.code == 400
    assert r.content_type == PROBLEM
    body = r.json()
    assert body["type"] == BASE + "invalid-api-params"
    assert body["title"] == "Invalid API parameters"
    assert "body" in body["data"]


@pytest.mark.parametrize("raw", [b"[]", b'"local"', b"3", b"null", b"\xff\xfe", b"NaN", b"[" * 100000])
@pytest_twisted.ensureDeferred
async def test_non_object_bodies_are_400(manager: StubManager, raw: bytes) -> None:
    r = await manager.request("GET", "/folder/fs-usage", raw=raw)
    assert r.code == 400
    assert r.content_type == PROBLEM
    data = r.json()["data"]
    assert "body" in data or "volume" in data  # null body means: volume is missing


@pytest_twisted.ensureDeferred
async def test_missing_and_wrong_typed_params_are_named(manager: StubManager) -> None:
    r = await manager.request("POST", "/folder/file/mkdir", {"volume": 3, "vfid": "nope", "parents": "maybe"})
    assert r.code == 400
    data = r.json()["data"]
    assert set(data) == {"volume", "vfid", "relpath", "parents"}
    assert data["relpath"] == "is required"


@pytest_twisted.ensureDeferred
async def test_unknown_keys_are_refused_as_upstream(manager: StubManager) -> None:
    r = await manager.request("GET", "/folder/fs-usage", {"volume": "local", "colour": "blue"})
    assert r.code == 400
    assert r.json()["data"] == {"colour": "colour is not allowed key"}


@pytest_twisted.ensureDeferred
async def test_unknown_volume_is_volume_invalid(manager: StubManager) -> None:
    r = await manager.request("GET", "/folder/fs-usage", {"volume": "nowhere"})
    assert r.code == 400
    assert r.content_type == PROBLEM
    assert r.json()["type"] == BASE + "volume/invalid"


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413(tmp_path) -> None:
    small = StubManager(tmp_path, extra_config={"storage-proxy": {"max-manager-body-size": 1024}})
    try:
        r = await small.request("POST", "/folder/file/delete",
                                  {"volume": "local", "vfid": str(uuid.uuid4()), "relpaths": ["x" * 2000]})
        assert r.code == 413
        assert r.content_type == PROBLEM
        assert r.json()["type"] == BASE + "request-too-large"
    finally:
        small.close()


@pytest.mark.parametrize("method", ["GET", "PATCH"])
@pytest_twisted.ensureDeferred
async def test_volume_quota_is_deprecated(manager: StubManager, method: str) -> None:
    body = {"volume": "local"} if method == "GET" else {"volume": "local", "size_bytes": "1g"}
    r = await manager.request(method, "/volume/quota", body)
    assert r.code == 400
    assert r.content_type == PROBLEM
    assert "deprecated API" in r.json()["msg"]


@pytest_twisted.ensureDeferred
async def test_unknown_route_and_method_are_problem_json(manager: StubManager) -> None:
    r = await manager.request("GET", "/no/such/route")
    assert (r.code, r.content_type) == (404, PROBLEM)
    r = await manager.request("PUT", "/volumes")
    assert (r.code, r.content_type) == (405, PROBLEM)


@pytest.mark.parametrize("path", ["/%ff", "/folder/%c3%28", "/bgtask/%80"])
@pytest_twisted.ensureDeferred
async def test_non_utf8_paths_are_problem_json(manager: StubManager, path: str) -> None:
    r = await manager.request("GET", path)
    assert (r.code, r.content_type) == (400, PROBLEM)


@pytest_twisted.ensureDeferred
async def test_unexpected_failure_is_json_500_not_html(manager: StubManager, monkeypatch) -> None:
    volume = manager.volume()

    async def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(volume, "get_fs_usage", broken)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        r = await manager.request("GET", "/folder/fs-usage", {"volume": "local"})
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert r.code == 500
    assert r.content_type == PROBLEM
    assert "boom" not in r.body.decode()  # logged, not leaked
    logged = [e for e in events if e.get("log_failure") is not None]
    assert logged and logged[0]["volume"] == "local" and logged[0]["path"] == "/folder/fs-usage"


@pytest_twisted.ensureDeferred
async def test_unknown_bgtask_is_404_and_bad_id_is_400(manager: StubManager) -> None:
    r = await manager.request("GET", f"/bgtask/{uuid.uuid4()}")
    assert (r.code, r.content_type) == (404, PROBLEM)
    r = await manager.request("GET", "/bgtask/not-a-uuid")
    assert r.code == 400
    assert "task_id" in r.json()["data"]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["volume", "vfid", "relpath", "relpaths", "qsid", "options", "mode", "size", "parents",
                         "new_name", "src_relpath", "dst_relpath", "files", "filename", "payload", "subpath"])


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(route=st.sampled_from(AUTHED_ROUTES),
       body=st.one_of(_json_values, st.dictionaries(_keys, _json_values, max_size=6)))
@pytest_twisted.ensureDeferred
async def test_no_response_is_ever_html_or_a_500(manager: StubManager, route, body) -> None:
    method, path = route
    if path.startswith("/folder/delete") or path.endswith("delete-async") or path.startswith("/folder/clone"):
        body = {k: v for k, v in body.items() if k != "vfid"} if isinstance(body, dict) else body
    r = await manager.request(method, path, raw=json.dumps(body).encode())
    assert "html" not in (r.content_type or ""), r.body[:200]
    assert r.code < 500, (method, path, body, r.body[:300])
    if r.code == 422 and path == "/folder/file/mkdir":
        assert r.content_type == "application/json" and "results" in r.json()  # upstream's shape
    elif r.code >= 400:
        assert r.content_type == PROBLEM


VFID = "user:00000000-0000-0000-0000-0000000000aa/000000000000000000000000000000bb"
_plausible: dict[str, st.SearchStrategy] = {
    "volume": st.sampled_from(["local"] * 8 + ["nowhere", ""]),
    "src_volume": st.just("local"),
    "dst_volume": st.sampled_from([None, "local", "other"]),
    "vfid": st.sampled_from([VFID] * 8 + [str(uuid.UUID(int=7)), "user:x/y"]),
    "src_vfid": st.just(VFID),
    "dst_vfid": st.sampled_from([VFID, f"user:{uuid.UUID(int=1)}/{uuid.UUID(int=2).hex}"]),
    "virtual_folder_id": st.just(VFID),
    "qsid": st.sampled_from(["user:00000000-0000-0000-0000-0000000000aa", "project:" + str(uuid.UUID(int=3))]),
    "relpath": st.sampled_from([".", "a", "a/b", "f.txt", "..", "/etc", "a\x00", "ln", "x" * 300, ["a", "c"]]),
    "relpaths": st.lists(st.sampled_from([".", "a", "f.txt", "ln", "a/b", "missing", ".."]), max_size=3),
    "src_relpath": st.sampled_from([".", "a", "f.txt", "ln", "a/b"]),
    "dst_relpath": st.sampled_from([".", "a", "f.txt", "ln", "a/b/c", "new", "f.txt/x"]),
    "new_name": st.sampled_from(["n", ".", "..", "a/b", "f.txt", "", "x" * 300]),
    "subpath": st.sampled_from([".", "a", "..", "ln"]),
    "files": st.lists(st.sampled_from(["a", "f.txt", "..", "/x"]), max_size=3),
    "filename": st.sampled_from([None, "x.zip", "..", "a/b"]),
    "payload": st.sampled_from(["p", "", "\ud800"]),
    "size": st.sampled_from([0, 1, -1, 10**30, "5"]),
    "size_bytes": st.sampled_from([1, "1g", "x"]),
    "mode": st.sampled_from([None, 0o755, 0o7777, -1, 10**9]),
    "options": st.sampled_from([None, {}, {"limit_bytes": 1}, {"initial_max_size_for_quota_scope": "x"}]),
    "parents": st.booleans(),
    "exist_ok": st.booleans(),
    "recursive": st.booleans(),
    "archive": st.booleans(),
}
_V, _F = ["volume"], ["volume", "vfid"]
# (required, optional) parameters of each route
ROUTE_KEYS: dict[str, tuple[list[str], list[str]]] = {
    "/volume/hwinfo": (_V, []), "/volume/performance-metric": (_V, []), "/folder/fs-usage": (_V, []),
    "/quota-scope": (["volume", "qsid"], ["options"]), "/quota-scope/quota": (["volume", "qsid"], []),
    "/folder/create": (_F, ["mode", "options"]), "/folder/delete": (_F, []),
    "/folder/clone": (["src_volume", "src_vfid", "dst_volume", "dst_vfid"], []),
    "/folder/mount": (_F, ["subpath"]), "/folder/metadata": (_F, ["payload"]),
    "/volume/quota": (_V, ["vfid", "size_bytes"]), "/folder/usage": (_F, []), "/folder/used-bytes": (_F, []),
    "/folder/file/mkdir": (_F + ["relpath"], ["parents", "exist_ok"]),
    "/folder/file/list": (_F + ["relpath"], []),
    "/folder/file/rename": (_F + ["relpath", "new_name"], []),
    "/folder/file/move": (_F + ["src_relpath", "dst_relpath"], []),
    "/folder/file/fetch": (_F + ["relpath"], []),
    "/folder/file/download": (_F + ["relpath"], ["archive"]),
    "/folder/file/archive-download-token": (["volume", "virtual_folder_id", "files"], ["filename"]),
    "/folder/file/upload": (_F + ["relpath", "size"], []),
    "/folder/file/delete": (_F + ["relpaths"], ["recursive"]),
    "/folder/file/delete-async": (_F + ["relpaths"], ["recursive"]),
}


@st.composite
def plausible_bodies(draw, path: str) -> dict:
    """Mostly valid bodies (so the backend is reached), with now and then a key
    missing, an odd value or random JSON."""
    required, optional = ROUTE_KEYS.get(path, ([], []))
    keys = [k for k in required if draw(st.integers(0, 19))] + [k for k in optional if draw(st.booleans())]
    return {k: draw(_json_values) if draw(st.integers(0, 19)) == 0 else draw(_plausible[k]) for k in keys}


@settings(max_examples=250, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data(), route=st.sampled_from(AUTHED_ROUTES))
@pytest_twisted.ensureDeferred
async def test_plausible_bodies_on_a_real_vfolder_never_500(manager: StubManager, data, route) -> None:
    """Valid-looking parameters reach the backend: whatever they do, no 500 and no HTML."""
    method, path = route
    # A fresh vfolder each time, once the background tasks of the last example are over.
    for task in manager.bgtasks.running():
        await task.deferred
    folder = manager.volume_path("local") / VFolderID.parse(VFID).relative_path()
    if os.path.lexists(folder):
        shutil.rmtree(folder)
    await manager.client.create_folder("local", VFID)
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "f.txt").write_bytes(b"f")
    # A symlink out of the vfolder, to a sacrificial directory with a canary in it.
    outside = manager.workdir.parent / "outside"
    (outside / "keep").mkdir(parents=True, exist_ok=True)
    (outside / "canary").write_text("alive")
    os.symlink(outside, folder / "ln")
    body = data.draw(plausible_bodies(path))
    r = await manager.request(method, path, body)
    assert "html" not in (r.content_type or ""), r.body[:200]
    assert r.code < 500, (method, path, body, r.body[:300])
    if r.code == 422 and path == "/folder/file/mkdir":
        assert r.content_type == "application/json" and "results" in r.json()  # upstream's shape
    elif r.code >= 400:
        assert r.content_type == PROBLEM
    assert (outside / "canary").read_text() == "alive"
    assert sorted(os.listdir(outside)) == ["canary", "keep"], "something was written or removed outside"
