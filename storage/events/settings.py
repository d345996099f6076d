"""The ``[redis]`` table: where the manager's event bus is.

Upstream's keys (backend.ai-common ``SingleRedisConfig``): ``addr`` as
``"host:port"`` (or ``{host, port}``), ``password``, ``sentinel`` (a list of
``"host:port"`` or one ``"h1:p1,h2:p2"`` string), ``service-name`` (required
with ``sentinel``), ``sentinel-password``, ``use-tls``, ``tls-skip-verify``,
``request-timeout`` (milliseconds).  Other upstream keys
(``redis-helper-config``, ...) are accepted and ignored.  Ours:
``event-format``, the manager line whose encoding the events use (``"26.9"``,
the default, ``"26.8"`` or ``"26.4"``).

Keys may be spelled with hyphens or underscores, as everywhere in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.errors import ConfigError
from storage.events.encoding import DEFAULT_FORMAT, FORMATS


@dataclass(frozen=True)
class RedisSettings:
    host: str | None = None
    port: int = 6379
    password: str | None = None
    sentinel: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    sentinel_password: str | None = None
    use_tls: bool = False
    tls_skip_verify: bool = False
    request_timeout: float = 5.0  # seconds
    event_format: str = DEFAULT_FORMAT

    def describe(self) -> str:
        """Where the events go, for the log (never the password)."""
        if self.sentinel:
            nodes = ",".join(f"{h}:{p}" for h, p in self.sentinel)
            where = f"sentinel {nodes} service {self.service_name}"
        else:
            where = f"{self.host}:{self.port}"
        tls = " (TLS)" if self.use_tls else ""
        return f"redis {where}{tls}, db 4, event format {self.event_format}"


def _error(key: str, problem: str) -> Exception:

    return ConfigError(f"[redis] {key}", problem)


def _host_port(value: Any, key: str) -> tuple[str, int]:
    if isinstance(value, dict):
        host, port = value.get("host"), value.get("port")
    elif isinstance(value, str):
        host, sep, port = value.strip().rpartition(":")
        if not sep:
            raise _error(key, f"expected 'host:port', got {value!r}")
        host = host.strip("[]")
    else:
        raise _error(key, f"expected 'host:port', got {value!r}")
    if not isinstance(host, str) or not host:
        raise _error(key, f"expected a host name or address, got {value!r}")
    try:
        port_number = int(port)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _error(key, f"expected a port number, got {value!r}") from None
    if not 1 <= port_number <= 65535:
        raise _error(key, f"the port must be between 1 and 65535, got {port_number}")
    return host, port_number


def _opt_str(table: dict[str, Any], key: str) -> str | None:
    value = table.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _error(key, f"expected a string, got {value!r}")
    return value


def _flag(table: dict[str, Any], key: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise _error(key, f"expected true or false, got {value!r}")
    return value


def parse_redis(root: dict[str, Any]) -> RedisSettings | None:
    """``[redis]`` of a parsed config file, or None when the file has none."""
    raw = root.get("redis")
    if raw is None:
        return None
    if not isinstance(raw, dict):

        raise ConfigError("[redis]", f"expected a table, got {type(raw).__name__}")
    table = {k.replace("_", "-"): v for k, v in raw.items()}

    sentinel_raw = table.get("sentinel")
    sentinel: list[tuple[str, int]] = []
    if isinstance(sentinel_raw, str) and sentinel_raw.strip():
        sentinel = [_host_port(part, "sentinel") for part in sentinel_raw.split(",")]
    elif isinstance(sentinel_raw, list):
        sentinel = [_host_port(part, "sentinel") for part in sentinel_raw]
    elif sentinel_raw not in (None, "", []):
        raise _error("sentinel", f"expected a list of 'host:port' or 'h1:p1,h2:p2', got {sentinel_raw!r}")
    service_name = _opt_str(table, "service-name")
    if sentinel and not service_name:
        raise _error("service-name", "required with sentinel (the monitored master's name)")

    host: str | None = None
    port = 6379
    addr = table.get("addr")
    if addr not in (None, ""):
        host, port = _host_port(addr, "addr")
    elif not sentinel:
        raise _error("addr", "required ('host:port' of the manager's Redis), or sentinel + service-name")

    timeout = table.get("request-timeout")
    if timeout is None:
        request_timeout = 5.0
    elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise _error("request-timeout", f"expected milliseconds (a positive number), got {timeout!r}")
    else:
        request_timeout = float(timeout) / 1000.0

    fmt = table.get("event-format", DEFAULT_FORMAT)
    if isinstance(fmt, (int, float)) and not isinstance(fmt, bool):
        fmt = str(fmt)
    if fmt not in FORMATS:
        raise _error("event-format", f"expected one of {', '.join(FORMATS)} (the manager's line), got {fmt!r}")

    return RedisSettings(
        host=host,
        port=port,
        password=_opt_str(table, "password"),
        sentinel=tuple(sentinel),
        service_name=service_name,
        sentinel_password=_opt_str(table, "sentinel-password"),
        use_tls=_flag(table, "use-tls"),
        tls_skip_verify=_flag(table, "tls-skip-verify"),
        request_timeout=request_timeout,
        event_format=str(fmt),
    )


@dataclass(frozen=True)
class EtcdSettings:
    """Upstream's ``[etcd]`` table, read only when there is no ``[redis]``: Redis from ``config/redis``."""

    namespace: str = "local"
    host: str = "127.0.0.1"
    port: int = 2379
    user: str | None = None
    password: str | None = None
    event_format: str = DEFAULT_FORMAT  # ours: [etcd] event-format

    def describe(self) -> str:
        return f"etcd {self.host}:{self.port} namespace {self.namespace}"


