"""The streaming zip writer (storage.zipstream), checked with Python's zipfile."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import time
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import zipstream
from storage.zipstream import ArchiveSourceChanged, ZipEntry, ZipWriter, collect_entries


def _tree(root):
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "empty").write_bytes(b"")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "big.bin").write_bytes(os.urandom(3 * (1 << 20) + 11))
    (root / "sub" / "deeper" / "z.txt").write_bytes(b"z" * 1000)
    (root / "void").mkdir()
    (root / "한글 파일.txt").write_bytes("유니코드".encode())
    os.symlink("a.txt", root / "link-in")
    os.symlink("/etc/passwd", root / "link-out")
    os.mkfifo(root / "fifo")
    os.utime(root / "a.txt", (1_600_000_000, 1_600_000_000))
    os.chmod(root / "a.txt", 0o640)


def _unzip_accepts(tmp_path, data):
    """Info-ZIP's unzip, when installed, tests every CRC and record too."""
    if shutil.which("unzip") is None:
        return
    path = tmp_path / "check.zip"
    path.write_bytes(data)
    result = subprocess.run(["unzip", "-tq", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _archive(entries, **kw):
    writer = ZipWriter(entries, **kw)
    data = b"".join(writer.chunks())
    return writer, data


def test_directory_round_trip(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    _tree(root)
    entries = collect_entries(str(root))
    writer, data = _archive(entries)
    assert writer.content_length() == len(data) == writer.position
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    names = zf.namelist()
    assert sorted(names) == sorted(
        ["a.txt", "empty", "sub/", "sub/big.bin", "sub/deeper/", "sub/deeper/z.txt", "void/",
         "한글 파일.txt", "link-in", "link-out"]
    )
    assert zf.read("a.txt") == b"hello\n"
    assert zf.read("sub/big.bin") == (root / "sub" / "big.bin").read_bytes()
    assert zf.read("한글 파일.txt") == "유니코드".encode()
    # Symlinks are stored as links: their target text, never what they point to.
    out = zf.getinfo("link-out")
    assert stat.S_ISLNK(out.external_attr >> 16)
    assert zf.read("link-out") == b"/etc/passwd"
    info = zf.getinfo("a.txt")
    assert stat.S_IMODE(info.external_attr >> 16) == 0o640
    assert info.date_time == time.localtime(1_600_000_000)[:6]
    assert zf.getinfo("void/").is_dir()
    assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    assert "fifo" not in names
    _unzip_accepts(tmp_path, data)


def test_prefix_and_single_file(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    _tree(root)
    entries = collect_entries(str(root / "sub"), "data/sub") + collect_entries(str(root / "a.txt"), "a.txt")
    _, data = _archive(entries)
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.namelist() == ["data/sub/", "data/sub/big.bin", "data/sub/deeper/", "data/sub/deeper/z.txt", "a.txt"]


def test_deflate(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    _tree(root)
    writer, data = _archive(collect_entries(str(root)), compress=True)
    assert writer.content_length() is None
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    assert zf.getinfo("sub/deeper/z.txt").compress_type == zipfile.ZIP_DEFLATED
    assert zf.getinfo("sub/deeper/z.txt").compress_size < 100
    assert zf.read("sub/deeper/z.txt") == b"z" * 1000


def test_empty_archive():
    writer, data = _archive([])
    assert writer.content_length() == len(data) == 22
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == []


def test_chunks_are_bounded(tmp_path):
    (tmp_path / "f").write_bytes(os.urandom(5 << 20))
    writer = ZipWriter(collect_entries(str(tmp_path / "f"), "f"), read_size=1 << 16, chunk_size=1 << 16)
    sizes = [len(c) for c in writer.chunks()]
    assert max(sizes) <= 2 << 16


def test_a_file_that_shrinks_aborts(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100_000)
    entries = collect_entries(str(path), "f")
    path.write_bytes(b"x" * 10)
    with pytest.raises(ArchiveSourceChanged):
        b"".join(ZipWriter(entries).chunks())


def test_a_file_replaced_by_a_symlink_is_not_followed(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    (tmp_path / "secret").write_bytes(b"s" * 100)
    entries = collect_entries(str(path), "f")
    path.unlink()
    os.symlink(tmp_path / "secret", path)
    with pytest.raises(OSError):
        b"".join(ZipWriter(entries).chunks())


def test_a_file_that_grows_is_cut_at_the_listed_size(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100)
    entries = collect_entries(str(path), "f")
    path.write_bytes(b"a" * 100 + b"b" * 100)
    writer, data = _archive(entries)
    assert writer.content_length() == len(data)
    assert zipfile.ZipFile(io.BytesIO(data)).read("f") == b"a" * 100


def test_zip64_paths_with_lowered_thresholds(tmp_path, monkeypatch):
    """Every zip64 record (entry sizes, offsets, the zip64 end records) is
    produced when the thresholds are lowered, and zipfile reads them."""
    monkeypatch.setattr(zipstream, "ZIP64_AT", 1000)
    monkeypatch.setattr(zipstream, "COUNT64_AT", 3)
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(bytes([65 + i]) * (600 * i))
    entries = collect_entries(str(tmp_path))
    writer, data = _archive(entries)
    assert writer.content_length() == len(data)
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    for i in range(5):
        assert zf.read(f"f{i}") == bytes([65 + i]) * (600 * i)
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data  # zip64 end record and locator
    _unzip_accepts(tmp_path, data)
    writer, data = _archive(entries, compress=True)
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None


def test_zip64_layout_of_a_huge_entry_without_reading_it():
    """A 5 GiB entry: the computed length and the records say zip64 (the data
    itself comes from a fake opener over /dev/zero, read only in part)."""
    big = ZipEntry("huge.bin", "file", 5 << 30, 1_700_000_000, 0o100644, source="/dev/zero")
    small = ZipEntry("after.txt", "file", 3, 1_700_000_000, 0o100644, source="/dev/zero")
    writer = ZipWriter([big, small])
    length = writer.content_length()
    # local header + name + zip64 extra + UT extra + data + zip64 descriptor, then the small
    # entry (with an offset past 4 GiB in the central directory) and the zip64 end records.
    local_big = 30 + 8 + 20 + 9 + (5 << 30) + 24
    local_small = 30 + 9 + 9 + 3 + 16
    central = (46 + 8 + 20 + 9) + (46 + 9 + 12 + 9)
    assert length == local_big + local_small + central + 56 + 20 + 22


@settings(max_examples=25, deadline=None)
@given(
    files=st.dictionaries(
        st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"), min_size=1,
                max_size=12).filter(lambda s: s not in (".", "..")),
        st.binary(max_size=5000),
        max_size=8,
    ),
    compress=st.booleans(),
)
def test_round_trip_property(tmp_path_factory, files, compress):
    root = tmp_path_factory.mktemp("z")
    for name, content in files.items():
        (root / name).write_bytes(content)
    writer, data = _archive(collect_entries(str(root)), compress=compress)
    if not compress:
        assert writer.content_length() == len(data)
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    assert {n: zf.read(n) for n in zf.namelist()} == files
