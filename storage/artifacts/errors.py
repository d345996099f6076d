"""Errors of the artifact storages, with their HTTP meaning and upstream's error codes."""

from __future__ import annotations

from storage.errors import StorageError


class ArtifactStorageNotFound(StorageError):
    status = 404
    problem = "artifact-storage/not-found"
    title = "Artifact Storage Not Found"
    error_code = "storage_read_not-found"


class ArtifactStorageTypeInvalid(StorageError):
    status = 400
    problem = "artifact-storage/invalid-type"
    title = "Invalid Artifact Storage Type"
    error_code = "storage_access_invalid-parameters"


class ArtifactFileNotFound(StorageError):
    status = 404
    problem = "artifact-storage/file-not-found"
    title = "Artifact File Not Found"
    error_code = "object-storage_read_not-found"


class UnsupportedMediaType(StorageError):
    status = 415
    problem = "unsupported-media-type"
    title = "Unsupported Media Type"
    error_code = "storage-proxy_request_bad-request"


class FileTooLarge(StorageError):
    status = 413
    problem = "artifact-storage/file-too-large"
    title = "File Too Large"
    error_code = "object-storage_create_bad-request"
