"""A fake FlashBlade REST API 1.x, enough for the purestorage backend's contract.

It implements what the backend calls and fails the way the documented API
does: every error is JSON ``{"errors": [{"code", "context", "message"}]}``;
an unknown, missing or expired ``x-auth-token`` is 401; a bad ``api-token``
at login is 401; an unknown file-system name is 400; an unsupported API
version is 404.  Lists are paginated with ``items_returned`` and a
``continuation_token`` returned in ``pagination_info`` and passed back as
``token``.  Test hooks: ``expire_sessions()``, ``logins``, ``requests``.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from klein import Klein

API_TOKEN = "T-7f3c2a"  # what the fixtures configure
SUPPORTED_VERSIONS = {f"1.{n}" for n in range(13)}


class FakeFlashBlade:
    app = Klein()

    def __init__(self, api_token: str = "T-123") -> None:
        self.api_token = api_token
        self.sessions: set[str] = set()
        self.logins = 0
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self._continuations: dict[str, int] = {}
        self.arrays = [
            {"id": "a1b2c3", "name": "fb-test", "os": "Purity//FB", "revision": "201908.10", "version": "3.3.2"},
        ]
        self.file_systems: dict[str, dict[str, Any]] = {
            "backendai": {
                "name": "backendai",
                "provisioned": 100 * 2**40,
                "space": {"virtual": 7 * 2**30, "unique": 5 * 2**30, "snapshots": 0, "total_physical": 5 * 2**30},
                "hard_limit_enabled": True,
            }
        }
        self.performance: dict[str, dict[str, Any]] = {
            "backendai": {
                "name": "backendai",
                "reads_per_sec": 1200.0,
                "writes_per_sec": 340.5,
                "read_bytes_per_sec": 512 * 2**20,
                "write_bytes_per_sec": 64 * 2**20,
                "usec_per_read_op": 310.0,
                "usec_per_write_op": 820.25,
                "others_per_sec": 12.0,
                "time": 1732450000000,
            }
        }

    # -- test hooks --------------------------------------------------------------

    def expire_sessions(self) -> None:
        """Every session token stops working (as after the idle timeout)."""
        self.sessions.clear()

    # -- helpers -----------------------------------------------------------------

    @staticmethod
    def _json(request: Any, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader("Content-Type", "application/json")
        return json.dumps(body).encode()

    def _error(self, request: Any, code: int, message: str, context: str | None = None) -> bytes:
        err: dict[str, Any] = {"code": code, "message": message}
        if context is not None:
            err["context"] = context
        return self._json(request, code, {"errors": [err]})

    def _authorized(self, request: Any) -> bool:
        token = request.getHeader("x-auth-token")
        return token is not None and token in self.sessions

    def _args(self, request: Any) -> dict[str, list[str]]:
        return {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()}

    def _page(self, request: Any, items: list[dict[str, Any]], total: dict[str, Any] | None = None) -> bytes:
        args = self._args(request)
        try:
            limit = int(args.get("items_returned", ["0"])[0] or 0)
        except ValueError:
            return self._error(request, 400, "Invalid value for items_returned", "items_returned")
        token = args.get("token", [""])[0]
        if token:
            if token not in self._continuations:
                return self._error(request, 400, "Invalid continuation token", "token")
            start = self._continuations.pop(token)
        else:
            start = 0
        end = len(items) if limit <= 0 else min(len(items), start + limit)
        next_token = None
        if end < len(items):
            next_token = secrets.token_hex(8)
            self._continuations[next_token] = end
        body: dict[str, Any] = {
            "pagination_info": {"total_item_count": len(items), "continuation_token": next_token},
            "items": items[start:end],
        }
        if total is not None:
            body["total"] = total
        return self._json(request, 200, body)

    def _guard(self, request: Any, version: str) -> bytes | None:
        self.requests.append((request.method.decode(), request.path.decode(), self._args(request)))
        if version not in SUPPORTED_VERSIONS:
            return self._error(request, 404, f"API version {version} is not supported")
        if not self._authorized(request):
            return self._error(request, 401, "Authentication failed: invalid or expired session token")
        return None

    def _names(self, request: Any, table: dict[str, dict[str, Any]]) -> list[dict[str, Any]] | bytes:
        names = self._args(request).get("names")
        if not names:
            return list(table.values())
        wanted = [n for arg in names for n in arg.split(",")]
        for name in wanted:
            if name not in table:
                return self._error(request, 400, "File system does not exist.", name)
        return [table[n] for n in wanted]

    # -- routes ----------------------------------------------------------------

    @app.route("/api/api_version", methods=["GET"])
    def api_version(self, request: Any) -> bytes:
        return self._json(request, 200, {"versions": sorted(SUPPORTED_VERSIONS, key=lambda v: int(v[2:]))})

    @app.route("/api/login", methods=["POST"])
    def login(self, request: Any) -> bytes:
        self.requests.append(("POST", "/api/login", {}))
        if request.getHeader("api-token") != self.api_token:
            return self._error(request, 401, "Authentication failed: invalid API token")
        self.logins += 1
        session = secrets.token_hex(16)
        self.sessions.add(session)
        request.setHeader("x-auth-token", session)
        return self._json(request, 200, {"username": "pureuser"})

    @app.route("/api/logout", methods=["POST"])
    def logout(self, request: Any) -> bytes:
        self.sessions.discard(request.getHeader("x-auth-token") or "")
        return self._json(request, 200, {})

    @app.route("/api/<version>/arrays", methods=["GET"])
    def arrays(self, request: Any, version: str) -> bytes:
        return self._guard(request, version) or self._page(request, self.arrays)

    @app.route("/api/<version>/file-systems", methods=["GET"])
    def file_systems(self, request: Any, version: str) -> bytes:
        denied = self._guard(request, version)
        if denied:
            return denied
        items = self._names(request, self.file_systems)
        if isinstance(items, bytes):
            return items
        total = {
            "name": "",
            "provisioned": sum(i["provisioned"] for i in items),
            "space": {"total_physical": sum(i["space"]["total_physical"] for i in items)},
        }
        return self._page(request, items, total)

    @app.route("/api/<version>/file-systems/performance", methods=["GET"])
    def fs_performance(self, request: Any, version: str) -> bytes:
        denied = self._guard(request, version)
        if denied:
            return denied
        protocol = self._args(request).get("protocol", [None])[0]
        if protocol not in (None, "NFS", "HTTP", "S3", "SMB"):
            return self._error(request, 400, "Invalid protocol", "protocol")
        items = self._names(request, self.performance)
        if isinstance(items, bytes):
            return items
        return self._page(request, items)

    @app.route("/", branch=True)
    def not_found(self, request: Any) -> bytes:
        return self._error(request, 404, "Not found")
