"""The configured artifact storages, by name (no HTTP)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service

from storage.artifact_config import ArtifactConfig, ObjectStorageConfig, VFSStorageConfig
from storage.artifacts.errors import ArtifactStorageNotFound, ArtifactStorageTypeInvalid
from storage.artifacts.vfs import VFSArtifactStorage
from storage.config import ConfigError
from storage.errors import UnsupportedOperation


class ArtifactStorages:
    def __init__(self, config: ArtifactConfig | None, max_connections: int = 16) -> None:
        config = config or ArtifactConfig()
        self.max_connections = max_connections
        self.vfs: dict[str, VFSArtifactStorage] = {}
        self.object_storages: dict[str, ObjectStorageConfig] = {}
        self._s3: dict[str, Any] = {}
        for name, cfg in config.storages.items():
            if isinstance(cfg, VFSStorageConfig):
                self.vfs[name] = VFSArtifactStorage(cfg)
            else:
                self.object_storages[name] = cfg

    def prepare(self) -> None:
        """Blocking, at start-up: create (or empty, if temporary) every VFS root, and
        every S3 client (botocore loads its service model: not on the reactor, later)."""
        for name, storage in self.vfs.items():
            try:
                storage.prepare()
            except OSError as exc:
                raise ConfigError(f"[artifact-storages.{name}] base-path",
                                  f"cannot prepare {storage.config.root}: {exc.strerror or exc}") from None
        for name in self.object_storages:
            try:
                self.get_s3(name)
            except ValueError as exc:  # botocore refuses the endpoint, say
                raise ConfigError(f"[artifact-storages.{name}] endpoint", str(exc)) from None

    def get_vfs(self, name: str) -> VFSArtifactStorage:
        try:
            return self.vfs[name]
        except KeyError:
            if name in self.object_storages:
                raise ArtifactStorageTypeInvalid(f"storage {name!r} is an object storage, not a VFS storage") from None
            raise ArtifactStorageNotFound(f"no VFS artifact storage named {name!r}") from None

    def get_s3(self, name: str) -> Any:
        """The ``S3Storage`` client of object storage ``name`` (made once)."""
        if name not in self.object_storages:
            if name in self.vfs:
                raise ArtifactStorageTypeInvalid(f"storage {name!r} is a VFS storage, not an object storage")
            raise ArtifactStorageNotFound(f"no object storage named {name!r}")
        client = self._s3.get(name)
        if client is None:
            try:
                from storage.artifacts.s3 import S3Storage
            except ImportError:
                raise UnsupportedOperation("object storages are not served by this build") from None

            client = self._s3[name] = S3Storage(self.object_storages[name], self.max_connections)
        return client


class ArtifactStorageService(Service):
    """Prepares the VFS artifact roots when the daemon starts (after privileges drop)."""

    name = "artifact-storages"  # type: ignore[assignment]

    def __init__(self, storages: ArtifactStorages) -> None:
        self.storages = storages

    def startService(self) -> None:
        super().startService()
        self.storages.prepare()
