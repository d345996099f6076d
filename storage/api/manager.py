"""Manager-facing API: upstream 26.9.6's routes, on Klein.

Routes decode and validate the JSON body (``storage.api.params``), check the
shared secret (``storage.auth``), call the volume's backend and encode the
answer; they know nothing about filesystems.  Long operations (vfolder
delete and clone, delete-async) run as background tasks that
``GET /bgtask/<id>`` reports on.  Failures are problem+json, never HTML
(``storage.api.problems``).  See ``docs/manager-api.md``.
"""

from __future__ import annotations

import functools
import json
import os
import stat as stat_module
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from zope.interface import implementer

from backends.base import AbstractVolume, QuotaConfig
from storage import API_VERSION, tokens
from storage.api import params as p
from storage.api.openapi import (
    ANY_OBJECT,
    API_STATUS,
    BGTASK,
    BGTASK_ID,
    BINARY,
    FS_USAGE,
    HEALTH,
    LISTING,
    METADATA,
    MKDIR,
    MOUNT,
    NO_CONTENT,
    PERFORMANCE,
    QUOTA_USAGE,
    STATUS_OK,
    TOKEN,
    USAGE,
    USED_BYTES,
    VOLUMES,
    Response,
    Route,
    returns,
)
from storage.api.params import Field
from storage.api.problems import Utf8PathGuard, add_error_handling, json_body
from storage.artifacts.huggingface import HuggingFaceRegistries
from storage.artifacts.registry import ArtifactStorages, ArtifactStorageService
from storage.auth import check_manager_token
from storage.errors import (
    DeprecatedAPI,
    ExecutionError,
    FileNotFound,
    FileOperationFailed,
    InsufficientStorage,
    InvalidAPIParameters,
    InvalidPath,
    InvalidQuotaConfig,
    InvalidSubpath,
    NotFound,
    QuotaScopeExists,
    QuotaScopeNotFound,
    StorageError,
    UnsupportedOperation,
    VFolderExists,
    VFolderNotFound,
    is_disk_full,
)
from storage.health import HealthChecker, health_body
from storage.metrics import ManagerMetrics
from storage.vfid import VFolderID
from storage.web.site import StorageSite

log = Logger()

# Upstream's DEFAULT_VFOLDER_PERMISSION_MODE.
DEFAULT_VFOLDER_MODE = 0o775
FETCH_CHUNK = 256 * 1024
METRICS_FS_TIMEOUT = 2.0

app = Klein()
add_error_handling(app)


class MountVFolderNotFound(VFolderNotFound):
    """``/folder/mount`` answers a missing vfolder with 400, as upstream."""

    status = 400


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


LISTING_BATCH = 256


def _encode_listing(entries: list[Any]) -> bytes:
    """``{"items": [...]}``, encoded in small batches.

    ``json.dumps`` runs in C without ever letting go of the GIL: one call
    over 100 000 entries would stall the reactor thread for a few hundred
    milliseconds.  Batches keep each stretch short.
    """
    parts = []
    for start in range(0, len(entries), LISTING_BATCH):
        items = [
            {
                "name": e.name,
                "type": e.type,
                "stat": {"mode": e.mode, "size": e.size, "created": _iso(e.created), "modified": _iso(e.modified)},
                "symlink_target": e.symlink_target,
            }
            for e in entries[start:start + LISTING_BATCH]
        ]
        parts.append(json.dumps(items)[1:-1])
    return ('{"items": [' + ", ".join(p for p in parts if p) + "]}").encode("utf-8")


# -- turning backend failures into API errors --------------------------------------


def _os_error(exc: OSError, vfolder: Path) -> StorageError:
    """Upstream answers an OSError of a file operation with 400 {msg, errno, paths}."""
    msg = exc.strerror or str(exc)
    if is_disk_full(exc):
        return InsufficientStorage(msg, errno=exc.errno)
    paths = []
    for name in (exc.filename, exc.filename2):
        if not name:
            continue
        name = os.fsdecode(name)
        try:
            name = str(Path(name).relative_to(vfolder))
        except ValueError:
            name = os.path.basename(name)  # never reveal where volumes live
        paths.append(name)
    return FileOperationFailed(msg, errno=exc.errno, paths=paths)


