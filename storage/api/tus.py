"""tus 1.0.0 resumable uploads at ``/upload?token=…``.

The upload JWT (issued by the manager API's ``POST /folder/file/upload``,
which also prepares the upload with ``storage.uploads.prepare_upload``)
names the volume, vfolder, relpath, size and session.  Extensions offered:
``creation``, ``termination``, ``checksum``, ``expiration`` and
``concatenation`` (partial uploads at ``/upload/<id>?token=…`` under the
same token).

PATCH bodies never reach twisted.web's buffering: ``stream_patch`` is the
site's body handler.  Once a PATCH's headers are in it checks them and the
token on the reactor, then locks the upload and checks the offset in the
pool while the socket stays paused; the body then streams into the staging
file through an ``UploadSink``.  The Klein route only waits for the outcome
and answers.  See docs/uploads.md.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from storage import fastio
from storage.blocking import BlockingPool
from storage.errors import (
    InsufficientStorage,
    InvalidAPIParameters,
    InvalidToken,
    RequestTooLarge,
    StorageError,
    out_of_descriptors,
)
from storage.janitor import UploadJanitor
from storage.paths import validate_relpath
from storage.quota import ScopeWriter
from storage.tokens import UploadToken, verify_upload_token
from storage.uploads import (
    FINAL,
    NORMAL,
    PARTIAL,
    OffsetMismatch,
    Received,
    StopSignal,
    UploadBusy,
    UploadCompleted,
    UploadNotFound,
    UploadState,
    UploadWriter,
    complete_if_full,
    complete_upload,
    completed_at_target,
    completion_records_dir,
    concatenate_parts,
    create_upload,
    is_session_id,
    new_session_id,
    open_writer,
    read_state,
    remove_upload,
    staging_path,
    upload_status,
)
from storage.web.site import UPLOAD_READ_SIZE, StorageSite
from storage.web.streaming import StreamingRequest, UploadSink, keep_body_buffers_in_the_heap

log = Logger()

TUS_VERSION = "1.0.0"
EXTENSIONS = ("creation", "termination", "checksum", "expiration", "concatenation")
CHECKSUMS = {"md5": hashlib.md5, "sha1": hashlib.sha1, "sha256": hashlib.sha256}
OFFSET_OCTET_STREAM = b"application/offset+octet-stream"
# With more PATCH bodies than this streaming at once, leave write-back to the kernel.
EARLY_WRITEBACK_MAX_PATCHES = 4
# How long a HEAD or PATCH waits for an earlier PATCH it stopped to record its bytes.
SUPERSEDE_WAIT = 1.0
# How much longer it waits once that PATCH has stopped receiving and only
# records its bytes (an fdatasync: bounded work, slow on a network filesystem).
# Answering before would report an offset about to be overtaken: a resume
# from it would be refused with 409.
RECORD_WAIT = 10.0
ALLOW_METHODS = "OPTIONS, HEAD, PATCH, POST, DELETE"


# -- errors with tus meaning ------------------------------------------------------


class TusError(StorageError):
    headers: dict[str, str] = {}
    error_code = "storage-proxy_request_bad-request"


class UnsupportedVersion(TusError):
    status = 412
    problem = "tus-unsupported-version"
    title = "Tus-Resumable is missing or names a version this server does not speak"
    headers = {"Tus-Version": TUS_VERSION}


class WrongContentType(TusError):
    status = 415
    problem = "tus-unsupported-media-type"
    title = "A PATCH body must be application/offset+octet-stream"


class ChecksumMismatch(TusError):
    status = 460
    problem = "tus-checksum-mismatch"
    title = "Checksum Mismatch"
    error_code = "storage-proxy_update_mismatch"


class UnknownChecksum(TusError):
    status = 400
    problem = "tus-checksum-algorithm-unsupported"
    title = "Unsupported checksum algorithm"
    error_code = "storage-proxy_request_invalid-parameters"


class UploadTooLong(TusError):
    status = 413
    problem = "tus-upload-length-exceeded"
    title = "The body goes past Upload-Length"
    error_code = "storage-proxy_update_invalid-parameters"


class ConcatForbidden(TusError):
    status = 403
    problem = "tus-concat-final-patch"
    title = "A final upload cannot be patched"
    error_code = "storage-proxy_update_forbidden"


class MethodNotAllowed(TusError):
    status = 405
    problem = "method-not-allowed"
    title = "Method Not Allowed"
    headers = {"Allow": ALLOW_METHODS}


# -- request parsing (pure, on the reactor) --------------------------------------------


def query(request: Any) -> dict[bytes, list[bytes]]:
    """The query arguments as bytes; works before twisted.web parses them (in ``gotLength``).

    Through latin-1, which maps every byte to itself: ``parse_qs`` on bytes
    re-encodes what it unquoted as ASCII and raised on any %XX above %7F (a
    500, or a dropped connection when the body handler asked first).
    """
    _, _, qs = request.uri.partition(b"?")
    parsed = parse_qs(qs.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return {key.encode("latin-1"): [v.encode("latin-1") for v in values] for key, values in parsed.items()}


def query_arg(request: Any, name: bytes) -> str | None:
    values = query(request).get(name)
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidAPIParameters.field(name.decode(), "not valid UTF-8") from None


def header(request: Any, name: bytes) -> str | None:
    value = request.requestHeaders.getRawHeaders(name)
    if not value:
        return None
    return value[0].decode("latin-1").strip()


def effective_method(request: Any) -> bytes:
    override = request.requestHeaders.getRawHeaders(b"X-HTTP-Method-Override")
    if override:
        return override[0].strip().upper()
    return request.method.upper()


def upload_rest(path: bytes) -> str | None:
    """``""`` for ``/upload``, the id for ``/upload/<id>``, None for other paths."""
    if path in (b"/upload", b"/upload/"):
        return ""
    if path.startswith(b"/upload/"):
        return path[len(b"/upload/"):].decode("latin-1").strip("/")
    return None


def parse_offset(value: str | None, name: str = "Upload-Offset") -> int:
    if value is None:
        raise InvalidAPIParameters.field(name, "required")
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise InvalidAPIParameters.field(name, f"expected a non-negative integer, got {value!r}")
    return int(value)


def parse_checksum(value: str | None) -> tuple[str, bytes] | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``."""
    if value is None:
        return None
    algorithm, _, encoded = value.partition(" ")
    algorithm = algorithm.strip().lower()
    if algorithm not in CHECKSUMS:
        raise UnknownChecksum(f"supported: {', '.join(sorted(CHECKSUMS))}; got {algorithm!r}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidAPIParameters.field("Upload-Checksum", "the digest is not base64") from None
    if len(digest) != CHECKSUMS[algorithm]().digest_size:
        raise InvalidAPIParameters.field("Upload-Checksum", f"not a {algorithm} digest")
    return algorithm, digest


def parse_concat_final(value: str) -> list[str]:
    """The partial upload ids named by ``Upload-Concat: final;<url> <url>``."""
    urls = value[len("final;"):].split()
    if not urls:
        raise InvalidAPIParameters.field("Upload-Concat", "final needs the partial upload URLs")
    ids = []
    for url in urls:
        rest = upload_rest(urlsplit(url).path.encode("latin-1", "replace").rstrip(b"/"))
        if not rest:
            # A path prefix added by a reverse proxy: take the last segment.
            rest = urlsplit(url).path.rstrip("/").rpartition("/")[2]
        if not is_session_id(rest):
            raise InvalidAPIParameters.field("Upload-Concat", f"not a partial upload URL of this server: {url!r}")
        ids.append(rest)
    return ids


def check_tus_resumable(request: Any) -> None:
    if header(request, b"Tus-Resumable") != TUS_VERSION:
        raise UnsupportedVersion(f"send Tus-Resumable: {TUS_VERSION}")


# -- the upload a request addresses --------------------------------------------------------


@dataclass(frozen=True)
class UploadRef:
    token: UploadToken
    raw_token: str
    vfolder: Path
    session: str  # the token's session, or a partial upload's id
    partial: bool
    dst_dir: str | None
    # The volume's completion records (uploads.completion_records_dir).
    records: Path | None = None

    def location(self, session: str | None = None) -> str:
        """A URL reference, relative to ``/upload``, that names an upload under this token."""
        path = f"upload/{session}" if session else "upload"
        url = f"{path}?token={self.raw_token}"
        if self.dst_dir:
            url += "&dst_dir=" + quote(self.dst_dir, safe="")
        return url


def body_lane_width(io_threads: int) -> int:
    """How many pool threads PATCH bodies may use at once: a quarter of them
    (4 of the default 16), the rest stay free for every other request
    (see storage.blocking.Lane)."""
    return max(2, io_threads // 4)


class TusUploads:
    def __init__(self, config: Any, volumes: Any, pool: Any, reactor: Any) -> None:
        self.config = config
        self.volumes = volumes
        self.pool = pool
        self.reactor = reactor
        # PATCH bodies' opens, writes and ends: a few pool threads at most (storage.blocking.Lane).
        width = body_lane_width(getattr(config, "io_threads", 16))
        self.body_pool = pool.lane(width, "upload-bodies") if hasattr(pool, "lane") else pool
        self.site: StorageSite | None = None
        self.janitor = UploadJanitor(volumes, pool, interval=janitor_interval(config))
        self.socket_threads = SocketThreads(reactor)
        self.patches_in_flight = 0
        # The PATCH streaming into each upload here, by (vfolder, session).
        self.active: dict[tuple[str, str], PatchInProgress] = {}
        # num-proc > 1 (storage.worker): ``elsewhere(vfolder, session)`` makes the other worker
        # processes supersede their PATCH of that upload, as ``supersede`` does here; fires when done.
        self.elsewhere: Callable[[str, str], Deferred[None]] | None = None
        keep_body_buffers_in_the_heap()

    def services(self) -> list[Any]:
        return [self.janitor, self.socket_threads]

    def make_site(self, resource: Any) -> StorageSite:
        self.site = StorageSite(resource, body_handler=self.stream_patch)
        return self.site

    # -- shared pieces ---------------------------------------------------------------

    def resolve(self, request: Any, rest: str) -> UploadRef:
        raw = query_arg(request, b"token")
        token = verify_upload_token(raw, self.config.secret)
        dst_dir = query_arg(request, b"dst_dir")
        if dst_dir:
            validate_relpath(dst_dir, "dst_dir")
        volume = self.volumes.get(token.volume)
        vfolder = Path(volume.vfolder_path(token.vfid))
        records = completion_records_dir(volume.root)
        if rest:
            if not is_session_id(rest):
                raise UploadNotFound(f"no such upload: {rest!r}")
            return UploadRef(token, raw or "", vfolder, rest, True, dst_dir, records)
        return UploadRef(token, raw or "", vfolder, token.session, False, dst_dir, records)

    def common_headers(self, request: Any) -> None:
        request.defaultContentType = None  # tus answers have no body
        request.setHeader(b"Tus-Resumable", TUS_VERSION.encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")

    def error_headers(self, error: StorageError) -> dict[bytes, bytes]:
        headers = {b"Tus-Resumable": TUS_VERSION.encode()}
        for name, value in getattr(error, "headers", {}).items():
            headers[name.encode()] = value.encode()
        if isinstance(error, OffsetMismatch):
            headers[b"Upload-Offset"] = str(error.current).encode()
        return headers

    def state_headers(self, request: Any, ref: UploadRef, state: UploadState) -> None:
        offset = state.length if state.completed else state.offset
        request.setHeader(b"Upload-Offset", str(offset).encode())
        request.setHeader(b"Upload-Length", str(state.length).encode())
        request.setHeader(b"Upload-Expires", http_date(min(state.expires, ref.token.exp)).encode())
        if state.kind == PARTIAL:
            request.setHeader(b"Upload-Concat", b"partial")
        elif state.kind == FINAL:
            urls = " ".join(ref.location(p) for p in state.parts)
            request.setHeader(b"Upload-Concat", f"final;{urls}".encode())

    def check_owner(self, ref: UploadRef, state: UploadState) -> UploadState:
        """A partial upload belongs to the token that created it; expired ones are gone."""
        if ref.partial and (state.kind != PARTIAL or state.extra.get("owner") != ref.token.session):
            raise UploadNotFound()
        if state.expires < time.time() and not state.completed:
            raise UploadNotFound("the upload has expired")
        check_claims(ref, state)
        return state

    # -- the route ------------------------------------------------------------------

    async def handle(self, request: Any, rest: str) -> bytes:
        self.common_headers(request)
        try:
            return await self._dispatch(request, rest)
        except StorageError as exc:
            for name, value in self.error_headers(exc).items():
                request.setHeader(name, value)
            raise

    async def _dispatch(self, request: Any, rest: str) -> bytes:
        method = effective_method(request)
        if method not in (b"OPTIONS", b"PATCH", b"HEAD", b"DELETE", b"POST"):
            # Before the token and Tus-Resumable: a GET is 405, whatever its query.
            raise MethodNotAllowed(f"{method.decode('latin-1')} is not a tus method")
        if method == b"POST" and rest:
            raise MethodNotAllowed("create uploads at /upload")
        if method == b"OPTIONS":
            return self.options(request)
        if method == b"PATCH":
            return await self.patch(request)
        check_tus_resumable(request)
        ref = self.resolve(request, rest)
        if method == b"HEAD":
            return await self.head(request, ref)
        if method == b"DELETE":
            return await self.terminate(request, ref)
        return await self.create(request, ref)  # POST

    def options(self, request: Any) -> bytes:
        request.setHeader(b"Tus-Version", TUS_VERSION.encode())
        request.setHeader(b"Tus-Max-Size", str(self.config.max_upload_size).encode())
        request.setHeader(b"Tus-Extension", ",".join(EXTENSIONS).encode())
        request.setHeader(b"Tus-Checksum-Algorithm", ",".join(sorted(CHECKSUMS)).encode())
        request.setResponseCode(204)
        return b""

    def supersede(self, ref: UploadRef) -> Deferred[None]:
        """A new request for an upload whose earlier PATCH still streams here
        (its client most likely gone): that PATCH stops, keeping and recording
        its bytes; fires once it has (or after SUPERSEDE_WAIT seconds)."""
        return self.supersede_key(str(ref.vfolder), ref.session)

    def supersede_key(self, vfolder: str, session: str) -> Deferred[None]:
        """``supersede`` by the upload's (vfolder directory, session id)."""
        previous = self.active.get((vfolder, session))
        if previous is None:
            return succeed(None)
        previous.sink.stop()

        def still_recording(_: Any) -> Any:
            if not previous.done and not previous.receiving:
                return previous.when_done(self.reactor, RECORD_WAIT)
            return None

        return previous.when_done(self.reactor, SUPERSEDE_WAIT).addCallback(still_recording)

    async def head(self, request: Any, ref: UploadRef) -> bytes:
        await self.supersede(ref)
        if self.elsewhere is not None:  # a PATCH of it may stream in another worker process
            await self.elsewhere(str(ref.vfolder), ref.session)
        try:
            state = await self.pool.run(upload_status, ref.vfolder, ref.session)
        except UploadNotFound:
            # Completed: its file, at the target, names the upload.
            done = await self.pool.run(self.completed_state, ref)
            if done is None:
                raise
            state = done
        state = self.check_owner(ref, state)
        if not state.completed and state.offset == state.length and state.kind == NORMAL and not ref.partial:
            # A client stops at a HEAD whose offset is the length: tus-js-client
            # given the token URL as uploadUrl only HEADs an empty upload, and
            # a killed daemon may have staged every byte without moving the
            # file.  Complete it here; a HEAD still answers when the file
            # cannot be placed (the PATCH that staged the bytes said why).
            try:
                state = await self.complete_full(ref) or state
            except StorageError as exc:
                log.info("HEAD could not complete upload {session}: {error}", session=ref.session, error=exc)
        request.setHeader(b"Cache-Control", b"no-store")
        self.state_headers(request, ref, state)
        request.setResponseCode(200)
        return b""

    async def terminate(self, request: Any, ref: UploadRef) -> bytes:
        state = await self.pool.run(read_state, ref.vfolder, ref.session)
        if state is None:
            raise UploadNotFound()
        self.check_owner(ref, state)
        if not await self.pool.run(remove_upload, ref.vfolder, ref.session):
            raise UploadNotFound()
        request.setResponseCode(204)
        return b""

    async def create(self, request: Any, ref: UploadRef) -> bytes:
        """POST: creation (of the token's upload), or concatenation (partial / final)."""
        concat = header(request, b"Upload-Concat")
        if header(request, b"Upload-Defer-Length") is not None:
            raise InvalidAPIParameters.field("Upload-Defer-Length", "not supported: send Upload-Length")
        if concat is not None and concat.startswith("final;"):
            return await self.concatenate(request, ref, parse_concat_final(concat))
        length = parse_offset(header(request, b"Upload-Length"), "Upload-Length")
        if length > self.config.max_upload_size:
            raise RequestTooLarge(f"Upload-Length is over Tus-Max-Size ({self.config.max_upload_size})")
        metadata = header(request, b"Upload-Metadata")
        if concat == "partial":
            if length > ref.token.size:
                raise InvalidAPIParameters.field("Upload-Length", "a part cannot be longer than the upload")
            session = new_session_id()
            state = await self.pool.run(self._create_partial, ref, session, length, metadata)
            location = ref.location(session)
        elif concat is None:
            if length != ref.token.size:
                raise InvalidAPIParameters.field("Upload-Length", f"must be the token's size, {ref.token.size}")
            state = await self.pool.run(self._create_main, ref, length, metadata)
            if length == 0 and not state.completed:
                state = await self.complete_full(ref) or state  # an empty file is complete at creation
            location = ref.location()
        else:
            raise InvalidAPIParameters.field("Upload-Concat", "expected 'partial' or 'final;<urls>'")
        request.setHeader(b"Location", location.encode())
        request.setHeader(b"Upload-Expires", http_date(min(state.expires, ref.token.exp)).encode())
        request.setResponseCode(201)
        return b""

    def finished_state(self, ref: UploadRef) -> UploadState | None:
        """The token's upload if it is complete, with or without state left (blocking)."""
        try:
            state = upload_status(ref.vfolder, ref.session)
        except UploadNotFound:
            return self.completed_state(ref)
        if not state.completed:
            return None
        check_claims(ref, state)
        return state

    def completed_state(self, ref: UploadRef) -> UploadState | None:
        """The token's upload, if it completed and left no state (blocking)."""
        if ref.partial:
            return None
        token = ref.token
        return completed_at_target(
            ref.vfolder, ref.session, token.relpath, token.size, ref.dst_dir, token.exp,
            extra={"vfid": str(token.vfid), "volume": token.volume}, records=ref.records,
        )

    async def complete_full(self, ref: UploadRef) -> UploadState | None:
        state = await self.pool.run(
            complete_if_full, ref.vfolder, ref.session, ref.dst_dir, ref.token.exp, ref.records,
        )
        if state is not None and state.completed:
            with contextlib.suppress(StorageError):
                self.volumes.get(ref.token.volume).invalidate_usage(ref.token.vfid)
        return state

    def _create_partial(self, ref: UploadRef, session: str, length: int, metadata: str | None) -> UploadState:
        """A partial upload under the token's upload, which the token must agree with."""
        main = read_state(ref.vfolder, ref.token.session)
        if main is not None:
            check_claims(ref, main)
        return create_upload(
            ref.vfolder, session, ref.token.relpath, length,
            expire=self.expire_seconds(), kind=PARTIAL,
            extra={"owner": ref.token.session, "metadata": metadata,
                   "vfid": str(ref.token.vfid), "volume": ref.token.volume},
        )

    def _create_main(self, ref: UploadRef, length: int, metadata: str | None) -> UploadState:
        """Creation of the token's own upload: it usually exists (prepared by the manager)."""
        state = read_state(ref.vfolder, ref.session)
        if state is not None:
            check_claims(ref, state)
            if state.completed:
                raise UploadCompleted()
            return state
        if self.completed_state(ref) is not None:
            raise UploadCompleted()
        return create_upload(
            ref.vfolder, ref.session, ref.token.relpath, length,
            expire=self.expire_seconds(),
            extra={"metadata": metadata, "vfid": str(ref.token.vfid), "volume": ref.token.volume},
        )

    def scope_writer(self, ref: UploadRef, session: str | None = None) -> ScopeWriter | None:
        """The quota grant for writing into ``ref``'s upload (None: no quota scope)."""
        qsid = ref.token.vfid.quota_scope_id
        if qsid is None:
            return None
        volume = self.volumes.get(ref.token.volume)
        session = session or ref.session
        return ScopeWriter(volume, qsid, session, staging_path(ref.vfolder, session))

    async def concatenate(self, request: Any, ref: UploadRef, parts: list[str]) -> bytes:
        state = await self.pool.run(
            concatenate_parts, ref.vfolder, ref.token.session, parts, ref.dst_dir, ref.token.exp,
            lambda main: check_claims(ref, main), ref.records, self.scope_writer(ref, ref.token.session),
        )
        request.setHeader(b"Location", ref.location().encode())
        self.state_headers(request, ref, state)
        request.setResponseCode(201)
        return b""

    def expire_seconds(self) -> float:
        return float(getattr(self.config, "upload_expire", 7 * 86400))

    # -- PATCH: the body is streamed from gotLength -----------------------------------------

    def stream_patch(self, request: StreamingRequest, length: int | None) -> Any:
        """The site's body handler: take a tus PATCH's body before twisted.web buffers it."""
        rest = upload_rest(request.path)
        if rest is None or effective_method(request) != b"PATCH":
            return None
        try:
            patch = self.begin_patch(request, rest, length)
        except StorageError as exc:
            request.refuse(exc, self.error_headers(exc))
            return None
        request.body_context = patch
        transport: Any = request.channel.transport
        if isinstance(getattr(transport, "bufferSize", None), int):
            transport.bufferSize = max(transport.bufferSize, UPLOAD_READ_SIZE)
        if self.site is not None:
            self.site.track(patch.finished)
        return patch.sink

    def begin_patch(self, request: StreamingRequest, rest: str, length: int | None) -> PatchInProgress:
        check_tus_resumable(request)
        ref = self.resolve(request, rest)
        ctype = (request.requestHeaders.getRawHeaders(b"Content-Type") or [b""])[0]
        if ctype.split(b";")[0].strip().lower() != OFFSET_OCTET_STREAM:
            raise WrongContentType()
        offset = parse_offset(header(request, b"Upload-Offset"))
        declared = header(request, b"Upload-Length")
        declared_length = None if declared is None else parse_offset(declared, "Upload-Length")
        checksum = parse_checksum(header(request, b"Upload-Checksum"))
        # Whether the body fits, and a changed Upload-Length, are checked only
        # after the offset (``_open``): tus answers a mismatched offset 409
        # before any check of the body.
        return PatchInProgress(self, request, ref, offset, length, checksum, declared_length)

    async def patch(self, request: Any) -> bytes:
        patch = getattr(request, "body_context", None)
        if not isinstance(patch, PatchInProgress):
            patch = None
        if patch is None:
            # Only a request that bypassed the site's body handler gets here.
            raise WrongContentType("the PATCH body was not streamed")
        state = await patch.wait()
        self.state_headers(request, patch.ref, state)
        request.setResponseCode(204)
        return b""


class SocketThreads(BlockingPool):
    """Threads that read large PATCH bodies off their sockets into the staging
    file (``UploadWriter.receive``), so the bytes skip the reactor and, with
    ``splice``, user space.  Bounded: past ``limit`` bodies stay on the reactor."""

    name = "upload-socket-threads"  # type: ignore[assignment]

    def __init__(self, reactor: Any, limit: int = 32) -> None:
        super().__init__(reactor, max_threads=limit)
        self.limit = limit
        self.active = 0
        self.stopping = False
        self.signals: set[StopSignal] = set()  # one per running receive

    def is_stopping(self) -> bool:
        return self.stopping

    def startService(self) -> None:
        self.stopping = False
        super().startService()  # starts all ``limit`` threads

    def stopService(self) -> Any:
        self.stopping = True
        for signal in list(self.signals):
            signal.set()  # the threads return at once, keeping what came
        return super().stopService()


class PatchTarget:
    """The staging file, locked, seen from the reactor: writes and the end run in the pool."""

    def __init__(
        self, pool: Any, writer: UploadWriter, checksum: tuple[str, bytes] | None, records: Path | None = None,
    ) -> None:
        self.pool = pool
        self.writer = writer
        self.records = records
        self.checksum = checksum
        self.hasher = CHECKSUMS[checksum[0]]() if checksum else None
        writer.checkpoints = checksum is None
        if checksum is not None:
            writer.mark_unverified()

    def write(self, buffers: list[bytes]) -> Deferred[int]:
        return self.pool.run(self._write, buffers)

    def _write(self, buffers: list[bytes]) -> int:
        size = sum(len(b) for b in buffers)
        if self.writer.offset + size > self.writer.state.length:
            raise UploadTooLong(f"the body goes past Upload-Length {self.writer.state.length}")
        n = self.writer.write(buffers)
        if self.hasher is not None:
            for b in buffers:
                self.hasher.update(b)
        return n

    def finish(self, body_complete: bool, error: BaseException | None, dst_dir: str | None, keep: float) -> UploadState:
        """Make the outcome durable (blocking); raises the error the client should see."""
        writer = self.writer
        try:
            if isinstance(error, (UploadTooLong, ChecksumMismatch)) or (
                self.checksum is not None and (not body_complete or error is not None)
            ):
                # An unverifiable or refused chunk is discarded whole.
                state = writer.rollback()
            else:
                if self.checksum is not None and self.hasher is not None and (
                    self.hasher.digest() != self.checksum[1]
                ):
                    writer.rollback()
                    raise ChecksumMismatch(f"the {self.checksum[0]} of the body does not match Upload-Checksum")
                state = self._record(writer, dst_dir, keep, self.records)
            if error is not None:
                raise error
            return state
        finally:
            writer.close()

    @staticmethod
    def _record(writer: UploadWriter, dst_dir: str | None, keep: float, records: Path | None) -> UploadState:
        """Record the bytes written; a complete upload goes to its target."""
        if writer.offset == writer.state.length and writer.state.kind == NORMAL:
            # The completed state records the offset too: one state write, not two.
            fastio.fdatasync(writer.fd)
            try:
                return complete_upload(writer, dst_dir, keep, records)
            except BaseException:
                writer.commit()  # the bytes stay; a later PATCH completes the move
                raise
        return writer.commit()


class PatchInProgress:
    """One PATCH: validation, the sink its body streams into, and its outcome."""

    def __init__(
        self, tus: TusUploads, request: StreamingRequest, ref: UploadRef, offset: int,
        length: int | None, checksum: tuple[str, bytes] | None, declared_length: int | None = None,
    ) -> None:
        self.tus = tus
        self.request = request
        self.ref = ref
        self.offset = offset
        self.length = length
        self.checksum = checksum
        self.declared_length = declared_length  # a PATCH's Upload-Length: must be the upload's
        self.target: PatchTarget | None = None
        self.early_outcome: UploadState | Failure | None = None
        self.outcome: UploadState | Failure | None = None
        self.waiters: list[Deferred[UploadState]] = []
        ready: Deferred[PatchTarget] = Deferred()
        self.sink = UploadSink(
            request.channel, ready, too_long=lambda: UploadTooLong("the body goes past Upload-Length"),
            expected=length, direct=self._direct, request=request,
        )
        self.finished: Deferred[None] = self.sink.done.addBoth(self._body_done)
        tus.patches_in_flight += 1
        self.done = False
        self.receiving = True  # until the body has ended: then only its outcome is recorded
        self.done_waiters: list[Deferred[None]] = []
        self.key = (str(ref.vfolder), ref.session)
        earlier = tus.supersede(ref)  # the older PATCH ends; never two writers
        tus.active[self.key] = self
        self.finished.addBoth(self._count_done)
        Deferred.fromCoroutine(self._open_after(earlier)).addCallback(self._opened).chainDeferred(ready)

    async def _open_after(self, earlier: Deferred[None]) -> PatchTarget:
        await earlier
        tus = self.tus
        try:
            return await tus.body_pool.run(self._open)
        except UploadBusy:
            if tus.elsewhere is None:
                raise
        # Held by a PATCH in another worker process: it stops (keeping its bytes), as one here would.
        await tus.elsewhere(*self.key)
        return await tus.body_pool.run(self._open)

    def when_done(self, reactor: Any, timeout: float) -> Deferred[None]:
        """Fires once this PATCH's outcome is recorded, or after ``timeout``."""
        d: Deferred[None] = Deferred()
        if self.done:
            d.callback(None)
            return d
        self.done_waiters.append(d)
        def expire() -> None:
            if not d.called:
                d.callback(None)

        timer = reactor.callLater(timeout, expire)

        def cancel_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(cancel_timer)

    def _open(self) -> PatchTarget:
        ref = self.ref
        try:
            # Whose upload it is comes first: a token that disagrees with
            # the upload learns nothing of it (not even its offset).
            try:
                writer = open_writer(ref.vfolder, ref.session, self.offset, self._check)
            except UploadNotFound:
                if self.tus.completed_state(ref) is not None:
                    raise UploadCompleted() from None
                raise
        except UploadCompleted:
            # A PATCH that repeats the end of a completed upload (its length as
            # offset, no bytes) asks nothing: 204 at that offset, as tusd answers,
            # so the last, empty PATCH of a file the server completed on its own
            # (an empty one) ends without an error.
            done = self.tus.finished_state(ref) if self.length == 0 else None
            if done is not None and done.length == self.offset:
                self.early_outcome = done
            raise
        try:
            state = writer.state
            if self.declared_length is not None and self.declared_length != state.length:
                raise InvalidAPIParameters.field(
                    "Upload-Length", f"the upload's length is {state.length}; it cannot change"
                )
            if self.length is not None and state.offset + self.length > state.length:
                raise UploadTooLong(f"offset {state.offset} + {self.length} bytes is past Upload-Length {state.length}")
            # The quota scope's room: this PATCH may write what is left of it
            # (limit - usage - what other writers hold); none left: 507 before
            # a byte is read.
            want = self.length if self.length is not None else state.length - state.offset
            scope = self.tus.scope_writer(ref)
            if scope is not None and want > 0 and writer.attach_quota(scope, want) <= 0:
                raise writer.quota_refusal()
        except BaseException:
            writer.close()
            raise
        return PatchTarget(self.tus.body_pool, writer, self.checksum, self.ref.records)

    def _check(self, state: UploadState) -> None:
        """Under the upload's lock, before its offset is looked at."""
        if state.completed:
            check_claims(self.ref, state)
            return
        self.tus.check_owner(self.ref, state)  # a partial's owner, expiry, the token's claims
        if state.kind == FINAL and not self.ref.partial:
            raise ConcatForbidden()

    def _count_done(self, result: Any) -> Any:
        self.tus.patches_in_flight -= 1
        self.done = True
        if self.tus.active.get(self.key) is self:
            del self.tus.active[self.key]
        waiters, self.done_waiters = self.done_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)
        return result

    def _direct(self, sock: Any, count: int) -> Deferred[Any] | None:
        """Read the rest of the body straight off the socket in a thread, if one is free."""
        tus = self.tus
        if self.target is None or tus.socket_threads.active >= tus.socket_threads.limit:
            return None
        threads = tus.socket_threads
        target = self.target
        stop = StopSignal()
        if threads.is_stopping() or self.sink.stop_requested:
            stop.set()
        threads.active += 1
        threads.signals.add(stop)
        self.sink.stop_signal = stop

        def release(result: Any) -> Any:
            threads.active -= 1
            threads.signals.discard(stop)
            self.sink.stop_signal = None
            stop.close()
            return result

        d = threads.run(self._receive_and_finish, target, sock, count, stop)
        return d.addBoth(release)

    def _receive_and_finish(self, target: PatchTarget, sock: Any, count: int, stop: StopSignal) -> Received:
        """In a socket thread: the rest of the body and, when all of it came,
        the PATCH's outcome too (one thread hop fewer, and no wait for a pool
        thread, per PATCH)."""
        result = target.writer.receive(sock, count, target.hasher, stop)
        self.receiving = False  # what follows only records
        if result.consumed == count and result.error is None and not result.stopped:
            try:
                self.early_outcome = target.finish(True, None, self.ref.dst_dir, self.ref.token.exp)
            except BaseException:
                self.early_outcome = Failure()
        return result

    def _opened(self, target: PatchTarget) -> PatchTarget:
        self.target = target
        target.writer.early_writeback = self.tus.patches_in_flight <= EARLY_WRITEBACK_MAX_PATCHES
        self.sink.limit = target.writer.state.length - target.writer.state.offset
        return target

    def _body_done(self, result: int | Failure) -> Deferred[None]:
        self.receiving = False
        error = result.value if isinstance(result, Failure) else None
        if self.early_outcome is not None:  # the socket thread already finished it
            d: Deferred[UploadState] = (
                fail(self.early_outcome) if isinstance(self.early_outcome, Failure) else succeed(self.early_outcome)
            )
        elif self.target is None:
            d = Deferred()
            d.errback(result if isinstance(result, Failure) else Failure(RuntimeError("no target")))
        else:
            keep = self.ref.token.exp
            d = self.tus.body_pool.run(self.target.finish, self.sink.complete, error, self.ref.dst_dir, keep)
        return d.addBoth(self._deliver)

    def _deliver(self, outcome: UploadState | Failure) -> None:
        busy = out_of_descriptors(outcome.value) if isinstance(outcome, Failure) else None
        if busy is not None:
            log.warn("tus PATCH: {msg}", msg=str(busy))
            outcome = Failure(busy)
        if isinstance(outcome, Failure) and outcome.check(InsufficientStorage):
            # Name the full quota scope, as every other 507 does.
            qsid = self.ref.token.vfid.quota_scope_id
            if qsid is not None:
                outcome.value.extra.setdefault("quota_scope_id", str(qsid))
                outcome.value.extra.setdefault("volume", self.ref.token.volume)
        elif not isinstance(outcome, Failure) and outcome.completed:
            # A new file appeared: cached usage of the vfolder is stale.
            with contextlib.suppress(StorageError):
                self.tus.volumes.get(self.ref.token.volume).invalidate_usage(self.ref.token.vfid)
        self.outcome = outcome
        if isinstance(outcome, Failure) and not outcome.check(StorageError):
            log.failure("tus PATCH {path} failed", outcome, path=self.request.uri.split(b"?")[0].decode("latin-1"))
        if not self.request._body_done and isinstance(outcome, Failure):
            # The client is still sending (or gone): answer now, drop the rest.
            exc = outcome.value
            if isinstance(exc, StorageError):
                self.request.refuse(exc, self.tus.error_headers(exc))
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(outcome) if not isinstance(outcome, Failure) else d.errback(outcome)
        return None

    def wait(self) -> Deferred[UploadState]:
        d: Deferred[UploadState] = Deferred()
        if self.outcome is None:
            self.waiters.append(d)
        elif isinstance(self.outcome, Failure):
            d.errback(self.outcome)
        else:
            d.callback(self.outcome)
        return d


def check_claims(ref: UploadRef, state: UploadState) -> None:
    """A validly signed token must also agree with the upload it names: the
    relpath and size (and vfolder, where recorded) it was created with."""
    token = ref.token
    mismatched = []
    if state.relpath != token.relpath:
        mismatched.append("relpath")
    if state.kind != PARTIAL and state.length != token.size:
        mismatched.append("size")
    recorded_vfid = state.extra.get("vfid")
    if recorded_vfid is not None and recorded_vfid != str(token.vfid):
        mismatched.append("vfid")
    recorded_volume = state.extra.get("volume")
    if recorded_volume and recorded_volume != token.volume:
        mismatched.append("volume")
    if mismatched:
        raise InvalidToken(
            f"the token's {', '.join(mismatched)} claim(s) differ from the upload's", mismatched=mismatched
        )


# -- small helpers -------------------------------------------------------------------------


def http_date(timestamp: float) -> str:
    from email.utils import formatdate

    return formatdate(timestamp, usegmt=True)


def janitor_interval(config: Any) -> float:
    expire = float(getattr(config, "upload_expire", 7 * 86400))
    return max(60.0, min(3600.0, expire / 4))


