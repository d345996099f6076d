"""The plain Linux filesystem backend (upstream's ``vfs``), base of the others.

Layout (upstream's, version 3): the volume root holds ``version.txt`` (``3``);
a quota scope is the directory ``<root>/<qsid hex>``; a vfolder lives at
``<root>/<qsid hex>/<h[0:2]>/<h[2:4]>/<h[4:]>``, or at
``<root>/<h[0:2]>/<h[2:4]>/<h[4:]>`` for a bare 22.03 vfid.  Metadata the
manager stores for a vfolder is kept outside the vfolder tree (a container
must neither see nor clobber it), under ``<root>/.storage-proxy/metadata/``.

Every method validates its paths on the reactor (``storage.paths``), then
does the filesystem work in one pool call.  Inside the pool, paths are
resolved (symlinks followed, the result must stay inside the vfolder) and
then re-opened component by component from a descriptor of the vfolder
with ``O_NOFOLLOW``, and the final operation acts on a name relative to its
parent's descriptor: a container racing us cannot redirect an operation
outside its vfolder.  OSErrors become ``FileOperationFailed`` (400: ``msg``,
``errno``, ``paths``), or ``InsufficientStorage`` (507) for ENOSPC/EDQUOT.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from storage import quota
from storage.bgtasks import Progress, TaskCancelled
from storage.config import ConfigError, parse_duration
from storage.errors import (
    FileOperationFailed,
    InsufficientStorage,
    InvalidPath,
    InvalidQuotaConfig,
    InvalidSubpath,
    QuotaScopeExists,
    QuotaScopeNotFound,
    RequestTooLarge,
    StorageError,
    UnsupportedOperation,
    VFolderExists,
    VFolderNotFound,
)
from storage.fs import crossmove, tree
from storage.fs.atomic import write_atomic
from storage.fs.usage import TreeUsage, UsageCache
from storage.paths import (
    open_dir_beneath,
    open_parent,
    open_root,
    resolve_rel,
    validate_name,
    validate_relpath,
)
from storage.quota import ScopeFigure

from .base import (
    AbstractVolume,
    Capability,
    DirEntry,
    FolderUsage,
    FSUsage,
    QuotaConfig,
    QuotaUsage,
    VolumeContext,
)

if TYPE_CHECKING:
    from storage.config import VolumeConfig
    from storage.vfid import QuotaScopeID, VFolderID

log = Logger()

LAYOUT_VERSION = "3"
DEFAULT_DIR_MODE = 0o755
MAX_METADATA_BYTES = 10 * (1 << 20)  # upstream refuses to read more
PRIVATE_DIR = ".storage-proxy"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _emulated_limit(options: QuotaConfig | None) -> int | None:
    if options is None:
        return None
    limit = options.limit_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidQuotaConfig("Invalid quota config option", data={"limit_bytes": "out of range"})
    return limit or None


def _storage_error(exc: OSError, paths: list[str]) -> StorageError:
    msg = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(msg, errno=exc.errno, paths=paths)
    return FileOperationFailed(msg, errno=exc.errno, paths=paths)


@contextlib.contextmanager
def os_errors(*paths: str) -> Iterator[None]:
    """Turn an OSError into the API's error naming the client's ``paths``."""
    try:
        yield
    except OSError as exc:
        raise _storage_error(exc, list(paths)) from exc


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _entry_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "DIRECTORY"
    if stat.S_ISLNK(mode):
        return "SYMLINK"
    return "FILE"


class VfsVolume(AbstractVolume):
    backend_name = "vfs"
    capabilities = frozenset({Capability.VFOLDER})
    # A clone first checks that the source fits in the free space, as upstream
    # does; a backend whose copies are reflinks may turn this off.
    clone_checks_free_space = True
    # A move that has to copy (EXDEV) first asks this whether the bytes fit
    # (storage.fs.crossmove.FitCheck); None: the filesystem alone decides.
    copy_fits: Any = None

    def __init__(self, config: VolumeConfig, context: VolumeContext) -> None:
        super().__init__(config, context)
        options = {str(k).replace("_", "-"): v for k, v in (config.options or {}).items()}
        prefix = f"[volume.{config.name}] options"

        def duration(key: str, default: str) -> float:
            return parse_duration(options.get(key, default), f"{prefix}.{key}")

        concurrency = options.get("usage-concurrency", 4)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"{prefix}.usage-concurrency", f"expected a positive integer, got {concurrency!r}")
        # ``quota = "emulated"`` (vfs only): quota-scope limits kept by the
        # daemon and enforced by it alone (storage.quota), usage by a walk of
        # the scope; ``quota-lag`` makes that usage lag like CephFS's rstats.
        # For development and tests: a plain directory has no quota of its own.
        mode = options.get("quota")
        if mode not in (None, "none", "emulated") or (mode == "emulated" and self.backend_name != "vfs"):
            raise ConfigError(f"{prefix}.quota", f"expected 'emulated' (vfs volumes only), got {mode!r}")
        self.emulated_quota = mode == "emulated"
        self.emulated_quota_lag = duration("quota-lag", "0s")
        self._emulated_usage: dict[str, tuple[float, int]] = {}
        reactor: Any = context.reactor if context.reactor is not None else self.pool.reactor
        self.usage_cache = UsageCache(
            self.pool.run,
            reactor.callLater,
            timeout=duration("usage-timeout", "30s"),
            ttl=duration("usage-cache-ttl", "10s"),
            max_walk=duration("usage-max-walk", "10m"),
            concurrency=concurrency,
        )

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        # The daemon awaits prepare() before its listeners accept (storage.tap).
        super().startService()

    def stopService(self) -> Any:
        self.usage_cache.stop()
        return super().stopService()

    async def _run_to_end(self, progress: Progress, f: Any, *args: Any) -> Any:
        """``pool.run(f, *args)`` for long operations that watch ``progress``.

        A pool thread cannot be stopped from outside, so cancelling the
        caller's Deferred (Klein does it when a client goes away) must not
        leave the thread working on behind our back: it marks ``progress``
        cancelled, waits until the thread has noticed and returned, and only
        then raises ``CancelledError``, so clean-up never races the thread.
        """
        outcome: list[Any] = []
        waiters: list[Deferred[None]] = []

        def finished(result: Any) -> None:
            outcome.append(result)
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

        self.pool.run(f, *args).addBoth(finished)
        cancelled = False
        while not outcome:
            waiter: Deferred[None] = Deferred()
            waiters.append(waiter)
            try:
                await waiter
            except CancelledError:
                cancelled = True
                progress.cancelled = True
        if cancelled:
            raise CancelledError()
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    async def prepare(self) -> None:
        """Check the volume path and write the layout version (idempotent)."""
        await self.pool.run(self._prepare)

    def _prepare(self) -> None:
        if not self.mount_path.is_dir():
            raise ConfigError(f"[volume.{self.name}] path", f"not a directory: {self.mount_path}")
        self.root.mkdir(mode=DEFAULT_DIR_MODE, parents=True, exist_ok=True)
        version = self.root / "version.txt"
        try:
            found = version.read_text().strip()
        except FileNotFoundError:
            write_atomic(self.root / "version.txt", (LAYOUT_VERSION + "\n").encode(), mode=0o644, hidden=True)
            return
        if found != LAYOUT_VERSION:
            log.warn("volume {name}: {path} says layout version {found!r}; this proxy uses {want}",
                     name=self.name, path=version, found=found, want=LAYOUT_VERSION)

    # -- volume --------------------------------------------------------------

    async def get_hwinfo(self) -> dict[str, Any]:
        return {"status": "healthy", "status_info": None, "metadata": {}}

    async def get_performance_metric(self) -> dict[str, Any]:
        raise UnsupportedOperation("the vfs backend does not report performance metrics")

    async def get_fs_usage(self) -> FSUsage:
        st = await self.pool.run(os.statvfs, self.mount_path)
        return FSUsage(
            capacity_bytes=st.f_frsize * st.f_blocks,
            used_bytes=st.f_frsize * (st.f_blocks - st.f_bavail),
        )

    # -- quota scopes (vfs: directories only, no limit) ------------------------

    async def create_quota_scope(
        self, qsid: QuotaScopeID, options: QuotaConfig | None = None, extra_args: dict[str, Any] | None = None
    ) -> None:
        await self.pool.run(self._create_quota_scope_dir, qsid)
        if self.emulated_quota and options is not None:
            await self.pool.run(quota.write_emulated_limit, self, qsid, _emulated_limit(options))

    def _create_quota_scope_dir(self, qsid: QuotaScopeID) -> None:
        try:
            self.quota_scope_path(qsid).mkdir(mode=DEFAULT_DIR_MODE, parents=True, exist_ok=False)
        except FileExistsError:
            raise QuotaScopeExists("Volume already exists with given quota scope.", qsid=str(qsid)) from None

    async def _quota_scope_exists(self, qsid: QuotaScopeID) -> bool:
        return await self.pool.run(os.path.isdir, self.quota_scope_path(qsid))

    async def describe_quota_scope(self, qsid: QuotaScopeID) -> QuotaUsage:
        # Upstream's vfs reports -1/-1, which its API turns into null/null.
        if not await self._quota_scope_exists(qsid):
            raise QuotaScopeNotFound(f"no such quota scope: {qsid}", qsid=str(qsid))
        if self.emulated_quota:
            fig = await self.pool.run(self.read_scope_quota, qsid)
            if fig is not None:
                return QuotaUsage(used_bytes=fig.used, limit_bytes=fig.limit)
        return QuotaUsage(used_bytes=None, limit_bytes=None)

    async def update_quota_scope(self, qsid: QuotaScopeID, options: QuotaConfig) -> None:
        # vfs cannot enforce a limit: accepted (as upstream), the scope created if missing.
        if not await self._quota_scope_exists(qsid):
            try:
                await self.create_quota_scope(qsid, options)
                return
            except QuotaScopeExists:
                pass
        if self.emulated_quota:
            await self.pool.run(quota.write_emulated_limit, self, qsid, _emulated_limit(options))

    async def unset_quota(self, qsid: QuotaScopeID) -> None:
        if not await self._quota_scope_exists(qsid):
            raise QuotaScopeNotFound(f"no such quota scope: {qsid}", qsid=str(qsid))
        if self.emulated_quota:
            await self.pool.run(quota.write_emulated_limit, self, qsid, None)

    def read_scope_quota(self, qsid: QuotaScopeID) -> ScopeFigure | None:
        """The emulated quota (``quota = "emulated"``): the limit the daemon
        keeps, usage by a walk (cached for ``quota-lag``, to lag as CephFS does)."""
        if not self.emulated_quota:
            return None
        limit = quota.read_emulated_limit(self, qsid)
        if limit is None:
            return None
        lag = self.emulated_quota_lag
        now = time.monotonic()
        cached = self._emulated_usage.get(qsid.pathname)
        if lag > 0 and cached is not None and now - cached[0] < lag:
            used = cached[1]
        else:
            used = quota.apparent_bytes(self.quota_scope_path(qsid))
            self._emulated_usage[qsid.pathname] = (now, used)
        return ScopeFigure(limit=limit, used=used, live=lag <= 0, lag=lag)

    # -- vfolders --------------------------------------------------------------

    def _scope_dir(self, vfid: VFolderID) -> Path:
        if vfid.quota_scope_id is None:
            return self.root
        return self.quota_scope_path(vfid.quota_scope_id)

    def _open_vfolder(self, vfid: VFolderID) -> int:
        """A descriptor of the vfolder directory, or ``VFolderNotFound``."""
        try:
            return open_root(self.vfolder_path(vfid))
        except (FileNotFoundError, NotADirectoryError):
            raise VFolderNotFound(f"no such vfolder: {vfid}", vfid=str(vfid)) from None

    def _real_vfolder(self, vfid: VFolderID) -> Path:
        path = self.vfolder_path(vfid)
        if not path.is_dir():
            raise VFolderNotFound(f"no such vfolder: {vfid}", vfid=str(vfid))
        return Path(os.path.realpath(path))

    async def create_vfolder(
        self, vfid: VFolderID, mode: int = DEFAULT_DIR_MODE, *, exist_ok: bool = False,
        auto_create_quota_scope: bool = False, quota_options: QuotaConfig | None = None,
    ) -> None:
        """Create the vfolder (its ``h[0:2]/h[2:4]`` parents too).

        Raises ``QuotaScopeNotFound`` when its quota scope does not exist,
        unless ``auto_create_quota_scope`` (then it is created with
        ``quota_options``), and ``VFolderExists`` unless ``exist_ok``.
        """
        if vfid.quota_scope_id is not None and not await self._quota_scope_exists(vfid.quota_scope_id):
            if not auto_create_quota_scope:
                raise QuotaScopeNotFound(f"no such quota scope: {vfid.quota_scope_id}",
                                         qsid=str(vfid.quota_scope_id))
            try:
                await self.create_quota_scope(vfid.quota_scope_id, quota_options)
            except QuotaScopeExists:
                pass  # created concurrently
        await self.pool.run(self._make_vfolder_dir, vfid, mode, exist_ok)
        self.invalidate_usage(vfid)

    def _make_vfolder_dir(self, vfid: VFolderID, mode: int, exist_ok: bool) -> None:
        path = self.vfolder_path(vfid)
        if not self._scope_dir(vfid).is_dir():
            raise QuotaScopeNotFound(f"no such quota scope: {vfid.quota_scope_id}")
        with os_errors("."):
            path.parent.mkdir(mode=DEFAULT_DIR_MODE, parents=True, exist_ok=True)
            try:
                os.mkdir(path, mode)
            except FileExistsError:
                if exist_ok and path.is_dir() and not path.is_symlink():
                    return
                raise VFolderExists(f"the vfolder already exists: {vfid}", vfid=str(vfid)) from None
            # mkdir masks the mode with the umask: set it exactly, as upstream does.
            os.chmod(path, mode)

    async def delete_vfolder(
        self, vfid: VFolderID, progress: Progress | None = None, *, missing_ok: bool = False
    ) -> None:
        """Remove the vfolder (symlinks inside are removed, never followed), its
        metadata, and the ``h[0:2]/h[2:4]`` parents left empty."""
        progress = progress if progress is not None else Progress()
        try:
            await self._run_to_end(progress, self._delete_vfolder, vfid, progress)
        except VFolderNotFound:
            if not missing_ok:
                raise
        finally:
            self.invalidate_usage(vfid)

    def _delete_vfolder(self, vfid: VFolderID, progress: Progress | None) -> None:
        path = self.vfolder_path(vfid)
        with _fd(self._open_vfolder(vfid)) as root_fd, os_errors("."):
            tree.remove_tree_contents(root_fd, progress)
        with os_errors("."):
            self._remove_metadata(vfid)
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            self._prune_parents(path)

    def _prune_parents(self, path: Path) -> None:
        # Upstream removes h[2:4] and h[0:2] when nothing else lives there.
        for parent in (path.parent, path.parent.parent):
            try:
                os.rmdir(parent)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    return
                raise

    async def clone_vfolder(
        self, src_vfid: VFolderID, dst_volume: AbstractVolume, dst_vfid: VFolderID,
        progress: Progress | None = None,
    ) -> None:
        """Copy ``src_vfid`` into a new vfolder ``dst_vfid`` of ``dst_volume``
        (this volume or another vfs-based one), keeping modes, times and
        symlinks.  On failure or cancellation the destination is removed."""
        if not isinstance(dst_volume, VfsVolume):
            raise UnsupportedOperation(
                f"cannot clone from a {self.backend_name} volume to a {dst_volume.backend_name} volume"
            )
        if dst_volume is self and src_vfid == dst_vfid:
            raise VFolderExists(f"the destination vfolder already exists: {dst_vfid}", vfid=str(dst_vfid))
        progress = progress if progress is not None else Progress()
        count, src_mode = await self.pool.run(self._count_for_clone, src_vfid, progress)
        progress.total = count.bytes
        progress.message = f"{count.files} entries, {count.bytes} bytes to copy"
        if self.clone_checks_free_space:
            fs = await dst_volume.get_fs_usage()
            if count.bytes > fs.capacity_bytes - fs.used_bytes:
                raise InsufficientStorage("Not enough space available for clone.", paths=["."])
        # The daemon's own check of the destination scope (storage.quota): the
        # clone's bytes are held there while it runs.
        hold = quota.Hold(dst_volume, dst_vfid.quota_scope_id, count.bytes, "the clone")
        await self.pool.run(hold.acquire)
        try:
            await dst_volume.create_vfolder(dst_vfid, src_mode, auto_create_quota_scope=True)
        except BaseException:
            await self.pool.run(hold.release, 0)
            raise
        try:
            await self._run_to_end(progress, self._copy_vfolder, src_vfid, dst_volume, dst_vfid, progress)
        except BaseException as exc:
            await self.pool.run(hold.release, 0)
            if not isinstance(exc, (CancelledError, StorageError, TaskCancelled)):
                log.failure("clone {src} -> {dst} failed", src=src_vfid, dst=dst_vfid)
            try:
                await dst_volume.delete_vfolder(dst_vfid, missing_ok=True)
            except Exception:
                log.failure("clone {src} -> {dst}: cannot remove the partial copy", src=src_vfid, dst=dst_vfid)
            raise
        else:
            await self.pool.run(hold.release)
        finally:
            dst_volume.invalidate_usage(dst_vfid)

    def _count_for_clone(self, vfid: VFolderID, progress: Progress | None) -> tuple[tree.TreeCount, int]:
        with _fd(self._open_vfolder(vfid)) as fd, os_errors("."):
            return tree.count_tree(fd, progress), stat.S_IMODE(os.fstat(fd).st_mode)

    def _copy_vfolder(self, src_vfid: VFolderID, dst_volume: VfsVolume, dst_vfid: VFolderID,
                      progress: Progress | None) -> None:
        with _fd(self._open_vfolder(src_vfid)) as sfd, _fd(dst_volume._open_vfolder(dst_vfid)) as dfd:
            with os_errors("."):
                tree.copy_tree_contents(sfd, dfd, progress)
                tree.apply_stat_fd(dfd, os.fstat(sfd), owner=tree._preserve_owner())
            payload = self._read_metadata(src_vfid)
            if payload:
                dst_volume._write_metadata(dst_vfid, payload)

    async def get_vfolder_mount(self, vfid: VFolderID, subpath: str = ".") -> Path:
        """The vfolder's real path (as upstream: ``subpath`` is only checked to
        stay inside it; ``InvalidSubpath`` otherwise)."""
        try:
            validate_relpath(subpath, "subpath")
        except InvalidPath:
            raise InvalidSubpath("Invalid vfolder subpath", vfid=str(vfid), subpath=str(subpath)) from None
        return await self.pool.run(self._mount_path, vfid, subpath)

    def _mount_path(self, vfid: VFolderID, subpath: str) -> Path:
        real = self._real_vfolder(vfid)
        try:
            resolve_rel(real, subpath, field="subpath")
        except InvalidPath:
            raise InvalidSubpath("Invalid vfolder subpath", vfid=str(vfid), subpath=subpath) from None
        return real

    # -- metadata (outside the vfolder tree) ----------------------------------

    def metadata_path(self, vfid: VFolderID) -> Path:
        scope = vfid.quota_scope_id.pathname if vfid.quota_scope_id is not None else "_"
        return self.root / PRIVATE_DIR / "metadata" / scope / vfid.folder_id.hex

    async def get_metadata(self, vfid: VFolderID) -> bytes:
        """What ``put_metadata`` stored; ``b""`` if nothing was."""
        return await self.pool.run(self._get_metadata, vfid)

    def _get_metadata(self, vfid: VFolderID) -> bytes:
        self._real_vfolder(vfid)
        return self._read_metadata(vfid)

    def _read_metadata(self, vfid: VFolderID) -> bytes:
        try:
            fd = os.open(self.metadata_path(vfid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return b""
        with open(fd, "rb") as f:
            data = f.read(MAX_METADATA_BYTES + 1)
        if len(data) > MAX_METADATA_BYTES:
            raise RequestTooLarge("Too large metadata (more than 10 MiB)")
        return data

    async def put_metadata(self, vfid: VFolderID, payload: bytes) -> None:
        if len(payload) > MAX_METADATA_BYTES:
            raise RequestTooLarge("Too large metadata (more than 10 MiB)")
        await self.pool.run(self._put_metadata, vfid, bytes(payload))

    def _put_metadata(self, vfid: VFolderID, payload: bytes) -> None:
        self._real_vfolder(vfid)
        self._write_metadata(vfid, payload)

    def _write_metadata(self, vfid: VFolderID, payload: bytes) -> None:
        path = self.metadata_path(vfid)
        with os_errors("."):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(path, payload, hidden=True)

    def _remove_metadata(self, vfid: VFolderID) -> None:
        path = self.metadata_path(vfid)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        with contextlib.suppress(OSError):
            os.rmdir(path.parent)  # the scope's metadata dir, when it was the last one

    # -- usage -----------------------------------------------------------------

    def invalidate_usage(self, vfid: VFolderID) -> None:
        """Forget cached usage of ``vfid`` (call it after changing its files)."""
        self.usage_cache.invalidate(self.vfolder_path(vfid))

    async def _tree_usage(self, vfid: VFolderID, relpath: str) -> TreeUsage:
        validate_relpath(relpath)
        target = await self.pool.run(self._usage_target, vfid, relpath)
        return await self.usage_cache.get(target, beneath=self.vfolder_path(vfid))

    def _usage_target(self, vfid: VFolderID, relpath: str) -> Path:
        real = self._real_vfolder(vfid)
        rel = resolve_rel(real, relpath)
        target = real if str(rel) == "." else real / rel
        # The cache is keyed by the vfolder path so that invalidate() finds it.
        base = self.vfolder_path(vfid)
        key = base if str(rel) == "." else base / rel
        with os_errors(relpath):
            if not stat.S_ISDIR(os.stat(target, follow_symlinks=False).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory")
        return key

    async def get_usage(self, vfid: VFolderID, relpath: str = ".") -> FolderUsage:
        """Entries below ``relpath`` and their apparent size (upstream's numbers);
        -1/-1 when the walk is slow and nothing is cached (see ``storage.fs.usage``)."""
        usage = await self._tree_usage(vfid, relpath)
        return FolderUsage(usage.file_count, usage.apparent_bytes, observed_at=usage.observed_at)

    async def get_used_bytes(self, vfid: VFolderID, relpath: str = ".") -> int:
        """Allocated bytes, du-like (an empty vfolder on ext4/XFS: 4096)."""
        usage = await self._tree_usage(vfid, relpath)
        return usage.allocated_bytes

    # -- files inside a vfolder ------------------------------------------------

    async def resolve(self, vfid: VFolderID, relpath: str, *, follow_final: bool = True) -> Path:
        validate_relpath(relpath)
        return await self.pool.run(self._resolve, vfid, relpath, follow_final)

    def _resolve(self, vfid: VFolderID, relpath: str, follow_final: bool) -> Path:
        real = self._real_vfolder(vfid)
        rel = resolve_rel(real, relpath, follow_final=follow_final)
        return real if str(rel) == "." else real / rel

    async def mkdir(self, vfid: VFolderID, relpath: str, *, parents: bool = True, exist_ok: bool = False) -> None:
        validate_relpath(relpath)
        await self.pool.run(self._mkdir, vfid, relpath, parents, exist_ok)
        self.invalidate_usage(vfid)

    def _mkdir(self, vfid: VFolderID, relpath: str, parents: bool, exist_ok: bool) -> None:
        with _fd(self._open_vfolder(vfid)) as root_fd:
            rel = resolve_rel(self.vfolder_path(vfid), relpath, follow_final=False)
            with os_errors(relpath):
                if str(rel) == ".":
                    if exist_ok:
                        return
                    raise FileExistsError(errno.EEXIST, "File exists")
                parts = rel.parts
                if ".." in parts:  # resolve_rel never returns one; refuse rather than trust it
                    raise InvalidPath("relpath: leads outside the vfolder", data={"relpath": "leads outside"})
                fd = os.dup(root_fd)
                try:
                    for i, part in enumerate(parts):
                        last = i == len(parts) - 1
                        try:
                            if last:
                                self._mkdir_at(fd, part)
                                return
                            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                        except FileExistsError:
                            # Only a real directory satisfies exist_ok, never a symlink to one.
                            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                            if exist_ok and stat.S_ISDIR(st.st_mode):
                                return
                            raise
                        except FileNotFoundError:
                            if not parents:
                                raise
                            self._mkdir_at(fd, part, exist_ok=True)
                            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                        os.close(fd)
                        fd = nxt
                finally:
                    os.close(fd)

    @staticmethod
    def _mkdir_at(dir_fd: int, name: str, *, exist_ok: bool = False) -> None:
        try:
            os.mkdir(name, DEFAULT_DIR_MODE, dir_fd=dir_fd)
        except FileExistsError:
            if exist_ok:
                return
            raise
        # Set the mode exactly (mkdir masks it with the umask), on the directory
        # we just made: through a no-follow descriptor, not by name.
        with _fd(os.open(name, _DIR_FLAGS, dir_fd=dir_fd)) as fd:
            os.fchmod(fd, DEFAULT_DIR_MODE)

    async def scandir(self, vfid: VFolderID, relpath: str, limit: int | None = None) -> list[DirEntry]:
        """The entries of one directory (not recursive), lstat-based, at most
        ``limit`` (default: the volume's scandir-limit; 0 means no limit)."""
        validate_relpath(relpath)
        if limit is None:
            limit = self.context.scandir_limit
        return await self.pool.run(self._scandir, vfid, relpath, limit)

    def _scandir(self, vfid: VFolderID, relpath: str, limit: int) -> list[DirEntry]:
        real_root = self._real_vfolder(vfid)
        with _fd(self._open_vfolder(vfid)) as root_fd:
            rel = resolve_rel(real_root, relpath)
            listed = real_root if str(rel) == "." else real_root / rel
            items: list[DirEntry] = []
            with os_errors(relpath), _fd(open_dir_beneath(root_fd, rel)) as dfd, os.scandir(dfd) as it:
                for entry in it:
                    if limit > 0 and len(items) >= limit:
                        break
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except (FileNotFoundError, PermissionError):
                        continue  # changed while we list it
                    kind = _entry_type(st.st_mode)
                    target = self._symlink_target(listed, entry.name) if kind == "SYMLINK" else ""
                    items.append(DirEntry(
                        name=entry.name, type=kind, mode=st.st_mode, size=st.st_size,
                        created=st.st_ctime, modified=st.st_mtime, symlink_target=target,
                    ))
            return items

    @staticmethod
    def _symlink_target(listed: Path, name: str) -> str:
        """As upstream: where the link leads, relative to the listed directory,
        or ``""`` when that is outside it (nothing outside is ever revealed)."""
        real = os.path.realpath(os.path.join(listed, name))
        base = str(listed)
        if real == base:
            return "."
        if real.startswith(base.rstrip("/") + "/"):
            return os.path.relpath(real, base)
        return ""

    async def rename(self, vfid: VFolderID, relpath: str, new_name: str) -> None:
        """Rename the entry at ``relpath`` (a symlink itself, not its target)
        within its directory.  Like upstream (``shutil.move``), when ``new_name``
        is an existing directory the entry is moved into it."""
        rel = validate_relpath(relpath)
        validate_name(new_name)
        if str(rel) == ".":
            raise InvalidPath("relpath: cannot rename the vfolder root", data={"relpath": "the vfolder root"})
        await self.pool.run(self._move, vfid, relpath, str(rel.parent / new_name), "new_name")
        self.invalidate_usage(vfid)

    async def move(self, vfid: VFolderID, src_relpath: str, dst_relpath: str) -> None:
        """Move ``src_relpath`` to ``dst_relpath`` (into it, if it is a directory, as ``shutil.move``)."""
        for field, value in (("src_relpath", src_relpath), ("dst_relpath", dst_relpath)):
            if str(validate_relpath(value, field)) == "." and field == "src_relpath":
                raise InvalidPath(f"{field}: cannot move the vfolder root", data={field: "the vfolder root"})
        await self.pool.run(self._move, vfid, src_relpath, dst_relpath, "dst_relpath")
        self.invalidate_usage(vfid)

    def _move(self, vfid: VFolderID, src: str, dst: str, dst_field: str) -> None:
        real_root = self._real_vfolder(vfid)
        with _fd(self._open_vfolder(vfid)) as root_fd:
            src_rel = resolve_rel(real_root, src, field="src_relpath", follow_final=False)
            if str(src_rel) == ".":
                raise InvalidPath("src_relpath: cannot move the vfolder root", data={"src_relpath": "the vfolder root"})
            target_rel = self._destination(root_fd, real_root, dst, dst_field, src_rel.name)
            if target_rel == src_rel:
                return
            with os_errors(src, dst):
                sdir, sname = open_parent(root_fd, src_rel)
                with _fd(sdir):
                    tdir, tname = open_parent(root_fd, target_rel)
                    with _fd(tdir):
                        # Across a filesystem or CephFS quota boundary (EXDEV)
                        # this copies and swaps in, atomically for observers.
                        if crossmove.rename_at(sdir, sname, tdir, tname, self.copy_fits):
                            log.info("volume {name}: moved {src} -> {dst} by copying (EXDEV)",
                                     name=self.name, src=src, dst=dst)

    @staticmethod
    def _destination(root_fd: int, real_root: Path, dst: str, field: str, src_name: str) -> PurePosixPath:
        """Where a move lands: inside ``dst`` if it is a directory, else ``dst`` itself."""
        followed = resolve_rel(real_root, dst, field=field)
        try:
            with _fd(open_dir_beneath(root_fd, followed)):
                return followed / src_name if str(followed) != "." else PurePosixPath(src_name)
        except OSError:
            pass
        rel = resolve_rel(real_root, dst, field=field, follow_final=False)
        if str(rel) == ".":
            raise InvalidPath(f"{field}: cannot replace the vfolder root", data={field: "the vfolder root"})
        return rel

    async def copy_file(self, vfid: VFolderID, src_relpath: str, dst_relpath: str) -> None:
        """Copy a file (or a symlink, as a link) with ``copy_range``, keeping
        mode and times; the destination's parents are created, and it appears
        whole or not at all (written under a temporary name, then renamed)."""
        validate_relpath(src_relpath, "src_relpath")
        validate_relpath(dst_relpath, "dst_relpath")
        await self.pool.run(self._copy_file, vfid, src_relpath, dst_relpath)
        self.invalidate_usage(vfid)

    def _copy_file(self, vfid: VFolderID, src: str, dst: str) -> None:
        real_root = self._real_vfolder(vfid)
        with _fd(self._open_vfolder(vfid)) as root_fd:
            src_rel = resolve_rel(real_root, src, field="src_relpath", follow_final=False)
            with os_errors(src):
                if str(src_rel) == ".":
                    raise IsADirectoryError(errno.EISDIR, "Is a directory")
                sdir, sname = open_parent(root_fd, src_rel)
            with _fd(sdir), os_errors(src, dst):
                st = os.stat(sname, dir_fd=sdir, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, "Is a directory")
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    raise OSError(errno.EINVAL, "Not a regular file")
                target_rel = self._destination(root_fd, real_root, dst, "dst_relpath", src_rel.name)
                # The copy's bytes are held in the quota scope while it runs.
                hold = quota.Hold(self, vfid.quota_scope_id, st.st_size if stat.S_ISREG(st.st_mode) else 0,
                                  "the copy").acquire()
                try:
                    self._copy_into(vfid, root_fd, sdir, sname, st, target_rel)
                except BaseException:
                    hold.release(0)
                    raise
                hold.release()

    def _copy_into(self, vfid: VFolderID, root_fd: int, sdir: int, sname: str, st: os.stat_result,
                   target_rel: PurePosixPath) -> None:
        """The copy under a temporary name beside the target, then renamed onto it."""
        if target_rel.parent != PurePosixPath("."):
            self._mkdir(vfid, str(target_rel.parent), True, True)
        tdir, tname = open_parent(root_fd, target_rel)
        with _fd(tdir):
            tmp = f".{tname[:200]}.{secrets.token_hex(6)}.copying"
            if stat.S_ISLNK(st.st_mode):
                tree.copy_symlink_at(sdir, sname, tdir, tmp, st, owner=tree._preserve_owner())
            else:
                tree.copy_file_at(sdir, sname, tdir, tmp)
            try:
                os.rename(tmp, tname, src_dir_fd=tdir, dst_dir_fd=tdir)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=tdir)
                raise

    async def delete_files(
        self, vfid: VFolderID, relpaths: list[str], *, recursive: bool = False,
        progress: Progress | None = None,
    ) -> None:
        """Delete each path (a symlink itself, never its target).  Missing
        paths are fine (as upstream); a directory needs ``recursive``.  Every
        path is checked before anything is deleted."""
        for relpath in relpaths:
            if str(validate_relpath(relpath, "relpaths")) == ".":
                raise InvalidPath("relpaths: cannot delete the vfolder root", data={"relpaths": "the vfolder root"})
        progress = progress if progress is not None else Progress()
        try:
            await self._run_to_end(progress, self._delete_files, vfid, list(relpaths), recursive, progress)
        finally:
            self.invalidate_usage(vfid)

    def _delete_files(self, vfid: VFolderID, relpaths: list[str], recursive: bool,
                      progress: Progress | None) -> None:
        real_root = self._real_vfolder(vfid)
        with _fd(self._open_vfolder(vfid)) as root_fd:
            resolved = [(r, resolve_rel(real_root, r, field="relpaths", follow_final=False)) for r in relpaths]
            for _relpath, rel in resolved:
                if str(rel) == ".":
                    raise InvalidPath("relpaths: cannot delete the vfolder root", data={"relpaths": "the vfolder root"})
            for relpath, rel in resolved:
                if progress is not None:
                    progress.check()
                with os_errors(relpath):
                    try:
                        pdir, name = open_parent(root_fd, rel)
                    except FileNotFoundError:
                        continue
                    with _fd(pdir):
                        try:
                            st = os.stat(name, dir_fd=pdir, follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            if not recursive:
                                raise IsADirectoryError(errno.EISDIR, "Is a directory (pass recursive to delete it)")
                            tree.remove_at(pdir, name, progress)
                        else:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(name, dir_fd=pdir)
                            if progress is not None:
                                progress.advance(1)
