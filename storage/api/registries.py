"""The ``/v1/registries/huggingface/...`` routes of the manager API (upstream 26.9.6's paths and bodies).

``POST scan`` ({registry_name, limit, order, search}) → ``{"models": [ModelData]}``;
``GET model/<model_id>?registry_name=&revision=`` → ``{"model": ModelData}``
(with README and size); ``GET model/<model_id>/commit-hash?registry_name=[&revision=]``
→ ``{"commit_hash"}``; ``POST models/batch`` ({registry_name, models}) →
``{"models": [...]}``; ``POST import`` → 202 ``{"task_id"}``
(``storage.artifacts.hfimport``).  The manager sends the model id quoted
(``org%2Fname``), and its aiohttp quotes that again (``org%252Fname``):
twisted.web unquotes the path once, and the route once more, as upstream's
handler does, so both spellings (and ``org/name``) name the model; the id is
a ``path`` part of the route.  Every hub call runs in the pool.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from storage.api import params as p
from storage.api.artifacts import query_value
from storage.api.manager import ManagerAPI, api_route
from storage.api.openapi import returns
from storage.api.params import Field
from storage.api.problems import json_body
from storage.artifacts.huggingface import DEFAULT_REVISION, SORT_KEYS
from storage.errors import InvalidAPIParameters, StorageError, UnsupportedOperation, VFolderNotFound
from storage.paths import validate_relpath

HF = "/v1/registries/huggingface"
RESERVOIR = "/v1/registries/reservoir"
HF_ERRORS = (400, 404, 502)
TASK_ID = {"type": "object", "required": ["task_id"], "properties": {"task_id": {"type": "string", "format": "uuid"}}}
MODELS = {"type": "object", "required": ["models"], "properties": {"models": {"type": "array"}}}
log = Logger()


@p.with_schema({"enum": list(SORT_KEYS)})
def _sort_key(value: Any) -> str:
    text = p.string(value)
    if text not in SORT_KEYS:
        raise p.ParamError(f"expected one of {', '.join(SORT_KEYS)}, got {text!r}"[:200])
    return text


@p.with_schema({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[ \t\n\r]*\\+?0*[1-9][0-9]{0,39}[ \t\n\r]*$"}]})
def _limit(value: Any) -> int:
    number = p.integer(value)
    if number < 1:
        raise p.ParamError("must be at least 1")
    return number


def model_target(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not isinstance(value.get("model_id"), str) or not value["model_id"]:
        raise p.ParamError("expected {\"model_id\": str, \"revision\": str | null}")
    revision = value.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise p.ParamError("revision: expected a non-empty string or null")
    return {"model_id": value["model_id"], "revision": revision or DEFAULT_REVISION}


@p.with_schema({"type": "array", "items": {
    "type": "object", "required": ["model_id"],
    "properties": {"model_id": {"type": "string", "minLength": 1},
                   "revision": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]}}}})
def model_targets(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise p.ParamError("expected a list of {model_id, revision}")
    return [model_target(v) for v in value]


def _query(request: IRequest, name: str, required: bool = True) -> str | None:
    value = query_value(request, name)
    if required and not value:
        raise InvalidAPIParameters.field(name, "is required (in the query string)")
    return value or None


@api_route(HF + "/scan", "POST", name=HF + "/scan", body=(
    Field("registry_name", p.string), Field("limit", _limit), Field("order", _sort_key),
    Field("search", p.nullable(p.string), None),
), allow_extra=True, responses={200: returns(MODELS)}, errors=HF_ERRORS, summary="list models of a HuggingFace registry")
async def hf_scan_models(self: ManagerAPI, request: IRequest) -> bytes:
    args = self._params(request)
    client = self.hf_registries.get(args["registry_name"])
    models = await self.hub_pool.run(client.scan, args["limit"], args["order"], args["search"])
    fetch_metadata(self, client, models)
    return json_body(request, {"models": models})


@api_route(HF + "/model/<path:model_id>/commit-hash", "GET", name=HF + "/model/<model_id>/commit-hash",
           query=("registry_name", "revision"), required_query=("registry_name",), errors=HF_ERRORS,
           responses={200: returns({"type": "object", "required": ["commit_hash"]})}, summary="a model's commit hash")
async def hf_get_commit_hash(self: ManagerAPI, request: IRequest, model_id: str) -> bytes:
    model_id = unquote(model_id)
    client = self.hf_registries.get(_query(request, "registry_name") or "")
    revision = _query(request, "revision", required=False) or DEFAULT_REVISION
    commit = await self.hub_pool.run(client.commit_hash, model_id, revision)
    return json_body(request, {"commit_hash": commit})


@api_route(HF + "/model/<path:model_id>", "GET", name=HF + "/model/<model_id>",
           query=("registry_name", "revision"), required_query=("registry_name", "revision"), errors=HF_ERRORS,
           responses={200: returns({"type": "object", "required": ["model"]})}, summary="one model")
async def hf_retrieve_model(self: ManagerAPI, request: IRequest, model_id: str) -> bytes:
    model_id = unquote(model_id)
    client = self.hf_registries.get(_query(request, "registry_name") or "")
    revision = _query(request, "revision") or DEFAULT_REVISION
    model = await self.hub_pool.run(client.model, model_id, revision)
    return json_body(request, {"model": model})


@api_route(HF + "/models/batch", "POST", name=HF + "/models/batch",
           body=(Field("registry_name", p.string), Field("models", model_targets)), allow_extra=True,
           responses={200: returns(MODELS)}, errors=HF_ERRORS, summary="several models")
async def hf_retrieve_models(self: ManagerAPI, request: IRequest) -> bytes:
    args = self._params(request)
    client = self.hf_registries.get(args["registry_name"])

    def retrieve() -> list[dict[str, Any]]:
        return [client.model_basic(m["model_id"], m["revision"]) for m in args["models"]]

    models = await self.hub_pool.run(retrieve)
    fetch_metadata(self, client, models)
    return json_body(request, {"models": models})


METADATA_PARALLEL = 4


def fetch_metadata(self: ManagerAPI, client: Any, models: list[dict[str, Any]]) -> None:
    """Upstream, after a scan or a batch: each model's README and size fetched in the background and
    sent as ``models_metadata_fetch_done`` (only for a model with a README).  Without an event bus
    nobody would hear them, so nothing is fetched."""
    if self.events is None or not models:
        return
    from twisted.internet.defer import DeferredList, DeferredSemaphore

    from storage.events.encoding import Event

    sem = DeferredSemaphore(METADATA_PARALLEL)

    def one(m: dict[str, Any]) -> dict[str, Any] | None:
        readme = client.readme(m["id"], m["revision"])
        if not readme:
            return None
        try:
            size = sum(f.size for f in client.files(m["id"], m["revision"]))
        except StorageError:
            size = 0
        return {"model_id": m["id"], "revision": m["revision"], "readme_content": readme,
                "registry_type": "huggingface", "registry_name": client.config.name, "size": size}

    def send(info: dict[str, Any] | None) -> None:
        if info is not None:
            self.publish_events([Event("anycast", "models_metadata_fetch_done", (("model", info),))])

    def report(results: list[tuple[bool, Any]]) -> None:
        for ok, failure in results:
            if not ok:
                log.failure("fetching a model's metadata for models_metadata_fetch_done failed", failure)

    ds = [sem.run(self.hub_pool.run, one, m).addCallback(send) for m in models]
    DeferredList(ds, consumeErrors=True).addCallback(report)


# -- import ------------------------------------------------------------------------


def _step_storage(args: dict[str, Any], step: str) -> Any:
    """An import step's target: a storage name, or ``{"volume", "vfid"}`` for a vfolder
    (``storage_step_target_mappings`` first, as upstream); None when not given."""
    targets = args.get("storage_step_target_mappings") or {}
    target = targets.get(step)
    if target is not None:
        if isinstance(target, dict) and isinstance(target.get("storage_name"), str):
            return str(target["storage_name"])
        if isinstance(target, dict) and "vfolder_id" in target and isinstance(target.get("volume_name"), str):
            try:
                vfid = p.vfolder_id(target["vfolder_id"])
            except p.ParamError as exc:
                raise InvalidAPIParameters.field("storage_step_target_mappings", f"{step}: vfolder_id: {exc}") from None
            return {"volume": target["volume_name"], "vfid": str(vfid)}
        raise InvalidAPIParameters.field("storage_step_target_mappings",
                                         f"{step}: expected {{storage_name}} or {{vfolder_id, volume_name}}")
    names = args.get("storage_step_mappings") or {}
    name = names.get(step)
    if name is not None and not isinstance(name, str):
        raise InvalidAPIParameters.field("storage_step_mappings", f"{step}: expected a storage name")
    return name


class VFolderRoot:
    """A vfolder as an import's destination: files go below its directory, confined as in a VFS storage."""

    def __init__(self, root: str, name: str) -> None:
        self.root = root
        self.name = name


