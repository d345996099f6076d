"""Runs ``xfs_quota`` (argv lists only: never a shell) for one mounted filesystem.

``-D``/``-P`` point it at our projects/projid files, so a registry kept
elsewhere than ``/etc`` (tests, several proxies) works as well.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .report import ProjectReport, parse_report

SBIN_PATH = "/usr/sbin:/sbin"
_PROCESSED = re.compile(r"Processed (\d+) ")


class CommandFailed(Exception):
    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited with {returncode}: {stderr.strip()[-500:]}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


def find_xfs_quota(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    found = shutil.which("xfs_quota", path=os.environ.get("PATH", "") + ":" + SBIN_PATH)
    if found is None:
        raise FileNotFoundError("xfs_quota not found on PATH or in /usr/sbin, /sbin (install xfsprogs)")
    return found


class XfsQuota:
    def __init__(self, executable: str, projects: Path, projid: Path, timeout: float = 300.0) -> None:
        self.executable = executable
        self.projects = str(projects)
        self.projid = str(projid)
        self.timeout = timeout

    def argv(self, command: str, mount: str) -> list[str]:
        return [self.executable, "-x", "-D", self.projects, "-P", self.projid, "-c", command, mount]

    def run(self, command: str, mount: str) -> str:
        argv = self.argv(command, mount)
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise CommandFailed(argv, -1, f"timed out after {self.timeout}s") from None
        except OSError as exc:
            raise CommandFailed(argv, -1, str(exc)) from None
        # xfs_quota exits 0 for a path that is not a mount: it then reports nothing.
        if done.returncode != 0 or "cannot setup path for mount" in done.stderr:
            raise CommandFailed(argv, done.returncode, done.stderr)
        return done.stdout

    def setup_project(self, project_id: int, mount: str) -> None:
        """Mark the project's directory tree (from /etc/projects) with its ID and the inherit flag.

        xfs_quota exits 0 even when the directory is missing ("Processed 0
        paths"), so the count is checked."""
        out = self.run(f"project -s {int(project_id)}", mount)
        m = _PROCESSED.search(out)
        if not m or int(m.group(1)) < 1:
            raise CommandFailed(self.argv(f"project -s {project_id}", mount), 0, f"no directory set up: {out.strip()}")

    def set_limit(self, project_id: int, limit_bytes: int, mount: str) -> None:
        """Hard and soft block limits (soft = hard, as upstream: ``df`` shows the soft one)."""
        # Below 1 KiB xfs_quota silently means "unlimited", and reports are in
        # KiB: round a limit up to a whole KiB so it reads back as set.
        n = -(-int(limit_bytes) // 1024) * 1024
        self.run(f"limit -p bsoft={n} bhard={n} {int(project_id)}", mount)

    def report(self, project_id: int, mount: str) -> ProjectReport:
        i = int(project_id)
        out = self.run(f"report -p -b -i -n -N -L {i} -U {i}", mount)
        # A project with nothing charged and no limits is not listed.
        return parse_report(out).get(i, ProjectReport(i, 0, 0, 0))
