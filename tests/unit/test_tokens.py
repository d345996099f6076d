"""Client-API tokens carry exactly upstream's claims and reject anything else."""

import time
import uuid

import jwt
import pytest

from storage.errors import InvalidToken
from storage.tokens import (
    issue_archive_token,
    issue_download_token,
    issue_upload_token,
    verify_archive_token,
    verify_download_token,
    verify_upload_token,
)
from storage.vfid import VFolderID

SECRET = "x" * 32
VFID = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")


def claims(token):
    return jwt.decode(token, SECRET, algorithms=["HS256"])


def test_download_token_claims():
    token = issue_download_token(SECRET, 60, volume="local", vfid=VFID, relpath="a/b.txt")
    c = claims(token)
    assert set(c) == {"op", "volume", "vfid", "relpath", "exp"}
    assert c["op"] == "download" and c["vfid"] == str(VFID)
    assert abs(c["exp"] - (time.time() + 60)) < 5
    parsed = verify_download_token(token, SECRET)
    assert (parsed.volume, parsed.vfid, parsed.relpath) == ("local", VFID, "a/b.txt")


def test_upload_token_claims():
    session = uuid.uuid4().hex
    token = issue_upload_token(SECRET, 60, volume="local", vfid=VFID, relpath="x", size=42, session=session)
    c = claims(token)
    assert set(c) == {"op", "volume", "vfid", "relpath", "size", "session", "exp"}
    parsed = verify_upload_token(token, SECRET)
    assert (parsed.size, parsed.session) == (42, session)


def test_archive_token_claims():
    token = issue_archive_token(SECRET, 60, volume="local", vfid=VFID, files=["a", "b/c"], filename=None)
    c = claims(token)
    assert set(c) == {"operation", "volume", "virtual_folder_id", "files", "filename", "exp"}
    parsed = verify_archive_token(token, SECRET)
    assert parsed.files == ["a", "b/c"] and parsed.filename is None


def test_wrong_operation_forged_and_expired_tokens_are_rejected():
    download = issue_download_token(SECRET, 60, volume="local", vfid=VFID, relpath="a")
    with pytest.raises(InvalidToken, match="not an upload token"):
        verify_upload_token(download, SECRET)
    with pytest.raises(InvalidToken):
        verify_archive_token(download, SECRET)
    with pytest.raises(InvalidToken, match="JWT"):
        verify_download_token(download, "another-secret-of-enough-length!!")
    expired = issue_download_token(SECRET, -10, volume="local", vfid=VFID, relpath="a")
    with pytest.raises(InvalidToken, match="expired"):
        verify_download_token(expired, SECRET)
    for garbage in (None, "", "a.b.c", b"\xff", 12):
        with pytest.raises(InvalidToken):
            verify_download_token(garbage, SECRET)


def test_malformed_claims_are_rejected():
    base = {"op": "upload", "volume": "local", "vfid": str(VFID), "relpath": "x", "size": 1,
            "session": uuid.uuid4().hex, "exp": int(time.time()) + 60}
    for key, bad in [("size", "1"), ("size", -1), ("size", True), ("session", "short"), ("vfid", "nope"),
                     ("volume", 3)]:
        token = jwt.encode(dict(base, **{key: bad}), SECRET, algorithm="HS256")
        with pytest.raises(InvalidToken):
            verify_upload_token(token, SECRET)
    no_exp = {k: v for k, v in base.items() if k != "exp"}
    with pytest.raises(InvalidToken):
        verify_upload_token(jwt.encode(no_exp, SECRET, algorithm="HS256"), SECRET)
