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
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
DEFAULT_SCRIPTS = HERE.parents[3].parent / "shared" / "cephfs"
STARTED: dict[str, str] = {}  # what up.sh said of the cluster this conftest started


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
    STARTED["CEPH_CONF"] = values["CEPH_CONF"]
    try:
        yield Path(values["CEPHFS_MNT"])
    finally:
        subprocess.run(["bash", str(_scripts_dir() / "down.sh"), cluster_dir], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def cephfs_second_mount(cephfs_mount: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A second ceph-fuse mount of the same filesystem: a second CephFS client, as on
    another host (its own caps, its locks held through the MDS).  Needs the
    cluster's conf: ``$CEPH_CONF`` (``.ci/cephfs-tests`` exports it) or the
    cluster this conftest started."""
    conf = os.environ.get("CEPH_CONF") or STARTED.get("CEPH_CONF")
    if not conf or shutil.which("ceph-fuse") is None or os.geteuid() != 0:
        pytest.skip("a second CephFS client needs ceph-fuse, root and the cluster's conf ($CEPH_CONF)")
    root = tmp_path_factory.mktemp("cephfs-client2")
    mnt, pid_file = root / "mnt", root / "ceph-fuse.pid"
    mnt.mkdir()
    proc = subprocess.run(["ceph-fuse", "-c", conf, "--pid-file", str(pid_file), str(mnt)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"could not mount a second CephFS client: {proc.stderr.strip()[-300:]}")
    try:
        deadline = time.monotonic() + 30
        while not _answers_rstats(mnt):
            if time.monotonic() > deadline:
                pytest.skip("the second ceph-fuse mount did not come up")
            time.sleep(0.1)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        deadline = time.monotonic() + 10
        while pid and time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def cephfs_dir(cephfs_mount: Path) -> Iterator[Path]:
    """A fresh directory on the CephFS for one test."""
    path = cephfs_mount / f"test-{secrets.token_hex(6)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
