"""Property: no path a client can send makes the vfs backend touch anything
outside the vfolder.

A vfolder is filled with symlinks that lead out of it (absolute, relative
``../..``, to ``/``, to a sibling vfolder, chains, loops, dangling ones);
next to it are an "outside" directory and a sibling vfolder full of sentinel
files.  Hypothesis then generates hostile relpaths (``..`` runs, absolute
paths, NUL bytes, backslashes, unicode, over-long names, ``.`` and empty
segments, mixed with the names of those symlinks) and runs sequences of every
path-taking operation of the volume on them.  After each operation:

* nothing outside the vfolder changed: names, types, modes, sizes, mtimes,
  contents and link targets of the whole test tree except the vfolder itself
  (and ``/``'s listing) are as before;
* what it returned comes from inside: a listing equals the listing of a
  directory inside the vfolder, a resolved or mount path is inside it, usage
  equals an independent no-follow count of a directory inside it, and no
  file inside the vfolder ever holds a sentinel's content (nothing was read
  out and copied in);
* or it failed with one of the client errors (InvalidPath, InvalidSubpath,
  FileOperationFailed), never anything else, and the vfolder still exists.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.vfs import VfsVolume
from storage.errors import FileOperationFailed, InvalidPath, InvalidSubpath
from storage.fs.tree import remove_tree_contents
from storage.paths import is_inside
from storage.vfid import VFolderID

SENTINEL = b"SENTINEL-"
CLIENT_ERRORS = (InvalidPath, InvalidSubpath, FileOperationFailed)
ROOT_NAMES = frozenset(os.listdir("/"))

LINK_NAMES = [
    "out_abs", "out_rel", "out_file", "root_link", "up", "chain1", "chain2", "in_link",
    "in_file_link", "sib", "dangling_out", "loop1", "loop2", "deep_in", "a/up2",
]
SEGMENTS = [
    ".", "..", "", "...", "a", "b", "a/b", "f.txt", "g.txt", "empty", "new", "x",
    "SENTINEL_file", "SENTINEL_dir", "SENTINEL_inner", "..\\..", "\\", "%2e%2e", "\x00", "a\x00b",
    "ü", "名前", "n" * 255, "n" * 256, " ", "up2", *LINK_NAMES,
]

# Free-form names never equal an entry of "/": a root_link/<name> bug must not
# be able to hit a real system directory while this test runs as root.
free_segment = st.text(
    alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=1, max_size=12
).filter(lambda s: s not in ROOT_NAMES)
segment = st.one_of(st.sampled_from(SEGMENTS), free_segment)
relpath = st.one_of(
    st.builds(
        lambda prefix, parts, suffix: prefix + "/".join(parts) + suffix,
        st.sampled_from(["", "", "", "/", "//", "./", "../", "\\"]),
        st.lists(segment, min_size=0, max_size=6),
        st.sampled_from(["", "", "/", "/.", "/.."]),
    ),
    st.sampled_from(["a/" * 2100, "/" * 10, "." * 300, "../" * 50 + "etc/passwd", "/etc/passwd"]),
)
name = st.one_of(st.sampled_from(["renamed", "..", ".", "", "a/b", "x\x00", "n" * 256, "SENTINEL_file", "a"]),
                 free_segment)
OPS = ["mkdir", "scandir", "rename", "move", "copy_file", "delete_files", "resolve",
       "get_usage", "get_used_bytes", "get_vfolder_mount"]


@dataclass
class Step:
    op: str
    path: str
    other: str
    name: str
    flag: bool
    flag2: bool


step = st.builds(Step, st.sampled_from(OPS), relpath, relpath, name, st.booleans(), st.booleans())


@dataclass
class Arena:
    volume: VfsVolume
    vfid: VFolderID
    vfpath: Path  # real path of the vfolder under test
    top: Path  # everything under here except vfpath must never change
    outside: Path
    sibling: Path
    baseline: dict
    pristine: dict | None = None

    def reset(self) -> None:
        """Rebuild the vfolder, unless the last example left it as it was
        (most hostile paths are refused: this keeps the test fast)."""
        if self.pristine is not None and vfolder_state(self.vfpath) == self.pristine:
            return
        fd = os.open(self.vfpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            remove_tree_contents(fd)
        finally:
            os.close(fd)
        v = self.vfpath
        (v / "a" / "b").mkdir(parents=True)
        (v / "empty").mkdir()
        (v / "f.txt").write_bytes(b"inside")
        (v / "a" / "g.txt").write_bytes(b"inside too")
        os.symlink(self.outside, v / "out_abs")
        os.symlink(os.path.relpath(self.outside, v), v / "out_rel")
        os.symlink(self.outside / "SENTINEL_file", v / "out_file")
        os.symlink("/", v / "root_link")
        os.symlink("..", v / "up")
        os.symlink("../..", v / "a" / "up2")
        os.symlink("chain2", v / "chain1")
        os.symlink("out_abs", v / "chain2")
        os.symlink("a", v / "in_link")
        os.symlink("f.txt", v / "in_file_link")
        os.symlink(self.sibling, v / "sib")
        os.symlink("/nonexistent-storage-proxy-test/x", v / "dangling_out")
        os.symlink("loop2", v / "loop1")
        os.symlink("loop1", v / "loop2")
        os.symlink("a/b", v / "deep_in")
        self.pristine = vfolder_state(v)


def vfolder_state(root: Path) -> dict:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            p = Path(dirpath, entry)
            s = p.lstat()
            extra = os.readlink(p) if stat.S_ISLNK(s.st_mode) else p.read_bytes() if stat.S_ISREG(s.st_mode) else None
            state[str(p)] = (s.st_mode, extra)
    return state


def snapshot(top: Path, exclude: Path) -> dict:
    state = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == exclude:
            dirnames[:] = []
            continue
        for entry in dirnames + filenames:
            p = Path(dirpath, entry)
            if p == exclude:
                continue
            s = p.lstat()
            if stat.S_ISLNK(s.st_mode):
                extra: object = os.readlink(p)
            elif stat.S_ISREG(s.st_mode):
                extra = p.read_bytes()
            else:
                extra = None
            state[str(p)] = (s.st_mode, s.st_size, s.st_mtime_ns, extra)
    state["/"] = sorted(os.listdir("/"))
    return state


def fill_sentinels(d: Path) -> None:
    (d / "SENTINEL_dir").mkdir(parents=True)
    (d / "SENTINEL_file").write_bytes(SENTINEL + b"file")
    (d / "SENTINEL_dir" / "SENTINEL_inner").write_bytes(SENTINEL + b"inner")
    (d / "a").mkdir()
    (d / "a" / "g.txt").write_bytes(SENTINEL + b"g")
    (d / "f.txt").write_bytes(SENTINEL + b"f")
    os.chmod(d / "f.txt", 0o600)


@pytest.fixture
def arena(make_volume, tmp_path: Path, run, new_vfid) -> Arena:
    volume = make_volume("local", **{"usage-cache-ttl": 0})
    vfid, sibling_vfid = new_vfid(), new_vfid()
    for v in (vfid, sibling_vfid):
        run(volume.create_vfolder(v, auto_create_quota_scope=True))
    outside = tmp_path / "outside"
    outside.mkdir()
    fill_sentinels(outside)
    sibling = Path(os.path.realpath(volume.vfolder_path(sibling_vfid)))
    fill_sentinels(sibling)
    vfpath = Path(os.path.realpath(volume.vfolder_path(vfid)))
    top = Path(os.path.realpath(tmp_path))
    arena = Arena(volume, vfid, vfpath, top, outside, sibling, {})
    arena.reset()
    arena.baseline = snapshot(top, vfpath)
    return arena


def inside_listing(arena: Arena, rel: str) -> list[str] | None:
    """What an honest listing of ``rel`` is, or None if it is not a directory inside."""
    real = os.path.realpath(os.path.join(arena.vfpath, rel.lstrip("/")))
    if not is_inside(str(arena.vfpath), real) or not os.path.isdir(real):
        return None
    return sorted(os.listdir(real))


def count_no_follow(path: str) -> int:
    count = 0
    for _dirpath, dirnames, filenames in os.walk(path):  # os.walk never follows links by default
        count += len(dirnames) + len(filenames)
    return count


def vfolder_holds_sentinel_content(arena: Arena) -> bool:
    for dirpath, _dirnames, filenames in os.walk(arena.vfpath):
        for f in filenames:
            p = Path(dirpath, f)
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as fh:
                    if fh.read(len(SENTINEL)) == SENTINEL:
                        return True
    return False


async def apply(arena: Arena, s: Step) -> None:
    vol, vfid = arena.volume, arena.vfid
    try:
        if s.op == "mkdir":
            await vol.mkdir(vfid, s.path, parents=s.flag, exist_ok=s.flag2)
        elif s.op == "scandir":
            items = await vol.scandir(vfid, s.path)
            expected = inside_listing(arena, s.path)
            assert expected is not None, f"listed {s.path!r}, which is not a directory inside"
            assert sorted(i.name for i in items) == expected
            for i in items:
                assert not i.symlink_target or ".." not in i.symlink_target.split("/")
        elif s.op == "rename":
            await vol.rename(vfid, s.path, s.name)
        elif s.op == "move":
            await vol.move(vfid, s.path, s.other)
        elif s.op == "copy_file":
            await vol.copy_file(vfid, s.path, s.other)
        elif s.op == "delete_files":
            await vol.delete_files(vfid, [s.path, s.other], recursive=s.flag)
        elif s.op == "resolve":
            path = await vol.resolve(vfid, s.path, follow_final=s.flag)
            assert is_inside(str(arena.vfpath), str(path)), f"resolved {s.path!r} to {path}"
        elif s.op in ("get_usage", "get_used_bytes"):
            usage = await vol.get_usage(vfid, s.path)
            real = os.path.realpath(os.path.join(arena.vfpath, s.path.lstrip("/")))
            assert is_inside(str(arena.vfpath), real), f"usage of {s.path!r} ({real})"
            assert usage.file_count == count_no_follow(real)
            if s.op == "get_used_bytes":
                assert await vol.get_used_bytes(vfid, s.path) > 0
        elif s.op == "get_vfolder_mount":
            assert await vol.get_vfolder_mount(vfid, s.path) == arena.vfpath
    except CLIENT_ERRORS:
        pass
    assert arena.vfpath.is_dir(), f"{s} removed the vfolder itself"
    assert snapshot(arena.top, arena.vfpath) == arena.baseline, f"{s} changed something outside the vfolder"
    assert not vfolder_holds_sentinel_content(arena), f"{s} copied data from outside into the vfolder"


PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.filter_too_much],
)


@PROPERTY_SETTINGS
@given(s=step)
@pytest_twisted.ensureDeferred
async def test_each_operation_stays_inside(arena: Arena, s: Step) -> None:
    arena.reset()
    await apply(arena, s)


@PROPERTY_SETTINGS
@given(steps=st.lists(step, min_size=2, max_size=5))
@pytest_twisted.ensureDeferred
async def test_operation_sequences_stay_inside(arena: Arena, steps: list[Step]) -> None:
    """Earlier steps reshape the vfolder (renamed links, new dirs, moved trees)."""
    arena.reset()
    for s in steps:
        await apply(arena, s)


@PROPERTY_SETTINGS
@given(paths=st.lists(st.one_of(relpath, st.sampled_from(LINK_NAMES)), min_size=1, max_size=6),
       recursive=st.booleans())
@pytest_twisted.ensureDeferred
async def test_batch_delete_is_all_or_nothing_for_escapes(arena: Arena, paths: list[str], recursive: bool) -> None:
    """A batch naming any escaping path deletes nothing at all."""
    arena.reset()
    before = snapshot(arena.vfpath, arena.vfpath / "\x00none")
    try:
        await arena.volume.delete_files(arena.vfid, paths, recursive=recursive)
    except InvalidPath:
        assert snapshot(arena.vfpath, arena.vfpath / "\x00none") == before
    except FileOperationFailed:
        pass
    assert snapshot(arena.top, arena.vfpath) == arena.baseline
