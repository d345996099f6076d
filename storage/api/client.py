"""Client-facing API: downloads (``storage.api.downloads``) and tus uploads
(``storage.api.tus``), authenticated by JWTs in the ``token`` query parameter."""

from __future__ import annotations

from typing import Any

from klein import Klein

from storage import API_VERSION
from storage.api.problems import add_error_handling, json_body
from storage.web.site import StorageSite


class ClientAPI:
    app = Klein()
    add_error_handling(app)

    def __init__(self, config: Any, volumes: Any, pool: Any, reactor: Any) -> None:
        self.config = config
        self.volumes = volumes
        self.pool = pool
        self.reactor = reactor

    def services(self) -> list[Any]:
        return []

    def site(self) -> StorageSite:
        return StorageSite(self.app.resource())

    @app.route("/", methods=["GET"])
    def status(self, request: Any) -> bytes:
        return json_body(request, {"status": "ok", "type": "client-facing", "storage-proxy": API_VERSION})
