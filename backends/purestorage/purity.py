"""A small client for the FlashBlade (Purity//FB) REST API 1.x, on treq.

What the backend needs, with the endpoints upstream uses:

* ``POST /api/login`` with the ``api-token`` header; the session token comes
  back in the ``x-auth-token`` response header and goes on every request.
* ``GET /api/<version>/arrays`` (hardware info),
  ``GET /api/<version>/file-systems?names=<fs>`` (capacity and usage),
  ``GET /api/<version>/file-systems/performance?names=<fs>&protocol=NFS``.
  Lists are paginated: ``items_returned`` and a ``continuation_token`` in
  ``pagination_info`` passed back as ``token``.

Unlike upstream (which logs in again before every call, serialised by a
lock), the session is kept and shared; when the array answers 401 (the
session expired or was revoked) the client logs in once more, whoever else
is waiting shares that login, and the request is retried once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from storage.errors import ExternalServiceError

from .tls import policy_for

log = Logger()

PAGE_SIZE = 10  # what upstream asks for
MAX_PAGES = 1000  # a runaway continuation token must not loop forever


class PurityError(ExternalServiceError):
    """The array answered with an error (or nonsense)."""

    title = "FlashBlade REST API Error"

    def __init__(self, msg: str, *, status: int | None = None, errors: list[str] | None = None) -> None:
        super().__init__(msg, purity_status=status, purity_errors=errors or [])
        self.http_status = status
        self.errors = errors or []


class PurityUnauthorized(PurityError):
    title = "FlashBlade REST API: Unauthorized"


def _error_messages(body: bytes) -> list[str]:
    """Messages from a FlashBlade error body: ``{"errors": [{"message", "context"}]}``."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return [text[:300]] if text else []
    items = []
    if isinstance(data, dict):
        for key in ("errors", "error"):  # REST 1.x SDKs name it either way
            if isinstance(data.get(key), list):
                items = data[key]
                break
    messages = []
    for item in items:
        if not isinstance(item, dict):
            continue
        msg = str(item.get("message") or item.get("pure_err_msg") or "")
        ctx = item.get("context") or item.get("pure_err_context")
        messages.append(f"{msg} ({ctx})" if ctx else msg)
    return [m for m in messages if m]


