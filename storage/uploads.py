"""tus upload state, kept in the volume beside the bytes.

An upload is two files in ``<vfolder>/.upload/``:

* ``<session>``: the staging file the body is written into, at its offset;
* ``<session>.state``: a small JSON document (length, offset of record,
  relpath, expiry, kind, ...), always replaced atomically (write, fsync,
  rename).

Once complete, nothing of the upload stays in the vfolder: the file at its
target carries an extended attribute naming the upload (``COMPLETED_XATTR``),
which is what a HEAD after completion reads; the state file goes and
``.upload/`` is removed once empty.  Where the filesystem has no user
xattrs, the completed state is kept outside every vfolder instead, in the
volume's ``completion_records_dir``, until the token expires.

No process memory and no Redis: a restarted daemon, or a second daemon over
the same shared directory, reads the same state.  A writer holds an
exclusive ``flock`` on the staging file for as long as it writes, so two
PATCHes on one upload (from one daemon or two) never interleave bytes.

The offset of record never exceeds the durable bytes: the staging file is
``fdatasync``-ed before a state naming a larger offset is written.

Everything here blocks: call it through ``BlockingPool`` (``prepare_upload``
does so itself).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import select
import socket
import stat
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any

from storage import fastio
from storage import quota as quota_mod
from storage.errors import (
    InsufficientStorage,
    InvalidAPIParameters,
    InvalidPath,
    NotFound,
    StorageError,
    VFolderNotFound,
    is_disk_full,
)
from storage.fs import crossmove
from storage.fs.atomic import fsync_dir, write_atomic
from storage.paths import is_inside, validate_relpath

STAGING_DIR = ".upload"
STATE_SUFFIX = ".state"
# Under a volume's root (its private dir, as the VFS metadata): completion
# records of uploads whose target cannot carry COMPLETED_XATTR.
COMPLETION_RECORDS = ".storage-proxy/completed-uploads"
STATE_VERSION = 1
DEFAULT_EXPIRE = 7 * 86400.0

# Kinds of upload (the tus concatenation extension adds the last two).
NORMAL = "normal"
PARTIAL = "partial"
FINAL = "final"


class UploadNotFound(NotFound):
    problem = "tus-session-not-found"
    title = "No such upload session"
    # upstream's TusSessionNotFoundError
    error_code = "storage-proxy_read_not-found"


class UploadBusy(StorageError):
    """Another PATCH (here or in another daemon) is writing this upload."""

    status = 423
    problem = "tus-upload-locked"
    title = "The upload is being written by another request"
    error_code = "storage-proxy_update_conflict"


class UploadCompleted(StorageError):
    status = 409
    problem = "tus-upload-completed"
    title = "The upload is already complete"
    error_code = "storage-proxy_update_conflict"


def new_session_id() -> str:
    return secrets.token_hex(16)


def is_session_id(text: object) -> bool:
    return isinstance(text, str) and len(text) == 32 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class UploadState:
    session: str
    relpath: str
    length: int
    offset: int = 0
    created: float = 0.0
    expires: float = 0.0
    kind: str = NORMAL
    parts: tuple[str, ...] = ()  # a final upload's partial sessions, in order
    completed: bool = False
    version: int = STATE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["parts"] = list(self.parts)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> UploadState:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError("unknown upload state format")
        return cls(
            session=str(data["session"]),
            relpath=str(data["relpath"]),
            length=int(data["length"]),
            offset=int(data["offset"]),
            created=float(data.get("created", 0.0)),
            expires=float(data.get("expires", 0.0)),
            kind=str(data.get("kind", NORMAL)),
            parts=tuple(str(p) for p in data.get("parts", ())),
            completed=bool(data.get("completed", False)),
            extra=dict(data.get("extra") or {}),
        )


# -- paths ----------------------------------------------------------------


def staging_dir(vfolder: Path) -> Path:
    return vfolder / STAGING_DIR


def staging_path(vfolder: Path, session: str) -> Path:
    return vfolder / STAGING_DIR / session


def state_path(vfolder: Path, session: str) -> Path:
    return vfolder / STAGING_DIR / (session + STATE_SUFFIX)


def completion_records_dir(volume_root: str | Path) -> Path:
    """Where a volume keeps the completion records of uploads whose target
    cannot carry ``COMPLETED_XATTR``: beside the volume's vfolders, never in one."""
    return Path(volume_root) / COMPLETION_RECORDS


def completion_record_path(records: Path, session: str) -> Path:
    return records / (session + STATE_SUFFIX)


# -- state files --------------------------------------------------------------


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_boot_id: list[str] = []


def current_boot_id() -> str:
    """This running kernel's boot id ("" where there is none)."""
    if not _boot_id:
        try:
            _boot_id.append(_read_small_file(Path(BOOT_ID_PATH)).decode().strip())
        except (OSError, UnicodeDecodeError):
            _boot_id.append("")
    return _boot_id[0]


def write_state(vfolder: Path, state: UploadState, *, sync_dir: bool = False) -> None:
    """Replace the state file atomically (a reader sees the old or the new one).

    Every state records the boot id of the kernel that wrote it: bytes a
    killed daemon left in the staging file are only trusted on that boot.
    """
    state = replace(state, extra=dict(state.extra, boot_id=current_boot_id()))
    write_atomic(state_path(vfolder, state.session), state.to_json(), sync_dir=sync_dir)


