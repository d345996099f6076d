"""The manager API's shared-secret check.

The manager sends ``X-BackendAI-Storage-Auth-Token: <[api.manager] secret>``.
Upstream compares it as a plain string; we compare in constant time so the
secret cannot be guessed byte by byte from response timings.  The two 403
bodies are upstream's, word for word.
"""

from __future__ import annotations

import hmac

from twisted.web.iweb import IRequest

from storage.errors import Forbidden

AUTH_HEADER = b"X-BackendAI-Storage-Auth-Token"


class MissingAuthToken(Forbidden):
    title = "Forbidden (missing auth token)"


class InvalidAuthToken(Forbidden):
    title = "Forbidden (invalid auth token)"


def token_matches(given: bytes, secret: str) -> bool:
    return hmac.compare_digest(given, secret.encode("utf-8"))


def check_manager_token(request: IRequest, secret: str) -> None:
    """Raise ``MissingAuthToken``/``InvalidAuthToken`` unless the header holds ``secret``."""
    given = request.getHeader(AUTH_HEADER)
    if not given:
        raise MissingAuthToken()
    if not token_matches(given.encode("latin-1") if isinstance(given, str) else given, secret):
        raise InvalidAuthToken()
