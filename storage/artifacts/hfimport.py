"""Importing HuggingFace model revisions into a VFS artifact storage (a background task; no routes).

For each requested model revision, in order (as upstream): the hub's tree
listing (in the pool) names every file with its size and hash; then up to
``parallel`` files download at once, each:

* skipped when the destination already holds it, verified (a re-import, or a
  file finished before an interruption);
* else written into a staging file beside the destination,
  ``.NAME.<etag prefix>.part`` (hidden from listings), whose name depends only
  on the file's hash, so an interrupted import -- a dropped connection, a
  cancelled task, a restarted daemon -- resumes from the bytes already there
  with ``Range: bytes=N-``;
* verified before it is renamed into place: its size, and its sha256 (LFS
  files) or git blob id (others) against the listing, and the ``X-Linked-Etag``
  / ``ETag`` of the download against the same value (a file changed on the hub
  mid-import is refused, not mixed).

Downloads use treq on the reactor (nothing blocks it); writes, hashing and
renames run in the pool, with the connection paused while more than
``HIGH_WATER`` bytes wait to be written.  A dropped connection is retried
from its offset (``max_retries`` times per file, with backoff).

The destination key is upstream's: ``{model_id}/{revision}/{path}``, or
``{storage_prefix}/{path}``, or ``{path}`` for a prefix of ``/``.
"""

from __future__ import annotations

import hashlib
import os
import stat as stat_module
import threading
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from storage.artifacts.huggingface import (
    ArtifactVerificationFailed,
    HubClient,
    HubFile,
    HuggingFaceAPIError,
)
from storage.artifacts.vfs import PART_SUFFIX, VFSArtifactStorage, _open_dirs_beneath
from storage.bgtasks import Progress, TaskCancelled
from storage.errors import InsufficientStorage, InvalidAPIParameters, StorageError, no_space
from storage.paths import open_root, validate_relpath

log = Logger()

HIGH_WATER = 8 << 20  # bytes waiting for the pool before the connection is paused
LOW_WATER = 2 << 20
WRITE_BATCH = 1 << 20  # bytes gathered per pool write
HASH_CHUNK = 1 << 20
CANCEL_POLL = 0.25  # seconds between checks for a cancel during a download


def storage_key(model_id: str, revision: str, path: str, prefix: str | None) -> str:
    if prefix is None:
        return f"{model_id}/{revision}/{path}"
    if prefix == "/":
        return path
    return f"{prefix.strip('/')}/{path}"


def _etag(value: bytes | None) -> str | None:
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.startswith("W/"):
        text = text[2:]
    return text.strip('"') or None


class _Digest:
    """The hash a file is checked against: sha256 of the bytes (LFS) or its git blob id.

    A source that lists no hash (a reservoir: another storage proxy's VFS
    storage) has ``expected_etag`` None: its bytes are hashed (sha256, reported)
    and checked by size and version instead (``storage.artifacts.reservoir``).
    """

    def __init__(self, f: Any) -> None:
        self.file = f
        if f.sha256 or f.expected_etag is None:
            self.h = hashlib.sha256()
        else:
            self.h = hashlib.sha1()
            self.h.update(b"blob %d\0" % f.size)

    def update(self, data: bytes | memoryview) -> None:
        self.h.update(data)

    def matches(self) -> bool:
        return self.file.expected_etag is None or self.h.hexdigest() == self.file.expected_etag


def _stage_tag(f: Any) -> str:
    """What names a file's staging file: the same for the same version of the file, across runs."""
    return str(getattr(f, "stage_tag", None) or f.expected_etag)[:16]


def _object_tags(f: Any) -> dict[str, str]:
    """The metadata an object storage's copy carries, and that marks it verified."""
    tags = getattr(f, "object_tags", None)
    return dict(tags) if tags is not None else {"hf-etag": f.expected_etag}


