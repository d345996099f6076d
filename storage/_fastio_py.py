"""Pure-Python fallback of ``storage._fastio``: the same functions, same results.

Only pool threads call these (they block).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

# Errors after which copy_file_range cannot work for this pair of files and a
# plain read/write loop must do the copy.
_CFR_FALLBACK = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}
_CHUNK = 1 << 20


def sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    """One ``sendfile(2)`` call: the bytes sent (may be short; raises on EAGAIN)."""
    return os.sendfile(out_fd, in_fd, offset, count)


def copy_file_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, count: int) -> int:
    """One ``copy_file_range(2)`` call: the bytes copied (0 at end of file)."""
    return os.copy_file_range(src_fd, dst_fd, count, src_offset, dst_offset)


def _copy_loop(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, count: int) -> int:
    done = 0
    while done < count:
        data = os.pread(src_fd, min(_CHUNK, count - done), src_offset + done)
        if not data:
            break
        view = memoryview(data)
        while view:
            n = os.pwrite(dst_fd, view, dst_offset + done)
            view = view[n:]
            done += n
    return done


def copy_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, count: int) -> int:
    """Copy up to ``count`` bytes, with copy_file_range where the kernel allows
    (a reflink on XFS), else a pread/pwrite loop.  Returns the bytes copied
    (fewer only at end of file); ENOSPC/EDQUOT propagate as OSError after the
    bytes before them are written."""
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src_fd, dst_fd, count - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if exc.errno in _CFR_FALLBACK:
                return done + _copy_loop(src_fd, dst_fd, src_offset + done, dst_offset + done, count - done)
            raise
        if n == 0:
            break
        done += n
    return done


def pwrite_all(fd: int, buffers: Sequence[bytes], offset: int) -> int:
    """Write every buffer at ``offset`` in order (``pwritev``, retried on short writes)."""
    total = sum(len(b) for b in buffers)
    views = [memoryview(b) for b in buffers if len(b)]
    written = 0
    while views:
        n = os.pwritev(fd, views, offset + written)
        written += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    assert written == total
    return written
