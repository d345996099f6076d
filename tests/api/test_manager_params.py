"""Property tests of the manager API's body parsing (``storage.api.params``)."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import PurePosixPath
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.api import params as p
from storage.errors import InvalidAPIParameters, RequestTooLarge


class FakeRequest:
    def __init__(self, body: bytes, content_length: str | None = None) -> None:
        self.content = io.BytesIO(body)
        self._length = content_length

    def getHeader(self, name: bytes) -> str | None:  # noqa: N802 - Twisted's name
        return self._length if name.lower() == b"content-length" else None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@given(json_values)
def test_any_json_round_trips(value: Any) -> None:
    body = json.dumps(value).encode()
    assert p.read_json_body(FakeRequest(body), 1 << 20) == value


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_give_invalid_params(body: bytes) -> None:
    try:
        p.read_json_body(FakeRequest(body), 1 << 20)
    except InvalidAPIParameters as exc:
        assert exc.status == 400 and "body" in exc.data


@given(st.integers(min_value=0, max_value=4096), st.integers(min_value=1, max_value=4096))
def test_the_body_cap_is_exact(size: int, cap: int) -> None:
    body = b" " * size
    if size > cap:
        with pytest.raises(RequestTooLarge):
            p.read_json_body(FakeRequest(body), cap)
    else:
        assert p.read_json_body(FakeRequest(body), cap) is None


def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    with pytest.raises(RequestTooLarge):
        p.read_json_body(FakeRequest(b"{}", content_length="999999"), 1000)


def test_deep_nesting_is_a_400_not_a_crash() -> None:
    with pytest.raises(InvalidAPIParameters):
        p.read_json_body(FakeRequest(b"[" * 200000 + b"]" * 200000), 1 << 20)


FIELDS = (
    p.Field("volume", p.volume_name),
    p.Field("vfid", p.vfolder_id),
    p.Field("relpath", p.relpath),
    p.Field("parents", p.boolean, True),
)


@given(
    present=st.sets(st.sampled_from(["volume", "vfid", "relpath", "parents"])),
    extra=st.sets(st.text(min_size=1, max_size=8).filter(lambda k: k not in {"volume", "vfid", "relpath", "parents"}),
                  max_size=3),
)
def test_missing_and_unknown_keys_are_all_named(present: set[str], extra: set[str]) -> None:
    good = {"volume": "local", "vfid": f"user:{uuid.uuid4()}/{uuid.uuid4().hex}", "relpath": "a/b", "parents": "no"}
    raw = {k: good[k] for k in present} | {k: 1 for k in extra}
    missing = {"volume", "vfid", "relpath"} - present
    if not missing and not extra:
        out = p.parse_params(raw, FIELDS)
        assert out["volume"] == "local"
        assert out["relpath"] == PurePosixPath("a/b")
        assert out["parents"] is ("parents" not in present)
        return
    with pytest.raises(InvalidAPIParameters) as info:
        p.parse_params(raw, FIELDS)
    data = info.value.data
    assert set(data) == missing | extra
    assert all(data[k] == "is required" for k in missing)


@given(json_values.filter(lambda v: not isinstance(v, (dict, type(None)))))
def test_a_body_that_is_not_an_object_is_named_body(value: Any) -> None:
    with pytest.raises(InvalidAPIParameters) as info:
        p.parse_params(value, FIELDS)
    assert set(info.value.data) == {"body"}


@given(st.integers())
def test_integers_and_their_strings(n: int) -> None:
    assert p.integer(n) == n
    if abs(n) < 10**30:
        assert p.integer(str(n)) == n


@given(json_values.filter(lambda v: not isinstance(v, (int, str, float)) or isinstance(v, bool)))
def test_non_integers_are_refused(value: Any) -> None:
    with pytest.raises(p.ParamError):
        p.integer(value)


@given(st.sampled_from(sorted(p._TRUE | p._FALSE)), st.booleans())
def test_boolean_words(word: str, upper: bool) -> None:
    assert p.boolean(word.upper() if upper else word) is (word in p._TRUE)


# 0.0 and 1.0 are 0 and 1 in JSON (and in JSON Schema's enum [0, 1]): booleans too.
@given(json_values.filter(lambda v: not isinstance(v, (bool, int, str)) and not (isinstance(v, float) and v in (0, 1))))
def test_non_booleans_are_refused(value: Any) -> None:
    with pytest.raises(p.ParamError):
        p.boolean(value)


@given(st.text(max_size=300))
def test_relpath_never_escapes(text: str) -> None:
    try:
        path = p.relpath(text)
    except p.ParamError:
        return
    assert not path.is_absolute()
    assert ".." not in path.parts
    assert "\x00" not in str(path)


@given(st.lists(st.just("a"), max_size=80))
def test_mkdir_batches_are_capped_at_50(paths: list[str]) -> None:
    if 1 <= len(paths) <= 50:
        assert len(p.mkdir_relpaths(paths)) == len(paths)
    else:
        with pytest.raises(p.ParamError):
            p.mkdir_relpaths(paths)


@given(st.text(max_size=300))
def test_archive_filenames(name: str) -> None:
    try:
        out = p.archive_filename(name)
    except p.ParamError:
        bad = (not name.strip() or name in (".", "..") or len(name) > 255
               or any(c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in name))
        assert bad
        return
    assert out == name
    assert "/" not in name and "\\" not in name and name not in (".", "..")


@given(st.text(max_size=20))
def test_file_names_are_single_components(name: str) -> None:
    try:
        out = p.file_name(name)
    except p.ParamError:
        return
    assert "/" not in out and out not in ("", ".", "..")


@given(st.uuids(), st.uuids(), st.sampled_from(["user", "project"]))
def test_both_vfid_forms(qs: uuid.UUID, folder: uuid.UUID, scope: str) -> None:
    full = p.vfolder_id(f"{scope}:{qs}/{folder.hex}")
    assert full.folder_id == folder and full.quota_scope_id is not None
    bare = p.vfolder_id(str(folder))
    assert bare.folder_id == folder and bare.quota_scope_id is None


@given(st.text(max_size=40))
def test_garbage_vfids_are_param_errors(text: str) -> None:
    try:
        p.vfolder_id(text)
    except p.ParamError:
        pass


@pytest.mark.parametrize("value,expected", [(0, 0), ("10g", 10 << 30), ("512m", 512 << 20), (1.0, 1)])
def test_binary_sizes(value: Any, expected: int) -> None:
    assert p.binary_size(value) == expected


@pytest.mark.parametrize("value", [-1, "lots", None, [], True])
def test_bad_binary_sizes(value: Any) -> None:
    with pytest.raises(p.ParamError):
        p.binary_size(value)


@pytest.mark.parametrize("text", ["+-5", "--5", "²", "٣", "1_0", "0x10", "", "+"])
def test_integer_text_other_than_ascii_digits_is_a_param_error(text: str) -> None:
    # "+-5" and "²" passed the old isdigit() check and made int() raise
    # ValueError: a 500 instead of a 400 (found by schemathesis).
    with pytest.raises(p.ParamError):
        p.integer(text)


@given(st.integers(min_value=-(10**39), max_value=10**39), st.sampled_from(["", " ", "\t", "\n"]))
def test_integer_text_of_ascii_digits_is_its_value(number: int, pad: str) -> None:
    assert p.integer(f"{pad}{number}{pad}") == number
    if number >= 0:
        assert p.integer(f"+{number}") == number


@pytest.mark.parametrize(("value", "expected"), [(0.0, False), (1.0, True), (-0.0, False)])
def test_the_json_numbers_zero_and_one_are_booleans_also_as_floats(value: float, expected: bool) -> None:
    assert p.boolean(value) is expected
