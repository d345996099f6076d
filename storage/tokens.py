"""Client-API session tokens: HS256 JWTs with exactly upstream's claims.

The manager API issues them (``/folder/file/download``, ``/upload``,
``/archive-download-token``); the client API verifies them.  A token that is
malformed, forged, expired or for another operation is ``InvalidToken``
(403 problem+json) before anything is read or written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from storage.errors import InvalidToken
from storage.vfid import InvalidID, VFolderID

ALGORITHM = "HS256"


@dataclass(frozen=True)
class DownloadToken:
    volume: str
    vfid: VFolderID
    relpath: str
    archive: bool = False
    unmanaged_path: str | None = None


@dataclass(frozen=True)
class UploadToken:
    volume: str
    vfid: VFolderID
    relpath: str
    size: int
    session: str
    exp: int


@dataclass(frozen=True)
class ArchiveToken:
    volume: str
    vfid: VFolderID
    files: list[str]
    filename: str | None


def _encode(claims: dict[str, Any], secret: str, expire: int) -> str:
    claims = dict(claims, exp=int(time.time()) + int(expire))
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def issue_download_token(secret: str, expire: int, *, volume: str, vfid: VFolderID, relpath: str) -> str:
    return _encode({"op": "download", "volume": volume, "vfid": str(vfid), "relpath": relpath}, secret, expire)


def issue_upload_token(
    secret: str, expire: int, *, volume: str, vfid: VFolderID, relpath: str, size: int, session: str
) -> str:
    claims = {"op": "upload", "volume": volume, "vfid": str(vfid), "relpath": relpath, "size": size, "session": session}
    return _encode(claims, secret, expire)


def issue_archive_token(
    secret: str, expire: int, *, volume: str, vfid: VFolderID, files: list[str], filename: str | None
) -> str:
    claims = {
        "operation": "download",
        "volume": volume,
        "virtual_folder_id": str(vfid),
        "files": list(files),
        "filename": filename,
    }
    return _encode(claims, secret, expire)


def _decode(token: object, secret: str) -> dict[str, Any]:
    if isinstance(token, bytes):
        token = token.decode("ascii", "replace")
    if not isinstance(token, str) or not token:
        raise InvalidToken("a token query parameter is required")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise InvalidToken("the token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(f"cannot decode the given value as JWT: {exc}") from None
    if not isinstance(claims, dict):
        raise InvalidToken("the token's claims are not an object")
    return claims


def _claim(claims: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = claims.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise InvalidToken(f"the token's {name!r} claim is missing or malformed")
    return value


def _vfid(claims: dict[str, Any], name: str) -> VFolderID:
    try:
        return VFolderID.parse(_claim(claims, name, str))
    except InvalidID as exc:
        raise InvalidToken(f"the token's {name!r} claim is malformed: {exc}") from None


def verify_download_token(token: object, secret: str) -> DownloadToken:
    claims = _decode(token, secret)
    if claims.get("op") != "download":
        raise InvalidToken("not a download token")
    unmanaged = claims.get("unmanaged_path")
    return DownloadToken(
        volume=_claim(claims, "volume", str),
        vfid=_vfid(claims, "vfid"),
        relpath=_claim(claims, "relpath", str),
        archive=bool(claims.get("archive", False)),
        unmanaged_path=unmanaged if isinstance(unmanaged, str) else None,
    )


def verify_upload_token(token: object, secret: str) -> UploadToken:
    claims = _decode(token, secret)
    if claims.get("op") != "upload":
        raise InvalidToken("not an upload token")
    size = _claim(claims, "size", int)
    session = _claim(claims, "session", str)
    if size < 0 or len(session) != 32 or any(c not in "0123456789abcdef" for c in session):
        raise InvalidToken("the token's size or session claim is malformed")
    return UploadToken(
        volume=_claim(claims, "volume", str),
        vfid=_vfid(claims, "vfid"),
        relpath=_claim(claims, "relpath", str),
        size=size,
        session=session,
        exp=_claim(claims, "exp", int),
    )


def verify_archive_token(token: object, secret: str) -> ArchiveToken:
    claims = _decode(token, secret)
    if claims.get("operation") != "download":
        raise InvalidToken("not an archive download token")
    files = _claim(claims, "files", list)
    if not files or not all(isinstance(f, str) for f in files):
        raise InvalidToken("the token's 'files' claim must be a non-empty list of paths")
    filename = claims.get("filename")
    return ArchiveToken(
        volume=_claim(claims, "volume", str),
        vfid=_vfid(claims, "virtual_folder_id"),
        files=files,
        filename=filename if isinstance(filename, str) else None,
    )
