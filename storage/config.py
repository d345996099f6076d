"""The TOML configuration, with upstream's sections and key names.

Keys may be spelled with hyphens (upstream's files) or underscores.  Every
invalid value raises ``ConfigError`` naming the key and what is wrong, so the
daemon can say it in one line instead of a traceback.  Sections upstream has
and we do not use (``[debug]``, ...) are accepted and ignored; ``[etcd]`` is
read only for the manager's Redis when there is no ``[redis]``.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# ConfigError lives in storage.errors (a leaf), so the parsers in artifact_config and
# events.settings need not import this module back; it is still storage.config.ConfigError.
from storage.errors import ConfigError as ConfigError
from storage.fs.atomic import write_atomic

KNOWN_BACKENDS = ("vfs", "xfs", "cephfs", "purestorage")

# Where upstream looks for its config when none is named, in order.
CONFIG_SEARCH_PATH = (
    Path("storage-proxy.toml"),
    Path.home() / ".config" / "backend.ai" / "storage-proxy.toml",
    Path("/etc/backend.ai/storage-proxy.toml"),
)

DEFAULT_DATA_ROOT = Path("vfroot")
SECRETS_FILE_NAME = ".storage-proxy-secrets.toml"


DEFAULT_LISTEN_BACKLOG = 4096


@dataclass(frozen=True)
class ServiceAddr:
    host: str
    port: int


@dataclass(frozen=True)
class APIConfig:
    service_addr: ServiceAddr
    ssl_enabled: bool = False
    ssl_cert: Path | None = None
    ssl_privkey: Path | None = None
    secret: str | None = None  # only the manager API has one
    # listen(2)'s backlog: connections the kernel completes and queues before
    # the daemon accepts them.  Twisted's default (50) overflows when many
    # clients connect at once; then the kernel drops handshakes and, with SYN
    # cookies, answers a client's later body segments with RSTs.  The kernel
    # caps it at net.core.somaxconn.
    listen_backlog: int = DEFAULT_LISTEN_BACKLOG
    # Connection limits and timeouts (storage.web.connections); None: a share
    # of the open-file limit (storage.web.connections.default_max_connections).
    max_connections: int | None = None
    max_connections_per_address: int = 0  # 0: no limit per client address
    request_header_timeout: float = 30.0
    idle_timeout: float = 60.0  # twisted.web's default: between requests, or no byte for this long

    def endpoint_description(self) -> str:
        """A twisted strports description for this listener."""
        host = self.service_addr.host.replace(":", r"\:")
        backlog = f":backlog={self.listen_backlog}"
        if self.ssl_enabled:
            return (
                f"ssl:{self.service_addr.port}:interface={host}{backlog}"
                f":privateKey={self.ssl_privkey}:certKey={self.ssl_cert}"
            )
        return f"tcp:{self.service_addr.port}:interface={host}{backlog}"


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    backend: str
    path: Path
    fsprefix: str = "."
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    node_id: str
    secret: str
    session_expire: int  # seconds
    max_upload_size: int  # bytes
    scandir_limit: int
    client: APIConfig
    manager: APIConfig
    volumes: dict[str, VolumeConfig]
    pid_file: Path | None = None
    user: str | int | None = None
    group: str | int | None = None
    allow_auto_quota_scope_creation: bool = True
    max_manager_body: int = 1 << 20
    upload_expire: int = 7 * 86400  # abandoned tus staging files are removed after this
    io_threads: int = 16
    shutdown_grace: float = 10.0
    reactor_realtime: bool = True  # SCHED_RR for the reactor thread when permitted
    log_level: str = "INFO"
    artifacts: Any = None  # storage.artifact_config.ArtifactConfig (the /v1 API)
    source: Path | None = None  # the file this came from; None for the embedded default
    generated_secrets: bool = False
    # [api.client] cors-allowed-origins / cors-allow-credentials (storage.web.cors)
    cors_allowed_origins: tuple[str, ...] = ("*",)
    cors_allow_credentials: bool = True
    # [redis] (storage.events.settings.RedisSettings): the manager's event bus; None: no events
    redis: Any = None
    # [etcd] (storage.events.settings.EtcdSettings), only without [redis]: Redis from etcd's config/redis
    etcd: Any = None
    # [storage-proxy] state-dir: the daemon's own durable state (the event outbox);
    # None: <first volume>/.storage-proxy/state/<node-id> (storage.events.outbox)
    state_dir: Path | None = None
    # [storage-proxy] num-proc (upstream's key): client-API worker processes; 1 serves in the daemon itself
    num_proc: int = 1
    # The validated TOML document this came from: what the daemon hands its workers (storage.workers)
    document: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    peer_probe_interval: float = 1.0  # how often replicas look for a dead one's state dir (0: never)


# -- value parsers -----------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(value: Any, key: str) -> int:
    """Parse ``"100g"``, ``"512m"``, ``"1.5t"`` or an int into bytes (binary units, as upstream)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size such as '100g', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, f"a size cannot be negative: {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            number, unit = m.group(1), m.group(2).lower()
            return int(float(number) * _SIZE_UNITS[unit])
    raise ConfigError(key, f"expected a size such as '100g', got {value!r}")


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|yr)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "yr": 31536000}


