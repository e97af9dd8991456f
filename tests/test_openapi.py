"""/openapi.json is the serve API's whole contract: every route documents its success body (or
its media type) and the errors it really answers, and real answers, errors included, validate
against the documented schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bundles import make_tiny_bundle
from fastapi.testclient import TestClient

from imgrec.serve.app import ServeConfig, create_app
from imgrec.serve.schemas import ErrorResponse

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"

#: every documented operation: its success media type and the error statuses it can answer
OPERATIONS = {
    ("/v1/predict", "post"): ("application/json", {400, 408, 413, 415, 422, 500, 503}),
    ("/v1/predict/batch", "post"): ("application/json", {400, 408, 413, 422, 500, 503}),
    ("/v1/model", "get"): ("application/json", {500}),
    ("/healthz", "get"): ("application/json", {500, 503}),
    ("/readyz", "get"): ("application/json", {500, 503}),
    ("/metrics", "get"): ("text/plain", {500}),
    ("/", "get"): ("text/html", {500}),
}
#: the operations that need the key when the server has one (and then document 401)
PROTECTED = {("/v1/predict", "post"), ("/v1/predict/batch", "post"), ("/v1/model", "get"),
             ("/metrics", "get")}
#: the headers documented (and always sent) with an error status
ERROR_HEADERS = {401: "WWW-Authenticate", 503: "Retry-After"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("openapi") / "tiny")


@pytest.fixture(scope="module")
def client(tiny):
    with TestClient(create_app(ServeConfig(model=str(tiny), max_upload_mb=1)),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def spec(client) -> dict[str, Any]:
    return client.get("/openapi.json").json()


# -- a small JSON Schema check (the subset pydantic and FastAPI emit) ------------------------
def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = spec["components"]["schemas"][name]
    return schema


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def violations(spec: dict, schema: dict, value: Any, where: str = "$") -> list[str]:
    """Why `value` does not match `schema` (empty: it does)."""
    schema = _resolve(spec, schema)
    if "anyOf" in schema:
        if all(violations(spec, s, value, where) for s in schema["anyOf"]):
            return [f"{where}: matches none of anyOf"]
        return []
    kind = schema.get("type")
    if kind and (not isinstance(value, _TYPES[kind])
                 or (kind in ("integer", "number") and isinstance(value, bool))):
        return [f"{where}: {value!r} is not {kind}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: {value!r} != {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    problems = []
    if kind == "object":
        props = schema.get("properties", {})
        problems += [f"{where}: no {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            problems += [f"{where}: unexpected {k!r}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                problems += violations(spec, props[k], v, f"{where}.{k}")
    if kind == "array" and "items" in schema:
        for i, v in enumerate(value):
            problems += violations(spec, schema["items"], v, f"{where}[{i}]")
    return problems


def documented(spec: dict, path: str, method: str, status: int) -> dict:
    """The JSON schema documented for `status` of an operation."""
    response = spec["paths"][path][method]["responses"][str(status)]
    return response["content"]["application/json"]["schema"]


def assert_documented(spec: dict, path: str, method: str, r) -> None:
    """A real answer: its status is documented for its route, and its body matches."""
    assert str(r.status_code) in spec["paths"][path][method]["responses"], r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert violations(spec, documented(spec, path, method, r.status_code), body) == [], body
    if r.status_code >= 400:
        ErrorResponse.model_validate(body)


# -- the document -------------------------------------------------------------------------
def test_every_route_documents_its_answer_and_its_errors(spec):
    _check_operations(spec, keyed=False)


def test_with_a_key_the_protected_routes_document_401_and_the_scheme(tiny):
    with TestClient(create_app(ServeConfig(model=str(tiny), api_keys=["k1"]))) as c:
        assert c.get("/openapi.json").status_code == 401
        keyed = c.get("/openapi.json", headers={"Authorization": "Bearer k1"}).json()
    _check_operations(keyed, keyed=True)
    assert keyed["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": keyed["components"][
            "securitySchemes"]["ApiKey"]["description"]}
    for (path, method) in OPERATIONS:
        security = keyed["paths"][path][method].get("security")
        assert (security == [{"ApiKey": []}]) == ((path, method) in PROTECTED), (path, security)


def _check_operations(spec: dict, keyed: bool) -> None:
    operations = {(p, m) for p, ops in spec["paths"].items() for m in ops}
    assert operations == set(OPERATIONS)
    schemas = spec["components"]["schemas"]
    for (path, method), (media_type, errors) in OPERATIONS.items():
        if keyed and (path, method) in PROTECTED:
            errors = errors | {401}
        responses = spec["paths"][path][method]["responses"]
        ok = responses["200"]["content"]
        assert list(ok) == [media_type], (path, ok)
        if media_type == "application/json":
            assert _resolve(spec, ok[media_type]["schema"]).get("properties"), path
            assert ok[media_type]["schema"]["$ref"].split("/")[-1] in schemas
        assert {int(s) for s in responses if s != "200"} == errors, path
        for status in errors:
            content = responses[str(status)]["content"]
            assert list(content) == ["application/json"], (path, status)
            assert content["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}, (path, status)
            assert responses[str(status)]["description"], (path, status)
            header = ERROR_HEADERS.get(status)
            assert list(responses[str(status)].get("headers", {})) == ([header] if header
                                                                         else []), (path, status)
    assert "HTTPValidationError" not in schemas  # FastAPI's {"detail": ...} never answers here


def test_the_error_schema_is_exactly_the_errors_shape(spec):
    error = _resolve(spec, {"$ref": "#/components/schemas/ErrorResponse"})
    assert error["required"] == ["error"] and error["additionalProperties"] is False
    detail = _resolve(spec, error["properties"]["error"])
    assert set(detail["required"]) == {"code", "message"} and not detail["additionalProperties"]
    assert violations(spec, error, {"error": {"code": "x", "message": "y"}}) == []
    assert violations(spec, error, {"detail": "Not Found"})
    assert violations(spec, error, {"error": {"code": "x", "message": "y", "z": 1}})


def test_request_bodies_are_declared(spec):
    one = spec["paths"]["/v1/predict"]["post"]["requestBody"]
    assert one["required"] and set(one["content"]) == {"multipart/form-data", "image/*"}
    form = _resolve(spec, one["content"]["multipart/form-data"]["schema"])
    assert "file" in form["properties"]
    batch = spec["paths"]["/v1/predict/batch"]["post"]["requestBody"]
    assert batch["required"] and list(batch["content"]) == ["multipart/form-data"]
    form = _resolve(spec, batch["content"]["multipart/form-data"]["schema"])
    assert {"files", "file"} <= set(form["properties"])
    top_k = spec["paths"]["/v1/predict"]["post"]["parameters"][0]
    assert top_k["name"] == "top_k" and top_k["in"] == "query"


# -- real answers against the document ----------------------------------------------------
def test_successes_match_their_schemas(client, spec):
    jpeg = CHELSEA.read_bytes()
    assert_documented(spec, "/v1/predict", "post",
                      client.post("/v1/predict", files={"file": ("c.jpg", jpeg)}))
    r = client.post("/v1/predict/batch", files=[("files", ("c.jpg", jpeg)),
                                                ("files", ("t.txt", b"not an image"))])
    assert_documented(spec, "/v1/predict/batch", "post", r)
    assert "predictions" in r.json()["results"][0] and "error" in r.json()["results"][1]
    assert_documented(spec, "/v1/model", "get", client.get("/v1/model"))
    assert_documented(spec, "/healthz", "get", client.get("/healthz"))
    assert_documented(spec, "/readyz", "get", client.get("/readyz"))
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert client.get("/").headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("status,request_kwargs", [
    (400, {"files": {"image": ("c.jpg", b"\xff\xd8\xff")}}),  # the wrong field
    (400, {"data": {"file": "text, not a file"}, "files": {"x": ("a", b"b")}}),
    (400, {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}),
    (413, {"content": b"\xff\xd8\xff" + b"\x00" * (2 << 20)}),  # over the 1 MB limit
    (415, {"files": {"file": ("notes.jpg", b"plain text, whatever the name says")}}),
    (422, {"files": {"file": ("half.jpg", CHELSEA.read_bytes()[:5000])}}),  # corrupt
    (422, {"content": CHELSEA.read_bytes(), "params": {"top_k": "0"}}),
])
def test_predict_errors_match_the_error_schema(client, spec, status, request_kwargs):
    r = client.post("/v1/predict", **request_kwargs)
    assert r.status_code == status, r.text
    assert_documented(spec, "/v1/predict", "post", r)


def test_batch_errors_match_the_error_schema(client, spec):
    for r in (client.post("/v1/predict/batch", content=CHELSEA.read_bytes()),
              client.post("/v1/predict/batch", files={"wrong": ("c.jpg", b"x")}),
              client.post("/v1/predict/batch?top_k=many", files={"files": ("c.jpg", b"x")})):
        assert r.status_code in (400, 422)
        assert_documented(spec, "/v1/predict/batch", "post", r)


def test_engine_failure_and_a_stopped_batcher_match_the_error_schema(tiny):
    app = create_app(ServeConfig(model=str(tiny)))
    with TestClient(app, raise_server_exceptions=False) as c:
        spec = c.get("/openapi.json").json()

        def broken(batch):
            raise RuntimeError("engine broke")

        app.state.service.batcher.run = broken
        r = c.post("/v1/predict", content=CHELSEA.read_bytes())
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert_documented(spec, "/v1/predict", "post", r)
        app.state.service.batcher.close()
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert r.headers["retry-after"] == "1"
        assert_documented(spec, "/healthz", "get", r)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert_documented(spec, "/readyz", "get", r)
