"""The manager's own storage-proxy client against our daemon (tox -e manager).

These tests import backend.ai-manager 26.9.6 and backend.ai-common 26.9.6
(Python 3.13 only, installed by the tox env ``manager``), start the real
daemon on loopback with ``support.daemon.StorageProxyProcess`` and drive it
with the manager's ``StorageSessionManager`` and
``StorageProxyManagerFacingClient`` exactly as the manager does
(``harness.py``; a module importing it is skipped without the manager).
``test_events.py`` needs backend.ai-common only, so it also runs against the
older common releases whose event encodings we offer.  They live outside ``tests/`` so the default envs, which
have no manager, never collect them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ai.backend.common", reason="needs backend.ai-common (tox -e manager, manager-common268, ...)")

from support.daemon import StorageProxyProcess  # noqa: E402


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageProxyProcess]:
    """One daemon for a test module: two vfs volumes, default settings."""
    proc = StorageProxyProcess(tmp_path_factory.mktemp("proxy"), volumes=("local", "other"))
    proc.start()
    yield proc
    proc.stop(timeout=10)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., StorageProxyProcess]]:
    started: list[StorageProxyProcess] = []

    def factory(**kwargs: Any) -> StorageProxyProcess:
        proc = StorageProxyProcess(tmp_path / f"proxy{len(started)}", **kwargs)
        started.append(proc)
        return proc.start()

    yield factory
    for proc in started:
        proc.stop(timeout=10)
