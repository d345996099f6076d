"""Pure-Python fallback of ``storage._fastio``: the same functions, same results.

Same errors too: ``OSError(errno, strerror)``, and when a loop fails
part-way (ENOSPC, EDQUOT, EIO...) the bytes moved before the failure are in
``exc.written``.  The ``os`` functions retry EINTR themselves (PEP 475).

Only pool threads call these (they block).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
from collections.abc import Iterable
from typing import Any

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


# How splice_receive stopped (besides having moved every byte asked for).
RECEIVED_ALL = 0
RECEIVED_EOF = 1  # the peer closed its side
RECEIVED_WAITED = 2  # nothing came for wait_ms
RECEIVED_STOPPED = 3  # stop_fd became readable


def _load_sync_file_range() -> Any:
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_sync_file_range = _load_sync_file_range()


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    """``sync_file_range(2)`` (e.g. start write-back without waiting for it)."""
    if _sync_file_range is None:
        raise _error(errno.ENOSYS)
    if _sync_file_range(fd, offset, nbytes, flags) != 0:
        raise _error(ctypes.get_errno())


def _set_lowat(sock_fd: int, value: int) -> bool:
    sock = socket.socket(fileno=sock_fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        return True
    except OSError:
        return False
    finally:
        sock.detach()


def splice_receive(
    sock_fd: int, file_fd: int, pipe_r: int, pipe_w: int, offset: int, count: int,
    stop_fd: int, lowat: int, wait_ms: int, writeback_from: int, writeback_step: int,
) -> tuple[int, int, int]:
    """The compiled ``splice_receive`` on ``os.splice`` and ``select.poll``
    (docs/fastio.md): up to ``count`` bytes socket → pipe → file at
    ``offset``; returns ``(consumed, how, writeback_from)``, raises
    ``OSError`` carrying ``consumed`` and ``written``."""
    if offset < 0 or count < 0 or lowat < 1:
        raise _error(errno.EINVAL)
    consumed = written = 0
    current_lowat = -1
    poller = select.poll()
    poller.register(sock_fd, select.POLLIN)
    if stop_fd >= 0:
        poller.register(stop_fd, select.POLLIN)
    try:
        while consumed < count:
            try:
                n = os.splice(sock_fd, pipe_w, count - consumed, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                want = min(lowat, count - consumed)
                if want != current_lowat and _set_lowat(sock_fd, want):
                    current_lowat = want
                events = poller.poll(wait_ms)
                if any(fd == stop_fd and ev for fd, ev in events):
                    return consumed, RECEIVED_STOPPED, writeback_from
                if not events:
                    return consumed, RECEIVED_WAITED, writeback_from
                continue
            if n == 0:
                return consumed, RECEIVED_EOF, writeback_from
            consumed += n
            while n:
                moved = os.splice(pipe_r, file_fd, n, offset_dst=offset + written, flags=os.SPLICE_F_MOVE)
                if moved == 0:
                    raise _error(errno.EIO)  # the pipe cannot be empty here
                written += moved
                n -= moved
            if writeback_step > 0 and offset + written - writeback_from >= writeback_step:
                if _sync_file_range is not None:
                    _sync_file_range(file_fd, writeback_from, offset + written - writeback_from, 2)
                writeback_from = offset + written
    except OSError as exc:
        err = _with_written(_error(exc.errno) if exc.errno else exc, written)
        err.consumed = consumed  # type: ignore[attr-defined]
        raise err from None
    return consumed, RECEIVED_ALL, writeback_from
