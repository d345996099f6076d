"""``XfsVolume``: the vfs backend plus one XFS project quota per quota scope.

The daemon may run unprivileged: every registry change and ``xfs_quota``
call goes to the privileged helper (``helper``) over AMP.  The proxy itself
creates and removes the quota-scope directories.

A full project quota shows up as ENOSPC (XFS returns ENOSPC, not EDQUOT,
for project quotas; a ``copy_file_range`` into a full project returns a
short count, then ENOSPC).  Operations that hit it answer 507 naming the
quota scope, keep what an upload wrote before the limit, and remove a copy
or clone target they had started.
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from backends.base import Capability, QuotaConfig, QuotaUsage
from backends.vfs import VfsVolume
from storage.config import ConfigError
from storage.errors import (
    FileOperationFailed,
    InsufficientStorage,
    InvalidQuotaConfig,
    QuotaScopeExists,
    QuotaScopeNotFound,
    StorageError,
)
from storage.quota import XFS_RECORD_MARGIN, ScopeFigure
from storage.vfid import QuotaScopeID, VFolderID

from .client import HelperClient
from .options import XfsOptions, parse_options
from .supervision import HelperProcess
from .validate import MAX_LIMIT_BYTES

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
log = Logger()


class QuotaDirectoryNotEmpty(StorageError):
    status = 409
    problem = "quota-directory-not-empty"
    title = "Quota Directory Not Empty"
    # upstream's QuotaDirectoryNotEmptyError
    error_code = "quota-scope_purge_conflict"


@dataclass(frozen=True)
class XfsQuotaUsage(QuotaUsage):
    """``QuotaUsage`` plus what ``xfs_quota report -i`` adds."""

    project_id: int | None = None
    inodes_used: int | None = None
    inode_limit: int | None = None


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in FULL_ERRNOS
    if isinstance(exc, InsufficientStorage):
        return True
    if isinstance(exc, FileOperationFailed):
        err = exc.extra.get("errno") if exc.extra else None
        if err is None and isinstance(exc.data, dict):
            err = exc.data.get("errno")
        return err in FULL_ERRNOS
    return False


def _quota_full_guard(method):
    """Turn "quota full" into 507 naming the quota scope.

    The vfs methods already keep what was written (uploads, mkdir) and remove
    a half-made copy or clone; this adds which quota scope is full."""

    @functools.wraps(method)
    async def guarded(self, vfid: VFolderID, *args: Any, **kwargs: Any):
        try:
            return await method(self, vfid, *args, **kwargs)
        except Exception as exc:
            if not _is_full(exc):
                raise
            raise self.quota_full(vfid, exc) from exc

    return guarded


class XfsVolume(VfsVolume):
    backend_name = "xfs"
    capabilities = frozenset({Capability.VFOLDER, Capability.QUOTA})
    # Within one XFS a clone is a reflink and takes no free space; what can
    # fill up is the destination's project quota, which the copy itself hits
    # (ENOSPC -> 507, and the partial clone is removed).
    clone_checks_free_space = False

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        self.options: XfsOptions = parse_options(config.name, dict(config.options))
        reactor = context.reactor
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.helper = HelperClient(reactor, self.options.helper_socket, self.options.helper_timeout)
        self.helper_process: HelperProcess | None = None
        if self.options.spawn_helper:
            self.helper_process = HelperProcess(reactor, f"xfs-helper-{self.name}", self.helper_argv())

    # -- the helper -------------------------------------------------------

    def helper_real_root(self) -> str:
        return os.path.realpath(self.root)

    def helper_argv(self) -> list[str]:
        o = self.options
        argv = [*o.helper_command, "--supervise", "--exit-with-parent",
                "--socket", o.helper_socket,
                "--projects", o.projects_file, "--projid", o.projid_file,
                "--mount", os.path.realpath(self.mount_path)]
        if o.limits_file:
            argv += ["--limits", o.limits_file]
        if o.lock_file:
            argv += ["--lock", o.lock_file]
        if o.xfs_quota:
            argv += ["--xfs-quota", o.xfs_quota]
        # The first uid owns the socket: the one the daemon will run as.
        run_as = getattr(self.context, "run_as_uid", None)
        uids = [*([run_as] if run_as is not None else []), *o.helper_allowed_uids, os.geteuid()]
        self.helper_allowed_uids = list(dict.fromkeys(uids))
        for uid in self.helper_allowed_uids:
            argv += ["--allowed-uid", str(uid)]
        return argv

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.helper_process is not None:
            self.helper_process.privilegedStartService()

    def startService(self) -> None:
        super().startService()
        if self.helper_process is not None and not self.helper_process.running:
            self.helper_process.startService()
        if self.helper_process is not None and os.geteuid() not in self.helper_allowed_uids:
            log.error(
                "volume {name}: the daemon now runs as uid {uid}, which the XFS helper does not "
                "accept (it was started for uids {uids}); add it to helper-allowed-uids",
                name=self.name, uid=os.geteuid(), uids=self.helper_allowed_uids,
            )
        self.helper.startService()

    async def _stop(self) -> None:
        await self.helper.stopService()
        if self.helper_process is not None and self.helper_process.running:
            await self.helper_process.stopService()

    def stopService(self):
        from twisted.internet.defer import Deferred, maybeDeferred

        parent_stop = maybeDeferred(super().stopService)
        return parent_stop.addCallback(lambda _: Deferred.fromCoroutine(self._stop()))

    async def prepare(self) -> None:
        """The vfs checks, then: is it an XFS with project quotas, and does the helper answer?"""
        await super().prepare()
        if self.options.require_pquota:
            problem = await self.pool.run(pquota_problem, os.path.realpath(self.mount_path))
            if problem:
                raise ConfigError(f"[volume.{self.name}] path", problem)
        await self.helper.ping(wait=self.options.helper_start_timeout)

    async def get_hwinfo(self) -> dict[str, Any]:
        """Healthy only while the quota helper answers (quota calls fail otherwise)."""
        info = await super().get_hwinfo()
        try:
            await self.helper.ping(wait=2.0)
        except StorageError as exc:
            return {**info, "status": "degraded", "status_info": exc.msg or str(exc)}
        return info

    # -- quota scopes -----------------------------------------------------

    def _project(self, qsid: QuotaScopeID) -> tuple[str, str]:
        """(project name, real directory path) of a quota scope."""
        return qsid.pathname, os.path.join(self.helper_real_root(), qsid.pathname)

    def quota_full(self, vfid: VFolderID | QuotaScopeID | None, exc: BaseException) -> InsufficientStorage:
        qsid = vfid.quota_scope_id if isinstance(vfid, VFolderID) else vfid
        reason = getattr(exc, "strerror", None) or getattr(exc, "msg", None) or str(exc)
        extra = dict(getattr(exc, "extra", None) or {})
        if isinstance(exc, OSError):
            extra.setdefault("errno", exc.errno)
        extra["volume"] = self.name
        if qsid is None:
            return InsufficientStorage(f"the volume is full: {reason}", **extra)
        extra["quota_scope_id"] = str(qsid)
        return InsufficientStorage(f"quota scope {qsid} is full: {reason}", **extra)

    def _limit(self, options: QuotaConfig | None) -> int:
        if options is None:
            st = os.statvfs(self.mount_path)  # upstream: the filesystem size
            return st.f_blocks * st.f_frsize
        limit = options.limit_bytes
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT_BYTES:
            raise InvalidQuotaConfig("Invalid quota config option", data={"limit_bytes": "out of range"})
        return limit

    async def create_quota_scope(
        self, qsid: QuotaScopeID, options: QuotaConfig | None = None, extra_args: dict[str, Any] | None = None
    ) -> None:
        name, path = self._project(qsid)
        limit = await self.pool.run(self._limit, options)
        try:
            await self.pool.run(os.makedirs, self.quota_scope_path(qsid), 0o755, False)
        except FileExistsError:
            raise QuotaScopeExists("Volume already exists with given quota scope.", qsid=str(qsid)) from None
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise self.quota_full(None, exc) from exc
            raise
        try:
            await self.helper.create_project(name, path, limit)
        except BaseException:
            await self.pool.run(_remove_empty_dir, self.quota_scope_path(qsid))
            raise

    async def describe_quota_scope(self, qsid: QuotaScopeID) -> QuotaUsage:
        name, _ = self._project(qsid)
        if not await self.pool.run(self.quota_scope_path(qsid).is_dir):
            raise QuotaScopeNotFound(f"no such quota scope: {qsid}", qsid=str(qsid))
        try:
            r = await self.helper.report(name)
        except QuotaScopeNotFound:
            # A directory without a project (made by hand, or by the vfs
            # backend earlier): no limit, usage unknown.
            return XfsQuotaUsage(used_bytes=None, limit_bytes=None)
        return XfsQuotaUsage(
            used_bytes=r["used_bytes"],
            limit_bytes=r["hard_limit_bytes"] or None,  # 0 means "no limit"
            project_id=r["project_id"],
            inodes_used=r["inodes_used"],
            inode_limit=r["inode_hard_limit"] or None,
        )

    def read_scope_quota(self, qsid: QuotaScopeID) -> ScopeFigure | None:
        """The project's limit and usage from ``statvfs`` of its directory: XFS
        reports a project-inherit directory's quota there (the soft limit, which
        the helper sets equal to the hard one), counting delayed allocations,
        so it is exact at once and needs no helper round trip."""
        try:
            scope = os.statvfs(self.quota_scope_path(qsid))
            whole = os.statvfs(self.mount_path)
        except FileNotFoundError:
            return None
        if scope.f_blocks >= whole.f_blocks:
            return None  # no limit, or one the filesystem's size bounds anyway
        block = scope.f_frsize or scope.f_bsize
        return ScopeFigure(limit=scope.f_blocks * block, used=(scope.f_blocks - scope.f_bfree) * block,
                           live=True, blocks=True, margin=XFS_RECORD_MARGIN)

    async def update_quota_scope(self, qsid: QuotaScopeID, options: QuotaConfig) -> None:
        name, path = self._project(qsid)
        limit = self._limit(options)
        if not await self.pool.run(self.quota_scope_path(qsid).is_dir):
            try:
                await self.create_quota_scope(qsid, options)
                return
            except QuotaScopeExists:
                pass  # created meanwhile: set its limit below
        try:
            await self.helper.set_limit(name, limit)
        except QuotaScopeNotFound:
            await self.helper.create_project(name, path, limit)

    async def unset_quota(self, qsid: QuotaScopeID) -> None:
        """Clears the limit (upstream's XFS refuses; we set bhard=0, which XFS reads as none)."""
        name, _ = self._project(qsid)
        if not await self.pool.run(self.quota_scope_path(qsid).is_dir):
            raise QuotaScopeNotFound(f"no such quota scope: {qsid}", qsid=str(qsid))
        try:
            await self.helper.set_limit(name, 0)
        except QuotaScopeNotFound:
            pass  # no project, so no limit

    async def delete_quota_scope(self, qsid: QuotaScopeID) -> None:
        """Drops the project and removes the directory, which must be empty (upstream: 409 if not)."""
        name, _ = self._project(qsid)
        qspath = self.quota_scope_path(qsid)
        try:
            entries = await self.pool.run(os.listdir, qspath)
        except FileNotFoundError:
            raise QuotaScopeNotFound(f"no such quota scope: {qsid}", qsid=str(qsid)) from None
        if entries:
            raise QuotaDirectoryNotEmpty(f"Cannot delete quota scope '{qsid}': directory not empty")
        try:
            await self.helper.remove_project(name)
        except QuotaScopeNotFound:
            pass
        await self.pool.run(_remove_empty_dir, qspath)

    # -- operations that can fill a project --------------------------------

    create_vfolder = _quota_full_guard(VfsVolume.create_vfolder)
    mkdir = _quota_full_guard(VfsVolume.mkdir)
    put_metadata = _quota_full_guard(VfsVolume.put_metadata)
    copy_file = _quota_full_guard(VfsVolume.copy_file)
    move = _quota_full_guard(VfsVolume.move)

    async def clone_vfolder(self, src_vfid, dst_volume, dst_vfid, progress=None) -> None:
        """The destination's quota scope is the one that fills up."""
        try:
            await super().clone_vfolder(src_vfid, dst_volume, dst_vfid, progress)
        except Exception as exc:
            if not _is_full(exc):
                raise
            raise self.quota_full(dst_vfid, exc) from exc


def pquota_problem(mount: str) -> str | None:
    """Why ``mount`` is not an XFS mount point with project quotas (None if it is)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return f"cannot read /proc/self/mountinfo: {exc}"
    for line in reversed(lines):  # the last mount on a path is the visible one
        fields = line.split()
        if "-" not in fields or fields[4] != mount:
            continue
        sep = fields.index("-")
        if fields[sep + 1] != "xfs":
            return f"{mount} is {fields[sep + 1]}, not XFS"
        options = set((fields[5] + "," + fields[sep + 3]).split(","))
        if not options & {"prjquota", "pquota", "pqnoenforce"}:
            return f"{mount} is XFS but not mounted with project quotas (mount -o pquota)"
        return None
    return f"{mount} is not a mount point (the xfs backend needs the XFS mount point as its path)"


def _remove_empty_dir(path: Path) -> None:
    """Best effort: never hides the error that made us clean up."""
    try:
        os.rmdir(path)
    except OSError:
        pass
