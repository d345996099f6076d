"""Usage: what the walk counts, and the cache/timeout behaviour of ``UsageCache``.

Timing-related tests never depend on the machine being fast: a slow walk is
simulated by a walker that blocks on an Event the test releases.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred

from backends.vfs import VfsVolume
from storage.blocking import BlockingPool
from storage.errors import FileOperationFailed, InvalidPath, VFolderNotFound
from storage.fs.tree import remove_tree_contents
from storage.fs.usage import TreeUsage, UsageCache, UsageWalkAborted, walk_usage
from storage.vfid import VFolderID

ensure = pytest_twisted.ensureDeferred


def blocks(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


# -- the walk --------------------------------------------------------------------

def test_walk_of_an_empty_directory(tmp_path: Path) -> None:
    usage = walk_usage(tmp_path)
    assert (usage.file_count, usage.apparent_bytes) == (0, 0)
    assert usage.allocated_bytes == blocks(tmp_path)  # du counts the directory itself


def test_walk_counts_like_upstream_and_du(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "huge").write_bytes(b"o" * 100_000)
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "a").write_bytes(b"a" * 10_000)
    (root / "d" / "b").write_bytes(b"b" * 5000)
    os.link(root / "a", root / "d" / "a-hardlink")
    os.symlink(outside, root / "dirlink")
    os.symlink(outside / "huge", root / "filelink")
    usage = walk_usage(root)
    entries = ["a", "d", "d/b", "d/a-hardlink", "dirlink", "filelink"]
    assert usage.file_count == len(entries)  # every entry, never what a symlink points to
    assert usage.apparent_bytes == sum(os.lstat(root / e).st_size for e in entries)
    distinct = ["a", "d", "d/b", "dirlink", "filelink"]  # the hard link's blocks count once
    assert usage.allocated_bytes == blocks(root) + sum(blocks(root / e) for e in distinct)


def test_walk_gives_up_past_its_deadline_or_when_stopped(tmp_path: Path) -> None:
    for i in range(600):
        (tmp_path / f"f{i}").touch()
    with pytest.raises(UsageWalkAborted):
        walk_usage(tmp_path, deadline=0.0, clock=lambda: 1.0)
    stop = threading.Event()
    stop.set()
    with pytest.raises(UsageWalkAborted):
        walk_usage(tmp_path, stop=stop)


def test_walk_of_a_deep_tree_needs_no_recursion(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1200):  # deeper than Python's recursion limit and than PATH_MAX allows by name
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    try:
        assert walk_usage(tmp_path).file_count == 1200
    finally:
        # pytest's own clean-up recurses and cannot remove a tree this deep.
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert remove_tree_contents(fd) == 1200
        finally:
            os.close(fd)


# -- through the volume -------------------------------------------------------------

@ensure
async def test_empty_vfolder(volume: VfsVolume, vfolder: VFolderID) -> None:
    usage = await volume.get_usage(vfolder)
    assert (usage.file_count, usage.used_bytes) == (0, 0)
    assert usage.observed_at is not None
    assert await volume.get_used_bytes(vfolder) == blocks(volume.vfolder_path(vfolder))


@ensure
async def test_usage_of_a_subdirectory_and_refusals(
    volume: VfsVolume, vfolder: VFolderID, tmp_path: Path, new_vfid
) -> None:
    path = volume.vfolder_path(vfolder)
    (path / "sub").mkdir()
    (path / "sub" / "f").write_bytes(b"f" * 100)
    (path / "top").write_bytes(b"t" * 1000)
    os.symlink(tmp_path, path / "escape")
    usage = await volume.get_usage(vfolder, "sub")
    assert (usage.file_count, usage.used_bytes) == (1, 100)
    for bad in ("escape", "../..", "/"):
        with pytest.raises(InvalidPath):
            await volume.get_usage(vfolder, bad)
    with pytest.raises(FileOperationFailed):
        await volume.get_usage(vfolder, "top")
    with pytest.raises(VFolderNotFound):
        await volume.get_usage(new_vfid())


@ensure
async def test_results_are_cached_and_invalidated_by_our_writes(make_volume, new_vfid) -> None:
    volume = make_volume("cached", **{"usage-cache-ttl": "1h"})
    vfid = new_vfid()
    await volume.create_vfolder(vfid, auto_create_quota_scope=True)
    path = volume.vfolder_path(vfid)
    first = await volume.get_usage(vfid)
    (path / "behind-our-back").write_bytes(b"x" * 10)  # a container writing: not seen until the TTL
    assert await volume.get_usage(vfid) == first
    await volume.mkdir(vfid, "through-the-api")  # our own change invalidates
    assert (await volume.get_usage(vfid)).file_count == 2
    (path / "another").touch()
    volume.invalidate_usage(vfid)
    assert (await volume.get_usage(vfid)).file_count == 3


@ensure
async def test_ttl_zero_always_walks(make_volume, new_vfid) -> None:
    volume = make_volume("fresh", **{"usage-cache-ttl": 0})
    vfid = new_vfid()
    await volume.create_vfolder(vfid, auto_create_quota_scope=True)
    assert (await volume.get_usage(vfid)).file_count == 0
    (volume.vfolder_path(vfid) / "f").touch()
    assert (await volume.get_usage(vfid)).file_count == 1


# -- the cache and its timeout ----------------------------------------------------------

class GatedWalker:
    """A walk that waits for the test to open the gate: a tree too big to finish in time."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0
        self.result = TreeUsage(7, 700, 4096, 0.0)

    def __call__(self, path, *, deadline=None, stop=None, clock=None) -> TreeUsage:
        self.calls += 1
        while not self.gate.wait(0.01):
            if stop is not None and stop.is_set():
                raise UsageWalkAborted("stopping")
        return self.result


