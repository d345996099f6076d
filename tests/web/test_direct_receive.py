"""UploadWriter.receive: a body read straight off a socket into the staging
file by a thread (splice, or recv_into + pwrite when hashing), over a real
socketpair; and the twisted.web decoder attributes the hand-off relies on."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.pages import notFound
from twisted.web.server import Site

from storage.errors import InsufficientStorage
from storage.uploads import StopSignal, create_upload, open_writer, read_state, staging_path
from storage.web.streaming import body_decoder, consumed_elsewhere


@pytest.fixture
def writer(tmp_path: Path):
    vfolder = tmp_path / "vf"
    vfolder.mkdir()
    create_upload(vfolder, "a" * 32, "f.bin", 3 << 20)
    w = open_writer(vfolder, "a" * 32, 0)
    yield w
    w.close()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def feed(sock: socket.socket, data: bytes, close: bool = False) -> threading.Thread:
    def run() -> None:
        try:
            sock.sendall(data)
        except OSError:
            return  # the receiver stopped reading (a full disk): not this helper's business
        if close:
            sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("hashed", [False, True], ids=["splice", "recv_into"])
def test_receive_moves_exactly_count_bytes_and_leaves_the_rest(writer, pair, hashed):
    a, b = pair
    body = os.urandom(2 << 20)
    t = feed(b, body + b"NEXT REQUEST")
    hasher = hashlib.sha256() if hashed else None
    result = writer.receive(a, len(body), hasher)
    t.join()
    assert (result.consumed, result.written, result.eof, result.error) == (len(body), len(body), False, None)
    assert writer.offset == len(body)
    assert staging_path(writer.vfolder, writer.state.session).read_bytes() == body
    if hashed:
        assert hasher.digest() == hashlib.sha256(body).digest()
    a.setblocking(True)
    assert a.recv(100) == b"NEXT REQUEST"  # a pipelined request stays in the socket


@pytest.mark.parametrize("hashed", [False, True], ids=["splice", "recv_into"])
def test_receive_stops_at_end_of_stream_with_what_came(writer, pair, hashed):
    a, b = pair
    t = feed(b, b"x" * 1000, close=True)
    result = writer.receive(a, 5000, hashlib.md5() if hashed else None)
    t.join()
    assert result.eof and result.consumed == 1000 and result.written == 1000
    writer.commit()
    assert read_state(writer.vfolder, writer.state.session).offset == 1000


def test_receive_gives_up_when_told_to_stop(writer, pair):
    a, _ = pair
    stop = StopSignal()
    stop.set()
    result = writer.receive(a, 5000, None, stop)
    stop.close()
    assert result.stopped == "stopped" and result.consumed == 0


def test_receive_gives_up_after_the_idle_timeout(writer, pair):
    a, _ = pair
    result = writer.receive(a, 5000, None, idle_timeout=0.5)
    assert result.stopped == "idle"


def test_decoder_attributes_used_by_the_hand_off():
    site = Site(notFound())
    wrapper = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    wrapper.makeConnection(StringTransport())
    channel = wrapper._channel
    wrapper.dataReceived(b"PATCH /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    decoder = body_decoder(channel)
    assert decoder.contentLength == 7
    request = channel.requests[-1]
    assert not consumed_elsewhere(channel, 4)  # 3 left: not complete
    assert decoder.contentLength == 3
    received = []
    request.requestReceived = lambda *args: received.append(args)
    assert consumed_elsewhere(channel, 3)
    assert received and received[0][0] == b"PATCH"


def test_write_back_starts_every_step_unless_switched_off(writer, monkeypatch):
    from storage import uploads

    calls = []
    monkeypatch.setattr(uploads.fastio, "sync_file_range", lambda fd, off, n, flags: calls.append((off, n)))
    monkeypatch.setattr(uploads, "WRITEBACK_STEP", 1 << 20)
    writer.write([b"x" * (600 << 10)])
    assert calls == []
    writer.write([b"x" * (600 << 10)])
    assert calls == [(0, 1200 << 10)]
    writer.early_writeback = False
    writer.write([b"x" * (1200 << 10)])
    assert calls == [(0, 1200 << 10)]


@pytest.mark.parametrize("hashed", [False, True], ids=["splice", "recv_into"])
def test_a_checkpoint_on_a_full_disk_stops_the_body_and_keeps_it_in_order(small_fs, pair, hashed, monkeypatch):
    from storage import uploads

    # Checkpoint often, so one falls when the disk has no block left for the state file.
    monkeypatch.setattr(uploads, "CHECKPOINT_STEP", 96 << 10)
    create_upload(small_fs, "b" * 32, "f.bin", 3 << 20)
    writer = open_writer(small_fs, "b" * 32, 0)
    a, b = pair
    body = os.urandom(2 << 20)

    t = feed(b, body)
    try:
        result = writer.receive(a, len(body), hashlib.sha1() if hashed else None)
        assert getattr(result.error, "status", None) == 507
        try:
            writer.commit()  # what finish() does next: record what is left
        except InsufficientStorage:
            pass
    finally:
        a.close()
        t.join()
        writer.close()
    recorded = read_state(small_fs, "b" * 32).offset
    assert 0 < recorded < 1 << 20
    assert staging_path(small_fs, "b" * 32).read_bytes()[:recorded] == body[:recorded]


@pytest.fixture(params=["native", "pure"])
def splice_impl(request, monkeypatch):
    """Both implementations of fastio.splice_receive, as UploadWriter calls it."""
    from storage import _fastio_py, fastio, uploads

    if request.param == "native":
        if not fastio.NATIVE:
            pytest.skip("storage._fastio is not compiled here")
        return fastio.implementation
    monkeypatch.setattr(uploads.fastio, "splice_receive", _fastio_py.splice_receive)
    return _fastio_py


def test_receive_reports_a_full_disk_with_the_bytes_written_before(small_fs, pair, splice_impl):
    create_upload(small_fs, "c" * 32, "f.bin", 3 << 20)
    writer = open_writer(small_fs, "c" * 32, 0)
    writer.checkpoints = False
    a, b = pair
    body = os.urandom(2 << 20)

    t = feed(b, body)
    try:
        result = writer.receive(a, len(body), None)
    finally:
        a.close()
        t.join()
        writer.close()
    assert getattr(result.error, "status", None) == 507
    assert 0 < result.written < 1 << 20
    assert result.consumed >= result.written
    assert staging_path(small_fs, "c" * 32).read_bytes() == body[: result.written]


@pytest.mark.parametrize("chunks", [1, 7])
def test_splice_receive_moves_the_body_and_says_why_it_stopped(tmp_path, pair, splice_impl, chunks):
    from storage.fastio import RECEIVED_ALL, RECEIVED_EOF, RECEIVED_STOPPED, RECEIVED_WAITED

    a, b = pair
    body = os.urandom(3 << 20)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    r, w = os.pipe2(os.O_CLOEXEC)
    stop = StopSignal()
    try:
        def send() -> None:
            step = len(body) // chunks + 1
            for i in range(0, len(body), step):
                b.sendall(body[i:i + step])

        t = threading.Thread(target=send)
        t.start()
        # At offset 10, all of it but the last byte: that byte stays in the socket.
        n, how, wb = splice_impl.splice_receive(
            a.fileno(), fd, r, w, 10, len(body) - 1, stop.fd, 256 << 10, 2000, 10, 1 << 20)
        t.join()
        assert (n, how) == (len(body) - 1, RECEIVED_ALL)
        assert 10 < wb <= 10 + n
        assert os.pread(fd, len(body), 10) == body[:-1]
        # Nothing more comes: it says so after the wait.
        n, how, _ = splice_impl.splice_receive(a.fileno(), fd, r, w, 0, 1 << 20, stop.fd, 1, 50, 0, 0)
        assert (n, how) == (1, RECEIVED_WAITED)
        # Told to stop: it returns at once, whatever the wait.
        stop.set()
        n, how, _ = splice_impl.splice_receive(a.fileno(), fd, r, w, 0, 100, stop.fd, 1, 60_000, 0, 0)
        assert (n, how) == (0, RECEIVED_STOPPED)
        # The peer closes: end of stream.
        b.shutdown(socket.SHUT_WR)
        n, how, _ = splice_impl.splice_receive(a.fileno(), fd, r, w, 0, 100, -1, 1, 60_000, 0, 0)
        assert (n, how) == (0, RECEIVED_EOF)
    finally:
        stop.close()
        for x in (fd, r, w):
            os.close(x)


@pytest.fixture
def tcp_pair():
    """A loopback TCP connection (SO_RCVLOWAT and resets are TCP's)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        daemon_side, _ = server.accept()
    daemon_side.setblocking(False)
    yield daemon_side, client
    daemon_side.close()
    client.close()


@pytest.mark.parametrize("hashed", [False, True], ids=["splice", "recv_into"])
def test_a_stopped_receive_keeps_what_the_socket_already_held(writer, tcp_pair, hashed):
    """Stopped (a newer request for the upload) while bytes the client sent
    wait in the socket, too few to wake the thread: they were received (the
    client saw them acknowledged), so they are written before it returns."""
    a, b = tcp_pair
    stop = StopSignal()
    out: list = []
    t = threading.Thread(target=lambda: out.append(
        writer.receive(a, 2 << 20, hashlib.md5() if hashed else None, stop)))
    t.start()
    try:
        time.sleep(0.2)  # the thread waits for 256 KiB (SO_RCVLOWAT)
        b.sendall(b"y" * 100_000)
        time.sleep(0.2)
        stop.set()
        t.join(5)
    finally:
        stop.close()
    result = out[0]
    assert result.stopped == "stopped"
    assert (result.consumed, result.written, result.error) == (100_000, 100_000, None)
    assert staging_path(writer.vfolder, writer.state.session).read_bytes() == b"y" * 100_000


@pytest.mark.parametrize("hashed", [False, True], ids=["splice", "recv_into"])
def test_a_reset_connection_is_the_client_leaving_not_an_error(writer, tcp_pair, hashed):
    a, b = tcp_pair
    b.sendall(b"z" * 50_000)
    time.sleep(0.1)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.close()  # RST
    time.sleep(0.1)
    result = writer.receive(a, 1 << 20, hashlib.md5() if hashed else None)
    assert result.error is None and result.eof
    assert result.written == result.consumed == writer.offset
    assert staging_path(writer.vfolder, writer.state.session).stat().st_size == writer.offset
