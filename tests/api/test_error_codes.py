"""``error_code`` in every error body, and the manager exception each one leads to.

The manager's storage-proxy client (backend.ai-manager 26.9.6,
``clients/storage_proxy/base.py``) chooses its exception from the code's
domain and the status only; ``manager_exception`` restates that rule so each
case here says what a real manager raises.  tests/manager_compat/ checks the
same against the manager's own code on Python 3.13.
"""

from __future__ import annotations

import inspect
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from support.manager import StubManager, stub_manager_fixture
from treq.testing import StubTreq
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

import backends.xfs.volume
import storage.api.downloads
import storage.api.manager
import storage.api.params
import storage.api.tus
import storage.auth
import storage.errors
import storage.uploads
import storage.web.connections
from storage.api.client import ClientAPI
from storage.config import parse_config
from storage.errors import StorageError
from storage.vfid import VFolderID
from storage.volumes import VolumeContext, VolumeRegistry

CLIENT_SECRET = "error-codes-client-secret-0123456789abcdef"

# backend.ai-common 26.9.6's ErrorOperation and ErrorDetail values: a code
# whose operation or detail is not one of these does not parse, and the
# manager then treats it as if there were no code at all.
OPERATIONS = {
    "generic", "create", "upsert", "access", "read", "search", "update", "start", "soft-delete", "restore",
    "purge", "auth", "hook", "request", "parsing", "execute", "schedule", "setup", "grant", "check-limit",
}
DETAILS = {
    "bad-request", "not-found", "gone", "conflict", "already-exists", "invalid-parameters", "data-expired",
    "forbidden", "unauthorized", "incomplete-user-profile", "not-ready", "invalid-data-format",
    "internal-error", "unavailable", "unreachable", "task-timeout", "canceled", "not-implemented",
    "deprecated", "mismatch", "timeout", "content-type-mismatch",
}


def parses(code: str) -> bool:
    parts = code.split("_")
    return len(parts) == 3 and parts[1] in OPERATIONS and parts[2] in DETAILS


def manager_exception(status: int, code: str | None) -> str:
    domain = code.split("_")[0] if code and parses(code) else "vfolder"
    if domain == "vfolder":
        return {400: "VFolderBadRequest", 404: "VFolderNotFound", 410: "VFolderGone"}.get(
            status, "VFolderOperationFailed")
    if domain == "quota-scope":
        return "QuotaScopeNotFoundError" if status == 404 else "UnexpectedStorageProxyResponseError"
    return "UnexpectedStorageProxyResponseError"


def all_error_classes() -> list[type[StorageError]]:
    modules = [storage.errors, storage.auth, storage.uploads, storage.api.params, storage.api.manager,
               storage.api.downloads, storage.api.tus, storage.web.connections, backends.xfs.volume]
    found = {obj for m in modules for _, obj in inspect.getmembers(m, inspect.isclass)
             if issubclass(obj, StorageError)}
    return sorted(found, key=lambda c: c.__qualname__)


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__qualname__)
def test_every_error_class_has_a_code_the_manager_parses(cls: type[StorageError]) -> None:
    for client in (False, True):
        body = cls("x").body(client=client)
        assert parses(body["error_code"]), (cls, body["error_code"])


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[StubManager]:
    yield from stub_manager_fixture(tmp_path)


def new_vfid() -> str:
    return f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"


async def check(manager: StubManager, method: str, path: str, body: object, status: int, code: str,
                exception: str, **kw: object) -> None:
    r = await manager.request(method, path, body, **kw)  # type: ignore[arg-type]
    assert r.content_type == "application/problem+json", r.body
    got = r.json()
    assert (r.code, got.get("error_code")) == (status, code), got
    assert manager_exception(r.code, got["error_code"]) == exception


@pytest_twisted.ensureDeferred
async def test_missing_quota_scope_is_quota_scope_not_found(manager: StubManager) -> None:
    # The known bug: without the quota-scope code the manager raised VFolderNotFound.
    qsid = f"user:{uuid.uuid4()}"
    await check(manager, "GET", "/quota-scope", {"volume": "local", "qsid": qsid}, 404,
                "quota-scope_read_not-found", "QuotaScopeNotFoundError")
    await check(manager, "DELETE", "/quota-scope/quota", {"volume": "local", "qsid": qsid}, 404,
                "quota-scope_read_not-found", "QuotaScopeNotFoundError")


@pytest_twisted.ensureDeferred
async def test_existing_quota_scope_has_upstreams_code(manager: StubManager) -> None:
    body = {"volume": "local", "qsid": f"user:{uuid.uuid4()}"}
    r = await manager.request("POST", "/quota-scope", body)
    assert r.code == 204
    await check(manager, "POST", "/quota-scope", body, 409, "quota-scope_create_already-exists",
                "UnexpectedStorageProxyResponseError")


