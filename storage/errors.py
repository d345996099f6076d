"""Errors with an HTTP meaning.

Every error a client can cause is a ``StorageError`` subclass carrying its
status and RFC 7807 problem type; ``storage.api.problems`` turns them into
``application/problem+json`` responses.  Backends raise these too: they know
no HTTP, only which kind of failure happened.

Every body carries ``error_code`` (``<domain>_<operation>_<detail>``, as
upstream's ``BackendAIError``).  The manager's storage-proxy client picks its
exception from the code's domain and the status alone: ``quota-scope`` with
404 is ``QuotaScopeNotFoundError``; ``vfolder`` (or a missing code) maps the
status to ``VFolderBadRequest``/``VFolderNotFound``/``VFolderGone``/
``VFolderOperationFailed``; any other domain is
``UnexpectedStorageProxyResponseError``.  So each class carries upstream's
code where upstream's answer has one, and a ``vfolder`` code where upstream
answers the same case without one (its plain JSON bodies), so that the
manager raises what it raises for upstream.  ``client_error_code`` is the
code on the client-facing API where upstream's client API uses another one.
The table is in ``docs/manager-api.md``.
"""

from __future__ import annotations

import errno
from typing import Any


class ConfigError(Exception):
    """One invalid setting: ``str(exc)`` is the whole message for the operator.

    Raised at start-up, never answered over HTTP; it lives here (importable
    as ``storage.config.ConfigError`` too) so that ``storage.config``'s helper
    modules (``artifact_config``, ``events.settings``) need not import it back."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}")
        self.key = key
        self.problem = problem

PROBLEM_BASE = "https://api.backend.ai/probs/storage/"


class StorageError(Exception):
    status: int = 500
    problem: str = "generic"
    title: str = "Storage Proxy Error"
    error_code: str = "storage-proxy_generic_internal-error"
    client_error_code: str | None = None  # None: the same as error_code

    def __init__(self, msg: str | None = None, *, data: Any = None, **extra: Any) -> None:
        super().__init__(msg or self.title)
        self.msg = msg
        self.data = data
        self.extra = extra

    @property
    def problem_type(self) -> str:
        return PROBLEM_BASE + self.problem

    def code(self, *, client: bool = False) -> str:
        if client and self.client_error_code is not None:
            return self.client_error_code
        return self.error_code

    def body(self, *, client: bool = False) -> dict[str, Any]:
        """The problem body; ``client`` for the client-facing API's error code."""
        body: dict[str, Any] = {"type": self.problem_type, "title": self.title, "error_code": self.code(client=client)}
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
    # upstream's parameter check answers without a code: VFolderBadRequest
    error_code = "vfolder_request_invalid-parameters"
    client_error_code = "storage-proxy_request_invalid-parameters"

    @classmethod
    def field(cls, name: str, message: str) -> InvalidAPIParameters:
        return cls(f"{name}: {message}", data={name: message})


class RequestTooLarge(StorageError):
    status = 413
    problem = "request-too-large"
    title = "Request Entity Too Large"
    # upstream: aiohttp's text/plain 413
    error_code = "vfolder_request_bad-request"


class Forbidden(StorageError):
    status = 403
    problem = "forbidden"
    title = "Forbidden"
    # upstream's auth middleware answers without a code
    error_code = "vfolder_auth_forbidden"


class InvalidToken(StorageError):
    """A client-API token that is malformed, forged, expired or for another op."""

    status = 403
    problem = "invalid-token"
    title = "Invalid or expired token"
    error_code = "storage-proxy_auth_unauthorized"


class InvalidVolume(StorageError):
    status = 400
    problem = "volume/invalid"
    title = "Invalid Volume"
    # upstream's InvalidVolumeError
    error_code = "storage_access_invalid-parameters"


class UnsupportedOperation(StorageError):
    status = 400
    problem = "unsupported-operation"
    title = "Unsupported Operation"
    # upstream (check_params) answers without a code
    error_code = "vfolder_request_not-implemented"


class InvalidPath(StorageError):
    """A relpath that is absolute, climbs out, holds NUL, or leads out via a symlink."""

    status = 400
    problem = "invalid-path"
    title = "Invalid Path"
    # upstream: InvalidSubpathError (manager API), InvalidPathError (client API)
    error_code = "vfolder_access_invalid-parameters"
    client_error_code = "storage-proxy_access_invalid-parameters"