def parse_etcd(root: dict[str, Any]) -> EtcdSettings | None:
    raw = root.get("etcd")
    if raw is None or root.get("redis") is not None:
        return None

    if not isinstance(raw, dict):
        raise ConfigError("[etcd]", f"expected a table, got {type(raw).__name__}")
    table = {k.replace("_", "-"): v for k, v in raw.items()}
    namespace = table.get("namespace", "local")
    if not isinstance(namespace, str) or not namespace:
        raise ConfigError("[etcd] namespace", f"expected a name, got {namespace!r}")
    addr = table.get("addr", "127.0.0.1:2379")
    if isinstance(addr, list):  # upstream also allows a list of endpoints: the first one
        addr = addr[0] if addr else "127.0.0.1:2379"
    try:
        host, port = _host_port(addr, "addr")
    except ConfigError as exc:
        raise ConfigError("[etcd] addr", exc.problem) from None
    user = table.get("user") or None
    password = table.get("password") or None
    for key, value in (("user", user), ("password", password)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"[etcd] {key}", f"expected a string, got {value!r}")
    fmt = table.get("event-format", DEFAULT_FORMAT)
    fmt = str(fmt) if isinstance(fmt, (int, float)) and not isinstance(fmt, bool) else fmt
    if fmt not in FORMATS:
        raise ConfigError("[etcd] event-format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return EtcdSettings(namespace, host, port, user, password, str(fmt))


def redis_from_etcd(tree: dict[str, Any], event_format: str) -> RedisSettings:
    """``config/redis`` as etcd holds it (a nested dict of strings) as RedisSettings."""
    table = {k: v for k, v in tree.items() if isinstance(k, str)}
    for key in ("use_tls", "use-tls", "tls_skip_verify", "tls-skip-verify"):
        if isinstance(table.get(key), str):
            table[key] = table[key].strip().lower() in ("true", "1", "yes")
    if isinstance(table.get("request_timeout"), str):
        table["request_timeout"] = float(table["request_timeout"])
    table["event-format"] = event_format
    settings = parse_redis({"redis": table})
    assert settings is not None
    return settings
