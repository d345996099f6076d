"""The OpenAPI documents (``storage.api.openapi``): served on both listeners, built
from the same declarations the routes validate with, and their parameter schemas
accepting exactly what the converters accept."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from support.manager import StubManager, stub_manager_fixture
from treq.testing import StubTreq
from twisted.internet import reactor

from storage.api import params as p
from storage.api.manager import ROUTES, ManagerAPI
from storage.api.openapi import CLIENT_ROUTES
from storage.config import parse_config
from storage.tap import make_service


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[StubManager]:
    yield from stub_manager_fixture(tmp_path)


@pytest.fixture
def client(tmp_path: Path) -> StubTreq:
    (tmp_path / "local").mkdir()
    config = parse_config({
        "storage-proxy": {"secret": "s" * 32},
        "api": {"manager": {"secret": "m" * 32}},
        "volume": {"local": {"backend": "vfs", "path": str(tmp_path / "local")}},
    })
    return StubTreq(make_service(config, reactor).client_site.resource)


def _klein_rules(app: Any) -> set[tuple[str, str]]:
    rules = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS") or len(rule.methods or ()) == 1:
                rules.add((method, path))
    return rules


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}


@pytest_twisted.ensureDeferred
async def test_the_manager_document_is_behind_the_auth_and_lists_every_route(manager: StubManager) -> None:
    r = await manager.request("GET", "/openapi.json", auth=False)
    assert (r.code, r.content_type, r.json()["error_code"]) == (403, "application/problem+json",
                                                                "vfolder_auth_forbidden")
    r = await manager.request("GET", "/openapi.json", auth="wrong")
    assert r.code == 403
    r = await manager.request("GET", "/openapi.json")
    assert (r.code, r.content_type) == (200, "application/json")
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    # Every route Klein serves is documented, and nothing else (the /v1 apps included).
    assert _documented(doc) == _klein_rules(ManagerAPI.app)
    assert ("POST", "/v1/storages/vfs/{storage_name}/upload") in _documented(doc)
    # The open routes say so; the rest need the secret.
    for path in ("/", "/status", "/health", "/livez", "/readyz", "/metrics"):
        assert doc["paths"][path]["get"]["security"] == []
    assert doc["paths"]["/folder/create"]["post"]["security"] == [{"manager-secret": []}]
    problem = doc["components"]["schemas"]["Problem"]
    assert "error_code" in problem["required"]
    # Every link (the stateful phase follows them) names an operation of the document.
    operation_ids = {op["operationId"] for ops in doc["paths"].values() for op in ops.values()}
    links = [link for ops in doc["paths"].values() for op in ops.values()
             for response in op["responses"].values() for link in response.get("links", {}).values()]
    assert len(links) >= 10
    assert {link["operationId"] for link in links} <= operation_ids


@pytest_twisted.ensureDeferred
async def test_the_client_document_is_open_and_lists_every_route(client: StubTreq) -> None:
    resp = await client.get("http://127.0.0.1/openapi.json")
    assert resp.code == 200
    assert resp.headers.getRawHeaders("content-type") == ["application/json"]
    doc = json.loads(await resp.content())
    documented = _documented(doc)
    assert {("GET", "/download"), ("HEAD", "/download"), ("GET", "/download-archive"), ("OPTIONS", "/upload"),
            ("HEAD", "/upload"), ("PATCH", "/upload"), ("POST", "/upload"), ("DELETE", "/upload")} <= documented
    patch = doc["paths"]["/upload"]["patch"]
    headers = {prm["name"] for prm in patch["parameters"] if prm["in"] == "header"}
    assert {"Tus-Resumable", "Upload-Offset", "Upload-Checksum"} <= headers
    assert set(patch["responses"]["204"]["headers"]) >= {"Upload-Offset", "Tus-Resumable"}
    assert patch["responses"]["409"]["content"]["application/problem+json"]
    assert documented == {(r.method, r.openapi_path) for r in CLIENT_ROUTES}
    # What the client app serves is documented, but for what the tus handler answers 405
    # (GET, POST on a partial upload) and werkzeug's automatic HEAD of GET-only routes.
    from storage.api.client import ClientAPI

    served = set()
    for rule in ClientAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule.rule).replace("{rest}", "{upload_id}")
        served |= {(m, path) for m in rule.methods or ()}
    answered_405 = {("GET", "/upload"), ("GET", "/upload/{upload_id}"), ("POST", "/upload/{upload_id}")}
    auto_head = {("HEAD", "/"), ("HEAD", "/openapi.json")}
    assert documented <= served
    assert served - answered_405 - auto_head == documented


@pytest_twisted.ensureDeferred
async def test_every_route_validates_with_the_fields_it_documents(manager: StubManager) -> None:
    """An empty body names exactly the documented required fields; an undocumented key is
    refused unless the route documents additionalProperties."""
    r = await manager.request("GET", "/openapi.json")
    doc = r.json()
    checked = 0
    for route in ROUTES:
        if not route.body:
            continue
        path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", "x", route.path)
        schema = doc["paths"][route.openapi_path][route.method.lower()]["requestBody"]["content"][
            "application/json"]["schema"]
        r = await manager.request(route.method, path, {})
        assert r.code == 400, (route.method, route.path, r.code, r.body)
        assert set(r.json()["data"]) == set(schema["required"]), (route.method, route.path)
        r = await manager.request(route.method, path, {"no-such-key": 1})
        assert r.code == 400
        assert ("no-such-key" in r.json()["data"]) == (not schema["additionalProperties"]), route.path
        checked += 1
    assert checked >= 30


# -- the converters' schemas say what they accept ---------------------------------------

texts = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="+-0123456789 \t\n\r\x0b²٣_", max_size=8),
    st.sampled_from(["true", "TRUE", " yes ", "Off", "1", "0", "nope", "", "t", "F"]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**45), max_value=10**45),
                         st.floats(allow_nan=False, allow_infinity=False), texts)


def uuids_in_forms() -> st.SearchStrategy[str]:
    return st.builds(
        lambda u, form: {"hex": u.hex, "canon": str(u), "upper": str(u).upper(), "braces": f"{{{u}}}",
                         "urn": u.urn, "blank": f" {u}", "short": u.hex[:-1]}[form],
        st.uuids(), st.sampled_from(["hex", "canon", "upper", "braces", "urn", "blank", "short"]))


ids = st.one_of(
    uuids_in_forms(),
    st.builds(lambda t, u, v: f"{t}:{u}/{v}", st.sampled_from(["user", "project", "group", "User"]),
              uuids_in_forms(), uuids_in_forms()),
    st.builds(lambda t, u: f"{t}:{u}", st.sampled_from(["user", "project", "x"]), uuids_in_forms()),
    st.text(max_size=5),
)

CONVERTERS = {
    "integer": (p.integer, json_scalars),
    "non_negative_integer": (p.non_negative_integer, json_scalars),
    "boolean": (p.boolean, json_scalars),
    "permission_mode": (p.permission_mode, json_scalars),
    "vfolder_id": (p.vfolder_id, ids),
    "quota_scope_id": (p.quota_scope_id, ids),
    "file_name": (p.file_name, st.one_of(texts, st.sampled_from([".", "..", "a/b", "a\x00", "x" * 256]))),
    "archive_filename": (p.archive_filename, st.one_of(
        texts, st.none(), st.sampled_from([".", " ", "a\\b", "\xa0", "\u3000 \u2000", "a\xa0"]))),
}


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    # ECMA-262 (JSON Schema's dialect) ends a match at "$" only at the very end;
    # Python's re also before a final newline: "0\n" would match "^0$".
    if isinstance(instance, str) and not re.search(re.sub(r"(?<!\\)\$", r"\\Z", pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


EcmaValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _ecma_pattern})


def _accepts(convert: Any, value: Any) -> bool:
    try:
        convert(value)
    except p.ParamError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_a_converter_accepts_exactly_what_its_schema_allows(name: str) -> None:
    convert, values = CONVERTERS[name]
    validator = EcmaValidator(p.schema_of(convert))

    @given(values)
    def check(value: Any) -> None:
        # A converter never raises anything but ParamError (else: a 500).
        assert _accepts(convert, value) == validator.is_valid(value), value

    check()


def test_the_query_boolean_schema_is_what_downloads_accept() -> None:
    from storage.api.downloads import _query_bool

    validator = EcmaValidator(p.QUERY_BOOLEAN_SCHEMA)

    class Req:
        def __init__(self, value: str) -> None:
            self.args = {b"archive": [value.encode()]}

    @given(texts)
    def check(value: str) -> None:
        try:
            _query_bool(Req(value), "archive")
            accepted = True
        except Exception as exc:  # noqa: BLE001 - only InvalidAPIParameters is acceptable
            assert type(exc).__name__ == "InvalidAPIParameters"
            accepted = False
        assert accepted == validator.is_valid(value), value

    check()


def test_py_space_is_what_str_strip_strips() -> None:
    # archive_filename refuses a name that strip() empties; its schema says so with PY_SPACE.
    pattern = re.compile(p.PY_SPACE)
    assert [i for i in range(0x110000) if pattern.fullmatch(chr(i))] == [
        i for i in range(0x110000) if chr(i).isspace()]


def test_every_declared_field_has_a_valid_schema() -> None:
    for route in ROUTES:
        for field in route.body or ():
            jsonschema.Draft202012Validator.check_schema(field.schema())
    sample = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
    assert jsonschema.Draft202012Validator(p.schema_of(p.vfolder_id)).is_valid(sample)