def make_cache(pool: BlockingPool, walker, **kwargs) -> UsageCache:
    return UsageCache(pool.run, reactor.callLater, walker=walker, **kwargs)


async def until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    raise AssertionError("condition not reached")


@ensure
async def test_slow_walk_without_cache_answers_minus_one_then_fills_the_cache(blocking_pool) -> None:
    walker = GatedWalker()
    cache = make_cache(blocking_pool, walker, timeout=0.05, ttl=3600)
    try:
        usage = await cache.get("/some/tree")
        assert (usage.file_count, usage.apparent_bytes, usage.allocated_bytes) == (-1, -1, -1)
        assert cache.walking("/some/tree")  # the walk goes on in the background
        walker.gate.set()
        await until(lambda: cache.cached("/some/tree") is not None)
        assert await cache.get("/some/tree") == walker.result
        assert walker.calls == 1
    finally:
        walker.gate.set()
        cache.stop()


@ensure
async def test_slow_walk_with_a_stale_result_answers_the_stale_result(blocking_pool) -> None:
    walker = GatedWalker()
    walker.gate.set()
    cache = make_cache(blocking_pool, walker, timeout=5, ttl=0)
    try:
        first = await cache.get("/t")
        walker.gate.clear()
        walker.result = TreeUsage(8, 800, 8192, 0.0)
        cache.timeout = 0.05
        assert await cache.get("/t") is first  # expired, walk too slow: the old answer, with its observed_at
        walker.gate.set()
        await until(lambda: cache.cached("/t") is walker.result)
    finally:
        walker.gate.set()
        cache.stop()


@ensure
async def test_concurrent_requests_share_one_walk(blocking_pool) -> None:
    walker = GatedWalker()
    cache = make_cache(blocking_pool, walker, timeout=30, ttl=3600)
    try:
        waiting = [ensureDeferred(cache.get("/shared")) for _ in range(5)]
        await until(lambda: walker.calls == 1)
        walker.gate.set()
        results = [await d for d in waiting]
        assert all(r is walker.result for r in results)
        assert walker.calls == 1
    finally:
        walker.gate.set()
        cache.stop()


@ensure
async def test_invalidated_during_a_walk_is_not_cached(blocking_pool) -> None:
    walker = GatedWalker()
    cache = make_cache(blocking_pool, walker, timeout=30, ttl=3600)
    try:
        d = ensureDeferred(cache.get("/v/folder"))
        await until(lambda: walker.calls == 1)
        cache.invalidate("/v/folder/sub")  # a write below the tree being walked
        walker.gate.set()
        assert await d is walker.result  # this request still gets an answer
        assert cache.cached("/v/folder") is None  # but it may be stale: not kept
    finally:
        walker.gate.set()
        cache.stop()


@ensure
async def test_stop_ends_running_walks(blocking_pool) -> None:
    walker = GatedWalker()
    cache = make_cache(blocking_pool, walker, timeout=30, ttl=3600)
    d = ensureDeferred(cache.get("/x"))
    await until(lambda: walker.calls == 1)
    cache.stop()
    usage = await d
    assert usage.file_count == -1
    walker.gate.set()


@ensure
async def test_walk_errors_reach_the_caller(blocking_pool, tmp_path: Path) -> None:
    cache = UsageCache(blocking_pool.run, reactor.callLater, timeout=30)
    with pytest.raises(FileNotFoundError):
        await cache.get(tmp_path / "missing")


@ensure
async def test_the_cache_is_bounded(blocking_pool) -> None:
    walker = GatedWalker()
    walker.gate.set()
    cache = make_cache(blocking_pool, walker, timeout=30, ttl=3600, max_entries=3)
    for i in range(5):
        await cache.get(f"/t{i}")
    assert [cache.cached(f"/t{i}") is not None for i in range(5)] == [False, False, True, True, True]


def test_walk_beneath_refuses_a_symlink_planted_after_resolution(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"s" * 100)
    root = tmp_path / "vfolder"
    (root / "real").mkdir(parents=True)
    assert walk_usage(root / "real", beneath=root).file_count == 0
    (root / "real").rmdir()
    os.symlink(tmp_path / "outside", root / "real")  # swapped after the caller resolved "real"
    with pytest.raises(OSError) as exc:
        walk_usage(root / "real", beneath=root)
    assert exc.value.errno in (errno.ELOOP, errno.ENOTDIR)  # O_NOFOLLOW|O_DIRECTORY on a symlink
