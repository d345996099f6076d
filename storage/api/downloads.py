"""Downloads: ``GET``/``HEAD /download`` and ``/download-archive``.

``/download?token=…[&dst_dir=…][&archive=true][&no_cache=true]`` serves one
file of a vfolder (Range, conditional requests, ``Content-Disposition`` as
upstream) or, with ``archive=true``, a directory as a zip.
``/download-archive?token=…`` zips the files and directories an archive
token lists.

Where the bytes go: a file body on a plain TCP connection is sent with
``sendfile`` from the pool (``storage.web.producers.SendfileProducer``);
over TLS or in-memory test transports, by ``pread`` chunks through
twisted.web.  Zip archives are built while they stream
(``storage.zipstream``), reading files in the pool.

Every file is opened without following a final symlink and then checked,
through ``/proc/self/fd``, to be inside the vfolder: a path swapped for a
symlink after it was resolved is refused.
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
import urllib.parse
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path, PurePosixPath
from typing import Any

from twisted.logger import Logger

from storage.api import params
from storage.api.ranges import (
    UNSATISFIABLE,
    ByteRange,
    Validators,
    check_preconditions,
    if_range_allows,
    make_etag,
    parse_range,
    select_range,
)
from storage.errors import (
    FileNotFound,
    InvalidAPIParameters,
    InvalidPath,
    StorageError,
    VFolderNotFound,
)
from storage.paths import is_inside, validate_relpath
from storage.tokens import verify_archive_token, verify_download_token
from storage.web.producers import ChunkProducer, FileRangeReader, SendfileProducer, sendfile_socket
from storage.zipstream import ZipEntry, ZipWriter, collect_entries

log = Logger()

DEFAULT_ARCHIVE_NAME = "archive.zip"
_CONDITIONAL_HEADERS = ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class PreconditionFailed(StorageError):
    status = 412
    problem = "precondition-failed"
    title = "Precondition Failed"
    error_code = "storage-proxy_read_mismatch"


class RangeNotSatisfiable(StorageError):
    status = 416
    problem = "range-not-satisfiable"
    title = "Range Not Satisfiable"
    error_code = "storage-proxy_read_invalid-parameters"


class NotARegularFile(InvalidAPIParameters):
    """A directory asked for without ``archive=true`` (upstream: 400)."""


# -- query parameters --------------------------------------------------------


def _query(request: Any, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidAPIParameters.field(name, "not valid UTF-8") from None


def _query_bool(request: Any, name: str) -> bool:
    """The manager API's boolean words (``params.boolean``, also what the OpenAPI document says)."""
    value = _query(request, name)
    if value is None or not value.strip(params.BLANKS):
        return False  # ?archive= is no
    try:
        return params.boolean(value)
    except params.ParamError:
        raise InvalidAPIParameters.field(name, f"expected a boolean, got {value!r}") from None


# -- response headers -----------------------------------------------------------


def content_disposition(filename: str) -> str:
    """``attachment;filename="<ascii>"; filename*=UTF-8''<percent-encoded>`` as upstream
    (which drops non-ASCII characters from the plain name and escapes quotes);
    control characters are dropped too, so a name cannot break the header."""
    plain = "".join(c for c in filename if c.isascii() and unicodedata.category(c) != "Cc")
    plain = plain.replace('"', '\\"')
    encoded = urllib.parse.quote(filename, encoding="utf-8", errors="surrogateescape")
    return f"attachment;filename=\"{plain}\"; filename*=UTF-8''{encoded}"


def _set_headers(request: Any, headers: dict[str, str]) -> None:
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value.encode("latin-1", "replace"))


# -- opening files inside a vfolder ----------------------------------------------


@dataclass
class Opened:
    fd: int
    st: os.stat_result
    path: str  # the real path


