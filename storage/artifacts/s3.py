"""An object-storage artifact storage: any S3-compatible server, through botocore.

Why botocore, called in the blocking pool: it is the reference S3
implementation (SigV4, presigned GET and POST, multipart, retries, every
server's quirks), kept by AWS and used by upstream (through aiobotocore).
Its client is thread-safe and its calls block, so they run in
``storage.blocking``'s pool like every other blocking call, and the reactor
never waits on S3.  (botocore's signer with treq would keep the bytes on the
reactor, but would re-implement multipart, retries and error parsing.)

Memory is bounded: an upload holds at most one part (``upload-chunk-size``,
5 MiB or more) before it is sent; a download holds one read.  Small bodies
go up in one ``PutObject``; larger ones as a multipart upload, aborted on
any failure.  S3 errors become ``StorageError``s naming the S3 error code;
credentials are never part of a message or a log line.
"""

from __future__ import annotations

import logging
from typing import Any

import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from twisted.logger import Logger

from storage.artifact_config import ObjectStorageConfig
from storage.artifacts.errors import ArtifactFileNotFound, FileTooLarge
from storage.errors import ExternalServiceError, InvalidAPIParameters, NotFound, StorageError

# botocore logs requests (and their headers) at DEBUG: never let that through.
logging.getLogger("botocore").setLevel(logging.WARNING)
log = Logger()

MAX_KEY_BYTES = 1024
MAX_PARTS = 10000
MAX_PRESIGN_EXPIRY = 7 * 86400  # SigV4's limit


class BucketNotFound(NotFound):
    problem = "object-storage/bucket-not-found"
    title = "Object Storage Bucket Not Found"
    error_code = "object-storage_read_not-found"


class ObjectStorageUnavailable(StorageError):
    status = 503
    problem = "object-storage/unavailable"
    title = "Object Storage Unavailable"
    error_code = "object-storage_access_unavailable"


class ObjectStorageTimeout(ObjectStorageUnavailable):
    status = 504
    title = "Object Storage Timed Out"


class ObjectStorageFailed(ExternalServiceError):
    error_code = "object-storage_generic_internal-error"


class ObjectStorageAuthFailed(ObjectStorageFailed):
    title = "Object Storage Refused Our Credentials"
    error_code = "object-storage_access_forbidden"


_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


