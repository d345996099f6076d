"""tus precedence and token/upload agreement at PATCH (issue 9).

tus 1.0 core: a request without a supported Tus-Resumable gets 412 and is not
processed; a PATCH body must be application/offset+octet-stream (415); a
mismatched Upload-Offset MUST get 409 without touching the upload, so it
comes before every check of the body (413 for a body past Upload-Length).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import jwt
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "web"))

from tus_harness import OCTETS, SECRET, TusHarness  # noqa: E402

from storage.tokens import issue_upload_token  # noqa: E402
from storage.uploads import create_upload, new_session_id, read_state, staging_path  # noqa: E402
from storage.vfid import VFolderID  # noqa: E402

SIZE = 10
DONE = b"abc"  # already uploaded: the upload's offset is 3


def expected_status(no_tus: bool, wrong_type: bool, wrong_offset: bool, too_long: bool) -> int:
    if no_tus:
        return 412
    if wrong_type:
        return 415
    if wrong_offset:
        return 409
    if too_long:
        return 413
    return 204


@settings(max_examples=60, deadline=None)
@given(
    no_tus=st.booleans(),
    wrong_type=st.sampled_from([None, "application/octet-stream", "text/plain", ""]),
    offset=st.integers(min_value=0, max_value=2 * SIZE),
    body_len=st.integers(min_value=0, max_value=2 * SIZE),
)
def test_patch_errors_answer_by_tus_precedence(no_tus, wrong_type, offset, body_len):
    with tempfile.TemporaryDirectory() as tmp:
        h = TusHarness(Path(tmp))
        token, session = h.new_upload(SIZE)
        assert h.patch(token, 0, DONE).status == 204
        headers = dict(OCTETS, **{"Upload-Offset": str(offset)})
        if no_tus:
            del headers["Tus-Resumable"]
        if wrong_type is not None:
            headers["Content-Type"] = wrong_type
        body = b"x" * body_len
        r = h.request("PATCH", f"/upload?token={token}", headers, body)
        want = expected_status(no_tus, wrong_type is not None, offset != len(DONE), len(DONE) + body_len > SIZE)
        assert r.status == want, (r.status, r.body)
        if want != 204:
            assert staging_path(h.vfolder, session).read_bytes() == DONE
            assert read_state(h.vfolder, session).offset == len(DONE)
        if want == 409:
            assert r.header("Upload-Offset") == str(len(DONE))
        if want == 412:
            assert r.header("Tus-Version") == "1.0.0"


def test_wrong_offset_with_a_body_past_the_length_is_409_not_413(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(4)
    assert h.patch(token, 0, b"ab").status == 204
    r = h.patch(token, 0, b"abcdef")
    assert r.status == 409
    assert r.header("Upload-Offset") == "2"
    assert staging_path(h.vfolder, session).read_bytes() == b"ab"


# -- a token must agree with the upload it names ----------------------------------------


def claims_of(token: str) -> dict:
    return jwt.decode(token, SECRET, algorithms=["HS256"])


def reissue(token: str, **changes) -> str:
    c = dict(claims_of(token), **changes)
    return issue_upload_token(
        SECRET, 3600, volume=c["volume"], vfid=VFolderID.parse(c["vfid"]), relpath=c["relpath"],
        size=c["size"], session=c["session"],
    )


def assert_refused_untouched(h: TusHarness, session: str, r) -> None:
    assert r.status == 403, (r.status, r.body)
    assert r.header("content-type") == "application/problem+json"
    assert staging_path(h.vfolder, session).read_bytes() == b""
    assert read_state(h.vfolder, session).offset == 0


def test_a_token_with_another_relpath_is_403_before_any_byte(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(SIZE)
    other = reissue(token, relpath="elsewhere/evil.bin")
    assert_refused_untouched(h, session, h.patch(other, 0, b"0123456789"))
    assert h.head(other).status == 403
    assert not h.target().exists() and not h.target("elsewhere/evil.bin").exists()
    assert h.patch(token, 0, b"0123456789").status == 204  # the right token still works


def test_a_token_with_another_size_is_403_before_any_byte(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(SIZE)
    bigger = reissue(token, size=SIZE + 5)
    assert_refused_untouched(h, session, h.patch(bigger, 0, b"012345678901234"))
    smaller = reissue(token, size=4)
    assert_refused_untouched(h, session, h.patch(smaller, 0, b"0123"))


def test_a_token_with_another_vfolder_is_403_before_any_byte(tmp_path):
    """The session's files seen under a second vfolder (e.g. copied or shared)."""
    h = TusHarness(tmp_path)
    session = new_session_id()
    create_upload(h.vfolder, session, "data/file.bin", SIZE, extra={"vfid": str(h.vfid), "volume": "local"})
    other_vfid = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")
    other = h.volume.vfolder_path(other_vfid)
    other.mkdir(parents=True)
    shutil.copytree(h.vfolder / ".upload", other / ".upload")
    token = issue_upload_token(SECRET, 3600, volume="local", vfid=other_vfid, relpath="data/file.bin",
                               size=SIZE, session=session)
    r = h.patch(token, 0, b"0123456789")
    assert r.status == 403, (r.status, r.body)
    assert staging_path(other, session).read_bytes() == b""
    assert not (other / "data").exists()
