"""A reservoir registry: another Backend.AI's VFS artifact storage as an import source (no routes).

Upstream's reservoir download lists the model's directory in the remote
storage (``files`` with ``{"directory"}``) and downloads each file
(``download`` with ``{"filepath"}``).  Two ways to reach the remote storage:

* upstream's: the remote **manager** (``manager-endpoint``, its access and
  secret key, ``manager-api-version``), ``GET /vfs-storages/<storage>/files``
  and ``POST /vfs-storages/<storage>/download``, each signed as the
  manager's HMAC-SHA256 API auth; the manager streams from its storage proxy
  and does not pass ``Range`` on, so a file cut short starts again;
* ours: the remote **storage proxy** directly (``storage-proxy-endpoint``, its
  manager-API ``storage-proxy-token``): ``/v1/storages/vfs/<storage>/files`` and
  ``/download`` -- the routes that manager calls -- which honour ``Range`` and
  ``If-Range``, so an interrupted file resumes where it stopped.

Files go through ``storage.artifacts.hfimport.Importer`` (parallel files,
staging, resume after an interruption or a restart, the destinations): a
reservoir lists no hash, so a file is verified by its size and version: every
part is asked for with ``If-Range`` on the listed modification time, so a
file changed on the source mid-import is sent whole and restarted, never
mixed, and a length other than the listed size is refused.  A finished file
gets the source's mtime; one already there with the listed size and that
mtime is skipped (rsync's quick check).  Listing calls block (hub pool).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.logger import Logger

from storage.artifact_config import RegistryConfig
from storage.artifacts.huggingface import HuggingFaceAPIError, RegistryNotFound
from storage.errors import StorageError

log = Logger()

LIST_TIMEOUT = 60.0


class ArtifactRevisionEmpty(StorageError):
    status = 400
    problem = "storage/artifact/revision/empty"
    title = "Artifact Revision Empty"
    error_code = "artifact_read_invalid-parameters"


class ReservoirModelNotFound(StorageError):
    """The model's directory is not in the remote storage (upstream: ``ArtifactStorageEmptyError``)."""

    status = 404
    problem = "storage/artifact/not-found"
    title = "Artifact Not Found"
    error_code = "artifact_read_not-found"


@dataclass(frozen=True)
class ReservoirFile:
    """One file of the remote model directory, as its listing describes it."""

    path: str  # relative to the model's directory: the key below the destination prefix
    remote_path: str  # relative to the remote storage's root
    size: int
    modified: float  # the remote st_mtime, seconds

    sha256 = None
    expected_etag = None  # nothing listed to hash against: size and version instead
    missing_error = ReservoirModelNotFound

    @property
    def mtime_ns(self) -> int:
        return int(round(self.modified * 1_000_000)) * 1000  # the listing's float keeps microseconds

    @property
    def stage_tag(self) -> str:
        return hashlib.sha256(f"{self.remote_path}\0{self.size}\0{self.modified!r}".encode()).hexdigest()

    @property
    def object_tags(self) -> dict[str, str]:
        return {"reservoir-version": f"{self.size}-{self.mtime_ns}"}

    @property
    def url(self) -> str:  # only a key for Importer.commits
        return self.remote_path


def sign(method: str, rel_url: str, endpoint: str, date: datetime, version: str, access_key: str,
         secret_key: str, content_type: str = "application/json") -> str:
    """The ``Authorization`` value of the manager's API auth (HMAC-SHA256 of the request line,
    date, host, content type, version and the empty body's hash, with a key derived from the
    secret, the day and the host)."""
    host = urlsplit(endpoint).netloc
    body_hash = hashlib.sha256(b"").hexdigest()
    text = (f"{method.upper()}\n{rel_url}\n{date.isoformat()}\nhost:{host}\ncontent-type:{content_type.lower()}"
            f"\nx-backendai-version:{version}\n{body_hash}")
    key = hmac.new(secret_key.encode(), date.strftime("%Y%m%d").encode(), "sha256").digest()
    key = hmac.new(key, host.encode(), "sha256").digest()
    signature = hmac.new(key, text.encode(), "sha256").hexdigest()
    return f"BackendAI signMethod=HMAC-SHA256, credential={access_key}:{signature}"


