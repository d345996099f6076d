"""On a real quota kernel: XFS project quotas set, reported and enforced.

Marked ``xfs``: they need ``$XFS_MNT``, an XFS mounted with ``pquota``, and
root (the helper runs ``xfs_quota -x``).  Run them in the guest:
``../shared/xfs-vm/run-in-vm.sh python -m pytest -m xfs tests/backends/xfs``
(``.ci/xfs-tests`` does it).  Elsewhere they skip, saying why.

All tests share one registry (IDs must not collide on the one filesystem);
each uses its own quota scopes.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols import amp
from xfs_sandbox import Sandbox, real_xfs_mount

from backends.base import QuotaConfig, VolumeContext
from backends.xfs import XfsVolume
from backends.xfs.projects import CRASH_ENV, directory_project
from backends.xfs.protocol import CreateProject
from backends.xfs.quota_tool import XfsQuota, find_xfs_quota
from backends.xfs.registry import RegistryFiles
from storage.bgtasks import Progress
from storage.blocking import BlockingPool
from storage.config import VolumeConfig
from storage.errors import InsufficientStorage
from storage.vfid import QuotaScopeID, VFolderID

pytestmark = pytest.mark.xfs

MiB = 1 << 20


@pytest.fixture(scope="module")
def vm_box():
    mount = real_xfs_mount() if not os.environ.get("XFS_TESTS_REQUIRED") else _required_mount()
    if os.geteuid() != 0:
        pytest.skip("needs root: xfs_quota -x")
    base = Path(tempfile.mkdtemp(prefix="xfsvm", dir="/tmp"))
    (base / "etc").mkdir()
    box = Sandbox(base=base, mount=Path(mount), etc=base / "etc", xfs_quota=find_xfs_quota(),
                  socket=str(base / "helper.sock"))
    yield box
    box.stop_all()
    shutil.rmtree(base, ignore_errors=True)


def _required_mount() -> str:
    """In CI's guest a skip would hide a broken setup: fail instead."""
    try:
        return real_xfs_mount()
    except pytest.skip.Exception as exc:
        pytest.fail(f"XFS_TESTS_REQUIRED is set but: {exc}")


@pytest.fixture(scope="module")
def volume(vm_box):
    pool = BlockingPool(reactor, 4)
    options = {
        "helper-socket": str(vm_box.base / "volume.sock"),
        "projects-file": str(vm_box.projects),
        "projid-file": str(vm_box.projid),
    }
    vol = XfsVolume(VolumeConfig("xfsvm", "xfs", vm_box.mount, ".", options),
                    VolumeContext(pool=pool, reactor=reactor))
    pool.startService()
    vol.privilegedStartService()
    vol.startService()
    try:
        pytest_twisted.blockon(defer.ensureDeferred(vol.prepare()))
        yield vol
    finally:
        # Also when prepare fails: the pool's threads would keep pytest
        # (and so the guest) alive until the VM timeout.
        pytest_twisted.blockon(vol.stopService())
        pytest_twisted.blockon(pool.stopService())


def new_qsid() -> QuotaScopeID:
    return QuotaScopeID("project", uuid.uuid4())


def fill(path: Path, nbytes: int) -> int:
    """Write up to ``nbytes``; returns how many got in before ENOSPC."""
    written = 0
    chunk = b"\xa5" * MiB
    with open(path, "wb") as f:
        try:
            while written < nbytes:
                written += f.write(chunk[: nbytes - written])
                f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc  # project quotas: ENOSPC, not EDQUOT
            return written
    return written


def test_the_guest_has_a_quota_kernel(vm_box):
    out = subprocess.run(["xfs_quota", "-x", "-c", "state -p", str(vm_box.mount)],
                         capture_output=True, text=True, check=True).stdout
    assert "Enforcement: ON" in out


@pytest_twisted.ensureDeferred
async def test_limits_are_set_reported_and_enforced(volume):
    q = new_qsid()
    await volume.create_quota_scope(q, QuotaConfig(8 * MiB))
    usage = await volume.describe_quota_scope(q)
    assert (usage.used_bytes, usage.limit_bytes) == (0, 8 * MiB)
    assert directory_project(str(volume.quota_scope_path(q))) == (usage.project_id, True)

    vf = VFolderID(q, uuid.uuid4())
    await volume.create_vfolder(vf)
    got = fill(volume.vfolder_path(vf) / "big", 20 * MiB)
    assert 7 * MiB <= got <= 8 * MiB  # stops at the limit, what got in is kept
    usage = await volume.describe_quota_scope(q)
    assert 7 * MiB <= usage.used_bytes <= 8 * MiB
    assert usage.inodes_used >= 5  # scope, h[0:2], h[2:4], vfolder, file

    # Raising the limit lets more in; unsetting removes it.
    await volume.update_quota_scope(q, QuotaConfig(16 * MiB))
    assert (await volume.describe_quota_scope(q)).limit_bytes == 16 * MiB
    assert fill(volume.vfolder_path(vf) / "more", 4 * MiB) == 4 * MiB
    await volume.unset_quota(q)
    assert (await volume.describe_quota_scope(q)).limit_bytes is None
    assert fill(volume.vfolder_path(vf) / "unlimited", 20 * MiB) == 20 * MiB


