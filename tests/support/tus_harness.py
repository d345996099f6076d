"""A socket-free harness for the tus API: the real StorageSite and TusUploads,
a fake volume on a tmp dir, HTTP/1.1 bytes over StringTransport, and pools
that run blocking work inline (``InlinePool``) or when the test says
(``ManualPool``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from storage.api.problems import add_error_handling
from storage.api.tus import TusUploads
from storage.tokens import issue_upload_token
from storage.uploads import create_upload, new_session_id
from storage.vfid import VFolderID
from storage.web.cors import CORSPolicy, CORSResource

SECRET = "tus-test-secret-0123456789abcdef0123456789"
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream"}


class InlinePool:
    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return maybeDeferred(f, *args, **kwargs)


class ManualPool:
    """Blocking calls wait in ``calls`` until the test runs them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any], Deferred[Any]]] = []

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, kwargs, d))
        return d

    def step(self) -> bool:
        if not self.calls:
            return False
        f, args, kwargs, d = self.calls.pop(0)
        maybeDeferred(f, *args, **kwargs).chainDeferred(d)
        return True

    def run_all(self) -> None:
        while self.step():
            pass


class FakeVolume:
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.invalidated: list[VFolderID] = []

    def vfolder_path(self, vfid: VFolderID) -> Path:
        return self.root / vfid.relative_path()

    def invalidate_usage(self, vfid: VFolderID) -> None:
        self.invalidated.append(vfid)


class FakeVolumes:
    def __init__(self, *volumes: FakeVolume) -> None:
        self.volumes = {v.name: v for v in volumes}

    def get(self, name: Any) -> FakeVolume:
        from storage.errors import InvalidVolume

        if name not in self.volumes:
            raise InvalidVolume(f"unknown volume: {name!r}")
        return self.volumes[name]

    def __iter__(self):
        return iter(self.volumes.values())


def make_config(**overrides: Any) -> Any:
    values = {"secret": SECRET, "max_upload_size": 1 << 30, "upload_expire": 7 * 86400, "session_expire": 86400}
    values.update(overrides)
    return SimpleNamespace(**values)


def make_app(tus: TusUploads) -> Klein:
    """The same routes as storage.api.client sends to ``TusUploads.handle``."""
    app = Klein()
    add_error_handling(app)
    methods = ["OPTIONS", "HEAD", "PATCH", "POST", "DELETE", "GET"]

    @app.route("/upload", methods=methods)
    def upload(request):
        return tus.handle(request, "")

    @app.route("/upload/<path:rest>", methods=methods)
    def upload_sub(request, rest):
        return tus.handle(request, rest)

    return app


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def parse_responses(raw: bytes) -> list[Response]:
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            raw = rest
            continue
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, raw = rest[:n], rest[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2:]
                if size == 0:
                    break
            raw = rest
        else:
            body, raw = rest, b""
        out.append(Response(status, headers, body))
    return out


class Connection:
    """One client connection into the site."""

    def __init__(self, harness: TusHarness) -> None:
        self.harness = harness
        self.wrapper = harness.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.wrapper.makeConnection(self.transport)
        self.channel = self.wrapper._channel
        self.channel.callLater = harness.clock.callLater

    def send(self, data: bytes) -> None:
        self.wrapper.dataReceived(data)

    def send_head(self, method: str, url: str, headers: dict[str, str], length: int | None) -> None:
        lines = [f"{method} {url} HTTP/1.1", "Host: proxy"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def responses(self) -> list[Response]:
        return parse_responses(self.transport.value())

    def drop(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.wrapper.connectionLost(Failure(ConnectionLost("test drops the client")))


class TusHarness:
    def __init__(self, root: Path, pool: Any = None, **config: Any) -> None:
        self.root = root
        self.volume = FakeVolume(root)
        self.pool = pool or InlinePool()
        self.config = make_config(**config)
        self.clock = Clock()
        self.tus = TusUploads(self.config, FakeVolumes(self.volume), self.pool, self.clock)
        # CORS as storage.api.client wires it: once, for every route.
        policy = CORSPolicy()
        self.site = self.tus.make_site(CORSResource(make_app(self.tus).resource(), policy))
        self.site.cors = policy
        self.vfid = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")
        self.vfolder = self.volume.vfolder_path(self.vfid)
        self.vfolder.mkdir(parents=True)

    def new_upload(self, size: int, relpath: str = "data/file.bin", *, expire: int = 3600,
                   create: bool = True) -> tuple[str, str]:
        """Prepare an upload as the manager API would; returns (token, session)."""
        session = new_session_id()
        if create:
            create_upload(self.vfolder, session, relpath, size)
        token = issue_upload_token(
            SECRET, expire, volume="local", vfid=self.vfid, relpath=relpath, size=size, session=session
        )
        return token, session

    def request(self, method: str, url: str, headers: dict[str, str] | None = None,
                body: bytes | None = None, run_pool: bool = True) -> Response:
        conn = Connection(self)
        conn.send_head(method, url, headers or {}, None if body is None and method in ("GET", "HEAD", "OPTIONS", "DELETE") else len(body or b""))
        if body:
            conn.send(body)
        if run_pool and isinstance(self.pool, ManualPool):
            self.pool.run_all()
        responses = conn.responses()
        assert len(responses) == 1, (responses, conn.transport.value())
        return responses[0]

    def head(self, token: str, rest: str = "") -> Response:
        path = f"/upload/{rest}" if rest else "/upload"
        return self.request("HEAD", f"{path}?token={token}", TUS)

    def patch(self, token: str, offset: int, body: bytes, rest: str = "", **headers: str) -> Response:
        path = f"/upload/{rest}" if rest else "/upload"
        h = dict(OCTETS, **{"Upload-Offset": str(offset)})
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        return self.request("PATCH", f"{path}?token={token}", h, body)

    def target(self, relpath: str = "data/file.bin") -> Path:
        return self.vfolder / relpath
