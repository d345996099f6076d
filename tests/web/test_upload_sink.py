"""StreamingRequest + UploadSink without sockets: the PATCH body goes to the
staging file through pool calls the test fires by hand, with the transport
paused and resumed around them."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.tus_harness import OCTETS, Connection, ManualPool, TusHarness
from twisted.internet.defer import Deferred

from storage.uploads import read_state, staging_path
from storage.web.streaming import UploadSink

CHUNK = 64 << 10


@pytest.fixture
def h(tmp_path: Path) -> TusHarness:
    return TusHarness(tmp_path, pool=ManualPool())


def open_patch(h: TusHarness, size: int, length: int, offset: int = 0) -> tuple[Connection, str, str]:
    token, session = h.new_upload(size)
    conn = Connection(h)
    conn.send_head("PATCH", f"/upload?token={token}", dict(OCTETS, **{"Upload-Offset": str(offset)}), length)
    return conn, token, session


def test_socket_is_paused_until_the_upload_is_opened_then_resumed(h):
    conn, _, session = open_patch(h, 10, 10)
    assert conn.transport.producerState == "paused"
    conn.send(b"abc")  # bytes already read are kept while waiting
    assert h.pool.step()  # open_writer: lock + offset check
    assert conn.transport.producerState == "producing"
    h.pool.run_all()
    assert staging_path(h.vfolder, session).read_bytes() == b"abc"
    assert conn.responses() == []


def test_backpressure_pauses_above_the_high_mark_and_resumes_below_the_low_mark(h):
    size = 40 << 20
    conn, _, session = open_patch(h, size, size)
    h.pool.step()
    sink = conn.channel.requests[0].content
    assert isinstance(sink, UploadSink)
    sent = 0
    # Feed without running the pool: exactly one write is in flight, the rest queues.
    while conn.transport.producerState == "producing":
        conn.send(b"x" * CHUNK)
        sent += CHUNK
    assert sink.queued > sink.high_water
    assert sink.queued <= sink.high_water + CHUNK
    assert len(h.pool.calls) == 1
    # The write in flight ends: the next one takes what waited (batching), and
    # the socket is read again while it runs.
    h.pool.step()
    assert sink.queued <= sink.low_water
    assert sink.writing > CHUNK
    assert conn.transport.producerState == "producing"
    h.pool.run_all()
    assert sink.written == sent
    assert staging_path(h.vfolder, session).stat().st_size == sent


def test_writes_are_ordered_and_batched(h):
    conn, _, session = open_patch(h, 1000, 1000)
    h.pool.step()
    payload = bytes(range(256)) * 4
    for i in range(0, 1000, 100):
        conn.send(payload[i:i + 100])
    # One write in flight for the first chunk; the other nine wait and go in one batch.
    assert len(h.pool.calls) == 1
    h.pool.step()
    assert len(h.pool.calls) == 1
    h.pool.run_all()
    assert h.target().read_bytes() == payload[:1000]
    [r] = conn.responses()
    assert r.status == 204
    assert r.header("Upload-Offset") == "1000"


def test_offset_after_connection_lost_counts_every_byte_received(h):
    conn, token, session = open_patch(h, 1 << 20, 1 << 20)
    h.pool.step()
    conn.send(b"a" * 1000)
    conn.send(b"b" * 500)  # queued behind the write in flight
    conn.drop()
    h.pool.run_all()  # finish writes, fdatasync, persist the offset
    assert read_state(h.vfolder, session).offset == 1500
    assert staging_path(h.vfolder, session).read_bytes() == b"a" * 1000 + b"b" * 500
    assert h.site.in_flight == set()


def test_a_drop_before_the_upload_is_opened_keeps_the_bytes_read(h):
    conn, _, session = open_patch(h, 100, 100)
    conn.send(b"early")
    conn.drop()
    h.pool.run_all()
    assert read_state(h.vfolder, session).offset == 5


def test_drain_waits_for_the_interrupted_upload_to_be_made_durable(h):
    conn, _, session = open_patch(h, 100, 100)
    h.pool.step()
    conn.send(b"abc")
    conn.drop()
    drained = h.site.drain()
    assert not drained.called
    h.pool.run_all()
    assert drained.called


def test_memory_stays_bounded_whatever_the_body_size(h):
    size = 64 << 20
    conn, _, session = open_patch(h, size, size)
    h.pool.step()
    sink = conn.channel.requests[0].content
    peak = 0
    chunk = b"z" * CHUNK
    for _ in range(size // CHUNK):
        if conn.transport.producerState == "paused":
            h.pool.step()
        assert conn.transport.producerState == "producing"
        conn.send(chunk)
        peak = max(peak, sink.queued + sink.writing)
    h.pool.run_all()
    assert peak <= sink.max_batch + sink.high_water + CHUNK
    assert sink.pauses > 1
    [r] = conn.responses()
    assert r.status == 204
    assert (h.vfolder / "data" / "file.bin").stat().st_size == size


class FakeChannel:
    def __init__(self) -> None:
        from twisted.internet.testing import StringTransport

        self.transport = StringTransport()
        self.timeouts_reset = 0

    def resetTimeout(self) -> None:
        self.timeouts_reset += 1


class FakeTarget:
    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], Deferred[int]]] = []

    def write(self, buffers: list[bytes]) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.calls.append((list(buffers), d))
        return d

    def complete_next(self) -> None:
        buffers, d = self.calls.pop(0)
        d.callback(sum(map(len, buffers)))


def test_sink_resets_the_idle_timeout_when_it_resumes():
    channel = FakeChannel()
    ready: Deferred[FakeTarget] = Deferred()
    sink = UploadSink(channel, ready, high_water=100, low_water=10, max_batch=50)
    target = FakeTarget()
    ready.callback(target)
    assert channel.transport.producerState == "producing"
    before = channel.timeouts_reset
    sink.write(b"x" * 50)  # in flight
    sink.write(b"y" * 60)
    sink.write(b"z" * 60)  # 120 waiting
    assert channel.transport.producerState == "paused"
    target.complete_next()
    target.complete_next()
    assert channel.transport.producerState == "producing"
    assert channel.timeouts_reset > before


def test_sink_write_failure_drops_the_rest_and_reports_it():
    channel = FakeChannel()
    ready: Deferred[FakeTarget] = Deferred()
    sink = UploadSink(channel, ready)
    target = FakeTarget()
    ready.callback(target)
    sink.write(b"abc")
    sink.write(b"def")
    _, d = target.calls.pop(0)
    d.errback(OSError(5, "EIO"))
    failures = []
    sink.done.addErrback(failures.append)
    assert failures and failures[0].check(OSError)
    sink.write(b"ghi")  # dropped
    assert target.calls == []
    assert sink.written == 0


def test_sink_limit_stops_before_writing_past_it():
    channel = FakeChannel()
    ready: Deferred[FakeTarget] = Deferred()
    sink = UploadSink(channel, ready, limit=5)
    target = FakeTarget()
    ready.callback(target)
    sink.write(b"abc")
    sink.write(b"def")
    target.complete_next()
    errors = []
    sink.done.addErrback(errors.append)
    assert errors
    assert sink.written == 3


# -- the hand-off of a large body to a socket thread ------------------------------------


class FakeSocket:
    def __init__(self) -> None:
        self.lowat = 1
        self.lowats: list[int] = []  # every SO_RCVLOWAT set, in order

    def recv_into(self, buffer):  # never called: the fake thread pool does the work
        raise AssertionError("the reactor must not read a handed-off socket")

    def setsockopt(self, level, option, value) -> None:
        import socket

        assert (level, option) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        self.lowat = value
        self.lowats.append(value)


class FakeSocketThreads:
    def __init__(self) -> None:
        self.active = 0
        self.limit = 4
        self.signals: set = set()
        self.calls: list[tuple[tuple, Deferred]] = []

    def is_stopping(self) -> bool:
        return False

    def run(self, f, *args):
        d: Deferred = Deferred()
        self.calls.append(((f, *args), d))
        return d


def patch_with_socket_threads(h, size: int, busy: bool = False):
    """A PATCH of ``size`` bytes whose headers arrived, with fake socket threads."""
    threads = FakeSocketThreads()
    if busy:
        threads.active = threads.limit
    h.tus.socket_threads = threads
    token, session = h.new_upload(size)
    conn = Connection(h)
    conn.transport.socket = FakeSocket()
    conn.send_head("PATCH", f"/upload?token={token}", dict(OCTETS, **{"Upload-Offset": "0"}), size)
    return threads, conn, session


def test_a_large_body_is_handed_to_a_socket_thread_after_the_queue_drains(h):
    from storage.uploads import Received

    size = 1 << 20
    threads, conn, session = patch_with_socket_threads(h, size)
    conn.send(b"a" * 1000)  # came with the headers
    h.pool.step()  # open: then the 1000 bytes are written before the hand-off
    assert threads.calls == []
    assert conn.transport.producerState == "paused"
    h.pool.step()
    [((f, target, sock, count, stop), d)] = threads.calls
    assert count == size - 1000 and target.hasher is None and isinstance(sock, FakeSocket)
    assert conn.transport.producerState == "paused"
    assert threads.active == 1
    # The thread writes the rest itself; here the test stands in for it.
    writer = target.writer
    writer.write([b"b" * count])
    d.callback(Received(consumed=count, written=count))
    assert threads.active == 0
    h.pool.run_all()
    [r] = conn.responses()
    assert r.status == 204 and r.header("Upload-Offset") == str(size)
    assert h.target().read_bytes() == b"a" * 1000 + b"b" * count


def test_a_client_leaving_during_the_hand_off_keeps_what_the_thread_wrote(h):
    from storage.uploads import Received

    size = 1 << 20
    threads, conn, session = patch_with_socket_threads(h, size)
    h.pool.run_all()
    [((f, target, sock, count, stop), d)] = threads.calls
    target.writer.write([b"c" * 5000])
    d.callback(Received(consumed=5000, written=5000, eof=True))
    conn.drop()
    h.pool.run_all()
    assert read_state(h.vfolder, session).offset == 5000


def test_no_hand_off_when_every_socket_thread_is_busy(h):
    size = 1 << 20
    threads, conn, _ = patch_with_socket_threads(h, size, busy=True)
    h.pool.run_all()
    assert threads.calls == []
    assert conn.transport.producerState == "producing"
    conn.send(b"d" * size)
    h.pool.run_all()
    [r] = conn.responses()
    assert r.status == 204


def test_a_body_read_by_the_reactor_wakes_it_per_read_lowat_bytes_then_per_byte_again(h):
    from storage.web.streaming import READ_LOWAT

    size = 3 * READ_LOWAT + 1000
    threads, conn, _ = patch_with_socket_threads(h, size, busy=True)
    sock = conn.transport.socket
    assert sock.lowat == READ_LOWAT  # set with the headers
    h.pool.run_all()
    conn.send(b"d" * (2 * READ_LOWAT + 500))
    h.pool.run_all()
    assert sock.lowat == READ_LOWAT
    conn.send(b"d" * READ_LOWAT)
    assert sock.lowat == 500  # never more than the rest of the body
    conn.send(b"d" * 500)
    h.pool.run_all()
    [r] = conn.responses()
    assert r.status == 204
    assert sock.lowat == 1  # the next request on the connection is read at once


def test_a_refused_body_is_read_per_byte(h):
    from storage.web.streaming import READ_LOWAT

    size = 4 * READ_LOWAT
    threads, conn, _ = patch_with_socket_threads(h, size, busy=True)
    sock = conn.transport.socket
    assert sock.lowat == READ_LOWAT
    conn.channel.requests[0].content._fail(__import__("twisted.python.failure").python.failure.Failure(
        OSError("disk gone")))
    assert sock.lowat == 1  # the rest is drained whatever size it is


def test_drain_ends_bodies_still_arriving_and_keeps_their_bytes(h):
    conn, token, session = open_patch(h, 1 << 20, 1 << 20)
    h.pool.step()
    conn.send(b"k" * 3000)
    h.pool.run_all()
    drained = h.site.drain()
    assert conn.transport.disconnecting
    h.pool.run_all()
    assert read_state(h.vfolder, session).offset == 3000
    conn.drop()  # the transport reports the close it was asked for
    h.pool.run_all()
    assert drained.called


def test_a_long_patch_records_checkpoints_as_it_goes(h, monkeypatch):
    from storage import uploads

    monkeypatch.setattr(uploads, "CHECKPOINT_STEP", 100_000)
    conn, token, session = open_patch(h, 1 << 20, 1 << 20)
    h.pool.step()
    for _ in range(5):
        conn.send(b"c" * 50_000)
        h.pool.run_all()
    # Mid-body, with no end and no disconnect: the offset of record moved on,
    # never past what was written (and made durable) already.
    recorded = read_state(h.vfolder, session).offset
    assert 100_000 <= recorded <= 250_000
    assert staging_path(h.vfolder, session).stat().st_size >= recorded


def test_a_refused_long_patch_rolls_its_checkpoints_back(h, monkeypatch):
    from storage import uploads

    monkeypatch.setattr(uploads, "CHECKPOINT_STEP", 100)
    token, session = h.new_upload(1000)
    conn = Connection(h)
    conn.send_head("PATCH", f"/upload?token={token}",
                   dict(OCTETS, **{"Upload-Offset": "0", "Transfer-Encoding": "chunked"}), None)
    h.pool.run_all()
    conn.send(b"258\r\n" + b"x" * 600 + b"\r\n")
    h.pool.run_all()
    assert read_state(h.vfolder, session).offset == 600  # checkpointed
    conn.send(b"258\r\n" + b"y" * 600 + b"\r\n0\r\n\r\n")  # past Upload-Length
    h.pool.run_all()
    [r] = conn.responses()
    assert r.status == 413
    assert read_state(h.vfolder, session).offset == 0
    assert staging_path(h.vfolder, session).read_bytes() == b""


def test_a_thread_that_received_the_whole_body_also_finishes_the_upload(h):
    import socket
    import threading

    size = 1 << 20
    threads, conn, session = patch_with_socket_threads(h, size)
    conn.send(b"a" * 1000)
    h.pool.step()
    h.pool.step()
    [((f, target, sock, count, stop), d)] = threads.calls
    # Run the thread's job for real, over a socketpair carrying the rest of the body.
    a, b = socket.socketpair()
    a.setblocking(False)
    sender = threading.Thread(target=b.sendall, args=(b"b" * count,))
    sender.start()
    try:
        result = f(target, a, count, stop)
    finally:
        sender.join()
        a.close()
        b.close()
    assert (result.consumed, result.error) == (count, None)
    assert h.target().read_bytes() == b"a" * 1000 + b"b" * count  # already in place
    d.callback(result)
    assert not h.pool.step()  # no pool hop left: the outcome came with the thread's result
    [r] = conn.responses()
    assert r.status == 204 and r.header("Upload-Offset") == str(size)


def test_many_bodies_at_once_share_the_memory_budget(h, monkeypatch):
    from storage.web import streaming

    conn, _, _ = open_patch(h, 1 << 20, 1 << 20)
    sink = conn.channel.requests[0].content
    assert UploadSink.streaming >= 1
    monkeypatch.setattr(UploadSink, "streaming", 1)
    assert sink.high_mark() == sink.high_water  # alone: the full high-water mark
    monkeypatch.setattr(UploadSink, "streaming", 1000)
    assert sink.high_mark() == streaming.BODY_BUFFER_BUDGET // 1000
    assert sink.low_mark() == sink.high_mark() // 4
    monkeypatch.undo()
    h.pool.step()
    started = UploadSink.streaming
    conn.send(b"z" * (1 << 20))
    h.pool.run_all()
    assert UploadSink.streaming == started - 1  # a finished body gives its share back
