"""Manager-free helpers: an asyncio runner and raw calls to the daemon's manager API.

``test_events.py`` runs with an older backend.ai-common and no manager
installed (tox -e manager-common268, manager-common264), so it drives the
daemon with these plain aiohttp requests, the bodies the manager sends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp
from support.daemon import StorageProxyProcess

T = TypeVar("T")
AUTH = "X-BackendAI-Storage-Auth-Token"


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run one coroutine on a fresh asyncio loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def manager_call(daemon: StorageProxyProcess, method: str, path: str,
                       body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One manager-API request with the secret; (status, parsed JSON or None)."""
    async with aiohttp.ClientSession() as http, http.request(
        method, daemon.manager_url + path, json=body, headers={AUTH: daemon.manager_secret},
    ) as resp:
        data = await resp.read()
        return resp.status, (await resp.json(content_type=None) if data else None)


async def wait_bgtask(daemon: StorageProxyProcess, task_id: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Our /bgtask poll (the manager learns it from events; this is for the test)."""
    deadline = time.monotonic() + timeout
    while True:
        status, state = await manager_call(daemon, "GET", f"/bgtask/{task_id}")
        assert status == 200, state
        if state["status"] != "running":
            return state
        assert time.monotonic() < deadline, f"bgtask {task_id} still running: {state}"
        await asyncio.sleep(0.05)
