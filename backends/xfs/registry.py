"""The XFS project registry: ``/etc/projects``, ``/etc/projid`` and our limits file.

``xfs_quota`` reads ``/etc/projects`` (``ID:PATH`` lines) and ``/etc/projid``
(``NAME:ID`` lines).  Neither can hold a limit, so the limit each project
should have lives in a third file (``NAME:BYTES`` lines, by default beside
``projid`` as ``projid.limits``).  Together they are the *intent*: the
helper's reconcile pass makes the filesystem match them after a crash.

Every change happens under an exclusive ``flock`` on one lock file (by
default ``projid.lock``), so several helpers and threads sharing a registry
never interleave; each file is replaced atomically (temp file, fsync,
rename, fsync of the directory).  Lines we do not understand (comments,
other tools' entries) are kept verbatim.

Write order, chosen so that a crash between any two renames leaves a state
the reconcile pass can finish or undo:

* add:    limits -> projects -> projid   (``projid`` is the commit point)
* remove: projid -> projects -> limits
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from storage.fs.atomic import write_atomic

_PROJECTS_LINE = re.compile(r"^(\d+):(/.*)$")
_PROJID_LINE = re.compile(r"^([^:#\s][^:\s]*):(\d+)(?::.*)?$")
_LIMITS_LINE = re.compile(r"^([^:#\s][^:\s]*):(\d+)$")

MAX_PROJECT_ID = 2**32 - 2  # XFS project IDs are 32-bit; -1 is reserved


class RegistryError(Exception):
    pass


class ProjectNotFound(RegistryError):
    pass


class ProjectConflict(RegistryError):
    """The name is registered already, for another directory."""


@dataclass
class _LineFile:
    """A registry file as its lines; entries are parsed on demand."""

    lines: list[str] = field(default_factory=list)

    def render(self) -> str:
        return "".join(line + "\n" for line in self.lines)


@dataclass
class ProjectsFile(_LineFile):
    def entries(self) -> list[tuple[int, str]]:
        out = []
        for line in self.lines:
            m = _PROJECTS_LINE.match(line)
            if m:
                out.append((int(m.group(1)), m.group(2)))
        return out

    def paths_of(self, project_id: int) -> list[str]:
        return [p for i, p in self.entries() if i == project_id]

    def add(self, project_id: int, path: str) -> None:
        self.lines.append(f"{project_id}:{path}")

    def remove(self, keep) -> None:
        """Keep only the lines ``keep(id, path)`` accepts (unparsed lines stay)."""
        kept = []
        for line in self.lines:
            m = _PROJECTS_LINE.match(line)
            if m and not keep(int(m.group(1)), m.group(2)):
                continue
            kept.append(line)
        self.lines = kept


@dataclass
class NameFile(_LineFile):
    """``NAME:NUMBER`` lines: projid (name -> id) or limits (name -> bytes)."""

    pattern: re.Pattern[str] = _PROJID_LINE

    def mapping(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.lines:
            m = self.pattern.match(line)
            if m and m.group(1) not in out:
                out[m.group(1)] = int(m.group(2))
        return out

    def set(self, name: str, number: int) -> None:
        self.remove(name)
        self.lines.append(f"{name}:{number}")

    def remove(self, name: str) -> None:
        self.lines = [line for line in self.lines if not self._is(line, name)]

    def _is(self, line: str, name: str) -> bool:
        m = self.pattern.match(line)
        return m is not None and m.group(1) == name


@dataclass
class Registry:
    """One consistent snapshot, read under the lock."""

    projects: ProjectsFile
    projid: NameFile
    limits: NameFile

    def used_ids(self) -> set[int]:
        return {i for i, _ in self.projects.entries()} | set(self.projid.mapping().values())

    def smallest_free_id(self) -> int:
        used = self.used_ids()
        candidate = 1  # 0 is the default project of every file
        while candidate in used:
            candidate += 1
        if candidate > MAX_PROJECT_ID:
            raise RegistryError("no free XFS project ID")
        return candidate


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return []
    return text.splitlines()


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` (exactly ``mode``, whatever the umask), durably."""
    write_atomic(path, text.encode("utf-8", "surrogateescape"), mode=mode, exact_mode=True, hidden=True)


