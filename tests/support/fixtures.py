"""pytest fixtures around the daemon harness; a conftest imports them.

``storage_proxy`` is a started daemon with one vfs volume ``local``;
``storage_proxy_factory(**kwargs)`` starts more, with ``extra_config``
(merged into the TOML), ``volumes`` or ``extra_env``.  All are stopped at
the end of the test; a daemon still running is killed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.daemon import StorageProxyProcess


@pytest.fixture
def storage_proxy_factory(tmp_path: Path) -> Iterator[Callable[..., StorageProxyProcess]]:
    started: list[StorageProxyProcess] = []

    def factory(start: bool = True, **kwargs: Any) -> StorageProxyProcess:
        daemon = StorageProxyProcess(tmp_path / f"proxy{len(started)}", **kwargs)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield factory
    for daemon in started:
        daemon.stop(timeout=10)


@pytest.fixture
def storage_proxy(storage_proxy_factory: Callable[..., StorageProxyProcess]) -> StorageProxyProcess:
    return storage_proxy_factory()