def open_confined(path: str, root: str) -> Opened:
    """Open ``path`` (already resolved inside ``root``) without following a
    final symlink or blocking on a FIFO, and check where the descriptor
    really points.  Blocking: run it in the pool."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise FileNotFound(f"no such file: {os.path.basename(path)}") from None
        raise
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if not is_inside(root, real):
            raise InvalidPath("the path leads outside the vfolder")
        return Opened(fd, os.fstat(fd), real)
    except BaseException:
        os.close(fd)
        raise


def _confined_opener(root: str) -> Any:
    def open_entry(entry: ZipEntry) -> int:
        return open_confined(entry.source or "", root).fd

    return open_entry


def _vfolder_root(volume: Any, vfid: Any) -> str:
    path = volume.vfolder_path(vfid)
    if not os.path.isdir(path):
        raise VFolderNotFound(f"no such vfolder: {vfid}")
    return os.path.realpath(path)


# -- the routes ------------------------------------------------------------------


class Downloads:
    def __init__(self, config: Any, volumes: Any, pool: Any, reactor: Any) -> None:
        self.config = config
        self.volumes = volumes
        self.pool = pool
        self.reactor = reactor

    async def download(self, request: Any) -> bytes | None:
        token = verify_download_token(_query(request, "token"), self.config.secret)
        dst_dir = _query(request, "dst_dir")
        archive = _query_bool(request, "archive") or token.archive
        no_cache = _query_bool(request, "no_cache")
        if token.unmanaged_path is not None:
            raise InvalidAPIParameters("unmanaged_path downloads are not supported by this proxy")
        volume = self.volumes.get(token.volume)
        request.storage_volume = volume.name
        relpath = token.relpath if dst_dir is None else f"{dst_dir}/{token.relpath}"
        # As upstream, a path that is missing, leaves the vfolder or names no
        # vfolder is 404 file-not-found.
        try:
            validate_relpath(relpath)
            root = await self.pool.run(_vfolder_root, volume, token.vfid)
            real = await volume.resolve(token.vfid, relpath)
            opened = await self.pool.run(open_confined, str(real), root)
        except (InvalidPath, VFolderNotFound):
            raise FileNotFound("file not found") from None
        name = PurePosixPath(relpath).name or Path(opened.path).name
        if stat.S_ISDIR(opened.st.st_mode):
            os.close(opened.fd)
            if not archive:
                raise NotARegularFile("The file is not a regular file.")
            entries = await self.pool.run(collect_entries, opened.path, "")
            return await self._send_zip(request, entries, root, f"{name}.zip", no_cache)
        if not stat.S_ISREG(opened.st.st_mode):
            os.close(opened.fd)
            raise NotARegularFile("The file is not a regular file.")
        return await self._send_file(request, opened, name, no_cache)

    async def download_archive(self, request: Any) -> bytes | None:
        token = verify_archive_token(_query(request, "token"), self.config.secret)
        volume = self.volumes.get(token.volume)
        request.storage_volume = volume.name
        root = await self.pool.run(_vfolder_root, volume, token.vfid)
        entries: list[ZipEntry] = []
        seen: set[str] = set()
        for relpath in token.files:
            # As upstream: a path leaving the vfolder is 400, a missing one 404.
            try:
                rel = validate_relpath(relpath, "files")
                real = await volume.resolve(token.vfid, str(rel))
            except InvalidPath as exc:
                raise InvalidAPIParameters(f"Path escapes vfolder boundary: {relpath}") from exc
            arcname = "" if str(rel) == "." else str(rel)
            found = await self.pool.run(_collect_listed, str(real), arcname)
            if found is None:
                raise FileNotFound(f"File not found: {relpath}")
            for entry in found:
                if entry.arcname not in seen:
                    seen.add(entry.arcname)
                    entries.append(entry)
        return await self._send_zip(request, entries, root, token.filename or DEFAULT_ARCHIVE_NAME, False)

    # -- bodies ----------------------------------------------------------------

    async def _send_file(self, request: Any, opened: Opened, name: str, no_cache: bool) -> bytes | None:
        try:
            plan = plan_file_response(request, opened.st)
        except BaseException:
            os.close(opened.fd)
            raise
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Disposition": content_disposition(name),
            "Accept-Ranges": "bytes",
            "ETag": plan.validators.etag,
            "Last-Modified": formatdate(plan.validators.mtime, usegmt=True),
        }
        if no_cache:
            headers["Cache-Control"] = "no-store"
        request.setResponseCode(plan.status)
        if plan.status == 304:
            os.close(opened.fd)
            for dropped in ("Content-Type", "Content-Disposition", "Accept-Ranges"):
                headers.pop(dropped)
            _set_headers(request, headers)
            return b""
        headers["Content-Length"] = str(plan.count)
        if plan.status == 206:
            headers["Content-Range"] = plan.content_range
        _set_headers(request, headers)
        if request.method == b"HEAD" or plan.count == 0:
            os.close(opened.fd)
            return b""
        await self._send_body(request, opened.fd, plan.offset, plan.count)
        return None

    async def _send_body(self, request: Any, fd: int, offset: int, count: int) -> None:
        if sendfile_socket(request) is not None:
            await SendfileProducer(request, fd, offset, count, self.pool, self.reactor).start()
            return
        reader = FileRangeReader(fd, offset, count)
        await ChunkProducer(request, reader, self.pool, close=reader.close, kind="pread",
                            reactor=self.reactor).start()

    async def _send_zip(
        self, request: Any, entries: list[ZipEntry], root: str, filename: str, no_cache: bool
    ) -> bytes | None:
        writer = ZipWriter(entries, open_file=_confined_opener(root))
        headers = {"Content-Type": "application/zip", "Content-Disposition": content_disposition(filename)}
        length = writer.content_length()
        if length is not None:
            headers["Content-Length"] = str(length)
        if no_cache:
            headers["Cache-Control"] = "no-store"
        _set_headers(request, headers)
        if request.method == b"HEAD":
            return b""
        chunks = writer.chunks()
        await ChunkProducer(request, lambda: next(chunks, b""), self.pool, close=chunks.close, kind="zip",
                            reactor=self.reactor).start()
        return None


def _collect_listed(path: str, arcname: str) -> list[ZipEntry] | None:
    try:
        return collect_entries(path, arcname)
    except FileNotFoundError:
        return None


@dataclass
class FilePlan:
    status: int
    offset: int
    count: int
    validators: Validators
    content_range: str = ""


def plan_file_response(request: Any, st: os.stat_result) -> FilePlan:
    """Status and byte range for a file, from its stat and the request's
    conditional and Range headers; raises 412/416 problems."""
    size = st.st_size
    validators = Validators(make_etag(st.st_mtime_ns, size), int(st.st_mtime))
    method = request.method.decode("latin-1")
    conditional = {}
    for name in _CONDITIONAL_HEADERS:
        value = request.getHeader(name.encode())
        if value is not None:
            conditional[name] = value.decode("latin-1")
    verdict = check_preconditions(method, conditional, validators)
    if verdict == 412:
        raise PreconditionFailed("a precondition of the request does not hold")
    if verdict == 304:
        return FilePlan(304, 0, 0, validators)
    selected: ByteRange | object | None = None
    range_header = request.getHeader(b"range")
    if range_header is not None:
        if_range = request.getHeader(b"if-range")
        if if_range_allows(if_range.decode("latin-1") if if_range is not None else None, validators):
            selected = select_range(parse_range(range_header), size)
    if selected is UNSATISFIABLE:
        request.setHeader(b"Content-Range", f"bytes */{size}".encode())
        raise RangeNotSatisfiable(f"no requested range overlaps the {size}-byte file")
    if isinstance(selected, ByteRange):
        return FilePlan(206, selected.start, selected.length, validators, selected.content_range(size))
    return FilePlan(200, 0, size, validators)