class VFSTarget:
    """One file's destination in a VFS storage.  Every method blocks (pool)."""

    def __init__(self, storage: VFSArtifactStorage, key: str, f: Any) -> None:
        self.storage = storage
        self.file = f
        rel = validate_relpath(key, "filepath")
        if str(rel) in (".", ""):
            raise InvalidAPIParameters.field("filepath", f"{key!r} names the storage root")
        self.rel = PurePosixPath(rel)
        self.part_name = f".{self.rel.name[:150]}.{_stage_tag(f)}{PART_SUFFIX}"
        self.dir_fd = -1
        self.fd = -1
        self.offset = 0
        self.digest = _Digest(f)

    def _open_part_file(self) -> bool:
        """Open the destination's directory and the staging file in it; True
        (and nothing open) when the destination already holds the verified file."""
        root_fd = open_root(self.storage.root)
        try:
            self.dir_fd = _open_dirs_beneath(root_fd, self.rel.parent)
        finally:
            os.close(root_fd)
        if self._final_is_verified():
            self.close()
            return True
        try:
            self.fd = os.open(self.part_name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644,
                              dir_fd=self.dir_fd)
        except OSError as exc:
            raise no_space(exc) from exc
        return False

    def open(self) -> bool:
        """Open the staging file; True when the destination already holds the verified file."""
        if self._open_part_file():
            return True
        size = os.fstat(self.fd).st_size
        if size > self.file.size:
            os.ftruncate(self.fd, 0)
            size = 0
        self._hash_prefix(size)
        return False

    def _final_is_verified(self) -> bool:
        try:
            fd = os.open(self.rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except (FileNotFoundError, OSError):
            return False
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode) or st.st_size != self.file.size:
                return False
            mtime_ns = getattr(self.file, "mtime_ns", None)
            if mtime_ns is not None:  # no hash listed: the source's size and mtime, which finish() set
                return st.st_mtime_ns == mtime_ns
            digest = _Digest(self.file)
            while chunk := os.read(fd, HASH_CHUNK):
                digest.update(chunk)
            return digest.matches()
        finally:
            os.close(fd)

    def _hash_prefix(self, size: int) -> None:
        """Resume: hash the bytes an earlier attempt left in the staging file."""
        left, pos = size, 0
        while left > 0:
            chunk = os.pread(self.fd, min(HASH_CHUNK, left), pos)
            if not chunk:
                break
            self.digest.update(chunk)
            pos += len(chunk)
            left -= len(chunk)
        self.offset = pos
        if pos != size:
            os.ftruncate(self.fd, pos)

    def restart(self) -> None:
        """The server ignored our Range: start the file again."""
        os.ftruncate(self.fd, 0)
        self.offset = 0
        self.digest = _Digest(self.file)

    def write(self, data: bytes) -> None:
        if self.offset + len(data) > self.file.size:
            raise ArtifactVerificationFailed(f"{self.file.path}: the hub sent more than its {self.file.size} bytes")
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, self.offset)
                self.digest.update(view[:n])
                self.offset += n
                view = view[n:]
        except OSError as exc:
            raise no_space(exc) from exc

    def finish(self) -> None:
        """Check size and hash, then rename the staging file over the destination."""
        if self.offset != self.file.size:
            raise ArtifactVerificationFailed(f"{self.file.path}: {self.offset} of {self.file.size} bytes")
        if not self.digest.matches():
            os.ftruncate(self.fd, 0)  # a resume would only repeat it: start clean
            raise ArtifactVerificationFailed(
                f"{self.file.path}: the bytes do not match the hub's {'sha256' if self.file.sha256 else 'blob id'} "
                f"{self.file.expected_etag}")
        mtime_ns = getattr(self.file, "mtime_ns", None)
        if mtime_ns is not None:
            os.utime(self.fd, ns=(mtime_ns, mtime_ns))
        os.fsync(self.fd)
        try:
            st = os.stat(self.rel.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat_module.S_ISDIR(st.st_mode):
            raise InvalidAPIParameters.field("filepath", f"{self.rel} is a directory in the storage")
        os.rename(self.part_name, self.rel.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


JOURNAL_EVERY = 4 << 20  # bytes of a part written between saves of the parts journal


class RangedVFSTarget(VFSTarget):
    """A large file fetched as ranged parts at once, written in place (pwrite) into a staging file
    of its full size, ``.NAME.<tag>.ranged.part``.  Beside it, a journal
    (``.NAME.<tag>.ranged-parts.part``, JSON, replaced atomically) records how many bytes of each
    part are written, so an interrupted import -- a cut connection, a cancel, a killed daemon --
    resumes every part where the journal says.  The journal is saved only after the bytes it
    counts were written, and the whole file is hashed before the rename, so a journal that lags
    or a torn write costs a re-download, never a wrong file.  Every method blocks (pool)."""

    def __init__(self, storage: VFSArtifactStorage, key: str, f: Any, part_size: int) -> None:
        super().__init__(storage, key, f)
        stem = f".{self.rel.name[:150]}.{_stage_tag(f)}"
        self.part_name = f"{stem}.ranged{PART_SUFFIX}"
        self.journal_name = f"{stem}.ranged-parts{PART_SUFFIX}"
        self.part_size = part_size
        self.parts = [[start, min(start + part_size, f.size), 0] for start in range(0, f.size, part_size)]
        self.unsaved = 0
        self.lock = threading.Lock()  # parts are written by several pool threads at once

    def open(self) -> bool:
        if self._open_part_file():
            return True
        done = self._read_journal()
        if done is None or os.fstat(self.fd).st_size != self.file.size:
            done = [0] * len(self.parts)
            os.ftruncate(self.fd, 0)
        try:
            os.ftruncate(self.fd, self.file.size)  # sparse: the parts fill it
        except OSError as exc:
            raise no_space(exc) from exc
        for part, n in zip(self.parts, done, strict=True):
            part[2] = n
        self.offset = sum(done)
        return False

    def _read_journal(self) -> list[int] | None:
        import json

        try:
            fd = os.open(self.journal_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError:
            return None
        try:
            data = json.loads(os.read(fd, 1 << 20))
        except ValueError:
            return None
        finally:
            os.close(fd)
        if (not isinstance(data, dict) or data.get("size") != self.file.size
                or data.get("part_size") != self.part_size or not isinstance(data.get("done"), list)):
            return None
        done = data["done"]
        if len(done) != len(self.parts) or not all(
                isinstance(n, int) and 0 <= n <= end - start for n, (start, end, _) in zip(done, self.parts, strict=True)):
            return None
        return done

    def save_journal(self) -> None:
        import json

        with self.lock:
            if self.fd < 0:
                return
            self._save_journal(json)

    def _save_journal(self, json: Any) -> None:
        tmp = f"{self.journal_name}.tmp{PART_SUFFIX}"
        body = json.dumps({"size": self.file.size, "part_size": self.part_size,
                           "done": [p[2] for p in self.parts]}).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644,
                         dir_fd=self.dir_fd)
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            os.replace(tmp, self.journal_name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError as exc:
            raise no_space(exc) from exc
        self.unsaved = 0

    def write_at(self, index: int, data: bytes) -> None:
        part = self.parts[index]
        if part[0] + part[2] + len(data) > part[1]:
            raise ArtifactVerificationFailed(f"{self.file.path}: the hub sent more than part {index} holds")
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, part[0] + part[2])
                part[2] += n
                view = view[n:]
        except OSError as exc:
            raise no_space(exc) from exc
        with self.lock:
            self.unsaved += len(data)
            due = self.unsaved >= JOURNAL_EVERY
        if due:
            self.save_journal()

    def finish(self) -> None:
        """Every part whole: hash the file from the start, then rename it over the destination."""
        missing = [i for i, (start, end, done) in enumerate(self.parts) if done != end - start]
        if missing:
            raise ArtifactVerificationFailed(f"{self.file.path}: parts {missing[:5]} incomplete")
        digest = _Digest(self.file)
        pos = 0
        while pos < self.file.size:
            chunk = os.pread(self.fd, min(HASH_CHUNK, self.file.size - pos), pos)
            if not chunk:
                break
            digest.update(chunk)
            pos += len(chunk)
        if pos != self.file.size or not digest.matches():
            for part in self.parts:
                part[2] = 0
            os.ftruncate(self.fd, 0)
            self._unlink_journal()
            raise ArtifactVerificationFailed(
                f"{self.file.path}: the bytes do not match the hub's {'sha256' if self.file.sha256 else 'blob id'} "
                f"{self.file.expected_etag}")
        self.offset = pos
        self.digest = digest
        dir_fd = os.dup(self.dir_fd)
        try:
            super().finish()  # fsync, mtime, rename, close
            self._unlink_journal(dir_fd)
        finally:
            os.close(dir_fd)

    def _unlink_journal(self, dir_fd: int | None = None) -> None:
        try:
            os.unlink(self.journal_name, dir_fd=self.dir_fd if dir_fd is None else dir_fd)
        except FileNotFoundError:
            pass


class _NoRanges(Exception):
    """The server answered a part's Range with the whole file: fetch it in one stream instead."""


class _PartView:
    """One part of a RangedVFSTarget as the body sink and ``_get`` see a target."""

    def __init__(self, target: RangedVFSTarget, index: int) -> None:
        self.target = target
        self.index = index
        self.file = target.file

    @property
    def offset(self) -> int:
        start, _, done = self.target.parts[self.index]
        return start + done

    @property
    def end(self) -> int:  # inclusive, as in a Range header
        return self.target.parts[self.index][1] - 1

    @property
    def remaining(self) -> int:
        start, end, done = self.target.parts[self.index]
        return end - start - done

    def write(self, data: bytes) -> None:
        self.target.write_at(self.index, data)

    def restart(self) -> None:
        raise _NoRanges()


class S3Target:
    """One file's destination in an object storage (upstream: the storage's first bucket).

    A multipart upload tagged ``x-amz-meta-hf-etag``; completed only once size and
    hash match, aborted otherwise.  An object already there with the listed size
    and tag is taken as verified (we wrote it so).  A dropped connection resumes
    into the same upload.  After a daemon was killed mid-file, its multipart
    upload is still at S3 and is reused: the file is downloaded from the start
    again (the sha256 that verifies it needs every byte, and S3 cannot give back
    the parts of an unfinished upload), but the bytes of each part S3 already
    holds are not uploaded again once their MD5 matches that part's ETag; a part
    that does not match aborts that upload and the file goes up anew.  Every
    method blocks (pool).
    """

    def __init__(self, storage: Any, bucket: str, key: str, f: Any) -> None:
        from storage.artifacts.s3 import validate_key

        self.storage = storage
        self.bucket = bucket
        self.key = validate_key(key)
        self.file = f
        self.offset = 0
        self.digest = _Digest(f)
        self.upload: Any = None
        self.reused: list[dict[str, Any]] = []  # parts of a killed run's upload, to check, not upload
        self.part_md5: Any = None
        self.reused_bytes = 0  # of the reused parts, how many were checked

    def _find_unfinished(self) -> None:
        """A multipart upload of this key a killed daemon left (the newest; older ones aborted):
        its parts, if they are the whole parts of our part size from the first."""
        if self.file.size <= self.upload.part_size:  # one PutObject, never a multipart upload to reuse
            return
        client = self.storage.client
        try:
            answer = client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.key)
        except Exception:
            return
        uploads = sorted((u for u in answer.get("Uploads") or [] if u.get("Key") == self.key),
                         key=lambda u: u.get("Initiated") or 0, reverse=True)
        for extra in uploads[1:]:
            try:
                client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=extra["UploadId"])
            except Exception:
                pass
        if not uploads:
            return
        upload_id = uploads[0]["UploadId"]
        try:
            parts = client.list_parts(Bucket=self.bucket, Key=self.key, UploadId=upload_id).get("Parts") or []
        except Exception:
            return
        part_size = self.upload.part_size
        parts = sorted(parts, key=lambda q: q["PartNumber"])
        usable = [q for i, q in enumerate(parts, 1) if q["PartNumber"] == i and q.get("Size") == part_size]
        usable = usable[:max((self.file.size - 1) // part_size, 0)]  # the last part always goes up anew
        etags_are_md5 = all('-' not in str(q.get("ETag", "-")) for q in usable)
        if not usable or not etags_are_md5:
            try:
                client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)
            except Exception:
                pass
            return
        self.upload.upload_id = upload_id
        self.upload.parts = [{"PartNumber": q["PartNumber"], "ETag": q["ETag"]} for q in usable]
        self.reused = usable
        self.part_md5 = hashlib.md5(usedforsecurity=False)
        log.info("import: s3://{bucket}/{key}: reusing {n} parts of an unfinished upload", bucket=self.bucket,
                 key=self.key, n=len(usable))

    def _start(self) -> None:
        import mimetypes

        ctype = mimetypes.guess_type(self.file.path)[0] or "application/octet-stream"
        self.upload = self.storage.start_upload(self.bucket, self.key, ctype, _object_tags(self.file))

    def open(self) -> bool:
        from storage.artifacts.s3 import s3_error

        try:
            head = self.storage.client.head_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            err = s3_error(exc, bucket=self.bucket, key=self.key)
            if err.status != 404:
                raise err from None
            head = None
        if head is not None and head.get("ContentLength") == self.file.size:
            meta = head.get("Metadata") or {}
            if all(meta.get(k) == v for k, v in _object_tags(self.file).items()):
                return True
        self._start()
        self._find_unfinished()
        return False

    def restart(self) -> None:
        if self.upload is not None:
            if self.reused:  # the server starts over: the parts are checked again as they come
                self.offset = 0
                self.digest = _Digest(self.file)
                self.reused_bytes = 0
                self.part_md5 = hashlib.md5(usedforsecurity=False)
                return
            self.upload.abort()
        self.offset = 0
        self.digest = _Digest(self.file)
        self._start()

    def _check_reused(self, data: bytes) -> bytes:
        """Feed the bytes S3 holds already through the MD5s of their parts; returns what lies past
        them (to upload).  A part that differs: that upload is aborted, a new one started, and the
        file is fetched again from its first byte (``_Interrupted``)."""
        part_size = self.upload.part_size
        total = len(self.reused) * part_size
        view = memoryview(data)
        while view and self.reused_bytes < total:
            index = self.reused_bytes // part_size
            take = min(len(view), part_size - self.reused_bytes % part_size)
            self.part_md5.update(view[:take])
            self.reused_bytes += take
            view = view[take:]
            if self.reused_bytes % part_size == 0:
                if self.part_md5.hexdigest() != str(self.reused[index]["ETag"]).strip('"'):
                    log.info("import: s3://{bucket}/{key}: part {n} of the unfinished upload differs; "
                             "uploading anew", bucket=self.bucket, key=self.key, n=index + 1)
                    self.upload.abort()
                    self.reused = []
                    self.offset = 0
                    self.digest = _Digest(self.file)
                    self._start()
                    raise _Interrupted("a part of the unfinished upload differs from the source")
                self.part_md5 = hashlib.md5(usedforsecurity=False)
        return bytes(view)

    def write(self, data: bytes) -> None:
        if self.offset + len(data) > self.file.size:
            raise ArtifactVerificationFailed(f"{self.file.path}: the hub sent more than its {self.file.size} bytes")
        rest = self._check_reused(data) if self.reused else data
        if rest:
            self.upload.write(rest)
        self.digest.update(data)
        self.offset += len(data)

    def finish(self) -> None:
        if self.offset != self.file.size or not self.digest.matches():
            got = self.offset
            self.upload.abort()
            self.upload = None
            raise ArtifactVerificationFailed(
                f"{self.file.path}: {got} bytes that do not match the hub's {self.file.size} bytes "
                f"{self.file.expected_etag}")
        self.upload.finish()
        self.upload = None

    def close(self) -> None:
        if self.upload is not None:  # not finished: throw the parts away
            self.upload.abort()
            self.upload = None


class _Interrupted(Exception):
    """The body ended short (a dropped connection): retry from the offset."""


class _BodySink(Protocol):
    """Receives one response body and writes it through the pool, in order, with backpressure."""

    def __init__(self, target: VFSTarget, pool: Any, progress: Progress, reactor: Any, idle: float) -> None:
        self.target = target
        self.pool = pool
        self.progress = progress
        self.reactor = reactor
        self.idle = idle
        self.timer: Any = None
        self.poller: Any = None
        self.stalled = False
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.pending = 0  # bytes handed to the pool, not yet written
        self.chain: Deferred[None] = succeed(None)
        self.paused = False
        self.error: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self._arm()
        self.poller = self.reactor.callLater(CANCEL_POLL, self._poll_cancel)

    def _poll_cancel(self) -> None:
        """A cancel must not wait for the next byte of a stalled (or paused) download."""
        self.poller = None
        if self.progress.cancelled and self.error is None:
            self.error = Failure(TaskCancelled())
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.poller = self.reactor.callLater(CANCEL_POLL, self._poll_cancel)

    def _arm(self) -> None:
        """(Re)start the stall timer; it does not run while we paused the connection."""
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.idle)
        else:
            self.timer = self.reactor.callLater(self.idle, self._stall)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _stall(self) -> None:
        self.timer = None
        self.stalled = True
        self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        if not self.paused:
            self._arm()
        if self.progress.cancelled:
            self.error = Failure(TaskCancelled())
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered >= WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        data = b"".join(self.buffer)
        self.buffer, self.buffered = [], 0
        self.pending += len(data)
        if self.pending > HIGH_WATER and not self.paused:
            self.paused = True
            self._disarm()
            self.transport.pauseProducing()  # type: ignore[union-attr]

        def write(_: Any) -> Deferred[None] | None:
            if self.error is not None:  # an earlier write failed: nothing more reaches the target
                return None
            return self.pool.run(self.target.write, data)

        def written(_: Any) -> None:
            self.pending -= len(data)
            if self.error is not None:
                return
            self.progress.advance(len(data))
            if self.paused and self.pending < LOW_WATER:
                self.paused = False
                try:
                    self._arm()
                    self.transport.resumeProducing()  # type: ignore[union-attr]
                except Exception:  # the connection is gone already
                    pass

        def failed(f: Failure) -> None:
            self.pending -= len(data)
            if self.error is None:
                self.error = f
                try:
                    self.transport.stopProducing()  # type: ignore[union-attr]
                except Exception:
                    pass

        self.chain.addCallback(write).addCallbacks(written, failed)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        self._disarm()
        if self.poller is not None and self.poller.active():
            self.poller.cancel()
        self.poller = None
        self._flush()
        if self.stalled:
            reason = Failure(_Interrupted(f"no data for {self.idle:g} s"))

        def end(_: Any) -> None:
            if self.error is not None:
                self.done.errback(self.error)
            elif reason.check(ResponseDone):
                self.done.callback(None)
            elif reason.check(_Interrupted):
                self.done.errback(reason)
            else:
                self.done.errback(Failure(_Interrupted(reason.getErrorMessage())))

        self.chain.addBoth(end)


