"""The OpenAPI 3.1 documents of both APIs, served at ``GET /openapi.json``.

Nothing here is written twice: every manager route declares its body
``Field``s, its answers and its error statuses in its ``api_route``
decorator, the route validates with exactly those fields
(``ManagerAPI._params``), and ``manager_document`` is built from the same
declarations (``ROUTES``).  Each field's JSON Schema comes from its converter
(``storage.api.params.with_schema``).  The client API parses query strings
and tus headers by hand (``storage.api.downloads``, ``storage.api.tus``): its
operations are declared here (``CLIENT_ROUTES``), their parameter schemas
again from the converters that rule applies (``relpath``, ``boolean``), and
``tests/contract`` (schemathesis) holds the document to what the daemon answers.

See ``docs/openapi.md``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage import API_VERSION
from storage.api.params import Field, schema_of

OPENAPI_VERSION = "3.1.0"
PROBLEM_JSON = "application/problem+json"
AUTH_HEADER = "X-BackendAI-Storage-Auth-Token"


# -- declarations -------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    description: str
    schema: dict[str, Any] | None = None  # None: no body
    content_type: str = "application/json"
    headers: tuple[str, ...] = ()  # names declared in HEADERS
    also: tuple[str, ...] = ()  # more media types of the same body (a guessed type: "*/*")


def returns(schema: dict[str, Any], description: str = "success") -> Response:
    return Response(description, schema)


NO_CONTENT = Response("done; no body")


@dataclass
class Route:
    """One operation: what the route validates with and what it answers."""

    method: str
    path: str  # Klein's form: /bgtask/<task_id>, /x/<path:model_id>
    auth: bool = True
    body: tuple[Field, ...] | None = None  # None: no JSON parameters (an empty body)
    allow_extra: bool = False
    responses: dict[int, Response] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    summary: str = ""
    request_content: dict[str, Any] | None = None  # a body that is not JSON parameters (multipart)
    query: tuple[str, ...] = ()  # names declared in QUERY
    required_query: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()  # request headers, names declared in HEADERS

    @property
    def openapi_path(self) -> str:
        return re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", self.path)

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"<(?:[a-z]+:)?([A-Za-z_]+)>", self.path)


# The client API's query parameters and the headers of both APIs.
@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str = ""


def _param(name: str, convert: Any, description: str) -> Param:
    return Param(name, schema_of(convert), description)


def _declare() -> tuple[dict[str, Param], dict[str, Param]]:
    from storage.api import params as p

    digits = {"type": "string", "pattern": "^[0-9]{1,19}$"}
    query = {
        "token": Param("token", {"type": "string"}, "a JWT issued by the manager API (/folder/file/download, "
                       "/folder/file/upload, /folder/file/archive-download-token)"),
        "dst_dir": _param("dst_dir", p.relpath, "a directory under the vfolder the token's relpath is relative to"),
        "archive": Param("archive", p.QUERY_BOOLEAN_SCHEMA, "a directory as a zip stream"),
        "no_cache": Param("no_cache", p.QUERY_BOOLEAN_SCHEMA, "answer with Cache-Control: no-store"),
        "registry_name": Param("registry_name", {"type": "string", "minLength": 1}, "an [artifact-registries] name"),
        "revision": Param("revision", {"type": "string", "minLength": 1}, "a model revision (default main)"),
        "filepath": Param("filepath", {"type": "string"}, "where the file goes (or a form field before the file)"),
        "key": Param("key", {"type": "string"}, "the object key (or a form field before the file)"),
    }
    headers = {
        "Tus-Resumable": Param("Tus-Resumable", {"type": "string", "enum": ["1.0.0"]}, "the tus version"),
        "Tus-Version": Param("Tus-Version", {"type": "string"}),
        "Tus-Extension": Param("Tus-Extension", {"type": "string"}),
        "Tus-Max-Size": Param("Tus-Max-Size", digits),
        "Tus-Checksum-Algorithm": Param("Tus-Checksum-Algorithm", {"type": "string"}),
        "Upload-Offset": Param("Upload-Offset", digits, "bytes of the upload received so far"),
        "Upload-Length": Param("Upload-Length", digits, "the upload's size"),
        "Upload-Defer-Length": Param("Upload-Defer-Length", {"type": "string", "enum": ["1"]}),
        "Upload-Metadata": Param("Upload-Metadata", {"type": "string"}),
        "Upload-Checksum": Param("Upload-Checksum", {"type": "string"}, "'<algorithm> <base64 digest>'"),
        "Upload-Concat": Param("Upload-Concat", {"type": "string"}, "'partial' or 'final;<url> <url> ...'"),
        "Upload-Expires": Param("Upload-Expires", {"type": "string"}, "an HTTP date"),
        "Location": Param("Location", {"type": "string"}),
        "Content-Range": Param("Content-Range", {"type": "string"}),
        "Content-Disposition": Param("Content-Disposition", {"type": "string"}),
        "Accept-Ranges": Param("Accept-Ranges", {"type": "string"}),
        "ETag": Param("ETag", {"type": "string"}),
        "Last-Modified": Param("Last-Modified", {"type": "string"}),
        "Range": Param("Range", {"type": "string"}, "bytes=<first>-<last>, several ranges, or a suffix range"),
        "If-Range": Param("If-Range", {"type": "string"}),
        "If-None-Match": Param("If-None-Match", {"type": "string"}),
        "If-Modified-Since": Param("If-Modified-Since", {"type": "string"}),
        "Content-Type": Param("Content-Type", {"type": "string"}),
        "Allow": Param("Allow", {"type": "string"}),
    }
    return query, headers


QUERY, HEADERS = _declare()


# -- schemas of the answers ---------------------------------------------------------

PROBLEM: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details; error_code is upstream's '<domain>_<operation>_<detail>', "
                   "the code the manager chooses its exception by",
    "required": ["type", "title", "error_code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "error_code": {"type": "string", "pattern": "^[a-z0-9-]+_[a-z0-9-]+_[a-z0-9-]+$"},
        "msg": {"type": ["string", "null"]},
        "data": {},
    },
}

BGTASK_ID = {"type": "object", "required": ["bgtask_id"],
             "properties": {"bgtask_id": {"type": "string", "format": "uuid"}}}
TOKEN = {"type": "object", "required": ["token"], "properties": {"token": {"type": "string"}}}
STATUS_OK = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
API_STATUS = {"type": "object", "required": ["status", "type", "storage-proxy"],
              "properties": {"status": {"const": "ok"}, "type": {"enum": ["manager-facing", "client-facing"]},
                             "storage-proxy": {"type": "string"}}}
NULLABLE_INT = {"type": ["integer", "null"]}
HEALTH = {"type": "object", "required": ["status", "component", "connectivity"],
          "properties": {"status": {"enum": ["ok", "degraded", "error"]}, "version": {"type": "string"},
                         "component": {"const": "storage-proxy"}, "connectivity": {"type": "object"}}}
VOLUMES = {"type": "object", "required": ["volumes"], "properties": {"volumes": {"type": "array", "items": {
    "type": "object", "required": ["name", "backend", "path", "fsprefix", "capabilities"],
    "properties": {"name": {"type": "string"}, "backend": {"type": "string"}, "path": {"type": "string"},
                   "fsprefix": {"type": "string"}, "capabilities": {"type": "array", "items": {"type": "string"}}}}}}}
USAGE = {"type": "object", "required": ["file_count", "used_bytes"],
         "properties": {"file_count": NULLABLE_INT, "used_bytes": NULLABLE_INT}}
USED_BYTES = {"type": "object", "required": ["used_bytes"], "properties": {"used_bytes": NULLABLE_INT}}
FS_USAGE = {"type": "object", "required": ["capacity_bytes", "used_bytes"],
            "properties": {"capacity_bytes": {"type": "integer"}, "used_bytes": {"type": "integer"}}}
QUOTA_USAGE = {"type": "object", "required": ["used_bytes", "limit_bytes"],
               "properties": {"used_bytes": NULLABLE_INT, "limit_bytes": NULLABLE_INT}}
MOUNT = {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}}
METADATA = {"type": "object", "required": ["status"],
            "properties": {"status": {"const": "ok"}, "payload": {"type": ["string", "null"]}}}
PERFORMANCE = {"type": "object", "required": ["metric", "observed_at"],
               "properties": {"metric": {}, "observed_at": {"type": "string"}}}
_ITEM_RESULT = {"type": "object", "required": ["msg", "item"],
                "properties": {"msg": {"type": ["string", "null"]}, "item": {"type": "string"}}}
MKDIR = {"type": "object", "required": ["results"], "properties": {"results": {
    "type": "object", "required": ["success", "failed"],
    "properties": {"success": {"type": "array", "items": _ITEM_RESULT},
                   "failed": {"type": "array", "items": _ITEM_RESULT}}}}}
LISTING = {"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": {
    "type": "object", "required": ["name", "type", "stat", "symlink_target"],
    "properties": {
        "name": {"type": "string"}, "type": {"enum": ["FILE", "DIRECTORY", "SYMLINK"]},
        "stat": {"type": "object", "required": ["mode", "size", "created", "modified"],
                 "properties": {"mode": {"type": "integer"}, "size": {"type": "integer"},
                                "created": {"type": "string"}, "modified": {"type": "string"}}},
        "symlink_target": {"type": ["string", "null"]}}}}}}
BGTASK = {"type": "object", "required": ["task_id", "name", "status", "progress"],
          "properties": {"task_id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
                         "status": {"type": "string"}, "progress": {"type": "object"},
                         "started_at": {}, "finished_at": {}, "result": {}, "error": {}}}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
BINARY = {"type": "string", "contentMediaType": "application/octet-stream"}
ZIP = {"type": "string", "contentMediaType": "application/zip"}

ERROR_DESCRIPTIONS = {
    400: "invalid parameters, an unknown volume, an OS error of the operation, an unsupported operation",
    403: "a missing or wrong auth token (manager API), a bad, forged, expired or mismatched JWT (client API)",
    404: "no such vfolder, file, quota scope, upload or background task",
    405: "the method is not served on this path",
    409: "already exists, or (tus) an Upload-Offset that is not the upload's offset",
    412: "an unsupported Tus-Resumable",
    413: "a request body over the configured cap, or (tus) past Upload-Length or Tus-Max-Size",
    414: "a request line over 16 KiB",
    415: "a wrong Content-Type",
    416: "a Range outside the file",
    422: "nothing of the batch succeeded",
    460: "(tus) the checksum of the body does not match Upload-Checksum",
    502: "another service (an artifact registry or object storage) failed",
    503: "a gating health check fails",
    507: "no space left, or the quota is exhausted",
}


# -- building the documents ---------------------------------------------------------


def _header_objects(names: Iterable[str]) -> dict[str, Any]:
    return {n: {"schema": HEADERS[n].schema, **({"description": HEADERS[n].description}
                                              if HEADERS[n].description else {})} for n in names}


def _response_object(response: Response) -> dict[str, Any]:
    out: dict[str, Any] = {"description": response.description}
    if response.schema is not None:
        out["content"] = {t: {"schema": response.schema} for t in (response.content_type, *response.also)}
    if response.headers:
        out["headers"] = _header_objects(response.headers)
    return out


def _problem_response(status: int, headers: Sequence[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"description": ERROR_DESCRIPTIONS.get(status, "error"),
                           "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    if headers:
        out["headers"] = _header_objects(headers)
    return out


# OpenAPI links (the stateful phase of schemathesis follows them): what one answer lets a
# client do next, with the same vfolder or task.
_SAME_VFOLDER = {"volume": "$request.body#/volume", "vfid": "$request.body#/vfid"}
_TASK = {"path.task_id": "$response.body#/bgtask_id"}
LINKS: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {
    ("POST", "/folder/create", 204): {
        "mkdir": {"operationId": "POST /folder/file/mkdir", "requestBody": _SAME_VFOLDER},
        "upload": {"operationId": "POST /folder/file/upload", "requestBody": _SAME_VFOLDER},
        "list": {"operationId": "POST /folder/file/list", "requestBody": {**_SAME_VFOLDER, "relpath": "."}},
        "usage": {"operationId": "GET /folder/usage", "requestBody": _SAME_VFOLDER},
        "metadata": {"operationId": "POST /folder/metadata", "requestBody": _SAME_VFOLDER},
        "delete": {"operationId": "POST /folder/delete", "requestBody": _SAME_VFOLDER},
    },
    ("POST", "/folder/file/mkdir", 200): {
        "list": {"operationId": "POST /folder/file/list", "requestBody": {**_SAME_VFOLDER, "relpath": "."}},
        "delete": {"operationId": "POST /folder/file/delete", "requestBody": _SAME_VFOLDER},
    },
    ("POST", "/folder/file/upload", 200): {
        "list": {"operationId": "POST /folder/file/list", "requestBody": {**_SAME_VFOLDER, "relpath": "."}},
        "delete": {"operationId": "POST /folder/file/delete", "requestBody": {
            **_SAME_VFOLDER, "relpaths": ["$request.body#/relpath"]}},
        "download": {"operationId": "POST /folder/file/download", "requestBody": {
            **_SAME_VFOLDER, "relpath": "$request.body#/relpath"}},
    },
    ("POST", "/folder/file/list", 200): {
        "delete-vfolder": {"operationId": "POST /folder/delete", "requestBody": _SAME_VFOLDER},
    },
    ("POST", "/folder/delete", 202): {"task": {"operationId": "GET /bgtask/<task_id>", "parameters": _TASK}},
    ("POST", "/folder/file/delete-async", 202): {
        "task": {"operationId": "GET /bgtask/<task_id>", "parameters": _TASK}},
    ("POST", "/folder/clone", 200): {"task": {"operationId": "GET /bgtask/<task_id>", "parameters": _TASK}},
    ("POST", "/quota-scope", 204): {
        "get": {"operationId": "GET /quota-scope", "requestBody": {"volume": "$request.body#/volume",
                                                                   "qsid": "$request.body#/qsid"}},
        "update": {"operationId": "PATCH /quota-scope", "requestBody": {"volume": "$request.body#/volume",
                                                                        "qsid": "$request.body#/qsid"}},
    },
}


def _operation(route: Route, *, error_headers: Sequence[str] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": f"{route.method} {route.path}", "summary": route.summary or route.path}
    parameters: list[dict[str, Any]] = []
    for name in route.path_params:
        parameters.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
    for name in route.query:
        q = QUERY[name]
        parameters.append({"name": name, "in": "query", "required": name in route.required_query, "schema": q.schema,
                           **({"description": q.description} if q.description else {})})
    for name in route.headers:
        h = HEADERS[name]
        parameters.append({"name": name, "in": "header", "required": False, "schema": h.schema,
                           **({"description": h.description} if h.description else {})})
    if parameters:
        op["parameters"] = parameters
    if route.body:
        properties = {f.name: f.schema() for f in route.body}
        schema: dict[str, Any] = {"type": "object", "properties": properties,
                                  "required": [f.name for f in route.body if f.required],
                                  "additionalProperties": route.allow_extra}
        op["requestBody"] = {"required": bool(schema["required"]),
                             "content": {"application/json": {"schema": schema}}}
    elif route.request_content is not None:
        op["requestBody"] = {"required": True, "content": route.request_content}
    responses: dict[str, Any] = {str(code): _response_object(r) for code, r in sorted(route.responses.items())}
    for (method, path, code), links in LINKS.items():
        if (method, path) == (route.method, route.path) and str(code) in responses:
            responses[str(code)]["links"] = links
    errors = set(route.errors)
    if route.auth:
        errors.add(403)
    if route.body is not None or route.request_content is not None:
        errors.update((400, 413))
    if route.query or route.path_params:
        errors.add(414)  # a request line over 16 KiB (storage.web.site.StorageChannel)
    for code in sorted(errors):
        responses.setdefault(str(code), _problem_response(code, error_headers))
    op["responses"] = responses
    if route.auth:
        op["security"] = [{"manager-secret": []}]
    else:
        op["security"] = []
    return op


def _document(title: str, description: str, routes: Iterable[Route], *, manager: bool,
              error_headers: Sequence[str] = ()) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        paths.setdefault(route.openapi_path, {})[route.method.lower()] = _operation(route, error_headers=error_headers)
    components: dict[str, Any] = {"schemas": {"Problem": PROBLEM}}
    if manager:
        components["securitySchemes"] = {
            "manager-secret": {"type": "apiKey", "in": "header", "name": AUTH_HEADER,
                               "description": "[api.manager] secret"}}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": API_VERSION, "description": description},
        "paths": paths,
        "components": components,
    }


def manager_document() -> dict[str, Any]:
    from storage.api.manager import ROUTES

    return _document(
        "storage-proxy manager API",
        "The manager-facing API of Backend.AI's storage proxy. Parameters are a JSON body, also for GET, "
        "as upstream. Generated from the routes' own parameter declarations.",
        ROUTES, manager=True)


def client_document() -> dict[str, Any]:
    return _document(
        "storage-proxy client API",
        "The client-facing API: downloads (Range, zip archives) and tus 1.0.0 uploads, authenticated by "
        "JWTs the manager API issues, in the token query parameter.",
        CLIENT_ROUTES, manager=False, error_headers=("Tus-Resumable",))


@functools.cache
def manager_document_bytes() -> bytes:
    return json.dumps(manager_document(), indent=1).encode("utf-8")


@functools.cache
def client_document_bytes() -> bytes:
    return json.dumps(client_document(), indent=1).encode("utf-8")


# -- the client API's operations ------------------------------------------------------

_TUS_STATE = ("Tus-Resumable", "Upload-Offset", "Upload-Length", "Upload-Expires")
_DOWNLOAD_HEADERS = ("Accept-Ranges", "ETag", "Last-Modified", "Content-Disposition")
_DOWNLOAD_REQUEST = ("Range", "If-Range", "If-None-Match", "If-Modified-Since")
_TUS_ERRORS = (400, 403, 404, 405, 409, 412, 413, 415, 460, 507)


def _download_responses(body: dict[str, Any] | None) -> dict[int, Response]:
    content = "application/octet-stream"
    return {
        200: Response("the file, or a directory as a zip (archive=true)", body, content, _DOWNLOAD_HEADERS),
        206: Response("the requested range(s)", body, content, (*_DOWNLOAD_HEADERS, "Content-Range")),
        304: Response("not modified (If-None-Match / If-Modified-Since)"),
    }


CLIENT_ROUTES: tuple[Route, ...] = (
    Route("GET", "/", auth=False, responses={200: returns(API_STATUS)}, summary="status"),
    Route("GET", "/openapi.json", auth=False, responses={200: returns(ANY_OBJECT, "this document")},
          summary="this API's OpenAPI document"),
    Route("GET", "/download", auth=False, query=("token", "dst_dir", "archive", "no_cache"), required_query=("token",),
          headers=_DOWNLOAD_REQUEST, responses=_download_responses(BINARY), errors=(400, 403, 404, 416),
          summary="a file (Range, If-Range, conditional), or a directory as a zip"),
    Route("HEAD", "/download", auth=False, query=("token", "dst_dir", "archive", "no_cache"), required_query=("token",),
          headers=_DOWNLOAD_REQUEST, responses=_download_responses(None), errors=(400, 403, 404, 416),
          summary="the headers of GET /download"),
    Route("GET", "/download-archive", auth=False, query=("token",), required_query=("token",),
          responses={200: Response("the listed files and directories as one zip", ZIP, "application/zip",
                                   ("Content-Disposition",))},
          errors=(400, 403, 404), summary="several files and directories as one streamed zip"),
    Route("HEAD", "/download-archive", auth=False, query=("token",), required_query=("token",),
          responses={200: Response("the headers of GET /download-archive", None, "application/zip",
                                   ("Content-Disposition",))},
          errors=(400, 403, 404), summary="the headers of GET /download-archive"),
    Route("OPTIONS", "/upload", auth=False,
          responses={204: Response("tus discovery", None, headers=(
              "Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size", "Tus-Checksum-Algorithm"))},
          summary="tus discovery"),
    Route("HEAD", "/upload", auth=False, query=("token", "dst_dir"), required_query=("token",), headers=("Tus-Resumable",),
          responses={200: Response("the upload's state", None, headers=_TUS_STATE)}, errors=_TUS_ERRORS,
          summary="tus: the upload's offset"),
    Route("PATCH", "/upload", auth=False, query=("token", "dst_dir"), required_query=("token",),
          headers=("Tus-Resumable", "Upload-Offset", "Upload-Checksum", "Upload-Length"),
          request_content={"application/offset+octet-stream": {"schema": BINARY}},
          responses={204: Response("the bytes are stored", None, headers=_TUS_STATE)}, errors=_TUS_ERRORS,
          summary="tus: append bytes at Upload-Offset"),
    Route("POST", "/upload", auth=False, query=("token", "dst_dir"), required_query=("token",),
          headers=("Tus-Resumable", "Upload-Length", "Upload-Defer-Length", "Upload-Metadata", "Upload-Concat"),
          responses={201: Response("created (tus creation / concatenation)", None,
                                   headers=("Tus-Resumable", "Location", "Upload-Offset", "Upload-Expires"))},
          errors=_TUS_ERRORS, summary="tus creation and concatenation (the token's session)"),
    Route("DELETE", "/upload", auth=False, query=("token", "dst_dir"), required_query=("token",), headers=("Tus-Resumable",),
          responses={204: Response("terminated", None, headers=("Tus-Resumable",))}, errors=_TUS_ERRORS,
          summary="tus termination"),
    # A partial upload of the concatenation extension, created by POST /upload with Upload-Concat: partial.
    Route("OPTIONS", "/upload/<upload_id>", auth=False, responses={204: Response("tus discovery", None, headers=(
          "Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size", "Tus-Checksum-Algorithm"))},
          summary="tus discovery"),
    Route("HEAD", "/upload/<upload_id>", auth=False, query=("token",), required_query=("token",),
          headers=("Tus-Resumable",), responses={200: Response("the partial upload's state", None, headers=_TUS_STATE)},
          errors=_TUS_ERRORS, summary="tus: a partial upload's offset"),
    Route("PATCH", "/upload/<upload_id>", auth=False, query=("token",), required_query=("token",),
          headers=("Tus-Resumable", "Upload-Offset", "Upload-Checksum"),
          request_content={"application/offset+octet-stream": {"schema": BINARY}},
          responses={204: Response("the bytes are stored", None, headers=_TUS_STATE)}, errors=_TUS_ERRORS,
          summary="tus: append bytes to a partial upload"),
    Route("DELETE", "/upload/<upload_id>", auth=False, query=("token",), required_query=("token",),
          headers=("Tus-Resumable",), responses={204: Response("terminated", None, headers=("Tus-Resumable",))},
          errors=_TUS_ERRORS, summary="tus termination of a partial upload"),
)