class InvalidSubpath(StorageError):
    status = 400
    problem = "subpath/invalid"
    title = "Invalid Subpath"
    # upstream's InvalidSubpathError
    error_code = "vfolder_access_invalid-parameters"


class VFolderNotFound(StorageError):
    status = 404
    problem = "vfolder/not-found"
    title = "VFolder Not Found"
    # upstream's VFolderNotFoundError
    error_code = "vfolder_read_not-found"


class VFolderExists(StorageError):
    status = 409
    problem = "vfolder/already-exists"
    title = "VFolder Already Exists"
    # upstream: a text/plain 500
    error_code = "vfolder_create_already-exists"


class FileNotFound(StorageError):
    status = 404
    problem = "file-not-found"
    title = "File Not Found"
    error_code = "vfolder_read_not-found"
    client_error_code = "storage-proxy_read_not-found"


class QuotaScopeNotFound(StorageError):
    status = 404
    problem = "quota/scope/not-found"
    title = "Quota Scope Not Found"
    # upstream's QuotaScopeNotFoundError
    error_code = "quota-scope_read_not-found"


class QuotaScopeExists(StorageError):
    status = 409
    problem = "quota/scope/already-exists"
    title = "Quota Scope Already Exists"
    # upstream's QuotaScopeAlreadyExists
    error_code = "quota-scope_create_already-exists"


class InvalidQuotaScope(StorageError):
    status = 400
    problem = "quota/scope/invalid"
    title = "Invalid Quota Scope"
    # upstream's InvalidQuotaScopeError
    error_code = "quota-scope_access_invalid-parameters"


class InvalidQuotaConfig(StorageError):
    status = 400
    problem = "quota/config/invalid"
    title = "Invalid Quota Config"
    # upstream's PATCH /quota-scope answers {"msg"} without a code: VFolderBadRequest
    error_code = "vfolder_update_invalid-parameters"


class DeprecatedAPI(StorageError):
    status = 400
    problem = "deprecated-api"
    title = "Deprecated API"
    error_code = "vfolder_request_deprecated"


class FileOperationFailed(StorageError):
    """An OSError from a file operation the client asked for (upstream: 400 msg/errno/paths)."""

    status = 400
    problem = "file-operation-failed"
    title = "File Operation Failed"
    # upstream: 400 {msg, errno, paths} without a code
    error_code = "vfolder_execute_bad-request"


class InsufficientStorage(StorageError):
    """EDQUOT/ENOSPC: the quota scope or the filesystem is full."""

    status = 507
    problem = "insufficient-storage"
    title = "Insufficient Storage"
    error_code = "vfolder_execute_unavailable"
    client_error_code = "storage-proxy_create_unavailable"


def is_disk_full(exc: OSError) -> bool:
    """ENOSPC or EDQUOT: the filesystem or the quota is full (XFS says ENOSPC for both)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def no_space(exc: OSError) -> OSError | InsufficientStorage:
    """A full disk or quota as the 507 a client sees; any other OSError as it is."""
    if is_disk_full(exc):
        return InsufficientStorage(exc.strerror or "no space left", errno=exc.errno)
    return exc


class OutOfDescriptors(StorageError):
    """EMFILE/ENFILE: the daemon is at its open-file limit, for now (the
    connection limits of storage.web.connections keep it rare)."""

    status = 503
    problem = "too-many-open-files"
    title = "Too many open files"
    error_code = "storage-proxy_generic_unavailable"
    headers = {"Retry-After": "1"}


def out_of_descriptors(exc: BaseException) -> OutOfDescriptors | None:
    """The 503 a client sees when ``exc`` is EMFILE or ENFILE, else None."""
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return OutOfDescriptors(f"the storage proxy has too many files open ({exc.strerror}); retry later")
    return None


class ExecutionError(StorageError):
    status = 500
    problem = "execution/failed"
    title = "Storage Operation Execution Failed"
    # upstream's ProcessExecutionError
    error_code = "storage-proxy_execute_internal-error"


class ExternalServiceError(StorageError):
    status = 502
    problem = "external/failed"
    title = "External Operation Failed"
    # upstream's handle_external_errors answers {"msg"} without a code
    error_code = "vfolder_request_unreachable"
    client_error_code = "storage-proxy_request_unreachable"


class NotFound(StorageError):
    status = 404
    problem = "not-found"
    title = "Not Found"
    error_code = "storage-proxy_read_not-found"
