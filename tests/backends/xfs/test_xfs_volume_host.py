"""XfsVolume on the host: the quota-scope calls through a spawned (supervised) helper,
driven by the fake xfs_quota.  The real quota kernel is in test_xfs_quota_vm.py."""

from __future__ import annotations

import errno
import os
import signal
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from backends.base import QuotaConfig, VolumeContext
from backends.xfs import XfsVolume
from backends.xfs.volume import QuotaDirectoryNotEmpty, pquota_problem
from storage.blocking import BlockingPool
from storage.config import ConfigError, VolumeConfig
from storage.errors import InsufficientStorage, QuotaScopeExists, QuotaScopeNotFound
from storage.vfid import QuotaScopeID, VFolderID


def make_volume(box, **options) -> tuple[XfsVolume, BlockingPool]:
    pool = BlockingPool(reactor, 4)
    opts = {
        "helper-socket": box.socket,
        "projects-file": str(box.projects),
        "projid-file": str(box.projid),
        "xfs-quota": box.xfs_quota,
        "require-pquota": False,
        "helper-timeout": "30s",
        **options,
    }
    config = VolumeConfig("xfstest", "xfs", box.mount, ".", opts)
    return XfsVolume(config, VolumeContext(pool=pool, reactor=reactor)), pool


@pytest.fixture
def volume(sandbox):
    vol, pool = make_volume(sandbox)
    pool.startService()
    vol.privilegedStartService()
    vol.startService()
    yield vol
    pytest_twisted.blockon(vol.stopService())
    pytest_twisted.blockon(pool.stopService())


def qsid() -> QuotaScopeID:
    return QuotaScopeID("user", uuid.uuid4())


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


async def _wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("condition not reached in time")


@pytest_twisted.ensureDeferred
async def test_quota_scope_lifecycle(volume, sandbox):
    await volume.prepare()
    assert (await volume.get_hwinfo())["status"] == "healthy"
    q = qsid()
    await volume.create_quota_scope(q, QuotaConfig(10 << 20))
    with pytest.raises(QuotaScopeExists):
        await volume.create_quota_scope(q, QuotaConfig(1 << 20))
    usage = await volume.describe_quota_scope(q)
    assert (usage.used_bytes, usage.limit_bytes, usage.project_id) == (0, 10 << 20, 1)
    assert usage.inodes_used == 1
    path = str(sandbox.mount / q.pathname)
    assert sandbox.fake_state()["marked"] == {path: 1}

    await volume.update_quota_scope(q, QuotaConfig(20 << 20))
    assert (await volume.describe_quota_scope(q)).limit_bytes == 20 << 20
    await volume.unset_quota(q)
    assert (await volume.describe_quota_scope(q)).limit_bytes is None

    # PATCH on a missing scope creates it; the next one gets the next ID.
    q2 = qsid()
    await volume.update_quota_scope(q2, QuotaConfig(1 << 20))
    assert (await volume.describe_quota_scope(q2)).project_id == 2

    vf = VFolderID(q, uuid.uuid4())
    await volume.create_vfolder(vf)
    with pytest.raises(QuotaDirectoryNotEmpty):
        await volume.delete_quota_scope(q)
    await volume.delete_vfolder(vf)
    await volume.delete_quota_scope(q)
    assert not os.path.exists(path)
    with pytest.raises(QuotaScopeNotFound):
        await volume.describe_quota_scope(q)
    with pytest.raises(QuotaScopeNotFound):
        await volume.unset_quota(q)
    # ID 1 is free again: the smallest free one is reused.
    q3 = qsid()
    await volume.create_quota_scope(q3)
    usage3 = await volume.describe_quota_scope(q3)
    assert usage3.project_id == 1
    st = os.statvfs(sandbox.mount)
    assert usage3.limit_bytes == -(-(st.f_blocks * st.f_frsize) // 1024) * 1024  # no options: the fs size


@pytest_twisted.ensureDeferred
async def test_a_failed_creation_leaves_no_directory(sandbox):
    os.environ["FAKE_XFS_QUOTA_FAIL"] = "limit"
    try:
        vol, pool = make_volume(sandbox)
        vol.startService()
        try:
            q = qsid()
            with pytest.raises(Exception, match="injected failure"):
                await vol.create_quota_scope(q, QuotaConfig(1 << 20))
            assert not (sandbox.mount / q.pathname).exists()
        finally:
            await vol.stopService()
            await pool.stopService()
    finally:
        del os.environ["FAKE_XFS_QUOTA_FAIL"]


@pytest_twisted.ensureDeferred
async def test_the_helper_is_restarted_when_it_dies(volume, sandbox):
    await volume.prepare()
    supervisor = volume.helper_process.pid()
    worker = await _wait_for(lambda: (_children(supervisor) or [None])[0])
    os.kill(worker, signal.SIGKILL)
    q = qsid()
    await volume.create_quota_scope(q, QuotaConfig(1 << 20))  # waits for the restarted worker
    new_worker = _children(supervisor)
    assert new_worker and new_worker[0] != worker
    # The supervisor itself is restarted by the daemon's ProcessMonitor.
    os.kill(supervisor, signal.SIGKILL)
    await _wait_for(lambda: volume.helper_process.pid() not in (None, supervisor))
    assert (await volume.describe_quota_scope(q)).limit_bytes == 1 << 20


@pytest_twisted.ensureDeferred
async def test_stopping_the_volume_stops_the_helper(sandbox):
    vol, pool = make_volume(sandbox)
    vol.startService()
    await vol.prepare()
    supervisor = vol.helper_process.pid()
    worker = await _wait_for(lambda: (_children(supervisor) or [None])[0])
    await vol.stopService()
    await pool.stopService()
    for pid in (supervisor, worker):
        await _wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), 15)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest_twisted.ensureDeferred