def _read_small_file(path: Path) -> bytes:
    # open/read/close and nothing else: pathlib's read_bytes adds four more
    # system calls, each a chance to lose the GIL under load.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_state(vfolder: Path, session: str) -> UploadState | None:
    """The upload's state, or None if there is no such upload (or it is unreadable)."""
    try:
        raw = _read_small_file(state_path(vfolder, session))
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        state = UploadState.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return None
    if state.session != session:
        return None
    return state


def create_upload(
    vfolder: Path,
    session: str,
    relpath: str,
    length: int,
    *,
    expire: float = DEFAULT_EXPIRE,
    kind: str = NORMAL,
    parts: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    now: float | None = None,
) -> UploadState:
    """Create the empty staging file and its state (blocking)."""
    if not vfolder.is_dir():
        raise VFolderNotFound(f"no such vfolder: {vfolder.name}")
    now = time.time() if now is None else now
    sdir = staging_dir(vfolder)
    try:
        sdir.mkdir(exist_ok=True)
        if sdir.is_symlink() or not sdir.is_dir():
            raise InvalidPath(f"{STAGING_DIR} in the vfolder is not a directory")
        fd = os.open(staging_path(vfolder, session), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        state = UploadState(
            session=session, relpath=relpath, length=length, offset=0,
            created=now, expires=now + expire, kind=kind, parts=tuple(parts), extra=dict(extra or {}),
        )
        write_state(vfolder, state, sync_dir=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise InsufficientStorage(f"cannot create the upload: {exc.strerror}") from None
        raise
    return state


async def prepare_upload(
    volume: Any,
    vfid: Any,
    relpath: str,
    size: int,
    *,
    max_size: int | None = None,
    expire: float = DEFAULT_EXPIRE,
) -> str:
    """Start an upload (the manager API's ``POST /folder/file/upload``).

    Returns the new 32-hex session id for the upload token.  Creates
    ``<vfolder>/.upload/<session>`` (empty) and its state file, in the pool.
    ``max_size`` is ``config.max_upload_size``; ``expire`` is how long an
    abandoned upload is kept (``config.upload_expire``).
    """
    validate_relpath(relpath)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidAPIParameters.field("size", "must be a non-negative integer")
    if max_size is not None and size > max_size:
        raise InvalidAPIParameters.field("size", f"larger than the maximum upload size ({max_size} bytes)")
    qsid = getattr(vfid, "quota_scope_id", None)
    if qsid is not None and size > 0:
        # Refused before anything is created when the scope has no room for it.
        await volume.pool.run(quota_mod.check_fits, volume, qsid, size, "the upload")
    session = new_session_id()
    vfolder = Path(volume.vfolder_path(vfid))
    # The token's vfolder claims, so a token naming this session elsewhere is refused.
    claims = {"vfid": str(vfid), "volume": str(getattr(volume, "name", "") or "")} if vfid is not None else {}
    await volume.pool.run(create_upload, vfolder, session, relpath, size, expire=expire, extra=claims)
    return session


# -- writing ----------------------------------------------------------------------

# Start the disk write-back of every this-many bytes as they arrive, so the
# fdatasync at the end of a PATCH waits only for the tail.
WRITEBACK_STEP = 8 << 20
CHECKPOINT_STEP = 256 << 20
# What a full disk gives back, at least, so the offset can be recorded.
RECORD_ROOM = 64 << 10


SYNC_FILE_RANGE_WRITE = 2
# A receiving thread looks up (idle time, slow senders) after this long without data.
WAIT_MS = 500


_niced = threading.local()
BULK_NICE = 5


def _lower_this_threads_priority() -> None:
    """Bulk body movers yield the CPU to the reactor thread (request latency)
    and to the kernel's network processing; Linux sets nice per thread."""
    if getattr(_niced, "done", False):
        return
    _niced.done = True
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICE)
    except (OSError, AttributeError):
        pass


class StopSignal:
    """Tells a thread blocked in ``UploadWriter.receive`` to return now.

    An eventfd, so a thread waiting in ``poll`` wakes at once.  ``set`` and
    ``close`` run on the reactor thread; the receiving thread only polls it.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._set = False

    def set(self) -> None:
        if not self._set and self.fd >= 0:
            self._set = True
            os.eventfd_write(self.fd, 1)

    def is_set(self) -> bool:
        return self._set

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _SocketWaiter:
    """Waits, in a pool thread, until a socket holds a worthwhile amount of body.

    ``SO_RCVLOWAT`` makes the socket readable only once 256 KiB (or the rest
    of the body) are queued, so a thread wakes, and takes the GIL, a few
    times per MiB rather than once per packet: with dozens of uploads at
    once this keeps the reactor thread's GIL waits short.
    """

    LOW_WATER = 256 << 10

    def __init__(self, sock: Any, count: int, stop: StopSignal | None, idle_timeout: float) -> None:
        self.sock = sock
        self.stop = stop
        self.idle_timeout = idle_timeout
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        if stop is not None and stop.fd >= 0:
            self.poller.register(stop.fd, select.POLLIN)
        self.lowat = 1
        self._set_lowat(min(self.LOW_WATER, count))

    def _set_lowat(self, value: int) -> None:
        value = max(1, value)
        if value != self.lowat:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
                self.lowat = value
            except OSError:
                pass

    def wait(self, remaining: int) -> str | None:
        """None once readable; "stopped" or "idle" to give up."""
        self._set_lowat(min(self.LOW_WATER, remaining))
        waited = 0.0
        while True:
            if self.stop is not None and self.stop.is_set():
                return "stopped"
            if self.poller.poll(500):
                if self.stop is not None and self.stop.is_set():
                    return "stopped"
                return None
            # A slow sender: take whatever is there rather than wait for more.
            self._set_lowat(1)
            waited += 0.5
            if waited >= self.idle_timeout:
                return "idle"

    def close(self) -> None:
        self._set_lowat(1)  # the reactor reads this socket again


# A receive failing with these means the client went away, not that the daemon failed.
CLIENT_GONE = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT})


def _queued(sock: Any) -> int:
    """Bytes waiting, unread, in a socket's receive queue (FIONREAD)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return max(0, int.from_bytes(raw, sys.byteorder, signed=True))


@dataclass
class Received:
    """What ``UploadWriter.receive`` did: bytes taken from the socket, bytes
    written (fewer only on error), and why it stopped early."""

    consumed: int = 0
    written: int = 0
    eof: bool = False
    stopped: str | None = None  # "idle" or "stopped"
    error: BaseException | None = None


class UploadWriter:
    """The one writer of an upload: holds the lock and the staging file open.

    Created by ``open_writer`` (blocking), driven from the pool.
    """

    def __init__(self, vfolder: Path, state: UploadState, fd: int) -> None:
        self.vfolder = vfolder
        self.state = state
        self.fd = fd
        self.start = state.offset  # where this request's bytes begin
        self.offset = state.offset  # bytes written so far (not necessarily durable)
        self.writeback_from = state.offset
        # Off when many uploads run at once: the kernel's own write-back keeps
        # the disk busy then, and early requests only make writers queue.
        self.early_writeback = True
        # A long PATCH records its progress every CHECKPOINT_STEP bytes, so a
        # daemon crash loses at most that much of it.  Off for a checksummed
        # PATCH: its bytes only count once the whole body is verified.
        self.checkpoints = True
        # The daemon's own quota enforcement (storage.quota): the writer may
        # write up to ``quota_until``; past it, it asks ``quota`` for more.
        self.quota: Any = None
        self.quota_until: int | None = None
        self.quota_end = 0

    def attach_quota(self, quota: Any, want: int) -> int:
        """Take a grant of up to ``want`` bytes from the current offset (blocking);
        returns how many were granted."""
        self.quota = quota
        self.quota_end = self.offset + want  # where this request's bytes would end
        self.quota_until = quota.acquire(self.offset, want)
        if quota.blocks:
            # Blocks a killed writer left allocated past the end go first.
            quota_mod.drop_blocks_past_end(self.fd)
            quota_mod.reserve_blocks(self.fd, self.offset, self.quota_until - self.offset)
        return self.quota_until - self.offset

    def _quota_room(self, want: int) -> int:
        """How many of ``want`` more bytes this writer may write now; asks for
        more only once its grant is used up (not per write)."""
        if self.quota is None or self.quota_until is None:
            return want
        if self.offset >= self.quota_until and want > 0:
            self.quota_until = self.quota.extend(self.offset, max(want, self.quota_end - self.offset))
            if self.quota.blocks:
                quota_mod.reserve_blocks(self.fd, self.offset, self.quota_until - self.offset)
        return max(0, min(want, self.quota_until - self.offset))

    def quota_refusal(self) -> StorageError:
        return self.quota.refusal(self.state.length - self.offset)

    def after_write(self) -> None:
        self.start_writeback()
        if self.checkpoints and self.offset - self.state.offset >= CHECKPOINT_STEP:
            self.commit()

    def start_writeback(self) -> None:
        """Ask the kernel to begin writing out what arrived (non-blocking, best effort)."""
        if not self.early_writeback or self.offset - self.writeback_from < WRITEBACK_STEP:
            return
        try:
            fastio.sync_file_range(self.fd, self.writeback_from, self.offset - self.writeback_from, SYNC_FILE_RANGE_WRITE)
        except OSError:
            pass  # only a hint
        self.writeback_from = self.offset

    def write(self, buffers: Sequence[Any]) -> int:
        """Write buffers at the current offset; on ENOSPC/EDQUOT keep what got in."""
        total = sum(len(b) for b in buffers)
        if self.offset + total > self.state.length:
            raise AssertionError("a write past Upload-Length must be refused before this")
        if self.quota is not None:
            allowed = self._quota_room(total)
            if allowed < total:
                if not allowed:
                    raise self.quota_refusal()
                # What fits in the grant, then (asking for more) the rest:
                # the bytes before the limit are kept.
                head, tail = _split_bytes(buffers, allowed)
                n = self.write(head)
                return n + self.write(tail)
        try:
            n = fastio.pwrite_all(self.fd, buffers, self.offset)
        except OSError as exc:
            # Count what did reach the file: pwrite_all reports the prefix it wrote.
            self.offset += int(getattr(exc, "written", 0) or 0)
            if is_disk_full(exc):
                raise InsufficientStorage(f"the upload does not fit: {exc.strerror}") from None
            raise
        self.offset += n
        self.after_write()
        return n

    def receive(self, sock: Any, count: int, hasher: Any = None, stop: StopSignal | None = None,
                idle_timeout: float = 60.0) -> Received:
        """Move up to ``count`` body bytes from a (non-blocking) socket into the file (blocking).

        ``splice`` moves them socket → pipe → page cache without a copy
        through user space, in ``fastio.splice_receive`` (compiled: no GIL
        until a checkpoint or the end); with a ``hasher`` (or without
        ``os.splice``) a reused buffer and ``recv_into``/``pwrite`` do.
        Never reads past ``count``, so a pipelined next request stays in the
        socket.  Stops early at end of stream, after ``idle_timeout`` seconds
        without data, or when ``stop`` is set; errors are returned with the
        bytes consumed from the socket and written before them.
        """
        if self.offset + count > self.state.length:
            raise AssertionError("the body length is checked against Upload-Length before this")
        _lower_this_threads_priority()
        start = self.offset
        if self.quota is None:
            result = self._receive_window(sock, count, hasher, stop, idle_timeout)
        else:
            # At most what the quota grant allows at a time; at its end, ask
            # for more, and stop with 507 when the scope has no more.
            result = Received()
            while result.consumed < count:
                try:
                    window = self._quota_room(count - result.consumed)
                except BaseException as exc:
                    result.error = exc
                    break
                if window <= 0:
                    result.error = self.quota_refusal()
                    break
                part = self._receive_window(sock, window, hasher, stop, idle_timeout)
                result.consumed += part.consumed
                result.eof, result.stopped, result.error = part.eof, part.stopped, part.error
                if part.consumed < window or part.eof or part.stopped or part.error is not None:
                    break
        result.written = self.offset - start
        return result

    def _receive_window(self, sock: Any, count: int, hasher: Any, stop: StopSignal | None,
                        idle_timeout: float) -> Received:
        if hasher is None and hasattr(os, "splice"):
            return self._receive_spliced(sock, count, stop, idle_timeout)
        waiter = _SocketWaiter(sock, count, stop, idle_timeout)
        try:
            return self._receive_copied(sock, count, hasher, waiter)
        finally:
            waiter.close()

    def _receive_copied(self, sock: Any, count: int, hasher: Any, waiter: _SocketWaiter) -> Received:
        result = Received()
        buf = memoryview(bytearray(min(count, 1 << 20) or 1))
        draining = -1  # once stopped: what the socket held then, still to take
        try:
            while result.consumed < count and draining != 0:
                want = min(len(buf), count - result.consumed)
                if draining > 0:
                    want = min(want, draining)
                try:
                    n = sock.recv_into(buf[:want])
                except (BlockingIOError, InterruptedError):
                    if draining >= 0:
                        return result
                    result.stopped = waiter.wait(count - result.consumed)
                    if result.stopped == "stopped":
                        draining = _queued(sock)
                    elif result.stopped:
                        return result
                    continue
                if n == 0:
                    result.eof = True
                    return result
                result.consumed += n
                if draining > 0:
                    draining -= n
                self.write([buf[:n]])
                if hasher is not None:
                    hasher.update(buf[:n])
        except OSError as exc:
            if exc.errno in CLIENT_GONE:
                result.eof = True  # the client reset the connection: what came stays
            else:
                result.error = exc
        except BaseException as exc:  # reported with the counts, raised on the reactor
            result.error = exc
        return result

    def _receive_spliced(self, sock: Any, count: int, stop: StopSignal | None, idle_timeout: float) -> Received:
        result = Received()
        fd = sock.fileno()
        stop_fd = stop.fd if stop is not None else -1
        # Wake a few times per MiB rather than once per packet (SO_RCVLOWAT);
        # a sender that goes quiet for a wait gets whatever it sends.
        lowat = _SocketWaiter.LOW_WATER
        waited = 0.0
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer, larger splices
            except OSError:
                pass
            def splice(want: int, stop_fd: int, lowat: int, wait_ms: int) -> tuple[int, int]:
                step = WRITEBACK_STEP if self.early_writeback else 0
                try:
                    n, how, self.writeback_from = fastio.splice_receive(
                        fd, self.fd, r, w, self.offset, want, stop_fd, lowat, wait_ms, self.writeback_from, step
                    )
                except OSError as exc:
                    result.consumed += getattr(exc, "consumed", 0)
                    self.offset += getattr(exc, "written", 0)
                    raise
                result.consumed += n
                self.offset += n
                if n:
                    self.after_write()
                return n, how

            while result.consumed < count:
                want = count - result.consumed
                if self.checkpoints:  # come back to record progress every CHECKPOINT_STEP
                    want = min(want, max(1, self.state.offset + CHECKPOINT_STEP - self.offset))
                n, how = splice(want, stop_fd, lowat, WAIT_MS)
                if n:
                    waited = 0.0
                if how == fastio.RECEIVED_EOF:
                    result.eof = True
                    break
                if how == fastio.RECEIVED_STOPPED:
                    result.stopped = "stopped"
                    # What the socket already holds was received (the client
                    # saw it acknowledged): it is kept too, and no more.
                    left = min(_queued(sock), count - result.consumed)
                    if left > 0 and splice(left, -1, 1, 0)[1] == fastio.RECEIVED_EOF:
                        result.eof = True
                    break
                if how == fastio.RECEIVED_WAITED:
                    lowat = 1
                    waited += WAIT_MS / 1000
                    if waited >= idle_timeout:
                        result.stopped = "idle"
                        break
        except OSError as exc:
            if exc.errno in CLIENT_GONE:
                result.eof = True  # the client reset the connection: what came stays
            else:
                result.error = (
                    InsufficientStorage(f"the upload does not fit: {exc.strerror}") if is_disk_full(exc) else exc
                )
        except BaseException as exc:
            result.error = exc
        finally:
            os.close(r)
            os.close(w)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # the reactor reads it again
            except OSError:
                pass
        return result

    def commit(self, offset: int | None = None) -> UploadState:
        """Make the bytes up to ``offset`` durable and record that offset."""
        offset = self.offset if offset is None else offset
        try:
            self._record(offset)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self._record_after_giving_back(offset)
        return self.state

    def mark_unverified(self) -> None:
        """Bytes from here on count only once verified (a checksummed PATCH):
        crash recovery must not adopt them."""
        self.state = replace(self.state, extra=dict(self.state.extra, unverified_from=self.state.offset))
        write_state(self.vfolder, self.state)

    def _record(self, offset: int) -> None:
        fastio.fdatasync(self.fd)
        if offset != self.state.offset or UNVERIFIED in self.state.extra:
            new = replace(self.state, offset=offset, extra=_without(self.state.extra, UNVERIFIED))
            write_state(self.vfolder, new)
            self.state = new

    def _record_after_giving_back(self, offset: int) -> None:
        """Record progress on a full disk or quota.

        The state file is replaced through a new file, which needs a block
        of its own; when the upload took the last one, give back the tail of
        this request's unacknowledged bytes (a little more each try) until
        the record fits.  The client resumes from the recorded offset, so
        this always ends the request with InsufficientStorage.
        """
        step = RECORD_ROOM
        while offset > self.state.offset:
            offset = max(self.state.offset, (offset - step) // RECORD_ROOM * RECORD_ROOM)
            os.ftruncate(self.fd, offset)
            self.offset = min(self.offset, offset)
            try:
                self._record(offset)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                step *= 4
                continue
            break
        raise InsufficientStorage(f"the disk or quota is full; the upload is kept up to offset {self.state.offset}")

    def rollback(self) -> UploadState:
        """Discard this request's bytes (a checksum mismatch or a refused body),
        checkpoints included: the recorded offset goes back first, then the bytes."""
        if self.state.offset != self.start or UNVERIFIED in self.state.extra:
            self.state = replace(self.state, offset=self.start, extra=_without(self.state.extra, UNVERIFIED))
            write_state(self.vfolder, self.state)
        os.ftruncate(self.fd, self.start)
        self.offset = self.start
        return self.state

    lock_fd = -1  # the read-only descriptor that holds the flock (open_writer)

    def close(self) -> None:
        if self.quota is not None:
            quota, self.quota = self.quota, None
            # Before the lock goes: the blocks reserved and not written go
            # back, the bytes move from the grant to the ledger.  A failure
            # here only leaves a grant nobody counts (its file is not locked)
            # or a ledger short of these bytes until the filesystem's usage
            # catches up.
            with contextlib.suppress(OSError):
                if quota.blocks and self.fd >= 0:
                    quota_mod.drop_blocks_past_end(self.fd)
            with contextlib.suppress(OSError):
                quota.release(max(0, self.state.offset - quota.start))
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = -1


def _split_bytes(buffers: Sequence[Any], count: int) -> tuple[list[Any], list[Any]]:
    """``buffers`` cut after ``count`` bytes, as views (no copy)."""
    head: list[Any] = []
    tail: list[Any] = []
    for b in buffers:
        view = memoryview(b)
        if count >= len(view):
            head.append(view)
            count -= len(view)
        elif count > 0:
            head.append(view[:count])
            tail.append(view[count:])
            count = 0
        else:
            tail.append(view)
    return head, tail


def open_writer(
    vfolder: Path, session: str, expected_offset: int | None,
    check: Callable[[UploadState], Any] | None = None,
) -> UploadWriter:
    """Lock the upload for writing and check the client's offset (blocking).

    Raises ``UploadNotFound``, ``UploadBusy`` (a writer holds it),
    ``UploadCompleted``, or ``OffsetMismatch`` (with the offset of record).
    ``check`` sees the state under the lock before anything else is done
    with it (no recovery, no offset check) and raises to refuse the request.
    """
    # The lock is taken through a read-only descriptor and the file opened for
    # writing only once it is held: on CephFS a second client opening the file
    # for writing (a refused PATCH, a HEAD) would make the MDS take the
    # writer's buffered-write caps away in the middle of its PATCH.
    path = staging_path(vfolder, session)
    try:
        lock_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        state = read_state(vfolder, session)
        if state is not None and state.completed:
            raise UploadCompleted() from None
        raise UploadNotFound() from None
    fd = -1
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UploadBusy() from None
        # Read the state only under the lock: the last writer may just have moved it on.
        state = read_state(vfolder, session)
        if state is None:
            raise UploadNotFound()
        if check is not None:
            check(state)
        if state.completed:
            raise UploadCompleted()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise UploadNotFound() from None
        if os.fstat(fd).st_ino != os.fstat(lock_fd).st_ino:
            raise UploadBusy()  # replaced (terminated and created again) meanwhile
        state = recover_staged_bytes(vfolder, fd, state)
        if expected_offset is not None and expected_offset != state.offset:
            raise OffsetMismatch(state.offset)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.close(lock_fd)
        raise
    writer = UploadWriter(vfolder, state, fd)
    writer.lock_fd = lock_fd
    return writer


UNVERIFIED = "unverified_from"


def _without(extra: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k != key}


def recover_staged_bytes(vfolder: Path, fd: int, state: UploadState) -> UploadState:
    """Under the upload's lock, with no writer alive: settle the staging file
    against the offset of record (blocking).

    Bytes past the offset were received by a writer that never recorded
    them (a daemon killed mid-PATCH).  On the boot that wrote the state they
    are in the page cache, written in order at their offsets: make them
    durable and record them.  After a reboot, or when they belong to an
    unverified (checksummed) PATCH, only the recorded offset counts and the
    rest is dropped.  The offset never goes beyond the bytes in the file.
    """
    size = os.fstat(fd).st_size
    boot = current_boot_id()
    if size == state.offset and UNVERIFIED not in state.extra and (not boot or state.extra.get("boot_id") == boot):
        return state
    # (Settled but recorded on an earlier boot: recorded again below, so
    # that what a writer stages from now on counts as this boot's.)
    if size > state.offset and boot and state.extra.get("boot_id") == boot and UNVERIFIED not in state.extra:
        offset = min(size, state.length)
    else:
        offset = min(size, state.offset)
    if size != offset:
        os.ftruncate(fd, offset)
    fastio.fdatasync(fd)
    new = replace(state, offset=offset, extra=_without(state.extra, UNVERIFIED))
    write_state(vfolder, new)
    return new


class OffsetMismatch(StorageError):
    status = 409
    problem = "upload-offset-mismatch"
    title = "Upload-Offset does not match the current offset"
    # upstream's UploadOffsetMismatchError
    error_code = "storage-proxy_update_conflict"

    def __init__(self, current: int) -> None:
        super().__init__(f"the upload is at offset {current}", current_offset=current)
        self.current = current


# -- completion ---------------------------------------------------------------------


def _target_path(vfolder: Path, relpath: str, dst_dir: str | None) -> Path:
    """``<vfolder>/[dst_dir/]relpath``, parents created, confined to the vfolder.

    Every directory on the way must resolve inside the vfolder; a symlink as
    the last component is replaced by the rename, never followed.
    """
    rel = validate_relpath(relpath)
    if dst_dir:
        rel = validate_relpath(dst_dir, "dst_dir") / rel
    if str(rel) == "." or rel.parts[0] == STAGING_DIR:
        raise InvalidPath(f"not a file path in the vfolder: {str(rel)!r}", data={"relpath": "invalid"})
    # Without a symlink on the way (relpath has no ".."), the parents are in
    # the vfolder: two system calls a level instead of resolving every path.
    parent = vfolder
    for part in rel.parts[:-1]:
        child = parent / part
        try:
            os.mkdir(child)
        except FileExistsError:
            if os.path.islink(child):
                return _resolved_target_path(vfolder, rel)
        parent = child
    return _not_a_directory(parent / rel.parts[-1], rel)


def _resolved_target_path(vfolder: Path, rel: PurePath) -> Path:
    """``_target_path`` past symlinks: each parent is resolved and checked."""
    real_root = os.path.realpath(vfolder)
    parent = Path(real_root)
    for part in rel.parts[:-1]:
        parent = parent / part
        try:
            parent.mkdir()
        except FileExistsError:
            pass
        real = os.path.realpath(parent)
        if not is_inside(real_root, real):
            raise InvalidPath(
                f"relpath: leads outside the vfolder: {str(rel)!r}", data={"relpath": "leads outside the vfolder"}
            )
        parent = Path(real)
    return _not_a_directory(parent / rel.parts[-1], rel)


def _not_a_directory(target: Path, rel: PurePath) -> Path:
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return target
    if stat.S_ISDIR(mode):
        raise InvalidPath(f"relpath: a directory is in the way: {str(rel)!r}", data={"relpath": "is a directory"})
    return target


COMPLETED_XATTR = "user.storage-proxy.upload"


def _completion_mark(state: UploadState) -> bytes:
    mark: dict[str, Any] = {"session": state.session}
    if state.kind != NORMAL:
        mark["kind"] = state.kind
        mark["parts"] = list(state.parts)
    return json.dumps(mark, sort_keys=True).encode()


def _set_mark(target: Path | int, mark: bytes) -> bool:
    """Mark a file as an upload's result; False where the filesystem has no user xattrs."""
    try:
        if isinstance(target, int):
            os.setxattr(target, COMPLETED_XATTR, mark)
        else:
            os.setxattr(target, COMPLETED_XATTR, mark, follow_symlinks=False)
        return True
    except OSError:
        return False  # ENOTSUP, EPERM, E2BIG, ENOSPC: keep the state file instead


def _has_mark(target: Path, mark: bytes) -> bool:
    try:
        return os.getxattr(target, COMPLETED_XATTR, follow_symlinks=False) == mark
    except OSError:
        return False


def complete_upload(
    writer: UploadWriter, dst_dir: str | None, keep_until: float, records: Path | None = None,
) -> UploadState:
    """Move the full staging file to its target (blocking, under the writer's lock).

    A client that lost the last response can still HEAD the upload: the
    target is marked with ``COMPLETED_XATTR`` (set on the staging file before
    the rename, so the file arrives marked) and the upload's state file and
    staging dir go.  Without user xattrs the completed state is recorded in
    ``records`` (the volume's ``completion_records_dir``, outside every
    vfolder) until ``keep_until``, and the vfolder keeps nothing either; with
    no ``records`` given it stays in ``.upload/``.
    """
    vfolder = writer.vfolder
    state = writer.state
    if writer.offset != state.length:
        raise AssertionError("only a complete upload moves to its target")
    mark = _completion_mark(state)
    marked = _set_mark(writer.fd, mark)
    try:
        target = _target_path(vfolder, state.relpath, dst_dir)
        # A plain rename, or across a filesystem or CephFS quota boundary
        # (EXDEV) a copy swapped in atomically.
        crossmove.move_path(staging_path(vfolder, state.session), target)
        if marked and not _has_mark(target, mark):
            marked = _set_mark(target, mark)  # a copy that did not carry the xattr
        fsync_dir(target.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise InsufficientStorage(f"cannot place the uploaded file: {exc.strerror}") from None
        raise
    done = replace(state, offset=writer.offset, completed=True, expires=keep_until,
                   extra=dict(state.extra, target=str(target)))
    writer.state = done
    if not marked and records is not None:
        _write_completion_record(records, vfolder, done)
        marked = True  # the record says which upload the file is
    if marked:
        # The file is in place and its upload is known: the bookkeeping goes.
        try:
            state_path(vfolder, state.session).unlink()
        except FileNotFoundError:
            pass
    else:
        # The bytes are durable (the caller synced them): this one write
        # records the final offset and the completion together.
        write_state(vfolder, done)
    remove_dead_temps(vfolder, state.session)
    if marked:
        remove_staging_dir_if_empty(vfolder)
    return done


def _write_completion_record(records: Path, vfolder: Path, done: UploadState) -> None:
    record = replace(done, extra=dict(done.extra, vfolder=str(vfolder)))
    records.mkdir(parents=True, exist_ok=True)
    write_atomic(completion_record_path(records, done.session), record.to_json())


def _recorded_completion(records: Path, vfolder: Path, session: str, relpath: str, length: int) -> UploadState | None:
    """The completion record of ``session``, if it names this vfolder and
    relpath and its file is still at its target, whole."""
    try:
        state = UploadState.from_json(_read_small_file(completion_record_path(records, session)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    extra = state.extra
    if (state.session != session or not state.completed or state.relpath != relpath
            or state.length != length or extra.get("vfolder") != str(vfolder)):
        return None
    try:
        st = os.lstat(str(extra.get("target")))
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size != length:
        return None
    return state


def remove_expired_completion_records(records: Path, now: float, temp_grace: float) -> int:
    """Remove the completion records whose token has expired, and temps a
    killed writer left longer than ``temp_grace`` ago (blocking); returns how
    many records went."""
    try:
        names = os.listdir(records)
    except OSError:
        return 0
    removed = 0
    for name in names:
        path = records / name
        if name.endswith(".tmp"):
            try:
                if path.lstat().st_mtime + temp_grace < now:
                    path.unlink()
            except OSError:
                pass
            continue
        if not name.endswith(STATE_SUFFIX):
            continue
        try:
            state = UploadState.from_json(_read_small_file(path))
            expired = state.expires < now
        except (OSError, ValueError, KeyError, TypeError):
            expired = True  # unreadable: nothing can ever use it
        if expired:
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def completed_at_target(
    vfolder: Path, session: str, relpath: str, length: int, dst_dir: str | None, expires: float,
    extra: dict[str, Any] | None = None, records: Path | None = None,
) -> UploadState | None:
    """The completed state of an upload whose file is marked at its target
    (or, without user xattrs, recorded in ``records``), or None (blocking).

    Looks only: no directory is created, and a path that leads outside the
    vfolder through a symlink is not read.
    """
    try:
        rel = validate_relpath(relpath)
        if dst_dir:
            rel = validate_relpath(dst_dir, "dst_dir") / rel
    except StorageError:
        return None
    if str(rel) == ".":
        return None
    target = vfolder / rel
    try:
        real_root = os.path.realpath(vfolder)
        if not is_inside(real_root, os.path.realpath(target.parent)):
            return None
        raw = os.getxattr(target, COMPLETED_XATTR, follow_symlinks=False)
        mark = json.loads(raw)
    except (OSError, ValueError):
        recorded = None if records is None else _recorded_completion(records, vfolder, session, relpath, length)
        if recorded is None:
            return None
        return replace(recorded, expires=expires, extra=dict(extra or {}, target=recorded.extra["target"]))
    if not isinstance(mark, dict) or mark.get("session") != session:
        return None
    return UploadState(
        session=session, relpath=relpath, length=length, offset=length, expires=expires,
        kind=str(mark.get("kind", NORMAL)), parts=tuple(str(p) for p in mark.get("parts", ())),
        completed=True, extra=dict(extra or {}, target=str(target)),
    )


def complete_if_full(
    vfolder: Path, session: str, dst_dir: str | None, keep_until: float, records: Path | None = None,
) -> UploadState | None:
    """An upload whose staging file holds every byte is complete: put the
    file at its target now (blocking).  That is an upload of length 0 as
    soon as it exists, and one whose last bytes a killed daemon staged but
    never moved (a HEAD reporting the full length ends a client's upload).
    Returns the completed state, or None when the upload is not a normal
    one with all its bytes, still to be completed."""
    state = read_state(vfolder, session)
    if state is None or state.completed or state.kind != NORMAL:
        return state if state is not None and state.completed else None
    try:
        writer = open_writer(vfolder, session, None)
    except (UploadBusy, UploadCompleted):
        # Another request is completing it right now.
        state = read_state(vfolder, session)
        return state if state is not None and state.completed else None
    try:
        if writer.offset != writer.state.length:
            return None
        fastio.fdatasync(writer.fd)
        return complete_upload(writer, dst_dir, keep_until, records)
    finally:
        writer.close()


def remove_dead_temps(vfolder: Path, session: str) -> None:
    """Remove state temp files a killed daemon of this host left for ``session``.

    A temp name carries its writer's pid; one whose process is gone will never
    be renamed into place.  Temps of live processes (this one included) stay.
    """
    prefix = state_path(vfolder, session).name + "."
    try:
        names = os.listdir(state_path(vfolder, session).parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.unlink(state_path(vfolder, session).parent / name)
        except OSError:
            pass


def remove_upload(vfolder: Path, session: str, *, force: bool = False) -> bool:
    """Delete an upload's files (tus termination, expiry); False if there were none.

    Unless ``force``, raises ``UploadBusy`` while a writer holds the upload.
    """
    staging = staging_path(vfolder, session)
    fd = -1
    try:
        fd = os.open(staging, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        pass
    try:
        if fd >= 0 and not force:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UploadBusy() from None
        found = False
        for path in (staging, state_path(vfolder, session)):
            try:
                path.unlink()
                found = True
            except FileNotFoundError:
                pass
    finally:
        if fd >= 0:
            os.close(fd)
    remove_staging_dir_if_empty(vfolder)
    return found


def remove_staging_dir_if_empty(vfolder: Path) -> None:
    try:
        staging_dir(vfolder).rmdir()
    except OSError:
        pass


def upload_status(vfolder: Path, session: str) -> UploadState:
    """The state a HEAD reports (blocking); ``UploadNotFound`` if there is none."""
    state = read_state(vfolder, session)
    if state is None:
        raise UploadNotFound()
    if state.completed:
        return state
    path = staging_path(vfolder, session)
    try:
        # Read-only until the lock is ours (see open_writer: no write open beside a writer).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        state = read_state(vfolder, session)  # completed (moved) just now?
        if state is not None and state.completed:
            return state
        raise UploadNotFound() from None
    try:
        if os.fstat(fd).st_size == state.offset and UNVERIFIED not in state.extra:
            return state  # settled: no lock taken, so a PATCH starting now is never refused for it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return state  # a writer is alive: its recorded offset is durable
        state = read_state(vfolder, session) or state
        if state.completed:
            return state
        try:
            wfd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return read_state(vfolder, session) or state
        try:
            return recover_staged_bytes(vfolder, wfd, state)
        finally:
            os.close(wfd)
    finally:
        os.close(fd)


# -- concatenation (tus) ------------------------------------------------------------


def concatenate_parts(
    vfolder: Path, session: str, parts: list[str], dst_dir: str | None, keep: float,
    check: Callable[[UploadState], Any] | None = None, records: Path | None = None, scope: Any = None,
) -> UploadState:
    """Join complete partial uploads into the token's upload with copy_file_range.

    ``check`` vets the token's upload first, as in ``open_writer``; ``scope``
    (a ``storage.quota.ScopeWriter``) must grant the joined bytes first."""
    if len(set(parts)) != len(parts):
        raise InvalidAPIParameters.field("Upload-Concat", "a partial upload is named twice")
    writer = open_writer(vfolder, session, 0, check)
    part_writers: list[UploadWriter] = []
    try:
        total = 0
        for part in parts:
            try:
                pw = open_writer(vfolder, part, None)
            except UploadCompleted:
                raise InvalidAPIParameters.field("Upload-Concat", f"partial upload {part} was already used") from None
            part_writers.append(pw)
            st = pw.state
            if st.kind != PARTIAL or st.extra.get("owner") != session:
                raise UploadNotFound(f"no such partial upload: {part}")
            if st.offset != st.length:
                raise InvalidAPIParameters.field("Upload-Concat", f"partial upload {part} is not complete")
            total += st.length
        if total != writer.state.length:
            raise InvalidAPIParameters.field(
                "Upload-Concat", f"the parts hold {total} bytes; the upload is {writer.state.length}"
            )
        # The parts stay until the joined copy is made: it needs room of its own.
        if scope is not None and total > 0 and writer.attach_quota(scope, total) < total:
            raise writer.quota_refusal()
        for pw in part_writers:
            src = os.open(staging_path(vfolder, pw.state.session), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                copied = fastio.copy_range(src, writer.fd, 0, writer.offset, pw.state.length)
            finally:
                os.close(src)
            if copied != pw.state.length:
                raise OSError(f"partial upload {pw.state.session} is shorter than its state says")
            writer.offset += copied
        writer.state = replace(writer.state, kind=FINAL, parts=tuple(parts))
        writer.commit()
        state = complete_upload(writer, dst_dir, keep, records)
        for pw in part_writers:
            pw.close()
        for part in parts:
            remove_upload(vfolder, part, force=True)
        return state
    except OSError as exc:
        writer.rollback()
        if is_disk_full(exc):
            raise InsufficientStorage(f"the joined upload does not fit: {exc.strerror}") from None
        raise
    finally:
        for pw in part_writers:
            pw.close()
        writer.close()