class RegistryFiles:
    """Where the registry lives, and the only way to read or change it."""

    def __init__(
        self, projects: Path, projid: Path, limits: Path | None = None, lock: Path | None = None
    ) -> None:
        self.projects_path = Path(projects)
        self.projid_path = Path(projid)
        self.limits_path = Path(limits) if limits else self.projid_path.with_name(self.projid_path.name + ".limits")
        self.lock_path = Path(lock) if lock else self.projid_path.with_name(self.projid_path.name + ".lock")
        # Called with "<op>:<file>" after each file is replaced (fault-injection tests).
        self.checkpoint: Callable[[str], None] = lambda step: None

    @contextlib.contextmanager
    def locked(self) -> Iterator[Registry]:
        """Hold the registry lock; yield a fresh snapshot to read and change."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.read()
        finally:
            os.close(fd)  # releases the flock

    def read(self) -> Registry:
        return Registry(
            projects=ProjectsFile(_read_lines(self.projects_path)),
            projid=NameFile(_read_lines(self.projid_path), _PROJID_LINE),
            limits=NameFile(_read_lines(self.limits_path), _LIMITS_LINE),
        )

    def _write(self, which: str, reg: Registry, op: str) -> None:
        path, content = {
            "projects": (self.projects_path, reg.projects),
            "projid": (self.projid_path, reg.projid),
            "limits": (self.limits_path, reg.limits),
        }[which]
        write_atomically(path, content.render(), 0o600 if which == "limits" else 0o644)
        self.checkpoint(f"{op}:{which}")

    # -- transactions (call them inside ``locked``) -------------------------

    def add_project(self, reg: Registry, name: str, path: str, limit_bytes: int) -> tuple[int, bool]:
        """Register ``name`` for ``path``; returns (project id, newly added).

        Idempotent: a name already registered for the same path keeps its ID
        (its limit intent is updated)."""
        known = reg.projid.mapping()
        if name in known:
            project_id = known[name]
            paths = reg.projects.paths_of(project_id)
            if paths and path not in paths:
                raise ProjectConflict(f"project {name} is registered for {paths[0]}, not {path}")
            reg.limits.set(name, limit_bytes)
            self._write("limits", reg, "add")
            if not paths:
                reg.projects.add(project_id, path)
                self._write("projects", reg, "add")
            return project_id, False
        project_id = reg.smallest_free_id()
        reg.limits.set(name, limit_bytes)
        self._write("limits", reg, "add")
        reg.projects.remove(lambda _i, p: p != path)  # a stale line for this dir
        reg.projects.add(project_id, path)
        self._write("projects", reg, "add")
        reg.projid.set(name, project_id)
        self._write("projid", reg, "add")
        return project_id, True

    def set_limit(self, reg: Registry, name: str, limit_bytes: int) -> int:
        known = reg.projid.mapping()
        if name not in known:
            raise ProjectNotFound(f"no XFS project named {name}")
        reg.limits.set(name, limit_bytes)
        self._write("limits", reg, "set")
        return known[name]

    def remove_project(self, reg: Registry, name: str) -> int:
        known = reg.projid.mapping()
        if name not in known:
            raise ProjectNotFound(f"no XFS project named {name}")
        project_id = known[name]
        reg.projid.remove(name)
        self._write("projid", reg, "remove")
        reg.projects.remove(lambda i, _p: i != project_id)
        self._write("projects", reg, "remove")
        reg.limits.remove(name)
        self._write("limits", reg, "remove")
        return project_id

    def drop_orphans(self, reg: Registry, ours) -> None:
        """Undo half-done adds/removes among the lines ``ours(path)`` claims.

        A projects line of ours whose ID no name maps to, and a limits line
        whose name is not in projid, are leftovers of an interrupted add or
        remove: drop them (projid is the commit point)."""
        names = reg.projid.mapping()
        live_ids = set(names.values())
        before = list(reg.projects.lines)
        reg.projects.remove(lambda i, p: i in live_ids or not ours(p))
        if reg.projects.lines != before:
            self._write("projects", reg, "reconcile")
        stale = [n for n in reg.limits.mapping() if n not in names]
        if stale:
            for n in stale:
                reg.limits.remove(n)
            self._write("limits", reg, "reconcile")
