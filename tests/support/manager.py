"""A socket-free manager API: ``ManagerAPI`` on a real vfs volume in a tmp
dir with a real blocking pool, reached through ``treq.testing.StubTreq``.

StubTreq joins client and server in memory and only moves bytes when
``flush()`` is called; the routes finish on pool threads, so a LoopingCall
keeps flushing while a test awaits.  ``ManagerClient`` drives it like a
manager would; ``request()`` sends raw bodies for the bad-input tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor as global_reactor
from twisted.internet.task import LoopingCall

from backends.base import VolumeContext
from storage.api.manager import ManagerAPI
from storage.bgtasks import BackgroundTaskRegistry
from storage.blocking import BlockingPool
from storage.config import parse_config
from storage.manager_client import AUTH_HEADER, ManagerClient
from storage.volumes import VolumeRegistry
from support.daemon import MANAGER_SECRET, SECRET, deep_merge

BASE_URL = "http://manager.invalid"


class StubResponse:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def content_type(self) -> str | None:
        return self.header("content-type")

    def json(self) -> Any:
        return json.loads(self.body)


class StubManager:
    def __init__(self, workdir: Path, volumes: tuple[str, ...] = ("local",), extra_config: dict[str, Any] | None = None,
                 reactor: Any = global_reactor) -> None:
        self.workdir = Path(workdir)
        raw = {
            "storage-proxy": {"secret": SECRET, "scandir-limit": 1000},
            "api": {"manager": {"secret": MANAGER_SECRET}},
            "volume": {name: {"backend": "vfs", "path": str(self.workdir / name)} for name in volumes},
        }
        for name in volumes:
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        self.config = parse_config(deep_merge(raw, extra_config or {}))
        self.reactor = reactor
        self.pool = BlockingPool(reactor, 4)
        self.pool.startService()
        context = VolumeContext(pool=self.pool, scandir_limit=self.config.scandir_limit, reactor=reactor)
        self.volumes = VolumeRegistry.from_config(self.config.volumes, context)
        self.volumes.startService()
        self.bgtasks = BackgroundTaskRegistry()
        self.api = ManagerAPI(self.config, self.volumes, self.bgtasks, self.pool, reactor)
        self.stub = StubTreq(self.api.resource())
        self._flusher = LoopingCall(self.stub.flush)
        self._flusher.clock = reactor
        self._flusher.start(0.002)
        self.client = ManagerClient(BASE_URL, MANAGER_SECRET, treq=self.stub, reactor=reactor)
        self.secret = SECRET
        self.manager_secret = MANAGER_SECRET

    def volume(self, name: str = "local") -> Any:
        return self.volumes.get(name)

    def volume_path(self, name: str = "local") -> Path:
        return self.workdir / name

    async def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                      auth: bool | str = True, headers: dict[str, str] | None = None) -> StubResponse:
        """One request; ``body`` is sent as JSON, ``raw`` as is."""
        hdrs = dict(headers or {})
        if auth:
            hdrs[AUTH_HEADER] = self.manager_secret if auth is True else auth
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        kwargs: dict[str, Any] = {"headers": hdrs}
        if data is not None:
            kwargs["data"] = data
        response = await self.stub.request(method, BASE_URL + path, **kwargs)
        content = await self.stub.content(response)
        return StubResponse(response.code, response.headers, content)

    def close(self) -> None:
        if self._flusher.running:
            self._flusher.stop()
        self.volumes.stopService()
        self.pool.threadpool.stop()


def stub_manager_fixture(tmp_path: Path, **kwargs: Any) -> Iterator[StubManager]:
    """Body of a test module's fixture: ``yield from stub_manager_fixture(tmp_path)``."""
    manager = StubManager(tmp_path / "volumes", **kwargs)
    try:
        yield manager
    finally:
        manager.close()
