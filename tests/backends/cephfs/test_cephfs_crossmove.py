"""Real CephFS: the xattr helpers and the EXDEV-safe move across quota realms."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from backends.cephfs import xattrs
from storage.fs import crossmove

pytestmark = pytest.mark.cephfs


def test_quota_xattrs_round_trip(cephfs_dir: Path):
    assert xattrs.read_quota(cephfs_dir) == (None, None)
    xattrs.set_max_bytes(cephfs_dir, 10_000_000)
    xattrs.set_max_files(cephfs_dir, 50)
    assert xattrs.read_quota(cephfs_dir) == (10_000_000, 50)
    xattrs.set_max_bytes(cephfs_dir, None)
    xattrs.set_max_files(cephfs_dir, 0)
    assert xattrs.read_quota(cephfs_dir) == (None, None)
    with pytest.raises(ValueError):
        xattrs.set_max_bytes(cephfs_dir, -1)


def test_rstats_of_an_empty_dir_count_itself(cephfs_dir: Path):
    stats = xattrs.read_rstats(cephfs_dir)
    assert stats.rbytes == 0 and stats.rfiles == 0 and stats.rsubdirs == 1
    assert stats.entries_below == 0
    assert xattrs.is_cephfs(cephfs_dir)


def test_a_file_has_no_rstats(cephfs_dir: Path):
    f = cephfs_dir / "f"
    f.write_bytes(b"x")
    with pytest.raises(OSError) as info:
        xattrs.read_rstats(f)
    assert info.value.errno == errno.ENODATA


def test_not_cephfs(tmp_path: Path):
    assert not xattrs.is_cephfs(tmp_path)
    with pytest.raises(xattrs.NotCephFS):
        xattrs.read_rstats(tmp_path)


def _realms(base: Path) -> tuple[Path, Path]:
    plain = base / "plain"
    quota = base / "quota"
    plain.mkdir()
    quota.mkdir()
    xattrs.set_max_bytes(quota, 50_000_000)
    return plain, quota


def test_plain_rename_across_realms_is_exdev(cephfs_dir: Path):
    """The fact the backend works around (if this ever stops failing, good news)."""
    plain, quota = _realms(cephfs_dir)
    (plain / "f").write_bytes(b"data")
    with pytest.raises(OSError) as info:
        os.rename(plain / "f", quota / "f")
    assert info.value.errno == errno.EXDEV


def test_move_file_across_realms(cephfs_dir: Path):
    plain, quota = _realms(cephfs_dir)
    src = plain / "f"
    src.write_bytes(os.urandom(3 << 20))
    os.chmod(src, 0o640)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    data = src.read_bytes()
    assert crossmove.move_path(src, quota / "g") is True  # the copy path was taken
    dst = quota / "g"
    assert dst.read_bytes() == data
    assert not src.exists()
    st = dst.stat()
    assert st.st_mode & 0o777 == 0o640 and st.st_mtime_ns == 1_600_000_000_000_000_000
    assert sorted(os.listdir(quota)) == ["g"]  # no temporary left behind


def test_move_tree_back_out_of_a_realm_keeps_links_and_modes(cephfs_dir: Path):
    plain, quota = _realms(cephfs_dir)
    tree = quota / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"deep")
    (tree / "top").write_bytes(b"top")
    os.symlink("a/b/f", tree / "link")
    os.chmod(tree / "a", 0o750)
    assert crossmove.move_path(tree, plain / "tree") is True
    moved = plain / "tree"
    assert (moved / "a" / "b" / "f").read_bytes() == b"deep"
    assert os.readlink(moved / "link") == "a/b/f"
    assert (moved / "a").stat().st_mode & 0o777 == 0o750
    assert not tree.exists()


def test_move_replaces_an_existing_file_atomically(cephfs_dir: Path):
    plain, quota = _realms(cephfs_dir)
    (plain / "f").write_bytes(b"new")
    (quota / "f").write_bytes(b"old")
    crossmove.move_path(plain / "f", quota / "f")
    assert (quota / "f").read_bytes() == b"new"
    assert sorted(os.listdir(quota)) == ["f"]


def test_move_into_a_non_empty_dir_fails_before_copying(cephfs_dir: Path):
    plain, quota = _realms(cephfs_dir)
    (plain / "d").mkdir()
    (plain / "d" / "x").write_bytes(b"x")
    (quota / "d").mkdir()
    (quota / "d" / "keep").write_bytes(b"k")
    with pytest.raises(OSError) as info:
        crossmove.move_path(plain / "d", quota / "d")
    assert info.value.errno == errno.ENOTEMPTY
    assert (plain / "d" / "x").exists() and sorted(os.listdir(quota)) == ["d"]


def test_a_failed_copy_leaves_the_source_and_no_temporary(cephfs_dir: Path):
    """A destination realm too small for the data: EDQUOT, source intact, no litter."""
    plain, quota = _realms(cephfs_dir)
    small = quota / "small"
    small.mkdir()
    xattrs.set_max_bytes(small, 1_000_000)
    src = plain / "big"
    src.write_bytes(os.urandom(24 << 20))
    with pytest.raises(OSError) as info:
        crossmove.move_path(src, small / "big")
    assert info.value.errno in (errno.EDQUOT, errno.ENOSPC)
    assert src.stat().st_size == 24 << 20
    assert os.listdir(small) == []
