"""The manager API on a cephfs volume (socket-free StubTreq, real CephFS)."""

from __future__ import annotations

import os
import uuid

import pytest
import pytest_twisted
from cephfs_support import poll_until
from support.manager import stub_manager_fixture

from backends.cephfs import xattrs
from storage.manager_client import ManagerAPIError
from storage.vfid import QuotaScopeID, VFolderID

pytestmark = pytest.mark.cephfs
MiB = 1 << 20


@pytest.fixture
def manager(tmp_path, cephfs_dir):
    extra = {"volume": {"local": {"backend": "cephfs", "path": str(cephfs_dir)}}}
    yield from stub_manager_fixture(tmp_path, extra_config=extra)


def qsid() -> str:
    return f"user:{uuid.uuid4()}"


@pytest_twisted.ensureDeferred
async def test_volume_is_listed_with_cephfs_capabilities(manager):
    await manager.volume().prepare()
    (listed,) = await manager.client.volumes()
    assert listed["backend"] == "cephfs"
    assert listed["capabilities"] == ["fast-size", "quota", "vfolder"]


@pytest_twisted.ensureDeferred
async def test_quota_scope_routes(manager):
    c = manager.client
    scope = qsid()
    await c.create_quota_scope("local", scope, limit_bytes=10 * MiB)
    assert await c.get_quota_scope("local", scope) == {"used_bytes": 0, "limit_bytes": 10 * MiB}
    with pytest.raises(ManagerAPIError) as info:
        await c.create_quota_scope("local", scope)
    assert info.value.status == 409
    await c.update_quota_scope("local", scope, 3 * MiB)
    assert (await c.get_quota_scope("local", scope))["limit_bytes"] == 3 * MiB
    path = manager.volume().quota_scope_path(QuotaScopeID.parse(scope))
    assert xattrs.read_quota(path)[0] == 3 * MiB
    await c.unset_quota("local", scope)
    assert (await c.get_quota_scope("local", scope))["limit_bytes"] is None
    with pytest.raises(ManagerAPIError) as info:
        await c.get_quota_scope("local", qsid())
    assert info.value.status == 404


@pytest_twisted.ensureDeferred
async def test_usage_move_and_clone_through_the_api(manager):
    c = manager.client
    scope = qsid()
    vfid = f"{scope}/{uuid.uuid4().hex}"
    await c.create_folder("local", vfid)
    root = manager.volume().vfolder_path(VFolderID.parse(vfid))
    (root / "inner").mkdir()
    xattrs.set_max_bytes(root / "inner", 1 * MiB)  # a nested realm
    (root / "f").write_bytes(os.urandom(2 * MiB))

    usage = await poll_until(lambda: c.usage("local", vfid), lambda u: u["used_bytes"] == 2 * MiB)
    assert usage == {"file_count": 2, "used_bytes": 2 * MiB}

    # Across the boundary into a realm too small: 507, the source kept.
    with pytest.raises(ManagerAPIError) as info:
        await c.move("local", vfid, "f", "inner/f")
    assert info.value.status == 507
    assert (root / "f").stat().st_size == 2 * MiB and os.listdir(root / "inner") == []
    # Out of it is fine.
    (root / "inner" / "small").write_bytes(b"s" * 100)
    await c.move("local", vfid, "inner/small", "small")
    assert (root / "small").read_bytes() == b"s" * 100

    # A clone into a scope whose quota is smaller than the folder fails as a task.
    tight = qsid()
    await c.create_quota_scope("local", tight, limit_bytes=1 * MiB)
    task = await c.clone_folder("local", vfid, f"{tight}/{uuid.uuid4().hex}")
    state = await c.wait_bgtask(task, raise_on_failure=False)
    assert state["status"] == "failed"
    assert state["error"]["type"].endswith("/insufficient-storage")
