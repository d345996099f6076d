"""HuggingFace registries: the hub's metadata through ``huggingface_hub`` (no HTTP routes here).

Every method of ``HubClient`` blocks (the library's HTTP client is
synchronous): run them in the pool.  The endpoint is the registry's
``endpoint``; a registry without a token never falls back to a token saved
on this machine (``token=False``).

Errors: a repository or revision the hub does not know is
``HuggingFaceModelNotFound`` (404, upstream's ``HuggingFaceModelNotFoundError``
code); anything else the hub or the network does is ``HuggingFaceAPIError``
(upstream's code, but 502: it is the hub failing, not us).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from storage.artifact_config import RegistryConfig
from storage.errors import InvalidAPIParameters, StorageError

SORT_KEYS = ("last_modified", "trending_score", "created_at", "downloads", "likes")
DEFAULT_REVISION = "main"
README = "README.md"


class RegistryNotFound(StorageError):
    status = 404
    problem = "registries/registry-not-found"
    title = "Registry Not Found"
    error_code = "artifact-registry_read_not-found"


class HuggingFaceModelNotFound(StorageError):
    status = 404
    problem = "registries/huggingface/model-not-found"
    title = "HuggingFace Model Not Found"
    error_code = "artifact_read_not-found"


class HuggingFaceAPIError(StorageError):
    status = 502
    problem = "registries/huggingface/api-error"
    title = "HuggingFace API Error"
    error_code = "artifact-registry_request_unreachable"
    external = True  # logged as one line (storage.api.problems)


class ArtifactVerificationFailed(StorageError):
    status = 502
    problem = "registries/huggingface/verification-failed"
    title = "Artifact Verification Failed"
    error_code = "artifact_verify_mismatch"


@dataclass(frozen=True)
class HubFile:
    """One file of a model revision, as the hub's tree listing describes it."""

    path: str
    size: int
    blob_id: str  # the git blob sha1 (for LFS files: of the pointer)
    sha256: str | None  # LFS files only
    url: str

    @property
    def expected_etag(self) -> str:
        """What ``resolve`` answers in ``X-Linked-Etag`` (LFS) or ``ETag``: the sha256, else the blob id."""
        return self.sha256 or self.blob_id

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "type": "file", "download_url": self.url}


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None and value.utcoffset() == timezone.utc.utcoffset(None):
        return value.replace(tzinfo=None).isoformat() + "Z"
    return value.isoformat()


def model_data(model_id: str, revision: str, info: Any, *, readme: str | None = None,
               size: int | None = None) -> dict[str, Any]:
    """Upstream's ``ModelData`` (common ``data/storage/registries/types.py``) as JSON."""
    return {
        "id": model_id,
        "name": model_id.split("/")[-1],
        "author": getattr(info, "author", None),
        "revision": revision,
        "tags": list(getattr(info, "tags", None) or []),
        "created_at": iso(getattr(info, "created_at", None)),
        "modified_at": iso(getattr(info, "last_modified", None)),
        "readme": readme,
        "size": size,
        "sha": None,  # upstream leaves it out here: commit-hash answers it
        "extra": {"gated": getattr(info, "gated", None)},
    }


