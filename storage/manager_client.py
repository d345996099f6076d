"""A treq client for the manager API, one method per route.

What a Backend.AI manager (or a test) uses to drive a storage proxy::

    client = ManagerClient("http://127.0.0.1:6022", secret)
    await client.create_folder("local", vfid)
    task_id = await client.clone_folder("local", vfid, other_vfid)
    state = await client.wait_bgtask(task_id)

Methods return the parsed JSON body (``None`` for 204).  A response that is
not a success raises ``ManagerAPIError`` (a subclass per common status, so
``except NotFound`` works) carrying the status and the problem body.
``treq`` may be the ``treq`` module (default), an ``HTTPClient`` or a
``treq.testing.StubTreq``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any

from treq.content import collect, content

AUTH_HEADER = "X-BackendAI-Storage-Auth-Token"


class ManagerAPIError(Exception):
    """A non-success answer: ``status``, ``body`` (parsed JSON if it was JSON, else text)."""

    status: int = 0

    def __init__(self, status: int, body: Any, method: str = "", path: str = "") -> None:
        self.status = status
        self.body = body
        self.method = method
        self.path = path
        title = body.get("title") if isinstance(body, dict) else None
        msg = body.get("msg") if isinstance(body, dict) else None
        detail = " - ".join(str(x) for x in (title, msg) if x) or (str(body)[:200] if body else "")
        super().__init__(f"{method} {path} -> {status}: {detail}")

    @property
    def problem_type(self) -> str | None:
        return self.body.get("type") if isinstance(self.body, dict) else None

    @property
    def data(self) -> Any:
        return self.body.get("data") if isinstance(self.body, dict) else None


class BadRequest(ManagerAPIError):
    status = 400


class Forbidden(ManagerAPIError):
    status = 403


class NotFound(ManagerAPIError):
    status = 404


class MethodNotAllowed(ManagerAPIError):
    status = 405


class Conflict(ManagerAPIError):
    status = 409


class RequestTooLarge(ManagerAPIError):
    status = 413


class Unprocessable(ManagerAPIError):
    """422: e.g. every directory of a mkdir batch failed (``body["results"]``)."""

    status = 422


class ServerError(ManagerAPIError):
    status = 500


class ServiceUnavailable(ServerError):
    status = 503


class InsufficientStorage(ServerError):
    status = 507


_BY_STATUS: dict[int, type[ManagerAPIError]] = {
    cls.status: cls
    for cls in (BadRequest, Forbidden, NotFound, MethodNotAllowed, Conflict, RequestTooLarge, Unprocessable,
                ServerError, ServiceUnavailable, InsufficientStorage)
}


def error_for(status: int, body: Any, method: str = "", path: str = "") -> ManagerAPIError:
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ManagerAPIError)
    return cls(status, body, method, path)


class BackgroundTaskFailed(Exception):
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        super().__init__(f"background task {state.get('task_id')} {state.get('status')}: {state.get('error')}")


class ManagerClient:
    def __init__(self, base_url: str, secret: str, treq: Any = None, reactor: Any = None) -> None:
        if treq is None:
            import treq as treq_module

            treq = treq_module
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.treq = treq
        self.reactor = reactor
        # The last response, for callers (tests) that check headers too.
        self.last_response: Any = None

    # -- plumbing -------------------------------------------------------------

    async def _send(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        headers = {AUTH_HEADER: self.secret} if auth else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        response = await self.treq.request(method, self.base_url + path, **kwargs)
        self.last_response = response
        return response

    async def _error(self, response: Any, method: str, path: str) -> ManagerAPIError:
        raw = await content(response)
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        return error_for(response.code, body, method, path)

    async def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                      ok: tuple[int, ...] = (200, 201, 202, 204)) -> Any:
        """Send one request; the parsed JSON answer, or ``ManagerAPIError``."""
        response = await self._send(method, path, body, auth=auth)
        if response.code not in ok:
            raise await self._error(response, method, path)
        raw = await content(response)
        if response.code == 204 or not raw:
            return None
        return json.loads(raw)

    # -- status, health, metrics --------------------------------------------

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/", auth=False)

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/health", auth=False)

    async def livez(self) -> dict[str, Any]:
        return await self.request("GET", "/livez", auth=False)

    async def readyz(self) -> dict[str, Any]:
        return await self.request("GET", "/readyz", auth=False)

    async def metrics(self) -> str:
        response = await self._send("GET", "/metrics", auth=False)
        if response.code != 200:
            raise await self._error(response, "GET", "/metrics")
        return (await content(response)).decode("utf-8")

    # -- volumes --------------------------------------------------------------

    async def volumes(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/volumes"))["volumes"]

    async def hwinfo(self, volume: str) -> dict[str, Any]:
        return await self.request("GET", "/volume/hwinfo", {"volume": volume})

    async def performance_metric(self, volume: str) -> dict[str, Any]:
        return await self.request("GET", "/volume/performance-metric", {"volume": volume})

    async def fs_usage(self, volume: str) -> dict[str, Any]:
        return await self.request("GET", "/folder/fs-usage", {"volume": volume})

    async def get_quota(self, volume: str, vfid: str | None = None) -> Any:
        """Deprecated upstream: always raises ``BadRequest``."""
        return await self.request("GET", "/volume/quota", {"volume": volume, "vfid": vfid})

    async def set_quota(self, volume: str, size_bytes: int | str, vfid: str | None = None) -> Any:
        """Deprecated upstream: always raises ``BadRequest``."""
        return await self.request("PATCH", "/volume/quota", {"volume": volume, "vfid": vfid, "size_bytes": size_bytes})

    # -- quota scopes --------------------------------------------------------

    async def create_quota_scope(self, volume: str, qsid: str, limit_bytes: int | None = None,
                                 extra_args: dict[str, Any] | None = None) -> None:
        options = {"limit_bytes": limit_bytes} if limit_bytes is not None else None
        await self.request("POST", "/quota-scope",
                           {"volume": volume, "qsid": qsid, "options": options, "extra_args": extra_args})

    async def get_quota_scope(self, volume: str, qsid: str) -> dict[str, Any]:
        return await self.request("GET", "/quota-scope", {"volume": volume, "qsid": qsid})

    async def update_quota_scope(self, volume: str, qsid: str, limit_bytes: int) -> None:
        await self.request("PATCH", "/quota-scope",
                           {"volume": volume, "qsid": qsid, "options": {"limit_bytes": limit_bytes}})

    async def unset_quota(self, volume: str, qsid: str) -> None:
        await self.request("DELETE", "/quota-scope/quota", {"volume": volume, "qsid": qsid})

    # -- vfolders -----------------------------------------------------------

    async def create_folder(self, volume: str, vfid: str, mode: int | None = None,
                            options: dict[str, Any] | None = None) -> None:
        body: dict[str, Any] = {"volume": volume, "vfid": vfid}
        if mode is not None:
            body["mode"] = mode
        if options is not None:
            body["options"] = options
        await self.request("POST", "/folder/create", body)

    async def delete_folder(self, volume: str, vfid: str) -> str:
        """Starts the delete; returns the background task id."""
        return (await self.request("POST", "/folder/delete", {"volume": volume, "vfid": vfid}))["bgtask_id"]

    async def clone_folder(self, src_volume: str, src_vfid: str, dst_vfid: str,
                           dst_volume: str | None = None) -> str:
        """Starts the clone; returns the background task id."""
        body = {"src_volume": src_volume, "src_vfid": src_vfid, "dst_volume": dst_volume, "dst_vfid": dst_vfid}
        return (await self.request("POST", "/folder/clone", body))["bgtask_id"]

    async def mount(self, volume: str, vfid: str, subpath: str = ".") -> str:
        return (await self.request("GET", "/folder/mount", {"volume": volume, "vfid": vfid, "subpath": subpath}))[
            "path"
        ]

    async def get_metadata(self, volume: str, vfid: str) -> dict[str, Any]:
        return await self.request("GET", "/folder/metadata", {"volume": volume, "vfid": vfid})

    async def set_metadata(self, volume: str, vfid: str, payload: str) -> dict[str, Any]:
        return await self.request("POST", "/folder/metadata", {"volume": volume, "vfid": vfid, "payload": payload})

    async def usage(self, volume: str, vfid: str) -> dict[str, Any]:
        return await self.request("GET", "/folder/usage", {"volume": volume, "vfid": vfid})

    async def used_bytes(self, volume: str, vfid: str) -> int:
        return (await self.request("GET", "/folder/used-bytes", {"volume": volume, "vfid": vfid}))["used_bytes"]

    # -- files ----------------------------------------------------------------

    async def mkdir(self, volume: str, vfid: str, relpath: str | list[str], parents: bool = True,
                    exist_ok: bool = False) -> dict[str, Any]:
        """``{"results": {"success": [...], "failed": [...]}}`` for 200 and 207; 422 raises ``Unprocessable``."""
        body = {"volume": volume, "vfid": vfid, "relpath": relpath, "parents": parents, "exist_ok": exist_ok}
        return await self.request("POST", "/folder/file/mkdir", body, ok=(200, 207))

    async def list_files(self, volume: str, vfid: str, relpath: str = ".") -> list[dict[str, Any]]:
        return (await self.request("POST", "/folder/file/list", {"volume": volume, "vfid": vfid, "relpath": relpath}))[
            "items"
        ]

    async def rename(self, volume: str, vfid: str, relpath: str, new_name: str, is_dir: bool = False) -> None:
        await self.request("POST", "/folder/file/rename",
                           {"volume": volume, "vfid": vfid, "relpath": relpath, "new_name": new_name,
                            "is_dir": is_dir})

    async def move(self, volume: str, vfid: str, src_relpath: str, dst_relpath: str) -> None:
        await self.request("POST", "/folder/file/move",
                           {"volume": volume, "vfid": vfid, "src_relpath": src_relpath, "dst_relpath": dst_relpath})

    async def fetch(self, volume: str, vfid: str, relpath: str) -> bytes:
        """The whole file in memory; use ``fetch_to`` for large files.

        A missing file reads as empty (the route answers an empty 200, as upstream).
        """
        chunks: list[bytes] = []
        await self.fetch_to(volume, vfid, relpath, chunks.append)
        return b"".join(chunks)

    async def fetch_to(self, volume: str, vfid: str, relpath: str,
                       sink: IO[bytes] | Callable[[bytes], Any]) -> None:
        """Stream the file into ``sink`` (a binary file or a callable taking chunks)."""
        path = "/folder/file/fetch"
        response = await self.treq.request(
            "POST", self.base_url + path,
            headers={AUTH_HEADER: self.secret, "Content-Type": "application/json"},
            data=json.dumps({"volume": volume, "vfid": vfid, "relpath": relpath}).encode(),
            unbuffered=True,
        )
        if response.code != 200:
            raise await self._error(response, "POST", path)
        target: Callable[[bytes], Any] = sink if callable(sink) else sink.write

        def write(data: bytes) -> None:
            target(data)

        await collect(response, write)

    async def download_token(self, volume: str, vfid: str, relpath: str, archive: bool = False,
                             unmanaged_path: str | None = None) -> str:
        body = {"volume": volume, "vfid": vfid, "relpath": relpath, "archive": archive,
                "unmanaged_path": unmanaged_path}
        return (await self.request("POST", "/folder/file/download", body))["token"]

    async def archive_download_token(self, volume: str, vfid: str, files: list[str],
                                     filename: str | None = None) -> str:
        body = {"volume": volume, "virtual_folder_id": vfid, "files": files, "filename": filename}
        return (await self.request("POST", "/folder/file/archive-download-token", body))["token"]

    async def upload_token(self, volume: str, vfid: str, relpath: str, size: int) -> str:
        body = {"volume": volume, "vfid": vfid, "relpath": relpath, "size": size}
        return (await self.request("POST", "/folder/file/upload", body))["token"]

    async def delete_files(self, volume: str, vfid: str, relpaths: list[str], recursive: bool = False) -> dict[str, Any]:
        return await self.request("POST", "/folder/file/delete",
                                  {"volume": volume, "vfid": vfid, "relpaths": relpaths, "recursive": recursive})

    async def delete_files_async(self, volume: str, vfid: str, relpaths: list[str], recursive: bool = False) -> str:
        body = {"volume": volume, "vfid": vfid, "relpaths": relpaths, "recursive": recursive}
        return (await self.request("POST", "/folder/file/delete-async", body))["bgtask_id"]

    # -- background tasks ----------------------------------------------------

    async def bgtask(self, task_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/bgtask/{task_id}")

    async def cancel_bgtask(self, task_id: str) -> dict[str, Any]:
        return await self.request("POST", f"/bgtask/{task_id}/cancel")

    async def wait_bgtask(self, task_id: str, interval: float = 0.05, timeout: float = 60.0,
                          raise_on_failure: bool = True) -> dict[str, Any]:
        """Poll until the task is no longer running; its final state."""
        from twisted.internet import task

        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        waited = 0.0
        while True:
            state = await self.bgtask(task_id)
            if state["status"] != "running":
                if raise_on_failure and state["status"] != "done":
                    raise BackgroundTaskFailed(state)
                return state
            if waited >= timeout:
                raise TimeoutError(f"background task {task_id} still running after {timeout}s")
            await task.deferLater(reactor, interval, lambda: None)
            waited += interval
