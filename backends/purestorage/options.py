"""The ``[volume.NAME.options]`` of a purestorage volume, validated once.

Upstream's option names are kept (``purity_endpoint``, ``purity_api_token``,
``purity_api_version``, ``purity_fs_name``); the others are ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from storage.config import ConfigError


@dataclass(frozen=True)
class FlashBladeOptions:
    endpoint: str
    api_token: str
    fs_name: str
    api_version: str = "1.8"
    ssl_verify: bool | str = True
    api_timeout: float = 30.0
    rapidfile: bool = True  # use the toolkit when it is installed
    rapidfile_timeout: float = 300.0  # pdu's time limit (usage answers -1 past it)

    @classmethod
    def parse(cls, volume: str, options: dict[str, Any]) -> FlashBladeOptions:
        opts = {k.replace("-", "_"): v for k, v in options.items()}

        def key(name: str) -> str:
            return f"[volume.{volume}.options] {name}"

        def required_str(name: str) -> str:
            value = opts.get(name)
            if not isinstance(value, str) or not value:
                raise ConfigError(key(name), "required (a non-empty string)")
            return value

        endpoint = required_str("purity_endpoint")
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(key("purity_endpoint"), f"expected https://<array address>, got {endpoint!r}")
        api_token = required_str("purity_api_token")
        fs_name = required_str("purity_fs_name")
        api_version = str(opts.get("purity_api_version", "1.8"))
        if not api_version.replace(".", "").isdigit():
            raise ConfigError(key("purity_api_version"), f"expected a version such as '1.8', got {api_version!r}")
        ssl_verify = opts.get("purity_ssl_verify", True)
        if isinstance(ssl_verify, str):
            if not Path(ssl_verify).is_file():
                raise ConfigError(key("purity_ssl_verify"), f"no such CA file: {ssl_verify}")
        elif not isinstance(ssl_verify, bool):
            raise ConfigError(key("purity_ssl_verify"), "expected true, false or the path of a CA file")

        def seconds(name: str, default: float) -> float:
            value = opts.get(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(key(name), f"expected a positive number of seconds, got {value!r}")
            return float(value)

        rapidfile = opts.get("rapidfile", True)
        if not isinstance(rapidfile, bool):
            raise ConfigError(key("rapidfile"), f"expected true or false, got {rapidfile!r}")
        return cls(
            endpoint=endpoint,
            api_token=api_token,
            fs_name=fs_name,
            api_version=api_version,
            ssl_verify=ssl_verify,
            api_timeout=seconds("purity_timeout", 30.0),
            rapidfile=rapidfile,
            rapidfile_timeout=seconds("rapidfile_timeout", 300.0),
        )
