"""VfsVolume.clone_vfolder: what is preserved, progress, cancellation, cleanup."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import pytest_twisted

from backends.base import AbstractVolume, FSUsage
from backends.vfs import VfsVolume
from storage.bgtasks import Progress, TaskCancelled
from storage.errors import InsufficientStorage, UnsupportedOperation, VFolderExists, VFolderNotFound
from storage.fs import tree as fstree
from storage.vfid import VFolderID

ensure = pytest_twisted.ensureDeferred

MTIME = 1_600_000_000_123_456_789


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything a clone must keep: type, mode, mtime, content or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                extra: object = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                extra = p.read_bytes()
            else:
                extra = None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                              st.st_mtime_ns, extra)
    return out


def populate(root: Path, outside: Path) -> None:
    (root / "empty").mkdir()
    (root / "d" / "e").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "d" / "x.txt").write_bytes(b"x")
    (root / "d" / "e" / "y.sh").write_bytes(b"#!/bin/sh\n")
    (root / "empty-file").write_bytes(b"")
    os.chmod(root / "d" / "e" / "y.sh", 0o751)
    os.chmod(root / "d" / "x.txt", 0o600)
    os.symlink("d/x.txt", root / "rel-link")
    os.symlink(str(outside), root / "out-link")  # copied as a link, never followed
    os.symlink("nowhere", root / "dangling")
    os.mkfifo(root / "fifo")
    os.chmod(root / "d" / "e", 0o550)  # read-only directory: filled before its mode is set
    for p in [root / "empty", root / "d" / "e", root / "d", root / "big.bin", root / "fifo"]:
        os.utime(p, ns=(MTIME, MTIME))
    for p in [root / "rel-link", root / "out-link"]:
        os.utime(p, ns=(MTIME, MTIME), follow_symlinks=False)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_bytes(b"secret")
    return d


@pytest.fixture
def source(volume: VfsVolume, vfolder: VFolderID, outside: Path) -> VFolderID:
    populate(volume.vfolder_path(vfolder), outside)
    return vfolder


@ensure
async def test_clone_preserves_everything(volume: VfsVolume, source: VFolderID, new_vfid, vfid_form) -> None:
    await volume.put_metadata(source, b"meta")
    dst = new_vfid(bare=vfid_form == "bare")
    progress = Progress()
    await volume.clone_vfolder(source, volume, dst, progress)
    src_path, dst_path = volume.vfolder_path(source), volume.vfolder_path(dst)
    assert snapshot(dst_path) == snapshot(src_path)
    assert stat.S_IMODE(dst_path.stat().st_mode) == stat.S_IMODE(src_path.stat().st_mode)
    assert dst_path.stat().st_mtime_ns == src_path.stat().st_mtime_ns
    assert progress.total == progress.current == (3 << 20) + 1 + len(b"#!/bin/sh\n")
    assert await volume.get_metadata(dst) == b"meta"
    # The clone is independent of its source.
    (src_path / "d" / "x.txt").write_bytes(b"changed")
    assert (dst_path / "d" / "x.txt").read_bytes() == b"x"


@ensure
async def test_clone_to_another_volume(make_volume, source: VFolderID, volume: VfsVolume, new_vfid) -> None:
    other = make_volume("other")
    dst = new_vfid()
    await volume.clone_vfolder(source, other, dst)
    assert other.vfolder_path(dst).is_dir()
    assert snapshot(other.vfolder_path(dst)) == snapshot(volume.vfolder_path(source))


@ensure
async def test_clone_refusals(volume: VfsVolume, source: VFolderID, new_vfid) -> None:
    existing = new_vfid()
    await volume.create_vfolder(existing, auto_create_quota_scope=True)
    (volume.vfolder_path(existing) / "keep").write_bytes(b"keep")
    with pytest.raises(VFolderExists):
        await volume.clone_vfolder(source, volume, existing)
    assert [p.name for p in volume.vfolder_path(existing).iterdir()] == ["keep"]
    with pytest.raises(VFolderNotFound):
        await volume.clone_vfolder(new_vfid(), volume, new_vfid())

    class Other(AbstractVolume):
        backend_name = "other"

    with pytest.raises(UnsupportedOperation):
        await volume.clone_vfolder(source, Other(volume.config, volume.context), new_vfid())


@ensure
async def test_clone_checks_free_space(volume: VfsVolume, source: VFolderID, new_vfid, monkeypatch) -> None:
    async def tiny() -> FSUsage:
        return FSUsage(capacity_bytes=1 << 20, used_bytes=0)

    monkeypatch.setattr(volume, "get_fs_usage", tiny)
    dst = new_vfid()
    with pytest.raises(InsufficientStorage):
        await volume.clone_vfolder(source, volume, dst)
    assert not volume.vfolder_path(dst).exists()


class CancelAfter(Progress):
    """Cancels itself after ``n`` checks: a cancel arriving mid-copy."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.remaining = n

    def check(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.cancelled = True
        super().check()


@ensure
async def test_cancel_removes_the_partial_copy(volume: VfsVolume, source: VFolderID, new_vfid) -> None:
    dst = new_vfid()
    entries = 11  # what count_tree checks for, before the copy starts
    progress = CancelAfter(entries + 4)
    with pytest.raises(TaskCancelled):
        await volume.clone_vfolder(source, volume, dst, progress)
    assert progress.remaining <= 0
    assert not volume.vfolder_path(dst).exists()
    assert volume.vfolder_path(source).is_dir()


@ensure
async def test_failure_removes_the_partial_copy(volume: VfsVolume, source: VFolderID, new_vfid, monkeypatch) -> None:
    calls = []
    real = fstree.copy_file_at

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(fstree, "copy_file_at", failing)
    dst = new_vfid()
    with pytest.raises(InsufficientStorage):
        await volume.clone_vfolder(source, volume, dst)
    assert len(calls) == 2
    dst_path = volume.vfolder_path(dst)
    assert not dst_path.exists()
    assert not dst_path.parent.exists()  # the h[2:4] dir made for it is pruned too


@ensure
async def test_cancel_inside_a_large_file(volume: VfsVolume, source: VFolderID, new_vfid, monkeypatch) -> None:
    monkeypatch.setattr(fstree, "COPY_CHUNK", 1 << 20)

    class CancelMidFile(Progress):
        def check(self) -> None:
            if self.current >= 1 << 20:
                self.cancelled = True
            super().check()

    progress = CancelMidFile()
    dst = new_vfid()
    with pytest.raises(TaskCancelled):
        await volume.clone_vfolder(source, volume, dst, progress)
    assert 1 << 20 <= progress.current < 3 << 20  # stopped within big.bin (3 MiB)
    assert not volume.vfolder_path(dst).exists()


@ensure
async def test_cancelling_the_deferred_stops_the_copy_before_cleaning_up(
    volume: VfsVolume, source: VFolderID, new_vfid, monkeypatch
) -> None:
    """Klein cancels a handler's Deferred when the client leaves: the copy
    thread must be stopped and waited for, then the destination removed."""
    import threading

    from twisted.internet import reactor
    from twisted.internet.defer import CancelledError, Deferred

    started, release = threading.Event(), threading.Event()
    real = fstree.copy_file_at

    def slow(*args, **kwargs):
        started.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(fstree, "copy_file_at", slow)
    dst = new_vfid()
    progress = Progress()
    d = Deferred.fromCoroutine(volume.clone_vfolder(source, volume, dst, progress))
    while not started.is_set():
        pause: Deferred[None] = Deferred()
        reactor.callLater(0.01, pause.callback, None)
        await pause
    d.cancel()
    outcome: list = []
    d.addBoth(outcome.append)
    assert progress.cancelled and outcome == []  # still waiting for the thread
    assert volume.vfolder_path(dst).exists()  # not cleaned up under the thread's feet
    release.set()
    while not outcome:
        pause = Deferred()
        reactor.callLater(0.01, pause.callback, None)
        await pause
    assert outcome[0].check(CancelledError)
    assert not volume.vfolder_path(dst).exists()
