"""The artifact tables of the configuration, with upstream 26.9.6's key names.

* ``[artifact-storages.NAME]`` with ``type = "vfs_storage"`` (``"vfs"`` too)
  and a ``[artifact-storages.NAME.vfs-storage]`` table (``base-path``, ...),
  or ``type = "object_storage"`` and ``[artifact-storages.NAME.object-storage]``
  (``endpoint``, ``access-key``, ``secret-key``, ``region``, ``buckets``, ...).
  Our spelling with the keys directly in ``[artifact-storages.NAME]`` is
  accepted as well.
* ``[artifact-registries.NAME]`` with ``type = "huggingface"`` or
  ``"reservoir"`` and a table of that name.
* The legacy lists ``[[storages]]`` (object storages with a ``name``) and
  ``[[registries]]`` (``name`` and a ``config`` table with its ``type``).

Every invalid value raises ``ConfigError`` naming the key.  Secrets are kept
out of ``repr`` so a logged config never shows them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from storage.errors import ConfigError

VFS = "vfs_storage"
OBJECT_STORAGE = "object_storage"
STORAGE_TYPES = {"vfs_storage": VFS, "vfs": VFS, "object_storage": OBJECT_STORAGE}
REGISTRY_TYPES = ("huggingface", "reservoir")
MIN_PART = 5 * 1024 * 1024  # S3's smallest multipart part
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class VFSStorageConfig:
    name: str
    base_path: Path
    subpath: str | None = None
    temporary: bool = False
    upload_chunk_size: int = 65536
    download_chunk_size: int = 65536
    max_file_size: int | None = None

    @property
    def root(self) -> Path:
        return self.base_path / self.subpath if self.subpath else self.base_path


@dataclass(frozen=True)
class ObjectStorageConfig:
    name: str
    endpoint: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str
    buckets: tuple[str, ...] = ()
    verify_ssl: bool | str = True  # ours: false, or a CA bundle file
    presigned_upload_expiration: int = 300
    presigned_upload_min_size: int | None = None
    presigned_upload_max_size: int | None = None
    presigned_download_expiration: int = 300
    upload_chunk_size: int = MIN_PART
    download_chunk_size: int = 8192
    reservoir_download_chunk_size: int = 8192


@dataclass(frozen=True)
class RegistryConfig:
    name: str
    type: str  # huggingface | reservoir
    endpoint: str
    token: str | None = field(default=None, repr=False)
    download_chunk_size: int = 8192
    # huggingface, ours: seconds a download may stall before it is retried from its offset
    read_timeout: float = 60.0
    # ours: a file larger than this comes in ranged parts of this size, several at once (0: never)
    part_size: int = 0
    # reservoir only
    object_storage_access_key: str | None = field(default=None, repr=False)
    object_storage_secret_key: str | None = field(default=None, repr=False)
    object_storage_region: str | None = None
    manager_endpoint: str | None = None
    manager_access_key: str | None = field(default=None, repr=False)
    manager_secret_key: str | None = field(default=None, repr=False)
    manager_api_version: str | None = None
    storage_name: str | None = None  # the source's VFS storage (on the remote side)
    # ours: the remote storage proxy's manager API itself, instead of a manager in front of it
    storage_proxy_endpoint: str | None = None
    storage_proxy_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ArtifactConfig:
    storages: dict[str, VFSStorageConfig | ObjectStorageConfig] = field(default_factory=dict)
    registries: dict[str, RegistryConfig] = field(default_factory=dict)


def _norm(table: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_", "-"): v for k, v in table.items()}


class _Table:
    """Typed reads from one table, every error naming ``prefix key``."""

    def __init__(self, raw: Any, prefix: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(prefix, f"expected a table, got {raw!r}")
        self.t = _norm(raw)
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix} {name}"

    def has(self, name: str) -> bool:
        return name in self.t

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.t.get(name, default)
        if value is None:
            if required:
                raise ConfigError(self.key(name), "required")
            return None
        if not isinstance(value, str):
            raise ConfigError(self.key(name), f"expected a string, got {value!r}")
        if required and not value:
            raise ConfigError(self.key(name), "must not be empty")
        return value

    def req(self, name: str) -> str:
        value = self.string(name, required=True)
        assert value is not None
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.t.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"expected true or false, got {value!r}")
        return value

    def integer(self, name: str, default: int | None, minimum: int = 0) -> int | None:
        value = self.t.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"expected an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}, got {value}")
        return value

    def sub(self, name: str) -> _Table:
        if self.prefix.endswith("]") and not self.prefix.startswith("[["):
            return _Table(self.t.get(name, {}), f"{self.prefix[:-1]}.{name}]")
        return _Table(self.t.get(name, {}), f"{self.prefix} {name}")


def _url(table: _Table, name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(table.key(name), f"expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


def _check_name(prefix: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(prefix, f"not a valid name: {name!r} (letters, digits, '.', '_', '-')")
    return name


def _vfs(name: str, t: _Table) -> VFSStorageConfig:
    base = t.req("base-path")
    if not Path(base).is_absolute():
        raise ConfigError(t.key("base-path"), f"must be an absolute path, got {base!r}")
    subpath = t.string("subpath")
    if subpath and (Path(subpath).is_absolute() or ".." in Path(subpath).parts):
        raise ConfigError(t.key("subpath"), f"must be a relative path inside base-path, got {subpath!r}")
    return VFSStorageConfig(
        name=name,
        base_path=Path(base),
        subpath=subpath or None,
        temporary=t.boolean("temporary", False),
        upload_chunk_size=t.integer("upload-chunk-size", 65536, minimum=1024) or 65536,
        download_chunk_size=t.integer("download-chunk-size", 65536, minimum=1024) or 65536,
        max_file_size=t.integer("max-file-size", None, minimum=1),
    )


def _object_storage(name: str, t: _Table) -> ObjectStorageConfig:
    endpoint = _url(t, "endpoint", t.req("endpoint"))
    buckets = t.t.get("buckets", [])
    if not isinstance(buckets, list) or not all(isinstance(b, str) for b in buckets):
        raise ConfigError(t.key("buckets"), f"expected a list of bucket names, got {buckets!r}")
    for b in buckets:
        if not _BUCKET_RE.match(b):
            raise ConfigError(t.key("buckets"), f"not a valid bucket name: {b!r}")
    verify: bool | str = True
    raw_verify = t.t.get("verify-ssl", t.t.get("ssl-verify", True))
    if isinstance(raw_verify, bool):
        verify = raw_verify
    elif isinstance(raw_verify, str) and Path(raw_verify).is_file():
        verify = raw_verify
    else:
        raise ConfigError(t.key("verify-ssl"), f"expected true, false or a CA bundle file, got {raw_verify!r}")
    up = t.sub("presigned-upload")
    down = t.sub("presigned-download")
    return ObjectStorageConfig(
        name=name,
        endpoint=endpoint,
        access_key=t.req("access-key"),
        secret_key=t.req("secret-key"),
        region=t.req("region"),
        buckets=tuple(buckets),
        verify_ssl=verify,
        presigned_upload_expiration=t_int(up, "expiration", 300, 1),
        presigned_upload_min_size=up.integer("min-size", None),
        presigned_upload_max_size=up.integer("max-size", None, minimum=1),
        presigned_download_expiration=t_int(down, "expiration", 300, 1),
        upload_chunk_size=t_int(t, "upload-chunk-size", MIN_PART, MIN_PART),
        download_chunk_size=t_int(t, "download-chunk-size", 8192, 1),
        reservoir_download_chunk_size=t_int(t, "reservoir-download-chunk-size", 8192, 1),
    )


def t_int(t: _Table, name: str, default: int, minimum: int) -> int:
    value = t.integer(name, default, minimum)
    assert value is not None
    return value


def _storage_type(t: _Table) -> str:
    raw = t.t.get("type")
    if raw not in STORAGE_TYPES:
        raise ConfigError(t.key("type"), f"expected 'vfs_storage' or 'object_storage', got {raw!r}")
    return STORAGE_TYPES[raw]


def _storage(name: str, raw: Any) -> VFSStorageConfig | ObjectStorageConfig:
    prefix = f"[artifact-storages.{name}]"
    _check_name(prefix, name)
    t = _Table(raw, prefix)
    kind = _storage_type(t)
    sub_name = "vfs-storage" if kind == VFS else "object-storage"
    # Upstream nests the settings in a sub-table; keys directly in the table work too.
    inner = t.sub(sub_name) if t.has(sub_name) else t
    return _vfs(name, inner) if kind == VFS else _object_storage(name, inner)


def _registry(name: str, kind: Any, t: _Table, type_key: str) -> RegistryConfig:
    if kind not in REGISTRY_TYPES:
        raise ConfigError(type_key, f"expected 'huggingface' or 'reservoir', got {kind!r}")
    if kind == "huggingface":
        endpoint = _url(t, "endpoint", t.string("endpoint", "https://huggingface.co") or "https://huggingface.co")
        return RegistryConfig(
            name=name, type=kind, endpoint=endpoint, token=t.string("token") or None,
            download_chunk_size=t_int(t, "download-chunk-size", 8192, 1),
            read_timeout=float(t_int(t, "read-timeout", 60, 1)),
            part_size=_part_size(t),
        )
    return _reservoir(name, t)


DEFAULT_PART_SIZE = 64 << 20
MIN_PART_SIZE = 1 << 20


def _part_size(t: _Table) -> int:
    """``part-size`` (ours): bytes per ranged part of a large file; 0 turns ranged parts off."""
    value = t_int(t, "part-size", DEFAULT_PART_SIZE, 0)
    if 0 < value < MIN_PART_SIZE:
        raise ConfigError(t.key("part-size"), f"must be 0 (off) or at least {MIN_PART_SIZE}, got {value}")
    return value


_API_VERSION_RE = re.compile(r"^v[0-9]+(\.[0-9]{8})?$")


def _reservoir(name: str, t: _Table) -> RegistryConfig:
    """Upstream's reservoir keys; what reaches the source is checked here, at start."""
    endpoint = t.string("endpoint")
    endpoint = _url(t, "endpoint", endpoint) if endpoint else "https://huggingface.co"  # upstream's default
    manager_endpoint = t.string("manager-endpoint")
    if manager_endpoint:
        manager_endpoint = _url(t, "manager-endpoint", manager_endpoint)
    direct = t.string("storage-proxy-endpoint")
    if direct:
        direct = _url(t, "storage-proxy-endpoint", direct)
    if manager_endpoint and direct:
        raise ConfigError(t.key("storage-proxy-endpoint"), "give either manager-endpoint or storage-proxy-endpoint")
    if not manager_endpoint and not direct:
        raise ConfigError(t.key("manager-endpoint"),
                          "required (the source's manager), or storage-proxy-endpoint (its storage proxy)")
    token = t.string("storage-proxy-token")
    if direct and not token:
        raise ConfigError(t.key("storage-proxy-token"), "required with storage-proxy-endpoint")
    access = t.string("manager-access-key")
    secret = t.string("manager-secret-key")
    version = t.string("manager-api-version")
    if manager_endpoint:
        for key, value in (("manager-access-key", access), ("manager-secret-key", secret),
                           ("manager-api-version", version)):
            if not value:
                raise ConfigError(t.key(key), "required with manager-endpoint")
        if version and not _API_VERSION_RE.match(version):
            raise ConfigError(t.key("manager-api-version"), f"expected a version such as 'v9', got {version!r}")
    storage_name = t.req("storage-name")
    _check_name(t.key("storage-name"), storage_name)
    return RegistryConfig(
        name=name, type="reservoir", endpoint=endpoint,
        download_chunk_size=t_int(t, "download-chunk-size", 8192, 1),
        read_timeout=float(t_int(t, "read-timeout", 60, 1)),
        part_size=_part_size(t) if direct else 0,  # a manager in between passes no Range on
        object_storage_access_key=t.string("object-storage-access-key"),
        object_storage_secret_key=t.string("object-storage-secret-key"),
        object_storage_region=t.string("object-storage-region"),
        manager_endpoint=manager_endpoint or None,
        manager_access_key=access,
        manager_secret_key=secret,
        manager_api_version=version,
        storage_name=storage_name,
        storage_proxy_endpoint=direct or None,
        storage_proxy_token=token,
    )


