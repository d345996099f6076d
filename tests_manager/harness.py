"""The manager's own clients for a daemon (skips the importing module without the manager)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

pytest.importorskip("ai.backend.manager", reason="needs backend.ai-manager 26.9.6 (tox -e manager)")

from ai.backend.manager.clients.storage_proxy.manager_facing_client import (
    StorageProxyManagerFacingClient,
)
from ai.backend.manager.clients.storage_proxy.session_manager import StorageSessionManager
from ai.backend.manager.config.unified import VolumesConfig
from calls import run, wait_bgtask  # noqa: F401  (re-exported for the tests)
from support.daemon import StorageProxyProcess

PROXY = "sp"  # the proxy's name in the manager's [volumes.proxies]


def volumes_config(daemon: StorageProxyProcess, **extra: Any) -> VolumesConfig:
    """The manager's storage config naming this daemon, as an operator writes it."""
    return VolumesConfig.model_validate({
        "proxies": {
            PROXY: {
                "client_api": daemon.client_url,
                "manager_api": daemon.manager_url,
                "secret": daemon.manager_secret,
                "ssl_verify": False,
                **extra,
            },
        },
    })


@asynccontextmanager
async def manager_for(daemon: StorageProxyProcess,
                      secret: str | None = None) -> AsyncIterator[tuple[StorageSessionManager, StorageProxyManagerFacingClient]]:
    """The manager's session manager and its client for our daemon (aiohttp sessions closed after)."""
    config = volumes_config(daemon)
    if secret is not None:
        config.proxies[PROXY].secret = secret
    sm = StorageSessionManager(config)
    try:
        yield sm, sm.get_manager_facing_client(PROXY)
    finally:
        await sm.aclose()
        # the manager-facing clients have their own sessions, which aclose() leaves open
        for client in sm._manager_facing_clients.values():
            await client._client._client_session.close()
