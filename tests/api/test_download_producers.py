"""``ChunkProducer`` (the pread/zip body producer) driven by hand: one blocking
call in flight, pause/resume honoured, a stop mid-call, a failing source,
and the idle timer."""

from __future__ import annotations

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock

from storage.web import producers
from storage.web.producers import ChunkProducer


class ManualPool:
    def __init__(self):
        self.calls = []

    def run(self, f, *args):
        d = Deferred()
        self.calls.append((f, args, d))
        return d

    def step(self):
        f, args, d = self.calls.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)


class FakeTransport:
    def __init__(self):
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class FakeRequest:
    def __init__(self):
        self.channel = type("Channel", (), {})()
        self.channel.transport = FakeTransport()
        self.written = []
        self.producer = None
        self.finished = Deferred()

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.written.append(data)

    def notifyFinish(self):
        return succeed(None) if self.finished.called else self.finished


def source(chunks):
    it = iter(chunks)
    return lambda: next(it, b"")


def test_one_call_in_flight_and_pause_resume():
    pool, request = ManualPool(), FakeRequest()
    closed = []
    producer = ChunkProducer(request, source([b"a", b"b", b"c"]), pool, close=lambda: closed.append(1))
    done = producer.start()
    assert len(pool.calls) == 1
    pool.step()
    assert request.written == [b"a"] and len(pool.calls) == 1
    producer.pauseProducing()
    pool.step()  # the read already in flight completes...
    assert request.written == [b"a", b"b"]
    assert pool.calls == []  # ...but no new one starts while paused
    producer.resumeProducing()
    producer.resumeProducing()  # a second resume does not start a second read
    assert len(pool.calls) == 1
    pool.step()
    pool.step()  # b"": the end
    assert request.written == [b"a", b"b", b"c"]
    assert done.called and done.result == 3
    assert closed == [1] and request.producer is None


def test_stop_while_a_read_is_in_flight():
    pool, request = ManualPool(), FakeRequest()
    closed = []
    producer = ChunkProducer(request, source([b"a", b"b"]), pool, close=lambda: closed.append(1))
    done = producer.start()
    producer.stopProducing()
    assert closed == []  # the pool thread still holds the source
    pool.step()
    assert request.written == [] and closed == [1] and done.called
    assert pool.calls == []


def test_client_leaving_stops_it():
    pool, request = ManualPool(), FakeRequest()
    producer = ChunkProducer(request, source([b"a"] * 10), pool)
    producer.start()
    pool.step()
    request.finished.errback(Exception("connection lost"))
    pool.step()
    assert request.written == [b"a"] and pool.calls == []


def test_a_failing_source_aborts_the_connection():
    pool, request = ManualPool(), FakeRequest()

    def broken():
        raise OSError(5, "Input/output error")

    done = ChunkProducer(request, broken, pool).start()
    pool.step()
    assert request.channel.transport.aborted
    assert done.called


def test_idle_timer(monkeypatch):
    monkeypatch.setattr(producers, "IDLE_TIMEOUT", 30.0)
    pool, request, clock = ManualPool(), FakeRequest(), Clock()
    producer = ChunkProducer(request, source([b"a"] * 10), pool, reactor=clock)
    producer.start()
    producer.pauseProducing()
    clock.advance(20)
    producer.resumeProducing()  # progress: the timer restarts from zero
    producer.pauseProducing()
    clock.advance(20)
    assert not request.channel.transport.aborted
    clock.advance(11)
    assert request.channel.transport.aborted
