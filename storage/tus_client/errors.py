"""One exception type per way an upload can fail.

Every error carries what the server said (``status``, ``reason``, the parsed
``problem`` body and the response headers) so a caller or the CLI can report
it in one line: ``str(err)`` is ``"507 Insufficient Storage: <detail>"``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

EXTRA_REASONS = {460: "Checksum Mismatch"}


def reason_phrase(status: int) -> str:
    if status in EXTRA_REASONS:
        return EXTRA_REASONS[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown Status"


def parse_problem(body: bytes, content_type: str | None = None) -> Any:
    """The response body as JSON when it is JSON, else as (truncated) text."""
    if not body:
        return None
    text = body.decode("utf-8", "replace")
    if (content_type and "json" in content_type) or text.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text[:2000]


def problem_detail(problem: Any) -> str:
    """The most useful human-readable part of a problem body."""
    if isinstance(problem, dict):
        parts = [str(problem[k]) for k in ("title", "detail", "msg") if problem.get(k)]
        if not parts and problem.get("type"):
            parts = [str(problem["type"])]
        return ": ".join(dict.fromkeys(parts))
    if isinstance(problem, str):
        return " ".join(problem.split())[:300]
    return ""


class TusError(Exception):
    """Base class: something went wrong talking to the tus server."""

    retryable = False
    default_message = "tus upload failed"

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        problem: Any = None,
        headers: Mapping[str, str] | None = None,
        url: str | None = None,
    ) -> None:
        self.status = status
        self.reason = reason_phrase(status) if status is not None else None
        self.problem = problem
        self.headers = dict(headers or {})
        self.url = url
        self.message = message or problem_detail(problem) or self.default_message
        super().__init__(self.message)

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.status} {self.reason}: {self.message}"


class ConnectionFailed(TusError):
    """The network failed (refused, reset, dropped mid-request, timed out)."""

    retryable = True
    default_message = "connection failed"


class ServerError(TusError):
    """A 5xx other than 507 (retried, then raised)."""

    retryable = True
    default_message = "server error"


class OffsetConflict(TusError):
    """409: the server's offset is not the one sent, even after re-reading it."""

    retryable = True
    default_message = "upload offset conflict"


class UploadLocked(TusError):
    """423: another request holds the upload (retried, then raised)."""

    retryable = True
    default_message = "upload is locked by another request"


class ChecksumMismatch(TusError):
    """460: the server computed another checksum for a chunk, every time it was sent."""

    default_message = "checksum mismatch"


class UploadTooLarge(TusError):
    """413: the upload is larger than the server accepts (Tus-Max-Size, quota)."""

    default_message = "upload too large"


class InsufficientStorage(TusError):
    """507: no space left, or the quota scope is full."""

    default_message = "insufficient storage"


class InvalidToken(TusError):
    """403, or 404/400 on a ``?token=`` URL: the upload token is expired, forged or unknown."""

    default_message = "upload token expired or invalid"


class UploadNotFound(TusError):
    """404/410 on a plain tus URL: the upload does not exist (any more)."""

    default_message = "upload not found"


class UploadLengthMismatch(TusError):
    """The upload at the URL was created for another size than the data given."""

    default_message = "upload length does not match the data"


class UnsupportedByServer(TusError):
    """The server lacks what was asked for (tus version, creation, an extension)."""

    default_message = "not supported by the server"


class ProtocolViolation(TusError):
    """The server broke the tus protocol (missing or garbage Upload-Offset,
    an offset that went backwards or past the bytes sent, a 201 without Location)."""

    default_message = "tus protocol violation by the server"


class SourceError(TusError):
    """The local data cannot be read as needed (shrunk file, stream that cannot rewind)."""

    default_message = "cannot read the data to upload"


class UnexpectedStatus(TusError):
    """Any other non-success status."""

    default_message = "unexpected response"


def has_token(url: str) -> bool:
    return "token" in parse_qs(urlsplit(url).query)


def error_for_status(
    status: int, problem: Any, headers: Mapping[str, str], url: str
) -> TusError:
    """Map a non-success response to its exception."""
    kwargs: dict[str, Any] = {"status": status, "problem": problem, "headers": headers, "url": url}
    problem_type = str(problem.get("type", "")) if isinstance(problem, dict) else ""
    if status == 409:
        return OffsetConflict(**kwargs)
    if status == 423:
        return UploadLocked(**kwargs)
    if status == 460:
        return ChecksumMismatch(**kwargs)
    if status == 413:
        return UploadTooLarge(**kwargs)
    if status == 507:
        return InsufficientStorage(**kwargs)
    if status == 403:
        return InvalidToken(**kwargs)
    if status in (404, 410):
        return InvalidToken(**kwargs) if has_token(url) else UploadNotFound(**kwargs)
    if status == 400 and has_token(url) and "invalid-api-params" in problem_type:
        # upstream answers a JWT that fails to decode with 400 invalid-api-params
        return InvalidToken(**kwargs)
    if status == 412:
        return UnsupportedByServer(**kwargs)
    if status >= 500 and status not in (501, 505):
        return ServerError(**kwargs)
    return UnexpectedStatus(**kwargs)
