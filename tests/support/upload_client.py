"""Synchronous helpers for tests that drive a real daemon (support.daemon):
make a vfolder and an upload token through the manager API, talk tus with
``requests``."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

import requests

from storage.vfid import VFolderID

TUS = {"Tus-Resumable": "1.0.0"}


class UploadFixture:
    """A vfolder on a running daemon, and upload tokens for it."""

    def __init__(self, daemon: Any, volume: str = "local") -> None:
        self.daemon = daemon
        self.volume = volume
        self.vfid = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")
        r = self.manager("POST", "/folder/create", {"volume": volume, "vfid": str(self.vfid)})
        assert r.status_code in (200, 201, 204), r.text

    def manager(self, method: str, path: str, body: Any) -> requests.Response:
        return requests.request(
            method, self.daemon.manager_url + path, json=body, timeout=30,
            headers={"X-BackendAI-Storage-Auth-Token": self.daemon.manager_secret},
        )

    @property
    def vfolder(self) -> Path:
        return self.daemon.volume_path(self.volume) / self.vfid.relative_path()

    def token(self, relpath: str, size: int) -> str:
        r = self.manager("POST", "/folder/file/upload",
                         {"volume": self.volume, "vfid": str(self.vfid), "relpath": relpath, "size": size})
        assert r.status_code == 200, r.text
        return r.json()["token"]

    def upload_url(self, token: str) -> str:
        return f"{self.daemon.client_url}/upload?token={token}"

    def head(self, token: str) -> requests.Response:
        return requests.head(self.upload_url(token), headers=TUS, timeout=30)

    def offset(self, token: str) -> int:
        r = self.head(token)
        assert r.status_code == 200, (r.status_code, r.text)
        return int(r.headers["Upload-Offset"])

    def patch(self, token: str, offset: int, body: bytes, **headers: str) -> requests.Response:
        h = dict(TUS, **{"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)})
        h.update(headers)
        return requests.patch(self.upload_url(token), data=body, headers=h, timeout=60)


def open_patch(port: int, token: str, offset: int, length: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"PATCH /upload?token={token} HTTP/1.1\r\nHost: proxy\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    s.sendall(head.encode())
    return s
