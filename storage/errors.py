"""Errors with an HTTP meaning.

Every error a client can cause is a ``StorageError`` subclass carrying its
status and RFC 7807 problem type; ``storage.api.problems`` turns them into
``application/problem+json`` responses.  Backends raise these too: they know
no HTTP, only which kind of failure happened.
"""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://api.backend.ai/probs/storage/"


class StorageError(Exception):
    status: int = 500
    problem: str = "generic"
    title: str = "Storage Proxy Error"

    def __init__(self, msg: str | None = None, *, data: Any = None, **extra: Any) -> None:
        super().__init__(msg or self.title)
        self.msg = msg
        self.data = data
        self.extra = extra

    @property
    def problem_type(self) -> str:
        return PROBLEM_BASE + self.problem

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.problem_type, "title": self.title}
        if self.msg:
            body["msg"] = self.msg
        if self.data is not None:
            body["data"] = self.data
        body.update(self.extra)
        return body


class InvalidAPIParameters(StorageError):
    status = 400
    problem = "invalid-api-params"
    title = "Invalid API parameters"

    @classmethod
    def field(cls, name: str, message: str) -> InvalidAPIParameters:
        return cls(f"{name}: {message}", data={name: message})


class RequestTooLarge(StorageError):
    status = 413
    problem = "request-too-large"
    title = "Request Entity Too Large"


class Forbidden(StorageError):
    status = 403
    problem = "forbidden"
    title = "Forbidden"


class InvalidToken(StorageError):
    """A client-API token that is malformed, forged, expired or for another op."""

    status = 403
    problem = "invalid-token"
    title = "Invalid or expired token"


class InvalidVolume(StorageError):
    status = 400
    problem = "volume/invalid"
    title = "Invalid Volume"


class UnsupportedOperation(StorageError):
    status = 400
    problem = "unsupported-operation"
    title = "Unsupported Operation"


class InvalidPath(StorageError):
    """A relpath that is absolute, climbs out, holds NUL, or leads out via a symlink."""

    status = 400
    problem = "invalid-path"
    title = "Invalid Path"


class InvalidSubpath(StorageError):
    status = 400
    problem = "subpath/invalid"
    title = "Invalid Subpath"


class VFolderNotFound(StorageError):
    status = 404
    problem = "vfolder/not-found"
    title = "VFolder Not Found"


class VFolderExists(StorageError):
    status = 409
    problem = "vfolder/already-exists"
    title = "VFolder Already Exists"


class FileNotFound(StorageError):
    status = 404
    problem = "file-not-found"
    title = "File Not Found"


class QuotaScopeNotFound(StorageError):
    status = 404
    problem = "quota/scope/not-found"
    title = "Quota Scope Not Found"


class QuotaScopeExists(StorageError):
    status = 409
    problem = "quota/scope/already-exists"
    title = "Quota Scope Already Exists"


class InvalidQuotaScope(StorageError):
    status = 400
    problem = "quota/scope/invalid"
    title = "Invalid Quota Scope"


class InvalidQuotaConfig(StorageError):
    status = 400
    problem = "quota/config/invalid"
    title = "Invalid Quota Config"


class DeprecatedAPI(StorageError):
    status = 400
    problem = "deprecated-api"
    title = "Deprecated API"


class FileOperationFailed(StorageError):
    """An OSError from a file operation the client asked for (upstream: 400 msg/errno/paths)."""

    status = 400
    problem = "file-operation-failed"
    title = "File Operation Failed"


class InsufficientStorage(StorageError):
    """EDQUOT/ENOSPC: the quota scope or the filesystem is full."""

    status = 507
    problem = "insufficient-storage"
    title = "Insufficient Storage"


class ExecutionError(StorageError):
    status = 500
    problem = "execution/failed"
    title = "Storage Operation Execution Failed"


class ExternalServiceError(StorageError):
    status = 502
    problem = "external/failed"
    title = "External Operation Failed"


class NotFound(StorageError):
    status = 404
    problem = "not-found"
    title = "Not Found"
