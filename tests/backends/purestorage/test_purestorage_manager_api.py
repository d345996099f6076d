"""The manager API on a purestorage volume: fake array, fake tools (contract tests)."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from fake_flashblade import API_TOKEN
from support.manager import stub_manager_fixture
from twisted.internet.defer import Deferred

from storage.manager_client import ManagerAPIError
from storage.vfid import VFolderID


@pytest.fixture
def manager(tmp_path, fake_fb, fake_tools):
    extra = {
        "volume": {
            "local": {
                "backend": "purestorage",
                "options": {
                    "purity_endpoint": fake_fb.endpoint,
                    "purity_api_token": API_TOKEN,
                    "purity_fs_name": "backendai",
                    "purity_ssl_verify": False,
                },
            }
        }
    }
    stub = stub_manager_fixture(tmp_path, extra_config=extra)
    m = next(stub)
    yield m
    pytest_twisted.blockon(Deferred.fromCoroutine(m.volume().purity.close()))
    next(stub, None)


@pytest_twisted.ensureDeferred
async def test_volume_listing_hwinfo_fs_usage_and_metric(manager, fake_fb):
    c = manager.client
    (listed,) = await c.volumes()
    assert listed["backend"] == "purestorage"
    assert listed["capabilities"] == ["fast-fs-size", "fast-scan", "metric", "vfolder"]
    hw = await c.hwinfo("local")
    assert hw["status"] == "healthy" and hw["metadata"]["name"] == "fb-test"
    assert await c.fs_usage("local") == {"capacity_bytes": 100 * 2**40, "used_bytes": 5 * 2**30}
    metric = await c.performance_metric("local")
    assert metric["metric"]["iops_write"] == 340.5 and "observed_at" in metric


@pytest_twisted.ensureDeferred
async def test_metric_error_is_a_problem_not_a_crash(manager, fake_fb):
    fake_fb.performance.clear()
    with pytest.raises(ManagerAPIError) as info:
        await manager.client.performance_metric("local")
    assert info.value.status == 502


@pytest_twisted.ensureDeferred
async def test_usage_and_clone_through_the_api(manager):
    c = manager.client
    vfid = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
    await c.create_folder("local", vfid)
    await manager.volume().toolkit()
    root = manager.volume().vfolder_path(VFolderID.parse(vfid))
    (root / "a").write_bytes(b"a" * 1000)
    usage = await c.usage("local", vfid)
    assert usage["file_count"] == 1 and usage["used_bytes"] >= 1000
    dst = f"project:{uuid.uuid4()}/{uuid.uuid4().hex}"
    task = await c.clone_folder("local", vfid, dst)
    state = await c.wait_bgtask(task)
    assert state["status"] == "done"
    files = await c.list_files("local", dst)
    assert [f["name"] for f in files] == ["a"]
