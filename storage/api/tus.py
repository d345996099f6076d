"""tus 1.0 uploads at ``/upload`` (placeholder: being written)."""

from __future__ import annotations

from typing import Any

from storage.errors import UnsupportedOperation
from storage.web.site import StorageSite


class TusUploads:
    def __init__(self, config: Any, volumes: Any, pool: Any, reactor: Any) -> None:
        self.config = config
        self.volumes = volumes
        self.pool = pool
        self.reactor = reactor

    def services(self) -> list[Any]:
        return []

    def make_site(self, resource: Any) -> StorageSite:
        return StorageSite(resource)

    async def handle(self, request: Any, rest: str) -> bytes:
        raise UnsupportedOperation("uploads are not implemented yet")
