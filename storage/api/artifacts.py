"""The ``/v1`` artifact-storage routes of the manager API (upstream 26.9.6's paths).

``/v1/storages/vfs/<storage>/...``: ``GET files``, ``GET meta``,
``POST upload`` (multipart/form-data, streamed), ``POST download``
(streamed), ``DELETE`` (the storage path itself, JSON body).  JSON bodies
carry the parameters, as upstream; an upload's ``filepath`` comes from the
query string or a form field before the file part (upstream's handler would
read both a JSON body and a multipart body from one request, which no
client can send).

Upload bodies never pass through twisted.web's buffer: ``UploadBodies``
is the manager site's body handler and streams them through
``MultipartTarget`` into the storage as they arrive.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from storage.api import params as p
from storage.api.manager import ManagerAPI, api_route
from storage.api.openapi import BINARY, NO_CONTENT, Response, returns
from storage.api.params import Field
from storage.api.problems import json_body
from storage.artifacts.errors import UnsupportedMediaType
from storage.artifacts.multipart import MultipartParser, boundary_of
from storage.artifacts.vfs import validate_filepath
from storage.auth import check_manager_token
from storage.errors import InvalidAPIParameters, StorageError
from storage.web.producers import ChunkProducer, FileRangeReader
from storage.web.streaming import UploadSink

log = Logger()

VFS = "/v1/storages/vfs"
UPLOAD_PATHS = (
    ("vfs", re.compile(rb"^/v1/storages/vfs/([^/]+)/upload$")),
    ("s3", re.compile(rb"^/v1/storages/s3/([^/]+)/buckets/([^/]+)/object/upload$")),
)


_STORAGE_PATH = {"type": "string",
                 "description": "a path inside the artifact storage (no '..', not absolute; '' is its root)"}


@p.with_schema(_STORAGE_PATH)
def _filepath(value: Any) -> str:
    try:
        return validate_filepath(value, "filepath")
    except StorageError as exc:
        raise p.ParamError(str(exc.msg or exc).split(": ", 1)[-1]) from None


@p.with_schema(_STORAGE_PATH)
def _directory(value: Any) -> str:
    try:
        return validate_filepath(value, "directory")
    except StorageError as exc:
        raise p.ParamError(str(exc.msg or exc).split(": ", 1)[-1]) from None


def query_value(request: Any, name: str) -> str | None:
    values = (getattr(request, "args", None) or {}).get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidAPIParameters.field(name, "not valid UTF-8") from None


# -- streaming a multipart body into a storage --------------------------------------


class MultipartTarget:
    """The ``UploadTarget`` of an upload body: parses multipart in the pool and
    writes the file part to the sink ``open_file(fields, content_type)`` returns
    (an object with blocking ``write(bytes)``, ``finish()`` and ``abort()``)."""

    def __init__(self, pool: Any, boundary: str, open_file: Callable[[dict[str, str], str], Any]) -> None:
        self.pool = pool
        self.open_file = open_file
        self.file: Any = None
        self.parser = MultipartParser(boundary, self._file_start, self._file_data)

    def _file_start(self, fields: dict[str, str], content_type: str) -> None:
        self.file = self.open_file(fields, content_type)

    def _file_data(self, data: bytes) -> None:
        self.file.write(data)

    def _feed(self, buffers: list[bytes]) -> int:
        n = 0
        for data in buffers:
            self.parser.feed(data)
            n += len(data)
        return n

    def write(self, buffers: list[bytes]) -> Deferred[int]:
        return self.pool.run(self._feed, buffers)

    def finish_blocking(self) -> Any:
        """The body ended: the upload is complete only if the multipart body was."""
        if self.file is None:
            raise InvalidAPIParameters('no file part found (expected a part with a filename, e.g. "file")')
        if not self.parser.file_done:
            raise InvalidAPIParameters("malformed multipart body: it ended inside the file part")
        return self.file.finish()

    def abort_blocking(self) -> None:
        if self.file is not None:
            self.file.abort()


class UploadBodies:
    """The manager site's body handler: streams upload bodies, leaves the rest to twisted.web."""

    def __init__(self, api: ManagerAPI) -> None:
        self.api = api

    def __call__(self, request: Any, length: int | None) -> Any:
        if request.method != b"POST":
            return None
        kind, m = _upload_route(request.path)
        if m is None:
            return None
        try:
            check_manager_token(request, self.api.config.manager.secret)
            names = [unquote(g.decode("utf-8")) for g in m.groups()]
            args = _parse_query(request)
            boundary = boundary_of((request.getHeader(b"Content-Type") or b"").decode("latin-1"))
            if boundary is None:
                raise UnsupportedMediaType("multipart/form-data required")
            open_file = self._opener(kind, names, args, request)
        except StorageError as exc:
            request.refuse(exc)
            return None
        target = MultipartTarget(self.api.pool, boundary, open_file)
        sink = UploadSink(request.channel, succeed(target), expected=length, request=request)
        outcome = sink.done.addCallbacks(
            lambda _: self.api.pool.run(target.finish_blocking) if sink.complete else _left(target, self.api.pool),
            lambda failure: self.api.pool.run(target.abort_blocking).addBoth(lambda _: failure),
        )
        # Nobody awaits the outcome when the client left before the end.
        request.notifyFinish().addErrback(lambda _: outcome.addErrback(lambda _: None))
        request.body_context = outcome
        return sink

    def _opener(self, kind: str, names: list[str], args: dict[str, str], request: Any) -> Callable[..., Any]:
        artifacts = self.api.artifacts
        if kind == "vfs":
            storage = artifacts.get_vfs(names[0])
            query_path = args.get("filepath")
            if query_path is not None:
                validate_filepath(query_path)

            def open_vfs(fields: dict[str, str], content_type: str) -> Any:
                filepath = query_path if query_path is not None else fields.get("filepath")
                if filepath is None:
                    raise InvalidAPIParameters.field("filepath", "required (in the query or a form field before the file)")
                validate_filepath(filepath)
                return storage.start_upload(filepath)

            return open_vfs
        s3 = artifacts.get_s3(names[0])
        bucket = names[1]
        s3.check_bucket(bucket)
        query_key = args.get("key")
        header_type = request.getHeader(b"X-Content-Type")

        def open_s3(fields: dict[str, str], content_type: str) -> Any:
            key = query_key if query_key is not None else fields.get("key")
            if not key:
                raise InvalidAPIParameters.field("key", "required (in the query or a form field before the file)")
            ctype = header_type.decode("latin-1") if header_type else fields.get("content_type")
            return s3.start_upload(bucket, key, ctype or None)

        return open_s3


