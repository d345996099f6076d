"""Reading and validating the manager API's JSON request bodies.

Upstream reads every manager parameter from a JSON body, even for GET, and
checks it against a schema: unknown keys, missing keys and wrong types are
400 ``invalid-api-params`` with ``data: {parameter: message}``.  We do the
same with small converter functions, and also answer 400 (instead of a 500)
for an empty or malformed body, and 413 for a body over the configured cap.

A converter takes the raw JSON value and returns the parsed one, or raises
``ParamError`` with a message; ``parse_params`` collects every failure and
raises one ``InvalidAPIParameters`` naming them all.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from twisted.web.iweb import IRequest

from storage.config import ConfigError, parse_size
from storage.errors import InvalidAPIParameters, RequestTooLarge, StorageError
from storage.paths import MAX_NAME_BYTES, validate_relpath
from storage.vfid import InvalidID, QuotaScopeID, VFolderID

MAX_MKDIR_BATCH = 50


class ParamError(ValueError):
    """One parameter's value is unacceptable; the message says why."""


class MalformedRequest(StorageError):
    status = 400
    problem = "malformed-request"
    title = "Malformed request (request body should be empty)"
    # upstream's check_params answers without a code
    error_code = "vfolder_request_bad-request"


_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    name: str
    convert: Callable[[Any], Any]
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


# -- reading the body ---------------------------------------------------------


