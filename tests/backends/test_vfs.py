"""VfsVolume: layout, quota scopes, vfolders, metadata and file operations.

Real pool threads on the real reactor, real files under tmp_path; every
vfolder-level test runs with both vfid forms (``vfolder`` fixture).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import pytest_twisted

from backends.base import QuotaConfig
from backends.vfs import MAX_METADATA_BYTES, VfsVolume, os_errors
from storage.bgtasks import Progress, TaskCancelled
from storage.config import ConfigError
from storage.errors import (
    FileOperationFailed,
    InsufficientStorage,
    InvalidPath,
    InvalidSubpath,
    QuotaScopeExists,
    QuotaScopeNotFound,
    RequestTooLarge,
    UnsupportedOperation,
    VFolderExists,
    VFolderNotFound,
)
from storage.vfid import QuotaScopeID, VFolderID

ensure = pytest_twisted.ensureDeferred


def vpath(volume: VfsVolume, vfid: VFolderID) -> Path:
    return volume.vfolder_path(vfid)


def write(path: Path, data: bytes = b"x", mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the volume that no operation may touch."""
    d = tmp_path / "outside"
    d.mkdir()
    write(d / "secret.txt", b"secret")
    (d / "sub").mkdir()
    write(d / "sub" / "deep.txt", b"deep")
    return d