def _upload_route(path: bytes) -> tuple[str, Any]:
    for kind, pattern in UPLOAD_PATHS:
        m = pattern.match(path)
        if m:
            return kind, m
    return "", None


def _left(target: MultipartTarget, pool: Any) -> Deferred[None]:
    """The client left before the end: throw the partial file away."""
    return pool.run(target.abort_blocking).addCallback(
        lambda _: Failure(InvalidAPIParameters("the body ended early"))
    )


def _parse_query(request: Any) -> dict[str, str]:
    uri = request.uri
    query = uri.split(b"?", 1)[1] if b"?" in uri else b""
    from urllib.parse import parse_qs

    try:
        parsed = parse_qs(query.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise InvalidAPIParameters("the query string is not valid UTF-8") from None
    return {k: v[0] for k, v in parsed.items()}


async def await_upload(request: Any) -> Any:
    outcome = getattr(request, "body_context", None)
    if outcome is None:
        # Not streamed (an empty body, or a harness without our Site).
        raise UnsupportedMediaType("multipart/form-data required")
    return await outcome


# -- the VFS routes --------------------------------------------------------------------

FILEPATH = {"type": "object", "required": ["filepath"], "properties": {"filepath": {"type": "string"}}}
FILES = {"type": "object", "required": ["files"], "properties": {"files": {"type": "array"}}}
# The file is the first part with a filename, whatever its name; filepath (or key) a form
# field before it or the query parameter; other parts are ignored.
MULTIPART = {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"filepath": {"type": "string"}, "file": {"type": "string", "format": "binary"}},
    "description": "the file is the first part with a filename; filepath (or key) a field before it or in the query"}}}


@api_route(VFS + "/<storage_name>/files", "GET", name=VFS + "/<storage_name>/files",
           body=(Field("directory", _directory),), allow_extra=True, responses={200: returns(FILES)}, errors=(404,),
           summary="list a directory of a VFS artifact storage")
async def vfs_list_files(self: ManagerAPI, request: Any, storage_name: str) -> bytes:
    args = self._params(request)
    storage = self.artifacts.get_vfs(storage_name)

    def listing() -> bytes:
        return json.dumps({"files": storage.list_files(args["directory"])}).encode("utf-8")

    body = await self.pool.run(listing)
    request.setHeader(b"Content-Type", b"application/json")
    return body