def api_route(
    path: str, method: str, *, auth: bool = True, name: str | None = None,
    body: tuple[Field, ...] | None = None, allow_extra: bool = False,
    responses: dict[int, Response] | None = None, errors: tuple[int, ...] = (), summary: str = "",
    request_content: dict[str, Any] | None = None, query: tuple[str, ...] = (), required_query: tuple[str, ...] = (),
) -> Callable[[Any], Any]:
    """A manager route: metrics, the auth check, and backend errors mapped to problems.

    ``body`` are the JSON parameters the route validates with (``self._params(request)``),
    ``responses`` its answers and ``errors`` the statuses of its problems: together the
    route's entry in ``ROUTES``, which the OpenAPI document is built from.
    """

    def decorate(f: Callable[..., Any]) -> Any:
        route = name or path
        spec = Route(method, path, auth=auth, body=body, allow_extra=allow_extra,
                     responses=responses or {200: returns(ANY_OBJECT)}, errors=errors,
                     summary=summary or (f.__doc__ or "").strip().split("\n")[0],
                     request_content=request_content, query=query, required_query=required_query)
        ROUTES.append(spec)

        @functools.wraps(f)
        async def handler(self: ManagerAPI, request: IRequest, *args: Any, **kwargs: Any) -> Any:
            self.metrics.track(request, route)
            request.storage_route = spec  # type: ignore[attr-defined]  # what _params validates with
            if auth:
                check_manager_token(request, self.config.manager.secret)
            try:
                return await f(self, request, *args, **kwargs)
            except (StorageError, CancelledError):
                raise
            except NotImplementedError:
                raise UnsupportedOperation("Unsupported operation by the storage backend") from None
            except OSError as exc:
                vfolder = getattr(request, "storage_vfolder_path", None)
                if vfolder is None:
                    raise  # not a file operation: unexpected, logged, JSON 500
                raise _os_error(exc, vfolder) from exc

        return app.route(path, methods=[method], endpoint=f"{method} {path}")(handler)

    return decorate


ROUTES: list[Route] = []  # every manager route's declaration, in registration order


# -- streaming a file with backpressure ----------------------------------------------


@implementer(IPushProducer)
class _Pacer:
    """Registered on the request: tells the fetch loop when the transport is full."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self._waiting: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._wake()

    def stopProducing(self) -> None:
        self.stopped = True
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def ready(self) -> Deferred[None]:
        if not self.paused or self.stopped:
            return succeed(None)
        self._waiting = Deferred()
        return self._waiting


def _unregister(request: Any, producer: Any) -> None:
    """Unregister ``producer`` from ``request``, also after the client left.

    Klein still finishes a request whose client disconnected, and
    twisted.web logs an error if a producer is registered then; after a
    disconnect the channel is gone, so only the request's reference is dropped.
    """
    if getattr(request, "producer", None) is not producer:
        return
    if getattr(request, "channel", None) is not None:
        request.unregisterProducer()
    else:
        request.producer = None


def _open_for_fetch(path: Path) -> Any:
    """Blocking: open a regular file for reading, never following a final symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFound("no such file in the vfolder") from None
    except IsADirectoryError:
        raise InvalidAPIParameters.field("relpath", "is a directory") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat_module.S_ISDIR(mode):
            raise InvalidAPIParameters.field("relpath", "is a directory")
        if not stat_module.S_ISREG(mode):
            raise InvalidAPIParameters.field("relpath", "is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb", buffering=0)


def _stop_timer(result: Any, timer: Any) -> Any:
    if timer.active():
        timer.cancel()
    return result


# -- the API ------------------------------------------------------------------------


class BackgroundTaskService(Service):
    """At shutdown, asks running background tasks to stop and waits for them (bounded)."""

    def __init__(self, bgtasks: Any, reactor: Any, grace: float) -> None:
        self.name = "manager-bgtasks"  # type: ignore[assignment]
        self.bgtasks = bgtasks
        self.reactor = reactor
        self.grace = grace

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        running = self.bgtasks.running()
        if not running:
            return None
        for task in running:
            self.bgtasks.cancel(task.task_id, interrupted=True)
        waits = [t.deferred for t in running if t.deferred is not None]
        done: Deferred[Any] = DeferredList(waits, consumeErrors=True)
        timer = self.reactor.callLater(self.grace, lambda: done.cancel())
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done


HUB_THREADS = 8  # threads for calls to artifact registries (storage/api/registries.py)


DELETE_FILES = (
    Field("volume", p.volume_name), Field("vfid", p.vfolder_id),
    Field("relpaths", p.relpath_list), Field("recursive", p.boolean, False),
)