def _body_bytes(request: IRequest, max_body: int) -> bytes:
    length = request.getHeader(b"content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            declared = -1
        if declared > max_body:
            raise RequestTooLarge(f"the request body is larger than {max_body} bytes")
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data = content.read(max_body + 1)
    if len(data) > max_body:
        raise RequestTooLarge(f"the request body is larger than {max_body} bytes")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json_body(request: IRequest, max_body: int) -> Any:
    """The parsed JSON body, or ``None`` when the body is empty."""
    data = _body_bytes(request, max_body)
    if not data.strip():
        return None
    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidAPIParameters(
            f"the request body is not valid JSON: {reason}", data={"body": f"malformed JSON: {reason}"}
        ) from None


def require_empty_body(request: IRequest, max_body: int) -> None:
    """Routes without parameters refuse a body, as upstream does."""
    if _body_bytes(request, max_body).strip():
        raise MalformedRequest()


def parse_params(raw: Any, fields: tuple[Field, ...] | list[Field], *, allow_extra: bool = False) -> dict[str, Any]:
    """Check ``raw`` (a parsed JSON body) against ``fields``; all failures are reported at once."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidAPIParameters(
            "the request body must be a JSON object", data={"body": f"expected a JSON object, got {_kind(raw)}"}
        )
    errors: dict[str, str] = {}
    params: dict[str, Any] = {}
    for f in fields:
        if f.name not in raw:
            if f.required:
                errors[f.name] = "is required"
            else:
                params[f.name] = f.default
            continue
        try:
            params[f.name] = f.convert(raw[f.name])
        except ParamError as exc:
            errors[f.name] = str(exc)
    if not allow_extra:
        known = {f.name for f in fields}
        for key in raw:
            if key not in known:
                errors[str(key)] = f"{key} is not allowed key"
    if errors:
        summary = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise InvalidAPIParameters(summary, data=errors)
    return params


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# -- converters ---------------------------------------------------------------


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ParamError(f"expected a string, got {_kind(value)}")
    return value


def volume_name(value: Any) -> str:
    """A volume name: looked up later (unknown → 400 ``volume/invalid``)."""
    return string(value)


def nullable(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def convert_nullable(value: Any) -> Any:
        return None if value is None else convert(value)

    return convert_nullable


_INTEGER_TEXT = re.compile("[+-]?[0-9]{1,40}")


def integer(value: Any) -> int:
    """An int, or a string of ASCII digits (upstream's ``ToInt``)."""
    if isinstance(value, bool):
        raise ParamError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip(" \t\n\r")
        if _INTEGER_TEXT.fullmatch(text):
            return int(text)
    raise ParamError(f"expected an integer, got {value!r}"[:200])


def non_negative_integer(value: Any) -> int:
    number = integer(value)
    if number < 0:
        raise ParamError(f"must not be negative, got {number}")
    return number


_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}


def boolean(value: Any) -> bool:
    """A bool, 0/1, or a word like "true"/"no" (upstream's ``ToBool``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ParamError(f"expected a boolean, got {value!r}"[:200])


def vfolder_id(value: Any) -> VFolderID:
    try:
        return VFolderID.parse(value)
    except InvalidID as exc:
        raise ParamError(str(exc)[:300]) from None


def quota_scope_id(value: Any) -> QuotaScopeID:
    try:
        return QuotaScopeID.parse(value)
    except InvalidID as exc:
        raise ParamError(str(exc)[:300]) from None


def task_id(value: Any) -> uuid.UUID:
    try:
        return uuid.UUID(string(value))
    except ValueError:
        raise ParamError(f"expected a background task id (a UUID), got {value!r}"[:200]) from None


def relpath(value: Any) -> PurePosixPath:
    """A path relative to the vfolder: no absolute path, ``..``, NUL, or over-long names."""
    try:
        return validate_relpath(value)
    except StorageError as exc:
        raise ParamError(_path_reason(exc)) from None


def _path_reason(exc: StorageError) -> str:
    data = exc.data if isinstance(exc.data, dict) else {}
    return next(iter(data.values()), None) or str(exc)


def relpath_list(value: Any, max_items: int | None = None, min_items: int = 0) -> list[PurePosixPath]:
    if not isinstance(value, list):
        raise ParamError(f"expected a list of paths, got {_kind(value)}")
    if max_items is not None and len(value) > max_items:
        raise ParamError(f"at most {max_items} paths are allowed, got {len(value)}")
    if len(value) < min_items:
        raise ParamError(f"at least {min_items} path(s) required")
    paths = []
    for i, item in enumerate(value):
        try:
            paths.append(relpath(item))
        except ParamError as exc:
            raise ParamError(f"item {i}: {exc}") from None
    return paths


def mkdir_relpaths(value: Any) -> list[PurePosixPath]:
    """``relpath`` of ``/folder/file/mkdir``: one path, or a list of 1 to 50."""
    if isinstance(value, list):
        return relpath_list(value, max_items=MAX_MKDIR_BATCH, min_items=1)
    return [relpath(value)]


def file_name(value: Any) -> str:
    """A single directory entry name (``new_name`` of rename)."""
    name = string(value)
    if not name or name in (".", ".."):
        raise ParamError(f"must be a file name, got {name!r}")
    if "/" in name or "\x00" in name:
        raise ParamError("must be a file name, without '/' or NUL")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ParamError(f"longer than {MAX_NAME_BYTES} bytes")
    return name


def archive_filename(value: Any) -> str | None:
    """The zip name of ``archive-download-token``: validated as upstream does."""
    if value is None:
        return None
    name = string(value)
    if len(name) > 255:
        raise ParamError("at most 255 characters")
    if not name.strip():
        raise ParamError("Filename must not be empty or whitespace-only.")
    if name in (".", ".."):
        raise ParamError("Filename must not be a relative path segment ('.' or '..').")
    if any(c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ParamError("Filename must not contain control characters or path separators (/ or \\).")
    return name


def permission_mode(value: Any) -> int | None:
    if value is None:
        return None
    mode = integer(value)
    if not 0 <= mode <= 0o7777:
        raise ParamError(f"expected a permission mode between 0 and 0o7777, got {mode}")
    return mode


def mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ParamError(f"expected an object, got {_kind(value)}")
    return value


def quota_options(value: Any) -> int:
    """``{"limit_bytes": int}``; returns the limit."""
    if not isinstance(value, dict):
        raise ParamError(f"expected {{\"limit_bytes\": int}}, got {_kind(value)}")
    if "limit_bytes" not in value:
        raise ParamError("limit_bytes is required")
    extra = set(value) - {"limit_bytes"}
    if extra:
        raise ParamError(f"{sorted(extra)[0]} is not allowed key")
    try:
        return integer(value["limit_bytes"])
    except ParamError as exc:
        raise ParamError(f"limit_bytes: {exc}") from None


def binary_size(value: Any) -> int:
    """``"10g"``, ``"512m"`` or a number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return non_negative_integer(value)
    try:
        return parse_size(value, "size")
    except ConfigError:
        raise ParamError(f"value is not a valid binary size: {value!r}"[:200]) from None


def text_payload(value: Any) -> bytes:
    """The ``payload`` of ``POST /folder/metadata``: a string, stored as UTF-8."""
    if not isinstance(value, str):
        raise ParamError(f"expected a string, got {_kind(value)}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError("not valid UTF-8 (lone surrogate)") from None


def string_list(value: Any, min_items: int = 0) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ParamError("expected a list of strings")
    if len(value) < min_items:
        raise ParamError(f"at least {min_items} item(s) required")
    return value