@api_route(VFS + "/<storage_name>/meta", "GET", name=VFS + "/<storage_name>/meta",
           body=(Field("filepath", _filepath),), allow_extra=True, errors=(404,), summary="a file's metadata")
async def vfs_get_file_meta(self: ManagerAPI, request: Any, storage_name: str) -> bytes:
    args = self._params(request)
    storage = self.artifacts.get_vfs(storage_name)
    return json_body(request, await self.pool.run(storage.meta, args["filepath"]))


@api_route(VFS + "/<storage_name>", "DELETE", name=VFS + "/<storage_name>",
           body=(Field("filepath", _filepath),), allow_extra=True, responses={200: returns(FILEPATH)}, errors=(404,),
           summary="delete a file or directory")
async def vfs_delete_file(self: ManagerAPI, request: Any, storage_name: str) -> bytes:
    args = self._params(request)
    storage = self.artifacts.get_vfs(storage_name)
    await self.pool.run(storage.delete, args["filepath"])
    return json_body(request, {"filepath": args["filepath"]})


@api_route(VFS + "/<storage_name>/upload", "POST", name=VFS + "/<storage_name>/upload",
           request_content=MULTIPART, query=("filepath",), responses={201: returns(FILEPATH, "stored")}, errors=(404, 409, 415, 507),
           summary="upload one file (multipart/form-data, streamed)")
async def vfs_upload_file(self: ManagerAPI, request: Any, storage_name: str) -> bytes:
    self.artifacts.get_vfs(storage_name)
    filepath = await await_upload(request)
    return json_body(request, {"filepath": filepath}, 201)


@api_route(VFS + "/<storage_name>/download", "POST", name=VFS + "/<storage_name>/download",
           body=(Field("filepath", _filepath),), allow_extra=True, errors=(404, 412, 416),
           responses={200: Response("the file (its type guessed from its name), or a directory as a tar stream",
                                    BINARY, "application/octet-stream", also=("application/x-tar", "*/*"),
                                    headers=("Accept-Ranges", "ETag", "Last-Modified")),
                      206: Response("ours: a file's range (Range, If-Range: a reservoir import resuming it)",
                                    BINARY, "application/octet-stream", also=("*/*",),
                                    headers=("Accept-Ranges", "ETag", "Last-Modified", "Content-Range"))},
           summary="download a file (a directory as tar)")
async def vfs_download_file(self: ManagerAPI, request: Any, storage_name: str) -> bytes:
    args = self._params(request)
    storage = self.artifacts.get_vfs(storage_name)
    content_type, length, source = await self.pool.run(storage.open_download, args["filepath"])
    if isinstance(source, int):
        # Ours: a file honours Range / If-Range (and sends its ETag and Last-Modified), so a
        # reservoir import from this storage resumes a file where it was cut off.
        import os

        from storage.api.downloads import plan_file_response

        try:
            plan = plan_file_response(request, await self.pool.run(os.fstat, source))
        except BaseException:
            os.close(source)
            raise
        request.setResponseCode(plan.status if plan.status in (200, 206) else 200)
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        request.setHeader(b"ETag", plan.validators.etag.encode())
        request.setHeader(b"Last-Modified", _http_date(plan.validators.mtime))
        request.setHeader(b"Accept-Ranges", b"bytes")
        offset, count = (plan.offset, plan.count) if plan.status == 206 else (0, length or 0)
        if plan.status == 206:
            request.setHeader(b"Content-Range", plan.content_range.encode())
        request.setHeader(b"Content-Length", str(count).encode())
        reader = FileRangeReader(source, offset, count, max(storage.config.download_chunk_size, 1 << 18))
        await ChunkProducer(request, reader, self.pool, close=reader.close, kind="pread",
                            reactor=self.reactor).start()
    else:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        await ChunkProducer(request, lambda: next(source, b""), self.pool, close=source.close, kind="tar",
                            reactor=self.reactor).start()
    return b""


def _http_date(seconds: int) -> bytes:
    from email.utils import formatdate

    return formatdate(seconds, usegmt=True).encode()


# -- the object-storage routes -------------------------------------------------------

S3 = "/v1/storages/s3/<storage_name>/buckets/<bucket_name>/object"