class HubClient:
    """One registry's hub, through ``huggingface_hub.HfApi``.  Every method blocks."""

    def __init__(self, config: RegistryConfig, timeout: float = 30.0) -> None:
        self.config = config
        self.endpoint = config.endpoint
        self.timeout = timeout
        self.token: str | bool = config.token or False
        self._api: Any = None

    @property
    def api(self) -> Any:
        """The ``HfApi`` (made on first use, in the pool: the import is slow)."""
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(endpoint=self.endpoint, token=self.token)
        return self._api

    # -- errors ---------------------------------------------------------------

    def _wrap(self, exc: Exception, what: str) -> StorageError:
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, HFValidationError):  # refused before any request: the caller's id or revision
            return InvalidAPIParameters(f"{what}: {exc}")
        if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)) and not isinstance(exc, GatedRepoError):
            return HuggingFaceModelNotFound(f"{what}: not found on the hub")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return HuggingFaceAPIError(f"{what}: {first}")

    # -- metadata ---------------------------------------------------------------

    def model_info(self, model_id: str, revision: str) -> Any:
        try:
            return self.api.model_info(model_id, revision=revision, timeout=self.timeout)
        except Exception as exc:
            raise self._wrap(exc, f"model {model_id}@{revision}") from exc

    def commit_hash(self, model_id: str, revision: str) -> str | None:
        sha = self.model_info(model_id, revision).sha
        return str(sha) if sha else None

    def revisions(self, model_id: str) -> list[str]:
        """Branches and tags; ``main`` alone when the hub will not list them (gated, say), as upstream."""
        try:
            refs = self.api.list_repo_refs(model_id)
        except Exception:
            return [DEFAULT_REVISION]
        names = [b.name for b in refs.branches] + [t.name for t in refs.tags]
        return list(dict.fromkeys(names)) or [DEFAULT_REVISION]

    def files(self, model_id: str, revision: str) -> list[HubFile]:
        """Every file of the revision (folders left out), with its size and hashes."""
        from huggingface_hub.file_download import hf_hub_url
        from huggingface_hub.hf_api import RepoFile

        try:
            entries = list(self.api.list_repo_tree(model_id, recursive=True, revision=revision))
        except Exception as exc:
            raise self._wrap(exc, f"files of {model_id}@{revision}") from exc
        out = []
        for entry in entries:
            if not isinstance(entry, RepoFile):
                continue
            out.append(HubFile(
                path=entry.path, size=int(entry.size or 0), blob_id=entry.blob_id,
                sha256=entry.lfs.sha256 if entry.lfs is not None else None,
                url=hf_hub_url(model_id, entry.path, revision=revision, endpoint=self.endpoint),
            ))
        return sorted(out, key=lambda f: f.path)

    def readme(self, model_id: str, revision: str) -> str | None:
        from huggingface_hub import get_session
        from huggingface_hub.file_download import hf_hub_url

        url = hf_hub_url(model_id, README, revision=revision, endpoint=self.endpoint)
        try:
            response = get_session().get(url, headers=self.api._build_hf_headers(token=self.token),
                                         timeout=self.timeout, follow_redirects=True)
        except Exception:
            return None
        if response.status_code != 200:
            return None
        return str(response.text)

    def scan(self, limit: int, sort: str, search: str | None) -> list[dict[str, Any]]:
        """Upstream's scan: the first ``limit`` models, one ``ModelData`` per branch and tag."""
        try:
            models = list(self.api.list_models(
                search=search, sort=sort, limit=limit,  # type: ignore[arg-type]
                expand=["author", "gated", "tags", "createdAt", "lastModified"],
            ))
        except Exception as exc:
            raise self._wrap(exc, "listing models") from exc
        out = []
        for info in models:
            for revision in self.revisions(info.id):
                out.append(model_data(info.id, revision, info))
        return out

    def model(self, model_id: str, revision: str) -> dict[str, Any]:
        """One model with its README and total size (upstream's ``retrieve_model``)."""
        info = self.model_info(model_id, revision)
        size = sum(f.size for f in self.files(model_id, revision))
        return model_data(model_id, revision, info, readme=self.readme(model_id, revision), size=size)

    def model_basic(self, model_id: str, revision: str) -> dict[str, Any]:
        """Without README and size (upstream's ``models/batch``)."""
        return model_data(model_id, revision, self.model_info(model_id, revision))


class HuggingFaceRegistries:
    """The configured ``huggingface`` registries, by name, each with one ``HubClient``."""

    def __init__(self, registries: dict[str, RegistryConfig] | None) -> None:
        self.configs = {n: r for n, r in (registries or {}).items() if r.type == "huggingface"}
        self._clients: dict[str, HubClient] = {}

    def get(self, name: str) -> HubClient:
        config = self.configs.get(name)
        if config is None:
            raise RegistryNotFound(f"HuggingFace registry not found: {name}")
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = HubClient(config)
        return client