class ReservoirClient:
    """One reservoir registry: lists and downloads the files of a remote VFS storage."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        assert config.storage_name
        storage = quote(config.storage_name, safe="")
        if config.storage_proxy_endpoint:
            self.endpoint = config.storage_proxy_endpoint.rstrip("/")
            self.base = f"/v1/storages/vfs/{storage}"
            self.via_manager = False
        else:
            assert config.manager_endpoint
            self.endpoint = config.manager_endpoint.rstrip("/")
            self.base = f"/vfs-storages/{storage}"
            self.via_manager = True
        self._prefix_path = urlsplit(self.endpoint).path.rstrip("/")

    # -- requests ---------------------------------------------------------------

    def headers(self, method: str, rel_url: str) -> dict[str, str]:
        out = {"Content-Type": "application/json", "User-Agent": "storage-proxy reservoir"}
        if not self.via_manager:
            out["X-BackendAI-Storage-Auth-Token"] = self.config.storage_proxy_token or ""
            return out
        date = datetime.now(timezone.utc)
        version = self.config.manager_api_version or ""
        out.update({
            "X-BackendAI-Version": version,
            "Date": date.isoformat(),
            "Authorization": sign(method, rel_url, self.endpoint, date, version,
                                  self.config.manager_access_key or "", self.config.manager_secret_key or ""),
        })
        return out

    def _call(self, method: str, rel: str, body: dict[str, Any] | None, *, absolute: bool = False) -> Any:
        """A JSON call (blocks): the answer's body, or a StorageError naming what failed."""
        parts = urlsplit(self.endpoint)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.netloc, timeout=LIST_TIMEOUT, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=LIST_TIMEOUT)
        rel_url = rel if absolute else self.base + rel
        try:
            conn.request(method, self._prefix_path + rel_url, body=json.dumps(body).encode() if body is not None else None,
                         headers=self.headers(method, rel_url))
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise HuggingFaceAPIError(f"reservoir {self.config.name}: {self.endpoint} unreachable: "
                                      f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        if response.status == 404:
            raise ReservoirModelNotFound(f"reservoir {self.config.name}: {body}: not found at the source")
        if response.status != 200:
            raise HuggingFaceAPIError(f"reservoir {self.config.name}: {method} {rel_url} answered "
                                      f"HTTP {response.status}: {payload[:200].decode('utf-8', 'replace')}")
        try:
            return json.loads(payload)
        except ValueError:
            raise HuggingFaceAPIError(f"reservoir {self.config.name}: {rel_url} answered no JSON") from None

    # -- what the importer calls ---------------------------------------------------

    def files_for(self, model_id: str, revision: str, prefix: str | None) -> list[ReservoirFile]:
        """Every file below the model's directory at the source: upstream's
        ``{model_id}/{revision}``, or the import's ``storage_prefix`` (``/``: the root)."""
        if prefix is None:
            directory = f"{model_id}/{revision}"
        elif prefix == "/":
            directory = ""
        else:
            directory = prefix.strip("/")
        answer = self._call("GET", "/files", {"directory": directory})
        entries = answer.get("files") if isinstance(answer, dict) else None
        if not isinstance(entries, list):
            raise HuggingFaceAPIError(f"reservoir {self.config.name}: a listing without files")
        out = []
        for e in entries:
            if not isinstance(e, dict) or e.get("type") != "file" or not isinstance(e.get("path"), str):
                continue
            remote = e["path"]
            rel = remote[len(directory):].lstrip("/") if directory and remote.startswith(directory) else remote
            out.append(ReservoirFile(path=rel, remote_path=remote, size=int(e.get("size") or 0),
                                     modified=float(e.get("modified") or 0.0)))
        if not out:
            raise ReservoirModelNotFound(f"reservoir {self.config.name}: no files under {directory!r}")
        return sorted(out, key=lambda f: f.path)

    def commit_hash(self, model_id: str, revision: str) -> str | None:
        return None  # upstream: a reservoir's digest comes later through the manager's scan

    def verification_result(self, artifact_revision_id: str) -> dict[str, Any] | None:
        """The source manager's verification result for the revision (upstream asks after a
        successful import, for ``model_import_done``); None without a manager or on any failure."""
        if not self.via_manager:
            return None
        rel_url = f"/artifacts/revisions/{quote(artifact_revision_id, safe='')}/verification-result"
        try:
            answer = self._call("GET", rel_url, None, absolute=True)
        except StorageError as exc:
            log.warn("reservoir {name}: no verification result for {rid}: {why}", name=self.config.name,
                     rid=artifact_revision_id, why=str(exc))
            return None
        result = answer.get("verification_result") if isinstance(answer, dict) else None
        return result if isinstance(result, dict) else None

    def download_request(self, f: ReservoirFile, offset: int, end: int | None = None
                         ) -> tuple[str, str, dict[bytes, list[bytes]], bytes]:
        rel_url = self.base + "/download"
        headers = {k.encode(): [v.encode("latin-1")] for k, v in self.headers("POST", rel_url).items()}
        if offset or end is not None:
            headers[b"Range"] = [f"bytes={offset}-{'' if end is None else end}".encode()]
            # the same version as the bytes we hold, or the whole (changed) file: never a mix
            headers[b"If-Range"] = [formatdate(int(f.modified), usegmt=True).encode()]
        body = json.dumps({"filepath": f.remote_path}).encode()
        return "POST", self.endpoint + rel_url, headers, body


class ReservoirRegistries:
    """The configured ``reservoir`` registries, by name."""

    def __init__(self, registries: dict[str, RegistryConfig] | None) -> None:
        self.configs = {n: r for n, r in (registries or {}).items() if r.type == "reservoir"}
        self._clients: dict[str, ReservoirClient] = {}

    def get(self, name: str) -> ReservoirClient:
        config = self.configs.get(name)
        if config is None:
            raise RegistryNotFound(f"reservoir registry not found: {name}")
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = ReservoirClient(config)
        return client