@p.with_schema({"type": "string", "minLength": 1, "description": "an object key"})
def _key(value: Any) -> str:
    from storage.artifacts.s3 import validate_key

    try:
        return validate_key(value)
    except StorageError as exc:
        raise p.ParamError(str(exc.msg or exc).split(": ", 1)[-1]) from None


@p.with_schema({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}, {"type": "null"}],
                "description": "seconds the URL is valid"})
def _expiration(value: Any) -> int | None:
    from storage.artifacts.s3 import MAX_PRESIGN_EXPIRY

    if value is None:
        return None
    number = p.integer(value)
    if not 1 <= number <= MAX_PRESIGN_EXPIRY:
        raise p.ParamError(f"must be between 1 and {MAX_PRESIGN_EXPIRY} seconds")
    return number


KEY = (Field("key", _key),)
S3_ERRORS = (404, 502)


def _s3(self: ManagerAPI, request: Any, storage_name: str, bucket_name: str) -> tuple[Any, dict[str, Any]]:
    args = self._params(request)
    storage = self.artifacts.get_s3(storage_name)
    storage.check_bucket(bucket_name)
    return storage, args


@api_route(S3 + "/meta", "GET", name=S3 + "/meta", body=KEY, allow_extra=True, errors=S3_ERRORS,
           summary="an object's metadata")
async def s3_get_object_meta(self: ManagerAPI, request: Any, storage_name: str, bucket_name: str) -> bytes:
    storage, args = _s3(self, request, storage_name, bucket_name)
    return json_body(request, await self.pool.run(storage.meta, bucket_name, args["key"]))


@api_route(S3, "DELETE", name=S3, body=KEY, allow_extra=True, responses={204: NO_CONTENT}, errors=S3_ERRORS,
           summary="delete an object")
async def s3_delete_object(self: ManagerAPI, request: Any, storage_name: str, bucket_name: str) -> bytes:
    storage, args = _s3(self, request, storage_name, bucket_name)
    await self.pool.run(storage.delete, bucket_name, args["key"])
    return self._no_content(request)


@api_route(S3 + "/upload", "POST", name=S3 + "/upload", request_content=MULTIPART, query=("key",),
           responses={204: NO_CONTENT},
           errors=(*S3_ERRORS, 415), summary="upload an object (multipart/form-data, streamed)")
async def s3_upload_object(self: ManagerAPI, request: Any, storage_name: str, bucket_name: str) -> bytes:
    self.artifacts.get_s3(storage_name).check_bucket(bucket_name)
    await await_upload(request)
    return self._no_content(request)


@api_route(S3 + "/download", "POST", name=S3 + "/download", body=KEY, allow_extra=True, errors=S3_ERRORS,
           responses={200: Response("the object", BINARY, "application/octet-stream")}, summary="download an object")
async def s3_download_object(self: ManagerAPI, request: Any, storage_name: str, bucket_name: str) -> bytes:
    storage, args = _s3(self, request, storage_name, bucket_name)
    length, body = await self.pool.run(storage.open_download, bucket_name, args["key"])
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", b"application/octet-stream")
    if length is not None:
        request.setHeader(b"Content-Length", str(length).encode())
    chunk = max(storage.config.download_chunk_size, 1 << 18)
    await ChunkProducer(request, lambda: body.read(chunk), self.pool, close=body.close, kind="s3",
                        reactor=self.reactor).start()
    return b""


@api_route(S3 + "/presigned/upload", "POST", name=S3 + "/presigned/upload", body=KEY, allow_extra=True,
           errors=S3_ERRORS, summary="a presigned POST for an object")
async def s3_presigned_upload(self: ManagerAPI, request: Any, storage_name: str, bucket_name: str) -> bytes:
    storage, args = _s3(self, request, storage_name, bucket_name)
    return json_body(request, await self.pool.run(storage.presigned_upload, bucket_name, args["key"]))


@api_route(S3 + "/presigned/download", "POST", name=S3 + "/presigned/download",
           body=(*KEY, Field("expiration", _expiration, None)), allow_extra=True, errors=S3_ERRORS,
           summary="a presigned GET URL for an object")
async def s3_presigned_download(self: ManagerAPI, request: Any, storage_name: str, bucket_name: str) -> bytes:
    storage, args = _s3(self, request, storage_name, bucket_name)
    return json_body(request, await self.pool.run(storage.presigned_download, bucket_name, args["key"],
                                                  args["expiration"]))