class PurityClient:
    def __init__(
        self,
        endpoint: str,
        api_token: str,
        *,
        api_version: str = "1.8",
        ssl_verify: bool | str = True,
        timeout: float = 30.0,
        reactor: Any = None,
        http_client: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.endpoint = endpoint.rstrip("/")
        self.api_token = api_token
        self.api_version = api_version
        self.timeout = timeout
        self.reactor = reactor
        self._auth_token: str | None = None
        self._login_waiters: list[Deferred[str]] | None = None
        self._pool: HTTPConnectionPool | None = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            agent: Any = Agent(reactor, contextFactory=policy_for(ssl_verify), pool=self._pool)
            http_client = treq.client.HTTPClient(agent)
        self.http = http_client

    # -- session -----------------------------------------------------------

    def _url(self, *parts: str) -> str:
        return "/".join([self.endpoint, *(quote(p, safe="") for p in parts)])

    async def login(self) -> str:
        """Log in (or join a login already under way); returns the session token."""
        if self._login_waiters is not None:
            waiter: Deferred[str] = Deferred()
            self._login_waiters.append(waiter)
            return await waiter
        self._login_waiters = []
        try:
            token = await self._do_login()
        except Exception as exc:
            waiters, self._login_waiters = self._login_waiters, None
            for w in waiters:
                w.errback(exc)
            raise
        waiters, self._login_waiters = self._login_waiters, None
        for w in waiters:
            w.callback(token)
        return token

    async def _do_login(self) -> str:
        try:
            resp = await self.http.post(
                self._url("api", "login"),
                headers={"api-token": self.api_token, "Accept": "application/json"},
                timeout=self.timeout,
            )
            body = await resp.content()
        except Exception as exc:
            raise PurityError(f"cannot reach the FlashBlade at {self.endpoint}: {exc}") from exc
        if resp.code != 200:
            cls = PurityUnauthorized if resp.code in (401, 403) else PurityError
            messages = _error_messages(body)
            raise cls(
                f"FlashBlade login failed ({resp.code}): {'; '.join(messages) or 'no reason given'}",
                status=resp.code,
                errors=messages,
            )
        token = resp.headers.getRawHeaders("x-auth-token", [None])[0]
        if not token:
            raise PurityError("FlashBlade login answered without an x-auth-token header", status=resp.code)
        self._auth_token = token
        return token

    async def close(self) -> None:
        """Log out (best effort) and close kept-alive connections."""
        token, self._auth_token = self._auth_token, None
        if token is not None:
            try:
                resp = await self.http.post(
                    self._url("api", "logout"), headers={"x-auth-token": token}, timeout=self.timeout
                )
                await resp.content()
            except Exception:
                pass
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    # -- requests ------------------------------------------------------------

    async def get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """GET ``/api/<version>/<path>`` as JSON, logging in (again) as needed."""
        url = self._url("api", self.api_version, *path.split("/"))
        for attempt in (1, 2):
            token = self._auth_token or await self.login()
            try:
                resp = await self.http.get(
                    url,
                    params=dict(params or {}),
                    headers={"x-auth-token": token, "Accept": "application/json"},
                    timeout=self.timeout,
                )
                body = await resp.content()
            except Exception as exc:
                raise PurityError(f"FlashBlade request GET {path} failed: {exc}") from exc
            if resp.code == 401 and attempt == 1:
                # The session expired: log in again once, unless someone already did.
                log.info("FlashBlade session expired; logging in again")
                if self._auth_token == token:
                    self._auth_token = None
                continue
            if resp.code != 200:
                messages = _error_messages(body)
                cls = PurityUnauthorized if resp.code == 401 else PurityError
                raise cls(
                    f"FlashBlade GET {path} answered {resp.code}: {'; '.join(messages) or 'no reason given'}",
                    status=resp.code,
                    errors=messages,
                )
            try:
                data = json.loads(body)
            except ValueError:
                raise PurityError(f"FlashBlade GET {path} answered non-JSON", status=resp.code) from None
            if not isinstance(data, dict):
                raise PurityError(f"FlashBlade GET {path} answered an unexpected body", status=resp.code)
            return data
        raise AssertionError("unreachable")

    async def get_all(
        self, path: str, params: Mapping[str, Any] | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Every item of a paginated list, and the ``total`` of the last page."""
        items: list[dict[str, Any]] = []
        total: dict[str, Any] = {}
        token = ""
        for _ in range(MAX_PAGES):
            page = await self.get(path, {**(params or {}), "items_returned": PAGE_SIZE, "token": token})
            page_items = page.get("items") or []
            if not isinstance(page_items, list):
                raise PurityError(f"FlashBlade GET {path}: 'items' is not a list")
            items.extend(i for i in page_items if isinstance(i, dict))
            if isinstance(page.get("total"), dict):
                total = page["total"]
            next_token = (page.get("pagination_info") or {}).get("continuation_token")
            if not next_token or not page_items:
                return items, total
            token = next_token
        raise PurityError(f"FlashBlade GET {path}: more than {MAX_PAGES} pages")

    # -- what the backend asks --------------------------------------------------

    async def get_metadata(self) -> dict[str, str]:
        """The array's identity, in upstream's ``hwinfo`` metadata shape."""
        items, _ = await self.get_all("arrays")
        if not items:
            return {}
        first = items[0]
        return {
            "id": str(first.get("id", "")),
            "name": str(first.get("name", "")),
            "os": str(first.get("os", "")),
            "revision": str(first.get("revision", "")),
            "version": str(first.get("version", "")),
            # upstream's field: the number of array records (as upstream computes it)
            "blade_count": str(len(items)),
            "console_url": self.endpoint,
        }

    async def get_fs_usage(self, fs_name: str) -> tuple[int, int]:
        """``(capacity_bytes, used_bytes)``: the provisioned size and physical use."""
        items, total = await self.get_all("file-systems", {"names": fs_name})
        if not items:
            raise PurityError(f"no file system named {fs_name!r} on the FlashBlade")
        first = items[0]
        try:
            provisioned = (total or first).get("provisioned", first.get("provisioned"))
            capacity = int(provisioned)  # type: ignore[arg-type]  # None is caught below
            used = int(first["space"]["total_physical"])
        except (KeyError, TypeError, ValueError):
            raise PurityError(f"unexpected file-systems record for {fs_name!r}") from None
        return capacity, used

    async def get_nfs_metric(self, fs_name: str) -> dict[str, Any] | None:
        """The file system's latest NFS performance record (None if none)."""
        page = await self.get(
            "file-systems/performance",
            {"names": fs_name, "protocol": "NFS", "items_returned": PAGE_SIZE, "token": ""},
        )
        items = page.get("items") or []
        return items[0] if items and isinstance(items[0], dict) else None
