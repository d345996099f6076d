"""A vfolder's whole life, every call made by the manager's own client code.

Each step is a method of backend.ai-manager 26.9.6's
``StorageProxyManagerFacingClient`` (obtained from ``StorageSessionManager``
as the manager does); the user's side of an upload or download (the tus
PATCH, the GET with the token) goes to the client-facing URL the session
manager hands out, with aiohttp, as the web UI's requests would.  Results are
checked against the files on disk, not just the status.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from pathlib import Path

import aiohttp
import jwt
from ai.backend.common.dto.storage.request import FileDeleteAsyncRequest
from ai.backend.common.types import QuotaScopeID, QuotaScopeType, VFolderID
from harness import PROXY, manager_for, run, wait_bgtask
from support.daemon import StorageProxyProcess


def new_vfid(kind: QuotaScopeType = QuotaScopeType.USER) -> VFolderID:
    return VFolderID(QuotaScopeID(kind, uuid.uuid4()), uuid.uuid4())


def test_volumes_and_hwinfo(daemon: StorageProxyProcess) -> None:
    async def go() -> None:
        async with manager_for(daemon) as (sm, client):
            volumes = dict((name, info["name"]) for name, info in
                           [(f"{p}:{v['name']}", v) for p, v in await sm.get_all_volumes()])
            assert volumes == {f"{PROXY}:local": "local", f"{PROXY}:other": "other"}
            for _proxy, info in await sm.get_all_volumes():
                assert info["backend"] == "vfs"
                assert isinstance(info["capabilities"], list)
            hw = await client.get_volume_hwinfo("local")
            assert hw["status"] == "healthy"
            usage = await client.get_fs_usage("local")
            st = os.statvfs(daemon.volume_path("local"))
            assert usage["capacity_bytes"] == st.f_blocks * st.f_frsize
            assert 0 <= usage["used_bytes"] <= usage["capacity_bytes"]
            assert sm.get_client_api_url(PROXY).port == daemon.client_port

    run(go())


def test_quota_scope_then_folder(daemon: StorageProxyProcess) -> None:
    vfid = new_vfid(QuotaScopeType.PROJECT)
    qsid = str(vfid.quota_scope_id)

    async def go() -> None:
        async with manager_for(daemon) as (_sm, client):
            # the manager's quota-scope settings: PATCH creates the scope
            await client.update_quota_scope("local", qsid, 10 * 2**20)
            scope = await client.get_quota_scope("local", qsid)
            # vfs, like upstream's, reports neither (-1, sent as null): the manager
            # then shows "no usage" and falls back to the resource policy's limit
            assert scope == {"used_bytes": None, "limit_bytes": None}
            await client.create_folder("local", str(vfid), max_quota_scope_size=10 * 2**20, mode=0o750)
            mount = await client.get_mount_path("local", str(vfid))
            path = Path(mount["path"])
            assert path.is_dir() and (path.stat().st_mode & 0o7777) == 0o750
            assert daemon.volume_path("local") in path.parents
            # the subpath is only checked (as upstream): the answer is the vfolder's root
            sub = await client.get_mount_path("local", str(vfid), "a/b")
            assert Path(sub["path"]) == path
            await client.delete_quota_scope_quota("local", qsid)

    run(go())


def test_whole_life(daemon: StorageProxyProcess, tmp_path: Path) -> None:
    vfid = new_vfid()
    clone_vfid = new_vfid()
    payload = os.urandom(300_000) + b"end"

    async def go() -> None:
        async with manager_for(daemon) as (sm, client), aiohttp.ClientSession() as http:
            client_api = sm.get_client_api_url(PROXY)
            await client.create_folder("local", str(vfid))
            root = Path((await client.get_mount_path("local", str(vfid)))["path"])

            # mkdir: a batch, as the manager sends it (a list), and a single path
            result = await client.mkdir(volume="local", vfid=str(vfid), relpath=["data", "logs/old"],
                                        exist_ok=False, parents=True)
            assert sorted(item["item"] for item in result["results"]["success"]) == ["data", "logs/old"]
            assert result["results"]["failed"] == []
            result = await client.mkdir(volume="local", vfid=str(vfid), relpath="data", exist_ok=True)
            assert (root / "data").is_dir() and (root / "logs" / "old").is_dir()

            # upload: the manager asks for a token, the user's client PATCHes the bytes
            token = (await client.upload_file("local", str(vfid), "data/blob.bin", str(len(payload))))["token"]
            claims = jwt.decode(token, options={"verify_signature": False})
            assert claims["op"] == "upload" and claims["relpath"] == "data/blob.bin"
            async with http.patch(client_api / "upload" % {"token": token}, data=payload, headers={
                "Tus-Resumable": "1.0.0", "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
            }) as resp:
                assert resp.status == 204, await resp.text()
                assert resp.headers["Upload-Offset"] == str(len(payload))
            assert (root / "data" / "blob.bin").read_bytes() == payload

            # download token, then the user's GET
            token = (await client.download_file(volume="local", vfid=str(vfid), relpath="data/blob.bin"))["token"]
            async with http.get(client_api / "download" % {"token": token}) as resp:
                assert resp.status == 200
                assert await resp.read() == payload
            archive = await client.create_archive_download_token(
                volume="local", virtual_folder_id=str(vfid), files=["data"], filename="d.zip")
            assert jwt.decode(archive["token"], options={"verify_signature": False})["files"] == ["data"]

            # fetch, as the manager reads a model card's README
            (root / "README.md").write_text("# hello\n")
            assert await client.fetch_file_content("local", str(vfid), "./README.md") == b"# hello\n"
            chunks = [c async for c in client.fetch_file_content_streaming("local", str(vfid), "data/blob.bin",
                                                                             chunk_size=65536)]
            assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(payload).digest()

            listing = await client.list_files("local", str(vfid), ".")
            kinds = {item["name"]: item["type"] for item in listing["items"]}
            assert kinds == {"data": "DIRECTORY", "logs": "DIRECTORY", "README.md": "FILE"}
            by_name = {item["name"]: item for item in (await client.list_files("local", str(vfid), "data"))["items"]}
            assert by_name["blob.bin"]["stat"]["size"] == len(payload)

            # rename and move
            await client.rename_file("local", str(vfid), "data/blob.bin", "renamed.bin")
            await client.move_file("local", str(vfid), "data/renamed.bin", "logs/old/moved.bin")
            assert not (root / "data" / "blob.bin").exists()
            assert (root / "logs" / "old" / "moved.bin").read_bytes() == payload

            usage = await client.get_folder_usage("local", str(vfid))
            assert usage["file_count"] >= 2
            assert usage["used_bytes"] >= len(payload)
            used = await client.get_used_bytes("local", str(vfid))
            assert used["used_bytes"] >= len(payload)

            # clone, then delete files in the clone (sync and async)
            cloned = await client.clone_folder("local", str(vfid), "local", str(clone_vfid))
            state = await wait_bgtask(daemon, cloned.bgtask_id)
            assert state["status"] == "done", state
            croot = Path((await client.get_mount_path("local", str(clone_vfid)))["path"])
            assert (croot / "logs" / "old" / "moved.bin").read_bytes() == payload
            assert (croot / "README.md").read_text() == "# hello\n"

            await client.delete_files("local", str(clone_vfid), ["README.md"])
            assert not (croot / "README.md").exists()
            task = await client.delete_files_async(FileDeleteAsyncRequest(
                volume="local", vfid=clone_vfid, relpaths=[Path("logs")], recursive=True))
            state = await wait_bgtask(daemon, task.bgtask_id)
            assert state["status"] == "done", state
            assert not (croot / "logs").exists()
            assert (root / "logs" / "old" / "moved.bin").exists()  # the source is untouched

            # delete both vfolders
            for v in (vfid, clone_vfid):
                await client.delete_folder("local", str(v))
            for r in (root, croot):
                deadline = time.monotonic() + 20
                while r.exists():
                    assert time.monotonic() < deadline, f"{r} not deleted"
                    await asyncio.sleep(0.05)

    run(go())


def test_clone_to_another_volume(daemon: StorageProxyProcess) -> None:
    src, dst = new_vfid(), new_vfid()

    async def go() -> None:
        async with manager_for(daemon) as (_sm, client):
            await client.create_folder("local", str(src))
            await client.mkdir(volume="local", vfid=str(src), relpath=["x"], exist_ok=False)
            cloned = await client.clone_folder("local", str(src), "other", str(dst))
            state = await wait_bgtask(daemon, cloned.bgtask_id)
            assert state["status"] == "done", state
            dst_root = Path((await client.get_mount_path("other", str(dst)))["path"])
            assert (dst_root / "x").is_dir()
            assert daemon.volume_path("other") in dst_root.parents

    run(go())
