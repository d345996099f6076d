"""What the privileged helper does, as plain blocking functions.

Each operation holds the registry lock from the registry change through the
``xfs_quota`` calls, so the files ``xfs_quota`` reads are consistent and two
creations never race for an ID.  ``checkpoint(step)`` is called after every
step; fault-injection tests make it exit the process there, and the
reconcile pass at the next start repairs what was left.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from . import validate
from .quota_tool import XfsQuota
from .registry import ProjectNotFound, RegistryFiles
from .report import ProjectReport

log = logging.getLogger(__name__)

CRASH_ENV = "STORAGE_PROXY_XFS_HELPER_CRASH_AFTER"
CRASH_POINTS = (
    "add:limits", "add:projects", "add:projid", "project", "limit",
    "remove:limit", "remove:projid", "remove:projects",
)

# FS_IOC_FSGETXATTR = _IOR('X', 31, struct fsxattr) (28 bytes).
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_XFLAG_PROJINHERIT = 0x200


def directory_project(path: str) -> tuple[int, bool] | None:
    """(project ID, inherit flag) of a directory, or None where the ioctl is unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, b"\0" * 28)
    except OSError:
        return None
    finally:
        os.close(fd)
    xflags, _extsize, _nextents, projid = struct.unpack("4I", buf[:16])
    return projid, bool(xflags & _FS_XFLAG_PROJINHERIT)


def crash_checkpoint_from_env() -> Callable[[str], None]:
    target = os.environ.get(CRASH_ENV)
    if not target:
        return lambda step: None
    if target not in CRASH_POINTS:
        raise SystemExit(f"{CRASH_ENV}: unknown step {target!r}; one of {', '.join(CRASH_POINTS)}")

    def checkpoint(step: str) -> None:
        if step == target:
            log.warning("fault injection: exiting after step %s", step)
            os._exit(75)

    return checkpoint


@dataclass
class ReconcileSummary:
    repaired: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class ProjectKeeper:
    def __init__(
        self,
        files: RegistryFiles,
        tool: XfsQuota,
        mounts: list[str],
        checkpoint: Callable[[str], None] = lambda step: None,
    ) -> None:
        self.files = files
        self.tool = tool
        self.mounts = [os.path.normpath(m) for m in mounts]
        self.checkpoint = checkpoint
        files.checkpoint = checkpoint

    def ours(self, path: str) -> bool:
        return any(validate.is_inside(path, m) and path != m for m in self.mounts)

    def mount_of(self, path: str | None) -> str:
        for m in sorted(self.mounts, key=len, reverse=True):
            if path and validate.is_inside(path, m):
                return m
        return self.mounts[0]

    def _path_of(self, reg, project_id: int) -> str | None:
        paths = reg.projects.paths_of(project_id)
        return paths[0] if paths else None

    def _mark(self, project_id: int, path: str, mount: str) -> bool:
        """``project -s`` unless the top directory is marked already (it walks the tree)."""
        if directory_project(path) == (project_id, True):
            return False
        self.tool.setup_project(project_id, mount)
        return True

    # -- operations -------------------------------------------------------

    def create(self, name: str, path: str, limit_bytes: int) -> int:
        validate.project_name(name)
        validate.limit_bytes(limit_bytes)
        validate.project_path(path, name, self.mounts)
        mount = self.mount_of(path)
        with self.files.locked() as reg:
            project_id, _new = self.files.add_project(reg, name, path, limit_bytes)
            self._mark(project_id, path, mount)
            self.checkpoint("project")
            self.tool.set_limit(project_id, limit_bytes, mount)
            self.checkpoint("limit")
        log.info("project %s (id %d) at %s, limit %d bytes", name, project_id, path, limit_bytes)
        return project_id

    def set_limit(self, name: str, limit_bytes: int) -> int:
        validate.project_name(name)
        validate.limit_bytes(limit_bytes)
        with self.files.locked() as reg:
            project_id = self.files.set_limit(reg, name, limit_bytes)
            self.tool.set_limit(project_id, limit_bytes, self.mount_of(self._path_of(reg, project_id)))
        return project_id

    def report(self, name: str) -> ProjectReport:
        validate.project_name(name)
        reg = self.files.read()  # each file is replaced atomically: no lock needed to read
        project_id = reg.projid.mapping().get(name)
        if project_id is None:
            raise ProjectNotFound(f"no XFS project named {name}")
        return self.tool.report(project_id, self.mount_of(self._path_of(reg, project_id)))

    def remove(self, name: str) -> int:
        validate.project_name(name)
        with self.files.locked() as reg:
            project_id = reg.projid.mapping().get(name)
            if project_id is None:
                raise ProjectNotFound(f"no XFS project named {name}")
            self.tool.set_limit(project_id, 0, self.mount_of(self._path_of(reg, project_id)))
            self.checkpoint("remove:limit")
            self.files.remove_project(reg, name)
        return project_id

    # -- crash repair -----------------------------------------------------

    def reconcile(self) -> ReconcileSummary:
        """Make the filesystem match the registry (the intent), for projects under our mounts.

        Half-done registry changes are undone (``drop_orphans``); each complete
        entry gets ``project -s`` (if its directory is not marked) and its
        limit again; an entry whose directory is gone is dropped and its
        limit cleared, which frees its ID.  Names not of our form are left
        alone, so an administrator's own projects are never touched."""
        summary = ReconcileSummary()
        with self.files.locked() as reg:
            self.files.drop_orphans(reg, self.ours)
            limits = reg.limits.mapping()
            for name, project_id in sorted(reg.projid.mapping().items()):
                if not validate.NAME.match(name):
                    continue
                paths = [p for p in reg.projects.paths_of(project_id) if self.ours(p)]
                if not paths:
                    continue
                mount = self.mount_of(paths[0])
                try:
                    if not os.path.isdir(paths[0]):
                        self.files.remove_project(reg, name)
                        self.tool.set_limit(project_id, 0, mount)
                        summary.dropped.append(name)
                        continue
                    self._mark(project_id, paths[0], mount)
                    self.tool.set_limit(project_id, limits.get(name, 0), mount)
                    summary.repaired.append(name)
                except Exception as exc:  # one broken entry must not stop the others
                    log.error("reconcile %s (id %d): %s", name, project_id, exc)
                    summary.failed.append(name)
        return summary
