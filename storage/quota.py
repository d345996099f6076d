"""Quota enforced by the daemon itself, where it knows the sizes.

A filesystem's own enforcement is not enough: CephFS's client enforces a
realm's limit late (its usage, ``ceph.dir.rbytes``, lags writes by seconds,
and a new directory is not covered at first), and no filesystem knows about
the bytes an upload is *about* to write.  So before bytes go into a quota
scope the daemon asks how much room is left:

    left = limit - used - reserved - RECORD_MARGIN

* ``limit`` and ``used`` come from the volume (``read_scope_quota``, blocking):
  XFS's ``statvfs`` of the project directory (exact, live), CephFS's xattrs
  (lagging), the vfs volume's emulated quota.
* ``reserved``: what the PATCHes writing into the scope right now were
  granted and have not written yet.  Each grant is a small file
  ``<root>/.storage-proxy/quota/<scope>.grants/<session>`` naming the
  upload's staging file and the offsets it may write (``from`` .. ``until``).
  A grant counts only while that staging file is locked by its writer, so
  one left by a killed daemon counts for nothing (and is removed).  Any
  daemon over the same volume sees every grant: nothing is in memory.
* For a volume whose usage lags (``ScopeFigure.live`` False), ``used`` also
  counts what this daemon (any daemon over the volume) wrote since the usage
  could have caught up: the bytes of the PATCHes in flight (staged size -
  ``from``) and a per-scope ledger ``<scope>.ledger`` of the bytes each
  finished write added, with its time; entries older than the volume's lag
  bound are dropped (the filesystem's figure includes them by then).  This
  over-counts while both say the same bytes (never under-counts): near its
  limit a scope may refuse a little early for up to the lag bound.
* ``RECORD_MARGIN``: one block a writer keeps free so that its state file
  (replaced through a new file) can still be written at the limit.

Grants are decided under an exclusive ``flock`` on ``<scope>.lock``, so two
PATCHes racing for the last bytes of a scope get disjoint shares that add
up to what is left.  A PATCH is granted, when it opens, as much of its body
as fits; only when it has written all of that does it ask again
(``extend``), so the quota is not looked at per write.

Everything here blocks: call it in the pool.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import InsufficientStorage

QUOTA_DIR = Path(".storage-proxy") / "quota"
# Kept free by every grant: the upload's state file needs a block of its own
# while it is replaced (write a new file, rename it over the old one).  A
# volume's figure may ask for more (``ScopeFigure.margin``; XFS: 64 KiB).
RECORD_MARGIN = 4096
XFS_RECORD_MARGIN = 256 << 10
LEDGER_MAX_LINES = 256
HOLD_SUFFIX = ".hold"


@dataclass(frozen=True)
class ScopeFigure:
    """What the filesystem says about one quota scope."""

    limit: int
    used: int
    # True: ``used`` already includes bytes written a moment ago (XFS).
    # False: it lags (CephFS rstats), by at most ``lag`` seconds.
    live: bool = True
    lag: float = 0.0
    # True: ``used`` counts allocated blocks (XFS), so speculative
    # preallocation past the end of a staging file is in it too.
    blocks: bool = False
    # What each writer keeps free for its state file (RECORD_MARGIN).  XFS
    # needs more than the block itself: a delayed allocation also reserves
    # the worst case of its extent tree, so one free block is not enough.
    margin: int = 0


@dataclass(frozen=True)
class Room:
    """A scope's limit, its usage as the daemon counts it, and the reserved bytes."""

    limit: int
    used: int
    reserved: int
    # The figure counts blocks (XFS): grants are best reserved as blocks too.
    blocks: bool = False
    margin: int = 0

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used - self.reserved)

    @property
    def grantable(self) -> int:
        return max(0, self.left - max(RECORD_MARGIN, self.margin))


def quota_dir(volume: Any) -> Path:
    return Path(volume.root) / QUOTA_DIR


def _ensure_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


