"""tus 1.0 header encoding and strict parsing."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

TUS_VERSION = "1.0.0"
CHECKSUM_PREFERENCE = ("sha256", "sha1", "md5")
_DIGITS = re.compile(r"[0-9]{1,19}")
_METADATA_KEY = re.compile(r"[^\s,]+")


def parse_offset(value: str | None) -> int | None:
    """A non-negative decimal integer, or None when it is anything else."""
    if value is None:
        return None
    value = value.strip()
    if not _DIGITS.fullmatch(value):
        return None
    return int(value)


def encode_metadata(metadata: Mapping[str, str | bytes]) -> str:
    """``Upload-Metadata``: ``key base64(value)`` pairs joined by commas."""
    pairs = []
    for key, value in metadata.items():
        if not key.isascii() or not _METADATA_KEY.fullmatch(key):
            raise ValueError(f"invalid metadata key {key!r}: ASCII without spaces or commas")
        raw = value.encode("utf-8") if isinstance(value, str) else value
        encoded = base64.b64encode(raw).decode("ascii")
        pairs.append(f"{key} {encoded}" if encoded else key)
    return ",".join(pairs)


def decode_metadata(header: str) -> dict[str, bytes]:
    """The inverse of ``encode_metadata`` (used by the test servers)."""
    result: dict[str, bytes] = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, value = pair.partition(" ")
        result[key] = base64.b64decode(value.strip(), validate=True) if value.strip() else b""
    return result


def checksum_header(algorithm: str, digest: bytes) -> str:
    return f"{algorithm} {base64.b64encode(digest).decode('ascii')}"


def _split_list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip().lower() for item in (value or "").split(",") if item.strip())


@dataclass(frozen=True)
class ServerInfo:
    """What OPTIONS advertised (everything empty when OPTIONS failed)."""

    versions: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    checksum_algorithms: tuple[str, ...] = ()
    max_size: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ServerInfo:
        lowered = {k.lower(): v for k, v in headers.items()}
        return cls(
            versions=_split_list(lowered.get("tus-version")),
            extensions=_split_list(lowered.get("tus-extension")),
            checksum_algorithms=_split_list(lowered.get("tus-checksum-algorithm")),
            max_size=parse_offset(lowered.get("tus-max-size")),
            headers=dict(headers),
        )

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    def checksum_algorithm(self, wanted: str | None) -> str | None:
        """``wanted`` if the server takes it; with ``"auto"``, the best it takes."""
        if not wanted or not self.supports("checksum"):
            return None
        if wanted == "auto":
            return next((a for a in CHECKSUM_PREFERENCE if a in self.checksum_algorithms), None)
        return wanted.lower() if wanted.lower() in self.checksum_algorithms else None
