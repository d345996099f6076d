"""StorageSite's body cap, driven socket-free through buildProtocol + StringTransport."""

from __future__ import annotations

import json

from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from storage.web.site import StorageSite


def make_site(max_body: int | None) -> tuple[StorageSite, list[bytes]]:
    app = Klein()
    seen: list[bytes] = []

    @app.route("/echo", methods=["POST"])
    def echo(request):
        body = request.content.read()
        seen.append(body)
        return b"got %d" % len(body)

    site = StorageSite(app.resource(), max_body=max_body)
    return site, seen


def connect(site: StorageSite) -> tuple[object, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    channel._channel.callLater = Clock().callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def split_response(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        headers[name.lower()] = value
    return status, headers, body


def test_declared_length_over_the_cap_is_refused_before_the_body():
    site, seen = make_site(max_body=100)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    status, headers, body = split_response(transport.value())
    assert status == 413
    assert headers[b"content-type"] == b"application/problem+json"
    assert json.loads(body)["type"].endswith("request-too-large")
    assert seen == []


def test_declared_length_over_the_cap_with_expect_gets_no_100_continue():
    site, _ = make_site(max_body=100)
    channel, transport = connect(site)
    channel.dataReceived(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
    )
    assert not transport.value().startswith(b"HTTP/1.1 100")
    assert b"100 Continue" not in transport.value()
    assert split_response(transport.value())[0] == 413


def test_body_within_the_cap_is_served():
    site, seen = make_site(max_body=100)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    status, _, body = split_response(transport.value())
    assert status == 200
    assert b"got 100" in body
    assert seen == [b"x" * 100]


def test_chunked_body_over_the_cap_is_refused_when_it_passes_it():
    site, seen = make_site(max_body=100)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert transport.value() == b""
    channel.dataReceived(b"40\r\n" + b"b" * 64 + b"\r\n")
    assert split_response(transport.value())[0] == 413
    # The rest is drained and dropped; nothing reaches the resource.
    channel.dataReceived(b"40\r\n" + b"c" * 64 + b"\r\n0\r\n\r\n")
    assert seen == []


def test_no_cap_means_twisted_default_behaviour():
    site, seen = make_site(max_body=None)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"y" * 200000)
    assert split_response(transport.value())[0] == 200
    assert seen == [b"y" * 200000]


def test_drain_waits_for_requests_in_flight():
    site, _ = make_site(max_body=None)
    assert site.drain().called
    from twisted.internet.defer import Deferred

    work: Deferred[None] = Deferred()
    site.track(work)
    drained = site.drain()
    assert not drained.called
    work.callback(None)
    assert drained.called