@dataclass
class FileResult:
    path: str
    key: str
    size: int
    skipped: bool = False
    retries: int = 0
    parts: int = 0  # ranged parts, for a large file


@dataclass
class Importer:
    """Downloads files of a hub into a VFS storage (one per import task)."""

    client: HubClient
    storage: Any  # a VFSArtifactStorage, or an S3Storage with ``bucket``
    pool: Any
    reactor: Any
    parallel: int = 4
    max_retries: int = 8
    backoff: float = 0.5
    treq: Any = None
    emit: Any = None  # emit(list of storage.events.encoding.Event): the manager's event bus
    hub_pool: Any = None  # where the hub's metadata calls block (default: pool)
    bucket: str | None = None  # an object storage's bucket: files go there
    commits: dict[str, str] = field(default_factory=dict)
    part_size: int = 0  # files larger than this come in ranged parts at once (VFS destinations); 0: never
    _no_ranges: set[str] = field(default_factory=set)

    @property
    def _source(self) -> str:
        return "hub" if self.client.config.type == "huggingface" else "source"

    def __post_init__(self) -> None:
        if self.treq is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            pool = HTTPConnectionPool(self.reactor, persistent=True)
            pool.maxPersistentPerHost = max(self.parallel, 2)
            self.treq = HTTPClient(Agent(self.reactor, pool=pool))

    def _headers(self, offset: int, end: int | None = None) -> dict[bytes, list[bytes]]:
        headers = {b"Accept-Encoding": [b"identity"], b"User-Agent": [b"storage-proxy"]}
        if self.client.config.token:
            headers[b"Authorization"] = [f"Bearer {self.client.config.token}".encode()]
        if end is not None:
            headers[b"Range"] = [f"bytes={offset}-{end}".encode()]
        elif offset:
            headers[b"Range"] = [f"bytes={offset}-".encode()]
        return headers

    def _request(self, f: Any, offset: int, end: int | None = None) -> Any:
        """The download of ``f`` from ``offset`` (to ``end``, inclusive): the hub's GET, or what the
        source says (``client.download_request(f, offset, end)``: method, url, headers, body)."""
        custom = getattr(self.client, "download_request", None)
        if custom is not None:
            method, url, headers, body = custom(f, offset, end)
            merged = {b"Accept-Encoding": [b"identity"], b"User-Agent": [b"storage-proxy"], **headers}
            return self.treq.request(method, url, headers=merged, data=body, allow_redirects=True,
                                     unbuffered=True, timeout=60)
        return self.treq.get(f.url, headers=self._headers(offset, end), allow_redirects=True, unbuffered=True,
                             timeout=60)

    async def _sleep(self, seconds: float) -> None:
        d: Deferred[None] = Deferred()
        call = self.reactor.callLater(seconds, d.callback, None)
        try:
            await d
        finally:
            if call.active():
                call.cancel()

    async def fetch(self, f: Any, key: str, progress: Progress) -> FileResult:
        if self.bucket is None and self.part_size and f.size > self.part_size and key not in self._no_ranges:
            try:
                return await self._fetch_ranged(f, key, progress)
            except _NoRanges:
                log.info("import: {path}: the source ignores ranges; one stream instead", path=f.path)
                self._no_ranges.add(key)
        target: Any = (S3Target(self.storage, self.bucket, key, f) if self.bucket is not None
                       else VFSTarget(self.storage, key, f))
        if await self.pool.run(target.open):
            progress.advance(f.size)
            return FileResult(f.path, key, f.size, skipped=True)
        result = FileResult(f.path, key, f.size)
        try:
            progress.advance(target.offset)
            while True:
                progress.check()
                try:
                    if target.offset < f.size:
                        await self._get(f, target, progress)
                    await self.pool.run(target.finish)
                    return result
                except _Interrupted as exc:
                    result.retries += 1
                    if result.retries > self.max_retries:
                        raise HuggingFaceAPIError(
                            f"{f.path}: the download kept failing at byte {target.offset} of {f.size}: {exc}"
                        ) from None
                    log.info("import: {path} interrupted at {offset}/{size} ({why}); retry {n}", path=f.path,
                             offset=target.offset, size=f.size, why=str(exc), n=result.retries)
                    await self._sleep(min(self.backoff * 2 ** (result.retries - 1), 10.0))
        finally:
            await self.pool.run(target.close)

    async def _fetch_ranged(self, f: Any, key: str, progress: Progress) -> FileResult:
        """A large file as ranged parts, up to ``parallel`` at once (``RangedVFSTarget``)."""
        target = RangedVFSTarget(self.storage, key, f, self.part_size)
        if await self.pool.run(target.open):
            progress.advance(f.size)
            return FileResult(f.path, key, f.size, skipped=True)
        result = FileResult(f.path, key, f.size, parts=len(target.parts))
        progress.advance(target.offset)

        async def one(index: int) -> None:
            view = _PartView(target, index)
            tries = 0
            while view.remaining > 0:
                progress.check()
                try:
                    await self._get(f, view, progress)
                except _Interrupted as exc:
                    tries += 1
                    result.retries += 1
                    if tries > self.max_retries:
                        raise HuggingFaceAPIError(
                            f"{f.path}: part {index} kept failing at byte {view.offset}: {exc}") from None
                    log.info("import: {path} part {i} interrupted at {offset} ({why}); retry {n}", path=f.path,
                             i=index, offset=view.offset, why=str(exc), n=tries)
                    await self._sleep(min(self.backoff * 2 ** (tries - 1), 10.0))
            await self.pool.run(target.save_journal)  # this part is whole: a restart skips it

        try:
            sem = DeferredSemaphore(max(self.parallel, 1))
            pending = [i for i, (start, end, done) in enumerate(target.parts) if done < end - start]

            def start(index: int) -> Deferred[None]:
                return Deferred.fromCoroutine(one(index))

            ds = [sem.run(start, i) for i in pending]
            outcome = await DeferredList(ds, consumeErrors=True)
            failures: list[Failure] = [r for ok, r in outcome if not ok]  # type: ignore[misc]
            if failures:
                await self.pool.run(target.save_journal)  # what was written stays for the next run
                for wanted in (TaskCancelled, _NoRanges):
                    for failure in failures:
                        if failure.check(wanted):
                            if wanted is _NoRanges:  # the stream starts from its own staging file
                                progress.advance(-sum(p[2] for p in target.parts))
                            failure.raiseException()
                failures[0].raiseException()
            await self.pool.run(target.finish)
            return result
        finally:
            await self.pool.run(target.close)

    async def _get(self, f: Any, target: Any, progress: Progress) -> None:
        offset = target.offset
        end = getattr(target, "end", None)  # a part of a ranged download
        try:
            response = await self._request(f, offset, end)
        except Exception as exc:  # refused, reset, timed out: the hub may come back
            raise _Interrupted(f"{type(exc).__name__}: {exc}") from None
        code = response.code
        headers = response.headers
        if end is not None and code != 206 and code < 300:
            await _discard(response)
            raise _NoRanges()
        if code == 416 and offset == f.size:
            await _discard(response)
            return
        if code >= 500 or code == 429:
            await _discard(response)
            raise _Interrupted(f"HTTP {code}")
        if code not in (200, 206):
            await _discard(response)
            if code == 404 and getattr(f, "missing_error", None) is not None:
                raise f.missing_error(f"{f.path}: gone from the source (HTTP 404)")
            raise HuggingFaceAPIError(f"{f.path}: the {self._source} answered HTTP {code}")
        tag = _etag(headers.getRawHeaders(b"X-Linked-Etag", [None])[0]) or _etag(
            headers.getRawHeaders(b"ETag", [None])[0])
        if tag is not None and f.expected_etag is not None and tag != f.expected_etag:
            await _discard(response)
            raise ArtifactVerificationFailed(
                f"{f.path}: the hub's etag {tag} is not the listed {f.expected_etag} (changed mid-import?)")
        commit = headers.getRawHeaders(b"X-Repo-Commit", [None])[0]
        if commit:
            self.commits[f.url] = commit.decode("latin-1")
        if offset and code == 200:
            progress.advance(-offset)
            await self.pool.run(target.restart)
        elif code == 206:
            content_range = (headers.getRawHeaders(b"Content-Range", [b""])[0] or b"").decode("latin-1")
            if not content_range.startswith(f"bytes {offset}-"):
                await _discard(response)
                raise HuggingFaceAPIError(f"{f.path}: asked for bytes from {offset}, got {content_range!r}")
        length = headers.getRawHeaders(b"Content-Length", [None])[0]
        if code == 200 and length is not None and length.isdigit() and int(length) != f.size:
            await _discard(response)  # the source's file is not the listed one (changed since?)
            raise ArtifactVerificationFailed(f"{f.path}: the {self._source} sends {int(length)} bytes, "
                                             f"listed {f.size}")
        sink = _BodySink(target, self.pool, progress, self.reactor, self.client.config.read_timeout)
        response.deliverBody(sink)
        await sink.done


