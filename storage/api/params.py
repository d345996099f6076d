"""Reading and validating the manager API's JSON request bodies.

Upstream reads every manager parameter from a JSON body, even for GET, and
checks it against a schema: unknown keys, missing keys and wrong types are
400 ``invalid-api-params`` with ``data: {parameter: message}``.  We do the
same with small converter functions, and also answer 400 (instead of a 500)
for an empty or malformed body, and 413 for a body over the configured cap.

A converter takes the raw JSON value and returns the parsed one, or raises
``ParamError`` with a message; ``parse_params`` collects every failure and
raises one ``InvalidAPIParameters`` naming them all.

Each converter also carries the JSON Schema of what it accepts (``schema_of``):
the OpenAPI document (``storage.api.openapi``) is built from the very ``Field``
tuples the routes validate with, so the two cannot drift.  A schema says
exactly what the converter accepts where JSON Schema can say it (ids, integers
given as strings, boolean words), and is looser only where it cannot (path
rules counted in UTF-8 bytes).
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
from storage.paths import MAX_NAME_BYTES, MAX_PATH_BYTES, validate_relpath
from storage.vfid import QUOTA_SCOPE_TYPES, UUID_PATTERN, InvalidID, QuotaScopeID, VFolderID

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
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the values this field accepts (its converter's, plus its default)."""
        schema = dict(schema_of(self.convert))
        if self.description:
            schema["description"] = self.description
        if not self.required and _is_json(self.default):
            schema["default"] = self.default
        return schema


