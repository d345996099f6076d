"""Resume arithmetic, property-tested against a simulated server.

The simulated server drops connections after random byte counts (keeping the
received bytes or not), fails with 5xx/409 before reading, or loses the 204
after applying a PATCH.  Whatever happens, the client must end with exactly
the right bytes on the server, every PATCH must start at the server's offset
(no byte the server has is ever sent again), and the bytes sent must be the
rest of the upload plus exactly the bytes the server threw away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed

from storage.tus_client.errors import ConnectionFailed, OffsetConflict, ServerError
from storage.tus_client.planning import RetryPolicy
from storage.tus_client.progress import ProgressTracker
from storage.tus_client.sources import BytesSource
from storage.tus_client.transfer import RangeUploader, UploadStatus


@dataclass
class SimulatedServer:
    length: int
    keep_partial: bool
    faults: list[tuple[str, int]]  # consumed one per PATCH: (kind, byte count)
    data: bytearray = field(default_factory=bytearray)
    sent: int = 0  # body bytes that reached the server
    discarded: int = 0  # of those, bytes it did not keep
    patches: int = 0

    async def head(self, url: str) -> UploadStatus:
        return UploadStatus(offset=len(self.data), length=self.length)

    async def patch(self, url, offset, source, start, end, checksum, on_bytes) -> int:
        self.patches += 1
        assert offset == len(self.data), "the client sent bytes the server already had"
        body = await source.read(start, end - start)
        kind, count = self.faults.pop(0) if self.faults else ("ok", 0)
        if kind == "5xx":
            raise ServerError(status=503)
        if kind == "409":
            raise OffsetConflict(status=409)
        if kind == "drop":
            got = body[: min(count, len(body))]
            on_bytes(len(got))
            self.sent += len(got)
            if self.keep_partial:
                self.data += got
            else:
                self.discarded += len(got)
            raise ConnectionFailed("dropped")
        on_bytes(len(body))
        self.sent += len(body)
        self.data += body
        if kind == "lost-response":
            raise ConnectionFailed("the 204 was lost")
        return len(self.data)


faults = st.lists(
    st.tuples(st.sampled_from(["ok", "drop", "drop", "5xx", "409", "lost-response"]),
              st.integers(0, 5000)),
    max_size=30,
)


def run_sync(d: Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "the simulated upload should complete synchronously"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def uploader(server, chunk_size, retries=10_000):
    tracker = ProgressTracker(server.length, None, lambda: 0.0)
    return RangeUploader(server, policy=RetryPolicy(retries=retries), sleep=lambda s: succeed(None),
                         random=lambda: 0.5, chunk_size=chunk_size, checksum_algorithm=None,
                         tracker=tracker), tracker


@given(
    payload=st.binary(min_size=0, max_size=20_000),
    chunk_size=st.one_of(st.none(), st.integers(1, 8000)),
    already=st.floats(0, 1),
    keep_partial=st.booleans(),
    faults=faults,
)
def test_resume_always_ends_with_the_right_bytes(payload, chunk_size, already, keep_partial,
                                                faults):
    server = SimulatedServer(len(payload), keep_partial, list(faults))
    initial = int(len(payload) * already)
    server.data += payload[:initial]
    up, tracker = uploader(server, chunk_size)
    final = run_sync(Deferred.fromCoroutine(up.send("sim://u", BytesSource(payload), 0,
                                                    len(payload))))
    assert final == len(payload)
    assert bytes(server.data) == payload
    assert server.sent == len(payload) - initial + server.discarded
    assert tracker.snapshot().sent == len(payload)


@given(payload=st.binary(min_size=1, max_size=5000), base=st.integers(0, 1000),
       faults=faults)
def test_partial_ranges_map_to_the_right_source_bytes(payload, base, faults):
    """A part uploads source[base:base+len] to offsets 0..len of its own upload."""
    source = BytesSource(b"\0" * base + payload + b"\1" * 7)
    server = SimulatedServer(len(payload), True, list(faults))
    up, _ = uploader(server, 777)
    run_sync(Deferred.fromCoroutine(up.send("sim://p", source, base, len(payload), part=3)))
    assert bytes(server.data) == payload


@given(retries=st.integers(0, 6), extra=st.integers(1, 3))
def test_failures_without_progress_are_bounded(retries, extra):
    server = SimulatedServer(100, False, [("5xx", 0)] * (retries + extra))
    up, _ = uploader(server, None, retries=retries)
    with pytest.raises(ServerError):
        run_sync(Deferred.fromCoroutine(up.send("sim://u", BytesSource(b"x" * 100), 0, 100)))
    assert server.patches == retries + 1


@given(retries=st.integers(1, 4), drops=st.integers(1, 30))
def test_progress_resets_the_failure_budget(retries, drops):
    """Drops that each leave bytes on the server never exhaust the budget."""
    server = SimulatedServer(10_000, True, [("drop", 100)] * drops)
    up, _ = uploader(server, None, retries=retries)
    run_sync(Deferred.fromCoroutine(up.send("sim://u", BytesSource(b"y" * 10_000), 0, 10_000)))
    assert bytes(server.data) == b"y" * 10_000
