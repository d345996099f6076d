"""A download server for the CLI tests, on 127.0.0.1:0.

``/files/<name>``: ``twisted.web.static.File`` (Range → 206, 416), with a
``Content-Disposition`` naming the file with RFC 5987 ``filename*``;
``/norange/<name>``: ignores Range (always 200);
``/cut/<name>``: sends only the first ``cut_after`` bytes then drops, once per
``cuts`` count; ``/missing``: 404 problem+json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.web import resource, server, static


class _Disposed(static.File):
    def render_GET(self, request: Any) -> Any:
        name = Path(self.path).name
        request.setHeader("Content-Disposition",
                          f"attachment;filename=\"{name.encode('ascii', 'replace').decode()}\"; "
                          f"filename*=UTF-8''{quote(name)}")
        return super().render_GET(request)


class _NoRange(resource.Resource):
    isLeaf = True

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def render_GET(self, request: Any) -> bytes:
        name = request.postpath[0].decode()
        request.setHeader("Content-Disposition", f'attachment; filename="{name}"')
        return (self.root / name).read_bytes()


class _Cut(resource.Resource):
    isLeaf = True

    def __init__(self, fake: FakeDownloadServer) -> None:
        super().__init__()
        self.fake = fake

    def render_GET(self, request: Any) -> Any:
        data = (self.fake.root / request.postpath[0].decode()).read_bytes()
        self.fake.ranges.append(request.getHeader("range"))
        start = 0
        range_header = request.getHeader("range")
        if range_header:
            start = int(range_header.split("=")[1].split("-")[0])
            request.setResponseCode(206)
            request.setHeader("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        request.setHeader("Content-Length", str(len(body)))
        if self.fake.cuts > 0:
            self.fake.cuts -= 1
            request.write(body[: self.fake.cut_after])
            request.channel.transport.loseConnection()
            return server.NOT_DONE_YET
        return body


class _Missing(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader("Content-Type", "application/problem+json")
        return json.dumps({"type": "x/file-not-found", "title": "File not found"}).encode()


class FakeDownloadServer:
    def __init__(self, root: Path, cut_after: int = 1000, cuts: int = 0) -> None:
        self.root = root
        self.cut_after = cut_after
        self.cuts = cuts
        self.ranges: list[str | None] = []
        self.port: Any = None

    def listen(self, reactor: Any) -> FakeDownloadServer:
        top = resource.Resource()
        top.putChild(b"files", _Disposed(str(self.root)))
        top.putChild(b"norange", _NoRange(self.root))
        top.putChild(b"cut", _Cut(self))
        top.putChild(b"missing", _Missing())
        self.port = reactor.listenTCP(0, server.Site(top), interface="127.0.0.1")
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"
