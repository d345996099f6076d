"""Fixtures for backend tests: a real ``BlockingPool`` on the real reactor and
vfs volumes in a temporary directory.

``make_volume(name, **options)`` builds a started ``VfsVolume`` (prepared:
``version.txt`` written) under ``tmp_path/<name>``; everything is stopped in
teardown.  The ``run`` fixture (``run(coro)``) blocks a plain (non-async) test until a coroutine or
Deferred finishes, for hypothesis tests that cannot be async.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred

from backends.base import VolumeContext
from backends.vfs import VfsVolume
from storage.blocking import BlockingPool
from storage.config import VolumeConfig
from storage.vfid import QuotaScopeID, VFolderID


def run(awaitable: Any) -> Any:
    """Wait for a coroutine/Deferred from synchronous test code (pytest-twisted's greenlet)."""
    d = awaitable if isinstance(awaitable, Deferred) else ensureDeferred(awaitable)
    return pytest_twisted.blockon(d)


@pytest.fixture
def blocking_pool() -> Iterator[BlockingPool]:
    pool = BlockingPool(reactor, max_threads=4)
    pool.startService()
    yield pool
    d = pool.stopService()
    if d is not None:
        pytest_twisted.blockon(d)


@pytest.fixture
def make_volume(tmp_path: Path, blocking_pool: BlockingPool) -> Iterator[Callable[..., VfsVolume]]:
    made: list[VfsVolume] = []

    def factory(name: str = "local", *, cls: type[VfsVolume] = VfsVolume, scandir_limit: int = 1000,
                fsprefix: str = ".", **options: Any) -> VfsVolume:
        path = tmp_path / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        config = VolumeConfig(name, "vfs", path, fsprefix, dict(options))
        volume = cls(config, VolumeContext(pool=blocking_pool, scandir_limit=scandir_limit, reactor=reactor))
        volume._prepare()  # synchronously: the factory may be called from inside a test
        volume.startService()
        made.append(volume)
        return volume

    yield factory
    for volume in made:
        volume.stopService()


@pytest.fixture
def volume(make_volume: Callable[..., VfsVolume]) -> VfsVolume:
    return make_volume()


def new_vfid(bare: bool = False, scope: str = "user") -> VFolderID:
    if bare:
        return VFolderID(None, uuid.uuid4())
    return VFolderID(QuotaScopeID(scope, uuid.uuid4()), uuid.uuid4())


@pytest.fixture(name="run")
def run_fixture() -> Callable[[Any], Any]:
    return run


@pytest.fixture(name="new_vfid")
def new_vfid_fixture() -> Callable[..., VFolderID]:
    return new_vfid


@pytest.fixture(params=["scoped", "bare"])
def vfid_form(request: pytest.FixtureRequest) -> str:
    """Runs a test with both vfid forms: ``user:<uuid>/<hex>`` and a bare 22.03 UUID."""
    return request.param


@pytest.fixture
def vfolder(volume: VfsVolume, vfid_form: str) -> VFolderID:
    """A created, empty vfolder on ``volume``, in both vfid forms."""
    vfid = new_vfid(bare=vfid_form == "bare")
    run(volume.create_vfolder(vfid, auto_create_quota_scope=True))
    return vfid
