# cython: language_level=3, boundscheck=False, wraparound=False
"""The byte-moving hot path, compiled: thin loops around Linux syscalls.

Same names, arguments, results and errors as ``storage._fastio_py`` (tests
run both).  The GIL is released around every syscall, so pool threads move
bytes while the reactor keeps running; EINTR is retried.  Errors are
``OSError(errno, strerror)`` (so ``BlockingIOError``, ``BrokenPipeError``...
as the os module raises them).  When a loop fails part-way (ENOSPC, EDQUOT,
EIO...), the bytes moved before the failure are in ``exc.written``.

Only pool threads call these: they block.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EINTR, errno
from libc.stdlib cimport free, malloc
from posix.types cimport off_t

import os

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t c_sendfile "sendfile" (int out_fd, int in_fd, off_t *offset, size_t count)

cdef extern from "<unistd.h>" nogil:
    ssize_t c_pread "pread" (int fd, void *buf, size_t count, off_t offset)
    ssize_t c_pwrite "pwrite" (int fd, const void *buf, size_t count, off_t offset)
    ssize_t c_copy_file_range "copy_file_range" (int fd_in, off_t *off_in, int fd_out,
                                                 off_t *off_out, size_t len, unsigned int flags)
    int c_fdatasync "fdatasync" (int fd)

cdef extern from "<fcntl.h>" nogil:
    ssize_t c_splice "splice" (int fd_in, off_t *off_in, int fd_out, off_t *off_out,
                               size_t len, unsigned int flags)
    int c_sync_file_range "sync_file_range" (int fd, off_t offset, off_t nbytes, unsigned int flags)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int c_poll "poll" (pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN

cdef extern from "<sys/socket.h>" nogil:
    int c_setsockopt "setsockopt" (int sockfd, int level, int optname, const void *optval, unsigned int optlen)
    enum:
        SOL_SOCKET
        SO_RCVLOWAT

cdef extern from "<errno.h>" nogil:
    enum:
        EAGAIN

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t c_pwritev "pwritev" (int fd, const iovec *iov, int iovcnt, off_t offset)

# copy_file_range refusals after which a read/write loop must do the copy.
_CFR_FALLBACK = frozenset(
    getattr(__import__("errno"), name)
    for name in ("EXDEV", "ENOSYS", "EINVAL", "EOPNOTSUPP", "EBADF", "ETXTBSY")
)
cdef enum:
    CHUNK = 1 << 20       # the read/write fallback's buffer
    MAX_IOV = 1024        # IOV_MAX on Linux
    MAX_SENDFILE = 0x7ffff000  # the most Linux moves in one call


cdef object _error(int err, long long written=-1):
    exc = OSError(err, os.strerror(err))
    if written >= 0:
        exc.written = written
    return exc


cdef int _retry_eintr() except -1:
    # A signal interrupted a syscall: let Python run its handlers (no-op off
    # the main thread), then the caller retries.
    PyErr_CheckSignals()
    return 0


def sendfile(int out_fd, int in_fd, long long offset, long long count):
    """One ``sendfile(2)``: the bytes sent, maybe fewer than asked (0 at end of
    file); raises ``BlockingIOError`` when a non-blocking socket is full."""
    if offset < 0 or count < 0:
        raise _error(22)
    cdef off_t off = offset
    cdef size_t n = <size_t>min(count, MAX_SENDFILE)
    cdef ssize_t r
    cdef int err = 0
    while True:
        with nogil:
            r = c_sendfile(out_fd, in_fd, &off, n)
            if r < 0:
                err = errno
        if r >= 0:
            return r
        if err != EINTR:
            raise _error(err)
        _retry_eintr()


cdef long long _pwrite_buf(int fd, const char *buf, size_t length, off_t offset,
                           long long done_before) except -1:
    """Write all of ``buf`` (retrying short writes); raises with ``written``."""
    cdef size_t done = 0
    cdef ssize_t r
    cdef int err = 0
    while done < length:
        with nogil:
            r = c_pwrite(fd, buf + done, length - done, offset + <off_t>done)
            if r < 0:
                err = errno
        if r < 0:
            if err == EINTR:
                _retry_eintr()
                continue
            raise _error(err, done_before + <long long>done)
        done += <size_t>r
    return <long long>done


cdef long long _copy_loop(int src_fd, int dst_fd, long long src_offset, long long dst_offset,
                          long long count, long long done_before) except -1:
    """pread/pwrite through one buffer: the bytes copied (fewer only at EOF)."""
    cdef char *buf = <char *>malloc(CHUNK)
    if buf == NULL:
        raise MemoryError()
    cdef long long done = 0
    cdef ssize_t r
    cdef size_t want
    cdef int err = 0
    try:
        while done < count:
            want = <size_t>min(<long long>CHUNK, count - done)
            with nogil:
                r = c_pread(src_fd, buf, want, <off_t>(src_offset + done))
                if r < 0:
                    err = errno
            if r < 0:
                if err == EINTR:
                    _retry_eintr()
                    continue
                raise _error(err, done_before + done)
            if r == 0:
                break
            done += _pwrite_buf(dst_fd, buf, <size_t>r, <off_t>(dst_offset + done), done_before + done)
        return done
    finally:
        free(buf)


def copy_range(int src_fd, int dst_fd, long long src_offset, long long dst_offset, long long count):
    """Copy up to ``count`` bytes with ``copy_file_range`` (a reflink or an
    in-kernel copy), falling back to a pread/pwrite loop where the kernel or
    filesystem refuses (EXDEV, ENOSYS, EINVAL, EOPNOTSUPP...).  Returns the
    bytes copied (fewer only at end of file).  A failure part-way (ENOSPC,
    EDQUOT, EIO) raises ``OSError`` with the bytes copied before it in
    ``exc.written``."""
    if src_offset < 0 or dst_offset < 0 or count < 0:
        raise _error(22, 0)
    cdef long long done = 0
    cdef off_t soff
    cdef off_t doff
    cdef ssize_t r
    cdef int err = 0
    while done < count:
        soff = src_offset + done
        doff = dst_offset + done
        with nogil:
            r = c_copy_file_range(src_fd, &soff, dst_fd, &doff,
                                  <size_t>min(count - done, <long long>MAX_SENDFILE), 0)
            if r < 0:
                err = errno
        if r < 0:
            if err == EINTR:
                _retry_eintr()
                continue
            if err in _CFR_FALLBACK:
                return done + _copy_loop(src_fd, dst_fd, src_offset + done, dst_offset + done,
                                         count - done, done)
            raise _error(err, done)
        if r == 0:
            break
        done += r
    return done


def pwrite_all(int fd, buffers, long long offset):
    """Write every buffer (any bytes-like object) at ``offset`` in order, with
    ``pwritev``, retrying short writes.  Returns the total.  A failure part-way
    raises ``OSError`` with the bytes written before it in ``exc.written``."""
    if offset < 0:
        raise _error(22, 0)
    bufs = [b for b in buffers]
    cdef Py_ssize_t nbufs = len(bufs)
    if nbufs == 0:
        return 0
    cdef Py_buffer *views = <Py_buffer *>malloc(nbufs * sizeof(Py_buffer))
    cdef iovec *iov = <iovec *>malloc(nbufs * sizeof(iovec))
    cdef Py_ssize_t held = 0
    cdef Py_ssize_t i, first = 0
    cdef long long total = 0, written = 0
    cdef ssize_t r
    cdef size_t n
    cdef int err = 0, cnt
    if views == NULL or iov == NULL:
        free(views)
        free(iov)
        raise MemoryError()
    try:
        for i in range(nbufs):
            PyObject_GetBuffer(bufs[i], &views[i], PyBUF_SIMPLE)
            held += 1
            iov[i].iov_base = views[i].buf
            iov[i].iov_len = <size_t>views[i].len
            total += views[i].len
        # Skip empty buffers up front so the loop below only sees real data.
        while first < nbufs and iov[first].iov_len == 0:
            first += 1
        while first < nbufs:
            cnt = <int>min(nbufs - first, <Py_ssize_t>MAX_IOV)
            with nogil:
                r = c_pwritev(fd, &iov[first], cnt, <off_t>(offset + written))
                if r < 0:
                    err = errno
            if r < 0:
                if err == EINTR:
                    _retry_eintr()
                    continue
                raise _error(err, written)
            written += r
            n = <size_t>r
            while first < nbufs and n >= iov[first].iov_len:
                n -= iov[first].iov_len
                first += 1
            if first < nbufs and n:
                iov[first].iov_base = <char *>iov[first].iov_base + n
                iov[first].iov_len -= n
            while first < nbufs and iov[first].iov_len == 0:
                first += 1
        return written
    finally:
        for i in range(held):
            PyBuffer_Release(&views[i])
        free(views)
        free(iov)


def fdatasync(int fd):
    """``fdatasync(2)``: the file's data (and size) reach stable storage."""
    cdef int r
    cdef int err = 0
    while True:
        with nogil:
            r = c_fdatasync(fd)
            if r < 0:
                err = errno
        if r == 0:
            return None
        if err != EINTR:
            raise _error(err)
        _retry_eintr()


