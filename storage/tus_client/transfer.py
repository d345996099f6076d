"""The resume loop: send ``[offset, length)`` of one upload, surviving failures.

It talks to the server through an ``Endpoint`` (``head`` and ``patch``), so the
same loop runs over treq (``storage.tus_client.http``) and over the simulated
server of the property tests.  Invariants it keeps:

* every PATCH starts at the offset the server last reported (never re-sends
  bytes the server has);
* after any retryable failure it waits (exponential backoff, full jitter) and
  re-reads the offset with HEAD before sending again;
* an offset that goes backwards, or past the bytes sent, is a protocol
  violation, not something to paper over.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred

from storage.tus_client.errors import (
    ChecksumMismatch,
    OffsetConflict,
    ProtocolViolation,
    TusError,
    UploadLengthMismatch,
)
from storage.tus_client.planning import RetryPolicy, next_chunk
from storage.tus_client.progress import ProgressTracker
from storage.tus_client.sources import ByteSource


@dataclass(frozen=True)
class UploadStatus:
    """What HEAD reported."""

    offset: int | None
    length: int | None
    concat: str | None = None


class Endpoint(Protocol):
    async def head(self, url: str) -> UploadStatus: ...

    async def patch(self, url: str, offset: int, source: ByteSource, start: int, end: int,
                    checksum: tuple[str, bytes] | None,
                    on_bytes: Callable[[int], None]) -> int: ...


class RangeUploader:
    """Uploads ``source[base:base + length]`` to the upload at ``url`` (one part)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        policy: RetryPolicy,
        sleep: Callable[[float], Deferred[Any]],
        random: Callable[[], float],
        chunk_size: int | None,
        checksum_algorithm: str | None,
        tracker: ProgressTracker,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        self.endpoint = endpoint
        self.policy = policy
        self.sleep = sleep
        self.random = random
        self.chunk_size = chunk_size
        self.checksum_algorithm = checksum_algorithm
        self.tracker = tracker
        self.is_cancelled = is_cancelled

    async def send(self, url: str, source: ByteSource, base: int, length: int,
                   part: Hashable = 0, status: UploadStatus | None = None,
                   finish_empty: bool = False) -> int:
        """Returns the final offset (== ``length``).

        ``finish_empty``: an empty upload still gets one empty PATCH (Backend.AI
        uploads prepared by the manager only complete on a PATCH).
        """
        run = _PartRun(self, url, source, base, length, part)
        return await run.go(status, finish_empty and length == 0)


class _PartRun:
    def __init__(self, owner: RangeUploader, url: str, source: ByteSource, base: int,
                 length: int, part: Hashable) -> None:
        self.o = owner
        self.url = url
        self.source = source
        self.base = base
        self.length = length
        self.part = part
        self.failures = 0
        self.checksum_failures = 0
        self.confirmed = 0
        self.sent_high = 0

    def _check_cancelled(self) -> None:
        if self.o.is_cancelled():
            raise CancelledError()

    async def _backoff_or_raise(self, err: TusError) -> None:
        """Count a failure; raise ``err`` once the budget is spent, else wait."""
        self._check_cancelled()
        if isinstance(err, ChecksumMismatch):
            self.checksum_failures += 1
            if self.checksum_failures > self.o.policy.checksum_attempts - 1:
                raise err
            return
        if not err.retryable:
            raise err
        self.failures += 1
        if self.failures > self.o.policy.retries:
            raise err
        await self.o.sleep(self.o.policy.delay(self.failures, self.o.random))
        self._check_cancelled()

    async def _head(self) -> UploadStatus:
        while True:
            try:
                return await self.o.endpoint.head(self.url)
            except TusError as err:
                await self._backoff_or_raise(err)

    def _accept_offset(self, status: UploadStatus, first: bool) -> int:
        offset = status.offset
        if offset is None:
            raise ProtocolViolation("HEAD answered without a valid Upload-Offset",
                                    url=self.url, headers=None)
        if status.length is not None and status.length != self.length:
            raise UploadLengthMismatch(
                f"the upload is {status.length} bytes long, the data {self.length}", url=self.url)
        if offset > self.length:
            raise ProtocolViolation(
                f"Upload-Offset {offset} is past the upload length {self.length}", url=self.url)
        if not first:
            if offset < self.confirmed:
                raise ProtocolViolation(
                    f"Upload-Offset went backwards from {self.confirmed} to {offset}", url=self.url)
            if offset > self.sent_high:
                raise ProtocolViolation(
                    f"Upload-Offset {offset} is past the {self.sent_high} bytes sent", url=self.url)
            if offset > self.confirmed:  # the server kept part of the failed PATCH
                self.failures = 0
                self.checksum_failures = 0
        return offset

    async def go(self, status: UploadStatus | None, empty_patch: bool = False) -> int:
        if status is None:
            status = await self._head()
        self.confirmed = self.sent_high = self._accept_offset(status, first=True)
        tracker = self.o.tracker
        tracker.confirm(self.part, self.confirmed)
        while self.confirmed < self.length or empty_patch:
            self._check_cancelled()
            start, end = next_chunk(self.confirmed, self.length, self.o.chunk_size)
            self.sent_high = max(self.sent_high, end)
            try:
                new = await self._patch(start, end)
            except TusError as err:
                tracker.confirm(self.part, self.confirmed)  # in-flight bytes are not on the server
                if empty_patch and self.length == 0 and isinstance(err, OffsetConflict):
                    # A server that completes an empty upload by itself (at
                    # creation or its first HEAD) refuses the finishing PATCH
                    # as complete: done when a HEAD agrees.
                    if self._accept_offset(await self._head(), first=False) == self.length:
                        break
                await self._backoff_or_raise(err)
                self.confirmed = self._accept_offset(await self._head(), first=False)
                tracker.confirm(self.part, self.confirmed)
                continue
            if new < start or new > end:
                raise ProtocolViolation(
                    f"PATCH of [{start}, {end}) answered Upload-Offset {new}", url=self.url)
            if new == start and end > start:
                # a success that took nothing: count it like a failure
                tracker.confirm(self.part, self.confirmed)
                await self._backoff_or_raise(ProtocolViolation(
                    f"the server accepted none of the bytes at offset {start}", url=self.url))
                continue
            self.failures = 0
            self.checksum_failures = 0
            self.confirmed = new
            empty_patch = False
            tracker.confirm(self.part, new)
        return self.confirmed

    async def _patch(self, start: int, end: int) -> int:
        checksum = None
        algorithm = self.o.checksum_algorithm
        if algorithm:
            digest = await self.source.digest(algorithm, self.base + start, self.base + end)
            checksum = (algorithm, digest)
        return await self.o.endpoint.patch(
            self.url, start, self.source, self.base + start, self.base + end, checksum,
            lambda n: self.o.tracker.produced(self.part, n))
