"""Helpers for the manager-compat tests: the manager's own clients for a daemon."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
from ai.backend.manager.clients.storage_proxy.manager_facing_client import (
    StorageProxyManagerFacingClient,
)
from ai.backend.manager.clients.storage_proxy.session_manager import StorageSessionManager
from ai.backend.manager.config.unified import VolumesConfig
from support.daemon import StorageProxyProcess

PROXY = "sp"  # the proxy's name in the manager's [volumes.proxies]
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run one coroutine on a fresh asyncio loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


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


async def wait_bgtask(daemon: StorageProxyProcess, task_id: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Our /bgtask poll (the manager learns it from events; this is for the test)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{daemon.manager_url}/bgtask/{task_id}",
                                headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret}) as resp:
                assert resp.status == 200, await resp.text()
                state = await resp.json()
            if state["status"] != "running":
                return state
            assert time.monotonic() < deadline, f"bgtask {task_id} still running: {state}"
            await asyncio.sleep(0.05)
