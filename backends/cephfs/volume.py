"""The ``cephfs`` backend: vfs on a CephFS mount, with real quotas and O(1) usage.

* A quota scope's limit is ``ceph.quota.max_bytes`` on its directory
  (``0``/unset: no limit).  Enforcement is done by the CephFS *client* and
  is approximate: writes may overshoot by up to ~1 MiB per file, and a burst
  of small files by much more until the MDS has seen their sizes; the
  overshooting write then fails with EDQUOT, which the vfs code answers with
  507 ``insufficient-storage``.
* Usage (``describe_quota_scope``, ``get_usage``, ``get_used_bytes``) reads the
  MDS's recursive statistics (``ceph.dir.rbytes``/``rfiles``/``rsubdirs``):
  no tree walk, but they are propagated lazily and may lag writes by seconds.
* A rename across a quota-realm boundary fails with EXDEV on CephFS; moves
  and renames then copy to a temporary name beside the target, swap it in
  and remove the source (``crossmove``), so the API still sees one step.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from backends.base import Capability, FolderUsage, QuotaConfig, QuotaUsage
from backends.vfs import VfsVolume, os_errors
from storage import quota
from storage.config import ConfigError, parse_duration
from storage.errors import (
    InvalidQuotaConfig,
    QuotaScopeExists,
    QuotaScopeNotFound,
)
from storage.quota import ScopeFigure

from . import xattrs

if TYPE_CHECKING:
    from backends.base import AbstractVolume
    from storage.bgtasks import Progress
    from storage.vfid import QuotaScopeID, VFolderID

log = Logger()


def _limit(options: QuotaConfig | None) -> int | None:
    """The byte limit to set (None: no limit), or ``InvalidQuotaConfig``."""
    if options is None:
        return None
    limit = options.limit_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidQuotaConfig(f"limit_bytes must be a non-negative integer, got {limit!r}")
    return limit or None


class CephFSVolume(VfsVolume):
    backend_name = "cephfs"
    capabilities = frozenset({Capability.VFOLDER, Capability.QUOTA, Capability.FAST_SIZE})

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        options = {str(k).replace("_", "-"): v for k, v in (config.options or {}).items()}
        # How long the MDS may take to show a write in a scope's rbytes: the
        # daemon counts what it wrote for that long on top of them
        # (storage.quota).  Measured: 16-20 s with default Ceph settings.
        self.rstats_lag = parse_duration(
            options.get("rstats-lag", "30s"), f"[volume.{config.name}] options.rstats-lag"
        )

    # -- start-up ---------------------------------------------------------------

    def _prepare(self) -> None:
        super()._prepare()
        # Fail at start-up, in one line, rather than at the first quota call.
        if not xattrs.is_cephfs(self.root):
            raise ConfigError(
                f"[volume.{self.name}] path",
                f"{self.root} does not answer CephFS's ceph.dir.rbytes: not a CephFS mount?",
            )

    # -- quota scopes -------------------------------------------------------------

    async def create_quota_scope(
        self, qsid: QuotaScopeID, options: QuotaConfig | None = None, extra_args: dict[str, Any] | None = None
    ) -> None:
        limit = _limit(options)
        await super().create_quota_scope(qsid, options, extra_args)
        if limit is not None:
            try:
                await self.pool.run(xattrs.set_max_bytes, self.quota_scope_path(qsid), limit)
            except BaseException:
                # Do not leave a scope without the limit that was asked for.
                await self.pool.run(_rmdir_quietly, self.quota_scope_path(qsid))
                raise

    async def describe_quota_scope(self, qsid: QuotaScopeID) -> QuotaUsage:
        used, limit = await self.pool.run(self._read_quota_scope, qsid)
        return QuotaUsage(used_bytes=used, limit_bytes=limit)

    def _read_quota_scope(self, qsid: QuotaScopeID) -> tuple[int, int | None]:
        path = self.quota_scope_path(qsid)
        if not path.is_dir():
            raise QuotaScopeNotFound(f"no such quota scope: {qsid}", qsid=str(qsid))
        with os_errors("."):
            max_bytes, _max_files = xattrs.read_quota(path)
            return xattrs.read_rbytes(path), max_bytes

    async def update_quota_scope(self, qsid: QuotaScopeID, options: QuotaConfig) -> None:
        """Set the limit (0: none), creating the scope if missing (as our API does)."""
        limit = _limit(options)
        try:
            await self.create_quota_scope(qsid, options)
            return
        except QuotaScopeExists:
            pass
        await self.pool.run(self._set_limit, qsid, limit)

    async def unset_quota(self, qsid: QuotaScopeID) -> None:
        await self.pool.run(self._set_limit, qsid, None)

    def read_scope_quota(self, qsid: QuotaScopeID) -> ScopeFigure | None:
        """``ceph.quota.max_bytes`` and ``ceph.dir.rbytes`` (which lags: the
        daemon adds what it wrote meanwhile)."""
        path = self.quota_scope_path(qsid)
        try:
            limit, _ = xattrs.read_quota(path)
            if limit is None:
                return None
            used = xattrs.read_rbytes(path)
        except FileNotFoundError:
            return None
        return ScopeFigure(limit=limit, used=used, live=False, lag=self.rstats_lag)

    def _set_limit(self, qsid: QuotaScopeID, limit: int | None) -> None:
        path = self.quota_scope_path(qsid)
        if not path.is_dir():
            raise QuotaScopeNotFound(f"no such quota scope: {qsid}", qsid=str(qsid))
        with os_errors("."):
            xattrs.set_max_bytes(path, limit)

    # -- usage (fast-size: the MDS's recursive stats) ---------------------------------

    async def get_usage(self, vfid: VFolderID, relpath: str = ".") -> FolderUsage:
        """Entries below ``relpath`` (not counting itself; upstream counts it) and
        their bytes, as the MDS last propagated them (may lag by seconds)."""
        stats = await self.pool.run(self._rstats, vfid, relpath)
        return FolderUsage(file_count=stats.entries_below, used_bytes=stats.rbytes)

    async def get_used_bytes(self, vfid: VFolderID, relpath: str = ".") -> int:
        stats = await self.pool.run(self._rstats, vfid, relpath)
        return stats.rbytes

    def _rstats(self, vfid: VFolderID, relpath: str) -> xattrs.RStats:
        target = self._resolve(vfid, relpath, True)
        with os_errors(relpath):
            if not stat.S_ISDIR(os.stat(target, follow_symlinks=False).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory")
            return xattrs.read_rstats(target)

    # -- clone: check the destination's quota first (O(1) with rstats) ----------------

    async def clone_vfolder(
        self, src_vfid: VFolderID, dst_volume: AbstractVolume, dst_vfid: VFolderID,
        progress: Progress | None = None,
    ) -> None:
        """As vfs, but refused up front when the source's bytes exceed what is
        left in the destination's quota scope.  Quota enforcement alone would
        catch it only late: CephFS does not enforce a realm's quota on a
        directory created moments ago (observed: ~1 s), and a fast copy
        overshoots a lot in that time."""
        if isinstance(dst_volume, CephFSVolume) and dst_vfid.quota_scope_id is not None:
            await self.pool.run(self._check_clone_fits, src_vfid, dst_volume, dst_vfid.quota_scope_id)
        await super().clone_vfolder(src_vfid, dst_volume, dst_vfid, progress)

    def _check_clone_fits(self, src_vfid: VFolderID, dst_volume: CephFSVolume, qsid: QuotaScopeID) -> None:
        """Before the walk the vfs clone makes (which checks again with its count)."""
        if dst_volume.read_scope_quota(qsid) is None:
            return  # no limit, or created by the clone without one
        with os_errors("."):
            needed = xattrs.read_rbytes(self._real_vfolder(src_vfid))
        quota.check_fits(dst_volume, qsid, needed, "the clone")

    # -- moves across quota realms --------------------------------------------------

    def copy_fits(self, src_dir: int, dst_dir: int, nbytes: int) -> None:
        """A move into another quota realm copies (EXDEV): refuse it (EDQUOT,
        a 507) before a byte is copied when a realm the target is in, and the
        source is not, has less than ``nbytes`` left.  CephFS alone would
        refuse only late (a realm made moments ago is not enforced yet), with
        part of the copy written.  ``rbytes`` lag: this catches what the
        figures show; the filesystem still refuses the rest."""
        source_realms = {key for key, _limit in self._realms_above(src_dir)}
        for key, (limit, used) in self._realms_above(dst_dir, with_usage=True):
            if key in source_realms:
                continue  # the bytes are in this realm already
            if used + nbytes > limit:
                left = max(0, limit - used)
                raise OSError(errno.EDQUOT, f"the destination's quota realm has {left} bytes left; "
                                            f"the move needs {nbytes}")

    def _realms_above(self, dir_fd: int, with_usage: bool = False) -> list[tuple[Any, Any]]:
        """The quota realms holding ``dir_fd`` (it included), up to the volume's
        root: ((st_dev, st_ino), limit) or, ``with_usage``, (key, (limit, rbytes))."""
        root = os.stat(self.root)
        found: list[tuple[Any, Any]] = []
        fd = os.dup(dir_fd)
        try:
            for _ in range(256):  # bounded: a volume is not deeper than this
                st = os.fstat(fd)
                key = (st.st_dev, st.st_ino)
                limit = xattrs.read_int(fd, xattrs.MAX_BYTES)
                if limit:
                    found.append((key, (limit, xattrs.read_rbytes(fd)) if with_usage else limit))
                if key == (root.st_dev, root.st_ino):
                    break
                parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = parent
        finally:
            os.close(fd)
        return found


def _rmdir_quietly(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