def parse_artifact_config(root: dict[str, Any]) -> ArtifactConfig:
    storages: dict[str, VFSStorageConfig | ObjectStorageConfig] = {}
    registries: dict[str, RegistryConfig] = {}
    section = root.get("artifact-storages", root.get("artifact_storages", {}))
    if not isinstance(section, dict):
        raise ConfigError("[artifact-storages]", "expected tables such as [artifact-storages.models]")
    for name, raw in section.items():
        storages[name] = _storage(name, raw)
    legacy = root.get("storages", [])
    if not isinstance(legacy, list):
        raise ConfigError("[[storages]]", f"expected a list of tables, got {legacy!r}")
    for i, raw in enumerate(legacy):
        t = _Table(raw, f"[[storages]] #{i + 1}")
        name = _check_name(t.key("name"), t.req("name"))
        if name in storages:
            raise ConfigError(t.key("name"), f"storage {name!r} is defined twice")
        storages[name] = _object_storage(name, t)
    section = root.get("artifact-registries", root.get("artifact_registries", {}))
    if not isinstance(section, dict):
        raise ConfigError("[artifact-registries]", "expected tables such as [artifact-registries.hf]")
    for name, raw in section.items():
        prefix = f"[artifact-registries.{name}]"
        _check_name(prefix, name)
        t = _Table(raw, prefix)
        kind = t.t.get("type")
        inner = t.sub(kind) if isinstance(kind, str) and t.has(kind) else t
        registries[name] = _registry(name, kind, inner, t.key("type"))
    legacy = root.get("registries", [])
    if not isinstance(legacy, list):
        raise ConfigError("[[registries]]", f"expected a list of tables, got {legacy!r}")
    for i, raw in enumerate(legacy):
        t = _Table(raw, f"[[registries]] #{i + 1}")
        name = _check_name(t.key("name"), t.req("name"))
        if name in registries:
            raise ConfigError(t.key("name"), f"registry {name!r} is defined twice")
        inner = t.sub("config")
        registries[name] = _registry(name, inner.t.get("type"), inner, inner.key("type"))
    # A reservoir's storage-name is the source's storage, on the remote side (upstream sends it
    # there), so it is not looked up among ours.
    return ArtifactConfig(storages, registries)
