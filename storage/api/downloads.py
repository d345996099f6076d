"""Downloads: ``/download`` and ``/download-archive`` (placeholder: being written)."""

from __future__ import annotations

from typing import Any

from storage.errors import UnsupportedOperation


class Downloads:
    def __init__(self, config: Any, volumes: Any, pool: Any, reactor: Any) -> None:
        self.config = config
        self.volumes = volumes
        self.pool = pool
        self.reactor = reactor

    async def download(self, request: Any) -> bytes:
        raise UnsupportedOperation("downloads are not implemented yet")

    async def download_archive(self, request: Any) -> bytes:
        raise UnsupportedOperation("archive downloads are not implemented yet")
