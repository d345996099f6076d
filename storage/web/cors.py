"""CORS for the client API, applied once for every route and every answer.

Browsers reach the client API from the web UI's origin.  Upstream's client app
allows any origin with credentials, any method, any request header, and
exposes every response header; we do the same by default:

* ``CORSPolicy.apply`` runs when a response's headers are about to be written
  (``StreamingRequest.write``), so successes, problem+json errors and streamed
  downloads all carry ``Access-Control-Allow-Origin`` and
  ``Access-Control-Expose-Headers`` (the fixed list below plus every header of
  that response).
* ``CORSResource`` answers preflights (``OPTIONS`` with
  ``Access-Control-Request-Method``) with 204 before routing; ``/upload`` is
  still routed so its tus ``OPTIONS`` headers stay.

With credentials allowed the origin is echoed with ``Vary: Origin`` (the spec
forbids ``*`` with credentials); a request from an origin that is not allowed
gets no CORS headers, so the browser blocks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.web.resource import Resource

ALLOW_METHODS = b"GET, HEAD, POST, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = (
    "Range, If-Range, If-Match, If-None-Match, If-Modified-Since, Content-Type, Authorization, "
    "X-Requested-With, X-HTTP-Method-Override, Tus-Resumable, Upload-Length, Upload-Offset, "
    "Upload-Metadata, Upload-Checksum, Upload-Concat, Upload-Defer-Length"
)
EXPOSE_HEADERS = (
    "Content-Range", "Content-Disposition", "Content-Length", "Content-Type", "Content-Encoding",
    "Accept-Ranges", "ETag", "Last-Modified", "Location", "Upload-Offset", "Upload-Length",
    "Upload-Metadata", "Upload-Expires", "Upload-Concat", "Upload-Defer-Length", "Tus-Resumable",
    "Tus-Version", "Tus-Max-Size", "Tus-Extension", "Tus-Checksum-Algorithm",
)
# Never listed in Expose-Headers: the CORS headers themselves.
_NOT_EXPOSED = {"access-control-allow-origin", "access-control-allow-credentials",
                "access-control-expose-headers", "access-control-allow-methods",
                "access-control-allow-headers", "access-control-max-age", "vary"}
MAX_AGE = b"86400"


@dataclass(frozen=True)
class CORSPolicy:
    allowed_origins: tuple[str, ...] = ("*",)
    allow_credentials: bool = True

    def origin_header(self, origin: bytes | None) -> bytes | None:
        """The Access-Control-Allow-Origin value for a request's Origin, or None (refused)."""
        any_origin = "*" in self.allowed_origins
        if origin is None:
            return b"*" if any_origin else None
        if not any_origin and origin.decode("latin-1") not in self.allowed_origins:
            return None
        if any_origin and not self.allow_credentials:
            return b"*"
        return origin

    def apply(self, request: Any) -> None:
        """Set the CORS headers of a response whose headers are not yet written."""
        headers = request.responseHeaders
        for name in (b"Access-Control-Allow-Origin", b"Access-Control-Allow-Credentials"):
            headers.removeHeader(name)
        origin = request.getHeader(b"origin")
        allow = self.origin_header(origin)
        if origin is not None:
            _add_vary(headers, b"Origin")
        if allow is None:
            headers.removeHeader(b"Access-Control-Expose-Headers")
            return
        headers.setRawHeaders(b"Access-Control-Allow-Origin", [allow])
        if self.allow_credentials and allow != b"*":
            headers.setRawHeaders(b"Access-Control-Allow-Credentials", [b"true"])
        names = list(EXPOSE_HEADERS)
        seen = {n.lower() for n in names}
        for raw, _ in headers.getAllRawHeaders():
            name = raw.decode("latin-1")
            if name.lower() not in seen and name.lower() not in _NOT_EXPOSED:
                seen.add(name.lower())
                names.append(name)
        headers.setRawHeaders(b"Access-Control-Expose-Headers", [", ".join(names).encode("latin-1")])
        if is_preflight(request):
            self.preflight_headers(request)  # over what a route set (tus OPTIONS)

    def early_headers(self, request: Any, headers: dict[bytes, bytes] | None) -> dict[bytes, bytes]:
        """CORS headers for an answer written before routing (a refused body)."""
        out = {k: v for k, v in (headers or {}).items() if not k.lower().startswith(b"access-control-allow")}
        allow = self.origin_header(request.getHeader(b"origin"))
        if allow is not None:
            out[b"Access-Control-Allow-Origin"] = allow
            if self.allow_credentials and allow != b"*":
                out[b"Access-Control-Allow-Credentials"] = b"true"
            out[b"Access-Control-Expose-Headers"] = ", ".join(EXPOSE_HEADERS).encode()
        return out

    def preflight_headers(self, request: Any) -> None:
        request.setHeader(b"Access-Control-Allow-Methods", ALLOW_METHODS)
        asked = request.getHeader(b"access-control-request-headers")
        allowed = ALLOW_HEADERS
        if asked:
            # Upstream allows any request header: echo what the browser asks for.
            extra = [h.strip() for h in asked.decode("latin-1").split(",") if h.strip()]
            known = {h.strip().lower() for h in allowed.split(",")}
            allowed = ", ".join([allowed, *[h for h in extra if h.lower() not in known]])
        request.setHeader(b"Access-Control-Allow-Headers", allowed.encode("latin-1"))
        request.setHeader(b"Access-Control-Max-Age", MAX_AGE)


def _add_vary(headers: Any, value: bytes) -> None:
    current = b", ".join(headers.getRawHeaders(b"Vary", []))
    if value.lower() not in [v.strip().lower() for v in current.split(b",")]:
        headers.setRawHeaders(b"Vary", [current + b", " + value if current else value])


def is_preflight(request: Any) -> bool:
    return request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method") is not None


class CORSResource(Resource):
    """Answers CORS preflights; everything else goes to ``inner``."""

    isLeaf = True

    def __init__(self, inner: Any, policy: CORSPolicy, routed_prefixes: tuple[bytes, ...] = (b"/upload",)) -> None:
        super().__init__()
        self.inner = inner
        self.policy = policy
        self.routed_prefixes = routed_prefixes

    def render(self, request: Any) -> Any:
        if is_preflight(request):
            self.policy.preflight_headers(request)
            path = request.path or b"/"
            if not any(path == p or path.startswith(p + b"/") for p in self.routed_prefixes):
                request.setResponseCode(204)
                request.defaultContentType = None
                return b""
        return self.inner.render(request)
