"""A streaming zip writer: archives of any size, no temp file, bounded memory.

Written from the PKWARE APPNOTE (6.3.x), not taken from a library, because
downloads need what the libraries do not give together: file data read from
descriptors we opened ourselves (``O_NOFOLLOW``, checked inside the
vfolder), each entry's real mtime and mode, symlinks stored as links, and
the exact ``Content-Length`` known before the first byte.

* Entries are *stored* by default (no compression): the archive streams at
  disk speed and its length is known up front; ``compress=True`` deflates
  (then the length is unknown and the response is chunked).
* Every file entry has a data descriptor (general purpose bit 3) carrying
  the CRC-32, computed while the bytes stream.
* zip64 extensions appear only where needed: an entry of 4 GiB or more, an
  offset past 4 GiB, 65535 entries or more.
* Names are UTF-8 (bit 11 when not plain ASCII); an ``UT`` extra field
  carries the exact mtime, the DOS fields the local time.

``ZipWriter.chunks()`` blocks (it reads files): iterate it from the pool.
Memory: one read buffer plus one small record per entry (the central
directory, which can only be written at the end).
"""

from __future__ import annotations

import os
import stat
import struct
import time
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

LIMIT32 = 0xFFFFFFFF  # "see the zip64 field" markers
LIMIT16 = 0xFFFF
# From where zip64 is used (module constants so a test can lower them).
ZIP64_AT = LIMIT32
COUNT64_AT = LIMIT16
READ_SIZE = 1 << 20
OUT_CHUNK = 1 << 18

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_DESCRIPTOR32 = struct.Struct("<IIII")
_DESCRIPTOR64 = struct.Struct("<IIQQ")
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_EOCD64_LOCATOR = struct.Struct("<IIQI")

_SIG_LOCAL = 0x04034B50
_SIG_CENTRAL = 0x02014B50
_SIG_DESCRIPTOR = 0x08074B50
_SIG_EOCD = 0x06054B50
_SIG_EOCD64 = 0x06064B50
_SIG_EOCD64_LOCATOR = 0x07064B50

_FLAG_DESCRIPTOR = 0x0008
_FLAG_UTF8 = 0x0800
_STORED, _DEFLATED = 0, 8
_VERSION_DEFAULT, _VERSION_DEFLATE, _VERSION_ZIP64 = 10, 20, 45
_MADE_BY_UNIX = 3 << 8
_DOS_DIRECTORY = 0x10


class ArchiveSourceChanged(Exception):
    """A file changed between listing and reading (shrank, or was replaced):
    the archive already promised its bytes, so the response must be aborted."""


@dataclass(frozen=True)
class ZipEntry:
    """One member: ``kind`` is ``"file"``, ``"dir"`` or ``"symlink"``."""

    arcname: str  # POSIX path in the archive, no leading "/"; directories end with "/"
    kind: str
    size: int  # bytes of data (a symlink's data is its target)
    mtime: float
    mode: int  # st_mode, type bits included
    source: str | None = None  # the file to read (files only)
    link_target: bytes | None = None

    @property
    def name_bytes(self) -> bytes:
        return os.fsencode(self.arcname)


