"""What twisted.web refuses before a request exists is answered with problem+json
(``storage.web.site.StorageChannel``), not a closed connection or a bare 400."""

from __future__ import annotations

import json

import pytest
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from storage.web.site import StorageSite


class Ok(Resource):
    isLeaf = True

    def render_GET(self, request):  # noqa: N802 - twisted's name
        return b"ok"


def exchange(data: bytes) -> tuple[bytes, dict[str, str], bytes, bool]:
    site = StorageSite(Ok())
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.decode().lower(): v.decode().strip() for k, _, v in (line.partition(b":") for line in lines)}
    closing = transport.disconnecting
    protocol.connectionLost(None)
    return status, headers, body, closing


@pytest.mark.parametrize(("data", "status", "slug"), [
    # A request line over 16 KiB: the connection used to close without a word (schemathesis found it).
    (b"GET /download?dst_dir=" + b"%C2%80" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri-too-long"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", 431, "headers-too-large"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 8000) for i in range(3)) + b"\r\n",
     400, "bad-request"),
    (b"NONSENSE\r\n\r\n", 400, "bad-request"),
])
def test_refused_requests_get_a_problem_and_the_connection_closes(data: bytes, status: int, slug: str) -> None:
    line, headers, body, closing = exchange(data)
    assert line.startswith(b"HTTP/1.1 %d " % status)
    assert headers["content-type"] == "application/problem+json"
    assert int(headers["content-length"]) == len(body)
    problem = json.loads(body)
    assert problem["type"].endswith("/" + slug) and problem["error_code"] == "storage-proxy_request_bad-request"
    assert closing


def test_a_normal_request_is_served() -> None:
    line, _, body, _ = exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert line.startswith(b"HTTP/1.1 200") and body.endswith(b"ok")
