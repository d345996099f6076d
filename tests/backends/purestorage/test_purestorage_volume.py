"""The purestorage backend: REST parts against the fake array, RapidFile parts
against the fake tools, and the vfs fallback when the tools are absent.

These are contract tests (the documented requests and outputs), not tests
against a FlashBlade.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from fake_flashblade import API_TOKEN
from fake_rapidfile import read_log
from twisted.internet import defer, reactor

from backends import backend_class
from backends.base import FolderUsage, VolumeContext
from backends.purestorage import FlashBladeVolume
from storage.bgtasks import Progress, TaskCancelled
from storage.blocking import BlockingPool
from storage.config import ConfigError, VolumeConfig
from storage.errors import ExecutionError, ExternalServiceError
from storage.vfid import QuotaScopeID, VFolderID


@pytest.fixture
def pool():
    p = BlockingPool(reactor, max_threads=4)
    yield p
    if p.threadpool.started:
        p.threadpool.stop()


def options_for(fb, **extra) -> dict:
    return {
        "purity_endpoint": fb.endpoint,
        "purity_api_token": API_TOKEN,
        "purity_fs_name": "backendai",
        "purity_api_version": "1.8",
        "purity_ssl_verify": False,
        **extra,
    }


def make_volume(path: Path, pool: BlockingPool, options: dict) -> FlashBladeVolume:
    path.mkdir(parents=True, exist_ok=True)
    config = VolumeConfig(name="fb", backend="purestorage", path=path, options=options)
    return backend_class("purestorage")(config, VolumeContext(pool=pool, reactor=reactor))


@pytest.fixture
def volume_factory(tmp_path, pool, fake_fb):
    made = []

    async def make(**extra) -> FlashBladeVolume:
        vol = make_volume(tmp_path / "nfs", pool, options_for(fake_fb, **extra))
        await vol.prepare()
        made.append(vol)
        return vol

    yield make
    for vol in made:
        vol.usage_cache.stop()
        pytest_twisted.blockon(defer.Deferred.fromCoroutine(vol.purity.close()))


async def new_vfolder(volume) -> VFolderID:
    vfid = VFolderID(QuotaScopeID("user", uuid.uuid4()), uuid.uuid4())
    await volume.create_vfolder(vfid, auto_create_quota_scope=True)
    return vfid


def populate(root: Path) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "f").write_bytes(b"x" * 5000)
    (root / "g").write_bytes(b"y" * 123)
    os.symlink("d/e/f", root / "link")


def lstat_total(root: Path) -> tuple[int, int]:
    """What du -ab says: entries below root, and every entry's size including root's."""
    count, total = 0, os.lstat(root).st_size
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            count += 1
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return count, total


# -- configuration -----------------------------------------------------------------


def test_capabilities_are_upstreams(tmp_path, pool, fake_fb):
    vol = make_volume(tmp_path / "v", pool, options_for(fake_fb))
    assert vol.describe()["capabilities"] == sorted({"vfolder", "metric", "fast-fs-size", "fast-scan"})
    assert vol.describe()["backend"] == "purestorage"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"purity_endpoint": None}, "purity_endpoint"),
        ({"purity_endpoint": "flashblade.local"}, "purity_endpoint"),
        ({"purity_api_token": ""}, "purity_api_token"),
        ({"purity_fs_name": None}, "purity_fs_name"),
        ({"purity_ssl_verify": "/nonexistent/ca.pem"}, "purity_ssl_verify"),
        ({"purity_ssl_verify": 1}, "purity_ssl_verify"),
        ({"rapidfile_timeout": -1}, "rapidfile_timeout"),
        ({"purity_api_version": "v1"}, "purity_api_version"),
    ],
)
def test_bad_options_are_one_line_config_errors(tmp_path, pool, fake_fb, change, key):
    options = {k: v for k, v in {**options_for(fake_fb), **change}.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        make_volume(tmp_path / "v", pool, options)
    assert key in str(info.value) and "\n" not in str(info.value)


# -- REST API ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hwinfo_from_the_array(volume_factory, fake_fb):
    info = await (await volume_factory(rapidfile=False)).get_hwinfo()
    assert info["status"] == "healthy" and info["status_info"] is None
    assert info["metadata"]["name"] == "fb-test" and info["metadata"]["console_url"] == fake_fb.endpoint


@pytest_twisted.ensureDeferred
async def test_hwinfo_when_the_array_refuses(volume_factory):
    info = await (await volume_factory(rapidfile=False, purity_api_token="revoked")).get_hwinfo()
    assert info["status"] == "unavailable" and "invalid API token" in info["status_info"]


@pytest_twisted.ensureDeferred
async def test_fs_usage_from_the_array(volume_factory):
    usage = await (await volume_factory(rapidfile=False)).get_fs_usage()
    assert (usage.capacity_bytes, usage.used_bytes) == (100 * 2**40, 5 * 2**30)


@pytest_twisted.ensureDeferred
async def test_fs_usage_falls_back_to_statvfs(volume_factory):
    vol = await volume_factory(rapidfile=False, purity_fs_name="missing")
    usage = await vol.get_fs_usage()
    st = os.statvfs(vol.mount_path)
    assert usage.capacity_bytes == st.f_frsize * st.f_blocks


@pytest_twisted.ensureDeferred
async def test_performance_metric_in_upstreams_shape(volume_factory, fake_fb):
    metric = await (await volume_factory(rapidfile=False)).get_performance_metric()
    assert metric == {
        "iops_read": 1200.0,
        "iops_write": 340.5,
        "io_bytes_read": 512 * 2**20,
        "io_bytes_write": 64 * 2**20,
        "io_usec_read": 310.0,
        "io_usec_write": 820.25,
    }
    fake_fb.expire_sessions()  # still works after the session expired
    assert (await (await volume_factory(rapidfile=False)).get_performance_metric())["iops_read"] == 1200.0


@pytest_twisted.ensureDeferred
async def test_performance_metric_missing(volume_factory, fake_fb):
    fake_fb.performance.clear()
    with pytest.raises(ExternalServiceError):
        await (await volume_factory(rapidfile=False)).get_performance_metric()


@pytest_twisted.ensureDeferred
async def test_stop_logs_out(volume_factory, fake_fb):
    vol = await volume_factory(rapidfile=False)
    await vol.get_fs_usage()
    assert len(fake_fb.sessions) == 1
    await vol.purity.close()
    assert fake_fb.sessions == set()


# -- RapidFile Toolkit ---------------------------------------------------------------


@pytest.mark.parametrize("generation", [1, 2])
@pytest_twisted.ensureDeferred
async def test_toolkit_detection(volume_factory, fake_tools, monkeypatch, generation):
    monkeypatch.setenv("FAKE_RAPIDFILE_GENERATION", str(generation))
    toolkit = await (await volume_factory()).toolkit()
    assert toolkit is not None and toolkit.generation == generation
    assert toolkit.copy_tool.endswith("/pcopy" if generation == 2 else "/pcp")


@pytest_twisted.ensureDeferred
async def test_no_toolkit_means_vfs_code(volume_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    vol = await volume_factory()
    assert await vol.toolkit() is None
    vfid = await new_vfolder(vol)
    populate(vol.vfolder_path(vfid))
    usage = await vol.get_usage(vfid)
    assert usage.file_count == 5  # d, d/e, d/e/f, g, link (the vfs walk)


@pytest_twisted.ensureDeferred
async def test_usage_with_pdu(volume_factory, fake_tools):
    _bin, log = fake_tools
    vol = await volume_factory()
    vfid = await new_vfolder(vol)
    root = vol.vfolder_path(vfid)
    populate(root)
    usage = await vol.get_usage(vfid)
    assert (usage.file_count, usage.used_bytes) == lstat_total(root)
    assert await vol.get_used_bytes(vfid) == lstat_total(root)[1]
    calls = [c for c in read_log(log) if c[1:] != ["--version"]]
    real = os.path.realpath(root)
    assert [c[1:] for c in calls] == [["-0", "-b", "-a", real], ["-0", "-b", "-s", real]]
    sub = await vol.get_usage(vfid, "d")
    assert (sub.file_count, sub.used_bytes) == lstat_total(root / "d")


@pytest_twisted.ensureDeferred
async def test_slow_pdu_answers_minus_one(volume_factory, fake_tools, monkeypatch):
    vol = await volume_factory(rapidfile_timeout=0.5)
    await vol.toolkit()  # detected before the tools get slow
    vfid = await new_vfolder(vol)
    monkeypatch.setenv("FAKE_RAPIDFILE_SLEEP", "10")
    assert await vol.get_usage(vfid) == FolderUsage(file_count=-1, used_bytes=-1)


@pytest_twisted.ensureDeferred
async def test_failing_pdu_falls_back_to_the_walk(volume_factory, fake_tools, monkeypatch):
    vol = await volume_factory()
    await vol.toolkit()
    vfid = await new_vfolder(vol)
    populate(vol.vfolder_path(vfid))
    monkeypatch.setenv("FAKE_RAPIDFILE_FAIL", "pdu")
    assert (await vol.get_usage(vfid)).file_count == 5


@pytest.mark.parametrize("generation, tool", [(1, "pcp"), (2, "pcopy")])
@pytest_twisted.ensureDeferred
async def test_clone_with_the_copy_tool(volume_factory, fake_tools, monkeypatch, generation, tool):
    _bin, log = fake_tools
    monkeypatch.setenv("FAKE_RAPIDFILE_GENERATION", str(generation))
    vol = await volume_factory()
    src = await new_vfolder(vol)
    populate(vol.vfolder_path(src))
    dst = VFolderID(QuotaScopeID("project", uuid.uuid4()), uuid.uuid4())
    await vol.clone_vfolder(src, vol, dst, Progress())
    out = vol.vfolder_path(dst)
    assert (out / "d" / "e" / "f").read_bytes() == b"x" * 5000
    assert os.readlink(out / "link") == "d/e/f"
    copies = [c for c in read_log(log) if os.path.basename(c[0]) == tool]
    assert len(copies) == 1 and copies[0][1:3] == ["-r", "-p"]
    assert not [n for n in os.listdir(out.parent) if n.startswith(".clone-")]


@pytest_twisted.ensureDeferred
async def test_failed_copy_tool_leaves_nothing(volume_factory, fake_tools, monkeypatch):
    vol = await volume_factory()
    await vol.toolkit()
    src = await new_vfolder(vol)
    populate(vol.vfolder_path(src))
    dst = VFolderID(src.quota_scope_id, uuid.uuid4())
    monkeypatch.setenv("FAKE_RAPIDFILE_FAIL", "pcopy")
    with pytest.raises(ExecutionError, match="simulated failure"):
        await vol.clone_vfolder(src, vol, dst)
    assert not vol.vfolder_path(dst).exists()
    assert not [n for n in os.listdir(vol.vfolder_path(dst).parent) if n.startswith(".clone-")]


@pytest_twisted.ensureDeferred
async def test_cancelled_clone_kills_the_copy_and_cleans_up(volume_factory, fake_tools, monkeypatch):
    vol = await volume_factory()
    await vol.toolkit()
    src = await new_vfolder(vol)
    populate(vol.vfolder_path(src))
    dst = VFolderID(src.quota_scope_id, uuid.uuid4())
    monkeypatch.setenv("FAKE_RAPIDFILE_SLEEP", "20")
    progress = Progress()
    reactor.callLater(0.3, setattr, progress, "cancelled", True)
    started = reactor.seconds()
    with pytest.raises(TaskCancelled):
        await vol.clone_vfolder(src, vol, dst, progress)
    assert reactor.seconds() - started < 10
    assert not vol.vfolder_path(dst).exists()


@pytest_twisted.ensureDeferred
async def test_clone_without_tools_uses_the_vfs_copy(volume_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    vol = await volume_factory()
    src = await new_vfolder(vol)
    populate(vol.vfolder_path(src))
    dst = VFolderID(src.quota_scope_id, uuid.uuid4())
    await vol.clone_vfolder(src, vol, dst)
    assert (vol.vfolder_path(dst) / "g").read_bytes() == b"y" * 123
