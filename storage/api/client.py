"""Client-facing API: downloads (``storage.api.downloads``) and tus uploads
(``storage.api.tus``), authenticated by JWTs in the ``token`` query parameter.

This module only routes; the work is in those two modules.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from storage import API_VERSION
from storage.api.downloads import Downloads
from storage.api.problems import Utf8PathGuard, add_error_handling, json_body
from storage.api.tus import TusUploads
from storage.web.cors import CORSPolicy, CORSResource
from storage.web.site import StorageSite

TUS_METHODS = ["OPTIONS", "HEAD", "PATCH", "POST", "DELETE", "GET"]


class ClientAPI:
    app = Klein()
    add_error_handling(app, client=True)

    def __init__(self, config: Any, volumes: Any, pool: Any, reactor: Any) -> None:
        self.config = config
        self.volumes = volumes
        self.pool = pool
        self.reactor = reactor
        self.downloads = Downloads(config, volumes, pool, reactor)
        self.tus = TusUploads(config, volumes, pool, reactor)

    def services(self) -> list[Any]:
        return list(self.tus.services())

    def site(self) -> StorageSite:
        policy = CORSPolicy(self.config.cors_allowed_origins, self.config.cors_allow_credentials)
        site = self.tus.make_site(CORSResource(Utf8PathGuard(self.app.resource()), policy))
        site.cors = policy
        return site

    @app.route("/", methods=["GET"])
    def status(self, request: Any) -> bytes:
        return json_body(request, {"status": "ok", "type": "client-facing", "storage-proxy": API_VERSION})

    @app.route("/openapi.json", methods=["GET"])
    def openapi_document(self, request: Any) -> bytes:
        from storage.api.openapi import client_document_bytes

        request.setHeader(b"Content-Type", b"application/json")
        return client_document_bytes()

    @app.route("/download", methods=["GET", "HEAD"])
    def download(self, request: Any) -> Any:
        return self.downloads.download(request)

    @app.route("/download-archive", methods=["GET", "HEAD"])
    def download_archive(self, request: Any) -> Any:
        return self.downloads.download_archive(request)

    @app.route("/upload", methods=TUS_METHODS)
    def upload(self, request: Any) -> Any:
        return self.tus.handle(request, "")

    @app.route("/upload/<path:rest>", methods=TUS_METHODS)
    def upload_sub(self, request: Any, rest: str) -> Any:
        return self.tus.handle(request, rest)