@contextlib.contextmanager
def scope_lock(volume: Any, qsid: Any) -> Iterator[None]:
    """Exclusive across threads, processes and hosts (flock; CephFS's is cluster-wide)."""
    base = quota_dir(volume)
    _ensure_dir(base)
    fd = os.open(base / f"{qsid.pathname}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def grants_dir(volume: Any, qsid: Any) -> Path:
    return quota_dir(volume) / f"{qsid.pathname}.grants"


def ledger_path(volume: Any, qsid: Any) -> Path:
    return quota_dir(volume) / f"{qsid.pathname}.ledger"


def figure(volume: Any, qsid: Any) -> ScopeFigure | None:
    """The scope's limit and usage, or None when it has no limit."""
    reader = getattr(volume, "read_scope_quota", None)
    if reader is None:
        return None
    return reader(qsid)


def _locked(path: str) -> bool | None:
    """Whether a writer holds the staging file's lock (None: the file is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)


@dataclass
class _Grant:
    session: str
    staging: str
    start: int
    until: int

    def to_json(self) -> bytes:
        return json.dumps({"session": self.session, "staging": self.staging,
                           "from": self.start, "until": self.until}).encode()


def _read_grants(volume: Any, qsid: Any) -> list[tuple[_Grant, os.stat_result]]:
    """The live grants of the scope, with their staging files' stat; stale ones are removed."""
    gdir = grants_dir(volume, qsid)
    try:
        names = os.listdir(gdir)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith((".tmp", HOLD_SUFFIX)):
            continue
        path = gdir / name
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read())
            grant = _Grant(str(raw["session"]), str(raw["staging"]), int(raw["from"]), int(raw["until"]))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            grant = None
        if grant is None or not _locked(grant.staging):
            # A writer that is gone (killed, or finished without cleaning up)
            # reserves nothing.  A lock held only for a moment by someone else
            # (a HEAD recovering bytes) counts: that errs on the safe side.
            with contextlib.suppress(OSError):
                os.unlink(path)
            if grant is not None and grant.staging.endswith(HOLD_SUFFIX) and Path(grant.staging).parent == gdir:
                with contextlib.suppress(OSError):
                    os.unlink(grant.staging)  # a dead copy's own lock file
            continue
        try:
            st = os.stat(grant.staging, follow_symlinks=False)
        except OSError:
            continue
        out.append((grant, st))
    return out


def _ledger_recent(volume: Any, qsid: Any, lag: float, now: float) -> int:
    """Bytes written into the scope in the last ``lag`` seconds (lagging volumes only)."""
    path = ledger_path(volume, qsid)
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    total = 0
    kept = []
    for line in lines:
        try:
            t, n = json.loads(line)
            t, n = float(t), int(n)
        except (ValueError, TypeError):
            continue
        if t > now - lag:
            total += n
            kept.append(line)
    if len(lines) > LEDGER_MAX_LINES and len(kept) < len(lines):
        # Called under the scope lock: rewrite without the settled entries.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(k + b"\n" for k in kept))
        os.replace(tmp, path)
    return total


