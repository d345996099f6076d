"""An in-process tus 1.0 server for the client tests, with injectable faults.

It serves standard tus (creation at ``/files``, uploads at ``/files/<id>``)
and Backend.AI-style pre-created uploads at ``/upload?token=<id>``.  A test
queues faults per method; each request of that method takes the next one:

* ``Drop(n)``: abort the connection after ``n`` body bytes of a PATCH (the
  bytes are kept when ``keep_partial``, like storage-proxy; dropped like
  upstream when not);
* ``Status(code, problem)``: answer ``code`` without applying anything;
* ``Offset(raw)``: apply the PATCH but answer ``Upload-Offset: raw`` (None:
  no header), or for HEAD report ``raw``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.web import resource, server

from storage.tus_client.headers import decode_metadata


@dataclass
class Drop:
    after: int


@dataclass
class Status:
    code: int
    problem: Any = None


@dataclass
class Offset:
    raw: str | None


@dataclass
class FakeUpload:
    length: int | None
    data: bytearray = field(default_factory=bytearray)
    metadata: dict[str, bytes] = field(default_factory=dict)
    partial: bool = False
    final: bool = False

    @property
    def complete(self) -> bool:
        return self.length is not None and len(self.data) == self.length


def _upload_key(path: bytes) -> str | None:
    parts = urlsplit(path.decode("latin-1"))
    if parts.path == "/upload":
        tokens = parse_qs(parts.query).get("token")
        return f"token:{tokens[0]}" if tokens else None
    if parts.path.startswith("/files/") and len(parts.path) > len("/files/"):
        return parts.path[len("/files/"):]
    return None


class FakeTusServer:
    def __init__(self, *, extensions: tuple[str, ...] = ("creation", "termination", "checksum",
                                                         "concatenation"),
                 checksum_algorithms: tuple[str, ...] = ("sha1", "sha256", "md5"),
                 keep_partial: bool = True, max_size: int | None = None,
                 relative_location: bool = True) -> None:
        self.extensions = extensions
        self.checksum_algorithms = checksum_algorithms
        self.keep_partial = keep_partial
        self.max_size = max_size
        self.relative_location = relative_location
        self.uploads: dict[str, FakeUpload] = {}
        self.faults: dict[str, list[Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.patches: list[tuple[str, int, int]] = []  # (key, Upload-Offset, body bytes received)
        self.connections = 0
        self.port: Any = None
        self._next_id = 0

    # -- test controls ----------------------------------------------------

    def add_faults(self, method: str, *faults: Any) -> None:
        self.faults.setdefault(method, []).extend(faults)

    def take_fault(self, method: str) -> Any:
        queue = self.faults.get(method)
        return queue.pop(0) if queue else None

    def precreate(self, length: int, token: str = "tok") -> str:
        """A Backend.AI-style upload that exists already; returns its URL."""
        self.uploads[f"token:{token}"] = FakeUpload(length)
        return f"{self.base_url}/upload?token={token}"

    def data(self, url: str) -> bytes:
        key = _upload_key(urlsplit(url)._replace(scheme="", netloc="").geturl().encode())
        assert key is not None
        return bytes(self.uploads[key].data)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    @property
    def creation_url(self) -> str:
        return f"{self.base_url}/files"

    def listen(self, reactor: Any) -> FakeTusServer:
        site = _CountingSite(self, _TusResource(self))
        site.requestFactory = _make_request_factory(self)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        return self

    def new_id(self) -> str:
        self._next_id += 1
        return f"u{self._next_id}"


class _CountingSite(server.Site):
    def __init__(self, fake: FakeTusServer, root: Any) -> None:
        super().__init__(root)
        self.fake = fake

    def buildProtocol(self, addr: Any) -> Any:
        self.fake.connections += 1
        return super().buildProtocol(addr)


def _make_request_factory(fake: FakeTusServer) -> Any:
    class FakeTusRequest(server.Request):
        drop_after: int | None = None
        received = 0
        dropped = False

        def gotLength(self, length: int | None) -> None:
            super().gotLength(length)
            if getattr(self.channel, "_command", b"") == b"PATCH":
                queue = fake.faults.get("PATCH")
                if queue and isinstance(queue[0], Drop):
                    self.drop_after = queue.pop(0).after

        def handleContentChunk(self, data: bytes) -> None:
            if self.dropped:
                return  # the rest of a buffer read before the abort took effect
            if self.drop_after is None:
                super().handleContentChunk(data)
                return
            take = data[: max(0, self.drop_after - self.received)]
            super().handleContentChunk(take)
            self.received += len(data)
            if self.received >= self.drop_after:
                self._drop()

        def _drop(self) -> None:
            key = _upload_key(self.channel._path)
            raw_offset = self.requestHeaders.getRawHeaders(b"upload-offset", [b""])[0]
            upload = fake.uploads.get(key) if key else None
            self.content.seek(0)
            body = self.content.read()
            fake.patches.append((key or "?", int(raw_offset or -1), len(body)))
            if (fake.keep_partial and upload is not None and raw_offset.isdigit()
                    and int(raw_offset) == len(upload.data)
                    and not self.requestHeaders.hasHeader(b"upload-checksum")):
                upload.data += body[: (upload.length or 0) - len(upload.data)]
            self.drop_after = None
            self.dropped = True
            self.channel.transport.abortConnection()

        def process(self) -> None:
            if not self.dropped:  # a dropped request is never answered
                super().process()

    return FakeTusRequest


class _TusResource(resource.Resource):
    isLeaf = True

    def __init__(self, fake: FakeTusServer) -> None:
        super().__init__()
        self.fake = fake

    def _headers(self, request: Any) -> dict[str, str]:
        return {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}

    def render(self, request: Any) -> bytes:
        method = request.method.decode()
        headers = self._headers(request)
        self.fake.requests.append((method, request.uri.decode(), headers))
        request.setHeader("Tus-Resumable", "1.0.0")
        if method == "OPTIONS":
            answer, _ = self._fault_status(request, "OPTIONS")
            return answer if answer is not None else self.options(request)
        if headers.get("tus-resumable") != "1.0.0":
            request.setHeader("Tus-Version", "1.0.0")
            return self.problem(request, 412, "Tus-Resumable 1.0.0 required")
        handler = getattr(self, method.lower(), None)
        if handler is None:
            return self.problem(request, 405, "method not allowed")
        return handler(request, headers)

    def problem(self, request: Any, code: int, title: str, extra: Any = None) -> bytes:
        request.setResponseCode(code)
        request.setHeader("Content-Type", "application/problem+json")
        body = {"type": f"https://example.invalid/probs/{code}", "title": title}
        if isinstance(extra, dict):
            body.update(extra)
        return json.dumps(body).encode()

    def options(self, request: Any) -> bytes:
        request.setResponseCode(204)
        request.setHeader("Tus-Version", "1.0.0")
        if self.fake.extensions:
            request.setHeader("Tus-Extension", ",".join(self.fake.extensions))
        if "checksum" in self.fake.extensions:
            request.setHeader("Tus-Checksum-Algorithm", ",".join(self.fake.checksum_algorithms))
        if self.fake.max_size is not None:
            request.setHeader("Tus-Max-Size", str(self.fake.max_size))
        return b""

    def _fault_status(self, request: Any, method: str) -> tuple[bytes | None, Any]:
        fault = self.fake.take_fault(method)
        if isinstance(fault, Status):
            return self.problem(request, fault.code, f"injected {fault.code}", fault.problem), None
        return None, fault

    def head(self, request: Any, headers: dict[str, str]) -> bytes:
        answer, fault = self._fault_status(request, "HEAD")
        if answer is not None:
            return answer
        upload = self.fake.uploads.get(_upload_key(request.uri) or "")
        if upload is None:
            return self.problem(request, 404, "no such upload")
        request.setHeader("Cache-Control", "no-store")
        if isinstance(fault, Offset):
            if fault.raw is not None:
                request.setHeader("Upload-Offset", fault.raw)
        elif not (upload.final and not upload.complete):
            request.setHeader("Upload-Offset", str(len(upload.data)))
        if upload.length is not None:
            request.setHeader("Upload-Length", str(upload.length))
        return b""

    def post(self, request: Any, headers: dict[str, str]) -> bytes:
        if "creation" not in self.fake.extensions and "concatenation" not in self.fake.extensions:
            return self.problem(request, 405, "no creation")
        answer, _ = self._fault_status(request, "POST")
        if answer is not None:
            return answer
        concat = headers.get("upload-concat", "")
        metadata = decode_metadata(headers.get("upload-metadata", ""))
        if concat.startswith("final;"):
            return self._final(request, concat[len("final;"):].split(), metadata)
        length_raw = headers.get("upload-length", "")
        if not length_raw.isdigit():
            return self.problem(request, 400, "Upload-Length required")
        length = int(length_raw)
        if self.fake.max_size is not None and length > self.fake.max_size:
            return self.problem(request, 413, "too large")
        key = self.fake.new_id()
        self.fake.uploads[key] = FakeUpload(length, metadata=metadata, partial=concat == "partial")
        return self._created(request, f"/files/{key}")

    def _created(self, request: Any, path: str) -> bytes:
        request.setResponseCode(201)
        location = path if self.fake.relative_location else self.fake.base_url + path
        request.setHeader("Location", location)
        return b""

    def _final(self, request: Any, locations: list[str], metadata: dict[str, bytes]) -> bytes:
        parts = []
        for location in locations:
            part = self.fake.uploads.get(_upload_key(urlsplit(location).path.encode()) or "")
            if part is None or not part.partial:
                return self.problem(request, 400, f"not a partial upload: {location}")
            if not part.complete:
                return self.problem(request, 400, f"partial upload not complete: {location}")
            parts.append(part)
        joined = b"".join(bytes(p.data) for p in parts)
        target_key = _upload_key(request.uri)
        if target_key is not None and target_key.startswith("token:"):
            target = self.fake.uploads.get(target_key)
            if target is None or target.length != len(joined):
                return self.problem(request, 400, "final length mismatch")
            target.data = bytearray(joined)
            path = request.uri.decode()
        else:
            key = self.fake.new_id()
            self.fake.uploads[key] = FakeUpload(len(joined), bytearray(joined), metadata,
                                                final=True)
            path = f"/files/{key}"
        return self._created(request, path)

    def patch(self, request: Any, headers: dict[str, str]) -> bytes:
        request.content.seek(0)
        body = request.content.read()
        key = _upload_key(request.uri) or ""
        offset_raw = headers.get("upload-offset", "")
        self.fake.patches.append((key, int(offset_raw) if offset_raw.isdigit() else -1, len(body)))
        answer, fault = self._fault_status(request, "PATCH")
        if answer is not None:
            return answer
        upload = self.fake.uploads.get(key)
        if upload is None:
            return self.problem(request, 404, "no such upload")
        if headers.get("content-type") != "application/offset+octet-stream":
            return self.problem(request, 415, "wrong content type")
        if not offset_raw.isdigit():
            return self.problem(request, 400, "Upload-Offset required")
        if int(offset_raw) != len(upload.data):
            return self.problem(request, 409, "offset mismatch")
        if upload.final:
            return self.problem(request, 403, "final uploads take no PATCH")
        if upload.length is not None and len(upload.data) + len(body) > upload.length:
            return self.problem(request, 400, "beyond Upload-Length")
        checksum = headers.get("upload-checksum")
        if checksum is not None:
            algorithm, _, encoded = checksum.partition(" ")
            if algorithm not in self.fake.checksum_algorithms:
                return self.problem(request, 400, "unsupported checksum algorithm")
            if hashlib.new(algorithm, body).digest() != base64.b64decode(encoded):
                return self.problem(request, 460, "checksum mismatch")
        upload.data += body
        request.setResponseCode(204)
        if isinstance(fault, Offset):
            if fault.raw is not None:
                request.setHeader("Upload-Offset", fault.raw)
        else:
            request.setHeader("Upload-Offset", str(len(upload.data)))
        return b""

    def delete(self, request: Any, headers: dict[str, str]) -> bytes:
        if "termination" not in self.fake.extensions:
            return self.problem(request, 405, "no termination")
        key = _upload_key(request.uri) or ""
        if self.fake.uploads.pop(key, None) is None:
            return self.problem(request, 404, "no such upload")
        request.setResponseCode(204)
        return b""


def corrupt_checksums(fake: FakeTusServer, times: int) -> None:
    """Make the next ``times`` checksummed PATCHes fail with 460."""
    fake.add_faults("PATCH", *[Status(460, {"title": "checksum mismatch"})] * times)


__all__ = ["Drop", "FakeTusServer", "FakeUpload", "Offset", "Status",
           "corrupt_checksums"]
