"""vfolder and quota scope IDs: both textual forms and upstream's on-disk layout."""

import uuid
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.vfid import InvalidID, QuotaScopeID, VFolderID


def test_scoped_vfid_layout():
    qs, folder = uuid.uuid4(), uuid.uuid4()
    vfid = VFolderID.parse(f"user:{qs}/{folder.hex}")
    assert vfid.quota_scope_id == QuotaScopeID("user", qs)
    h = folder.hex
    assert vfid.relative_path() == PurePosixPath(qs.hex, h[:2], h[2:4], h[4:])
    assert str(vfid) == f"user:{qs}/{h}"


def test_bare_vfid_layout():
    folder = uuid.uuid4()
    vfid = VFolderID.parse(str(folder))
    assert vfid.quota_scope_id is None
    h = folder.hex
    assert vfid.relative_path() == PurePosixPath(h[:2], h[2:4], h[4:])
    assert str(vfid) == str(folder)


@pytest.mark.parametrize(
    "text",
    ["", "user:", "group:" + str(uuid.uuid4()), "user:nope/abc", "nope", None, 5, "user:/" + uuid.uuid4().hex],
)
def test_invalid_vfids(text):
    with pytest.raises(InvalidID):
        VFolderID.parse(text)


@given(st.sampled_from(["user", "project"]), st.uuids(), st.uuids())
def test_vfid_round_trip(scope, qs, folder):
    vfid = VFolderID(QuotaScopeID(scope, qs), folder)
    assert VFolderID.parse(str(vfid)) == vfid
    assert QuotaScopeID.parse(str(vfid.quota_scope_id)) == vfid.quota_scope_id


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_invalid_id(text):
    try:
        VFolderID.parse(text)
    except InvalidID:
        pass


@pytest.mark.parametrize("text", [
    "{%s}" % ("a" * 32), "urn:uuid:" + "a" * 32, " " + "a" * 31, "a" * 16 + "_" + "a" * 15,
    "a" * 31 + "\n", "a-" * 16, "+" + "a" * 31,
])
def test_only_32_hex_digits_optionally_hyphenated_are_a_uuid(text: str) -> None:
    # uuid.UUID() takes all of these; the id names a directory, so only the
    # forms the manager sends are accepted.
    with pytest.raises(InvalidID):
        VFolderID.parse(text)
    with pytest.raises(InvalidID):
        QuotaScopeID.parse(f"user:{text}")
    with pytest.raises(InvalidID):
        VFolderID.parse(f"user:{uuid.uuid4()}/{text}")


@given(st.uuids(), st.uuids(), st.booleans())
def test_canonical_and_hex_forms_parse(scope: uuid.UUID, folder: uuid.UUID, hyphens: bool) -> None:
    text = f"project:{scope}/{folder if hyphens else folder.hex}"
    vfid = VFolderID.parse(text)
    assert vfid.folder_id == folder and vfid.quota_scope_id == QuotaScopeID("project", scope)
    assert VFolderID.parse(str(vfid)) == vfid