def parse_duration(value: Any, key: str) -> float:
    """Parse ``"1d"``, ``"30m"``, ``"10s"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration such as '1d', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(key, f"a duration cannot be negative: {value}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]
    raise ConfigError(key, f"expected a duration such as '1d', '12h' or '30m', got {value!r}")


def _normalize(table: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_", "-"): v for k, v in table.items()}


def _table(parent: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    value = parent.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a table, got {type(value).__name__}")
    return _normalize(value)


def _str(table: dict[str, Any], name: str, key: str, default: str | None = None) -> str | None:
    value = table.get(name, default)
    if value is not None and not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _bool(table: dict[str, Any], name: str, key: str, default: bool) -> bool:
    value = table.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _int(table: dict[str, Any], name: str, key: str, default: int, minimum: int = 0) -> int:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, got {value}")
    return value


def _user_or_group(table: dict[str, Any], name: str, key: str) -> str | int | None:
    value = table.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(key, f"expected a name or a numeric id, got {value!r}")
    return value


def _service_addr(table: dict[str, Any], key: str, default: ServiceAddr) -> ServiceAddr:
    value = table.get("service-addr")
    if value is None:
        return default
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ConfigError(key, f"expected {{host, port}} or 'host:port', got {value!r}")
        value = {"host": host.strip("[]"), "port": port}
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected {{host = ..., port = ...}}, got {value!r}")
    host = value.get("host", default.host)
    port = value.get("port", default.port)
    if not isinstance(host, str) or not host:
        raise ConfigError(key + ".host", f"expected a host name or address, got {host!r}")
    try:
        port_number = int(port)
    except (TypeError, ValueError):
        raise ConfigError(key + ".port", f"expected a port number, got {port!r}") from None
    if not 0 <= port_number <= 65535:
        raise ConfigError(key + ".port", f"must be between 0 and 65535, got {port_number}")
    return ServiceAddr(host, port_number)


def _api(root: dict[str, Any], name: str, default_port: int, with_secret: bool) -> APIConfig:
    prefix = f"[api.{name}]"
    api = _table(_table(root, "api", "[api]"), name, prefix)
    addr = _service_addr(api, f"{prefix} service-addr", ServiceAddr("127.0.0.1", default_port))
    ssl_enabled = _bool(api, "ssl-enabled", f"{prefix} ssl-enabled", False)
    cert = _str(api, "ssl-cert", f"{prefix} ssl-cert")
    key = _str(api, "ssl-privkey", f"{prefix} ssl-privkey")
    if ssl_enabled:
        for k, v in (("ssl-cert", cert), ("ssl-privkey", key)):
            if not v:
                raise ConfigError(f"{prefix} {k}", "required when ssl-enabled is true")
            if not Path(v).is_file():
                raise ConfigError(f"{prefix} {k}", f"no such file: {v}")
    secret = _str(api, "secret", f"{prefix} secret") if with_secret else None
    backlog = _int(api, "listen-backlog", f"{prefix} listen-backlog", DEFAULT_LISTEN_BACKLOG, minimum=1)
    max_connections = (
        _int(api, "max-connections", f"{prefix} max-connections", 0, minimum=1)
        if "max-connections" in api else None
    )
    timeouts = {}
    for name, default in (("request-header-timeout", 30.0), ("idle-timeout", 60.0)):
        value = parse_duration(api.get(name, default), f"{prefix} {name}")
        if value <= 0:
            raise ConfigError(f"{prefix} {name}", f"must be more than 0, got {api.get(name)!r}")
        timeouts[name] = value
    return APIConfig(
        listen_backlog=backlog,
        max_connections=max_connections,
        max_connections_per_address=_int(
            api, "max-connections-per-address", f"{prefix} max-connections-per-address", 0,
        ),
        request_header_timeout=timeouts["request-header-timeout"],
        idle_timeout=timeouts["idle-timeout"],
        service_addr=addr,
        ssl_enabled=ssl_enabled,
        ssl_cert=Path(cert) if cert else None,
        ssl_privkey=Path(key) if key else None,
        secret=secret,
    )


def _volumes(root: dict[str, Any]) -> dict[str, VolumeConfig]:
    section = root.get("volume", {})
    if not isinstance(section, dict):
        raise ConfigError("[volume]", "expected tables such as [volume.local]")
    volumes = {}
    for name, raw in section.items():
        prefix = f"[volume.{name}]"
        if not isinstance(raw, dict):
            raise ConfigError(prefix, "expected a table")
        vol = _normalize(raw)
        backend = _str(vol, "backend", f"{prefix} backend")
        if backend not in KNOWN_BACKENDS:
            raise ConfigError(
                f"{prefix} backend", f"expected one of {', '.join(KNOWN_BACKENDS)}, got {backend!r}"
            )
        path = _str(vol, "path", f"{prefix} path")
        if not path:
            raise ConfigError(f"{prefix} path", "required")
        fsprefix = _str(vol, "fsprefix", f"{prefix} fsprefix", ".") or "."
        if Path(fsprefix).is_absolute() or ".." in Path(fsprefix).parts:
            raise ConfigError(f"{prefix} fsprefix", f"must be a relative path inside the volume, got {fsprefix!r}")
        options = vol.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{prefix} options", f"expected a table, got {options!r}")
        volumes[name] = VolumeConfig(name, backend, Path(path), fsprefix, dict(options))
    if not volumes:
        raise ConfigError("[volume]", "at least one volume is required, e.g. [volume.local]")
    return volumes


def parse_config(root: dict[str, Any], source: Path | None = None) -> Config:
    """Validate a parsed TOML document into a ``Config``."""
    sp = _table(root, "storage-proxy", "[storage-proxy]")
    k = "[storage-proxy]"
    secret = _str(sp, "secret", f"{k} secret")
    if not secret:
        raise ConfigError(f"{k} secret", "required (the key that signs client-API tokens)")
    manager = _api(root, "manager", 6022, with_secret=True)
    if not manager.secret:
        raise ConfigError("[api.manager] secret", "required (the token the manager sends)")
    pid_file = _str(sp, "pid-file", f"{k} pid-file")
    logging = _table(root, "logging", "[logging]")
    level = (_str(logging, "level", "[logging] level", "INFO") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("[logging] level", f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level!r}")
    max_body = parse_size(sp.get("max-manager-body-size", "1m"), f"{k} max-manager-body-size")
    from storage.artifact_config import parse_artifact_config
    from storage.events.settings import parse_etcd, parse_redis

    state_dir = _str(sp, "state-dir", f"{k} state-dir")
    num_proc = _num_proc(sp, f"{k} num-proc")

    return Config(
        node_id=_str(sp, "node-id", f"{k} node-id", "storage-proxy") or "storage-proxy",
        secret=secret,
        session_expire=int(parse_duration(sp.get("session-expire", "1d"), f"{k} session-expire")),
        max_upload_size=parse_size(sp.get("max-upload-size", "100g"), f"{k} max-upload-size"),
        scandir_limit=_int(sp, "scandir-limit", f"{k} scandir-limit", 1000, minimum=1),
        client=_api(root, "client", 6021, with_secret=False),
        manager=manager,
        volumes=_volumes(root),
        pid_file=Path(pid_file) if pid_file else None,
        user=_user_or_group(sp, "user", f"{k} user"),
        group=_user_or_group(sp, "group", f"{k} group"),
        allow_auto_quota_scope_creation=_bool(
            sp, "allow-auto-quota-scope-creation", f"{k} allow-auto-quota-scope-creation", True
        ),
        max_manager_body=max_body,
        upload_expire=int(parse_duration(sp.get("upload-expire", "7d"), f"{k} upload-expire")),
        io_threads=_int(sp, "io-threads", f"{k} io-threads", 16, minimum=1),
        shutdown_grace=parse_duration(sp.get("shutdown-grace", "10s"), f"{k} shutdown-grace"),
        reactor_realtime=_bool(sp, "reactor-realtime", f"{k} reactor-realtime", True),
        log_level=level,
        artifacts=parse_artifact_config(root),
        redis=parse_redis(root),
        etcd=parse_etcd(root),
        state_dir=Path(state_dir) if state_dir else None,
        num_proc=num_proc,
        document=root,
        peer_probe_interval=parse_duration(sp.get("peer-probe-interval", "1s"), f"{k} peer-probe-interval"),
        source=source,
        cors_allowed_origins=_origins(root),
        cors_allow_credentials=_bool(
            root.get("api", {}).get("client", {}), "cors-allow-credentials",
            "[api.client] cors-allow-credentials", True,
        ),
    )


def _num_proc(sp: dict[str, Any], key: str) -> int:
    """Upstream's bounds: 1 up to this machine's CPUs.  Upstream defaults to the CPU count; here
    1 (no workers: the daemon serves both APIs itself), as every existing config was written for."""
    cpus = os.cpu_count() or 1
    value = sp.get("num-proc", 1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer from 1 to {cpus} (this machine's CPUs), got {value!r}")
    if not 1 <= value <= cpus:
        raise ConfigError(key, f"must be from 1 to {cpus} (this machine's CPUs), got {value}")
    return value


def _origins(root: dict[str, Any]) -> tuple[str, ...]:
    key = "[api.client] cors-allowed-origins"
    raw = root.get("api", {}).get("client", {}).get("cors-allowed-origins", ["*"])
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(o, str) and o for o in raw):
        raise ConfigError(key, 'expected a list of origins such as ["https://webui.example.com"] or ["*"]')
    return tuple(o.rstrip("/") for o in raw)


def load_config(path: Path) -> Config:
    """Read and validate a TOML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    try:
        root = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return parse_config(root, source=path)


