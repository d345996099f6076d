"""A PATCH body on the reactor (no socket thread: small, TLS, or all busy)
stopped by a newer request for its upload keeps what its socket already
held, unread (issue 9): the client saw those bytes acknowledged, so the
resume's HEAD reports them.  A real TCP socket into the harness site, whose
pool the test holds so the old PATCH's socket stays paused."""

from __future__ import annotations

import os
import socket

import pytest_twisted
from support.tus_harness import ManualPool, TusHarness
from twisted.internet import reactor
from twisted.internet.task import deferLater

from storage.uploads import staging_path

SIZE = 200_000  # below the socket-thread hand-off: the reactor reads it
SENT = 150_000


@pytest_twisted.ensureDeferred
async def test_a_stopped_patch_on_the_reactor_keeps_what_its_socket_held(tmp_path):
    pool = ManualPool()
    h = TusHarness(tmp_path, pool=pool)
    port = reactor.listenTCP(0, h.site, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        token, session = h.new_upload(SIZE)
        body = os.urandom(SIZE)
        client.sendall(
            f"PATCH /upload?token={token} HTTP/1.1\r\nHost: proxy\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
            f"Content-Length: {SIZE}\r\n\r\n".encode() + body[:SENT]
        )
        for _ in range(200):  # the daemon parses the headers, then pauses the socket until the upload opens
            if h.tus.active:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert h.tus.active
        await deferLater(reactor, 0.1, lambda: None)  # the rest of what was sent reaches the socket
        r = h.head(token)  # runs the held pool: the old PATCH opens, writes, records; then the HEAD
        assert (r.status, r.header("Upload-Offset")) == (200, str(SENT))  # without: only the first read's bytes
        assert staging_path(h.vfolder, session).read_bytes() == body[:SENT]
        assert h.patch(token, SENT, body[SENT:]).status == 204
        assert h.target().read_bytes() == body
    finally:
        client.close()
        await port.stopListening()
