"""Errors of the artifact storages, with their HTTP meaning."""

from __future__ import annotations

from storage.errors import StorageError


class ArtifactStorageNotFound(StorageError):
    status = 404
    problem = "artifact-storage/not-found"
    title = "Artifact Storage Not Found"


class ArtifactStorageTypeInvalid(StorageError):
    status = 400
    problem = "artifact-storage/invalid-type"
    title = "Invalid Artifact Storage Type"


class ArtifactFileNotFound(StorageError):
    status = 404
    problem = "artifact-storage/file-not-found"
    title = "Artifact File Not Found"


class UnsupportedMediaType(StorageError):
    status = 415
    problem = "unsupported-media-type"
    title = "Unsupported Media Type"


class FileTooLarge(StorageError):
    status = 413
    problem = "artifact-storage/file-too-large"
    title = "File Too Large"
