"""``storage-proxy-download URL [-o FILE]``: a resumable HTTP download with progress.

A partial local file is continued with ``Range: bytes=<size>-`` (the server
must answer 206 with a matching ``Content-Range``; a 200 means it ignored the
range, and the file is downloaded again from the start).  The body streams to
disk through a thread (the socket is paused while the disk is behind).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from storage.cli.disposition import choose_filename
from storage.cli.progress import ProgressDisplay
from storage.cli.running import Failed, run
from storage.tus_client.errors import (
    ConnectionFailed,
    ServerError,
    TusError,
    UnexpectedStatus,
    parse_problem,
)
from storage.tus_client.http import NETWORK_ERRORS
from storage.tus_client.planning import RetryPolicy
from storage.tus_client.progress import RateMeter

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)\s*$")
HIGH_WATER = 8 << 20
LOW_WATER = 2 << 20


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes a-b/T`` → (a, b + 1, T or None)."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None
    start, last, total = int(match[1]), int(match[2]), match[3]
    if last < start:
        return None
    return start, last + 1, None if total == "*" else int(total)


class BodyToFile(Protocol):
    """Writes a response body at ``position`` of ``fd`` with one write in flight."""

    transport: Any  # the response's producer: pause/resume/stopProducing

    def __init__(self, fd: int, position: int, on_bytes: Callable[[int], None]) -> None:
        self.fd = fd
        self.position = position
        self.on_bytes = on_bytes
        self.queue: list[bytes] = []
        self.queued = 0
        self.writing = False
        self.paused = False
        self.ended: Failure | None = None
        self.finished: Deferred[int] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.queue.append(data)
        self.queued += len(data)
        if self.queued > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pauseProducing()
        self._pump()

    def _pump(self) -> None:
        if self.writing or self.finished.called:
            return
        if not self.queue:
            if self.ended is not None:
                self._finish()
            return
        data = b"".join(self.queue)
        self.queue = []
        self.writing = True
        deferToThread(_pwrite_all, self.fd, data, self.position).addCallbacks(
            self._written, self._write_failed, callbackArgs=(len(data),))

    def _written(self, _: None, count: int) -> None:
        self.writing = False
        self.position += count
        self.queued -= count
        self.on_bytes(count)
        if self.paused and self.queued < LOW_WATER and self.ended is None:
            self.paused = False
            self.transport.resumeProducing()
        self._pump()

    def _write_failed(self, failure: Failure) -> None:
        self.writing = False
        if self.ended is None:
            self.transport.stopProducing()
        if not self.finished.called:
            self.finished.errback(failure)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.ended = reason
        if not self.writing:
            self._pump()

    def _finish(self) -> None:
        assert self.ended is not None
        if self.ended.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(self.position)
        else:
            self.finished.errback(self.ended)


class _Discard(Protocol):
    transport: Any

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(None)


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


def _header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[-1] if values else None


@dataclass
class Downloader:
    reactor: Any
    url: str
    output: Path | None
    retry: RetryPolicy
    on_progress: Callable[[int, int | None, float], None]
    on_message: Callable[[str], None]
    random: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        self.pool = HTTPConnectionPool(self.reactor, persistent=True)
        self.http = HTTPClient(Agent(self.reactor, pool=self.pool, connectTimeout=30))
        self.meter = RateMeter(self.reactor.seconds)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()

    def _local_size(self) -> int:
        path = self.output
        return path.stat().st_size if path is not None and path.exists() else 0

    async def run(self) -> Path:
        failures = 0
        while True:
            before = self._local_size()
            try:
                return await self._attempt()
            except TusError as err:
                if not err.retryable:
                    raise
                if self._local_size() > before:
                    failures = 0  # the attempt got somewhere: count failures in a row
                failures += 1
                if failures > self.retry.retries:
                    raise
                delay = self.retry.delay(failures, self.random)
                self.on_message(f"{err}; retrying in {delay:.1f}s")
                await deferLater(self.reactor, delay, lambda: None)

    async def _get(self, headers: dict[str, str]) -> Any:
        try:
            return await self.http.get(
                self.url, headers=Headers({k: [v] for k, v in headers.items()}), unbuffered=True)
        except NETWORK_ERRORS as exc:
            raise ConnectionFailed(f"GET {self.url}: {exc}", url=self.url) from exc

    async def _discard(self, response: Any) -> None:
        discard = _Discard()
        response.deliverBody(discard)
        await discard.done

    async def _attempt(self) -> Path:
        path = self.output
        existing = path.stat().st_size if path is not None and path.exists() else 0
        response = await self._get({"Range": f"bytes={existing}-"} if existing else {})
        if path is None:
            path = self.output = Path(choose_filename(
                _header(response, "Content-Disposition"), self.url))
            if path.exists() and path.stat().st_size > 0:
                # learnt the name only now: ask again for the missing part
                await self._discard(response)
                return await self._attempt()
        code = response.code
        if code == 416 and existing:
            await self._discard(response)
            match = _UNSATISFIED.match(_header(response, "Content-Range") or "")
            total = int(match[1]) if match else None
            if total == existing:
                self.on_message(f"{path} is already complete ({existing} bytes)")
                self.on_progress(existing, existing, 0.0)
                return path
            self.on_message(f"{path} does not match the remote file: downloading it again")
            await deferToThread(os.truncate, path, 0)
            return await self._attempt()
        if code == 206 and existing:
            content_range = parse_content_range(_header(response, "Content-Range"))
            if content_range is None or content_range[0] != existing:
                await self._discard(response)
                raise Failed(f"the server answered the range {existing}- with "
                             f"Content-Range {_header(response, 'Content-Range')!r}")
            start, total = existing, content_range[2]
        elif code == 200:
            if existing:
                self.on_message("the server ignored the range: downloading from the start")
            start = 0
            length = response.length if isinstance(response.length, int) else None
            total = length
        else:
            body = await response.content()
            problem = parse_problem(body, _header(response, "Content-Type"))
            kind = ServerError if code >= 500 and code not in (501, 505, 507) else UnexpectedStatus
            raise kind(status=code, problem=problem, url=self.url)
        return await self._write_body(response, path, start, total)

    async def _write_body(self, response: Any, path: Path, start: int,
                          total: int | None) -> Path:
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = await deferToThread(os.open, path, flags, 0o644)
        try:
            if start == 0:
                await deferToThread(os.ftruncate, fd, 0)
            self.on_progress(start, total, self.meter.rate())

            def on_bytes(count: int) -> None:
                self.meter.add(count)
                self.on_progress(writer.position, total, self.meter.rate())

            writer = BodyToFile(fd, start, on_bytes)
            response.deliverBody(writer)
            try:
                end = await writer.finished
            except NETWORK_ERRORS as exc:
                raise ConnectionFailed(f"the download broke off: {exc}", url=self.url) from exc
            except Exception as exc:
                if writer.ended is not None and not isinstance(exc, OSError):
                    raise ConnectionFailed(f"the download broke off: {exc}", url=self.url) from exc
                raise
        finally:
            await deferToThread(os.close, fd)
        if total is not None and end != total:
            raise ConnectionFailed(f"the connection closed at byte {end} of {total}", url=self.url)
        return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storage-proxy-download",
        description="Download URL to a file, continuing a partial file with a Range request.")
    parser.add_argument("url", metavar="URL")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                        help="where to save (default: the name from Content-Disposition "
                             "or the URL, in the current directory)")
    parser.add_argument("--retries", type=int, default=5, metavar="N",
                        help="retries in a row after network errors or 5xx (default 5)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error("--retries must not be negative")

    async def operation(reactor: Any) -> None:
        display = ProgressDisplay(sys.stderr, "download", sys.stderr.isatty(), reactor.seconds)
        last: dict[str, Any] = {"sent": 0, "total": None, "rate": 0.0}

        def on_progress(sent: int, total: int | None, rate: float) -> None:
            last.update(sent=sent, total=total, rate=rate or last["rate"])
            if downloader.output is not None:
                display.label = f"download {downloader.output.name}"
            if not args.quiet:
                display.update(sent, total, rate)

        def on_message(text: str) -> None:
            if not args.quiet:
                display.message(text)

        downloader = Downloader(reactor, args.url, args.output,
                                RetryPolicy(retries=args.retries), on_progress, on_message)
        try:
            path = await downloader.run()
        finally:
            await downloader.close()
        if not args.quiet:
            display.update(last["sent"], last["total"], last["rate"], final=True)
            display.message(f"saved {path}")
        sys.stdout.write(f"{path}\n")

    run(operation, "download failed")


if __name__ == "__main__":
    main()
