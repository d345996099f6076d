"""``StreamSource``: an unseekable stream read front to back can go back as far
as its rewind buffer and no further; a seekable one anywhere."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python.failure import Failure

from storage.tus_client.errors import SourceError
from storage.tus_client.sources import StreamSource


class InlinePool:
    """Runs "thread pool" work at once, so reads fire synchronously."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


class InlineReactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class Pipe(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self.inner = io.BytesIO(data)

    def readable(self):
        return True

    def seekable(self):
        return False

    def read(self, n=-1):
        return self.inner.read(min(n, 1000) if n > 0 else n)  # short reads, like a pipe


def read_now(source, offset, length):
    results = []
    source.read(offset, length).addBoth(results.append)
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


steps = st.lists(st.tuples(st.integers(-5000, 3000), st.integers(0, 4000)), max_size=25)


@given(data=st.binary(min_size=1, max_size=20_000), rewind=st.integers(0, 6000), steps=steps)
def test_unseekable_stream_rewinds_within_its_buffer(data, rewind, steps):
    source = StreamSource(Pipe(data), len(data), InlineReactor(), InlinePool(), rewind=rewind)
    high = 0  # how far the stream has been read
    for delta, length in steps:
        offset = max(0, min(len(data), high + delta))
        if offset < high - rewind:
            with pytest.raises(SourceError):
                read_now(source, offset, length)
            return
        assert read_now(source, offset, length) == data[offset:offset + length]
        high = max(high, min(len(data), offset + length))


@given(data=st.binary(min_size=1, max_size=20_000), steps=steps)
def test_seekable_stream_reads_anywhere(data, steps):
    source = StreamSource(io.BytesIO(data), len(data), InlineReactor(), InlinePool())
    for delta, length in steps:
        offset = max(0, min(len(data), delta if delta >= 0 else len(data) + delta))
        assert read_now(source, offset, length) == data[offset:offset + length]
