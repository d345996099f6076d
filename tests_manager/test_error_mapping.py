"""Every error the manager can get from us, through the manager's own client.

backend.ai-manager 26.9.6 turns a failed answer into an exception in
``clients/storage_proxy/base.py``: the ``error_code``'s domain and the
status pick the class (``quota-scope`` + 404 → ``QuotaScopeNotFoundError``,
``vfolder`` or no code → ``VFolderBadRequest``/``VFolderNotFound``/
``VFolderGone``/``VFolderOperationFailed``, another domain →
``UnexpectedStorageProxyResponseError``, a body that is not JSON →
``PassthroughError``).  For each case the test asserts the class the manager
raises for our answer; ``UPSTREAM`` names the class it raises for upstream
26.9.6's answer (read from its ``api/manager.py``).  Where the two differ,
the difference is deliberate and ``docs/manager-api.md`` ("Where we answer
differently") says what the manager then does and why ours is kept.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from ai.backend.common.exception import PassthroughError
from ai.backend.common.types import QuotaScopeID, QuotaScopeType, VFolderID
from ai.backend.manager.clients.storage_proxy.manager_facing_client import (
    StorageProxyManagerFacingClient,
)
from ai.backend.manager.errors.storage import (
    QuotaScopeNotFoundError,
    UnexpectedStorageProxyResponseError,
    VFolderBadRequest,
    VFolderNotFound,
    VFolderOperationFailed,
)
from harness import manager_for, run, wait_bgtask
from support.daemon import StorageProxyProcess

Call = Callable[[StorageProxyManagerFacingClient, "Folders"], Awaitable[Any]]


@dataclass
class Folders:
    """The module's vfolders: two that exist (one with a file and a dir), one that does not."""

    existing: VFolderID
    other: VFolderID
    missing: VFolderID
    missing_qsid: QuotaScopeID


def new_vfid() -> VFolderID:
    return VFolderID(QuotaScopeID(QuotaScopeType.USER, uuid.uuid4()), uuid.uuid4())


@dataclass
class Case:
    call: Call
    ours: type[Exception]
    upstream: type[Exception] | None  # None: upstream answers 2xx (no exception)


E, M = "existing", "missing"


def v(f: Folders, which: str) -> str:
    return str(getattr(f, which))


