"""The reservoir import driven by the manager's own client, its events seen by the manager's own consumer.

``StorageProxyManagerFacingClient.import_reservoir_models`` sends the
manager's ``ReservoirImportModelsReq`` to our daemon; the source is a second
daemon's VFS storage, reached two ways:

* directly (ours: ``storage-proxy-endpoint``), and
* upstream's way, through a stand-in for the source's manager that checks
  each request's ``Authorization`` with backend.ai-common's own
  ``generate_signature`` (the manager's HMAC API auth) and relays it to the
  source's storage proxy as the manager's ``/vfs-storages`` handler does
  (the listing as JSON, the download streamed, no ``Range`` passed on), and
  answers ``/artifacts/revisions/<id>/verification-result`` as upstream's
  reservoir asks it after an import.

The import's ``model_verifying`` / ``model_import_done`` reach common's
``EventDispatcher`` (the manager's ``RedisQueue`` arguments) as the
manager's event classes, with ``registry_type`` RESERVOIR.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from ai.backend.common.auth.utils import generate_signature
from ai.backend.common.data.artifact.types import ArtifactRegistryType
from ai.backend.common.defs import REDIS_STREAM_DB
from ai.backend.common.dto.storage.request import ReservoirImportModelsReq
from ai.backend.common.events.dispatcher import EventDispatcher
from ai.backend.common.events.event_types.artifact.anycast import (
    ModelImportDoneEvent,
    ModelVerifyingEvent,
)
from ai.backend.common.message_queue.redis_queue import RedisMQArgs, RedisQueue
from ai.backend.common.types import HostPortPair, RedisTarget
from aiohttp import web
from harness import manager_for, run, wait_bgtask
from support.daemon import StorageProxyProcess
from support.redis import REDIS_SERVER, SKIP_REASON, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

MODEL, REVISION = "acme/tiny", "v1"
FILES = {
    "config.json": b'{"layers": 2}\n',
    "weights/model.bin": b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(40_000)),
    "shards/a.bin": b"a" * 70_000,
}
ACCESS, SECRET, VERSION = "AKIARESERVOIRTEST", "reservoir-secret-key", "v9.20250722"


class FakeSourceManager:
    """The source's manager, as far as a reservoir import sees it."""

    def __init__(self, source: StorageProxyProcess) -> None:
        self.source = source
        self.checked: list[str] = []
        self.asked: list[str] = []
        self.refused = 0

    def _authorized(self, request: web.Request) -> bool:
        date = datetime.fromisoformat(request.headers["Date"])
        expected, _ = generate_signature(
            method=request.method, version=request.headers["X-BackendAI-Version"],
            endpoint=yarl.URL(f"http://{request.host}"), date=date, rel_url=request.rel_url.path,
            content_type=request.headers["Content-Type"], access_key=ACCESS, secret_key=SECRET,
            hash_type="sha256")
        return request.headers.get("Authorization") == expected["Authorization"]

    async def files(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            self.refused += 1
            return web.json_response({"error": "bad signature"}, status=401)
        self.checked.append(request.rel_url.path)
        async with aiohttp.ClientSession() as http, http.get(
                f"{self.source.manager_url}/v1/storages/vfs/{request.match_info['name']}/files",
                json=await request.json(), headers={"X-BackendAI-Storage-Auth-Token": self.source.manager_secret},
        ) as resp:
            return web.json_response(await resp.json(), status=resp.status)

    async def verification_result(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            self.refused += 1
            return web.json_response({"error": "bad signature"}, status=401)
        self.checked.append(request.rel_url.path)
        self.asked.append(request.match_info["rid"])
        return web.json_response({"verification_result": {"verifiers": {"clamav": {
            "success": True, "infected_count": 0, "scanned_at": "2026-12-04T18:00:00+00:00", "scan_time": 0.5,
            "scanned_count": len(FILES), "metadata": {"engine": "test"}}}}})

    async def download(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            self.refused += 1
            return web.json_response({"error": "bad signature"}, status=401)
        self.checked.append(request.rel_url.path)
        async with aiohttp.ClientSession() as http, http.post(
                f"{self.source.manager_url}/v1/storages/vfs/{request.match_info['name']}/download",
                json=await request.json(), headers={"X-BackendAI-Storage-Auth-Token": self.source.manager_secret},
        ) as resp:
            resp.raise_for_status()
            out = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
            await out.prepare(request)
            async for chunk in resp.content.iter_chunked(8192):
                await out.write(chunk)
            await out.write_eof()
            return out


class ManagerSide:
    def __init__(self) -> None:
        self.received: dict[type, list[Any]] = defaultdict(list)
        self.changed = asyncio.Event()

    async def handler(self, _context: None, _source: Any, event: Any) -> None:
        self.received[type(event)].append(event)
        self.changed.set()

    async def start(self, redis: RedisServer) -> None:
        self.queue = await RedisQueue.create(RedisTarget(addr=HostPortPair("127.0.0.1", redis.port)), RedisMQArgs(
            anycast_stream_key="events", broadcast_channel="events_all", consume_stream_keys={"events"},
            subscribe_channels={"events_all"}, group_name="manager", node_id="test-manager", db=REDIS_STREAM_DB))
        self.dispatcher = EventDispatcher(self.queue)
        for cls in (ModelVerifyingEvent, ModelImportDoneEvent):
            self.dispatcher.consume(cls, None, self.handler)
        await self.dispatcher.start()

    async def close(self) -> None:
        await self.dispatcher.close()
        await self.queue.close()

    async def wait_done(self, registry: str, timeout: float = 20.0) -> ModelImportDoneEvent:
        async def loop() -> ModelImportDoneEvent:
            while True:
                for e in self.received[ModelImportDoneEvent]:
                    if e.registry_name == registry:
                        return e
                self.changed.clear()
                await self.changed.wait()
        return await asyncio.wait_for(loop(), timeout)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageProxyProcess]:
    work = tmp_path_factory.mktemp("source")
    for rel, data in FILES.items():
        path = work / "published" / MODEL / REVISION / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    proc = StorageProxyProcess(work / "proxy", extra_config={
        "artifact-storages": {"published": {"type": "vfs", "base-path": str(work / "published")}}})
    proc.start()
    yield proc
    proc.stop(timeout=10)


@pytest.mark.parametrize("via", ["storage-proxy", "manager"])
def test_the_managers_client_imports_and_its_consumer_sees_the_events(
        tmp_path: Path, source: StorageProxyProcess, via: str) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    fake = FakeSourceManager(source)
    base = tmp_path / "models"
    revision_id = str(uuid.uuid4())

    async def go() -> None:
        app = web.Application()
        app.router.add_get("/vfs-storages/{name}/files", fake.files)
        app.router.add_post("/vfs-storages/{name}/download", fake.download)
        app.router.add_get("/artifacts/revisions/{rid}/verification-result", fake.verification_result)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if via == "manager":
            reservoir = {"manager-endpoint": f"http://127.0.0.1:{port}", "manager-access-key": ACCESS,
                         "manager-secret-key": SECRET, "manager-api-version": VERSION, "storage-name": "published"}
        else:
            reservoir = {"storage-proxy-endpoint": source.manager_url, "storage-proxy-token": source.manager_secret,
                         "storage-name": "published"}
        daemon = StorageProxyProcess(tmp_path / "proxy", extra_config={
            "redis": {"addr": redis.addr},
            "artifact-storages": {"models": {"type": "vfs", "base-path": str(base)}},
            "artifact-registries": {"res": {"type": "reservoir", "reservoir": reservoir}},
        })
        manager = ManagerSide()
        await manager.start(redis)
        try:
            await asyncio.to_thread(daemon.start)
            async with manager_for(daemon) as (_, client):
                answer = await client.import_reservoir_models(ReservoirImportModelsReq(
                    models=[{"model_id": MODEL, "revision": REVISION}], registry_name="res",
                    storage_step_target_mappings={"download": {"storage_name": "models"}},
                    artifact_revision_ids=[revision_id]))
                task = await wait_bgtask(daemon, answer.task_id)
                assert task["status"] == "done", task
            done = await manager.wait_done("res")
            assert done.success and done.model_id == MODEL and done.revision == REVISION
            assert done.registry_type == ArtifactRegistryType.RESERVOIR and done.digest is None
            if via == "manager":  # upstream: the source manager's verification result for the revision
                assert done.verification_result is not None
                clamav = done.verification_result.verifiers["clamav"]
                assert clamav.success and clamav.scanned_count == len(FILES)
            else:
                assert done.verification_result is None
            assert [(e.model_id, e.registry_type) for e in manager.received[ModelVerifyingEvent]] == [
                (MODEL, ArtifactRegistryType.RESERVOIR)]
        finally:
            await manager.close()
            await asyncio.to_thread(daemon.stop, 10)
            await runner.cleanup()

    try:
        run(go())
    finally:
        redis.stop()
    root = base / MODEL / REVISION
    assert {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} == FILES
    if via == "manager":  # every request signed as the manager checks it, and none refused
        assert fake.refused == 0 and len(fake.checked) == 2 + len(FILES) and fake.asked == [revision_id]
        assert fake.checked[0] == "/vfs-storages/published/files"