def record_written(volume: Any, qsid: Any, nbytes: int, fig: ScopeFigure | None = None) -> None:
    """Count ``nbytes`` just written into the scope until its usage catches up (lagging volumes)."""
    if nbytes <= 0 or qsid is None:
        return
    fig = fig if fig is not None else figure(volume, qsid)
    if fig is None or fig.live:
        return
    _ensure_dir(quota_dir(volume))
    line = json.dumps([round(time.time(), 3), int(nbytes)]).encode() + b"\n"
    fd = os.open(ledger_path(volume, qsid), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # whole lines, between daemons too
        os.write(fd, line)
    finally:
        os.close(fd)


def room(volume: Any, qsid: Any, *, exclude: str | None = None, fig: ScopeFigure | None = None,
         now: float | None = None) -> Room | None:
    """What is left of the scope (None: no limit).  ``exclude``: a session
    whose own grant is being decided (its unwritten grant is not reserved)."""
    # The grants (and their files' sizes) first, the filesystem's figure after:
    # bytes a writer adds in between are then counted twice, never missed.
    grants = _read_grants(volume, qsid)
    fig = figure(volume, qsid) if fig is None else fig
    if fig is None:
        return None
    now = time.time() if now is None else now
    used = fig.used
    reserved = 0
    for grant, st in grants:
        size = st.st_size
        if fig.blocks:
            # XFS counts the blocks it preallocated past the end of a file
            # being written; they are not data and are given back at close.
            block = max(512, getattr(st, "st_blksize", 4096) or 4096)
            overhang = st.st_blocks * 512 - -(-size // block) * block
            used -= max(0, overhang)
        if not fig.live:
            used += max(0, size - grant.start)
        if grant.session != exclude:
            reserved += max(0, grant.until - max(size, grant.start))
    if not fig.live:
        used += _ledger_recent(volume, qsid, fig.lag, now)
    return Room(limit=fig.limit, used=max(0, used), reserved=reserved, blocks=fig.blocks, margin=fig.margin)


FALLOC_FL_KEEP_SIZE = 1
_libc: Any = None


def reserve_blocks(fd: int, offset: int, length: int) -> bool:
    """Allocate ``length`` bytes of blocks past ``offset`` without changing the
    file's size (``fallocate(FALLOC_FL_KEEP_SIZE)``), so that the filesystem
    charges a grant to the quota at once and the writes into it need no
    allocation of their own: XFS then preallocates nothing speculatively past
    them (which its quota counts, and which left a full project no block for
    the upload's state file).  False where it cannot (the writes then simply
    allocate as they go)."""
    global _libc
    if length <= 0:
        return True
    if _libc is None:
        import ctypes
        import ctypes.util

        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) == 0


def drop_blocks_past_end(fd: int) -> None:
    """Give back blocks allocated past the end of the file (a same-size truncate)."""
    os.ftruncate(fd, os.fstat(fd).st_size)


def refusal(qsid: Any, volume: Any, what: str, size: int, r: Room) -> InsufficientStorage:
    """507 naming the scope, the size asked for and what is left."""
    left = r.grantable
    return InsufficientStorage(
        f"{what} needs {size} bytes but quota scope {qsid} has {left} of {r.limit} left",
        quota_scope_id=str(qsid), volume=str(getattr(volume, "name", "")),
        size=size, left=left, limit=r.limit, used=r.used, reserved=r.reserved,
    )


def check_fits(volume: Any, qsid: Any, size: int, what: str) -> None:
    """Raise 507 unless ``size`` more bytes fit in the scope now (blocking)."""
    if qsid is None or size <= 0:
        return
    with scope_lock_if_limited(volume, qsid) as limited:
        r = room(volume, qsid) if limited else None
        if r is not None and size > r.grantable:
            raise refusal(qsid, volume, what, size, r)


class Hold:
    """A reservation for a copy or a clone: ``size`` bytes of the scope are
    held from ``acquire`` (which refuses with 507 when they do not fit) to
    ``release``, seen by every daemon as a grant.  The grant's lock file is
    this hold's own ``<id>.hold``, locked while it is held; the bytes the copy
    writes meanwhile are counted twice on a live figure (never missed).
    Blocking, in the pool; ``acquire`` and ``release`` may run in different
    pool threads."""

    def __init__(self, volume: Any, qsid: Any, size: int, what: str) -> None:
        self.volume = volume
        self.qsid = qsid
        self.size = size
        self.what = what
        self.writer: ScopeWriter | None = None
        self.fd = -1

    def acquire(self) -> Hold:
        if self.qsid is None or self.size <= 0:
            return self
        with scope_lock_if_limited(self.volume, self.qsid) as limited:
            r = room(self.volume, self.qsid) if limited else None
            if r is None:
                return self
            if self.size > r.grantable:
                raise refusal(self.qsid, self.volume, self.what, self.size, r)
            gdir = grants_dir(self.volume, self.qsid)
            _ensure_dir(gdir)
            name = f"hold-{os.getpid()}-{os.urandom(6).hex()}"
            lock = gdir / (name + HOLD_SUFFIX)
            self.fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.writer = ScopeWriter(self.volume, self.qsid, name, lock)
            self.writer.until = self.size
            self.writer._write()
        return self

    def release(self, written: int | None = None) -> None:
        """``written``: the bytes the copy added (None: all of ``size``)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            # Never raises: a grant file left behind is not locked any more,
            # so it counts for nothing (and the next look removes it).
            try:
                with contextlib.suppress(OSError):
                    writer.release(self.size if written is None else written)
                with contextlib.suppress(OSError):
                    os.unlink(writer.staging)
            finally:
                os.close(self.fd)
                self.fd = -1


@contextlib.contextmanager
def scope_lock_if_limited(volume: Any, qsid: Any) -> Iterator[bool]:
    """Under the scope's lock when it has a limit (yields True), else unlocked (False)."""
    if figure(volume, qsid) is None:
        yield False
        return
    with scope_lock(volume, qsid):
        yield True


class ScopeWriter:
    """The grant of one writer (a PATCH, a concatenation) into a quota scope.

    ``acquire`` decides it at the start, ``extend`` asks for more once it is
    used up, ``release`` records what was written and drops it.
    """

    def __init__(self, volume: Any, qsid: Any, session: str, staging: Path | str) -> None:
        self.volume = volume
        self.qsid = qsid
        self.session = session
        self.staging = str(staging)
        self.start = 0
        self.until = 0
        self.limited = True
        self.last_room: Room | None = None

    @property
    def blocks(self) -> bool:
        """Whether the grant is best reserved as blocks (``reserve_blocks``)."""
        return self.last_room is not None and self.last_room.blocks

    def _path(self) -> Path:
        return grants_dir(self.volume, self.qsid) / self.session

    def _write(self) -> None:
        gdir = grants_dir(self.volume, self.qsid)
        _ensure_dir(gdir)
        tmp = gdir / f"{self.session}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _Grant(self.session, self.staging, self.start, self.until).to_json())
        finally:
            os.close(fd)
        os.replace(tmp, self._path())  # not fsync'ed: a crash ends the writer, and its grant with it

    def acquire(self, offset: int, want: int) -> int:
        """Grant up to ``want`` bytes from ``offset``; returns the end offset granted
        (``offset`` + ``want`` when the scope has no limit)."""
        self.start = offset
        return self._grant(offset, want)

    def extend(self, offset: int, want: int) -> int:
        """Called at ``offset`` (= ``until``) for ``want`` more bytes: the new end granted."""
        if not self.limited:
            self.until = offset + want
            return self.until
        return self._grant(offset, want)

    def _grant(self, offset: int, want: int) -> int:
        with scope_lock_if_limited(self.volume, self.qsid) as limited:
            r = room(self.volume, self.qsid, exclude=self.session) if limited else None
            if r is None:
                self.limited = False
                self.until = offset + want
                return self.until
            self.last_room = r
            self.until = offset + min(want, r.grantable)
            if self.until > offset:
                self._write()
            return self.until

    def refusal(self, size: int) -> InsufficientStorage:
        r = self.last_room or Room(0, 0, 0)
        return refusal(self.qsid, self.volume, "the upload", size, r)

    def release(self, written: int) -> None:
        """The writer is done: its bytes go to the ledger (lagging volumes), its grant goes."""
        if not self.limited:
            return
        try:
            record_written(self.volume, self.qsid, written)
        finally:
            try:
                os.unlink(self._path())
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise


# -- the vfs volume's emulated quota ------------------------------------------------


def emulated_limit_path(volume: Any, qsid: Any) -> Path:
    return quota_dir(volume) / f"{qsid.pathname}.limit"


def read_emulated_limit(volume: Any, qsid: Any) -> int | None:
    try:
        with open(emulated_limit_path(volume, qsid), "rb") as f:
            value = int(f.read().strip() or b"0")
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    return value or None


def write_emulated_limit(volume: Any, qsid: Any, limit: int | None) -> None:
    path = emulated_limit_path(volume, qsid)
    if not limit:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    _ensure_dir(path.parent)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(str(int(limit)).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def apparent_bytes(top: Path) -> int:
    """The sum of the sizes of every regular file below ``top`` (no symlinks followed)."""
    total = 0
    stack = [str(top)]
    while stack:
        path = stack.pop()
        try:
            it = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
    return total

