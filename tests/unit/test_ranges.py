"""Range parsing and selection, validators and preconditions (storage.api.ranges)."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.api.ranges import (
    UNSATISFIABLE,
    ByteRange,
    RangeSpec,
    Validators,
    check_preconditions,
    if_range_allows,
    make_etag,
    parse_http_date,
    parse_range,
    select_range,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", [RangeSpec(0, 99)]),
        ("bytes=100-", [RangeSpec(100, None)]),
        ("bytes=-500", [RangeSpec(None, 500)]),
        ("BYTES = 1-2 , 5-", [RangeSpec(1, 2), RangeSpec(5, None)]),
        ("bytes=0-0,,-1", [RangeSpec(0, 0), RangeSpec(None, 1)]),
        (b"bytes=7-7", [RangeSpec(7, 7)]),
    ],
)
def test_parse_valid(header, expected):
    assert parse_range(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        None, "", "bytes", "bytes=", "bytes=,", "bytes=-", "bytes=5-3", "bytes=a-b", "bytes=1-2-3",
        "items=0-1", "bytes=0x1-2", "bytes=+1-2", "bytes= 1 -2", "bytes=1.5-2",
        "bytes=" + "9" * 40 + "-", "bytes=" + ",".join(["0-1"] * 100), "bytes=0-1" + " " * 5000,
        "bytes=\u0661-2", "bytes=0-1\n",
    ],
)
def test_parse_invalid_is_ignored(header):
    assert parse_range(header) is None


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_parse_never_raises(garbage):
    result = parse_range(garbage)
    assert result is None or (isinstance(result, list) and result)


specs = st.one_of(
    st.builds(lambda a, d: RangeSpec(a, a + d), st.integers(0, 10**15), st.integers(0, 10**15)),
    st.builds(lambda a: RangeSpec(a, None), st.integers(0, 10**15)),
    st.builds(lambda n: RangeSpec(None, n), st.integers(0, 10**15)),
)


def format_range(spec_list):
    """The header a client sends for ``spec_list``."""
    parts = [f"-{s.last}" if s.first is None else f"{s.first}-{'' if s.last is None else s.last}" for s in spec_list]
    return "bytes=" + ",".join(parts)


@given(st.lists(specs, min_size=1, max_size=10))
def test_parse_round_trips(spec_list):
    assert parse_range(format_range(spec_list)) == spec_list


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-99", 1000, ByteRange(0, 99)),
        ("bytes=990-2000", 1000, ByteRange(990, 999)),
        ("bytes=-100", 1000, ByteRange(900, 999)),
        ("bytes=-5000", 1000, ByteRange(0, 999)),
        ("bytes=0-", 1000, ByteRange(0, 999)),
        ("bytes=1000-", 1000, UNSATISFIABLE),
        ("bytes=-0", 1000, UNSATISFIABLE),
        ("bytes=0-0", 0, UNSATISFIABLE),
        ("bytes=-10", 0, UNSATISFIABLE),
        ("bytes=0-9,10-19", 1000, ByteRange(0, 19)),
        ("bytes=5-9,0-6", 1000, ByteRange(0, 9)),
        ("bytes=0-9,20-29", 1000, None),
        ("bytes=0-9,5000-", 1000, ByteRange(0, 9)),
        ("bytes=5000-,6000-", 1000, UNSATISFIABLE),
        ("garbage", 1000, None),
    ],
)
def test_select(header, size, expected):
    assert select_range(parse_range(header), size) == expected


def _model(spec_list, size):
    """Which bytes the client asked for that exist."""
    wanted = set()
    for s in spec_list:
        if s.first is None:
            wanted |= set(range(max(0, size - s.last), size)) if s.last else set()
        else:
            last = size - 1 if s.last is None else min(s.last, size - 1)
            wanted |= set(range(s.first, last + 1))
    return wanted


small_specs = st.one_of(
    st.builds(lambda a, d: RangeSpec(a, a + d), st.integers(0, 60), st.integers(0, 60)),
    st.builds(lambda a: RangeSpec(a, None), st.integers(0, 60)),
    st.builds(lambda n: RangeSpec(None, n), st.integers(0, 60)),
)


@given(st.lists(small_specs, min_size=1, max_size=5), st.integers(0, 50))
def test_select_agrees_with_a_model(spec_list, size):
    wanted = _model(spec_list, size)
    result = select_range(spec_list, size)
    if not wanted:
        assert result is UNSATISFIABLE
    elif result is None:
        # Several disjoint ranges: the whole file is served.
        assert wanted != set(range(min(wanted), max(wanted) + 1))
    else:
        assert set(range(result.start, result.end + 1)) == wanted
        assert result.content_range(size) == f"bytes {result.start}-{result.end}/{size}"


# -- preconditions ---------------------------------------------------------------

NOW = 1_700_000_000
CURRENT = Validators(etag=make_etag(NOW * 10**9 + 123, 42), mtime=NOW)


def _date(ts):
    return formatdate(ts, usegmt=True)


def test_etag_shape():
    assert make_etag(255, 16) == '"ff-10"'


def test_http_dates():
    assert parse_http_date(_date(NOW)) == NOW
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == 784111777
    assert parse_http_date("Sun Nov  6 08:49:37 1994") is None  # no zone: refused
    for bad in (None, "", "yesterday", "x" * 200, "Sun, 99 Nov 1994 08:49:37 GMT"):
        assert parse_http_date(bad) is None


@given(st.text(max_size=120))
def test_http_date_never_raises(text):
    parse_http_date(text)


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", {}, None),
        ("GET", {"if-none-match": CURRENT.etag}, 304),
        ("HEAD", {"if-none-match": f'"x", W/{CURRENT.etag}'}, 304),
        ("GET", {"if-none-match": "*"}, 304),
        ("GET", {"if-none-match": '"other"'}, None),
        ("GET", {"if-none-match": '"other"', "if-modified-since": _date(NOW)}, None),
        ("GET", {"if-modified-since": _date(NOW)}, 304),
        ("GET", {"if-modified-since": _date(NOW - 1)}, None),
        ("GET", {"if-modified-since": "garbage"}, None),
        ("GET", {"if-match": CURRENT.etag}, None),
        ("GET", {"if-match": f"W/{CURRENT.etag}"}, 412),
        ("GET", {"if-match": '"other"'}, 412),
        ("GET", {"if-match": "*"}, None),
        ("GET", {"if-unmodified-since": _date(NOW - 1)}, 412),
        ("GET", {"if-unmodified-since": _date(NOW)}, None),
        ("GET", {"if-match": CURRENT.etag, "if-unmodified-since": _date(NOW - 1)}, None),
    ],
)
def test_preconditions(method, headers, expected):
    assert check_preconditions(method, headers, CURRENT) == expected


def test_if_range():
    assert if_range_allows(None, CURRENT)
    assert if_range_allows(CURRENT.etag, CURRENT)
    assert not if_range_allows('"other"', CURRENT)
    assert not if_range_allows(f"W/{CURRENT.etag}", CURRENT)
    assert if_range_allows(_date(NOW), CURRENT)
    assert not if_range_allows(_date(NOW - 1), CURRENT)
    assert not if_range_allows("garbage", CURRENT)


tag_text = st.text(alphabet="abcdef0123456789-,", min_size=1, max_size=12)


@given(st.lists(st.tuples(st.booleans(), st.one_of(tag_text, st.just(CURRENT.etag[1:-1]))), max_size=6))
def test_etag_lists_match_like_a_model(tags):
    """If-None-Match matches our tag weakly (W/ or not), If-Match only strongly,
    whatever else the list holds (commas inside quotes included)."""
    header = ", ".join(f'{"W/" if weak else ""}"{text}"' for weak, text in tags)
    ours = CURRENT.etag[1:-1]
    weak_hit = any(text == ours for _, text in tags)
    strong_hit = any(text == ours and not weak for weak, text in tags)
    assert check_preconditions("GET", {"if-none-match": header}, CURRENT) == (304 if weak_hit else None)
    assert check_preconditions("GET", {"if-match": header}, CURRENT) == (None if strong_hit else 412)