class ManagerAPI:
    app = app

    def __init__(self, config: Any, volumes: Any, bgtasks: Any, pool: Any, reactor: Any) -> None:
        self.config = config
        self.volumes = volumes
        self.bgtasks = bgtasks
        self.pool = pool
        self.reactor = reactor
        self.metrics = ManagerMetrics(bgtasks)
        self.health = HealthChecker(volumes, pool, reactor)
        self.artifacts = ArtifactStorages(getattr(config, "artifacts", None), getattr(config, "io_threads", 16))
        artifact_config = getattr(config, "artifacts", None)
        self.hf_registries = HuggingFaceRegistries(artifact_config.registries if artifact_config else None)
        from storage.artifacts.reservoir import ReservoirRegistries

        self.reservoir_registries = ReservoirRegistries(artifact_config.registries if artifact_config else None)
        self.hf_parallel = 4  # files of one model downloaded at once (HuggingFace and reservoir imports)
        # Hub calls (huggingface_hub is synchronous) get threads of their own: a hub
        # that hangs must not hold the threads every filesystem route needs.
        from storage.blocking import BlockingPool

        self.hub_pool = BlockingPool(reactor, HUB_THREADS)
        self.hub_pool.name = "hub-pool"  # type: ignore[assignment]
        self.events: Any = None  # storage.events.delivery.Delivery, with [redis] (storage.tap)
        self.workers: Any = None  # storage.workers.WorkerPool, with num-proc > 1 (storage.tap)

    def publish_events(self, events: list[Any]) -> None:
        """Durable events on the manager's event bus (none without ``[redis]``)."""
        if self.events is None:
            return
        self.events.publish(events).addErrback(
            lambda f: log.failure("event bus: cannot publish {names}", f, names=[e.name for e in events]))

    def services(self) -> list[Any]:
        return [
            ArtifactStorageService(self.artifacts),
            self.hub_pool,
            BackgroundTaskService(self.bgtasks, self.reactor, getattr(self.config, "shutdown_grace", 10.0)),
        ]

    def resource(self) -> Resource:
        """The Klein app behind a guard for what Klein answers in HTML."""
        return Utf8PathGuard(self.app.resource())

    def site(self) -> StorageSite:
        # The site answers 413 before buffering an oversized body; params.py checks again.
        from storage.api.artifacts import UploadBodies

        return StorageSite(self.resource(), max_body=self.config.max_manager_body, body_handler=UploadBodies(self))

    # -- helpers ------------------------------------------------------------

    def _params(self, request: IRequest) -> dict[str, Any]:
        """The JSON body, checked against the ``body`` the route declares (``api_route``)."""
        spec: Route = request.storage_route  # type: ignore[attr-defined]
        fields = spec.body or ()
        raw = p.read_json_body(request, self.config.max_manager_body)
        return p.parse_params(raw, fields, allow_extra=spec.allow_extra)

    def _volume(self, request: IRequest, name: str) -> AbstractVolume:
        request.storage_volume = name  # type: ignore[attr-defined]  # problems.py logs it
        return self.volumes.get(name)

    def _vfolder(self, request: IRequest, name: str, vfid: VFolderID) -> AbstractVolume:
        volume = self._volume(request, name)
        request.storage_vfolder_path = volume.vfolder_path(vfid)  # type: ignore[attr-defined]
        return volume

    async def _require_vfolder(self, volume: AbstractVolume, vfid: VFolderID) -> Path:
        path = volume.vfolder_path(vfid)
        if not await self.pool.run(os.path.isdir, path):
            raise VFolderNotFound(f"no such vfolder: {vfid}", vfid=str(vfid))
        return path

    @staticmethod
    def _no_content(request: IRequest) -> bytes:
        request.setResponseCode(204)
        return b""

    # -- status, health, metrics -------------------------------------------

    def _status(self, request: IRequest) -> bytes:
        p.require_empty_body(request, self.config.max_manager_body)
        return json_body(request, {"status": "ok", "type": "manager-facing", "storage-proxy": API_VERSION})

    @api_route("/", "GET", auth=False, responses={200: returns(API_STATUS)}, errors=(400,), summary="status")
    async def status(self, request: IRequest) -> bytes:
        return self._status(request)

    @api_route("/status", "GET", auth=False, responses={200: returns(API_STATUS)}, errors=(400,), summary="status")
    async def status_alias(self, request: IRequest) -> bytes:
        return self._status(request)

    @api_route("/health", "GET", auth=False, responses={200: returns(HEALTH)}, summary="health (always 200)")
    async def check_health(self, request: IRequest) -> bytes:
        code, body = health_body(await self.health.connectivity(), probe=False)
        return json_body(request, body, code)

    @api_route("/livez", "GET", auth=False, responses={200: returns(HEALTH), 503: returns(HEALTH, "a gating check fails")},
               summary="liveness")
    async def check_livez(self, request: IRequest) -> bytes:
        code, body = health_body(await self.health.connectivity(event_bus_gates=False), probe=True)
        return json_body(request, body, code)

    @api_route("/readyz", "GET", auth=False, responses={200: returns(HEALTH), 503: returns(HEALTH, "a gating check fails")},
               summary="readiness")
    async def check_readyz(self, request: IRequest) -> bytes:
        code, body = health_body(await self.health.connectivity(), probe=True)
        return json_body(request, body, code)

    @api_route("/openapi.json", "GET", responses={200: returns(ANY_OBJECT, "this document (OpenAPI 3.1)")},
               summary="this API's OpenAPI document")
    async def openapi_document(self, request: IRequest) -> bytes:
        from storage.api.openapi import manager_document_bytes

        request.setHeader(b"Content-Type", b"application/json")
        return manager_document_bytes()

    @api_route("/metrics", "GET", auth=False,
               responses={200: Response("Prometheus text", {"type": "string"}, "text/plain")}, summary="metrics")
    async def metrics_text(self, request: IRequest) -> bytes:
        await self._refresh_fs_usage()
        if self.workers is not None:
            await self.workers.collect_metrics()
        data, content_type = self.metrics.render()
        request.setHeader(b"Content-Type", content_type.encode())
        return data

    async def _refresh_fs_usage(self) -> None:
        async def one(volume: AbstractVolume) -> None:
            usage = await volume.get_fs_usage()
            self.metrics.set_fs_usage(str(volume.name), usage.capacity_bytes, usage.used_bytes)

        waits = []
        for volume in self.volumes:
            d = Deferred.fromCoroutine(one(volume))
            timer = self.reactor.callLater(METRICS_FS_TIMEOUT, d.cancel)
            d.addBoth(_stop_timer, timer)
            waits.append(d)
        await DeferredList(waits, consumeErrors=True)

    # -- volumes --------------------------------------------------------------

    @api_route("/volumes", "GET", responses={200: returns(VOLUMES)}, errors=(400,), summary="the volumes")
    async def get_volumes(self, request: IRequest) -> bytes:
        p.require_empty_body(request, self.config.max_manager_body)
        return json_body(request, {"volumes": [v.describe() for v in self.volumes]})

    @api_route("/volume/hwinfo", "GET", body=(Field("volume", p.volume_name),), summary="backend-defined hardware info")
    async def get_hwinfo(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._volume(request, args["volume"])
        return json_body(request, await volume.get_hwinfo())

    @api_route("/volume/performance-metric", "GET", body=(Field("volume", p.volume_name),), responses={200: returns(PERFORMANCE)},
               summary="performance metrics (400 unsupported-operation on vfs)")
    async def get_performance_metric(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._volume(request, args["volume"])
        metric = await volume.get_performance_metric()
        if isinstance(metric, dict) and "metric" in metric and "observed_at" in metric:
            return json_body(request, metric)
        return json_body(request, {"metric": metric, "observed_at": _now_iso()})

    @api_route("/folder/fs-usage", "GET", body=(Field("volume", p.volume_name),), responses={200: returns(FS_USAGE)},
               summary="the filesystem's capacity and usage")
    async def get_fs_usage(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._volume(request, args["volume"])
        usage = await volume.get_fs_usage()
        self.metrics.set_fs_usage(str(volume.name), usage.capacity_bytes, usage.used_bytes)
        return json_body(request, {"capacity_bytes": usage.capacity_bytes, "used_bytes": usage.used_bytes})

    @api_route("/volume/quota", "GET", body=(Field("volume", p.volume_name), Field("vfid", p.nullable(p.vfolder_id), None)),
               responses={}, summary="deprecated: always 400")
    async def get_quota(self, request: IRequest) -> bytes:
        self._params(request)
        raise DeprecatedAPI("get_quota (for individual vfolder) is a deprecated API")

    @api_route("/volume/quota", "PATCH", body=(
        Field("volume", p.volume_name), Field("vfid", p.nullable(p.vfolder_id), None), Field("size_bytes", p.binary_size),
    ), responses={}, summary="deprecated: always 400")
    async def set_quota(self, request: IRequest) -> bytes:
        self._params(request)
        raise DeprecatedAPI("set_quota (for individual vfolder) is a deprecated API")

    # -- quota scopes --------------------------------------------------------

    @api_route("/quota-scope", "POST", body=(
        Field("volume", p.volume_name), Field("qsid", p.quota_scope_id),
        Field("options", p.nullable(p.quota_options), None), Field("extra_args", p.nullable(p.mapping), None),
    ), responses={204: NO_CONTENT}, errors=(409, 507), summary="create a quota scope")
    async def create_quota_scope(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._volume(request, args["volume"])
        options = QuotaConfig(args["options"]) if args["options"] is not None else None
        try:
            await volume.create_quota_scope(args["qsid"], options, args["extra_args"])
        except QuotaScopeExists:
            raise QuotaScopeExists("Volume already exists with given quota scope.") from None
        return self._no_content(request)

    @api_route("/quota-scope", "GET", body=(Field("volume", p.volume_name), Field("qsid", p.quota_scope_id)),
               responses={200: returns(QUOTA_USAGE)}, errors=(404,), summary="a quota scope's usage and limit")
    async def get_quota_scope(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._volume(request, args["volume"])
        usage = await volume.describe_quota_scope(args["qsid"])
        if usage is None:
            raise QuotaScopeNotFound(f"no such quota scope: {args['qsid']}")

        def non_negative(value: int | None) -> int | None:
            return value if value is not None and value >= 0 else None

        return json_body(
            request, {"used_bytes": non_negative(usage.used_bytes), "limit_bytes": non_negative(usage.limit_bytes)}
        )

    @api_route("/quota-scope", "PATCH", body=(
        Field("volume", p.volume_name), Field("qsid", p.quota_scope_id), Field("options", p.quota_options),
    ), responses={204: NO_CONTENT}, errors=(507,), summary="set a quota scope's limit (creates it if missing)")
    async def update_quota_scope(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._volume(request, args["volume"])
        try:
            await volume.update_quota_scope(args["qsid"], QuotaConfig(args["options"]))
        except InvalidQuotaConfig:
            raise InvalidQuotaConfig("Invalid quota config option") from None
        return self._no_content(request)

    @api_route("/quota-scope/quota", "DELETE", body=(Field("volume", p.volume_name), Field("qsid", p.quota_scope_id)),
               responses={204: NO_CONTENT}, errors=(404,), summary="remove a quota scope's limit")
    async def unset_quota(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._volume(request, args["volume"])
        await volume.unset_quota(args["qsid"])
        return self._no_content(request)

    # -- vfolders -----------------------------------------------------------

    @api_route("/folder/create", "POST", body=(
        Field("volume", p.volume_name), Field("vfid", p.vfolder_id),
        Field("mode", p.permission_mode, DEFAULT_VFOLDER_MODE), Field("options", p.nullable(p.mapping), None),
    ), responses={204: NO_CONTENT}, errors=(404, 409, 507), summary="create a vfolder")
    async def create_vfolder(self, request: IRequest) -> bytes:
        args = self._params(request)
        vfid: VFolderID = args["vfid"]
        volume = self._vfolder(request, args["volume"], vfid)
        mode = args["mode"] if args["mode"] is not None else DEFAULT_VFOLDER_MODE
        try:
            await volume.create_vfolder(vfid, mode)
        except QuotaScopeNotFound:
            if vfid.quota_scope_id is None or not self.config.allow_auto_quota_scope_creation:
                raise
            initial = (args["options"] or {}).get("initial_max_size_for_quota_scope")
            try:
                limit = p.non_negative_integer(initial) if initial else None
            except p.ParamError as exc:
                raise InvalidAPIParameters.field("options", f"initial_max_size_for_quota_scope: {exc}") from None
            try:
                await volume.create_quota_scope(vfid.quota_scope_id, QuotaConfig(limit) if limit else None)
            except QuotaScopeExists:
                pass  # created concurrently: fine
            await volume.create_vfolder(vfid, mode)
        except FileExistsError:
            raise VFolderExists(f"the vfolder already exists: {vfid}") from None
        return self._no_content(request)

    @api_route("/folder/delete", "POST", body=(Field("volume", p.volume_name), Field("vfid", p.vfolder_id)), responses={202: returns(BGTASK_ID, "the delete runs")},
               summary="delete a vfolder (a background task)")
    async def delete_vfolder(self, request: IRequest) -> bytes:
        args = self._params(request)
        vfid = args["vfid"]
        volume = self._vfolder(request, args["volume"], vfid)

        context = {"volume": volume.name, "vfid": str(vfid)}
        task = self.bgtasks.start("delete-vfolder", self.task_runner("delete-vfolder", context), **context)
        await self._recorded(task)
        return json_body(request, {"bgtask_id": str(task.task_id)}, 202)

    @api_route("/folder/clone", "POST", body=(
        Field("src_volume", p.volume_name), Field("src_vfid", p.vfolder_id),
        Field("dst_volume", p.nullable(p.volume_name)), Field("dst_vfid", p.vfolder_id),
    ), allow_extra=True, responses={200: returns(BGTASK_ID, "the clone runs")},
        summary="clone a vfolder (a background task; its failures fail the task)")
    async def clone_vfolder(self, request: IRequest) -> bytes:
        args = self._params(request)
        src_vfid, dst_vfid = args["src_vfid"], args["dst_vfid"]
        src_name = args["src_volume"]
        dst_name = src_name if args["dst_volume"] is None else args["dst_volume"]
        request.storage_volume = src_name  # type: ignore[attr-defined]  # problems.py logs it

        # Everything past the parameters is checked in the task, as upstream:
        # the manager marks the source CLONING before it calls us and only a
        # clone event (success or failure) makes it READY again, so a refusal
        # here would leave the source stuck (docs/manager-api.md).  A missing
        # source, an existing destination or an unknown volume fail the task,
        # which sends vfolder_clone_failure.  Unlike upstream, any destination
        # volume whose backend shares the vfs layout works.
        async def run(progress: Any) -> None:
            volume = self.volumes.get(src_name)
            dst_volume = self.volumes.get(dst_name)
            await self._require_vfolder(volume, src_vfid)
            if await self.pool.run(os.path.lexists, dst_volume.vfolder_path(dst_vfid)):
                raise VFolderExists(f"the destination vfolder already exists: {dst_vfid}", vfid=str(dst_vfid))
            await volume.clone_vfolder(src_vfid, dst_volume, dst_vfid, progress)

        task = self.bgtasks.start(
            "clone-vfolder", run, volume=src_name, dst_volume=dst_name,
            src_vfid=str(src_vfid), dst_vfid=str(dst_vfid),
        )
        await self._recorded(task)
        return json_body(request, {"bgtask_id": str(task.task_id)})

    @api_route("/folder/mount", "GET", body=(Field("volume", p.volume_name), Field("vfid", p.vfolder_id), Field("subpath", p.string, ".")),
               responses={200: returns(MOUNT)}, summary="a vfolder's (sub)path on this host")
    async def get_vfolder_mount(self, request: IRequest) -> bytes:
        args = self._params(request)
        vfid = args["vfid"]
        volume = self._vfolder(request, args["volume"], vfid)
        try:
            path = await volume.get_vfolder_mount(vfid, args["subpath"])
        except VFolderNotFound:
            raise MountVFolderNotFound("VFolder not found", vfid=str(vfid)) from None
        except (InvalidPath, InvalidSubpath):
            raise InvalidSubpath("Invalid vfolder subpath", vfid=str(vfid), subpath=args["subpath"]) from None
        return json_body(request, {"path": str(path)})

    @api_route("/folder/metadata", "GET", body=(Field("volume", p.volume_name), Field("vfid", p.vfolder_id)), responses={200: returns(METADATA)}, errors=(404,),
               summary="the vfolder's stored metadata")
    async def get_metadata(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._vfolder(request, args["volume"], args["vfid"])
        payload = await volume.get_metadata(args["vfid"])
        text = payload.decode("utf-8", "replace") if payload else None
        return json_body(request, {"status": "ok", "payload": text})

    @api_route("/folder/metadata", "POST", body=(Field("volume", p.volume_name), Field("vfid", p.vfolder_id), Field("payload", p.text_payload)),
               responses={200: returns(STATUS_OK)}, errors=(404, 507), summary="store the vfolder's metadata")
    async def set_metadata(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._vfolder(request, args["volume"], args["vfid"])
        await volume.put_metadata(args["vfid"], args["payload"])
        return json_body(request, {"status": "ok"})

    @api_route("/folder/usage", "GET", body=(Field("volume", p.volume_name), Field("vfid", p.vfolder_id)), responses={200: returns(USAGE)}, errors=(404,),
               summary="file count and bytes of a vfolder")
    async def get_vfolder_usage(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._vfolder(request, args["volume"], args["vfid"])
        usage = await volume.get_usage(args["vfid"])
        return json_body(request, {"file_count": usage.file_count, "used_bytes": usage.used_bytes})

    @api_route("/folder/used-bytes", "GET", body=(Field("volume", p.volume_name), Field("vfid", p.vfolder_id)), responses={200: returns(USED_BYTES)}, errors=(404,),
               summary="bytes used by a vfolder")
    async def get_vfolder_used_bytes(self, request: IRequest) -> bytes:
        args = self._params(request)
        volume = self._vfolder(request, args["volume"], args["vfid"])
        return json_body(request, {"used_bytes": await volume.get_used_bytes(args["vfid"])})

    # -- files ----------------------------------------------------------------

    @api_route("/folder/file/mkdir", "POST", body=(
        Field("volume", p.volume_name), Field("vfid", p.vfolder_id), Field("relpath", p.mkdir_relpaths), Field("parents", p.boolean, True),
        Field("exist_ok", p.boolean, False),
    ), responses={200: returns(MKDIR, "all made"), 207: returns(MKDIR, "some made"), 422: returns(MKDIR, "none made")},
        errors=(404,), summary="make directories (one, or up to 50)")
    async def mkdir(self, request: IRequest) -> bytes:
        args = self._params(request)
        vfid = args["vfid"]
        volume = self._vfolder(request, args["volume"], vfid)
        await self._require_vfolder(volume, vfid)
        relpaths = args["relpath"]
        waits = [
            Deferred.fromCoroutine(volume.mkdir(vfid, str(rp), parents=args["parents"], exist_ok=args["exist_ok"]))
            for rp in relpaths
        ]
        outcomes = await DeferredList(waits, consumeErrors=True)
        success, failed = [], []
        for rp, (ok, result) in zip(relpaths, outcomes, strict=True):
            if ok:
                success.append({"msg": None, "item": str(rp)})
            else:
                exc = cast(Failure, result).value
                log.info("mkdir {item!r} in {volume}/{vfid} failed: {exc!r}", item=str(rp),
                         volume=volume.name, vfid=str(vfid), exc=exc)
                failed.append({"msg": repr(exc), "item": str(rp)})
        status = 422 if not success else 207 if failed else 200
        return json_body(request, {"results": {"success": success, "failed": failed}}, status)

    @api_route("/folder/file/list", "POST", body=(Field("volume", p.volume_name), Field("vfid", p.vfolder_id), Field("relpath", p.relpath)),
               responses={200: returns(LISTING)}, errors=(404,), summary="list a directory (not recursive)")
    async def list_files(self, request: IRequest) -> bytes:
        args = self._params(request)
        vfid = args["vfid"]
        volume = self._vfolder(request, args["volume"], vfid)
        await self._require_vfolder(volume, vfid)
        entries = await volume.scandir(vfid, str(args["relpath"]), limit=self.config.scandir_limit)
        # A listing can be scandir-limit entries long: encode it off the reactor.
        data = await self.pool.run(_encode_listing, entries)
        request.setHeader(b"Content-Type", b"application/json")
        return data

    @api_route("/folder/file/rename", "POST", body=(
        Field("volume", p.volume_name), Field("vfid", p.vfolder_id), Field("relpath", p.relpath), Field("new_name", p.file_name), Field("is_dir", p.boolean, False),
    ), responses={204: NO_CONTENT}, errors=(404, 409, 507), summary="rename a file or directory")
    async def rename_file(self, request: IRequest) -> bytes:
        args = self._params(request)
        if str(args["relpath"]) == ".":
            raise InvalidAPIParameters.field("relpath", "cannot rename the vfolder root")
        vfid = args["vfid"]
        volume = self._vfolder(request, args["volume"], vfid)
        await self._require_vfolder(volume, vfid)
        await volume.rename(vfid, str(args["relpath"]), args["new_name"])
        return self._no_content(request)

    @api_route("/folder/file/move", "POST", body=(
        Field("volume", p.volume_name), Field("vfid", p.vfolder_id), Field("src_relpath", p.relpath), Field("dst_relpath", p.relpath),
    ), responses={204: NO_CONTENT}, errors=(404, 409, 507), summary="move a file or directory")
    async def move_file(self, request: IRequest) -> bytes:
        args = self._params(request)
        for key in ("src_relpath", "dst_relpath"):
            if str(args[key]) == ".":
                raise InvalidAPIParameters.field(key, "cannot be the vfolder root")
        vfid = args["vfid"]
        volume = self._vfolder(request, args["volume"], vfid)
        await self._require_vfolder(volume, vfid)
        await volume.move(vfid, str(args["src_relpath"]), str(args["dst_relpath"]))
        return self._no_content(request)

    @api_route("/folder/file/fetch", "POST", body=(Field("volume", p.volume_name), Field("vfid", p.vfolder_id), Field("relpath", p.relpath)),
               responses={200: Response("the file's bytes (empty if it does not exist)", BINARY,
                                         "application/octet-stream")},
               errors=(404,), summary="stream a file")
    async def fetch_file(self, request: Any) -> bytes:
        args = self._params(request)
        vfid = args["vfid"]
        volume = self._vfolder(request, args["volume"], vfid)
        await self._require_vfolder(volume, vfid)
        path = await volume.resolve(vfid, str(args["relpath"]))
        try:
            f = await self.pool.run(_open_for_fetch, path)
        except FileNotFound:
            # An empty 200, as upstream: the manager streams task logs with this
            # route and shows a log not written yet as empty; any error status
            # would be an error page instead (docs/manager-api.md).
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", b"application/octet-stream")
            return b""
        pacer = _Pacer()
        try:
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.registerProducer(pacer, True)
            while not pacer.stopped:
                chunk = await self.pool.run(f.read, FETCH_CHUNK)
                if not chunk or pacer.stopped:
                    break
                request.write(chunk)
                await pacer.ready()
        finally:
            _unregister(request, pacer)
            # Not awaited: after a disconnect (cancellation) nobody waits for it.
            self.pool.run(f.close).addErrback(lambda failure: log.failure("closing {path}", failure, path=path))
        return b""

    @api_route("/folder/file/download", "POST", body=(
        Field("volume", p.volume_name), Field("vfid", p.vfolder_id), Field("relpath", p.relpath),
        Field("archive", p.boolean, False), Field("unmanaged_path", p.nullable(p.string), None),
    ), responses={200: returns(TOKEN)}, summary="a token for the client API's GET /download")
    async def create_download_session(self, request: IRequest) -> bytes:
        args = self._params(request)
        self._volume(request, args["volume"])
        token = tokens.issue_download_token(
            self.config.secret, self.config.session_expire,
            volume=args["volume"], vfid=args["vfid"], relpath=str(args["relpath"]),
        )
        return json_body(request, {"token": token})

    @api_route("/folder/file/archive-download-token", "POST", body=(
        Field("volume", p.volume_name), Field("virtual_folder_id", p.vfolder_id), Field("files", p.relpath_strings),
        Field("filename", p.archive_filename, None),
    ), responses={200: returns(TOKEN)}, summary="a token for the client API's GET /download-archive")
    async def create_archive_download_session(self, request: IRequest) -> bytes:
        args = self._params(request)
        self._volume(request, args["volume"])
        token = tokens.issue_archive_token(
            self.config.secret, self.config.session_expire, volume=args["volume"],
            vfid=args["virtual_folder_id"], files=args["files"], filename=args["filename"],
        )
        return json_body(request, {"token": token})

    @api_route("/folder/file/upload", "POST", body=(
        Field("volume", p.volume_name), Field("vfid", p.vfolder_id), Field("relpath", p.relpath), Field("size", p.non_negative_integer),
    ), responses={200: returns(TOKEN)}, errors=(404, 409, 413, 507),
        summary="start a tus upload: a token for the client API's /upload")
    async def create_upload_session(self, request: IRequest) -> bytes:
        from storage.uploads import prepare_upload

        args = self._params(request)
        vfid, relpath = args["vfid"], str(args["relpath"])
        if relpath == ".":
            raise InvalidAPIParameters.field("relpath", "must name a file, not the vfolder root")
        volume = self._vfolder(request, args["volume"], vfid)
        await self._require_vfolder(volume, vfid)
        session = await prepare_upload(
            volume, vfid, relpath, args["size"],
            max_size=self.config.max_upload_size, expire=self.config.upload_expire,
        )
        token = tokens.issue_upload_token(
            self.config.secret, self.config.session_expire,
            volume=args["volume"], vfid=vfid, relpath=relpath, size=args["size"], session=session,
        )
        return json_body(request, {"token": token})

    async def _delete_request(self, request: IRequest) -> tuple[AbstractVolume, VFolderID, list[str], bool]:
        """The parameters both delete routes take, checked against an existing vfolder."""
        args = self._params(request)
        vfid = args["vfid"]
        volume = self._vfolder(request, args["volume"], vfid)
        await self._require_vfolder(volume, vfid)
        return volume, vfid, [str(r) for r in args["relpaths"]], args["recursive"]

    @api_route("/folder/file/delete", "POST", body=DELETE_FILES, responses={200: returns(STATUS_OK)}, errors=(404,),
               summary="delete files (also when they do not exist)")
    async def delete_files(self, request: IRequest) -> bytes:
        volume, vfid, relpaths, recursive = await self._delete_request(request)
        await volume.delete_files(vfid, relpaths, recursive=recursive)
        return json_body(request, {"status": "ok"})

    @api_route("/folder/file/delete-async", "POST", body=DELETE_FILES, responses={202: returns(BGTASK_ID)},
               errors=(404,), summary="delete files in a background task")
    async def delete_files_async(self, request: IRequest) -> bytes:
        volume, vfid, relpaths, recursive = await self._delete_request(request)

        context = {"volume": volume.name, "vfid": str(vfid), "relpaths": list(relpaths), "recursive": recursive}
        task = self.bgtasks.start("delete-files", self.task_runner("delete-files", context), **context)
        await self._recorded(task)
        return json_body(request, {"bgtask_id": str(task.task_id)}, 202)

    # -- background tasks (ours; upstream reports them on its event bus) ----

    async def _recorded(self, task: Any) -> None:
        """Answer only once the task's start is on disk (the journal), so a kill right after the
        answer still resumes it; bounded, so a stuck disk delays the answer by 5 s at most."""
        if task.recorded is None:
            return
        view: Deferred[None] = Deferred()

        def release(_: Any = None) -> Any:
            if not view.called:
                view.callback(None)
            return _

        timer = self.reactor.callLater(5.0, release)
        task.recorded.addBoth(release)
        await view
        if timer.active():
            timer.cancel()

    def task_runner(self, name: str, context: dict[str, Any], *, resumed: bool = False) -> Any:
        """The body of a background task, from its name and context (also for one a killed daemon left).

        A resumed delete simply runs again (deletes are idempotent); a resumed
        clone removes its partial destination and fails.
        """
        from storage.vfid import VFolderID

        async def delete_vfolder(progress: Any) -> None:
            volume = self.volumes.get(context["volume"])
            vfid = VFolderID.parse(context["vfid"])
            # Idempotent, like a retried upstream task: a vfolder already gone is done.
            if not await self.pool.run(os.path.lexists, volume.vfolder_path(vfid)):
                return
            await volume.delete_vfolder(vfid, progress)

        async def delete_files(progress: Any) -> None:
            volume = self.volumes.get(context["volume"])
            vfid = VFolderID.parse(context["vfid"])
            await volume.delete_files(vfid, list(context["relpaths"]), recursive=bool(context["recursive"]),
                                      progress=progress)

        async def abandon_clone(progress: Any) -> None:
            dst_volume = self.volumes.get(context.get("dst_volume") or context["volume"])
            await dst_volume.delete_vfolder(VFolderID.parse(context["dst_vfid"]), missing_ok=True)
            raise ExecutionError(
                "storage-proxy stopped during the clone; the partial destination was removed"
            )

        if name in ("huggingface-import", "reservoir-import"):
            from storage.api.registries import hf_import_runner

            return hf_import_runner(self, context)
        if name == "delete-vfolder":
            return delete_vfolder
        if name == "delete-files":
            return delete_files
        if name == "clone-vfolder" and resumed:
            return abandon_clone
        raise ValueError(f"no runner for background task {name!r}")

    def _task(self, task_id: str) -> Any:
        try:
            tid = p.task_id(task_id)
        except p.ParamError as exc:
            raise InvalidAPIParameters.field("task_id", str(exc)) from None
        task = self.bgtasks.get(tid)
        if task is None:
            raise NotFound(f"no such background task: {tid}", data={"task_id": "unknown task"})
        return tid, task

    @api_route("/bgtask/<task_id>", "GET", name="/bgtask/<task_id>", responses={200: returns(BGTASK)}, errors=(400, 404),
               summary="ours: a background task's state")
    async def get_bgtask(self, request: IRequest, task_id: str) -> bytes:
        _, task = self._task(task_id)
        return json_body(request, task.as_json())

    @api_route("/bgtask/<task_id>/cancel", "POST", name="/bgtask/<task_id>/cancel",
               responses={200: returns(BGTASK, "it had ended"), 202: returns(BGTASK, "asked to stop")}, errors=(400, 404),
               summary="ours: cancel a background task")
    async def cancel_bgtask(self, request: IRequest, task_id: str) -> bytes:
        tid, _ = self._task(task_id)
        task = self.bgtasks.cancel(tid)
        return json_body(request, task.as_json(), 202 if task.status == "running" else 200)


# The /v1 artifact-storage routes register themselves on ``app``.
from storage.api import artifacts as _artifacts  # noqa: E402,F401
from storage.api import registries as _registries  # noqa: E402,F401
