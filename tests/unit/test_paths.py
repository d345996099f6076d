"""storage.paths: validation, resolution, no-follow opening and the confined tree walk."""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

import pytest

from storage.errors import InvalidPath
from storage.fs.walk import walk_tree
from storage.paths import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    open_dir_beneath,
    open_parent,
    open_root,
    resolve_inside,
    resolve_rel,
    validate_name,
    validate_relpath,
)


@pytest.mark.parametrize("relpath, expected", [
    ("a/b", "a/b"), ("./a//b/", "a/b"), ("", "."), (".", "."), ("a/./b", "a/b"),
    ("..a/b..", "..a/b.."), ("a\\..\\b", "a\\..\\b"), ("ünï/名", "ünï/名"), ("n" * MAX_NAME_BYTES, "n" * MAX_NAME_BYTES),
])
def test_validate_accepts(relpath: str, expected: str) -> None:
    assert validate_relpath(relpath) == PurePosixPath(expected)


@pytest.mark.parametrize("relpath", [
    "..", "a/../b", "../a", "/etc", "//x", "a\x00b", "\ud800", "n" * (MAX_NAME_BYTES + 1),
    "a/" * (MAX_PATH_BYTES // 2 + 1), None, 3, b"a", ["a"],
])
def test_validate_refuses(relpath: object) -> None:
    with pytest.raises(InvalidPath) as exc:
        validate_relpath(relpath, "dst")
    assert exc.value.status == 400 and "dst" in exc.value.data


@pytest.mark.parametrize("name", ["a", "a.b", "..a", "名", " "])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/", "a\x00", "n" * 256, None])
def test_validate_name_refuses(name: object) -> None:
    with pytest.raises(InvalidPath):
        validate_name(name)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "d" / "e").mkdir(parents=True)
    (r / "f").write_text("f")
    os.symlink("d", r / "in-link")
    os.symlink(tmp_path, r / "out-link")
    os.symlink("../..", r / "d" / "up")
    os.symlink("loop2", r / "loop1")
    os.symlink("loop1", r / "loop2")
    return r


def test_resolve(root: Path) -> None:
    assert resolve_rel(root, "in-link/e") == PurePosixPath("d/e")
    assert resolve_rel(root, "in-link", follow_final=False) == PurePosixPath("in-link")
    assert resolve_rel(root, "out-link", follow_final=False) == PurePosixPath("out-link")
    assert resolve_rel(root, "missing/x") == PurePosixPath("missing/x")
    assert resolve_rel(root, ".") == PurePosixPath(".")
    assert resolve_inside(root, "in-link") == Path(os.path.realpath(root)) / "d"
    for bad in ("out-link", "out-link/x", "d/up", "d/up/x", "in-link/up"):
        with pytest.raises(InvalidPath):
            resolve_rel(root, bad)
    with pytest.raises(InvalidPath):
        resolve_rel(root, "out-link/x", follow_final=False)  # the parent leads out


def test_open_beneath_never_follows(root: Path) -> None:
    rfd = open_root(root)
    try:
        fd = open_dir_beneath(rfd, "d/e")
        os.close(fd)
        for planted in ("in-link", "out-link", "d/up"):
            with pytest.raises(OSError) as exc:
                open_dir_beneath(rfd, planted)
            assert exc.value.errno in (errno.ELOOP, errno.ENOTDIR)
        with pytest.raises(InvalidPath):
            open_dir_beneath(rfd, "../root")
        pfd, name = open_parent(rfd, PurePosixPath("d/e"))
        assert name == "e" and os.fstat(pfd).st_ino == os.stat(root / "d").st_ino
        os.close(pfd)
        with pytest.raises(InvalidPath):
            open_parent(rfd, PurePosixPath("."))
    finally:
        os.close(rfd)


def make_chain(base: Path, depth: int) -> None:
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        os.mkdir(f"l{i}", dir_fd=fd)
        os.close(os.open(f"file{i}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        nxt = os.open(f"l{i}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)


def test_walk_tree_visits_everything_with_few_descriptors(tmp_path: Path) -> None:
    make_chain(tmp_path, 40)
    for i in range(30):
        (tmp_path / f"wide{i}").mkdir()
    os.symlink("/", tmp_path / "l0" / "root-link")
    visited: list[int] = []
    left: list[str] = []
    max_fds = 0

    def visit(fds):
        nonlocal max_fds
        max_fds = max(max_fds, len(os.listdir("/proc/self/fd")))
        visited.append(fds[0])
        return sorted(e.name for e in os.scandir(fds[0]) if e.is_dir(follow_symlinks=False))

    before = len(os.listdir("/proc/self/fd"))
    rfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk_tree([rfd], visit, lambda p, c, name: left.append(name), max_open=4)
    finally:
        os.close(rfd)
    assert len(visited) == 1 + 40 + 30
    assert sorted(left) == sorted([f"l{i}" for i in range(40)] + [f"wide{i}" for i in range(30)])
    assert max_fds - before <= 4 + 4  # a few levels open, however deep and wide the tree
    assert len(os.listdir("/proc/self/fd")) <= before  # nothing leaked


def test_walk_tree_fails_when_the_tree_moves_under_it(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c" / "d").mkdir(parents=True)

    def visit(fds):
        names = sorted(e.name for e in os.scandir(fds[0]) if e.is_dir(follow_symlinks=False))
        if names == ["d"]:  # inside c: move b (with c inside) up to the root
            os.rename(tmp_path / "a" / "b", tmp_path / "b")
        return names

    rfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as exc:
            walk_tree([rfd], visit, max_open=1)
        assert exc.value.errno == errno.ESTALE
    finally:
        os.close(rfd)
