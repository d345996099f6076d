"""The ``purestorage`` backend: a FlashBlade file system mounted over NFS.

* Files, quota scopes and vfolders are the vfs backend's (a FlashBlade has
  no per-directory quota in the 1.x API upstream speaks; upstream declares no
  ``quota`` capability either).
* Usage and clones use the RapidFile Toolkit when it is installed
  (``pdu``, ``pcp``/``pcopy``; see ``rapidfile.py``), else the vfs code.
* The file system's capacity and use, the NFS performance metric and the
  hardware info come from the FlashBlade REST API (``purity.py``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from backends.base import Capability, FolderUsage, FSUsage, VolumeContext
from backends.vfs import VfsVolume
from storage.bgtasks import TaskCancelled
from storage.errors import ExecutionError, ExternalServiceError, QuotaScopeExists

from . import rapidfile
from .options import FlashBladeOptions
from .process import CommandOutputTooLarge, CommandResult, CommandTimeout, run_command
from .purity import PurityClient, PurityError

if TYPE_CHECKING:
    from backends.base import AbstractVolume
    from storage.bgtasks import Progress
    from storage.config import VolumeConfig
    from storage.vfid import VFolderID

log = Logger()

# How often a running pcp checks whether its background task was cancelled.
CANCEL_POLL_INTERVAL = 0.5


class FlashBladeVolume(VfsVolume):
    backend_name = "purestorage"
    capabilities = frozenset(
        {Capability.VFOLDER, Capability.METRIC, Capability.FAST_FS_SIZE, Capability.FAST_SCAN}
    )

    def __init__(self, config: VolumeConfig, context: VolumeContext) -> None:
        super().__init__(config, context)
        self.options = FlashBladeOptions.parse(config.name, config.options)
        if context.reactor is None:
            from twisted.internet import reactor as default_reactor

            self.reactor: Any = default_reactor
        else:
            self.reactor = context.reactor
        self.purity = PurityClient(
            self.options.endpoint,
            self.options.api_token,
            api_version=self.options.api_version,
            ssl_verify=self.options.ssl_verify,
            timeout=self.options.api_timeout,
            reactor=self.reactor,
        )
        self._toolkit: rapidfile.Toolkit | None = None
        self._toolkit_known = False
        self._toolkit_waiters: list[Deferred[None]] | None = None

    # -- service --------------------------------------------------------------

    def startService(self) -> Any:
        result = super().startService()
        # Warm the toolkit detection; failures are logged and mean "fall back".
        Deferred.fromCoroutine(self.toolkit()).addErrback(
            lambda f: log.failure("purestorage {name}: toolkit detection failed", f, name=self.name)
        )
        return result

    def stopService(self) -> Any:
        parent = super().stopService()
        d = Deferred.fromCoroutine(self.purity.close())
        if isinstance(parent, Deferred):
            d.addBoth(lambda _: parent)
        return d

    # -- RapidFile Toolkit ----------------------------------------------------------

    async def toolkit(self) -> rapidfile.Toolkit | None:
        """The installed toolkit (detected once), or None to use the vfs code."""
        if self._toolkit_known:
            return self._toolkit
        if self._toolkit_waiters is not None:
            waiter: Deferred[None] = Deferred()
            self._toolkit_waiters.append(waiter)
            await waiter
            return self._toolkit
        self._toolkit_waiters = []
        try:
            self._toolkit = await self._detect_toolkit()
        finally:
            self._toolkit_known = True
            waiters, self._toolkit_waiters = self._toolkit_waiters, None
            for w in waiters:
                w.callback(None)
        return self._toolkit

    async def _detect_toolkit(self) -> rapidfile.Toolkit | None:
        if not self.options.rapidfile:
            return None
        tools = await self.pool.run(rapidfile.find_tools)
        if "pdu" not in tools:
            log.warn(
                "purestorage {name}: RapidFile Toolkit not found on PATH; using the generic (vfs) code",
                name=self.name,
            )
            return None
        try:
            result = await run_command(self.reactor, tools["pdu"], ["--version"], timeout=30)
        except (CommandTimeout, CommandOutputTooLarge) as exc:
            log.warn("purestorage {name}: pdu --version failed ({exc}); using the vfs code", name=self.name, exc=exc)
            return None
        parsed = rapidfile.parse_version(result.stdout + result.stderr) if result.ok else None
        if parsed is None:
            log.warn(
                "purestorage {name}: unrecognised RapidFile Toolkit ({out!r}); using the vfs code",
                name=self.name, out=(result.stdout + result.stderr)[:200],
            )
            return None
        generation, version = parsed
        log.info("purestorage {name}: RapidFile Toolkit {version} detected", name=self.name, version=version)
        return rapidfile.Toolkit(generation, version, tools)

    async def _run_tool(self, exe: str, args: list[bytes], timeout: float | None) -> CommandResult:
        return await run_command(self.reactor, exe, args, timeout=timeout)

    # -- usage (fast-scan) -------------------------------------------------------

    async def get_usage(self, vfid: VFolderID, relpath: str = ".") -> FolderUsage:
        toolkit = await self.toolkit()
        if toolkit is None:
            return await super().get_usage(vfid, relpath)
        path = await self.resolve(vfid, relpath)
        try:
            result = await self._run_tool(toolkit.pdu, rapidfile.usage_args(path), self.options.rapidfile_timeout)
        except CommandTimeout:
            log.warn("purestorage {name}: pdu on {path} exceeded {t:g} s", name=self.name, path=path,
                     t=self.options.rapidfile_timeout)
            return FolderUsage(file_count=-1, used_bytes=-1)  # upstream's "too many to count"
        except CommandOutputTooLarge:
            return FolderUsage(file_count=-1, used_bytes=-1)
        if result.ok:
            try:
                count, used = rapidfile.parse_pdu_all(result.stdout, os.fsencode(path))
                return FolderUsage(file_count=count, used_bytes=used)
            except rapidfile.PduOutputError as exc:
                log.warn("purestorage {name}: {exc}; counting with the vfs code", name=self.name, exc=exc)
        else:
            log.warn("purestorage {name}: pdu failed ({code}): {err!r}; counting with the vfs code",
                     name=self.name, code=result.exit_code, err=result.stderr[-300:])
        return await super().get_usage(vfid, relpath)

    async def get_used_bytes(self, vfid: VFolderID, relpath: str = ".") -> int:
        toolkit = await self.toolkit()
        if toolkit is None:
            return await super().get_used_bytes(vfid, relpath)
        path = await self.resolve(vfid, relpath)
        try:
            result = await self._run_tool(toolkit.pdu, rapidfile.summary_args(path), self.options.rapidfile_timeout)
            if result.ok:
                return rapidfile.parse_pdu_summary(result.stdout, os.fsencode(path))
            log.warn("purestorage {name}: pdu -s failed ({code}): {err!r}; using the vfs code",
                     name=self.name, code=result.exit_code, err=result.stderr[-300:])
        except (CommandTimeout, CommandOutputTooLarge, rapidfile.PduOutputError) as exc:
            log.warn("purestorage {name}: pdu -s: {exc}; using the vfs code", name=self.name, exc=exc)
        return await super().get_used_bytes(vfid, relpath)

    # -- clone (pcp) -----------------------------------------------------------------

    async def clone_vfolder(
        self, src_vfid: VFolderID, dst_volume: AbstractVolume, dst_vfid: VFolderID,
        progress: Progress | None = None,
    ) -> None:
        toolkit = await self.toolkit()
        copy_tool = toolkit.copy_tool if toolkit is not None else None
        if copy_tool is None or dst_volume is not self:
            return await super().clone_vfolder(src_vfid, dst_volume, dst_vfid, progress)
        src = await self.resolve(src_vfid, ".")
        dst = self.vfolder_path(dst_vfid)
        if dst_vfid.quota_scope_id is not None:
            try:
                await self.create_quota_scope(dst_vfid.quota_scope_id)
            except QuotaScopeExists:
                pass
        tmp = await self.pool.run(_prepare_clone_target, dst)
        try:
            await self._copy_with_tool(copy_tool, src, tmp, progress)
            await self.pool.run(_finish_clone, tmp, dst)
        except BaseException:
            await self.pool.run(_remove_quietly, tmp)
            raise

    async def _copy_with_tool(self, exe: str, src: Path, dst: Path, progress: Progress | None) -> None:
        if progress is not None:
            progress.message = f"copying with {os.path.basename(exe)}"
        d = run_command(self.reactor, exe, rapidfile.copy_args(src, dst), timeout=None)
        watcher = None
        if progress is not None:
            def poll() -> None:
                if progress.cancelled and not d.called:
                    d.cancel()

            watcher = LoopingCall(poll)
            watcher.clock = self.reactor
            watcher.start(CANCEL_POLL_INTERVAL, now=False)
        try:
            result = await d
        except CancelledError:
            raise TaskCancelled() from None
        finally:
            if watcher is not None and watcher.running:
                watcher.stop()
        if not result.ok:
            err = result.stderr.decode("utf-8", "replace").strip()[-500:]
            raise ExecutionError(f"{os.path.basename(exe)} failed ({result.exit_code}): {err}")

    # -- REST API: fs usage (fast-fs-size), metric, hwinfo ---------------------

    async def get_fs_usage(self) -> FSUsage:
        try:
            capacity, used = await self.purity.get_fs_usage(self.options.fs_name)
        except PurityError as exc:
            log.error("purestorage {name}: fs usage from the FlashBlade failed ({exc}); using statvfs",
                      name=self.name, exc=exc)
            return await super().get_fs_usage()
        return FSUsage(capacity_bytes=capacity, used_bytes=used)

    async def get_performance_metric(self) -> dict[str, Any]:
        item = await self.purity.get_nfs_metric(self.options.fs_name)
        if item is None:
            raise ExternalServiceError(f"no NFS performance metric for file system {self.options.fs_name!r}")
        try:
            return {
                "iops_read": item["reads_per_sec"],
                "iops_write": item["writes_per_sec"],
                "io_bytes_read": item["read_bytes_per_sec"],
                "io_bytes_write": item["write_bytes_per_sec"],
                "io_usec_read": item["usec_per_read_op"],
                "io_usec_write": item["usec_per_write_op"],
            }
        except KeyError as exc:
            raise ExternalServiceError(f"FlashBlade performance record lacks {exc}") from None

    async def get_hwinfo(self) -> dict[str, Any]:
        try:
            metadata = await self.purity.get_metadata()
        except PurityError as exc:
            return {"status": "unavailable", "status_info": str(exc), "metadata": {}}
        return {"status": "healthy", "status_info": None, "metadata": metadata}


# -- blocking helpers (pool) ----------------------------------------------------------


def _prepare_clone_target(dst: Path) -> Path:
    """Create the destination's parents; return a fresh temporary name beside it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst.parent / f".clone-{secrets.token_hex(8)}-{dst.name}"


def _finish_clone(tmp: Path, dst: Path) -> None:
    if not tmp.is_dir():
        raise ExecutionError("the copy tool finished without creating the destination")
    os.rename(tmp, dst)  # appears complete, in one step


def _remove_quietly(path: Path) -> None:
    from storage.fs.tree import remove_path

    try:
        remove_path(path)
    except OSError as exc:
        log.warn("could not remove the failed clone at {path}: {exc}", path=path, exc=exc)