def _vfolder_root(self: ManagerAPI, target: dict[str, str]) -> Any:
    import os

    from storage.vfid import VFolderID

    volume = self.volumes.get(target["volume"])
    path = volume.vfolder_path(VFolderID.parse(target["vfid"]))

    def resolve() -> str:
        if not os.path.isdir(path):
            raise VFolderNotFound(f"no vfolder {target['vfid']} on volume {target['volume']}")
        return os.path.realpath(path)

    return resolve


@p.with_schema({"anyOf": [{"type": "string"}, {"type": "null"}], "description": "a path prefix in the storage"})
def _prefix(value: Any) -> str | None:
    if value is None or value == "/":
        return value
    text = p.string(value)
    try:
        validate_relpath(text.strip("/"), "storage_prefix")
    except StorageError as exc:
        raise p.ParamError(str(exc.msg or exc).split(": ", 1)[-1]) from None
    return text


class StorageStepNotProvided(StorageError):
    status = 400
    problem = "step-mapping-not-provided"
    title = "Storage Step Mapping Not Provided"
    error_code = "storage_setup_invalid-parameters"


@p.with_schema(p.schema_of(model_targets))
def _targets_as_given(value: Any) -> list[dict[str, Any]]:
    """Model targets with no default revision (None stays None)."""
    targets = model_targets(value)
    for target, given in zip(targets, value, strict=True):
        if not given.get("revision"):
            target["revision"] = None  # type: ignore[assignment]
    return targets


