"""``TusClient``: upload, resume, parallel upload and termination over tus 1.0."""

from __future__ import annotations

import logging
import random as random_module
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from storage.tus_client.errors import (
    InvalidToken,
    ProtocolViolation,
    TusError,
    UnexpectedStatus,
    UnsupportedByServer,
    UploadLengthMismatch,
    UploadNotFound,
    UploadTooLarge,
    has_token,
)
from storage.tus_client.headers import ServerInfo
from storage.tus_client.http import HttpEndpoint
from storage.tus_client.planning import RetryPolicy, split_parts
from storage.tus_client.progress import Progress, ProgressTracker
from storage.tus_client.sources import ByteSource, as_source
from storage.tus_client.transfer import RangeUploader, UploadStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_PART_SIZE = 1 << 20  # parallel parts smaller than this are not worth a request


@dataclass
class UploadResult:
    url: str  # the upload that now holds all the bytes
    size: int
    checksum_algorithm: str | None = None
    partial_urls: list[str] = field(default_factory=list)  # when concatenated


class _CancelFlag:
    cancelled = False


def cancellable(reactor: Any, make: Callable[[_CancelFlag], Coroutine[Any, Any, T]]) -> Deferred[T]:
    """Run a coroutine as a Deferred whose ``cancel()`` also stops any retry.

    The returned Deferred fails with ``CancelledError`` at once; the request in
    flight is cancelled on the next reactor turn, so that a cancel from inside
    a progress callback (which may run in the middle of writing a body) does
    not re-enter the HTTP machinery.
    """
    flag = _CancelFlag()
    inner = Deferred.fromCoroutine(make(flag))

    def cancel(_: Deferred[T]) -> None:
        flag.cancelled = True
        reactor.callLater(0, inner.cancel)

    outer: Deferred[T] = Deferred(cancel)

    def forward(result: Any) -> None:
        # after a cancel the outer Deferred has already failed with CancelledError
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

    inner.addBoth(forward)
    return outer


