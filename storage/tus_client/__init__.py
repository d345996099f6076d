"""A tus 1.0 upload client on treq: resumable, chunked or one-PATCH, checksummed,
parallel through concatenation, with progress and cancellation.

    client = TusClient(reactor, checksum="sha256")
    result = await client.upload(url, "/path/to/file", on_progress=print)
"""

from storage.tus_client.client import TusClient, UploadResult
from storage.tus_client.errors import (
    ChecksumMismatch,
    ConnectionFailed,
    InsufficientStorage,
    InvalidToken,
    OffsetConflict,
    ProtocolViolation,
    ServerError,
    SourceError,
    TusError,
    UnexpectedStatus,
    UnsupportedByServer,
    UploadLengthMismatch,
    UploadLocked,
    UploadNotFound,
    UploadTooLarge,
)
from storage.tus_client.headers import ServerInfo
from storage.tus_client.planning import RetryPolicy, parse_size, plan_chunks, split_parts
from storage.tus_client.progress import Progress
from storage.tus_client.sources import BytesSource, FileSource, StreamSource

__all__ = [
    "BytesSource", "ChecksumMismatch", "ConnectionFailed", "FileSource", "InsufficientStorage",
    "InvalidToken", "OffsetConflict", "Progress", "ProtocolViolation", "RetryPolicy",
    "ServerError", "ServerInfo", "SourceError", "StreamSource", "TusClient", "TusError",
    "UnexpectedStatus", "UnsupportedByServer", "UploadLengthMismatch", "UploadLocked",
    "UploadNotFound", "UploadResult", "UploadTooLarge", "parse_size", "plan_chunks",
    "split_parts",
]
