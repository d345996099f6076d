"""Test support for the XFS backend: a fake registry + fake xfs_quota, the helper as a subprocess.

Host tests use temp files for /etc/projects and /etc/projid and the fake
``xfs_quota`` (``fake_xfs_quota.py``); the tests marked ``xfs`` use the
real one on the quota-enabled XFS at ``$XFS_MNT`` (run them in the
../shared/xfs-vm guest).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import backends

HERE = Path(__file__).parent
SRC_ROOT = str(Path(backends.__file__).resolve().parent.parent)


def helper_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


@dataclass
class Sandbox:
    """A registry, a 'mount' and a socket path, all in one short temp dir."""

    base: Path
    mount: Path
    etc: Path
    xfs_quota: str
    socket: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def projects(self) -> Path:
        return self.etc / "projects"

    @property
    def projid(self) -> Path:
        return self.etc / "projid"

    @property
    def limits(self) -> Path:
        return self.etc / "projid.limits"

    def fake_state(self) -> dict:
        try:
            return json.loads((self.etc / "projid.fake-state.json").read_text())
        except FileNotFoundError:
            return {"marked": {}, "limits": {}, "calls": []}

    def helper_args(self, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "backends.xfs.helper",
            "--socket", self.socket, "--projects", str(self.projects), "--projid", str(self.projid),
            "--mount", str(self.mount), "--allowed-uid", str(os.geteuid()),
            "--xfs-quota", self.xfs_quota, *extra,
        ]

    def start_helper(self, env: dict[str, str] | None = None, wait: bool = True, *extra: str) -> subprocess.Popen:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        proc = subprocess.Popen(
            self.helper_args(*extra), env=helper_env(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        if wait:
            wait_for_socket(self.socket, proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout:
                proc.stdout.close()


def wait_for_socket(path: str, proc: subprocess.Popen | None = None, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
        except FileNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"helper exited with {proc.returncode} before listening:\n{out}")
        time.sleep(0.05)
    raise AssertionError(f"no socket at {path} after {timeout}s")


def install_fake_xfs_quota(bindir: Path) -> str:
    bindir.mkdir(parents=True, exist_ok=True)
    target = bindir / "xfs_quota"
    target.write_text(f"#!{sys.executable}\n" + (HERE / "fake_xfs_quota.py").read_text())
    target.chmod(0o755)
    return str(target)


def real_xfs_mount() -> str:
    """``$XFS_MNT`` if it is an XFS mounted with project quotas, else skip."""
    mnt = os.environ.get("XFS_MNT")
    if not mnt:
        pytest.skip("XFS_MNT is not set: run the xfs-marked tests in ../shared/xfs-vm (see docs/xfs.md)")
    real = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == real and fields[sep + 1] == "xfs":
                opts = fields[5] + "," + fields[sep + 3]
                if any(o in opts.split(",") for o in ("prjquota", "pquota", "pqnoenforce")):
                    return real
                pytest.skip(f"{real} is XFS but not mounted with project quotas (pquota)")
    pytest.skip(f"{real} is not an XFS mount point")