async def _discard(response: Any) -> None:
    try:
        await response.content()
    except Exception:
        pass


async def import_models(
    progress: Progress, importer: Importer, models: list[dict[str, str]], prefix: str | None,
) -> dict[str, Any]:
    """The task: every model in turn, its files in parallel.  Fails if any model failed."""
    client, pool = importer.client, importer.pool
    hub_pool = importer.hub_pool or pool
    listings: list[tuple[dict[str, str], list[HubFile] | None, str | None]] = []
    for m in models:
        try:
            files_for = getattr(client, "files_for", None)  # a source laid out under the prefix too
            listing = (await hub_pool.run(files_for, m["model_id"], m["revision"], prefix) if files_for is not None
                       else await hub_pool.run(client.files, m["model_id"], m["revision"]))
            listings.append((m, listing, None))
        except StorageError as exc:
            listings.append((m, None, str(exc)))
    progress.total = sum(f.size for _, files, _ in listings for f in files or [])
    progress.changed()
    needed = progress.total
    free = None if importer.bucket is not None else await pool.run(_free_bytes, importer.storage.root)
    if free is not None and needed > free:
        raise InsufficientStorage(f"the import needs {needed} bytes; the storage has {free} free")
    results: list[dict[str, Any]] = []
    for m, files, error in listings:
        entry: dict[str, Any] = {"model_id": m["model_id"], "revision": m["revision"], "success": False}
        results.append(entry)
        if files is None:
            entry["error"] = error
            _emit(importer, [model_import_done(m, client.config.name, False, None, client.config.type)])
            continue
        progress.message = f"importing {m['model_id']}@{m['revision']} ({len(files)} files)"
        progress.changed()
        sem = DeferredSemaphore(max(importer.parallel, 1))
        keys = [storage_key(m["model_id"], m["revision"], f.path, prefix) for f in files]
        ds = [sem.run(importer.fetch, f, k, progress) for f, k in zip(files, keys, strict=True)]
        outcome = await DeferredList(ds, consumeErrors=True)
        failures: list[Failure] = [r for ok, r in outcome if not ok]  # type: ignore[misc]
        for failure in failures:
            if failure.check(TaskCancelled):
                failure.raiseException()
        done: list[FileResult] = [r for ok, r in outcome if ok]
        entry.update(files=len(files), bytes=sum(f.size for f in files),
                     skipped=sum(1 for r in done if r.skipped), retries=sum(r.retries for r in done),
                     parts=sum(r.parts for r in done))
        commits = {importer.commits.get(f.url) for f in files} - {None}
        entry["commit_hash"] = commits.pop() if len(commits) == 1 else None
        if failures:
            entry["error"] = "; ".join(str(f.value) for f in failures[:5])
            for failure in failures:
                if not failure.check(StorageError):
                    log.failure("import of {model} failed", failure, model=m["model_id"])
            _emit(importer, [model_import_done(m, client.config.name, False, None, client.config.type)])
            continue
        if entry["commit_hash"] is None:  # every file was there already: ask the hub, as upstream does
            try:
                entry["commit_hash"] = await hub_pool.run(client.commit_hash, m["model_id"], m["revision"])
            except StorageError:
                pass
        entry["success"] = True
        kind = client.config.type
        verification = None
        fetch = getattr(client, "verification_result", None)  # a reservoir's, from the source's manager
        if fetch is not None and m.get("artifact_revision_id"):
            verification = await hub_pool.run(fetch, m["artifact_revision_id"])
        _emit(importer, [model_verifying(m, client.config.name, kind),
                         model_import_done(m, client.config.name, True, entry["commit_hash"], kind, verification)])
    failed = [r for r in results if not r["success"]]
    if failed:
        raise ImportFailed(f"{len(failed)} of {len(results)} models failed to import", data={"models": results})
    return {"models": results}


