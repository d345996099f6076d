"""The body producer's bounds, the stall watchdog and token redaction."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import Deferred

from storage.tus_client import ConnectionFailed, RetryPolicy, TusClient
from storage.tus_client.http import HttpEndpoint, redact
from storage.tus_client.producer import RangeBodyProducer

ensure = pytest_twisted.ensureDeferred


class ManualSource:
    """Reads answered by the test, to see how many are in flight."""

    random_access = True

    def __init__(self, size: int) -> None:
        self.size = size
        self.reads: list[tuple[int, int, Deferred]] = []

    def read(self, offset, length):
        d = Deferred()
        self.reads.append((offset, length, d))
        return d

    def answer(self):
        offset, length, d = self.reads.pop(0)
        d.callback(b"x" * length)


class PausingConsumer:
    def __init__(self, producer, pause_every: bool) -> None:
        self.producer = producer
        self.pause_every = pause_every
        self.written = 0

    def write(self, data):
        self.written += len(data)
        if self.pause_every:
            self.producer.pauseProducing()


def test_producer_reads_one_bounded_piece_at_a_time_and_obeys_pause():
    source = ManualSource(10_000)
    counted = []
    producer = RangeBodyProducer(source, 1000, 9000, counted.append, piece_size=3000)
    consumer = PausingConsumer(producer, pause_every=True)
    done = producer.startProducing(consumer)
    assert [(o, n) for o, n, _ in source.reads] == [(1000, 3000)]
    source.answer()
    assert consumer.written == 3000 and source.reads == []  # paused: no read ahead
    producer.resumeProducing()
    assert [(o, n) for o, n, _ in source.reads] == [(4000, 3000)]
    source.answer()
    producer.resumeProducing()
    source.answer()  # the last piece is shorter: 2000 bytes
    assert consumer.written == 8000 == producer.length
    producer.resumeProducing()
    assert done.called and counted == [3000, 3000, 2000]


def test_producer_stop_never_fires():
    source = ManualSource(100)
    producer = RangeBodyProducer(source, 0, 100)
    done = producer.startProducing(PausingConsumer(producer, False))
    producer.stopProducing()
    source.answer()
    assert not done.called


def test_redact():
    assert redact("http://h/upload?token=a.b.c&dst_dir=d") == "http://h/upload?token=…&dst_dir=d"
    assert redact("http://h/files/1") == "http://h/files/1"


class Silent(protocol.Protocol):
    """Reads everything, never answers."""

    def dataReceived(self, data):
        pass


@ensure
async def test_a_stalled_server_is_a_retried_connection_failure(reactor):
    factory = protocol.Factory.forProtocol(Silent)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    endpoint = HttpEndpoint(reactor, timeout=0.2)
    client = TusClient(reactor, endpoint=endpoint,
                       retry=RetryPolicy(retries=1, base_delay=0.01, max_delay=0.01))
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/upload?token=secret.jwt.value"
        with pytest.raises(ConnectionFailed) as info:
            await client.upload(url, b"x" * 10)
        assert "stalled" in str(info.value)
        assert "secret.jwt.value" not in str(info.value)
    finally:
        await client.close()
        await port.stopListening()
