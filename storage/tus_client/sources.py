"""Where the bytes of an upload come from.

A source answers ``read(offset, length)`` with a Deferred, so files are read
off the reactor (``os.pread`` in a thread pool) and never whole: the body
producer asks for one bounded piece at a time.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from typing import IO, Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.threads import deferToThreadPool

from storage.tus_client.errors import SourceError

DIGEST_PIECE = 1 << 20


class ByteSource(Protocol):
    size: int
    random_access: bool  # any offset can be read at any time (parallel parts, checksums)

    def read(self, offset: int, length: int) -> Deferred[bytes]: ...

    def digest(self, algorithm: str, start: int, end: int) -> Deferred[bytes]: ...

    def close(self) -> None: ...


def _in_pool(reactor: Any, threadpool: Any, f: Any, *args: Any) -> Deferred[Any]:
    pool = threadpool if threadpool is not None else reactor.getThreadPool()
    return deferToThreadPool(reactor, pool, f, *args)


class FileSource:
    """A regular file, read with ``os.pread`` in a thread pool."""

    random_access = True

    def __init__(self, file: str | os.PathLike[str] | int | IO[bytes], reactor: Any,
                 threadpool: Any = None, size: int | None = None) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        if isinstance(file, (str, os.PathLike)):
            self.fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._owns_fd = True
        else:
            self.fd = file if isinstance(file, int) else file.fileno()
            self._owns_fd = False
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            if self._owns_fd:
                os.close(self.fd)
            raise SourceError(f"not a regular file: {file!r}")
        self.size = info.st_size if size is None else size

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length and offset + len(data) < self.size:
            # pread may return short on some filesystems: finish the piece
            more = [data]
            got = len(data)
            while got < length:
                piece = os.pread(self.fd, length - got, offset + got)
                if not piece:
                    break
                more.append(piece)
                got += len(piece)
            data = b"".join(more)
        return data

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return _in_pool(self.reactor, self.threadpool, self._pread, offset, length)

    def _digest(self, algorithm: str, start: int, end: int) -> bytes:
        hasher = hashlib.new(algorithm)
        position = start
        while position < end:
            piece = os.pread(self.fd, min(DIGEST_PIECE, end - position), position)
            if not piece:
                raise SourceError("the file shrank while being uploaded")
            hasher.update(piece)
            position += len(piece)
        return hasher.digest()

    def digest(self, algorithm: str, start: int, end: int) -> Deferred[bytes]:
        return _in_pool(self.reactor, self.threadpool, self._digest, algorithm, start, end)

    def close(self) -> None:
        if self._owns_fd:
            os.close(self.fd)
            self._owns_fd = False


class BytesSource:
    """Bytes already in memory (small uploads, tests)."""

    random_access = True

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.size = len(data)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return succeed(bytes(self.data[offset:offset + length]))

    def digest(self, algorithm: str, start: int, end: int) -> Deferred[bytes]:
        return succeed(hashlib.new(algorithm, self.data[start:end]).digest())

    def close(self) -> None:
        pass


class StreamSource:
    """A file-like object of known size read front to back (a pipe, a socket).

    Resuming needs to go back to the server's offset.  A seekable stream
    seeks.  An unseekable one keeps the last ``rewind`` bytes it read, so it
    can go back that far (send chunks no larger than ``rewind`` and any
    interruption can be resumed, even against a server that drops a whole
    interrupted PATCH); further back fails with ``SourceError``.  Skipping
    forward always works.
    """

    def __init__(self, stream: IO[bytes], size: int, reactor: Any, threadpool: Any = None,
                 rewind: int = 8 << 20) -> None:
        self.stream = stream
        self.size = size
        self.reactor = reactor
        self.threadpool = threadpool
        try:
            self.seekable = bool(stream.seekable())
            self.position = stream.tell() if self.seekable else 0
        except (OSError, ValueError, AttributeError):
            self.seekable, self.position = False, 0
        self.start = self.position
        self.random_access = self.seekable
        self.rewind = 0 if self.seekable else rewind
        self.history = bytearray()  # the bytes just before ``position``
        self._lock = DeferredLock()  # one blocking read at a time keeps the position right

    def _read_at(self, offset: int, length: int) -> bytes:
        if self.seekable:
            if offset != self.position:
                self.stream.seek(self.start + offset)
                self.position = offset
            return self._consume(length, keep=True)
        if offset > self.position:
            self._consume(offset - self.position)
        replay = b""
        if offset < self.position:
            behind = self.position - offset
            if behind > len(self.history):
                raise SourceError(
                    f"the stream cannot rewind to byte {offset} (it is at {self.position} "
                    f"and keeps the last {len(self.history)} bytes)")
            start = len(self.history) - behind
            replay = bytes(self.history[start:start + length])
        if len(replay) == length:
            return replay
        return replay + self._consume(length - len(replay), keep=True)

    def _consume(self, length: int, keep: bool = False) -> bytes:
        chunks, got = [], 0
        while got < length:
            piece = self.stream.read(min(length - got, DIGEST_PIECE))
            if not piece:
                break
            got += len(piece)
            if keep:
                chunks.append(piece)
            if self.rewind:
                self.history += piece
                if len(self.history) > self.rewind:
                    del self.history[: len(self.history) - self.rewind]
        self.position += got
        return b"".join(chunks)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self._lock.run(_in_pool, self.reactor, self.threadpool, self._read_at, offset, length)

    def _digest(self, algorithm: str, start: int, end: int) -> bytes:
        hasher = hashlib.new(algorithm)
        position = start
        while position < end:
            piece = self._read_at(position, min(DIGEST_PIECE, end - position))
            if not piece:
                raise SourceError("the stream ended early")
            hasher.update(piece)
            position += len(piece)
        return hasher.digest()

    def digest(self, algorithm: str, start: int, end: int) -> Deferred[bytes]:
        if not self.seekable:
            return Deferred.fromCoroutine(_raise(SourceError("a checksum needs a seekable stream")))
        return self._lock.run(_in_pool, self.reactor, self.threadpool, self._digest,
                              algorithm, start, end)

    def close(self) -> None:
        pass


async def _raise(exc: Exception) -> bytes:
    raise exc


def as_source(data: Any, reactor: Any, size: int | None = None, threadpool: Any = None) -> ByteSource:
    """A ``ByteSource`` for a path, bytes, a file object or a source."""
    if hasattr(data, "read") and hasattr(data, "digest") and hasattr(data, "size"):
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return BytesSource(bytes(data))
    if isinstance(data, (str, os.PathLike)):
        return FileSource(data, reactor, threadpool)
    if hasattr(data, "read"):
        try:
            fd = data.fileno()
            if stat.S_ISREG(os.fstat(fd).st_mode):
                offset = data.tell() if data.seekable() else 0
                if offset == 0:
                    return FileSource(fd, reactor, threadpool, size)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass
        if size is None:
            raise ValueError("the size of a stream must be given")
        return StreamSource(data, size, reactor, threadpool)
    raise TypeError(f"cannot upload from {type(data).__name__}")