def _dos_datetime(mtime: float) -> tuple[int, int]:
    t = time.localtime(mtime)
    year = min(max(t.tm_year, 1980), 2107)
    if t.tm_year < 1980:
        return (0 << 9) | (1 << 5) | 1, 0
    date = ((year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    clock = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
    return date, clock


def _ut_extra(mtime: float) -> bytes:
    """The extended-timestamp field (0x5455) with the mtime, when it fits."""
    seconds = int(mtime)
    if not 0 <= seconds < 1 << 31:
        return b""
    return struct.pack("<HHBI", 0x5455, 5, 1, seconds)


def _name_flags(name: bytes) -> int:
    if name.isascii():
        return 0
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return 0  # not UTF-8: stored as is, readers will guess
    return _FLAG_UTF8


@dataclass
class _Record:
    """What the central directory needs to know about a written entry."""

    entry: ZipEntry
    offset: int
    flags: int
    method: int
    version: int
    crc: int = 0
    compressed: int = 0
    size: int = 0
    extra_local: bytes = field(default=b"", repr=False)


def default_open(entry: ZipEntry) -> int:
    """Open ``entry.source`` without following a symlink or blocking on a FIFO."""
    return os.open(entry.source or "", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


class ZipWriter:
    """Streams the zip of ``entries`` (in the order given)."""

    def __init__(
        self,
        entries: list[ZipEntry],
        *,
        compress: bool = False,
        open_file: Callable[[ZipEntry], int] = default_open,
        read_size: int = READ_SIZE,
        chunk_size: int = OUT_CHUNK,
    ) -> None:
        self.entries = entries
        self.compress = compress
        self.open_file = open_file
        self.read_size = read_size
        self.chunk_size = chunk_size
        self.position = 0  # bytes produced so far

    # -- layout ---------------------------------------------------------------

    def _method(self, entry: ZipEntry) -> int:
        return _DEFLATED if self.compress and entry.kind == "file" and entry.size > 0 else _STORED

    def _entry_zip64(self, entry: ZipEntry, method: int) -> bool:
        if entry.kind == "dir":
            return False
        # Deflate can grow incompressible data a little: decide with a margin.
        worst = entry.size + entry.size // 16 + 64 if method == _DEFLATED else entry.size
        return worst >= ZIP64_AT

    def _local_extra(self, entry: ZipEntry, zip64: bool) -> bytes:
        extra = struct.pack("<HHQQ", 0x0001, 16, 0, 0) if zip64 else b""
        return extra + _ut_extra(entry.mtime)

    def content_length(self) -> int | None:
        """The archive's exact length (stored archives), None when deflating."""
        if self.compress and any(e.kind == "file" and e.size > 0 for e in self.entries):
            return None
        offset = 0
        central = 0
        for entry in self.entries:
            name = entry.name_bytes
            zip64 = self._entry_zip64(entry, _STORED)
            local = _LOCAL.size + len(name) + len(self._local_extra(entry, zip64))
            descriptor = 0 if entry.kind == "dir" else (_DESCRIPTOR64.size if zip64 else _DESCRIPTOR32.size)
            n64 = (2 if entry.size >= ZIP64_AT else 0) + (1 if offset >= ZIP64_AT else 0)
            central += _CENTRAL.size + len(name) + (4 + 8 * n64 if n64 else 0) + len(_ut_extra(entry.mtime))
            offset += local + entry.size + descriptor
        total = offset + central + _EOCD.size
        if self._needs_eocd64(len(self.entries), offset, central):
            total += _EOCD64.size + _EOCD64_LOCATOR.size
        return total

    @staticmethod
    def _needs_eocd64(count: int, cd_offset: int, cd_size: int) -> bool:
        return count >= COUNT64_AT or cd_offset >= ZIP64_AT or cd_size >= ZIP64_AT

    # -- streaming ----------------------------------------------------------------

    def chunks(self) -> Generator[bytes, None, None]:
        """The archive's bytes, in pieces of about ``chunk_size`` (blocking)."""
        out = bytearray()
        records: list[_Record] = []
        for entry in self.entries:
            for piece in self._entry(entry, records):
                if not out and len(piece) >= self.chunk_size:
                    yield piece
                    continue
                out += piece
                if len(out) >= self.chunk_size:
                    yield bytes(out)
                    out.clear()
        for piece in self._central_directory(records):
            out += piece
        if out:
            yield bytes(out)

    def _emit(self, data: bytes) -> bytes:
        self.position += len(data)
        return data

    def _entry(self, entry: ZipEntry, records: list[_Record]) -> Iterator[bytes]:
        name = entry.name_bytes
        method = self._method(entry)
        zip64 = self._entry_zip64(entry, method)
        flags = _name_flags(name) | (0 if entry.kind == "dir" else _FLAG_DESCRIPTOR)
        version = _VERSION_ZIP64 if zip64 else (_VERSION_DEFLATE if method == _DEFLATED else _VERSION_DEFAULT)
        if entry.kind == "dir":
            version = max(version, _VERSION_DEFLATE)  # directories need 2.0
        record = _Record(entry, self.position, flags, method, version)
        record.extra_local = self._local_extra(entry, zip64)
        date, clock = _dos_datetime(entry.mtime)
        sizes = LIMIT32 if zip64 else 0
        header = _LOCAL.pack(
            _SIG_LOCAL, version, flags, method, clock, date, 0, sizes, sizes, len(name), len(record.extra_local)
        )
        yield self._emit(header + name + record.extra_local)
        if entry.kind == "dir":
            records.append(record)
            return
        if entry.kind == "symlink":
            data = entry.link_target or b""
            record.crc = zlib.crc32(data)
            record.size = record.compressed = len(data)
            yield self._emit(data)
        else:
            yield from self._file_data(entry, record)
        descriptor = (_DESCRIPTOR64 if zip64 else _DESCRIPTOR32).pack(
            _SIG_DESCRIPTOR, record.crc, record.compressed, record.size
        )
        yield self._emit(descriptor)
        records.append(record)

    def _file_data(self, entry: ZipEntry, record: _Record) -> Iterator[bytes]:
        fd = self.open_file(entry)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ArchiveSourceChanged(f"{entry.arcname} is no longer a regular file")
            compressor = zlib.compressobj(6, zlib.DEFLATED, -15) if record.method == _DEFLATED else None
            crc = 0
            done = 0
            compressed = 0
            while done < entry.size:
                data = os.pread(fd, min(self.read_size, entry.size - done), done)
                if not data:
                    raise ArchiveSourceChanged(f"{entry.arcname} shrank while being archived")
                done += len(data)
                crc = zlib.crc32(data, crc)
                if compressor is not None:
                    data = compressor.compress(data)
                    if not data:
                        continue
                compressed += len(data)
                yield self._emit(data)
            if compressor is not None:
                tail = compressor.flush()
                compressed += len(tail)
                yield self._emit(tail)
            record.crc, record.size, record.compressed = crc, done, compressed
        finally:
            os.close(fd)

    def _central_directory(self, records: list[_Record]) -> Iterator[bytes]:
        cd_offset = self.position
        for record in records:
            entry = record.entry
            name = entry.name_bytes
            fields: list[int] = []
            size, compressed, offset = record.size, record.compressed, record.offset
            if max(size, compressed) >= ZIP64_AT:
                fields += [size, compressed]
                size = compressed = LIMIT32
            if offset >= ZIP64_AT:
                fields.append(offset)
                offset = LIMIT32
            extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields) if fields else b""
            extra += _ut_extra(entry.mtime)
            version = max(record.version, _VERSION_ZIP64 if fields else 0)
            date, clock = _dos_datetime(entry.mtime)
            external = (entry.mode & 0xFFFF) << 16
            if entry.kind == "dir":
                external |= _DOS_DIRECTORY
            header = _CENTRAL.pack(
                _SIG_CENTRAL, _MADE_BY_UNIX | _VERSION_ZIP64, version, record.flags, record.method,
                clock, date, record.crc, compressed, size, len(name), len(extra), 0, 0, 0, external, offset,
            )
            yield self._emit(header + name + extra)
        cd_size = self.position - cd_offset
        count = len(records)
        if self._needs_eocd64(count, cd_offset, cd_size):
            eocd64_offset = self.position
            yield self._emit(
                _EOCD64.pack(
                    _SIG_EOCD64, _EOCD64.size - 12, _MADE_BY_UNIX | _VERSION_ZIP64, _VERSION_ZIP64,
                    0, 0, count, count, cd_size, cd_offset,
                )
            )
            yield self._emit(_EOCD64_LOCATOR.pack(_SIG_EOCD64_LOCATOR, 0, eocd64_offset, 1))
        count16 = LIMIT16 if count >= COUNT64_AT else count
        size32 = LIMIT32 if cd_size >= ZIP64_AT else cd_size
        offset32 = LIMIT32 if cd_offset >= ZIP64_AT else cd_offset
        yield self._emit(_EOCD.pack(_SIG_EOCD, 0, 0, count16, count16, size32, offset32, 0))


# -- listing what to archive -------------------------------------------------


def _entry_for(path: str, arcname: str, st: os.stat_result) -> ZipEntry | None:
    if stat.S_ISDIR(st.st_mode):
        return ZipEntry(arcname.rstrip("/") + "/", "dir", 0, st.st_mtime, st.st_mode)
    if stat.S_ISREG(st.st_mode):
        return ZipEntry(arcname, "file", st.st_size, st.st_mtime, st.st_mode, source=path)
    if stat.S_ISLNK(st.st_mode):
        target = os.fsencode(os.readlink(path))
        return ZipEntry(arcname, "symlink", len(target), st.st_mtime, st.st_mode, link_target=target)
    return None  # FIFOs, sockets, devices: never archived


def collect_entries(path: str, arcname: str = "") -> list[ZipEntry]:
    """List ``path`` (a real path) and, for a directory, everything under it,
    without following any symlink: links become symlink entries, special
    files are skipped.  ``arcname`` is the name ``path`` gets ("" for a
    directory whose contents go at the top of the archive).  Blocking."""
    entries: list[ZipEntry] = []
    st = os.lstat(path)
    top = _entry_for(path, arcname, st)
    if top is None:
        return entries
    if top.kind != "dir":
        if arcname:
            entries.append(top)
        return entries
    if arcname:
        entries.append(top)
    prefix = arcname.rstrip("/") + "/" if arcname else ""
    stack = [(path, prefix)]
    while stack:
        directory, base = stack.pop()
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
        subdirs = []
        for child in children:
            try:
                cst = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we listed
            entry = _entry_for(child.path, base + child.name, cst)
            if entry is None:
                continue
            entries.append(entry)
            if entry.kind == "dir":
                subdirs.append((child.path, base + child.name + "/"))
        stack.extend(reversed(subdirs))
    return entries
