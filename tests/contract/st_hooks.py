"""schemathesis hooks (``SCHEMATHESIS_HOOKS=st_hooks``) for the contract run of
``test_schemathesis.py``: real volumes and vfolders, and fresh client-API tokens.

The run's settings come from the environment the test sets: ``ST_MANAGER_URL``,
``ST_MANAGER_SECRET``, ``ST_VOLUME``, ``ST_VFIDS`` (vfolders made before the run,
comma-separated, that manager-API cases may use and delete) and ``ST_FIXTURE_VFID``
(a vfolder no case names, holding ``ST_FILE`` and the directory ``ST_DIR``, which the
client-API tokens are for).

Generated bodies mostly name an unknown volume and a vfolder that does not exist,
which only ever reaches the 400/404 paths; the hooks swap in the real volume and
one of the real vfolders about three times in four (schemathesis re-checks
whether a case it generated as negative still is).  Client-API cases get a token
the manager API has just issued for the operation (a download token for the file
or the directory, an archive token, an upload token for a fresh session), unless
the case is about the token itself (then it keeps the generated garbage).
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.request
import uuid
from typing import Any

import schemathesis

AUTH = "X-BackendAI-Storage-Auth-Token"
UUID = "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"


# tus PATCH bodies: bytes, as application/octet-stream.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")


def _env(name: str) -> str:
    return os.environ[name]


def _manager(path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        _env("ST_MANAGER_URL") + path, data=json.dumps(body).encode(), method="POST",
        headers={AUTH: _env("ST_MANAGER_SECRET"), "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _vfids() -> list[str]:
    return _env("ST_VFIDS").split(",")


_VFID_KEYS = ("vfid", "src_vfid", "dst_vfid", "virtual_folder_id")
_PATH_KEYS = ("relpath", "src_relpath", "dst_relpath", "filepath", "directory", "subpath")
_NAMES = ("a", "dir", "data.bin", "dir/sub", "x/y/z.txt", ".")
_VOLUME_KEYS = ("volume", "src_volume", "dst_volume")


_VFID = re.compile(f"^((user|project):{UUID}/)?{UUID}$")


def _swappable(key: str, value: Any) -> bool:
    """Only a value the schema allows is swapped: a negative case stays negative."""
    if key in _VOLUME_KEYS or key in _PATH_KEYS:
        return isinstance(value, str) and "\x00" not in value
    return isinstance(value, str) and _VFID.match(value) is not None


_RANDOM = random.Random(int(os.environ.get("ST_SEED", "1")))


def _often() -> bool:
    return _RANDOM.random() < 0.75


def _swap_body(body: dict[str, Any], *, volume_only: bool) -> None:
    volume, vfid, name = _env("ST_VOLUME"), _RANDOM.choice(_vfids()), _RANDOM.choice(_NAMES)
    swaps = [(_VOLUME_KEYS, _often(), volume)]
    if not volume_only:
        swaps += [(_VFID_KEYS, _often(), vfid), (_PATH_KEYS, _RANDOM.random() < 0.5, name)]
    for keys, wanted, value in swaps:
        for key in keys:
            if wanted and key in body and _swappable(key, body[key]):
                body[key] = value


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: Any) -> None:
    """Real names in what is about to be sent, in every phase (schemathesis re-checks the
    case afterwards, so a case generated as negative is judged by what was sent)."""
    op = case.operation
    meta = case._meta  # not .meta: reading it revalidates
    stateful = meta is not None and str(getattr(meta.phase.name, "value", meta.phase.name)) == "stateful"
    if isinstance(case.body, dict):
        # In the stateful phase only the volume: the vfolder and paths a link passes are kept.
        _swap_body(case.body, volume_only=stateful)
    params = case.path_parameters
    if isinstance(params, dict) and isinstance(params.get("storage_name"), str) and _often():
        params["storage_name"] = _env("ST_ARTIFACT_STORAGE")
    query = case.query
    if op.path.startswith(("/download", "/upload")) and isinstance(query, dict) and "token" in query:
        if _often():
            query["token"] = _token_for(op.method.upper(), op.path)


def _token_for(method: str, path: str) -> str:
    volume, vfid = _env("ST_VOLUME"), _env("ST_FIXTURE_VFID")
    if path == "/download":
        relpath = _env("ST_FILE") if uuid.uuid4().int % 3 else _env("ST_DIR")
        return str(_manager("/folder/file/download", {"volume": volume, "vfid": vfid, "relpath": relpath})["token"])
    if path == "/download-archive":
        return str(_manager("/folder/file/archive-download-token", {
            "volume": volume, "virtual_folder_id": vfid, "files": [_env("ST_FILE"), _env("ST_DIR")]})["token"])
    # /upload: a fresh session each time (a file of 16 bytes in a directory of its own).
    relpath = f"uploads/{uuid.uuid4().hex}/f.bin"
    return str(_manager("/folder/file/upload", {"volume": volume, "vfid": vfid, "relpath": relpath,
                                                 "size": 16})["token"])


@schemathesis.check
def no_html_bodies(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every answer of ours is JSON, problem+json, bytes or nothing: never an HTML page
    (twisted.web's and Klein's defaults), whatever was asked, also for undocumented methods."""
    content_type = (response.headers.get("content-type") or [""])[0].lower()
    body = response.content or b""
    if "html" in content_type or body.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        raise AssertionError(f"an HTML answer ({response.status_code}, {content_type!r}): {body[:200]!r}")
    return None