@pytest_twisted.ensureDeferred
async def test_vfolder_errors(manager: StubManager) -> None:
    missing = new_vfid()
    await check(manager, "POST", "/folder/file/list", {"volume": "local", "vfid": missing, "relpath": "."},
                404, "vfolder_read_not-found", "VFolderNotFound")
    # /folder/mount answers a missing vfolder with 400, as upstream: VFolderBadRequest.
    await check(manager, "GET", "/folder/mount", {"volume": "local", "vfid": missing}, 400,
                "vfolder_read_not-found", "VFolderBadRequest")
    vfid = new_vfid()
    r = await manager.request("POST", "/folder/create", {"volume": "local", "vfid": vfid})
    assert r.code == 204
    await check(manager, "POST", "/folder/create", {"volume": "local", "vfid": vfid}, 409,
                "vfolder_create_already-exists", "VFolderOperationFailed")
    await check(manager, "GET", "/folder/mount", {"volume": "local", "vfid": vfid, "subpath": "../.."}, 400,
                "vfolder_access_invalid-parameters", "VFolderBadRequest")
    await check(manager, "POST", "/folder/file/rename",
                {"volume": "local", "vfid": vfid, "relpath": "nope", "new_name": "x"}, 400,
                "vfolder_execute_bad-request", "VFolderBadRequest")
    await check(manager, "POST", "/folder/file/list", {"volume": "local", "vfid": vfid, "relpath": "../x"},
                400, "vfolder_request_invalid-parameters", "VFolderBadRequest")


@pytest_twisted.ensureDeferred
async def test_request_errors(manager: StubManager) -> None:
    # Parameter errors: upstream's check_params answers without a code, so the manager
    # raises VFolderBadRequest; ours carry a vfolder code for the same outcome.
    await check(manager, "POST", "/folder/create", {"volume": "local"}, 400,
                "vfolder_request_invalid-parameters", "VFolderBadRequest")
    await check(manager, "POST", "/folder/create", None, 400,
                "vfolder_request_invalid-parameters", "VFolderBadRequest", raw=b"{not json")
    await check(manager, "GET", "/status", {"x": 1}, 400, "vfolder_request_bad-request", "VFolderBadRequest",
                auth=False)
    await check(manager, "GET", "/volume/quota", {"volume": "local"}, 400, "vfolder_request_deprecated",
                "VFolderBadRequest")
    # An unknown volume is upstream's InvalidVolumeError.
    await check(manager, "GET", "/folder/fs-usage", {"volume": "nope"}, 400, "storage_access_invalid-parameters",
                "UnexpectedStorageProxyResponseError")
    await check(manager, "GET", "/volumes", None, 403, "vfolder_auth_forbidden", "VFolderOperationFailed",
                auth=False)
    await check(manager, "GET", "/no/such/route", None, 404, "storage-proxy_request_not-found",
                "UnexpectedStorageProxyResponseError")
    await check(manager, "GET", f"/bgtask/{uuid.uuid4()}", None, 404, "storage-proxy_read_not-found",
                "UnexpectedStorageProxyResponseError")


@pytest_twisted.ensureDeferred
async def test_unexpected_errors_carry_the_generic_code(manager: StubManager, monkeypatch) -> None:
    async def boom(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(type(manager.volume()), "get_fs_usage", boom)
    await check(manager, "GET", "/folder/fs-usage", {"volume": "local"}, 500,
                "storage-proxy_generic_internal-error", "UnexpectedStorageProxyResponseError")


# -- the client-facing API: upstream's client-API codes (the manager never calls it) --


@pytest.fixture
def client_api(tmp_path: Path) -> Iterator[tuple[StubTreq, Any]]:
    root = tmp_path / "vol"
    root.mkdir()
    config = parse_config({
        "storage-proxy": {"secret": CLIENT_SECRET},
        "api": {"manager": {"secret": "manager-secret"}},
        "volume": {"local": {"backend": "vfs", "path": str(root)}},
    })
    pool = InlinePool()
    clock = Clock()
    volumes = VolumeRegistry.from_config(config.volumes, VolumeContext(pool=pool, reactor=clock))
    api = ClientAPI(config, volumes, pool, clock)
    vfid = VFolderID.parse(new_vfid())
    volumes.get("local").vfolder_path(vfid).mkdir(parents=True)

    def token(volume: str = "local", relpath: str = "f") -> str:
        claims = {"op": "download", "volume": volume, "vfid": str(vfid), "relpath": relpath,
                  "exp": int(time.time()) + 600}
        return jwt.encode(claims, CLIENT_SECRET, algorithm="HS256")

    yield StubTreq(api.app.resource()), token


class InlinePool:
    def run(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        return maybeDeferred(f, *args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_client_api_codes(client_api: tuple[StubTreq, Any]) -> None:
    stub, token = client_api
    cases = [
        ({"token": "not-a-jwt"}, 403, "storage-proxy_auth_unauthorized"),
        ({"token": token(relpath="missing")}, 404, "storage-proxy_read_not-found"),
        ({"token": token(), "archive": "maybe"}, 400, "storage-proxy_request_invalid-parameters"),
        ({"token": token(volume="nope")}, 400, "storage_access_invalid-parameters"),
    ]
    for params, status, code in cases:
        response = await stub.get("http://proxy.invalid/download", params=params)
        body = json.loads(await stub.content(response))
        assert (response.code, body["error_code"]) == (status, code), (params, body)
