"""Property tests of the pure parts: chunk planning, partial splits, backoff,
size and header parsing."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from storage.tus_client.headers import decode_metadata, encode_metadata, parse_offset
from storage.tus_client.planning import (
    RetryPolicy,
    next_chunk,
    parse_size,
    plan_chunks,
    split_parts,
)

sizes = st.integers(min_value=0, max_value=10**13)


@given(size=sizes, data=st.data())
def test_chunks_tile_the_rest_exactly(size, data):
    offset = data.draw(st.integers(0, size))
    # chunk sizes that keep the plan under ~5000 ranges
    smallest = max(1, (size - offset) // 5000)
    chunk = data.draw(st.one_of(st.none(), st.integers(smallest, max(smallest, 10**12))))
    ranges = plan_chunks(size, offset, chunk)
    if offset == size:
        assert ranges == []
        return
    assert ranges[0][0] == offset and ranges[-1][1] == size
    for (_, a_end), (b_start, _) in zip(ranges, ranges[1:], strict=False):
        assert a_end == b_start
    for start, end in ranges:
        assert start < end
        if chunk is not None:
            assert end - start <= chunk
    if chunk is None:
        assert len(ranges) == 1
    else:
        assert all(end - start == chunk for start, end in ranges[:-1])
    assert ranges[0] == next_chunk(offset, size, chunk)


@given(size=st.integers(0, 10**13), parallel=st.integers(1, 64),
       min_part=st.integers(1, 10**9))
def test_parts_split_evenly(size, parallel, min_part):
    parts = split_parts(size, parallel, min_part)
    assert parts[0][0] == 0 and parts[-1][1] == size
    for (_, a_end), (b_start, _) in zip(parts, parts[1:], strict=False):
        assert a_end == b_start
    lengths = [end - start for start, end in parts]
    assert 1 <= len(parts) <= parallel
    assert max(lengths) - min(lengths) <= 1
    if len(parts) > 1:
        assert min(lengths) >= min_part
    if size >= parallel * min_part:
        assert len(parts) == parallel


@given(attempt=st.integers(1, 200), base=st.floats(0.001, 10), cap=st.floats(0.001, 100),
       r=st.floats(0, 1))
def test_backoff_is_full_jitter_and_bounded(attempt, base, cap, r):
    policy = RetryPolicy(base_delay=base, max_delay=cap)
    delay = policy.delay(attempt, lambda: r)
    ceiling = min(cap, base * 2 ** (attempt - 1))
    assert 0 <= delay <= ceiling + 1e-9
    assert delay == r * ceiling


@given(st.integers(1, 10**12), st.sampled_from(["", "b", "k", "K", "KiB", "m", "MB", "g", "G"]))
def test_parse_size(number, unit):
    factor = {"": 1, "b": 1, "k": 1024, "m": 1 << 20, "g": 1 << 30}[unit[:1].lower()]
    assert parse_size(f"{number}{unit}") == number * factor


@given(st.text(max_size=20))
def test_parse_offset_takes_only_plain_decimals(text):
    value = parse_offset(text)
    stripped = text.strip()
    if stripped and len(stripped) <= 19 and all(c in string.digits for c in stripped):
        assert value == int(stripped)
    else:
        assert value is None


keys = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=10)


@given(st.dictionaries(keys, st.binary(max_size=50), max_size=5))
def test_metadata_round_trip(metadata):
    assert decode_metadata(encode_metadata(metadata)) == metadata