def _is_json(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def with_schema(schema: dict[str, Any]) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Attach the JSON Schema of what a converter accepts to it."""

    def attach(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
        convert.json_schema = schema  # type: ignore[attr-defined]
        return convert

    return attach


def schema_of(convert: Callable[[Any], Any]) -> dict[str, Any]:
    schema = getattr(convert, "json_schema", None)
    if schema is None:
        name = getattr(convert, "__qualname__", repr(convert))
        raise TypeError(f"converter {name} declares no JSON Schema (params.with_schema)")
    return schema  # type: ignore[no-any-return]


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

# What the converters accept, in JSON Schema's terms (ECMA-262 patterns).
BLANKS = " \t\n\r"  # what integer and boolean texts may be padded with
# What str.isspace() (and so str.strip()) takes for white space, as a character class.
PY_SPACE = "[\\u0009-\\u000d\\u001c-\\u0020\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
_WS = "[ \\t\\n\\r]*"
QUOTA_SCOPE_PATTERN = f"({'|'.join(QUOTA_SCOPE_TYPES)}):{UUID_PATTERN}"
_INTEGER_TEXT = re.compile("[+-]?[0-9]{1,40}")


def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


@with_schema({"type": "string"})
def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ParamError(f"expected a string, got {_kind(value)}")
    return value


@with_schema({"type": "string", "description": "a volume name (GET /volumes); an unknown one is 400"})
def volume_name(value: Any) -> str:
    """A volume name: looked up later (unknown → 400 ``volume/invalid``)."""
    return string(value)


def nullable(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @with_schema({"anyOf": [schema_of(convert), {"type": "null"}]})
    def convert_nullable(value: Any) -> Any:
        return None if value is None else convert(value)

    return convert_nullable


@with_schema({"anyOf": [
    {"type": "integer"},
    {"type": "string", "pattern": f"^{_WS}[+-]?[0-9]{{1,40}}{_WS}$"},
]})
def integer(value: Any) -> int:
    """An int, or a string of ASCII digits (upstream's ``ToInt``)."""
    if isinstance(value, bool):
        raise ParamError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip(BLANKS)
        if _INTEGER_TEXT.fullmatch(text):
            return int(text)
    raise ParamError(f"expected an integer, got {value!r}"[:200])


@with_schema({"anyOf": [
    {"type": "integer", "minimum": 0},
    {"type": "string", "pattern": f"^{_WS}(\\+?[0-9]{{1,40}}|-0{{1,40}}){_WS}$"},
]})
def non_negative_integer(value: Any) -> int:
    number = integer(value)
    if number < 0:
        raise ParamError(f"must not be negative, got {number}")
    return number


_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}
_BOOLEAN_WORDS = "|".join(_any_case(w) for w in sorted(_TRUE | _FALSE))
# A query-string boolean (the client API's archive, no_cache): a word, or empty for false.
QUERY_BOOLEAN_SCHEMA = {"type": "string", "pattern": f"^{_WS}({_BOOLEAN_WORDS})?{_WS}$"}


@with_schema({"anyOf": [
    {"type": "boolean"},
    {"enum": [0, 1]},
    {"type": "string", "pattern": f"^{_WS}({_BOOLEAN_WORDS}){_WS}$"},
]})
def boolean(value: Any) -> bool:
    """A bool, 0/1, or a word like "true"/"no" (upstream's ``ToBool``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):  # 1.0 is 1 in JSON Schema too
        return bool(value)
    if isinstance(value, str):
        word = value.strip(BLANKS).lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ParamError(f"expected a boolean, got {value!r}"[:200])


@with_schema({
    "type": "string", "pattern": f"^({QUOTA_SCOPE_PATTERN}/)?{UUID_PATTERN}$",
    "description": "'<user|project>:<quota scope uuid>/<folder uuid hex>', or a bare folder UUID (22.03)",
    "examples": ["user:2f9c3a34-5e4d-4c5b-9a6e-0d5c1c9b7e21/5d0a3c1e2b9f4e8d8c7b6a5f4e3d2c1b"],
})
def vfolder_id(value: Any) -> VFolderID:
    try:
        return VFolderID.parse(value)
    except InvalidID as exc:
        raise ParamError(str(exc)[:300]) from None


@with_schema({"type": "string", "pattern": f"^{QUOTA_SCOPE_PATTERN}$",
              "examples": ["user:2f9c3a34-5e4d-4c5b-9a6e-0d5c1c9b7e21"]})
def quota_scope_id(value: Any) -> QuotaScopeID:
    try:
        return QuotaScopeID.parse(value)
    except InvalidID as exc:
        raise ParamError(str(exc)[:300]) from None


@with_schema({"type": "string", "format": "uuid"})
def task_id(value: Any) -> uuid.UUID:
    try:
        return uuid.UUID(string(value))
    except ValueError:
        raise ParamError(f"expected a background task id (a UUID), got {value!r}"[:200]) from None


# Relative, no NUL; ".." and the byte lengths (MAX_PATH_BYTES, MAX_NAME_BYTES per
# name) are checked too but not expressed here.
RELPATH_SCHEMA: dict[str, Any] = {
    "type": "string", "pattern": "^[^/\\u0000][^\\u0000]*$|^$", "maxLength": MAX_PATH_BYTES,
    "description": "a path relative to the vfolder (no '..', no NUL; '' or '.' is the vfolder itself)",
}


@with_schema(RELPATH_SCHEMA)
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


relpath_list.json_schema = {"type": "array", "items": RELPATH_SCHEMA}  # type: ignore[attr-defined]


@with_schema({"anyOf": [RELPATH_SCHEMA, {"type": "array", "items": RELPATH_SCHEMA, "minItems": 1,
                                         "maxItems": MAX_MKDIR_BATCH}]})
def mkdir_relpaths(value: Any) -> list[PurePosixPath]:
    """``relpath`` of ``/folder/file/mkdir``: one path, or a list of 1 to 50."""
    if isinstance(value, list):
        return relpath_list(value, max_items=MAX_MKDIR_BATCH, min_items=1)
    return [relpath(value)]


@with_schema({"type": "string", "pattern": "^[^/\\u0000]+$", "not": {"enum": [".", ".."]},
              "maxLength": MAX_NAME_BYTES, "description": f"one name: no '/', NUL, '.', '..'; at most {MAX_NAME_BYTES} bytes"})
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


@with_schema({"anyOf": [
    {"type": "string", "maxLength": 255, "pattern": "^[^/\\\\\\u0000-\\u001f\\u007f]*$",
     "not": {"anyOf": [{"enum": [".", ".."]}, {"pattern": f"^{PY_SPACE}*$"}]}},
    {"type": "null"},
]})
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


@with_schema({"anyOf": [
    {"type": "integer", "minimum": 0, "maximum": 0o7777},
    {"type": "string", "pattern": f"^{_WS}(?=[+-]?[0-9]{{1,40}}{_WS}$)"
                                  f"(\\+?0*([0-9]{{1,3}}|[0-3][0-9]{{3}}|40[0-8][0-9]|409[0-5])|-0+){_WS}$"},
    {"type": "null"},
], "description": "permission bits, 0 to 0o7777 (4095)"})
def permission_mode(value: Any) -> int | None:
    if value is None:
        return None
    mode = integer(value)
    if not 0 <= mode <= 0o7777:
        raise ParamError(f"expected a permission mode between 0 and 0o7777, got {mode}")
    return mode


@with_schema({"type": "object"})
def mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ParamError(f"expected an object, got {_kind(value)}")
    return value


@with_schema({"type": "object", "required": ["limit_bytes"], "additionalProperties": False,
              "properties": {"limit_bytes": schema_of(integer)}})
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


@with_schema({"anyOf": [{"type": "integer", "minimum": 0},
                        {"type": "string", "description": "a size such as '10g' or '512m'"}]})
def binary_size(value: Any) -> int:
    """``"10g"``, ``"512m"`` or a number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return non_negative_integer(value)
    try:
        return parse_size(value, "size")
    except ConfigError:
        raise ParamError(f"value is not a valid binary size: {value!r}"[:200]) from None


@with_schema({"type": "string", "description": "stored as UTF-8"})
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


string_list.json_schema = {"type": "array", "items": {"type": "string"}}  # type: ignore[attr-defined]


def non_empty_string_list(value: Any) -> list[str]:
    return string_list(value, min_items=1)


non_empty_string_list.json_schema = {"type": "array", "items": {"type": "string"}, "minItems": 1}  # type: ignore[attr-defined]


def relpath_strings(value: Any) -> list[str]:
    """At least one path, each checked as a ``relpath`` and kept as given (archive ``files``)."""
    items = non_empty_string_list(value)
    for i, item in enumerate(items):
        try:
            relpath(item)
        except ParamError as exc:
            raise ParamError(f"item {i}: {exc}") from None
    return items


relpath_strings.json_schema = {"type": "array", "items": RELPATH_SCHEMA, "minItems": 1}  # type: ignore[attr-defined]