def tree_state(root: Path) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            state[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return state


# -- layout and volume-level ---------------------------------------------------

class TestLayout:
    @ensure
    async def test_prepare_writes_version_once(self, volume: VfsVolume) -> None:
        version = volume.root / "version.txt"
        assert version.read_text().strip() == "3"
        version.write_text("3\n# kept\n")
        await volume.prepare()
        assert version.read_text() == "3\n# kept\n"

    @ensure
    async def test_prepare_with_fsprefix_creates_the_prefix(self, make_volume) -> None:
        volume = make_volume("pfx", fsprefix="data/vfroot")
        assert volume.root == volume.mount_path.absolute() / "data" / "vfroot"
        assert (volume.root / "version.txt").read_text().strip() == "3"

    @ensure
    async def test_prepare_refuses_a_missing_volume_path(self, make_volume, tmp_path: Path) -> None:
        volume = make_volume("gone")
        volume.mount_path.rename(tmp_path / "elsewhere")
        with pytest.raises(ConfigError, match="not a directory"):
            await volume.prepare()

    def test_bad_options_name_the_key(self, make_volume) -> None:
        with pytest.raises(ConfigError, match="usage-timeout"):
            make_volume("bad", **{"usage-timeout": "soon"})
        with pytest.raises(ConfigError, match="usage-concurrency"):
            make_volume("bad2", usage_concurrency=0)

    @pytest.mark.parametrize("form", ["scoped", "bare"])
    def test_vfolder_paths_follow_upstream_layout(self, volume: VfsVolume, new_vfid, form: str) -> None:
        vfid = new_vfid(bare=form == "bare")
        h = vfid.folder_id.hex
        tail = Path(h[0:2], h[2:4], h[4:])
        expected = volume.root / tail if form == "bare" else volume.root / vfid.quota_scope_id.scope_id.hex / tail
        assert vpath(volume, vfid) == expected

    @ensure
    async def test_hwinfo_fs_usage_and_metric(self, volume: VfsVolume) -> None:
        assert await volume.get_hwinfo() == {"status": "healthy", "status_info": None, "metadata": {}}
        fs = await volume.get_fs_usage()
        st = os.statvfs(volume.mount_path)
        assert fs.capacity_bytes == st.f_frsize * st.f_blocks
        assert 0 < fs.used_bytes <= fs.capacity_bytes
        with pytest.raises(UnsupportedOperation):
            await volume.get_performance_metric()

    def test_describe(self, volume: VfsVolume) -> None:
        d = volume.describe()
        assert d["backend"] == "vfs" and d["capabilities"] == ["vfolder"] and d["name"] == "local"


# -- quota scopes -------------------------------------------------------------------

class TestQuotaScopes:
    @ensure
    async def test_lifecycle(self, volume: VfsVolume, new_vfid) -> None:
        qsid = new_vfid().quota_scope_id
        with pytest.raises(QuotaScopeNotFound):
            await volume.describe_quota_scope(qsid)
        with pytest.raises(QuotaScopeNotFound):
            await volume.unset_quota(qsid)
        await volume.create_quota_scope(qsid, QuotaConfig(1 << 30))
        assert volume.quota_scope_path(qsid).is_dir()
        usage = await volume.describe_quota_scope(qsid)
        assert (usage.used_bytes, usage.limit_bytes) == (None, None)  # vfs has no real quota
        with pytest.raises(QuotaScopeExists) as exc:
            await volume.create_quota_scope(qsid)
        assert exc.value.status == 409
        assert exc.value.body()["msg"] == "Volume already exists with given quota scope."
        await volume.update_quota_scope(qsid, QuotaConfig(5))
        await volume.unset_quota(qsid)
        assert (await volume.describe_quota_scope(qsid)).limit_bytes is None

    @ensure
    async def test_update_creates_a_missing_scope(self, volume: VfsVolume) -> None:
        qsid = QuotaScopeID.parse("project:" + "1" * 32)
        await volume.update_quota_scope(qsid, QuotaConfig(10))
        assert volume.quota_scope_path(qsid).is_dir()


# -- vfolders ---------------------------------------------------------------------------

class TestVFolders:
    @ensure
    async def test_create_sets_the_mode_exactly(self, volume: VfsVolume, new_vfid) -> None:
        vfid = new_vfid()
        old = os.umask(0o077)
        try:
            await volume.create_vfolder(vfid, 0o775, auto_create_quota_scope=True)
        finally:
            os.umask(old)
        assert stat.S_IMODE(vpath(volume, vfid).stat().st_mode) == 0o775

    @ensure
    async def test_create_needs_the_quota_scope_unless_auto(self, volume: VfsVolume, new_vfid) -> None:
        vfid = new_vfid()
        with pytest.raises(QuotaScopeNotFound):
            await volume.create_vfolder(vfid)
        assert not volume.quota_scope_path(vfid.quota_scope_id).exists()
        await volume.create_vfolder(vfid, auto_create_quota_scope=True)
        assert vpath(volume, vfid).is_dir()

    @ensure
    async def test_create_existing_is_409_unless_exist_ok(self, volume: VfsVolume, vfolder: VFolderID) -> None:
        with pytest.raises(VFolderExists) as exc:
            await volume.create_vfolder(vfolder)
        assert exc.value.status == 409
        await volume.create_vfolder(vfolder, exist_ok=True)

    @ensure
    async def test_delete_removes_tree_and_empty_parents(
        self, volume: VfsVolume, vfolder: VFolderID, outside: Path, new_vfid
    ) -> None:
        before = tree_state(outside)
        path = vpath(volume, vfolder)
        write(path / "a" / "b" / "f.txt", b"1234")
        (path / "empty").mkdir()
        os.symlink(outside, path / "a" / "escape")
        os.symlink(outside / "secret.txt", path / "secret-link")
        await volume.put_metadata(vfolder, b"meta")
        progress = Progress()
        await volume.delete_vfolder(vfolder, progress)
        assert not path.exists()
        assert not path.parent.exists() and not path.parent.parent.exists()
        assert path.parent.parent.parent.is_dir()  # the quota scope (or volume root) stays
        assert progress.current >= 5
        assert tree_state(outside) == before
        assert not volume.metadata_path(vfolder).exists()

    @ensure
    async def test_delete_keeps_a_sibling_sharing_the_prefix(self, volume: VfsVolume, new_vfid) -> None:
        a = new_vfid()
        b = VFolderID(a.quota_scope_id, type(a.folder_id)(a.folder_id.hex[:4] + "f" * 28))
        await volume.create_vfolder(a, auto_create_quota_scope=True)
        await volume.create_vfolder(b)
        await volume.delete_vfolder(a)
        assert vpath(volume, b).is_dir()

    @ensure
    async def test_delete_missing(self, volume: VfsVolume, new_vfid) -> None:
        with pytest.raises(VFolderNotFound):
            await volume.delete_vfolder(new_vfid())
        await volume.delete_vfolder(new_vfid(), missing_ok=True)

    @ensure
    async def test_delete_can_be_cancelled(self, volume: VfsVolume, vfolder: VFolderID) -> None:
        for i in range(20):
            write(vpath(volume, vfolder) / f"f{i}")
        progress = Progress(cancelled=True)
        with pytest.raises(TaskCancelled):
            await volume.delete_vfolder(vfolder, progress)

    @ensure
    async def test_mount_path(self, volume: VfsVolume, vfolder: VFolderID, outside: Path, new_vfid) -> None:
        path = vpath(volume, vfolder)
        (path / "sub").mkdir()
        os.symlink(outside, path / "escape")
        assert await volume.get_vfolder_mount(vfolder) == Path(os.path.realpath(path))
        assert await volume.get_vfolder_mount(vfolder, "sub") == Path(os.path.realpath(path))
        assert await volume.get_vfolder_mount(vfolder, "not/yet/there") == Path(os.path.realpath(path))
        for bad in ("../x", "/etc", "escape", "escape/secret.txt", "a\x00b"):
            with pytest.raises(InvalidSubpath) as exc:
                await volume.get_vfolder_mount(vfolder, bad)
            assert exc.value.status == 400 and exc.value.body()["msg"] == "Invalid vfolder subpath"
        with pytest.raises(VFolderNotFound):
            await volume.get_vfolder_mount(new_vfid(), ".")


# -- metadata -------------------------------------------------------------------------------

class TestMetadata:
    @ensure
    async def test_round_trip_hidden_from_the_vfolder(self, volume: VfsVolume, vfolder: VFolderID) -> None:
        assert await volume.get_metadata(vfolder) == b""
        payload = bytes(range(256)) * 10
        await volume.put_metadata(vfolder, payload)
        assert await volume.get_metadata(vfolder) == payload
        await volume.put_metadata(vfolder, b"second")
        assert await volume.get_metadata(vfolder) == b"second"
        assert await volume.scandir(vfolder, ".") == []  # nothing visible in the vfolder
        meta = volume.metadata_path(vfolder)
        assert not str(meta).startswith(str(vpath(volume, vfolder)))
        assert [p.name for p in meta.parent.iterdir()] == [meta.name]  # no temp files left

    @ensure
    async def test_limits_and_missing_vfolder(self, volume: VfsVolume, vfolder: VFolderID, new_vfid) -> None:
        with pytest.raises(RequestTooLarge):
            await volume.put_metadata(vfolder, b"x" * (MAX_METADATA_BYTES + 1))
        with pytest.raises(VFolderNotFound):
            await volume.put_metadata(new_vfid(), b"x")
        with pytest.raises(VFolderNotFound):
            await volume.get_metadata(new_vfid())


# -- files ------------------------------------------------------------------------------------

class TestMkdir:
    @ensure
    async def test_parents_mode_and_exist_ok(self, volume: VfsVolume, vfolder: VFolderID) -> None:
        path = vpath(volume, vfolder)
        old = os.umask(0o077)
        try:
            await volume.mkdir(vfolder, "a/b/c")
        finally:
            os.umask(old)
        for p in (path / "a", path / "a/b", path / "a/b/c"):
            assert stat.S_IMODE(p.stat().st_mode) == 0o755
        with pytest.raises(FileOperationFailed) as exc:
            await volume.mkdir(vfolder, "a/b/c")
        assert exc.value.body()["errno"] == errno.EEXIST and exc.value.body()["paths"] == ["a/b/c"]
        await volume.mkdir(vfolder, "a/b/c", exist_ok=True)
        await volume.mkdir(vfolder, ".", exist_ok=True)

    @ensure
    async def test_without_parents_and_through_files(self, volume: VfsVolume, vfolder: VFolderID) -> None:
        write(vpath(volume, vfolder) / "file")
        with pytest.raises(FileOperationFailed) as exc:
            await volume.mkdir(vfolder, "x/y", parents=False)
        assert exc.value.body()["errno"] == errno.ENOENT
        with pytest.raises(FileOperationFailed) as exc:
            await volume.mkdir(vfolder, "file/y")
        assert exc.value.body()["errno"] == errno.ENOTDIR
        with pytest.raises(FileOperationFailed):
            await volume.mkdir(vfolder, "file", exist_ok=True)  # a file is not an existing dir

    @ensure
    async def test_inside_symlinked_dir_and_refusals(
        self, volume: VfsVolume, vfolder: VFolderID, outside: Path
    ) -> None:
        path = vpath(volume, vfolder)
        (path / "real").mkdir()
        os.symlink("real", path / "alias")
        os.symlink(outside, path / "escape")
        await volume.mkdir(vfolder, "alias/new")
        assert (path / "real" / "new").is_dir()
        before = tree_state(outside)
        for bad in ("escape/new", "../new", "/tmp/new", "a/../../new", "n\x00"):
            with pytest.raises(InvalidPath):
                await volume.mkdir(vfolder, bad)
        with pytest.raises(FileOperationFailed):  # the link itself exists, and is not a directory
            await volume.mkdir(vfolder, "alias", exist_ok=True)
        assert tree_state(outside) == before

    @ensure
    async def test_missing_vfolder(self, volume: VfsVolume, new_vfid) -> None:
        with pytest.raises(VFolderNotFound):
            await volume.mkdir(new_vfid(), "a")


class TestScandir:
    @ensure
    async def test_entries(self, volume: VfsVolume, vfolder: VFolderID, outside: Path) -> None:
        path = vpath(volume, vfolder)
        write(path / "f.txt", b"12345", mode=0o640)
        (path / "d").mkdir()
        write(path / "d" / "inner.txt")
        os.symlink("d/inner.txt", path / "in-link")
        os.symlink(outside / "secret.txt", path / "out-link")
        os.utime(path / "f.txt", (1_000_000, 2_000_000))
        items = {e.name: e for e in await volume.scandir(vfolder, ".")}
        assert set(items) == {"f.txt", "d", "in-link", "out-link"}
        f = items["f.txt"]
        assert (f.type, f.size, stat.S_IMODE(f.mode), f.modified) == ("FILE", 5, 0o640, 2_000_000)
        assert f.created == (path / "f.txt").stat().st_ctime
        assert items["d"].type == "DIRECTORY"
        assert items["in-link"].type == "SYMLINK" and items["in-link"].symlink_target == "d/inner.txt"
        assert items["out-link"].type == "SYMLINK" and items["out-link"].symlink_target == ""
        assert items["f.txt"].symlink_target == ""
        assert [e.name for e in await volume.scandir(vfolder, "d")] == ["inner.txt"]

    @ensure
    async def test_limit(self, make_volume, new_vfid) -> None:
        volume = make_volume("limited", scandir_limit=3)
        vfid = new_vfid()
        await volume.create_vfolder(vfid, auto_create_quota_scope=True)
        for i in range(10):
            write(vpath(volume, vfid) / f"f{i}")
        assert len(await volume.scandir(vfid, ".")) == 3
        assert len(await volume.scandir(vfid, ".", limit=5)) == 5
        assert len(await volume.scandir(vfid, ".", limit=0)) == 10

    @ensure
    async def test_errors(self, volume: VfsVolume, vfolder: VFolderID, outside: Path, new_vfid) -> None:
        path = vpath(volume, vfolder)
        write(path / "f.txt")
        os.symlink(outside, path / "escape")
        with pytest.raises(FileOperationFailed) as exc:
            await volume.scandir(vfolder, "f.txt")
        assert exc.value.body()["errno"] == errno.ENOTDIR
        with pytest.raises(FileOperationFailed):
            await volume.scandir(vfolder, "missing")
        for bad in ("escape", "escape/sub", "..", "/"):
            with pytest.raises(InvalidPath):
                await volume.scandir(vfolder, bad)
        with pytest.raises(VFolderNotFound):
            await volume.scandir(new_vfid(), ".")


class TestRenameMove:
    @ensure
    async def test_rename_file_and_symlink_itself(self, volume: VfsVolume, vfolder: VFolderID, outside: Path) -> None:
        path = vpath(volume, vfolder)
        write(path / "d" / "a.txt", b"a")
        os.symlink(outside / "secret.txt", path / "link")
        await volume.rename(vfolder, "d/a.txt", "b.txt")
        assert (path / "d" / "b.txt").read_bytes() == b"a" and not (path / "d" / "a.txt").exists()
        await volume.rename(vfolder, "link", "link2")
        assert os.readlink(path / "link2") == str(outside / "secret.txt")
        assert (outside / "secret.txt").read_bytes() == b"secret"

    @ensure
    async def test_rename_refusals(self, volume: VfsVolume, vfolder: VFolderID) -> None:
        write(vpath(volume, vfolder) / "a")
        for bad in ("x/y", "..", ".", "", "n\x00", "n" * 256):
            with pytest.raises(InvalidPath):
                await volume.rename(vfolder, "a", bad)
        with pytest.raises(InvalidPath):
            await volume.rename(vfolder, ".", "x")
        with pytest.raises(FileOperationFailed) as exc:
            await volume.rename(vfolder, "missing", "x")
        assert exc.value.body()["errno"] == errno.ENOENT

    @ensure
    async def test_move(self, volume: VfsVolume, vfolder: VFolderID, outside: Path) -> None:
        path = vpath(volume, vfolder)
        write(path / "a.txt", b"a")
        (path / "dir").mkdir()
        await volume.move(vfolder, "a.txt", "dir")  # into an existing directory, as shutil.move
        assert (path / "dir" / "a.txt").read_bytes() == b"a"
        await volume.move(vfolder, "dir/a.txt", "b.txt")
        assert (path / "b.txt").exists()
        with pytest.raises(FileOperationFailed) as exc:
            await volume.move(vfolder, "dir", "dir/inner")
        assert exc.value.body()["errno"] == errno.EINVAL
        os.symlink(outside, path / "escape")
        before = tree_state(outside)
        for src, dst in (("b.txt", "escape"), ("b.txt", "escape/x"), ("b.txt", "../x"), ("escape/secret.txt", "s")):
            with pytest.raises(InvalidPath):
                await volume.move(vfolder, src, dst)
        with pytest.raises(InvalidPath):
            await volume.move(vfolder, ".", "x")
        assert tree_state(outside) == before
        await volume.move(vfolder, "escape", "escape2")  # the link itself moves
        assert os.readlink(path / "escape2") == str(outside)

    @ensure
    async def test_move_across_filesystems_copies(self, volume: VfsVolume, vfolder: VFolderID, monkeypatch) -> None:
        path = vpath(volume, vfolder)
        write(path / "d" / "f.txt", b"data", mode=0o600)
        real_rename = os.rename

        def exdev(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            if src == "d":
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

        monkeypatch.setattr(os, "rename", exdev)
        await volume.move(vfolder, "d", "e")
        assert not (path / "d").exists()
        assert (path / "e" / "f.txt").read_bytes() == b"data"
        assert stat.S_IMODE((path / "e" / "f.txt").stat().st_mode) == 0o600

    @ensure
    async def test_a_move_that_must_copy_asks_first_whether_it_fits(
        self, volume: VfsVolume, vfolder: VFolderID, monkeypatch,
    ) -> None:
        path = vpath(volume, vfolder)
        write(path / "d" / "a.bin", b"a" * 1000)
        write(path / "d" / "sub" / "b.bin", b"b" * 234)
        (path / "t").mkdir()
        real_rename = os.rename

        def exdev(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            if src == "d":
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

        asked = []

        def too_small(src_dir: int, dst_dir: int, nbytes: int) -> None:
            asked.append((os.fstat(dst_dir).st_ino, nbytes))
            raise OSError(errno.EDQUOT, "the destination's quota realm has 10 bytes left")

        monkeypatch.setattr(os, "rename", exdev)
        monkeypatch.setattr(volume, "copy_fits", too_small)
        with pytest.raises(InsufficientStorage):
            await volume.move(vfolder, "d", "t/e")
        assert asked == [((path / "t").stat().st_ino, 1234)]  # every regular file's bytes, before any copy
        assert (path / "d" / "sub" / "b.bin").read_bytes() == b"b" * 234  # the source stays
        assert os.listdir(path / "t") == []  # and nothing was copied


class TestCopyFile:
    @ensure
    async def test_copy_keeps_content_mode_and_times(self, volume: VfsVolume, vfolder: VFolderID) -> None:
        path = vpath(volume, vfolder)
        data = os.urandom(300_000)
        write(path / "src.bin", data, mode=0o604)
        os.utime(path / "src.bin", ns=(1_500_000_000_000_000_000, 1_600_000_000_123_456_789))
        await volume.copy_file(vfolder, "src.bin", "x/y/dst.bin")
        dst = path / "x" / "y" / "dst.bin"
        assert dst.read_bytes() == data
        st = dst.stat()
        assert stat.S_IMODE(st.st_mode) == 0o604 and st.st_mtime_ns == 1_600_000_000_123_456_789
        await volume.copy_file(vfolder, "src.bin", "x")  # into an existing dir
        assert (path / "x" / "src.bin").read_bytes() == data
        write(path / "small", b"new")
        await volume.copy_file(vfolder, "small", "x/y/dst.bin")  # replaces
        assert dst.read_bytes() == b"new"
        assert sorted(p.name for p in (path / "x" / "y").iterdir()) == ["dst.bin"]  # no temp left

    @ensure
    async def test_symlink_copied_as_link(self, volume: VfsVolume, vfolder: VFolderID, outside: Path) -> None:
        path = vpath(volume, vfolder)
        os.symlink(outside / "secret.txt", path / "link")
        await volume.copy_file(vfolder, "link", "link-copy")
        assert os.readlink(path / "link-copy") == str(outside / "secret.txt")

    @ensure
    async def test_refusals(self, volume: VfsVolume, vfolder: VFolderID, outside: Path) -> None:
        path = vpath(volume, vfolder)
        (path / "dir").mkdir()
        write(path / "f")
        os.symlink(outside, path / "escape")
        with pytest.raises(FileOperationFailed) as exc:
            await volume.copy_file(vfolder, "dir", "d2")
        assert exc.value.body()["errno"] == errno.EISDIR
        with pytest.raises(FileOperationFailed):
            await volume.copy_file(vfolder, "missing", "d2")
        before = tree_state(outside)
        for src, dst in (("escape/secret.txt", "s"), ("f", "escape/f"), ("f", "escape"), ("f", "../f")):
            with pytest.raises(InvalidPath):
                await volume.copy_file(vfolder, src, dst)
        assert tree_state(outside) == before

    @ensure
    async def test_enospc_is_507_and_leaves_nothing(self, volume: VfsVolume, vfolder: VFolderID, monkeypatch) -> None:
        from storage.fs import tree as fstree

        path = vpath(volume, vfolder)
        write(path / "src", b"x" * 1000)

        def full(src_fd, dst_fd, so, do, count):
            os.pwrite(dst_fd, b"x" * 10, do)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(fstree.fastio, "copy_range", full)
        with pytest.raises(InsufficientStorage) as exc:
            await volume.copy_file(vfolder, "src", "dst")
        assert exc.value.status == 507
        assert sorted(p.name for p in path.iterdir()) == ["src"]


class TestDeleteFiles:
    @ensure
    async def test_delete(self, volume: VfsVolume, vfolder: VFolderID, outside: Path) -> None:
        path = vpath(volume, vfolder)
        write(path / "f")
        write(path / "d" / "e" / "g")
        os.symlink(outside, path / "dirlink")
        os.symlink(outside / "secret.txt", path / "filelink")
        before = tree_state(outside)
        await volume.delete_files(vfolder, ["f", "dirlink", "filelink", "missing", "nope/deeper"])
        assert sorted(p.name for p in path.iterdir()) == ["d"]
        with pytest.raises(FileOperationFailed) as exc:
            await volume.delete_files(vfolder, ["d"])
        assert exc.value.body()["errno"] == errno.EISDIR and exc.value.body()["paths"] == ["d"]
        await volume.delete_files(vfolder, ["d"], recursive=True)
        assert list(path.iterdir()) == []
        assert tree_state(outside) == before

    @ensure
    async def test_checks_every_path_before_deleting(self, volume: VfsVolume, vfolder: VFolderID, outside: Path) -> None:
        path = vpath(volume, vfolder)
        write(path / "keep")
        os.symlink(outside, path / "escape")
        for bad in (["keep", "escape/secret.txt"], ["keep", "../x"], ["keep", "."], ["keep", "/etc/passwd"]):
            with pytest.raises(InvalidPath):
                await volume.delete_files(vfolder, bad, recursive=True)
            assert (path / "keep").exists()
        assert (outside / "secret.txt").exists()

    @ensure
    async def test_missing_vfolder(self, volume: VfsVolume, new_vfid) -> None:
        with pytest.raises(VFolderNotFound):
            await volume.delete_files(new_vfid(), ["a"])


class TestResolve:
    @ensure
    async def test_resolve(self, volume: VfsVolume, vfolder: VFolderID, outside: Path) -> None:
        path = Path(os.path.realpath(vpath(volume, vfolder)))
        write(path / "d" / "f")
        os.symlink("d/f", path / "link")
        os.symlink(outside / "secret.txt", path / "escape")
        assert await volume.resolve(vfolder, "link") == path / "d" / "f"
        assert await volume.resolve(vfolder, "link", follow_final=False) == path / "link"
        assert await volume.resolve(vfolder, "escape", follow_final=False) == path / "escape"
        assert await volume.resolve(vfolder, ".") == path
        with pytest.raises(InvalidPath):
            await volume.resolve(vfolder, "escape")


def test_os_errors_mapping() -> None:
    for code, cls in ((errno.ENOSPC, InsufficientStorage), (errno.EDQUOT, InsufficientStorage),
                      (errno.EACCES, FileOperationFailed)):
        with pytest.raises(cls) as exc, os_errors("a", "b"):
            raise OSError(code, os.strerror(code))
        body = exc.value.body()
        assert body["errno"] == code and body["paths"] == ["a", "b"] and body["msg"] == os.strerror(code)