@pytest_twisted.ensureDeferred
async def test_a_full_quota_answers_507_naming_the_scope(volume):
    q = new_qsid()
    await volume.create_quota_scope(q, QuotaConfig(4 * MiB))
    vf = VFolderID(q, uuid.uuid4())
    await volume.create_vfolder(vf)
    root = volume.vfolder_path(vf)
    assert fill(root / "a", 3 * MiB) == 3 * MiB

    # copy_file_range into the full project: a short count, then ENOSPC.
    with pytest.raises(InsufficientStorage) as info:
        await volume.copy_file(vf, "a", "b")
    assert info.value.status == 507
    assert info.value.body()["quota_scope_id"] == str(q)
    assert sorted(os.listdir(root)) == ["a"]  # no half-made copy

    # Fill it to the brim; then even a new directory does not fit.
    fill(root / "pad", 2 * MiB)
    with pytest.raises(InsufficientStorage) as info:
        await volume.mkdir(vf, "newdir/sub")
    assert info.value.body()["quota_scope_id"] == str(q)


@pytest_twisted.ensureDeferred
async def test_a_clone_that_does_not_fit_is_removed(volume):
    src_q, dst_q = new_qsid(), new_qsid()
    await volume.create_quota_scope(src_q, QuotaConfig(64 * MiB))
    await volume.create_quota_scope(dst_q, QuotaConfig(6 * MiB))
    src = VFolderID(src_q, uuid.uuid4())
    await volume.create_vfolder(src)
    for i in range(4):
        assert fill(volume.vfolder_path(src) / f"f{i}", 3 * MiB) == 3 * MiB
    dst = VFolderID(dst_q, uuid.uuid4())
    with pytest.raises(InsufficientStorage) as info:
        await volume.clone_vfolder(src, volume, dst, Progress())
    assert info.value.body()["quota_scope_id"] == str(dst_q)
    assert not volume.vfolder_path(dst).exists()
    # Shared extents are charged to the destination: a clone that fits works
    # and is charged there.
    await volume.update_quota_scope(dst_q, QuotaConfig(64 * MiB))
    await volume.clone_vfolder(src, volume, dst, Progress())
    assert sorted(os.listdir(volume.vfolder_path(dst))) == ["f0", "f1", "f2", "f3"]
    used = (await volume.describe_quota_scope(dst_q)).used_bytes
    assert used >= 12 * MiB


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_creations(volume, vm_box):
    scopes = [new_qsid() for _ in range(50)]
    await defer.gatherResults(
        [defer.ensureDeferred(volume.create_quota_scope(q, QuotaConfig((i + 1) * MiB))) for i, q in enumerate(scopes)],
        consumeErrors=True,
    )
    usages = [await volume.describe_quota_scope(q) for q in scopes]
    ids = [u.project_id for u in usages]
    assert len(set(ids)) == 50
    assert [u.limit_bytes for u in usages] == [(i + 1) * MiB for i in range(50)]
    reg = RegistryFiles(vm_box.projects, vm_box.projid).read()
    by_name = reg.projid.mapping()
    assert len(by_name) == len(reg.projid.lines) == len(reg.projects.lines)
    for q, pid in zip(scopes, ids, strict=True):
        assert by_name[q.pathname] == pid
        assert directory_project(str(volume.quota_scope_path(q))) == (pid, True)


@pytest.mark.parametrize("step", ["add:projid", "project", "limit"])
@pytest_twisted.ensureDeferred
async def test_a_crash_is_repaired_with_the_real_xfs_quota(vm_box, volume, step):
    name = uuid.uuid4().hex
    path = vm_box.mount / name
    path.mkdir()
    box = Sandbox(base=vm_box.base, mount=vm_box.mount, etc=vm_box.etc, xfs_quota=vm_box.xfs_quota,
                  socket=str(vm_box.base / f"crash-{step.replace(':', '-')}.sock"))
    try:
        proc = box.start_helper({CRASH_ENV: step})
        proto = await connectProtocol(UNIXClientEndpoint(reactor, box.socket), amp.AMP())
        with pytest.raises((error.ConnectionDone, error.ConnectionLost)):  # the helper exits mid-call
            await proto.callRemote(CreateProject, name=name, path=str(path), limit_bytes=5 * MiB)
        assert proc.wait(60) == 75
        box.start_helper()  # reconciles before listening
    finally:
        box.stop_all()
    pid = RegistryFiles(vm_box.projects, vm_box.projid).read().projid.mapping()[name]
    assert directory_project(str(path)) == (pid, True)
    tool = XfsQuota(vm_box.xfs_quota, vm_box.projects, vm_box.projid)
    assert tool.report(pid, str(vm_box.mount)).hard_limit_bytes == 5 * MiB
    assert 4 * MiB <= fill(path / "x", 8 * MiB) <= 5 * MiB  # and it is enforced
