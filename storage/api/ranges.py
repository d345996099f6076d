"""HTTP Range and conditional requests for downloads (RFC 9110 §13, §14).

Pure functions, no I/O.  The parser never raises: a Range header that is
malformed, in another unit, or absurd (too long, too many parts) is ignored,
and the whole file is served, as RFC 9110 §14.2 allows.

Choices (documented in docs/downloads.md):

* one range → 206 with ``Content-Range``; none satisfiable → 416 with
  ``Content-Range: bytes */<size>``;
* several ranges are merged where they overlap or touch; if one range
  remains it is served as a single 206, otherwise the whole file (200): no
  ``multipart/byteranges`` responses;
* the entity tag is strong, ``"<mtime ns hex>-<size hex>"``; ``If-Range``
  accepts it or the exact ``Last-Modified`` date.

Entity-tag lists (``If-Match``, ``If-None-Match``) are parsed and compared by
werkzeug (``parse_etags``, ``quote_etag``).  The Range header, ``If-Range`` and
HTTP dates are parsed here because werkzeug answers differently where RFC 9110
and the tests pin an answer: its Range parser refuses empty list elements
(``bytes=0-0,,-1``, allowed by §5.6.1) and ranges out of order or overlapping
(``bytes=5-9,0-6``, which we merge), and accepts blanks inside a range
(``bytes= 1 -2``); its ``If-Range`` drops the ``W/`` of a weak tag, which
then matches (§13.1.5: it must not); its dates accept asctime without a zone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from werkzeug.http import parse_etags, quote_etag, unquote_etag

MAX_HEADER_LENGTH = 4096
MAX_RANGES = 64
_MAX_DIGITS = 20  # more than any file size; a longer number makes the header invalid
_SPEC_RE = re.compile(r"([0-9]*)-([0-9]*)\Z")


@dataclass(frozen=True)
class RangeSpec:
    """One ``first-last`` (``last`` may be None) or a suffix ``-length``."""

    first: int | None
    last: int | None


@dataclass(frozen=True, order=True)
class ByteRange:
    """A satisfiable range of a file: ``start``..``end`` inclusive."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class Unsatisfiable:
    """No requested range overlaps the file: 416."""

    def __repr__(self) -> str:
        return "UNSATISFIABLE"


UNSATISFIABLE = Unsatisfiable()


def _text(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def parse_range(value: str | bytes | None) -> list[RangeSpec] | None:
    """The byte ranges of a ``Range`` header, or None when it is to be ignored."""
    text = _text(value)
    if text is None or len(text) > MAX_HEADER_LENGTH:
        return None
    unit, sep, rest = text.partition("=")
    if not sep or unit.strip(" \t").lower() != "bytes":
        return None
    specs = []
    for part in rest.split(","):
        part = part.strip(" \t")
        if not part:
            continue  # empty list elements are allowed (RFC 9110 §5.6.1)
        m = _SPEC_RE.match(part)
        if not m:
            return None
        first_s, last_s = m.groups()
        if len(first_s) > _MAX_DIGITS or len(last_s) > _MAX_DIGITS:
            return None
        if first_s:
            first = int(first_s)
            last = int(last_s) if last_s else None
            if last is not None and last < first:
                return None
            specs.append(RangeSpec(first, last))
        elif last_s:
            specs.append(RangeSpec(None, int(last_s)))
        else:
            return None  # a bare "-"
        if len(specs) > MAX_RANGES:
            return None
    return specs or None


def _satisfiable(spec: RangeSpec, size: int) -> ByteRange | None:
    if spec.first is None:
        suffix = spec.last or 0
        if suffix == 0 or size == 0:
            return None
        return ByteRange(max(0, size - suffix), size - 1)
    if spec.first >= size:
        return None
    last = size - 1 if spec.last is None else min(spec.last, size - 1)
    return ByteRange(spec.first, last)


def select_range(specs: list[RangeSpec] | None, size: int) -> ByteRange | Unsatisfiable | None:
    """What to serve of a ``size``-byte file: a range (206), ``UNSATISFIABLE``
    (416) or None for the whole file (200)."""
    if not specs:
        return None
    ranges = sorted(r for r in (_satisfiable(s, size) for s in specs) if r is not None)
    if not ranges:
        return UNSATISFIABLE
    merged = [ranges[0]]
    for r in ranges[1:]:
        last = merged[-1]
        if r.start <= last.end + 1:
            merged[-1] = ByteRange(last.start, max(last.end, r.end))
        else:
            merged.append(r)
    return merged[0] if len(merged) == 1 else None


# -- validators and preconditions ------------------------------------------------


def make_etag(mtime_ns: int, size: int) -> str:
    return quote_etag(f"{mtime_ns:x}-{size:x}")


def parse_http_date(value: str | bytes | None) -> int | None:
    """Seconds since the epoch, or None for a missing or invalid date."""
    text = _text(value)
    if not text or len(text) > 100:
        return None
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    try:
        return int(parsed.timestamp())
    except (OverflowError, OSError, ValueError):
        return None


def _strong_match(header: str, etag: str) -> bool:
    """``If-Match``: ``*``, or ``etag`` among the strong tags (§13.1.1)."""
    tags = parse_etags(header.strip(" \t"))
    return tags.star_tag or tags.is_strong(unquote_etag(etag)[0])


def _weak_match(header: str, etag: str) -> bool:
    """``If-None-Match``: ``*``, or ``etag`` among the tags, weak or strong (§13.1.2)."""
    tags = parse_etags(header.strip(" \t"))
    return tags.star_tag or tags.contains_weak(unquote_etag(etag)[0])


@dataclass(frozen=True)
class Validators:
    etag: str
    mtime: int  # whole seconds, as Last-Modified shows it


def check_preconditions(method: str, headers: dict[str, str | None], current: Validators) -> int | None:
    """RFC 9110 §13.2.2 for a resource that exists: 412, 304 or None (go on).

    ``headers`` maps lower-case header names to their (joined) values.
    """
    if_match = headers.get("if-match")
    if if_match is not None:
        if not _strong_match(if_match, current.etag):
            return 412
    else:
        since = parse_http_date(headers.get("if-unmodified-since"))
        if since is not None and current.mtime > since:
            return 412
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if _weak_match(if_none_match, current.etag):
            return 304 if method in ("GET", "HEAD") else 412
    elif method in ("GET", "HEAD"):
        since = parse_http_date(headers.get("if-modified-since"))
        if since is not None and current.mtime <= since:
            return 304
    return None


def if_range_allows(value: str | None, current: Validators) -> bool:
    """Whether a Range may be honoured given ``If-Range`` (absent: yes)."""
    if value is None:
        return True
    value = value.strip(" \t")
    if value.startswith('"') or value.startswith("W/"):
        return value == current.etag  # a strong comparison; weak tags never match
    date = parse_http_date(value)
    return date is not None and date == current.mtime
