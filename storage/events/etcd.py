"""Reading the manager's Redis settings from etcd, as upstream does (``config/redis``).

Through etcd's v3 JSON gateway with treq (no extra library): optionally
``POST /v3/auth/authenticate`` for a token, then one ``POST /v3/kv/range``
over the prefix ``/sorna/<namespace>/config/redis/``.  The keys below the
prefix are ``/``-separated, URL-quoted path components (upstream's nested
dict layout); the values are strings.  Only the global scope is read.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import unquote

import treq

from storage.events.settings import EtcdSettings

TIMEOUT = 5.0


class EtcdError(Exception):
    pass


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _range_end(prefix: str) -> str:
    raw = bytearray(prefix.encode("utf-8"))
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode("ascii")


def nest(prefix: str, kvs: list[tuple[str, str]]) -> dict[str, Any]:
    """Upstream's nested dict of the keys under ``prefix``."""
    tree: dict[str, Any] = {}
    for key, value in kvs:
        parts = [unquote(p) for p in key[len(prefix):].strip("/").split("/") if p]
        if not parts:
            continue
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {} if child is None else {"": child}
            node = child
        node[parts[-1]] = value
    return tree


async def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    try:
        sent: dict[bytes | str, bytes | str] = {k: v for k, v in headers.items()}
        response = await treq.post(url, json=body, headers=sent, timeout=TIMEOUT)
        data = await response.content()
    except Exception as exc:
        raise EtcdError(f"{url}: {exc.__class__.__name__}: {exc}") from exc
    if response.code != 200:
        raise EtcdError(f"{url}: HTTP {response.code}: {data[:200]!r}")
    try:
        parsed: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise EtcdError(f"{url}: not JSON") from exc
    return parsed


async def read_redis_tree(settings: EtcdSettings) -> dict[str, Any]:
    """The nested ``config/redis`` of ``settings.namespace``; EtcdError when etcd cannot tell."""
    base = f"http://{settings.host}:{settings.port}"
    headers: dict[str, str] = {}
    if settings.user:
        auth = await _post(f"{base}/v3/auth/authenticate",
                           {"name": settings.user, "password": settings.password or ""}, {})
        token = auth.get("token")
        if not token:
            raise EtcdError("etcd authentication returned no token")
        headers["Authorization"] = str(token)
    prefix = f"/sorna/{settings.namespace}/config/redis/"
    reply = await _post(f"{base}/v3/kv/range", {"key": _b64(prefix), "range_end": _range_end(prefix)}, headers)
    kvs = [
        (base64.b64decode(kv["key"]).decode("utf-8"), base64.b64decode(kv.get("value", "")).decode("utf-8"))
        for kv in reply.get("kvs", [])
    ]
    tree = nest(prefix, kvs)
    if not tree:
        raise EtcdError(f"no keys under {prefix} (the manager's Redis settings, config/redis)")
    return tree
