"""Property tests of the tus header parsers: whatever the input, a value or a
400-class StorageError, never another exception."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.api.tus import (
    CHECKSUMS,
    parse_checksum,
    parse_concat_final,
    parse_offset,
    upload_rest,
)
from storage.errors import StorageError


@given(st.integers(0, 2**62))
def test_offsets_round_trip(n):
    assert parse_offset(str(n)) == n


@given(st.text(max_size=30))
def test_offsets_are_digits_or_400(text):
    try:
        value = parse_offset(text)
    except StorageError as exc:
        assert exc.status == 400
    else:
        assert text.isascii() and text.isdigit() and value == int(text)


@given(st.sampled_from(sorted(CHECKSUMS)), st.binary(max_size=200))
def test_checksums_round_trip(algorithm, data):
    digest = hashlib.new(algorithm, data).digest()
    header = f"{algorithm} {base64.b64encode(digest).decode()}"
    assert parse_checksum(header) == (algorithm, digest)


@given(st.text(max_size=80))
def test_checksum_garbage_is_400(text):
    try:
        parse_checksum(text)
    except StorageError as exc:
        assert exc.status == 400


@given(st.lists(st.text(alphabet="0123456789abcdef", min_size=32, max_size=32), min_size=1, max_size=5),
       st.sampled_from(["", "http://proxy:6021", "https://h/prefix"]))
def test_concat_final_accepts_urls_relative_or_absolute(ids, base):
    urls = [f"{base}/upload/{i}?token=t" for i in ids]
    assert parse_concat_final("final;" + " ".join(urls)) == ids


@given(st.text(max_size=120))
def test_concat_final_garbage_is_400(text):
    try:
        parse_concat_final("final;" + text)
    except StorageError as exc:
        assert exc.status == 400


@pytest.mark.parametrize(("path", "rest"), [
    (b"/upload", ""), (b"/upload/", ""), (b"/upload/abc", "abc"), (b"/uploads", None), (b"/download", None),
])
def test_upload_rest(path, rest):
    assert upload_rest(path) == rest
