"""The whole daemon on a real quota kernel, running as ``nobody``.

twistd starts as root, spawns the XFS helper (root) in
privilegedStartService, binds, drops to ``[storage-proxy] user``; the
manager API's quota-scope routes then work through the helper while the
daemon itself is unprivileged.  Marked ``xfs``: run in ../shared/xfs-vm.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
import treq
from support.daemon import StorageProxyProcess
from xfs_sandbox import real_xfs_mount

from storage.manager_client import ManagerAPIError, ManagerClient

pytestmark = pytest.mark.xfs

MiB = 1 << 20


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[2])  # effective
    raise AssertionError("no Uid line")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.fixture
def unprivileged_daemon():
    mount = real_xfs_mount()
    if os.geteuid() != 0:
        pytest.skip("needs root to start the daemon that drops to nobody")
    nobody = pwd.getpwnam("nobody")
    _make_python_usable_by(nobody.pw_uid)
    base = Path(tempfile.mkdtemp(prefix="xfsd", dir="/tmp"))
    os.chmod(base, 0o755)
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    root = Path(mount) / prefix
    root.mkdir()
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    config = {
        "storage-proxy": {"user": "nobody"},
        "volume": {
            "xfs": {
                "backend": "xfs", "path": mount, "fsprefix": prefix,
                "options": {
                    "helper-socket": str(base / "run" / "xfs.sock"),
                    "projects-file": str(base / "projects"),
                    "projid-file": str(base / "projid"),
                    "helper-allowed-uids": ["nobody"],
                },
            },
        },
    }
    daemon = StorageProxyProcess(base / "proxy", volumes=(), extra_config=config)
    os.chmod(daemon.workdir, 0o755)
    try:
        daemon.start(timeout=120)
        _wait_until_ready(daemon)
        yield daemon, root
    finally:
        daemon.stop()
        print(daemon.log[-6000:])  # shown when the test fails
        shutil.rmtree(base, ignore_errors=True)
        # The registry goes with `base`: free the project IDs' usage too, or
        # the next registry on this filesystem would reuse charged IDs.
        shutil.rmtree(root, ignore_errors=True)


def _python_works_as(uid: int) -> bool:
    # After the privilege drop the daemon still imports modules lazily
    # (werkzeug needs encodings.idna): its interpreter must be readable.
    try:
        probe = subprocess.run([sys.executable, "-c", "import encodings.idna, twisted"], user=uid,
                               group=pwd.getpwuid(uid).pw_gid, extra_groups=[], capture_output=True, cwd="/")
    except PermissionError:
        return False
    return probe.returncode == 0


def _make_python_usable_by(uid: int) -> None:
    if _python_works_as(uid):
        return
    if os.environ.get("XFS_VM"):
        # In the xfs-vm guest / is a throwaway overlay: opening up the home
        # directory that holds the interpreter (pyenv under /root) is harmless.
        home = Path(sys.executable).resolve().parents[3]
        for d in [home, *home.parents]:
            os.chmod(d, os.stat(d).st_mode | 0o001)
        if _python_works_as(uid):
            return
    pytest.skip(f"{sys.executable} cannot be run by uid {uid}, so the daemon cannot drop to it")


def _wait_until_ready(daemon: StorageProxyProcess, timeout: float = 300.0) -> None:
    """The listeners accept only once every volume's start-up check passed."""
    deadline = time.monotonic() + timeout
    while "storage-proxy ready" not in daemon.log:
        if time.monotonic() > deadline or daemon.process is None or daemon.process.poll() is not None:
            raise AssertionError(f"the daemon did not become ready:\n{daemon.log[-4000:]}")
        time.sleep(0.1)


def _fill(path: Path, nbytes: int) -> int:
    written = 0
    with open(path, "wb") as f:
        try:
            while written < nbytes:
                written += f.write(b"\x5a" * min(MiB, nbytes - written))
                f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass
    return written


