"""Strict checks for everything the privileged helper is asked to act on.

The helper runs as root and passes these values to ``xfs_quota``'s own
command parser (which splits on whitespace), so nothing loose gets through:
names are quota-scope directory names (32 lowercase hex digits), paths are
plain absolute paths inside a configured mount, numbers are bounded.
"""

from __future__ import annotations

import os
import re

NAME = re.compile(r"^[0-9a-f]{32}$")
PATH_CHARS = re.compile(r"^/[A-Za-z0-9._/+@=-]*$")
MAX_LIMIT_BYTES = 2**63 - 1


class InvalidValue(ValueError):
    pass


def project_name(value: object) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise InvalidValue(f"project name must be 32 lowercase hex digits, got {value!r}")
    return value


def limit_bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT_BYTES:
        raise InvalidValue(f"limit must be an integer from 0 to {MAX_LIMIT_BYTES}, got {value!r}")
    return value


def is_inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def project_path(value: object, name: str, mounts: list[str]) -> str:
    """An absolute, normalized, symlink-free directory named ``name`` strictly inside a mount."""
    if not isinstance(value, str) or not PATH_CHARS.match(value) or "//" in value:
        raise InvalidValue(f"not a plain absolute path: {value!r}")
    if os.path.normpath(value) != value:
        raise InvalidValue(f"path is not normalized: {value!r}")
    if os.path.basename(value) != name:
        raise InvalidValue(f"path {value!r} does not end with the project name {name}")
    if not any(is_inside(value, m) and value != m for m in mounts):
        raise InvalidValue(f"path {value!r} is not inside a managed mount")
    if os.path.realpath(value) != value:
        raise InvalidValue(f"path {value!r} goes through a symlink")
    if not os.path.isdir(value):
        raise InvalidValue(f"not a directory: {value!r}")
    return value
