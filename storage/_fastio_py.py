"""Pure-Python fallback of ``storage._fastio``: the same functions, same results.

Same errors too: ``OSError(errno, strerror)``, and when a loop fails
part-way (ENOSPC, EDQUOT, EIO...) the bytes moved before the failure are in
``exc.written``.  The ``os`` functions retry EINTR themselves (PEP 475).

Only pool threads call these (they block).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

# Errors after which copy_file_range cannot work for this pair of files and a
# plain read/write loop must do the copy.
_CFR_FALLBACK = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}
_CHUNK = 1 << 20
_MAX_IOV = 1024
_MAX_SENDFILE = 0x7FFFF000


def _error(err: int, written: int | None = None) -> OSError:
    exc = OSError(err, os.strerror(err))
    if written is not None:
        exc.written = written  # type: ignore[attr-defined]
    return exc


def _with_written(exc: OSError, written: int) -> OSError:
    exc.written = written  # type: ignore[attr-defined]
    return exc


def sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    """One ``sendfile(2)``: the bytes sent, maybe fewer than asked (0 at end of
    file); raises ``BlockingIOError`` when a non-blocking socket is full."""
    if offset < 0 or count < 0:
        raise _error(errno.EINVAL)
    return os.sendfile(out_fd, in_fd, offset, min(count, _MAX_SENDFILE))


def copy_file_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, count: int) -> int:
    """One ``copy_file_range(2)``: the bytes copied (0 at end of file)."""
    if src_offset < 0 or dst_offset < 0 or count < 0:
        raise _error(errno.EINVAL)
    return os.copy_file_range(src_fd, dst_fd, count, src_offset, dst_offset)


def _pwrite_buf(fd: int, data: bytes, offset: int, done_before: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise _with_written(exc, done_before + done) from None
    return done


def _copy_loop(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, count: int, done_before: int) -> int:
    done = 0
    while done < count:
        try:
            data = os.pread(src_fd, min(_CHUNK, count - done), src_offset + done)
        except OSError as exc:
            raise _with_written(exc, done_before + done) from None
        if not data:
            break
        done += _pwrite_buf(dst_fd, data, dst_offset + done, done_before + done)
    return done


def copy_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, count: int) -> int:
    """Copy up to ``count`` bytes with ``copy_file_range`` (a reflink or an
    in-kernel copy), falling back to a pread/pwrite loop where the kernel or
    filesystem refuses (EXDEV, ENOSYS, EINVAL, EOPNOTSUPP...).  Returns the
    bytes copied (fewer only at end of file).  A failure part-way (ENOSPC,
    EDQUOT, EIO) raises ``OSError`` with the bytes copied before it in
    ``exc.written``."""
    if src_offset < 0 or dst_offset < 0 or count < 0:
        raise _error(errno.EINVAL, 0)
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(
                src_fd, dst_fd, min(count - done, _MAX_SENDFILE), src_offset + done, dst_offset + done
            )
        except OSError as exc:
            if exc.errno in _CFR_FALLBACK:
                return done + _copy_loop(src_fd, dst_fd, src_offset + done, dst_offset + done, count - done, done)
            raise _with_written(exc, done) from None
        if n == 0:
            break
        done += n
    return done


def pwrite_all(fd: int, buffers: Iterable[bytes], offset: int) -> int:
    """Write every buffer (any bytes-like object) at ``offset`` in order, with
    ``pwritev``, retrying short writes.  Returns the total.  A failure part-way
    raises ``OSError`` with the bytes written before it in ``exc.written``."""
    if offset < 0:
        raise _error(errno.EINVAL, 0)
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
    written = 0
    first = 0
    while first < len(views):
        try:
            n = os.pwritev(fd, views[first:first + _MAX_IOV], offset + written)
        except OSError as exc:
            raise _with_written(exc, written) from None
        written += n
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:
            views[first] = views[first][n:]
    return written


def fdatasync(fd: int) -> None:
    """``fdatasync(2)``: the file's data (and size) reach stable storage."""
    os.fdatasync(fd)


def fallocate(fd: int, offset: int, length: int) -> None:
    """``posix_fallocate(3)``: reserve blocks so later writes cannot hit ENOSPC."""
    os.posix_fallocate(fd, offset, length)


def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
    """``posix_fadvise(2)`` (e.g. ``os.POSIX_FADV_SEQUENTIAL`` before a download)."""
    os.posix_fadvise(fd, offset, length, advice)
