"""The daemon's own quota enforcement on a real XFS with project quotas
(storage.quota reads the project's limit and usage with ``statvfs`` of its
directory): the upload session's size, a PATCH cut at what is left (XFS
would also stop it, with ENOSPC; the daemon stops first, keeping a block
for the upload's state file), two uploads racing for the last bytes, a
lowered limit, concatenation.  Marked ``xfs``: run in ../shared/xfs-vm."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from support import quota_scenarios as qs
from support.daemon import StorageProxyProcess
from support.quota_scenarios import MiB, Scope
from xfs_sandbox import real_xfs_mount

from storage.quota import XFS_RECORD_MARGIN as MARGIN

pytestmark = pytest.mark.xfs

# XFS charges whole blocks: each upload's state file takes 4 KiB, a
# directory may take a block.  Each writer keeps 64 KiB free (MARGIN): a
# delayed allocation reserves its extent tree's worst case too.
BOOKKEEPING = 64 << 10


def _own_xfs(base: Path) -> str:
    """A fresh pquota XFS on a loop device, for this module alone: the other
    xfs tests' registries hand out the same project IDs on $XFS_MNT, and a
    project ID still charged with their files would skew these exact sums."""
    image, mount = base / "xfs.img", base / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop,pquota", str(image), str(mount)], check=True, capture_output=True)
    return str(mount)


@pytest.fixture(scope="module")
def xfs_daemon():
    real_xfs_mount()  # skips, saying why, outside the guest
    if os.geteuid() != 0:
        pytest.skip("the XFS helper needs root")
    base = Path(tempfile.mkdtemp(prefix="xfsq", dir="/tmp"))
    mount = _own_xfs(base)
    prefix = f"quota-{uuid.uuid4().hex[:8]}"
    root = Path(mount) / prefix
    root.mkdir()
    config = {"volume": {"xfs": {
        "backend": "xfs", "path": mount, "fsprefix": prefix,
        "options": {"helper-socket": str(base / "run" / "xfs.sock"),
                    "projects-file": str(base / "projects"), "projid-file": str(base / "projid")},
    }}}
    daemon = StorageProxyProcess(base / "proxy", volumes=(), extra_config=config)
    try:
        daemon.start(timeout=120)
        deadline = time.monotonic() + 300
        while "storage-proxy ready" not in daemon.log:
            assert time.monotonic() < deadline and daemon.process is not None and daemon.process.poll() is None, \
                daemon.log[-4000:]
            time.sleep(0.1)
        yield daemon, root
    finally:
        daemon.stop()
        print(daemon.log[-6000:])
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["umount", mount], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def scope_of(xfs_daemon) -> Scope:
    daemon, root = xfs_daemon
    return Scope(daemon, root, volume="xfs")


def test_an_upload_session_that_cannot_fit_is_507_and_creates_nothing(xfs_daemon):
    qs.session_that_cannot_fit(scope_of(xfs_daemon), BOOKKEEPING, MARGIN)


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_a_patch_stops_at_the_project_limit_and_keeps_the_bytes(xfs_daemon, sized):
    qs.patch_cut_at_the_limit(scope_of(xfs_daemon), 10 * MiB, 20 * MiB, sized, BOOKKEEPING, MARGIN)


def test_two_uploads_racing_for_the_last_bytes_of_a_project(xfs_daemon):
    daemon, root = xfs_daemon
    scope = scope_of(xfs_daemon)
    qs.race_for_the_last_bytes(scope, [scope.up, scope.up], 12 * MiB, 8 * MiB, BOOKKEEPING,
                               root / ".storage-proxy" / "quota", MARGIN)
    usage = scope.usage()
    assert usage["used_bytes"] <= usage["limit_bytes"] == 12 * MiB


def test_a_lowered_limit_refuses_further_writes(xfs_daemon):
    qs.lowered_limit_refuses_writes(scope_of(xfs_daemon))


def test_concatenation_checks_the_project(xfs_daemon):
    daemon, _ = xfs_daemon
    qs.concatenation_needs_room(scope_of(xfs_daemon), daemon.client_url)