# -- upstream's artifact events (common events/event_types/artifact/anycast.py) ------------


def model_verifying(m: dict[str, str], registry_name: str, registry_type: str = "huggingface") -> Any:
    from storage.events.encoding import Event

    return Event("anycast", "model_verifying", (
        ("model_id", m["model_id"]), ("revision", m["revision"]), ("registry_type", registry_type),
        ("registry_name", registry_name)))


def model_import_done(m: dict[str, str], registry_name: str, success: bool, digest: str | None,
                      registry_type: str = "huggingface", verification_result: Any = None) -> Any:
    from storage.events.encoding import Event

    return Event("anycast", "model_import_done", (
        ("model_id", m["model_id"]), ("revision", m["revision"]), ("registry_type", registry_type),
        ("registry_name", registry_name), ("success", success), ("digest", digest),
        ("verification_result", verification_result)))


def _emit(importer: Importer, events: list[Any]) -> None:
    if importer.emit is not None:
        try:
            importer.emit(events)
        except Exception:
            log.failure("cannot emit {names}", names=[e.name for e in events])


class ImportFailed(StorageError):
    status = 502
    problem = "registries/huggingface/import-failed"
    title = "Model Import Failed"
    error_code = "artifact_import_failed"
    external = True


def _free_bytes(root: str) -> int | None:
    try:
        st = os.statvfs(root)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