@p.with_schema({"type": "array", "items": {"type": "string"}})
def _revision_ids(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise p.ParamError("expected a list of artifact revision ids")
    return list(value)


def _import_fields(targets: Any) -> tuple[Field, ...]:
    return (Field("registry_name", p.string), Field("models", targets),
            Field("storage_step_mappings", p.nullable(p.mapping), None),
            Field("storage_step_target_mappings", p.nullable(p.mapping), None),
            Field("storage_prefix", _prefix, None))


RESERVOIR_IMPORT = (*_import_fields(_targets_as_given), Field("artifact_revision_ids", p.nullable(_revision_ids), None))


@api_route(HF + "/import", "POST", name=HF + "/import", body=_import_fields(model_targets), allow_extra=True,
           responses={202: returns(TASK_ID, "the import runs")}, errors=HF_ERRORS,
           summary="import models into an artifact storage or a vfolder (a background task)")
async def hf_import_models(self: ManagerAPI, request: IRequest) -> bytes:
    return await _start_import(self, request, "huggingface")


@api_route(RESERVOIR + "/import", "POST", name=RESERVOIR + "/import", body=RESERVOIR_IMPORT, allow_extra=True,
           responses={202: returns(TASK_ID, "the import runs")}, errors=HF_ERRORS,
           summary="import models from another Backend.AI's VFS storage (a background task)")
async def reservoir_import_models(self: ManagerAPI, request: IRequest) -> bytes:
    """Upstream's reservoir import: the files of each model's directory in another Backend.AI's
    VFS storage (``storage.artifacts.reservoir``), through the same importer as HuggingFace's."""
    return await _start_import(self, request, "reservoir")


async def _start_import(self: ManagerAPI, request: IRequest, kind: str) -> bytes:
    args = self._params(request)  # HF_IMPORT or RESERVOIR_IMPORT, as the route declares
    registries = self.hf_registries if kind == "huggingface" else self.reservoir_registries
    registries.get(args["registry_name"])  # an unknown registry: 404 now, not a failed task
    models = args["models"]
    if kind == "reservoir":
        from storage.artifacts.reservoir import ArtifactRevisionEmpty

        for model in models:
            if model["revision"] is None:  # upstream: a reservoir has no default revision
                raise ArtifactRevisionEmpty(f"revision must be specified for model {model['model_id']}")
        ids = args.get("artifact_revision_ids")
        if ids is not None and len(ids) != len(models):
            raise InvalidAPIParameters.field("artifact_revision_ids", "needs one id per model")
    download = _step_storage(args, "download")
    if download is None:
        raise StorageStepNotProvided("no storage mapping provided for the download step")
    archive = _step_storage(args, "archive")
    if archive is not None and archive != download:
        raise UnsupportedOperation("an archive step into another storage than the download's is not supported yet")
    if isinstance(download, dict):
        await self.pool.run(_vfolder_root(self, download))
    elif download in self.artifacts.object_storages:
        if not self.artifacts.object_storages[download].buckets:
            raise UnsupportedOperation(f"object storage {download!r} has no buckets configured to import into")
    else:
        self.artifacts.get_vfs(download)
    wanted = [dict(m) for m in models]
    for target, rid in zip(wanted, args.get("artifact_revision_ids") or [], strict=False):
        target["artifact_revision_id"] = rid  # upstream asks the source's manager for its verification
    context = {"registry_name": args["registry_name"], "registry_type": kind, "storage": download,
               "models": wanted, "storage_prefix": args["storage_prefix"]}
    task = self.bgtasks.start(f"{kind}-import", hf_import_runner(self, context), **context)
    return json_body(request, {"task_id": str(task.task_id)}, 202)


def hf_import_runner(self: ManagerAPI, context: dict[str, Any]) -> Any:
    """The body of an import task from its context: also how a killed daemon's import resumes
    (``ManagerAPI.task_runner``), from the files it had verified or staged.  HuggingFace and
    reservoir imports share it (``context["registry_type"]``)."""
    from storage.artifacts.hfimport import Importer, import_models

    async def run(progress: Any) -> Any:
        if context.get("registry_type", "huggingface") == "reservoir":
            client: Any = self.reservoir_registries.get(context["registry_name"])
        else:
            client = self.hf_registries.get(context["registry_name"])
        name = context["storage"]
        storage: Any
        bucket = None
        if isinstance(name, dict):  # a vfolder
            storage = VFolderRoot(await self.pool.run(_vfolder_root(self, name)), name["vfid"])
        elif name in self.artifacts.object_storages:  # upstream: into its first bucket
            storage = await self.pool.run(self.artifacts.get_s3, name)
            bucket = self.artifacts.object_storages[name].buckets[0]
        else:
            storage = self.artifacts.get_vfs(name)
        importer = Importer(client, storage, self.pool, self.reactor, parallel=self.hf_parallel,
                            emit=self.publish_events, hub_pool=self.hub_pool, bucket=bucket,
                            part_size=client.config.part_size)
        return await import_models(progress, importer, list(context["models"]), context.get("storage_prefix"))

    return run