async def test_an_unreachable_helper_is_a_bounded_execution_error(sandbox):
    vol, pool = make_volume(sandbox, **{"spawn-helper": False, "helper-timeout": 0.5})
    vol.startService()
    try:
        info = await vol.get_hwinfo()
        assert info["status"] == "degraded" and "no XFS quota helper answered" in info["status_info"]
        q = qsid()
        with pytest.raises(Exception, match="no XFS quota helper answered"):
            await vol.create_quota_scope(q, QuotaConfig(1 << 20))
        assert not (sandbox.mount / q.pathname).exists()
    finally:
        await vol.stopService()
        await pool.stopService()


@pytest_twisted.ensureDeferred
async def test_start_up_waits_helper_start_timeout_for_the_helper(sandbox):
    vol, pool = make_volume(sandbox, **{"spawn-helper": False, "helper-timeout": 0.2,
                                        "helper-start-timeout": 1.5})
    vol.startService()
    try:
        with pytest.raises(Exception, match=r"no XFS quota helper answered .* within 1\.5s"):
            await vol.prepare()
    finally:
        await vol.stopService()
        await pool.stopService()


@pytest_twisted.ensureDeferred
async def test_quota_full_names_the_quota_scope(volume, sandbox, monkeypatch):
    from storage.fs import tree as fstree

    q = qsid()
    await volume.create_quota_scope(q, QuotaConfig(1 << 20))
    vf = VFolderID(q, uuid.uuid4())
    await volume.create_vfolder(vf)
    (volume.vfolder_path(vf) / "a").write_bytes(b"x" * 1000)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fstree, "copy_file_at", full)
    with pytest.raises(InsufficientStorage) as info:
        await volume.copy_file(vf, "a", "b")
    body = info.value.body()
    assert body["quota_scope_id"] == str(q) and body["errno"] == errno.ENOSPC
    assert info.value.status == 507
    assert sorted(os.listdir(volume.vfolder_path(vf))) == ["a"]


def test_pquota_check_explains_what_is_wrong(tmp_path):
    assert "not a mount point" in pquota_problem(str(tmp_path))
    assert "not XFS" in pquota_problem("/proc")


@pytest_twisted.ensureDeferred
async def test_prepare_refuses_a_path_that_is_not_a_pquota_xfs(sandbox):
    vol, pool = make_volume(sandbox, **{"require-pquota": True, "spawn-helper": False})
    try:
        with pytest.raises(ConfigError, match="not a mount point"):
            await vol.prepare()
    finally:
        await pool.stopService()