CASES: dict[str, Case] = {
    # quota scopes: upstream raises its QuotaScopeNotFoundError (quota-scope_read_not-found)
    "get_quota_scope/missing": Case(
        lambda c, f: c.get_quota_scope("local", str(f.missing_qsid)),
        QuotaScopeNotFoundError, QuotaScopeNotFoundError),
    "delete_quota_scope_quota/missing": Case(
        lambda c, f: c.delete_quota_scope_quota("local", str(f.missing_qsid)),
        QuotaScopeNotFoundError, QuotaScopeNotFoundError),
    # deprecated /volume/quota: upstream's 400 JSON without a code
    "get_volume_quota/deprecated": Case(
        lambda c, f: c.get_volume_quota("local", v(f, E)), VFolderBadRequest, VFolderBadRequest),
    "update_volume_quota/deprecated": Case(
        lambda c, f: c.update_volume_quota("local", v(f, E), 2**20), VFolderBadRequest, VFolderBadRequest),
    # an unknown volume: upstream's InvalidVolumeError (storage_access_invalid-parameters)
    "get_fs_usage/unknown-volume": Case(
        lambda c, f: c.get_fs_usage("nope"),
        UnexpectedStorageProxyResponseError, UnexpectedStorageProxyResponseError),
    "create_folder/unknown-volume": Case(
        lambda c, f: c.create_folder("nope", str(new_vfid())),
        UnexpectedStorageProxyResponseError, UnexpectedStorageProxyResponseError),
    # vfs has no performance metric: upstream's NotImplementedError escapes as a text/plain 500
    "get_volume_performance_metric/vfs": Case(
        lambda c, f: c.get_volume_performance_metric("local"), VFolderBadRequest, PassthroughError),
    # an existing vfolder: upstream's FileExistsError escapes as a text/plain 500
    "create_folder/exists": Case(
        lambda c, f: c.create_folder("local", v(f, E)), VFolderOperationFailed, PassthroughError),
    # /folder/mount: upstream's 400 JSON bodies without a code
    "get_mount_path/missing": Case(
        lambda c, f: c.get_mount_path("local", v(f, M)), VFolderBadRequest, VFolderBadRequest),
    "get_mount_path/escaping-subpath": Case(
        lambda c, f: c.get_mount_path("local", v(f, E), "../../x"), VFolderBadRequest, VFolderBadRequest),
    # file operations: upstream's handle_fs_errors, a 400 JSON body without a code
    "rename_file/missing-file": Case(
        lambda c, f: c.rename_file("local", v(f, E), "nope.txt", "new.txt"), VFolderBadRequest, VFolderBadRequest),
    "move_file/missing-file": Case(
        lambda c, f: c.move_file("local", v(f, E), "nope.txt", "dir/x.txt"), VFolderBadRequest, VFolderBadRequest),
    "list_files/not-a-directory": Case(
        lambda c, f: c.list_files("local", v(f, E), "file.txt"), VFolderBadRequest, VFolderBadRequest),
    # mkdir of an existing dir without exist_ok: 422 with the per-item results, as upstream
    "mkdir/exists": Case(
        lambda c, f: c.mkdir(volume="local", vfid=v(f, E), relpath=["dir"], exist_ok=False),
        VFolderOperationFailed, VFolderOperationFailed),
    # a path leading out of the vfolder: upstream's sanitize_vfpath raises InvalidSubpathError
    # (vfolder_access_invalid-parameters, 400); its upload route does not check the relpath
    # and hands out a token (the escape fails later, at the upload)
    "list_files/escaping": Case(
        lambda c, f: c.list_files("local", v(f, E), "../.."), VFolderBadRequest, VFolderBadRequest),
    "upload_file/escaping": Case(
        lambda c, f: c.upload_file("local", v(f, E), "../x", "1"), VFolderBadRequest, None),
    # a vfolder that does not exist: ours 404 vfolder_read_not-found everywhere; upstream's
    # sanitize_vfpath raises VFolderNotFoundError (the same code) where a route calls it;
    # mkdir reports it per item (422); used-bytes' du failure and the upload's mkdir of
    # .upload are text/plain 500s
    "get_folder_usage/missing": Case(
        lambda c, f: c.get_folder_usage("local", v(f, M)), VFolderNotFound, VFolderNotFound),
    "get_used_bytes/missing": Case(
        lambda c, f: c.get_used_bytes("local", v(f, M)), VFolderNotFound, PassthroughError),
    "list_files/missing-vfolder": Case(
        lambda c, f: c.list_files("local", v(f, M), "."), VFolderNotFound, VFolderNotFound),
    "mkdir/missing-vfolder": Case(
        lambda c, f: c.mkdir(volume="local", vfid=v(f, M), relpath=["a"], exist_ok=True),
        VFolderNotFound, VFolderOperationFailed),
    "rename_file/missing-vfolder": Case(
        lambda c, f: c.rename_file("local", v(f, M), "a", "b"), VFolderNotFound, VFolderNotFound),
    "upload_file/missing-vfolder": Case(
        lambda c, f: c.upload_file("local", v(f, M), "a", "1"), VFolderNotFound, PassthroughError),
    # fetch of a missing file: an empty 200, as upstream, which fetch_file_content
    # turns into UnexpectedStorageProxyResponseError("No content received ...")
    "fetch_file_content/missing-file": Case(
        lambda c, f: c.fetch_file_content("local", v(f, E), "nope.txt"),
        UnexpectedStorageProxyResponseError, UnexpectedStorageProxyResponseError),
    # a missing vfolder: ours 404; upstream's sanitize_vfpath error is swallowed too (empty 200)
    "fetch_file_content/missing-vfolder": Case(
        lambda c, f: c.fetch_file_content("local", v(f, M), "x"),
        VFolderNotFound, UnexpectedStorageProxyResponseError),
    # a directory: ours 400 (the manager's README fetch catches VFolderBadRequest), upstream's
    # handle_fs_errors 400 is swallowed by its handler's `finally: return`, an empty 200
    "fetch_file_content/directory": Case(
        lambda c, f: c.fetch_file_content("local", v(f, E), "dir"),
        VFolderBadRequest, UnexpectedStorageProxyResponseError),
}


# The cases where the manager raises another class for us than for upstream, each
# a row of docs/manager-api.md's "Where we answer differently from upstream".
DELIBERATE = {
    "create_folder/exists",
    "get_volume_performance_metric/vfs",
    "get_used_bytes/missing",
    "mkdir/missing-vfolder",
    "upload_file/missing-vfolder",
    "upload_file/escaping",
    "fetch_file_content/directory",
    "fetch_file_content/missing-vfolder",
}


def test_differences_are_the_documented_ones() -> None:
    differ = {name for name, case in CASES.items() if case.ours is not case.upstream}
    assert differ == DELIBERATE


@pytest.fixture(scope="module")
def folders(daemon: StorageProxyProcess) -> Folders:
    f = Folders(existing=new_vfid(), other=new_vfid(), missing=new_vfid(),
                missing_qsid=QuotaScopeID(QuotaScopeType.PROJECT, uuid.uuid4()))

    async def setup() -> None:
        async with manager_for(daemon) as (_sm, client):
            await client.create_folder("local", str(f.existing))
            await client.create_folder("local", str(f.other))
            await client.mkdir(volume="local", vfid=str(f.existing), relpath=["dir"], exist_ok=False)
            root = (await client.get_mount_path("local", str(f.existing)))["path"]
            with open(f"{root}/file.txt", "w") as fh:
                fh.write("x")

    run(setup())
    return f


@pytest.mark.parametrize("name", sorted(CASES))
def test_manager_raises(name: str, daemon: StorageProxyProcess, folders: Folders) -> None:
    case = CASES[name]

    async def go() -> BaseException:
        async with manager_for(daemon) as (_sm, client):
            with pytest.raises(Exception) as info:
                await case.call(client, folders)
            return info.value

    exc = run(go())
    # exactly the class (VFolderNotFound is not a VFolderBadRequest, and so on)
    assert type(exc) is case.ours, f"{name}: the manager raised {type(exc).__name__}: {exc!r}"