def find_config_file() -> Path | None:
    for candidate in CONFIG_SEARCH_PATH:
        if candidate.is_file():
            return candidate
    return None


def _load_or_create_secrets(path: Path) -> tuple[dict[str, str], bool]:
    """Secrets generated once and kept in a 0600 file beside the data."""
    if path.exists():
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        if isinstance(data.get("secret"), str) and isinstance(data.get("manager-secret"), str):
            return {"secret": data["secret"], "manager-secret": data["manager-secret"]}, False
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"secret": secrets.token_urlsafe(32), "manager-secret": secrets.token_urlsafe(32)}
    write_atomic(path, tomli_w.dumps(data).encode("utf-8"), mode=0o600)
    return data, True


def default_config(data_root: Path = DEFAULT_DATA_ROOT) -> Config:
    """The embedded default: one vfs volume ``local`` under ``./vfroot/local``, loopback ports."""
    data_root = data_root.absolute()
    volume_path = data_root / "local"
    volume_path.mkdir(parents=True, exist_ok=True)
    secret_values, created = _load_or_create_secrets(data_root / SECRETS_FILE_NAME)
    root = {
        "storage-proxy": {
            "node-id": "storage-proxy-local",
            "secret": secret_values["secret"],
        },
        "api": {
            "client": {"service-addr": {"host": "127.0.0.1", "port": 6021}},
            "manager": {
                "service-addr": {"host": "127.0.0.1", "port": 6022},
                "secret": secret_values["manager-secret"],
            },
        },
        "volume": {"local": {"backend": "vfs", "path": str(volume_path)}},
    }
    config = parse_config(root)
    return _replace(config, generated_secrets=created)


def _replace(config: Config, **changes: Any) -> Config:
    from dataclasses import replace

    return replace(config, **changes)
