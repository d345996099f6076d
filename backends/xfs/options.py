"""``[volume.NAME.options]`` of an xfs volume."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

from storage.config import ConfigError, parse_duration

DEFAULT_SOCKET_DIR = "/run/storage-proxy"


@dataclass(frozen=True)
class XfsOptions:
    helper_socket: str
    projects_file: str = "/etc/projects"
    projid_file: str = "/etc/projid"
    limits_file: str | None = None
    lock_file: str | None = None
    helper_command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "backends.xfs.helper"])
    spawn_helper: bool = True
    helper_timeout: float = 30.0
    helper_start_timeout: float = 120.0
    helper_allowed_uids: tuple[int, ...] = ()
    xfs_quota: str | None = None
    require_pquota: bool = True


def _path(raw: dict[str, Any], key: str, prefix: str, default: str | None) -> str | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ConfigError(f"{prefix} {key}", f"expected an absolute path, got {value!r}")
    return value


def _uid(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            pass
    raise ConfigError(key, f"expected a user name or uid, got {value!r}")


def parse_options(volume_name: str, options: dict[str, Any]) -> XfsOptions:
    raw = {k.replace("_", "-"): v for k, v in options.items()}
    prefix = f"[volume.{volume_name}.options]"
    command = raw.get("helper-command")
    if command is None:
        helper_command = [sys.executable, "-m", "backends.xfs.helper"]
    elif isinstance(command, str) and command.strip():
        helper_command = shlex.split(command)
    elif isinstance(command, list) and command and all(isinstance(c, str) for c in command):
        helper_command = list(command)
    else:
        raise ConfigError(f"{prefix} helper-command", f"expected a command line or a list, got {command!r}")
    if not os.path.isabs(helper_command[0]):
        # spawnProcess does not search PATH.
        found = shutil.which(helper_command[0])
        if found is None:
            raise ConfigError(f"{prefix} helper-command", f"{helper_command[0]!r} not found on PATH")
        helper_command[0] = found
    spawn = raw.get("spawn-helper", True)
    if not isinstance(spawn, bool):
        raise ConfigError(f"{prefix} spawn-helper", f"expected true or false, got {spawn!r}")
    require = raw.get("require-pquota", True)
    if not isinstance(require, bool):
        raise ConfigError(f"{prefix} require-pquota", f"expected true or false, got {require!r}")
    uids = raw.get("helper-allowed-uids", [])
    if not isinstance(uids, list):
        uids = [uids]
    return XfsOptions(
        helper_socket=_path(raw, "helper-socket", prefix, f"{DEFAULT_SOCKET_DIR}/xfs-{volume_name}.sock") or "",
        projects_file=_path(raw, "projects-file", prefix, "/etc/projects") or "/etc/projects",
        projid_file=_path(raw, "projid-file", prefix, "/etc/projid") or "/etc/projid",
        limits_file=_path(raw, "limits-file", prefix, None),
        lock_file=_path(raw, "lock-file", prefix, None),
        helper_command=helper_command,
        spawn_helper=spawn,
        helper_timeout=parse_duration(raw.get("helper-timeout", 30), f"{prefix} helper-timeout"),
        # At start-up the helper is a fresh interpreter (two, supervised):
        # on a cold or slow host that takes far longer than one call may wait.
        helper_start_timeout=parse_duration(
            raw.get("helper-start-timeout", 120), f"{prefix} helper-start-timeout"),
        helper_allowed_uids=tuple(_uid(u, f"{prefix} helper-allowed-uids") for u in uids),
        xfs_quota=_path(raw, "xfs-quota", prefix, None),
        require_pquota=require,
    )
