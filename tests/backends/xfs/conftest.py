"""Fixtures for the XFS backend tests (the support code is in xfs_sandbox.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from xfs_sandbox import Sandbox, install_fake_xfs_quota


@pytest.fixture
def sandbox():
    # Short paths: a UNIX socket path must fit in 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="xfsh", dir="/tmp"))
    box = Sandbox(
        base=base,
        mount=base / "mnt",
        etc=base / "etc",
        xfs_quota=install_fake_xfs_quota(base / "bin"),
        socket=str(base / "run" / "helper.sock"),
    )
    box.mount.mkdir()
    box.etc.mkdir()
    try:
        yield box
    finally:
        box.stop_all()
        shutil.rmtree(base, ignore_errors=True)
