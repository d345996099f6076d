"""Pins the private parts of twisted.web that storage.web.streaming relies on.

If a Twisted upgrade changes any of these, this file fails first and says which.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.pages import notFound
from twisted.web.server import Request, Site

from storage.web.streaming import pause_reading, request_line, resume_reading


class Probe(Request):
    seen: list[tuple[str, object]] = []

    def gotLength(self, length):
        Probe.seen.append(("gotLength", (length, request_line(self.channel), self.getHeader(b"content-type"))))
        super().gotLength(length)

    def handleContentChunk(self, data):
        Probe.seen.append(("chunk", data))
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        Probe.seen.append(("requestReceived", (command, path)))
        super().requestReceived(command, path, version)


def channel_for(request_factory):
    site = Site(notFound())
    site.requestFactory = request_factory
    wrapper = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    wrapper.makeConnection(transport)
    # buildProtocol wraps the HTTPChannel (for HTTP/2 negotiation); requests see the inner one.
    return wrapper._channel, transport


def test_request_line_and_headers_are_known_in_gotLength_before_any_body_byte():
    Probe.seen = []
    channel, _ = channel_for(Probe)
    channel.dataReceived(
        b"PATCH /upload?token=t HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/offset+octet-stream\r\nContent-Length: 6\r\n\r\nabc"
    )
    channel.dataReceived(b"def")
    kinds = [k for k, _ in Probe.seen]
    assert kinds[0] == "gotLength"
    assert Probe.seen[0][1] == (6, (b"PATCH", b"/upload?token=t"), b"application/offset+octet-stream")
    assert kinds[1:] == ["chunk", "chunk", "requestReceived"]
    assert b"".join(d for k, d in Probe.seen if k == "chunk") == b"abcdef"


def test_chunked_bodies_report_no_length():
    Probe.seen = []
    channel, _ = channel_for(Probe)
    channel.dataReceived(b"PATCH /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert Probe.seen[0][1][0] is None
    assert ("chunk", b"abc") in Probe.seen


def test_pausing_the_transport_stops_reading_and_resuming_restarts_it():
    channel, transport = channel_for(Request)
    assert transport.producerState == "producing"
    pause_reading(channel)
    assert transport.producerState == "paused"
    resume_reading(channel)
    assert transport.producerState == "producing"


def test_transport_read_size_attribute_exists():
    # storage.web.site raises it for streamed uploads; tcp.Connection.doRead uses it.
    from twisted.internet import tcp

    assert isinstance(tcp.Connection.bufferSize, int)
    assert "self.bufferSize" in __import__("inspect").getsource(tcp.Connection.doRead)


def test_send_now_writes_a_buffered_response_at_once():
    import socket
    from types import SimpleNamespace

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactor

    from storage.web.streaming import send_now

    ours, peer = socket.socketpair()
    ours.setblocking(False)
    try:
        transport = tcp.Connection(ours, Protocol(), MemoryReactor())
        transport.connected = True
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert transport.dataBuffer or transport._tempDataLen  # buffered, as Twisted does
        send_now(SimpleNamespace(transport=transport))
        peer.settimeout(1)
        assert peer.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
        assert not (transport.dataBuffer or transport._tempDataLen)
        # Not while disconnecting: the reactor's own doWrite must close it.
        transport.write(b"more")
        transport.disconnecting = True
        send_now(SimpleNamespace(transport=transport))
        assert transport._tempDataLen == 4
    finally:
        ours.close()
        peer.close()