def test_missing_quota_scope_is_not_a_missing_vfolder(daemon: StorageProxyProcess) -> None:
    """The manager's quota fallback (gql QuotaScope.details) catches QuotaScopeNotFoundError only."""

    async def go() -> None:
        async with manager_for(daemon) as (_sm, client):
            qsid = str(QuotaScopeID(QuotaScopeType.USER, uuid.uuid4()))
            with pytest.raises(QuotaScopeNotFoundError) as info:
                await client.get_quota_scope("local", qsid)
            assert not isinstance(info.value, VFolderNotFound)
            # and after the scope exists, the same call answers
            await client.update_quota_scope("local", qsid, 2**30)
            assert set(await client.get_quota_scope("local", qsid)) == {"used_bytes", "limit_bytes"}

    run(go())


def test_wrong_secret(daemon: StorageProxyProcess) -> None:
    """Upstream's 403 problem body has no code: the manager raises VFolderOperationFailed for both."""

    async def go() -> None:
        async with manager_for(daemon, secret="not-the-secret") as (_sm, client):
            with pytest.raises(VFolderOperationFailed):
                await client.get_volumes()

    run(go())


def test_task_log_not_written_yet_is_empty(daemon: StorageProxyProcess, folders: Folders) -> None:
    """The manager streams a task log with fetch_file_content_streaming: a missing one is empty."""

    async def go() -> None:
        async with manager_for(daemon) as (_sm, client):
            chunks = [c async for c in client.fetch_file_content_streaming(
                "local", str(folders.existing), "task/ab/cd/ef.log")]
            assert chunks == []

    run(go())


@pytest.mark.parametrize("name", ["missing-source", "existing-destination", "onto-itself", "unknown-volume"])
def test_clone_is_accepted_and_its_task_fails(name: str, daemon: StorageProxyProcess, folders: Folders) -> None:
    """As upstream: 200 and a bgtask that fails (its vfolder_clone_failure event releases the
    source the manager marked CLONING before the call; an error here would leave it stuck)."""
    src, dst, dst_volume = {
        "missing-source": (folders.missing, new_vfid(), "local"),
        "existing-destination": (folders.existing, folders.other, "local"),
        "onto-itself": (folders.existing, folders.existing, "local"),
        "unknown-volume": (folders.existing, new_vfid(), "nowhere"),
    }[name]

    async def go() -> None:
        async with manager_for(daemon) as (_sm, client):
            response = await client.clone_folder("local", str(src), dst_volume, str(dst))
            state = await wait_bgtask(daemon, response.bgtask_id)
            assert state["status"] == "failed", state
            if name == "existing-destination":
                assert (await client.list_files("local", str(dst), "."))["items"] == []  # untouched

    run(go())


def test_delete_of_a_missing_vfolder_is_accepted(daemon: StorageProxyProcess) -> None:
    """As upstream: 202 and a task, so the manager's purge goes on (it never sees an error)."""

    async def go() -> None:
        async with manager_for(daemon) as (_sm, client):
            assert await client.delete_folder("local", str(new_vfid())) is None

    run(go())


def test_every_error_body_carries_a_code(daemon: StorageProxyProcess, folders: Folders) -> None:
    """The raw answers behind the cases above: problem+json with an error_code the manager parses."""
    from ai.backend.common.exception import ErrorCode

    async def go() -> None:
        async with aiohttp.ClientSession() as http:
            for path, method, body in [
                ("/quota-scope", "GET", {"volume": "local", "qsid": str(folders.missing_qsid)}),
                ("/folder/usage", "GET", {"volume": "local", "vfid": str(folders.missing)}),
                ("/folder/mount", "GET", {"volume": "local", "vfid": str(folders.missing)}),
                ("/folder/create", "POST", {"volume": "local", "vfid": str(folders.existing)}),
                ("/folder/file/rename", "POST", {"volume": "local", "vfid": str(folders.existing),
                                                 "relpath": "nope", "new_name": "x"}),
                ("/volumes", "GET", {"unexpected": 1}),
            ]:
                async with http.request(method, daemon.manager_url + path, json=body,
                                        headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret}) as resp:
                    assert resp.status >= 400, path
                    data = await resp.json(content_type=None)
                    ErrorCode.from_str(data["error_code"])  # parses as the manager parses it

    run(go())


def test_create_without_a_quota_scope_when_auto_creation_is_off(daemon_factory: Any) -> None:
    """Upstream re-raises its QuotaScopeNotFoundError (quota-scope domain): so do we."""
    proc = daemon_factory(extra_config={"storage-proxy": {"allow-auto-quota-scope-creation": False}})
    vfid = new_vfid()

    async def go() -> None:
        async with manager_for(proc) as (_sm, client):
            with pytest.raises(QuotaScopeNotFoundError):
                await client.create_folder("local", str(vfid))
            await client.update_quota_scope("local", str(vfid.quota_scope_id), 2**30)
            await client.create_folder("local", str(vfid))  # with its scope, it is created

    run(go())
