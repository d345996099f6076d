"""JSON responses and RFC 7807 problem bodies for every failure.

``add_error_handling`` gives a Klein app three handlers, tried in order:
our ``StorageError`` (its own status and problem type), werkzeug's routing
errors (404/405 as problem+json instead of HTML), and a catch-all that logs
the method, path and volume with the traceback and answers a JSON 500.  No
request ever sees Twisted's HTML error page.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException

from storage.errors import PROBLEM_BASE, StorageError, out_of_descriptors

log = Logger()

JSON = b"application/json"
PROBLEM_JSON = b"application/problem+json"
# A path or method no route serves (upstream: aiohttp's text/plain 404/405).
ROUTING_NOT_FOUND = "storage-proxy_request_not-found"
ROUTING_BAD_REQUEST = "storage-proxy_request_bad-request"


def json_body(request: IRequest, body: Any, status: int = 200, content_type: bytes = JSON) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type)
    return json.dumps(body).encode("utf-8")


def problem(request: IRequest, status: int, body: dict[str, Any]) -> bytes:
    return json_body(request, body, status, PROBLEM_JSON)


def problem_for(request: IRequest, exc: StorageError, *, client: bool = False) -> bytes:
    for name, value in getattr(exc, "headers", {}).items():
        request.setHeader(name.encode(), value.encode())
    return problem(request, exc.status, exc.body(client=client))


def _describe(request: IRequest) -> dict[str, str]:
    return {
        "method": request.method.decode("latin-1", "replace"),
        "path": request.path.decode("latin-1", "replace"),
        "volume": str(getattr(request, "storage_volume", None) or "-"),
    }


def handle_storage_error(request: IRequest, failure: Failure, *, client: bool = False) -> bytes:
    exc = failure.value
    assert isinstance(exc, StorageError)
    if exc.status >= 500 and getattr(exc, "external", False):
        # Another service failed (a hub, say) and the message says how: one line, no traceback.
        log.warn("{method} {path}: {error_code}: {msg}", error_code=exc.error_code, msg=str(exc),
                 **_describe(request))
    elif exc.status >= 500:
        log.failure("{method} {path} (volume {volume}) failed", failure, **_describe(request))  # type: ignore[arg-type]
    return problem_for(request, exc, client=client)


def handle_http_exception(request: IRequest, failure: Failure) -> bytes:
    exc = failure.value
    assert isinstance(exc, HTTPException)
    code = exc.code or 500
    slug = {404: "not-found", 405: "method-not-allowed"}.get(code, "http-error")
    valid_methods = getattr(exc, "valid_methods", None)
    if code == 405 and valid_methods:
        request.setHeader(b"Allow", ", ".join(valid_methods).encode())
    error_code = ROUTING_NOT_FOUND if code == 404 else ROUTING_BAD_REQUEST
    return problem(request, code, {"type": PROBLEM_BASE + slug, "title": exc.name, "error_code": error_code})


def handle_unexpected(request: IRequest, failure: Failure) -> bytes | None:
    if failure.check(CancelledError):
        # The client went away and Klein cancelled the handler: nobody to answer.
        return None
    busy = out_of_descriptors(failure.value)
    if busy is not None:
        log.warn("{method} {path}: {msg}", msg=str(busy), **_describe(request))
        return problem_for(request, busy)
    log.failure("{method} {path} (volume {volume}): unexpected error", failure, **_describe(request))  # type: ignore[arg-type]
    return problem(
        request,
        500,
        {"type": PROBLEM_BASE + "generic", "title": "Internal Server Error", "error_code": StorageError.error_code,
         "msg": "an unexpected error happened; it has been logged"},
    )


class Utf8PathGuard(Resource):
    """Klein answers a non-UTF-8 URL path with a text/html 400; we answer problem+json."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def render(self, request: Any) -> Any:
        try:
            # What Klein decodes: the (unquoted) path segments and the host name.
            for part in (*request.prepath, *request.postpath, request.getRequestHostname()):
                part.decode("utf-8")
        except UnicodeDecodeError:
            return problem(request, 400, {"type": PROBLEM_BASE + "invalid-path", "title": "Invalid Path",
                                          "error_code": ROUTING_BAD_REQUEST, "msg": "the URL is not valid UTF-8"})
        return self.inner.render(request)


def add_error_handling(app: Klein, *, client: bool = False) -> None:
    """Register the three handlers on a Klein app (class-level apps pass ``self`` first).

    ``client``: the client-facing API, whose errors carry ``client_error_code``.
    """

    def wrap(f: Any) -> Any:
        def handler(*args: Any) -> Any:
            request, failure = args[-2], args[-1]
            return f(request, failure)

        return handler

    def storage_error(request: IRequest, failure: Failure) -> bytes:
        return handle_storage_error(request, failure, client=client)

    app.handle_errors(StorageError)(wrap(storage_error))
    app.handle_errors(HTTPException)(wrap(handle_http_exception))
    app.handle_errors(Exception)(wrap(handle_unexpected))
