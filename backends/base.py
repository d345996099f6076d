"""The interface every storage backend implements.

A backend is a Twisted service (started before the APIs listen, stopped after
they close) that knows no HTTP: it takes parsed IDs and validated relpaths,
does its blocking work in the shared ``BlockingPool``, and raises the errors
of ``storage.errors``.  ``backends.vfs.VfsVolume`` implements all of it for a
plain filesystem; the other backends subclass it and refine what their
filesystem does better (quotas, fast usage, reflink clones).

Every method that returns data is ``async`` and never blocks the reactor.
An operation a backend cannot do raises ``UnsupportedOperation`` (400
``unsupported-operation``, as upstream).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.application.service import Service

from storage.errors import UnsupportedOperation

if TYPE_CHECKING:
    from storage.bgtasks import Progress
    from storage.blocking import BlockingPool
    from storage.config import VolumeConfig
    from storage.quota import ScopeFigure
    from storage.vfid import QuotaScopeID, VFolderID


class Capability:
    VFOLDER = "vfolder"
    QUOTA = "quota"
    METRIC = "metric"
    FAST_FS_SIZE = "fast-fs-size"
    FAST_SIZE = "fast-size"
    FAST_SCAN = "fast-scan"


@dataclass(frozen=True)
class QuotaConfig:
    limit_bytes: int


@dataclass(frozen=True)
class QuotaUsage:
    used_bytes: int | None
    limit_bytes: int | None


@dataclass(frozen=True)
class FolderUsage:
    file_count: int
    used_bytes: int
    # When the numbers were measured (POSIX time); a cached or slow walk's
    # answer may be older than the request.  None: measured just now.
    observed_at: float | None = None


@dataclass(frozen=True)
class FSUsage:
    capacity_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class DirEntry:
    name: str
    type: str  # "FILE" | "DIRECTORY" | "SYMLINK"
    mode: int
    size: int
    created: float  # POSIX timestamps; the API renders them as ISO 8601
    modified: float
    symlink_target: str | None


@dataclass(frozen=True)
class VolumeContext:
    """What a backend gets from the daemon besides its own config."""

    pool: BlockingPool
    scandir_limit: int = 1000
    reactor: Any = None
    # The uid the daemon runs as once it has dropped privileges (None: it keeps
    # its own); the XFS helper must accept connections from it.
    run_as_uid: int | None = None


class AbstractVolume(Service):
    """One configured volume.  Subclasses set ``backend_name`` and ``capabilities``."""

    backend_name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset({Capability.VFOLDER})

    def __init__(self, config: VolumeConfig, context: VolumeContext) -> None:
        self.config = config
        self.context = context
        self.pool = context.pool
        self.name = config.name  # type: ignore[assignment]  # Service.name is typed None
        # The directory under which quota scopes and vfolders live.
        self.mount_path = Path(config.path)
        self.root = (self.mount_path / config.fsprefix).absolute()

    # -- identity ---------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """One entry of ``GET /volumes``."""
        return {
            "name": self.name,
            "backend": self.backend_name,
            "path": str(self.mount_path),
            "fsprefix": self.config.fsprefix,
            "capabilities": sorted(self.capabilities),
        }

    def quota_scope_path(self, qsid: QuotaScopeID) -> Path:
        return self.root / qsid.pathname

    def vfolder_path(self, vfid: VFolderID) -> Path:
        """Where ``vfid`` lives on disk (no I/O: it may not exist)."""
        return self.root / vfid.relative_path()

    async def prepare(self) -> None:
        """Start-up work the daemon awaits before the APIs listen (idempotent);
        ``startService`` results are ignored by Twisted, so it cannot wait there."""

    def invalidate_usage(self, vfid: VFolderID) -> None:
        """Called after files of ``vfid`` changed, for backends that cache usage."""

    # -- volume -----------------------------------------------------------

    async def get_hwinfo(self) -> dict[str, Any]:
        raise NotImplementedError

    async def get_performance_metric(self) -> dict[str, Any]:
        raise UnsupportedOperation("this backend does not report performance metrics")

    async def get_fs_usage(self) -> FSUsage:
        raise NotImplementedError

    # -- quota scopes -----------------------------------------------------

    async def create_quota_scope(
        self, qsid: QuotaScopeID, options: QuotaConfig | None = None, extra_args: dict[str, Any] | None = None
    ) -> None:
        """Raises ``QuotaScopeExists`` if it is there already."""
        raise NotImplementedError

    async def describe_quota_scope(self, qsid: QuotaScopeID) -> QuotaUsage:
        """Raises ``QuotaScopeNotFound``."""
        raise NotImplementedError

    async def update_quota_scope(self, qsid: QuotaScopeID, options: QuotaConfig) -> None:
        """Sets the limit, creating the scope if missing."""
        raise NotImplementedError

    async def unset_quota(self, qsid: QuotaScopeID) -> None:
        """Removes the limit; raises ``QuotaScopeNotFound`` if the scope is missing."""
        raise NotImplementedError

    def read_scope_quota(self, qsid: QuotaScopeID) -> ScopeFigure | None:
        """The scope's limit and usage for the daemon's own enforcement
        (``storage.quota``; blocking: call it in the pool), or None when the
        scope has no limit (or the backend none it can read quickly)."""
        return None

    # -- vfolders ---------------------------------------------------------

    async def create_vfolder(
        self, vfid: VFolderID, mode: int = 0o755, *, exist_ok: bool = False,
        auto_create_quota_scope: bool = False, quota_options: QuotaConfig | None = None,
    ) -> None:
        """Raises ``VFolderExists`` unless ``exist_ok``, and ``QuotaScopeNotFound``
        when the quota scope is missing unless ``auto_create_quota_scope``."""
        raise NotImplementedError

    async def delete_vfolder(
        self, vfid: VFolderID, progress: Progress | None = None, *, missing_ok: bool = False
    ) -> None:
        """Raises ``VFolderNotFound`` unless ``missing_ok``."""
        raise NotImplementedError

    async def clone_vfolder(
        self, src_vfid: VFolderID, dst_volume: AbstractVolume, dst_vfid: VFolderID,
        progress: Progress | None = None,
    ) -> None:
        raise NotImplementedError

    async def get_vfolder_mount(self, vfid: VFolderID, subpath: str = ".") -> Path:
        raise NotImplementedError

    async def get_metadata(self, vfid: VFolderID) -> bytes:
        raise NotImplementedError

    async def put_metadata(self, vfid: VFolderID, payload: bytes) -> None:
        raise NotImplementedError

    async def get_usage(self, vfid: VFolderID, relpath: str = ".") -> FolderUsage:
        raise NotImplementedError

    async def get_used_bytes(self, vfid: VFolderID, relpath: str = ".") -> int:
        raise NotImplementedError

    # -- files inside a vfolder ------------------------------------------

    async def resolve(self, vfid: VFolderID, relpath: str, *, follow_final: bool = True) -> Path:
        """The real path of ``relpath``, confined to the vfolder (``InvalidPath`` if not)."""
        raise NotImplementedError

    async def mkdir(self, vfid: VFolderID, relpath: str, *, parents: bool = True, exist_ok: bool = False) -> None:
        raise NotImplementedError

    async def scandir(self, vfid: VFolderID, relpath: str, limit: int | None = None) -> list[DirEntry]:
        raise NotImplementedError

    async def rename(self, vfid: VFolderID, relpath: str, new_name: str) -> None:
        raise NotImplementedError

    async def move(self, vfid: VFolderID, src_relpath: str, dst_relpath: str) -> None:
        raise NotImplementedError

    async def copy_file(self, vfid: VFolderID, src_relpath: str, dst_relpath: str) -> None:
        raise NotImplementedError

    async def delete_files(
        self, vfid: VFolderID, relpaths: list[str], *, recursive: bool = False,
        progress: Progress | None = None,
    ) -> None:
        raise NotImplementedError