class TusClient:
    """A tus 1.0 client on treq.

    ``chunk_size=None`` sends the whole (remaining) data in one PATCH; the body
    is always streamed from the source in bounded pieces.  ``parallel=N`` splits
    a fresh upload into N partial uploads joined with the concatenation
    extension, if the server offers it (else the upload is sequential).
    ``checksum`` names an algorithm (or ``"auto"``): each PATCH then carries
    ``Upload-Checksum`` if the server advertises it (else a warning is logged;
    ``require_checksum=True`` makes that an ``UnsupportedByServer`` error).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        chunk_size: int | None = None,
        parallel: int = 1,
        checksum: str | None = None,
        require_checksum: bool = False,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        random: Callable[[], float] | None = None,
        endpoint: Any = None,
        timeout: float = 120.0,
    ) -> None:
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        self.reactor = reactor
        self.chunk_size = chunk_size
        self.parallel = parallel
        self.checksum = checksum
        self.require_checksum = require_checksum
        self.retry = retry or RetryPolicy()
        self.random = random or random_module.random
        self.endpoint = endpoint or HttpEndpoint(
            reactor, max_connections=max(2, parallel + 1), extra_headers=headers, timeout=timeout)

    # -- public API -------------------------------------------------------

    def upload(self, url: str, data: Any, *, size: int | None = None,
               metadata: Mapping[str, str] | None = None, create: bool | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> Deferred[UploadResult]:
        """Upload ``data`` (a path, bytes, a file object or a ``ByteSource``).

        ``create=None`` decides from the URL: an existing upload (HEAD answers
        with Upload-Offset, like Backend.AI's ``/upload?token=…``) is resumed;
        otherwise, if the server offers ``creation``, a new upload is POSTed.
        ``create=True`` always POSTs, ``create=False`` never does.
        """
        return cancellable(self.reactor, lambda flag: self._upload(
            flag, url, data, size, metadata, create, on_progress))

    def resume(self, url: str, data: Any, *, size: int | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> Deferred[UploadResult]:
        """Continue an upload that exists at ``url`` from the offset HEAD reports."""
        return self.upload(url, data, size=size, create=False, on_progress=on_progress)

    def terminate(self, url: str) -> Deferred[None]:
        """DELETE the upload (tus termination), retrying like the upload does
        (a server may still hold the upload briefly after a cancelled PATCH: 423)."""
        return cancellable(self.reactor, lambda flag: self._retrying(flag, self.endpoint.delete, url))

    def server_info(self, url: str) -> Deferred[ServerInfo]:
        return Deferred.fromCoroutine(self._server_info(url))

    def close(self) -> Deferred[None]:
        """Close the kept-alive connections."""
        return Deferred.fromCoroutine(self.endpoint.close())

    # -- the work ---------------------------------------------------------

    async def _server_info(self, url: str, flag: _CancelFlag | None = None) -> ServerInfo:
        try:
            return await self._retrying(flag or _CancelFlag(), self.endpoint.options, url)
        except TusError as err:
            if err.retryable:
                raise
            log.info("OPTIONS %s failed (%s): assuming the core protocol only", url, err)
            return ServerInfo()

    def _sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self.reactor, seconds, lambda: None)

    def _uploader(self, flag: _CancelFlag, algorithm: str | None,
                  tracker: ProgressTracker) -> RangeUploader:
        return RangeUploader(
            self.endpoint, policy=self.retry, sleep=self._sleep, random=self.random,
            chunk_size=self.chunk_size, checksum_algorithm=algorithm, tracker=tracker,
            is_cancelled=lambda: flag.cancelled)

    def _choose_checksum(self, info: ServerInfo, source: ByteSource) -> str | None:
        if not self.checksum:
            return None
        algorithm = info.checksum_algorithm(self.checksum)
        problem = None
        if algorithm is None:
            problem = (f"the server does not offer checksum {self.checksum} "
                       f"(extensions: {', '.join(info.extensions) or 'none'}; "
                       f"algorithms: {', '.join(info.checksum_algorithms) or 'none'})")
        elif not source.random_access:
            problem = "checksums need a seekable source"
        if problem is None:
            return algorithm
        if self.require_checksum:
            raise UnsupportedByServer(problem)
        log.warning("uploading without checksums: %s", problem)
        return None

    async def _existing_status(self, flag: _CancelFlag, url: str, info: ServerInfo,
                               create: bool | None) -> UploadStatus | None:
        """HEAD ``url``: its status if it is an upload, None if one must be created."""
        if create:
            return None
        try:
            return await self._retrying(flag, self.endpoint.head, url)
        except (UploadNotFound, InvalidToken, UnexpectedStatus) as err:
            if (create is None and info.supports("creation") and not has_token(url)
                    and err.status in (400, 404, 405, 410)):
                return None
            raise

    async def _upload(self, flag: _CancelFlag, url: str, data: Any, size: int | None,
                      metadata: Mapping[str, str] | None, create: bool | None,
                      on_progress: Callable[[Progress], None] | None) -> UploadResult:
        source = as_source(data, self.reactor, size)
        try:
            return await self._upload_source(flag, url, source, metadata, create, on_progress)
        finally:
            if source is not data:
                source.close()

    async def _upload_source(self, flag: _CancelFlag, url: str, source: ByteSource,
                             metadata: Mapping[str, str] | None, create: bool | None,
                             on_progress: Callable[[Progress], None] | None) -> UploadResult:
        size = source.size
        info = await self._server_info(url, flag)
        if info.max_size is not None and size > info.max_size:
            raise UploadTooLarge(
                f"{size} bytes exceed the server's Tus-Max-Size {info.max_size}", url=url)
        algorithm = self._choose_checksum(info, source)
        tracker = ProgressTracker(size, on_progress, self.reactor.seconds)
        status = await self._existing_status(flag, url, info, create)
        if status is None and not info.supports("creation") and create is None:
            raise UnsupportedByServer("the server does not offer upload creation", url=url)

        fresh = status is None or status.offset == 0
        if self._can_concatenate(info, source, fresh):
            if status is not None and status.length not in (None, size):
                raise UploadLengthMismatch(
                    f"the upload is {status.length} bytes long, the data {size}", url=url)
            return await self._upload_parallel(flag, url, source, metadata, info, algorithm,
                                               tracker)
        existed = status is not None
        if status is None:
            # a retried POST may leave an orphan upload behind; the server expires it
            url, _ = await self._retrying(flag, self.endpoint.create, url, size, metadata)
            status = UploadStatus(offset=0, length=size)
        uploader = self._uploader(flag, algorithm, tracker)
        await uploader.send(url, source, 0, size, status=status, finish_empty=existed)
        return UploadResult(url=url, size=size, checksum_algorithm=algorithm)

    def _can_concatenate(self, info: ServerInfo, source: ByteSource, fresh: bool) -> bool:
        if self.parallel < 2 or not fresh:
            return False
        if not info.supports("concatenation"):
            log.info("the server does not offer concatenation: uploading sequentially")
            return False
        if not source.random_access:
            log.info("a stream cannot be read in parallel: uploading sequentially")
            return False
        return len(split_parts(source.size, self.parallel, MIN_PART_SIZE)) > 1

    async def _upload_parallel(self, flag: _CancelFlag, creation_url: str, source: ByteSource,
                               metadata: Mapping[str, str] | None, info: ServerInfo,
                               algorithm: str | None, tracker: ProgressTracker) -> UploadResult:
        parts = split_parts(source.size, self.parallel, MIN_PART_SIZE)
        created: list[tuple[str, str]] = []
        try:
            for start, end in parts:
                created.append(await self._create_retrying(
                    flag, creation_url, end - start, "partial"))
            uploader = self._uploader(flag, algorithm, tracker)
            sends = [
                Deferred.fromCoroutine(uploader.send(
                    part_url, source, start, end - start, part=index,
                    status=UploadStatus(offset=0, length=end - start)))
                for index, ((start, end), (part_url, _)) in enumerate(zip(parts, created, strict=True))
            ]
            results = DeferredList(sends, fireOnOneErrback=True, consumeErrors=True)
            try:
                await results
            except Exception as exc:
                for send in sends:
                    send.cancel()
                first = getattr(exc, "subFailure", None)
                if first is not None:
                    first.raiseException()
                raise
            final_url, _ = await self.endpoint.create_final(
                creation_url, [location for _, location in created], metadata)
        except BaseException:
            if info.supports("termination"):
                await self._discard(created)
            raise
        await self._check_final(final_url, source.size)
        return UploadResult(url=final_url, size=source.size, checksum_algorithm=algorithm,
                            partial_urls=[u for u, _ in created])

    async def _create_retrying(self, flag: _CancelFlag, url: str, length: int,
                               concat: str) -> tuple[str, str]:
        return await self._retrying(flag, self.endpoint.create, url, length, None, concat=concat)

    async def _retrying(self, flag: _CancelFlag, request: Callable[..., Any], *args: Any,
                        **kwargs: Any) -> Any:
        failures = 0
        while True:
            try:
                return await request(*args, **kwargs)
            except TusError as err:
                failures += 1
                if flag.cancelled or not err.retryable or failures > self.retry.retries:
                    raise
                await self._sleep(self.retry.delay(failures, self.random))
                if flag.cancelled:
                    raise CancelledError() from None

    async def _check_final(self, url: str, size: int) -> None:
        """The joined upload must report every byte (when it reports an offset at all)."""
        try:
            status = await self.endpoint.head(url)
        except ProtocolViolation:
            raise
        except TusError as err:  # some servers forget completed uploads: not our concern
            log.info("could not check the concatenated upload %s: %s", url, err)
            return
        if status.offset is not None and status.offset != size:
            raise ProtocolViolation(
                f"the concatenated upload reports {status.offset} of {size} bytes", url=url)

    async def _discard(self, created: list[tuple[str, str]]) -> None:
        cleanup = _CancelFlag()  # runs after a cancel too: retried on its own
        for part_url, _ in created:
            try:
                await self._retrying(cleanup, self.endpoint.delete, part_url)
            except Exception as err:  # cleanup is best effort
                log.info("could not delete partial upload %s: %s", part_url, err)
