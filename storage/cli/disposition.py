"""A file name for a download: ``Content-Disposition`` (RFC 6266, with RFC 5987
``filename*``) or the URL, reduced to a safe base name."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

_PARAM = re.compile(
    r""";\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)\s*""")


def parse_params(header: str) -> dict[str, str]:
    """The parameters of a Content-Disposition value (names lower-cased, quotes removed)."""
    params: dict[str, str] = {}
    _, _, rest = header.partition(";")
    for match in _PARAM.finditer(";" + rest):
        name, value = match.group(1).lower(), match.group(2)
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params.setdefault(name, value)
    return params


def decode_ext_value(value: str) -> str | None:
    """RFC 5987 ``charset'lang'pct-encoded`` → text (None if malformed)."""
    parts = value.split("'", 2)
    if len(parts) != 3:
        return None
    charset, _, encoded = parts
    if charset.lower() not in ("utf-8", "iso-8859-1"):
        return None
    try:
        return unquote(encoded, encoding=charset.lower(), errors="strict")
    except (UnicodeDecodeError, LookupError):
        return None


def safe_name(name: str | None) -> str | None:
    """The last path component, if it is a usable file name."""
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if name in ("", ".", "..") or "\0" in name or any(ord(c) < 32 for c in name):
        return None
    return name[:255]


def filename_from_disposition(header: str | None) -> str | None:
    if not header:
        return None
    params = parse_params(header)
    if "filename*" in params:
        name = safe_name(decode_ext_value(params["filename*"]))
        if name:
            return name
    return safe_name(params.get("filename"))


def filename_from_url(url: str) -> str:
    path = urlsplit(url).path
    return safe_name(unquote(path.rstrip("/").rsplit("/", 1)[-1])) or "download"


def choose_filename(disposition: str | None, url: str) -> str:
    return filename_from_disposition(disposition) or filename_from_url(url)
