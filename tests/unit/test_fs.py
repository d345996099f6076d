"""storage.fs: the copy a cross-realm move makes (bounded descriptors, fsync,
refusals, cleanup) and the one atomic write."""

from __future__ import annotations

import errno
import os
import resource
import stat
from pathlib import Path

import pytest

from storage.fs import atomic, crossmove, tree


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _deep_tree(root: Path, depth: int) -> Path:
    path = root
    for i in range(depth):
        path = path / f"d{i}"
    path.mkdir(parents=True)
    (path / "leaf").write_bytes(b"bottom")
    return path


def _swap(src: Path, dst: Path) -> None:
    """What rename_at does on EXDEV, taken directly (no quota realm needed)."""
    sdir = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY)
    ddir = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        crossmove.swap_in_at(sdir, src.name, ddir, dst.name)
    finally:
        os.close(sdir)
        os.close(ddir)


def test_moving_a_deep_tree_by_copy_keeps_few_descriptors_open(tmp_path: Path) -> None:
    """300 levels with ~170 descriptors to spare: a copy or removal that held
    one or two descriptors per level would fail with EMFILE."""
    src = tmp_path / "src"
    _deep_tree(src, 300)
    (tmp_path / "dst").mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + 170, hard))
    try:
        _swap(src, tmp_path / "dst" / "moved")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not src.exists()
    leaf = tmp_path / "dst" / "moved" / "/".join(f"d{i}" for i in range(300)) / "leaf"
    assert leaf.read_bytes() == b"bottom"
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["moved"]


def test_the_copy_of_a_move_is_fsynced_before_it_is_swapped_in(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "f").write_bytes(b"1")
    (src / "a" / "g").write_bytes(b"2")
    (src / "a" / "b" / "h").write_bytes(b"3")
    (tmp_path / "dst").mkdir()
    synced: set[int] = set()
    renamed_after: list[set[int]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def rename(*args, **kwargs) -> None:
        renamed_after.append(set(synced))
        real_rename(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    _swap(src, tmp_path / "dst" / "moved")
    moved = tmp_path / "dst" / "moved"
    inodes = {moved.stat().st_ino} | {p.lstat().st_ino for p in moved.rglob("*")}
    assert len(inodes) == 6
    assert inodes <= renamed_after[-1]  # every file and directory, before the swap
    assert (tmp_path / "dst").stat().st_ino in synced  # and the rename itself after


def test_a_move_by_copy_refuses_a_special_file_and_leaves_the_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "data").write_bytes(b"keep")
    os.mkfifo(src / "sub" / "pipe")
    (tmp_path / "dst").mkdir()
    with pytest.raises(OSError) as info:
        _swap(src, tmp_path / "dst" / "moved")
    assert info.value.errno == errno.EINVAL
    assert (src / "data").read_bytes() == b"keep"
    assert stat.S_ISFIFO((src / "sub" / "pipe").lstat().st_mode)
    assert list((tmp_path / "dst").iterdir()) == []  # the .moving- copy is gone


def test_a_clone_recreates_fifos_and_keeps_symlinks_as_links(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    os.mkfifo(src / "sub" / "pipe")
    os.symlink("/etc/passwd", src / "link")
    (src / "sub" / "f").write_bytes(b"x" * 1000)
    os.chmod(src / "sub", 0o750)
    dst.mkdir()
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDONLY)
    try:
        tree.copy_tree_contents(sfd, dfd)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert stat.S_ISFIFO((dst / "sub" / "pipe").lstat().st_mode)
    assert os.readlink(dst / "link") == "/etc/passwd"
    assert (dst / "sub" / "f").read_bytes() == b"x" * 1000
    assert stat.S_IMODE((dst / "sub").stat().st_mode) == 0o750


def test_remove_at_removes_a_deep_tree_and_never_follows_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"p")
    victim = tmp_path / "victim"
    bottom = _deep_tree(victim, 200)
    os.symlink(outside, bottom / "escape")
    tree.remove_path(victim)
    assert not victim.exists()
    assert (outside / "precious").read_bytes() == b"p"
    tree.remove_path(victim)  # gone already: fine


def test_write_atomic_replaces_whole_or_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "f"
    atomic.write_atomic(target, [b"one ", b"two"])
    assert target.read_bytes() == b"one two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600

    def broken(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        atomic.write_atomic(target, b"new", hidden=True)
    monkeypatch.undo()
    assert target.read_bytes() == b"one two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_write_atomic_exact_mode_ignores_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic.write_atomic(tmp_path / "plain", b"x", mode=0o644)
        atomic.write_atomic(tmp_path / "exact", b"x", mode=0o644, exact_mode=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "exact").stat().st_mode) == 0o644


def test_temp_names_carry_the_writer_pid(tmp_path: Path, monkeypatch) -> None:
    seen: list[str] = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    atomic.write_atomic(tmp_path / "state", b"1")
    atomic.write_atomic(tmp_path / "state", b"2", hidden=True)
    assert seen[0].startswith(f"state.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert seen[1].startswith(f".state.{os.getpid()}.")
    assert seen[0] != seen[1].lstrip(".")
