"""The wire encodings of the manager's event bus, one per manager line.

Read from backend.ai-common (facts only, no code copied):

* **26.9** (``message_queue/payload.py``): an anycast stream entry has the
  fields ``name``, ``source``, ``payload`` (the event's fields as a JSON
  object, as pydantic's ``model_dump_json`` writes it: compact, UTF-8,
  declaration order) and ``metadata`` (``MessageMetadata`` as JSON:
  ``request_id``, ``user``, ``triggered_user``, ``traceparent``).  A
  broadcast message is the JSON object ``{"name", "source", "payload",
  "metadata"}`` whose ``payload`` and ``metadata`` are JSON *strings*.
  ``bgtask_updated``'s progress fields are floats there.
* **26.8** and **26.4** (``message_queue/types.py`` ``MessagePayload``): the
  event is an argument tuple (``event.serialize()``) packed with msgpack
  (``use_bin_type``; tuples become arrays).  Anycast fields: ``name``,
  ``source``, ``args`` (the msgpack bytes), ``metadata`` (JSON).  Broadcast:
  the JSON object ``{"name", "source", "args": base64(msgpack), "metadata"}``.
  26.8's metadata is ``{request_id, user, triggered_user}``, 26.4's
  ``{request_id, user}``.

An :class:`Event` is format-neutral (its fields in declaration order, which is
also the order of the old argument tuples), so the outbox keeps events and the
encoding is chosen when they are delivered.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import msgpack

FORMATS = ("26.9", "26.8", "26.4")
DEFAULT_FORMAT = "26.9"

SOURCE = "storage"  # AGENTID_STORAGE
STREAM_DB = 4  # REDIS_STREAM_DB
ANYCAST_STREAM = "events"
BROADCAST_CHANNEL = "events_all"
STREAM_MAXLEN = 128  # _MAX_STREAM_LENGTH, trimmed approximately (MAXLEN ~)
CACHE_TTL = 300  # _DEFAULT_CACHE_EXPIRATION: SET bgtask.<id> ... EX 300

# Fields pydantic validates as floats in 26.9 (BgtaskUpdatedEvent).
_FLOAT_FIELDS = frozenset({"current_progress", "total_progress"})

_METADATA = {
    "26.9": {"request_id": None, "user": None, "triggered_user": None, "traceparent": None},
    "26.8": {"request_id": None, "user": None, "triggered_user": None},
    "26.4": {"request_id": None, "user": None},
}


@dataclass(frozen=True)
class Event:
    """One event: anycast (the ``events`` stream) or broadcast (``events_all``)."""

    kind: str  # "anycast" | "broadcast"
    name: str
    fields: tuple[tuple[str, Any], ...]
    task_id: str | None = None  # orders delivery per task; the cache key of a broadcast

    @property
    def cache_id(self) -> str | None:
        return f"bgtask.{self.task_id}" if self.kind == "broadcast" and self.task_id else None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "fields": [list(f) for f in self.fields],
                "task_id": self.task_id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        kind = data["kind"]
        if kind not in ("anycast", "broadcast"):
            raise ValueError(f"unknown event kind {kind!r}")
        fields = tuple((str(k), v) for k, v in data["fields"])
        return cls(kind, str(data["name"]), fields, data.get("task_id"))


def dump_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as orjson and pydantic write it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown event format {fmt!r}")


def body_json(event: Event) -> bytes:
    """26.9's ``payload``: the event's fields as a JSON object."""
    body = {k: (float(v) if k in _FLOAT_FIELDS and isinstance(v, int) else v) for k, v in event.fields}
    return dump_json(body)


def args_msgpack(event: Event) -> bytes:
    """26.4/26.8's ``args``: the argument tuple packed with msgpack."""
    packed = msgpack.packb([v for _, v in event.fields], use_bin_type=True, strict_types=True)
    assert isinstance(packed, bytes)
    return packed


def metadata_json(fmt: str) -> bytes:
    _check(fmt)
    return dump_json(_METADATA[fmt])


def anycast_fields(event: Event, fmt: str) -> list[tuple[bytes, bytes]]:
    """The field/value pairs of the ``XADD events`` entry, in upstream's order."""
    _check(fmt)
    if fmt == "26.9":
        body = (b"payload", body_json(event))
    else:
        body = (b"args", args_msgpack(event))
    return [
        (b"name", event.name.encode("utf-8")),
        (b"source", SOURCE.encode("utf-8")),
        body,
        (b"metadata", metadata_json(fmt)),
    ]


def broadcast_message(event: Event, fmt: str) -> bytes:
    """The JSON both ``SET bgtask.<id>`` stores and ``PUBLISH events_all`` sends."""
    _check(fmt)
    message: dict[str, Any] = {"name": event.name, "source": SOURCE}
    if fmt == "26.9":
        message["payload"] = body_json(event).decode("utf-8")
    else:
        message["args"] = base64.b64encode(args_msgpack(event)).decode("ascii")
    message["metadata"] = metadata_json(fmt).decode("utf-8")
    return dump_json(message)


def commands(event: Event, fmt: str) -> list[list[bytes | str]]:
    """The Redis commands that deliver ``event`` (database 4), in order."""
    if event.kind == "anycast":
        cmd: list[bytes | str] = ["XADD", ANYCAST_STREAM, "MAXLEN", "~", str(STREAM_MAXLEN), "*"]
        for k, v in anycast_fields(event, fmt):
            cmd += [k, v]
        return [cmd]
    message = broadcast_message(event, fmt)
    out: list[list[bytes | str]] = []
    if event.cache_id:
        out.append(["SET", event.cache_id, message, "EX", str(CACHE_TTL)])
    out.append(["PUBLISH", BROADCAST_CHANNEL, message])
    return out


# -- the events storage-proxy sends ------------------------------------------


def vfolder_deletion(vfid: str, task_id: str | None, error: str | None) -> Event:
    if error is None:
        return Event("anycast", "vfolder_deletion_success", (("vfid", vfid),), task_id)
    return Event("anycast", "vfolder_deletion_failure", (("vfid", vfid), ("message", error)), task_id)


def vfolder_clone(vfid: str, dst_vfid: str, task_id: str | None, error: str | None) -> Event:
    if error is None:
        return Event("anycast", "vfolder_clone_success", (("vfid", vfid), ("dst_vfid", dst_vfid)), task_id)
    return Event(
        "anycast", "vfolder_clone_failure", (("vfid", vfid), ("dst_vfid", dst_vfid), ("message", error)), task_id
    )


def bgtask_updated(task_id: str, current: int | float, total: int | float, message: str | None) -> Event:
    return Event(
        "broadcast", "bgtask_updated",
        (("task_id", task_id), ("current_progress", current), ("total_progress", total), ("message", message)),
        task_id,
    )


TERMINAL = {"done": "bgtask_done", "failed": "bgtask_failed", "cancelled": "bgtask_cancelled"}


def bgtask_finished(task_id: str, status: str, message: str | None, errors: list[str] | None = None) -> Event:
    """``bgtask_done``/``failed``/``cancelled``, or ``bgtask_partial_success`` when ``errors``."""
    if status == "done" and errors:
        return Event(
            "broadcast", "bgtask_partial_success",
            (("task_id", task_id), ("message", message), ("errors", list(errors))), task_id,
        )
    return Event("broadcast", TERMINAL[status], (("task_id", task_id), ("message", message)), task_id)
