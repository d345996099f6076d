"""A real CephFS for the ``cephfs``-marked tests.

``cephfs_mount`` (session scope) is, in order of preference:

1. ``$CEPHFS_MNT`` when it is set and answers CephFS's ``ceph.dir.rbytes``
   (``.ci/cephfs-tests`` brings one up with ``../shared/cephfs/up.sh``);
2. a throw-away cluster this fixture brings up itself with ``up.sh`` (root,
   ceph installed by ``setup.sh``) and tears down with ``down.sh``;
3. otherwise every test here is skipped, saying why.

The scripts are looked up in ``$CEPHFS_SCRIPTS`` or ``<repo>/../shared/cephfs``.
Each test gets its own directory under the mount (``cephfs_dir``), removed
afterwards, so a shared mount stays clean.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
DEFAULT_SCRIPTS = HERE.parents[3].parent / "shared" / "cephfs"


def _answers_rstats(path: Path) -> bool:
    try:
        os.getxattr(path, "ceph.dir.rbytes")
    except OSError:
        return False
    return True


def _scripts_dir() -> Path:
    return Path(os.environ.get("CEPHFS_SCRIPTS", DEFAULT_SCRIPTS))


def _cannot_start_reason() -> str | None:
    if os.geteuid() != 0:
        return "a CephFS needs root to start (ceph-fuse, daemons); set CEPHFS_MNT to use an existing mount"
    up = _scripts_dir() / "up.sh"
    if not up.is_file():
        return f"no {up} to start a CephFS (set CEPHFS_SCRIPTS or CEPHFS_MNT)"
    for tool in ("ceph-mon", "ceph-osd", "ceph-mds", "ceph-fuse"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run {_scripts_dir() / 'setup.sh'} once)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


@pytest.fixture(scope="session")
def cephfs_mount() -> Iterator[Path]:
    mnt = os.environ.get("CEPHFS_MNT")
    if mnt:
        if not _answers_rstats(Path(mnt)):
            pytest.skip(f"CEPHFS_MNT={mnt} is not a CephFS mount (no ceph.dir.rbytes)")
        yield Path(mnt)
        return
    reason = _cannot_start_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, CEPHFS_FAST_RSTATS=os.environ.get("CEPHFS_FAST_RSTATS", "1"))
    proc = subprocess.run(
        ["bash", str(_scripts_dir() / "up.sh")], env=env, capture_output=True, text=True, timeout=180
    )
    if proc.returncode != 0:
        pytest.skip(f"could not start a CephFS: {proc.stderr.strip().splitlines()[-3:]}")
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    cluster_dir = values["CEPHFS_DIR"]
    try:
        yield Path(values["CEPHFS_MNT"])
    finally:
        subprocess.run(["bash", str(_scripts_dir() / "down.sh"), cluster_dir], capture_output=True, timeout=120)


@pytest.fixture
def cephfs_dir(cephfs_mount: Path) -> Iterator[Path]:
    """A fresh directory on the CephFS for one test."""
    path = cephfs_mount / f"test-{secrets.token_hex(6)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