@pytest_twisted.ensureDeferred
async def test_quota_scopes_through_an_unprivileged_daemon(unprivileged_daemon):
    daemon, root = unprivileged_daemon
    assert _uid_of(daemon.pid) == pwd.getpwnam("nobody").pw_uid
    supervisor = _children(daemon.pid)
    assert supervisor and _uid_of(supervisor[0]) == 0  # the helper stayed root

    api = ManagerClient(daemon.manager_url, daemon.manager_secret)
    volumes = await api.volumes()
    assert volumes[0]["backend"] == "xfs" and volumes[0]["capabilities"] == ["quota", "vfolder"]

    qsid = f"user:{uuid.uuid4()}"
    await api.create_quota_scope("xfs", qsid, 4 * MiB)
    with pytest.raises(ManagerAPIError) as info:
        await api.create_quota_scope("xfs", qsid, 4 * MiB)
    assert info.value.status == 409
    assert await api.get_quota_scope("xfs", qsid) == {"used_bytes": 0, "limit_bytes": 4 * MiB}

    vfid = f"{qsid}/{uuid.uuid4().hex}"
    await api.create_folder("xfs", vfid)
    path = Path(await api.mount("xfs", vfid))
    assert 3 * MiB <= _fill(path / "data", 8 * MiB) <= 4 * MiB
    usage = await api.get_quota_scope("xfs", qsid)
    assert 3 * MiB <= usage["used_bytes"] <= 4 * MiB

    # A tus upload into the full scope: 507, and the bytes that got in are kept
    # (HEAD reports them as the offset to resume from).
    await api.unset_quota("xfs", qsid)
    await api.update_quota_scope("xfs", qsid, 6 * MiB)
    # A session that cannot fit in what is left is refused, nothing made
    # (the daemon's own check, storage.quota); one made while it fitted gets
    # its PATCH cut at the limit.
    with pytest.raises(ManagerAPIError) as info:
        await api.upload_token("xfs", vfid, "upload.bin", 8 * MiB)
    assert info.value.status == 507
    await api.update_quota_scope("xfs", qsid, 16 * MiB)
    token = await api.upload_token("xfs", vfid, "upload.bin", 8 * MiB)
    await api.update_quota_scope("xfs", qsid, 6 * MiB)
    url = f"{daemon.client_url}/upload?token={token}"
    tus = {"Tus-Resumable": "1.0.0"}
    response = await treq.patch(url, data=b"\x33" * (8 * MiB), headers={
        **tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    body = await response.text()
    assert response.code == 507, body
    head = await treq.head(url, headers=tus)
    offset = int(head.headers.getRawHeaders("Upload-Offset")[0])
    assert 0 < offset <= 3 * MiB

    # A clone into a scope that cannot hold it fails and leaves nothing.
    small = f"user:{uuid.uuid4()}"
    await api.create_quota_scope("xfs", small, 1 * MiB)
    dst = f"{small}/{uuid.uuid4().hex}"
    task = await api.clone_folder("xfs", vfid, dst, dst_volume="xfs")
    state = await api.wait_bgtask(task, timeout=120, raise_on_failure=False)
    assert state["status"] == "failed"
    assert "insufficient-storage" in str(state["error"]) and small in str(state["error"])
    assert os.listdir(root / uuid.UUID(small.split(":")[1]).hex) == []

    await api.update_quota_scope("xfs", qsid, 16 * MiB)
    assert (await api.get_quota_scope("xfs", qsid))["limit_bytes"] == 16 * MiB
    await api.unset_quota("xfs", qsid)
    assert (await api.get_quota_scope("xfs", qsid))["limit_bytes"] is None
    # PATCH creates a missing scope.
    fresh = f"project:{uuid.uuid4()}"
    await api.update_quota_scope("xfs", fresh, 2 * MiB)
    assert await api.get_quota_scope("xfs", fresh) == {"used_bytes": 0, "limit_bytes": 2 * MiB}
