"""The manager's own HuggingFace client methods against our daemon and the local hub contract server.

``StorageProxyManagerFacingClient.scan_huggingface_models``,
``retrieve_huggingface_models``, ``retrieve_huggingface_model``,
``get_huggingface_model_commit_hash`` and ``import_huggingface_models``
send the manager's request models and validate our answers with its
response models (pydantic), as the manager does.  The hub is the local
contract server (``tests/support/hub.py``): no real hub is reachable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import manager_for, run, wait_bgtask
from support.daemon import StorageProxyProcess
from support.hubserver import MODEL, OTHER, HubServer, model_import_config, running_hub

pytest.importorskip("huggingface_hub", reason="huggingface-hub is not installed")

from ai.backend.common.data.storage.registries.types import ModelSortKey, ModelTarget  # noqa: E402
from ai.backend.common.dto.storage.request import (  # noqa: E402
    HuggingFaceGetCommitHashReqPathParam,
    HuggingFaceGetCommitHashReqQueryParam,
    HuggingFaceImportModelsReq,
    HuggingFaceRetrieveModelReqPathParam,
    HuggingFaceRetrieveModelReqQueryParam,
    HuggingFaceRetrieveModelsReq,
    HuggingFaceScanModelsReq,
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with running_hub(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture(scope="module")
def hf_daemon(tmp_path_factory: pytest.TempPathFactory, hub: HubServer) -> Iterator[tuple[StorageProxyProcess, Path]]:
    work = tmp_path_factory.mktemp("hfproxy")
    base = work / "models"
    proc = StorageProxyProcess(work / "proxy", extra_config=model_import_config(base, {"hf": {"endpoint": hub.url}}))
    proc.start()
    yield proc, base
    proc.stop(timeout=10)


def test_scan_retrieve_and_commit_hash(hf_daemon: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, _ = hf_daemon

    async def go() -> None:
        async with manager_for(daemon) as (_, client):
            scanned = await client.scan_huggingface_models(HuggingFaceScanModelsReq(
                registry_name="hf", limit=10, order=ModelSortKey.DOWNLOADS))
            assert {(m.id, m.revision) for m in scanned.models} >= {(MODEL, "main"), (MODEL, "dev"), (OTHER, "main")}
            assert all(m.created_at is not None and m.created_at.year == 2025 for m in scanned.models)

            one = await client.retrieve_huggingface_model(
                HuggingFaceRetrieveModelReqPathParam(model_id=MODEL),
                HuggingFaceRetrieveModelReqQueryParam(registry_name="hf", revision="main"))
            files = hub.content[f"{MODEL}@main"]
            assert one.model.readme == files["README.md"].decode()
            assert one.model.size == sum(len(d) for d in files.values())

            batch = await client.retrieve_huggingface_models(HuggingFaceRetrieveModelsReq(
                registry_name="hf", models=[ModelTarget(model_id=OTHER), ModelTarget(model_id=MODEL, revision="dev")]))
            assert [(m.id, m.revision) for m in batch.models] == [(OTHER, "main"), (MODEL, "dev")]

            commit = await client.get_huggingface_model_commit_hash(
                HuggingFaceGetCommitHashReqPathParam(model_id=MODEL),
                HuggingFaceGetCommitHashReqQueryParam(registry_name="hf", revision="dev"))
            assert commit.commit_hash is not None and len(commit.commit_hash) == 40

    run(go())


def test_import(hf_daemon: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    daemon, base = hf_daemon

    async def go() -> None:
        async with manager_for(daemon) as (_, client):
            answer = await client.import_huggingface_models(HuggingFaceImportModelsReq.model_validate({
                "models": [{"model_id": MODEL, "revision": "main"}], "registry_name": "hf",
                "storage_step_target_mappings": {s: {"storage_name": "models"} for s in ("download", "verify",
                                                                                          "archive")},
            }))
            task = await wait_bgtask(daemon, answer.task_id)
            assert task["status"] == "done", task

    run(go())
    root = base / MODEL / "main"
    got = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert got == hub.content[f"{MODEL}@main"]


def test_import_into_a_vfolder(hf_daemon: tuple[StorageProxyProcess, Path], hub: HubServer) -> None:
    """The manager's own vfolder target (``dict.fromkeys(ArtifactStorageImportStep, VFolderStorageTarget)``)."""
    import uuid

    from ai.backend.common.data.storage.types import ArtifactStorageImportStep, VFolderStorageTarget
    from ai.backend.common.types import QuotaScopeID, QuotaScopeType, VFolderID
    from calls import manager_call

    daemon, _ = hf_daemon
    vfid = VFolderID(QuotaScopeID(QuotaScopeType.USER, uuid.uuid4()), uuid.uuid4())

    async def go() -> None:
        status, body = await manager_call(daemon, "POST", "/folder/create", {"volume": "local", "vfid": str(vfid)})
        assert status == 204, body
        async with manager_for(daemon) as (_, client):
            target = VFolderStorageTarget(vfolder_id=vfid, volume_name="local")
            answer = await client.import_huggingface_models(HuggingFaceImportModelsReq(
                models=[ModelTarget(model_id=OTHER, revision="main")], registry_name="hf",
                storage_step_target_mappings=dict.fromkeys(ArtifactStorageImportStep, target), storage_prefix="/"))
            task = await wait_bgtask(daemon, answer.task_id)
            assert task["status"] == "done", task

    run(go())
    found = list(daemon.volume_path("local").rglob("weights.bin"))
    assert [p.read_bytes() for p in found] == [hub.content[f"{OTHER}@main"]["weights.bin"]]
