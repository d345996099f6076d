"""tus precedence and token/upload agreement at PATCH (issue 9).

tus 1.0 core: a request without a supported Tus-Resumable gets 412 and is not
processed; a PATCH body must be application/offset+octet-stream (415); a
mismatched Upload-Offset MUST get 409 without touching the upload, so it
comes before every check of the body (413 for a body past Upload-Length).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import jwt
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.tus_harness import OCTETS, SECRET, TUS, Connection, TusHarness

from storage.tokens import issue_upload_token
from storage.uploads import create_upload, new_session_id, read_state, staging_path
from storage.vfid import VFolderID

SIZE = 10
DONE = b"abc"  # already uploaded: the upload's offset is 3


def expected_status(no_tus: bool, wrong_type: bool, bad_offset_syntax: bool, wrong_offset: bool,
                    changed_length: bool, too_long: bool) -> int:
    """The tus 1.0 core's order: an unsupported version is not processed at
    all, then the request's form (media type, header syntax), then the
    upload's offset (409 without touching the upload), and only then what
    the request says of the body (its declared length, its size)."""
    if no_tus:
        return 412
    if wrong_type:
        return 415
    if bad_offset_syntax:
        return 400
    if wrong_offset:
        return 409
    if changed_length:
        return 400
    if too_long:
        return 413
    return 204


def send_patch(h: TusHarness, token: str, headers: dict[str, str], body: bytes, chunked: bool):
    if not chunked:
        return h.request("PATCH", f"/upload?token={token}", headers, body)
    conn = Connection(h)
    conn.send_head("PATCH", f"/upload?token={token}", dict(headers, **{"Transfer-Encoding": "chunked"}), None)
    for i in range(0, len(body), 4):
        piece = body[i:i + 4]
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    conn.send(b"0\r\n\r\n")
    responses = conn.responses()
    assert len(responses) == 1, responses
    return responses[0]


@settings(max_examples=80, deadline=None)
@given(
    no_tus=st.booleans(),
    wrong_type=st.one_of(st.none(), st.sampled_from(["application/octet-stream", "text/plain", ""])),
    offset=st.one_of(
        st.just(str(len(DONE))),
        st.integers(min_value=0, max_value=2 * SIZE).map(str),
        st.sampled_from(["-1", "x", "3.0", ""]),
    ),
    declared=st.sampled_from([None, SIZE, SIZE + 1, 0]),
    body_len=st.integers(min_value=0, max_value=2 * SIZE),
    chunked=st.booleans(),
)
# The issue's case (a wrong offset with a body past the length), and each rule alone.
@example(no_tus=False, wrong_type=None, offset="0", declared=None, body_len=SIZE, chunked=False)
@example(no_tus=False, wrong_type=None, offset="0", declared=None, body_len=SIZE, chunked=True)
@example(no_tus=False, wrong_type=None, offset=str(len(DONE)), declared=SIZE + 1, body_len=1, chunked=False)
@example(no_tus=False, wrong_type=None, offset="0", declared=SIZE + 1, body_len=SIZE, chunked=False)
@example(no_tus=False, wrong_type="text/plain", offset="x", declared=0, body_len=SIZE, chunked=False)
@example(no_tus=False, wrong_type=None, offset=str(len(DONE)), declared=SIZE, body_len=SIZE - len(DONE), chunked=True)
def test_patch_errors_answer_by_tus_precedence(no_tus, wrong_type, offset, declared, body_len, chunked):
    with tempfile.TemporaryDirectory() as tmp:
        h = TusHarness(Path(tmp))
        token, session = h.new_upload(SIZE)
        assert h.patch(token, 0, DONE).status == 204
        headers = dict(OCTETS, **{"Upload-Offset": offset})
        if no_tus:
            del headers["Tus-Resumable"]
        if wrong_type is not None:
            headers["Content-Type"] = wrong_type
        if declared is not None:
            headers["Upload-Length"] = str(declared)
        body = b"x" * body_len
        r = send_patch(h, token, headers, body, chunked)
        want = expected_status(
            no_tus, wrong_type is not None, not offset.isdigit(), offset.isdigit() and int(offset) != len(DONE),
            declared not in (None, SIZE), len(DONE) + body_len > SIZE,
        )
        assert r.status == want, (r.status, r.body)
        if want != 204:
            assert staging_path(h.vfolder, session).read_bytes() == DONE
            assert read_state(h.vfolder, session).offset == len(DONE)
        if want == 409:
            assert r.header("Upload-Offset") == str(len(DONE))
        if want == 412:
            assert r.header("Tus-Version") == "1.0.0"
        if want == 204:
            done = h.target() if len(DONE) + body_len == SIZE else staging_path(h.vfolder, session)
            assert done.read_bytes() == DONE + body


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


def test_a_token_with_another_relpath_cannot_create_or_concatenate(tmp_path):
    """Creation and concatenation write bytes too: a token that disagrees with
    its upload gets 403 there as well (it got 201 and wrote the joined file)."""
    h = TusHarness(tmp_path)
    token, session = h.new_upload(SIZE)
    other = reissue(token, relpath="elsewhere/evil.bin")
    length = {"Upload-Length": str(SIZE)}
    r = h.request("POST", f"/upload?token={other}", dict(TUS, **length), b"")
    assert r.status == 403, (r.status, r.body)
    r = h.request("POST", f"/upload?token={other}", dict(TUS, **length, **{"Upload-Concat": "partial"}), b"")
    assert r.status == 403, (r.status, r.body)
    assert sorted(p.name for p in (h.vfolder / ".upload").iterdir()) == sorted([session, session + ".state"])
    # A part made with the right token, then joined with the wrong one.
    r = h.request("POST", f"/upload?token={token}", dict(TUS, **length, **{"Upload-Concat": "partial"}), b"")
    assert r.status == 201
    part = r.header("Location").split("?")[0].rsplit("/", 1)[1]
    assert h.patch(token, 0, b"0123456789", rest=part).status == 204
    final = {"Upload-Concat": f"final;/upload/{part}"}
    assert_refused_untouched(h, session, h.request("POST", f"/upload?token={other}", dict(TUS, **final), b""))
    assert not h.target().exists() and not h.target("elsewhere/evil.bin").exists()
    r = h.request("POST", f"/upload?token={token}", dict(TUS, **final), b"")
    assert r.status == 201, (r.status, r.body)
    assert h.target().read_bytes() == b"0123456789"


def test_a_disagreeing_token_learns_nothing_of_the_upload(tmp_path):
    """403 comes before the offset check: no 409 telling the upload's offset."""
    h = TusHarness(tmp_path)
    token, session = h.new_upload(SIZE)
    other = reissue(token, relpath="elsewhere/evil.bin")
    r = h.patch(other, 5, b"01234")
    assert r.status == 403, (r.status, r.body)
    assert r.header("Upload-Offset") is None
    assert_refused_untouched(h, session, r)