def s3_error(exc: Exception, *, bucket: str, key: str | None = None) -> StorageError:
    """The API error for a botocore failure (no credentials in it)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
        if code == "NoSuchBucket":
            return BucketNotFound(f"no such bucket: {bucket}", bucket=bucket)
        if code in ("NoSuchKey", "404", "NotFound") or (status == 404 and key is not None):
            return ArtifactFileNotFound(f"no such object: {where}", key=key)
        if code in _AUTH_CODES or status == 403:
            return ObjectStorageAuthFailed(f"the object storage refused the request for {where}: {code or status}",
                                           s3_error_code=code or None)
        if code == "EntityTooLarge":
            return FileTooLarge(f"the object storage refused the size of {where}")
        if code in ("SlowDown", "ServiceUnavailable", "503") or status == 503:
            return ObjectStorageUnavailable(f"the object storage is overloaded ({code or status})", s3_error_code=code)
        message = str(err.get("Message") or "")[:200]
        return ObjectStorageFailed(f"the object storage failed for {where}: {code or status} {message}".strip(),
                                   s3_error_code=code or None)
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        return ObjectStorageTimeout("the object storage did not answer in time")
    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError)):
        return ObjectStorageUnavailable("cannot reach the object storage")
    if isinstance(exc, BotoCoreError):
        return ObjectStorageFailed(f"object storage client error: {type(exc).__name__}")
    if isinstance(exc, OSError):
        return ObjectStorageUnavailable(f"object storage connection failed: {exc.strerror or type(exc).__name__}")
    raise exc


def validate_key(value: Any, field: str = "key") -> str:
    if not isinstance(value, str) or not value:
        raise InvalidAPIParameters.field(field, "expected a non-empty string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidAPIParameters.field(field, f"longer than {MAX_KEY_BYTES} bytes")
    if "\x00" in value:
        raise InvalidAPIParameters.field(field, "contains a NUL byte")
    return value


class S3Storage:
    def __init__(self, config: ObjectStorageConfig, max_connections: int = 16) -> None:
        self.config = config
        self.name = config.name
        session = botocore.session.get_session()
        self.client = session.create_client(
            "s3",
            endpoint_url=config.endpoint,
            region_name=config.region,
            aws_access_key_id=config.access_key,
            aws_secret_access_key=config.secret_key,
            verify=config.verify_ssl,
            config=BotoConfig(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=max_connections,
            ),
        )

    def __repr__(self) -> str:
        return f"<S3Storage {self.name} {self.config.endpoint}>"

    def check_bucket(self, bucket: str) -> None:
        """Only the configured buckets are served (any, if none is configured)."""
        if self.config.buckets and bucket not in self.config.buckets:
            raise BucketNotFound(f"bucket {bucket!r} is not configured for storage {self.name!r}", bucket=bucket)

    # -- blocking calls (run them in the pool) ----------------------------------------

    def meta(self, bucket: str, key: str) -> dict[str, Any]:
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise s3_error(exc, bucket=bucket, key=key) from None
        modified = head.get("LastModified")
        return {
            "content_length": head.get("ContentLength"),
            "content_type": head.get("ContentType"),
            "last_modified": modified.isoformat() if modified is not None else None,
            "etag": head.get("ETag"),
            "metadata": dict(head.get("Metadata") or {}),
        }

    def delete(self, bucket: str, key: str) -> None:
        """One object, or every object under ``key`` when it ends with ``/`` (as upstream)."""
        try:
            if not key.endswith("/"):
                self.client.delete_object(Bucket=bucket, Key=key)
                return
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                for start in range(0, len(objects), 1000):
                    result = self.client.delete_objects(
                        Bucket=bucket, Delete={"Objects": objects[start:start + 1000], "Quiet": True})
                    errors = result.get("Errors") or []
                    if errors:
                        raise ObjectStorageFailed(
                            f"the object storage kept {len(errors)} objects under s3://{bucket}/{key}: "
                            f"{errors[0].get('Code')}")
        except Exception as exc:
            raise s3_error(exc, bucket=bucket, key=key) from None

    def open_download(self, bucket: str, key: str) -> tuple[int | None, Any]:
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise s3_error(exc, bucket=bucket, key=key) from None
        return response.get("ContentLength"), response["Body"]

    def presigned_download(self, bucket: str, key: str, expiration: int | None = None) -> dict[str, Any]:
        expires = expiration if expiration is not None else self.config.presigned_download_expiration
        try:
            url = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires)
        except Exception as exc:
            raise s3_error(exc, bucket=bucket, key=key) from None
        return {"url": url}

    def presigned_upload(self, bucket: str, key: str) -> dict[str, Any]:
        """A presigned POST (a form upload), as upstream: ``{url, fields}``."""
        cfg = self.config
        conditions: list[Any] = []
        if cfg.presigned_upload_min_size is not None or cfg.presigned_upload_max_size is not None:
            conditions.append(["content-length-range", cfg.presigned_upload_min_size or 0,
                               cfg.presigned_upload_max_size or 5 << 40])
        try:
            post = self.client.generate_presigned_post(
                Bucket=bucket, Key=key, Fields={}, Conditions=conditions, ExpiresIn=cfg.presigned_upload_expiration)
        except Exception as exc:
            raise s3_error(exc, bucket=bucket, key=key) from None
        return {"url": post["url"], "fields": dict(post["fields"])}

    def start_upload(self, bucket: str, key: str, content_type: str | None,
                     metadata: dict[str, str] | None = None) -> S3Upload:
        validate_key(key)
        return S3Upload(self, bucket, key, content_type, metadata)


class S3Upload:
    """One object arriving: buffered up to one part, then sent as a multipart upload."""

    def __init__(self, storage: S3Storage, bucket: str, key: str, content_type: str | None,
                 metadata: dict[str, str] | None = None) -> None:
        self.metadata = metadata  # x-amz-meta-* of the object
        self.storage = storage
        self.client = storage.client
        self.bucket = bucket
        self.key = key
        self.content_type = content_type
        self.part_size = storage.config.upload_chunk_size
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.size = 0

    def _error(self, exc: Exception) -> StorageError:
        return s3_error(exc, bucket=self.bucket, key=self.key)

    def write(self, data: bytes) -> None:
        self.buf += data
        self.size += len(data)
        while len(self.buf) >= self.part_size:
            with memoryview(self.buf) as view:
                piece = bytes(view[:self.part_size])
            del self.buf[:self.part_size]
            self._send_part(piece)

    def _send_part(self, piece: bytes) -> None:
        try:
            if self.upload_id is None:
                args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
                if self.content_type:
                    args["ContentType"] = self.content_type
                if self.metadata:
                    args["Metadata"] = self.metadata
                self.upload_id = self.client.create_multipart_upload(**args)["UploadId"]
            number = len(self.parts) + 1
            if number > MAX_PARTS:
                raise FileTooLarge(f"more than {MAX_PARTS} parts of {self.part_size} bytes")
            answer = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                             PartNumber=number, Body=piece)
            self.parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        except Exception as exc:
            raise self._error(exc) from None

    def finish(self) -> None:
        try:
            if self.upload_id is None:
                args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key, "Body": bytes(self.buf)}
                if self.content_type:
                    args["ContentType"] = self.content_type
                if self.metadata:
                    args["Metadata"] = self.metadata
                self.client.put_object(**args)
            else:
                if self.buf:
                    self._send_part(bytes(self.buf))
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})
            self.buf = bytearray()
        except Exception as exc:
            self.abort()
            raise self._error(exc) from None

    def abort(self) -> None:
        self.buf = bytearray()
        upload_id, self.upload_id = self.upload_id, None
        if upload_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)
            except Exception as exc:  # the parts stay until the bucket's lifecycle rules remove them
                log.warn("aborting the multipart upload of s3://{bucket}/{key} failed: {error}",
                         bucket=self.bucket, key=self.key, error=type(exc).__name__)
