"""The vfs volume's emulated quota (``quota = "emulated"``) and the daemon's
own checks of copies and clones against a quota scope (storage.quota)."""

from __future__ import annotations

import os
import uuid

import pytest
import pytest_twisted

from backends.base import QuotaConfig
from backends.vfs import VfsVolume
from storage.config import ConfigError
from storage.errors import InsufficientStorage, InvalidQuotaConfig
from storage.quota import RECORD_MARGIN
from storage.vfid import QuotaScopeID, VFolderID

ensure = pytest_twisted.ensureDeferred
MiB = 1 << 20


def new_vfid() -> VFolderID:
    return VFolderID(QuotaScopeID("user", uuid.uuid4()), uuid.uuid4())


@pytest.fixture
def qvolume(make_volume) -> VfsVolume:
    return make_volume("emulated", quota="emulated")


async def scoped_vfolder(volume: VfsVolume, limit: int | None) -> VFolderID:
    vfid = new_vfid()
    assert vfid.quota_scope_id is not None
    options = QuotaConfig(limit) if limit is not None else None
    await volume.create_quota_scope(vfid.quota_scope_id, options)
    await volume.create_vfolder(vfid)
    return vfid


@ensure
async def test_the_emulated_limit_is_kept_reported_changed_and_unset(qvolume: VfsVolume) -> None:
    vfid = await scoped_vfolder(qvolume, 2 * MiB)
    qsid = vfid.quota_scope_id
    assert qsid is not None
    usage = await qvolume.describe_quota_scope(qsid)
    assert (usage.used_bytes, usage.limit_bytes) == (0, 2 * MiB)
    (qvolume.vfolder_path(vfid) / "f").write_bytes(b"x" * 1000)
    assert (await qvolume.describe_quota_scope(qsid)).used_bytes == 1000
    await qvolume.update_quota_scope(qsid, QuotaConfig(5 * MiB))
    assert (await qvolume.describe_quota_scope(qsid)).limit_bytes == 5 * MiB
    with pytest.raises(InvalidQuotaConfig):
        await qvolume.update_quota_scope(qsid, QuotaConfig(-1))
    await qvolume.unset_quota(qsid)
    usage = await qvolume.describe_quota_scope(qsid)
    assert (usage.used_bytes, usage.limit_bytes) == (None, None)


def test_only_vfs_volumes_take_the_emulated_quota(make_volume) -> None:
    with pytest.raises(ConfigError, match="quota"):
        make_volume("bad", quota="sometimes")


@ensure
async def test_a_copy_that_does_not_fit_is_refused_before_it_starts(qvolume: VfsVolume) -> None:
    vfid = await scoped_vfolder(qvolume, 3 * MiB)
    root = qvolume.vfolder_path(vfid)
    (root / "a.bin").write_bytes(os.urandom(2 * MiB))
    with pytest.raises(InsufficientStorage) as info:
        await qvolume.copy_file(vfid, "a.bin", "b.bin")
    assert info.value.status == 507
    extra = info.value.extra
    assert extra["quota_scope_id"] == str(vfid.quota_scope_id) and extra["size"] == 2 * MiB
    assert extra["left"] == 1 * MiB - RECORD_MARGIN
    assert sorted(os.listdir(root)) == ["a.bin"]  # nothing created, no temporary left
    (root / "small.bin").write_bytes(b"y" * 1000)
    await qvolume.copy_file(vfid, "small.bin", "copy.bin")
    assert (root / "copy.bin").read_bytes() == b"y" * 1000


@ensure
async def test_a_lowered_limit_refuses_every_copy(qvolume: VfsVolume) -> None:
    vfid = await scoped_vfolder(qvolume, 8 * MiB)
    root = qvolume.vfolder_path(vfid)
    (root / "a.bin").write_bytes(os.urandom(MiB))
    assert vfid.quota_scope_id is not None
    await qvolume.update_quota_scope(vfid.quota_scope_id, QuotaConfig(MiB // 2))
    with pytest.raises(InsufficientStorage) as info:
        await qvolume.copy_file(vfid, "a.bin", "b.bin")
    assert info.value.extra["left"] == 0
    assert not (root / "b.bin").exists()


@ensure
async def test_a_clone_into_a_scope_without_room_is_refused_and_leaves_nothing(qvolume: VfsVolume) -> None:
    src = await scoped_vfolder(qvolume, None)
    (qvolume.vfolder_path(src) / "data.bin").write_bytes(os.urandom(2 * MiB))
    qsid = QuotaScopeID("project", new_vfid().folder_id)
    await qvolume.create_quota_scope(qsid, QuotaConfig(MiB))
    dst = VFolderID(qsid, new_vfid().folder_id)
    with pytest.raises(InsufficientStorage) as info:
        await qvolume.clone_vfolder(src, qvolume, dst)
    assert info.value.extra["quota_scope_id"] == str(qsid)
    assert "the clone needs" in str(info.value.msg)
    assert not qvolume.vfolder_path(dst).exists()
    # Room made: the same clone goes through.
    await qvolume.update_quota_scope(qsid, QuotaConfig(4 * MiB))
    await qvolume.clone_vfolder(src, qvolume, dst)
    assert (qvolume.vfolder_path(dst) / "data.bin").read_bytes() == (qvolume.vfolder_path(src) / "data.bin").read_bytes()
