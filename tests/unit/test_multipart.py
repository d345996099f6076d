"""The incremental multipart parser, fed in every possible split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.artifacts.multipart import MultipartParser, boundary_of
from storage.errors import InvalidAPIParameters

B = "xyzBOUNDARY"


def body(content: bytes, fields: dict[str, str]) -> bytes:
    out = b"preamble\r\n"
    for k, v in fields.items():
        out += f'--{B}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    out += f'--{B}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'.encode() + content
    out += f'\r\n--{B}\r\nContent-Disposition: form-data; name="other"; filename="g"\r\n\r\nSECOND\r\n--{B}--\r\nepilogue'.encode()
    return out


def parse(data: bytes, cuts: list[int]) -> tuple[MultipartParser, bytes, dict]:
    got: list[bytes] = []
    seen: dict = {}
    parser = MultipartParser(B, lambda fields, ctype: seen.update(fields), got.append)
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        parser.feed(data[last:cut])
        last = cut
    return parser, b"".join(got), seen


@given(content=st.binary(max_size=300) | st.sampled_from([b"\r\n--" + B.encode()[:-1], b"\r\n-", b"--" + B.encode()]),
       cuts=st.lists(st.integers(0, 700), max_size=8))
def test_any_split_gives_the_same_file(content: bytes, cuts: list[int]) -> None:
    data = body(content, {"filepath": "a/b.bin"})
    parser, got, fields = parse(data, [c for c in cuts if c < len(data)])
    assert got == content
    assert fields == {"filepath": "a/b.bin"}
    assert parser.complete and parser.file_done


def test_truncated_body_is_not_complete() -> None:
    data = body(b"x" * 100, {})
    parser, _, _ = parse(data[:120], [])
    assert not parser.file_done and not parser.complete


def test_oversized_headers_are_refused() -> None:
    parser = MultipartParser(B, lambda f, c: None, lambda d: None)
    with pytest.raises(InvalidAPIParameters):
        parser.feed(f"--{B}\r\n".encode() + b"X-Junk: " + b"a" * (32 << 10))


def test_boundary_of() -> None:
    assert boundary_of('multipart/form-data; boundary="abc"') == "abc"
    assert boundary_of("multipart/form-data; boundary=abc") == "abc"
    assert boundary_of("application/octet-stream") is None
    assert boundary_of("multipart/form-data") is None
