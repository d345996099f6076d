"""The cephfs backend through its volume interface, on a real CephFS.

Rstats are lazy and quota enforcement is client-side: usage is polled until
it settles, and quota tests write until EDQUOT (bounded) rather than expect
the limit to be hit at an exact byte.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from cephfs_support import poll_until, sleep
from twisted.internet import defer, reactor

from backends import backend_class
from backends.base import Capability, QuotaConfig, VolumeContext
from backends.cephfs import CephFSVolume, xattrs
from storage.blocking import BlockingPool
from storage.config import ConfigError, VolumeConfig
from storage.errors import (
    InsufficientStorage,
    InvalidQuotaConfig,
    QuotaScopeExists,
    QuotaScopeNotFound,
    VFolderNotFound,
)
from storage.fs import crossmove
from storage.vfid import QuotaScopeID, VFolderID

pytestmark = pytest.mark.cephfs
MiB = 1 << 20


@pytest.fixture
def pool():
    p = BlockingPool(reactor, max_threads=4)
    yield p
    if p.threadpool.started:
        p.threadpool.stop()


def make_volume(path: Path, pool: BlockingPool) -> CephFSVolume:
    config = VolumeConfig(name="ceph", backend="cephfs", path=path)
    return backend_class("cephfs")(config, VolumeContext(pool=pool, reactor=reactor))


@pytest.fixture
def volume(cephfs_dir, pool):
    vol = make_volume(cephfs_dir, pool)
    pytest_twisted.blockon(defer.Deferred.fromCoroutine(vol.prepare()))
    yield vol
    vol.usage_cache.stop()


def new_qsid() -> QuotaScopeID:
    return QuotaScopeID("user", uuid.uuid4())


async def new_vfolder(volume: CephFSVolume, qsid: QuotaScopeID | None = None) -> VFolderID:
    qsid = qsid or new_qsid()
    vfid = VFolderID(qsid, uuid.uuid4())
    await volume.create_vfolder(vfid, auto_create_quota_scope=True)
    return vfid


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def test_declares_upstreams_capabilities(cephfs_dir, pool):
    vol = make_volume(cephfs_dir, pool)
    assert vol.describe()["capabilities"] == sorted({"vfolder", "quota", "fast-size"})
    assert vol.describe()["backend"] == "cephfs"
    assert Capability.FAST_SIZE in vol.capabilities


@pytest_twisted.ensureDeferred
async def test_refuses_a_path_that_is_not_cephfs(tmp_path, pool):
    vol = make_volume(tmp_path, pool)
    with pytest.raises(ConfigError, match="not a CephFS"):
        await vol.prepare()


# -- quota scopes ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_quota_set_get_update_unset(volume):
    qsid = new_qsid()
    await volume.create_quota_scope(qsid, QuotaConfig(10 * MiB))
    path = volume.quota_scope_path(qsid)
    assert xattrs.read_quota(path)[0] == 10 * MiB  # really on the directory
    usage = await volume.describe_quota_scope(qsid)
    assert usage.limit_bytes == 10 * MiB and usage.used_bytes == 0

    await volume.update_quota_scope(qsid, QuotaConfig(20 * MiB))
    assert (await volume.describe_quota_scope(qsid)).limit_bytes == 20 * MiB

    await volume.unset_quota(qsid)
    assert (await volume.describe_quota_scope(qsid)).limit_bytes is None
    assert xattrs.read_quota(path) == (None, None)

    await volume.update_quota_scope(qsid, QuotaConfig(0))  # 0 means no limit
    assert (await volume.describe_quota_scope(qsid)).limit_bytes is None

    with pytest.raises(QuotaScopeExists):
        await volume.create_quota_scope(qsid)


@pytest_twisted.ensureDeferred
async def test_update_creates_a_missing_scope_with_its_limit(volume):
    qsid = new_qsid()
    await volume.update_quota_scope(qsid, QuotaConfig(5 * MiB))
    assert (await volume.describe_quota_scope(qsid)).limit_bytes == 5 * MiB


@pytest_twisted.ensureDeferred
async def test_missing_scope_and_bad_limits(volume):
    qsid = new_qsid()
    with pytest.raises(QuotaScopeNotFound):
        await volume.describe_quota_scope(qsid)
    with pytest.raises(QuotaScopeNotFound):
        await volume.unset_quota(qsid)
    with pytest.raises(InvalidQuotaConfig):
        await volume.create_quota_scope(qsid, QuotaConfig(-1))
    assert not volume.quota_scope_path(qsid).exists()  # refused before creating anything


# -- usage from rstats ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_usage_comes_from_rstats_and_settles(volume):
    qsid = new_qsid()
    vfid = await new_vfolder(volume, qsid)
    root = volume.vfolder_path(vfid)
    assert (await volume.get_usage(vfid)).file_count == 0
    await volume.pool.run(write, root / "a" / "b" / "f1", 3 * MiB)
    await volume.pool.run(write, root / "f2", 1 * MiB + 5)
    expected = 4 * MiB + 5

    usage = await poll_until(lambda: volume.get_usage(vfid), lambda u: u.used_bytes == expected)
    assert usage.used_bytes == expected
    assert usage.file_count == 4  # a, a/b, a/b/f1, f2
    sub = await poll_until(lambda: volume.get_usage(vfid, "a"), lambda u: u.used_bytes == 3 * MiB)
    assert (sub.file_count, sub.used_bytes) == (2, 3 * MiB)
    assert await poll_until(lambda: volume.get_used_bytes(vfid), lambda b: b == expected) == expected
    scope = await poll_until(lambda: volume.describe_quota_scope(qsid), lambda u: u.used_bytes == expected)
    assert scope.used_bytes == expected


@pytest_twisted.ensureDeferred
async def test_usage_of_a_file_or_missing_vfolder(volume):
    vfid = await new_vfolder(volume)
    await volume.pool.run(write, volume.vfolder_path(vfid) / "f", 10)
    with pytest.raises(Exception) as info:
        await volume.get_usage(vfid, "f")
    assert getattr(info.value, "status", None) == 400
    with pytest.raises(VFolderNotFound):
        await volume.get_usage(VFolderID(new_qsid(), uuid.uuid4()))


@pytest_twisted.ensureDeferred
async def test_fs_usage_is_statvfs_of_the_mount(volume):
    usage = await volume.get_fs_usage()
    st = os.statvfs(volume.mount_path)
    assert usage.capacity_bytes == st.f_frsize * st.f_blocks
    assert 0 <= usage.used_bytes <= usage.capacity_bytes


# -- quota enforcement -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_writing_past_the_quota_is_insufficient_storage(volume):
    qsid = new_qsid()
    await volume.create_quota_scope(qsid, QuotaConfig(4 * MiB))
    vfid = await new_vfolder(volume, qsid)
    await volume.pool.run(write, volume.vfolder_path(vfid) / "seed", 1 * MiB)
    # The client learns the realm's size lazily: keep copying (bounded) until
    # EDQUOT, pausing so the MDS catches up, as a real client would retry.
    with pytest.raises(InsufficientStorage) as info:
        for i in range(40):
            await volume.copy_file(vfid, "seed", f"copy-{i}")
            await sleep(0.3)
    assert info.value.status == 507
    leftovers = [n for n in os.listdir(volume.vfolder_path(vfid)) if n.endswith(".copying")]
    assert leftovers == []


@pytest_twisted.ensureDeferred
async def test_clone_into_a_too_small_scope_is_refused_up_front(volume):
    src = await new_vfolder(volume)
    await volume.pool.run(write, volume.vfolder_path(src) / "big", 8 * MiB)
    await poll_until(lambda: volume.get_used_bytes(src), lambda b: b == 8 * MiB)
    small = new_qsid()
    await volume.create_quota_scope(small, QuotaConfig(1 * MiB))
    dst = VFolderID(small, uuid.uuid4())
    with pytest.raises(InsufficientStorage, match=r"needs 8388608 bytes but quota scope \S+ has \d+ of 1048576 left"):
        await volume.clone_vfolder(src, volume, dst)
    assert not volume.vfolder_path(dst).exists()


@pytest_twisted.ensureDeferred
async def test_clone_across_scopes(volume):
    src = await new_vfolder(volume)
    root = volume.vfolder_path(src)
    await volume.pool.run(write, root / "d" / "f", 2 * MiB)
    os.symlink("d/f", root / "link")
    dst = VFolderID(new_qsid(), uuid.uuid4())
    await volume.clone_vfolder(src, volume, dst)
    out = volume.vfolder_path(dst)
    assert (out / "d" / "f").read_bytes() == (root / "d" / "f").read_bytes()
    assert os.readlink(out / "link") == "d/f"
    usage = await poll_until(lambda: volume.get_usage(dst), lambda u: u.used_bytes >= 2 * MiB)
    assert usage.used_bytes == 2 * MiB + len("d/f")


# -- moves across a quota boundary (EXDEV) ----------------------------------------


async def vfolder_with_inner_realm(volume, inner_limit: int = 64 * MiB) -> tuple[VFolderID, Path]:
    """A vfolder whose subdirectory ``inner`` has its own quota (a nested realm)."""
    vfid = await new_vfolder(volume)
    root = volume.vfolder_path(vfid)
    (root / "inner").mkdir()
    xattrs.set_max_bytes(root / "inner", inner_limit)
    return vfid, root


@pytest_twisted.ensureDeferred
async def test_move_file_into_another_realm(volume):
    vfid, root = await vfolder_with_inner_realm(volume)
    await volume.pool.run(write, root / "f", 2 * MiB)
    data = (root / "f").read_bytes()
    with pytest.raises(OSError):
        os.rename(root / "f", root / "inner" / "probe")  # the EXDEV being worked around
    await volume.move(vfid, "f", "inner")  # into the directory, like shutil.move
    assert (root / "inner" / "f").read_bytes() == data
    assert not (root / "f").exists()
    assert sorted(os.listdir(root / "inner")) == ["f"]


@pytest_twisted.ensureDeferred
async def test_move_tree_out_of_a_realm_and_rename_into_one(volume):
    vfid, root = await vfolder_with_inner_realm(volume)
    await volume.pool.run(write, root / "inner" / "t" / "x" / "y", 1000)
    os.symlink("x/y", root / "inner" / "t" / "ln")
    await volume.move(vfid, "inner/t", "t2")
    assert (root / "t2" / "x" / "y").stat().st_size == 1000
    assert os.readlink(root / "t2" / "ln") == "x/y"
    assert not (root / "inner" / "t").exists()
    # rename onto an existing directory name moves into it (upstream's shutil.move)
    await volume.pool.run(write, root / "g", 10)
    await volume.rename(vfid, "g", "inner")
    assert (root / "inner" / "g").stat().st_size == 10


@pytest_twisted.ensureDeferred
async def test_move_across_realms_is_atomic_for_observers(volume):
    vfid, root = await vfolder_with_inner_realm(volume)
    size = 48 * MiB
    await volume.pool.run(write, root / "big", size)
    target = root / "inner" / "big"
    seen: set[int] = set()
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            try:
                seen.add(os.stat(target).st_size)
            except FileNotFoundError:
                seen.add(-1)

    watcher = threading.Thread(target=observe, daemon=True)
    watcher.start()
    try:
        await volume.move(vfid, "big", "inner/big")
    finally:
        stop.set()
        watcher.join()
    assert seen <= {-1, size}, f"a partial file was visible: {sorted(seen)}"
    assert target.stat().st_size == size


@pytest_twisted.ensureDeferred
async def test_failed_move_keeps_the_source_and_leaves_no_temporary(volume):
    vfid, root = await vfolder_with_inner_realm(volume, inner_limit=1 * MiB)
    await volume.pool.run(write, root / "big", 16 * MiB)
    with pytest.raises(InsufficientStorage):
        await volume.move(vfid, "big", "inner/big")
    assert (root / "big").stat().st_size == 16 * MiB
    assert os.listdir(root / "inner") == []


@pytest_twisted.ensureDeferred
async def test_a_staged_file_moves_into_place_across_a_boundary(volume):
    """What upload completion does (storage.fs.crossmove.move_path in the pool)."""
    vfid, root = await vfolder_with_inner_realm(volume)
    staging = root / ".upload"
    staging.mkdir()
    await volume.pool.run(write, staging / "session", 3 * MiB)
    data = (staging / "session").read_bytes()
    (root / "inner" / "result").write_bytes(b"old")
    await volume.pool.run(crossmove.move_path, staging / "session", root / "inner" / "result")
    assert (root / "inner" / "result").read_bytes() == data
    assert os.listdir(staging) == []
    assert sorted(os.listdir(root / "inner")) == ["result"]