# How splice_receive stopped (besides having moved every byte asked for).
cdef enum:
    R_ALL = 0
    R_EOF = 1      # the peer closed its side
    R_WAITED = 2   # nothing came for wait_ms
    R_STOPPED = 3  # stop_fd became readable

RECEIVED_ALL, RECEIVED_EOF, RECEIVED_WAITED, RECEIVED_STOPPED = R_ALL, R_EOF, R_WAITED, R_STOPPED


def sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags):
    """``sync_file_range(2)`` (e.g. start write-back without waiting for it)."""
    cdef int r
    cdef int err = 0
    with nogil:
        r = c_sync_file_range(fd, <off_t>offset, <off_t>nbytes, flags)
        if r < 0:
            err = errno
    if r < 0:
        raise _error(err)


def splice_receive(int sock_fd, int file_fd, int pipe_r, int pipe_w, long long offset, long long count,
                   int stop_fd, int lowat, int wait_ms, long long writeback_from, long long writeback_step):
    """Move up to ``count`` bytes from a non-blocking socket into a file at
    ``offset``: ``splice`` socket → pipe → page cache, the whole loop without
    the GIL (dozens of uploads at once then hardly contend for it).

    Waits with ``poll`` for the socket (``SO_RCVLOWAT`` = ``lowat``, or what
    is left) and ``stop_fd`` (-1: none).  Every ``writeback_step`` bytes
    (0: never) starts their write-back with ``sync_file_range``.

    Returns ``(consumed, how, writeback_from)``: ``how`` is one of the
    ``RECEIVED_*`` values.  A failure raises ``OSError`` with ``consumed``
    (bytes taken from the socket) and ``written`` (bytes in the file).
    """
    if offset < 0 or count < 0 or lowat < 1:
        raise _error(22)
    cdef long long consumed = 0, written = 0, wb_from = writeback_from, pending, want
    cdef int how = -1, err = 0, current_lowat = -1, lw, nfds
    cdef ssize_t r
    cdef off_t off
    cdef pollfd fds[2]
    with nogil:
        while consumed < count:
            r = c_splice(sock_fd, NULL, pipe_w, NULL, <size_t>(count - consumed), SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if r > 0:
                consumed += r
                pending = r
                while pending > 0:
                    off = offset + written
                    r = c_splice(pipe_r, NULL, file_fd, &off, <size_t>pending, SPLICE_F_MOVE)
                    if r < 0:
                        if errno == EINTR:
                            continue
                        err = errno
                        break
                    if r == 0:
                        err = 5  # EIO: the pipe cannot be empty here
                        break
                    written += r
                    pending -= r
                if err:
                    break
                if writeback_step > 0 and offset + written - wb_from >= writeback_step:
                    c_sync_file_range(file_fd, <off_t>wb_from, <off_t>(offset + written - wb_from), 2)
                    wb_from = offset + written
                continue
            if r == 0:
                how = R_EOF
                break
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                err = errno
                break
            # Wake when a worthwhile amount is queued (or the rest of the body).
            want = count - consumed
            lw = <int>(want if want < lowat else lowat)
            if lw != current_lowat:
                if c_setsockopt(sock_fd, SOL_SOCKET, SO_RCVLOWAT, &lw, sizeof(lw)) == 0:
                    current_lowat = lw
            fds[0].fd = sock_fd
            fds[0].events = POLLIN
            fds[0].revents = 0
            fds[1].fd = stop_fd
            fds[1].events = POLLIN
            fds[1].revents = 0
            nfds = 2 if stop_fd >= 0 else 1
            r = c_poll(fds, nfds, wait_ms)
            if r < 0:
                if errno == EINTR:
                    continue
                err = errno
                break
            if nfds == 2 and fds[1].revents:
                how = R_STOPPED
                break
            if r == 0:
                how = R_WAITED
                break
    if err:
        exc = _error(err, written)
        exc.consumed = consumed
        raise exc
    if how < 0:
        how = R_ALL
    return consumed, how, wb_from
