"""Access control: with API keys the predict and model routes, /metrics and /openapi.json need
`Authorization: Bearer KEY` (401 JSON with `WWW-Authenticate: Bearer` otherwise, before the
body is read); the health checks, the web page and its files stay open; CORS is off unless
origins are given; the web page and /docs ask for the key once."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest
from bundles import make_tiny_bundle
from fastapi.testclient import TestClient
from servers import serve_in_thread

from imgrec.serve.app import ServeConfig, create_app

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"
KEYS = ["alpha-key", "beta-key"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("auth") / "tiny")


@pytest.fixture(scope="module")
def keyed(tiny):
    with TestClient(create_app(ServeConfig(model=str(tiny), api_keys=KEYS))) as c:
        yield c


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_401(r) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == "unauthorized"
    assert body["error"]["message"]


PROTECTED = [("post", "/v1/predict"), ("post", "/v1/predict/batch"), ("get", "/v1/model"),
             ("get", "/metrics"), ("get", "/openapi.json"), ("get", "/v1/no-such-route")]
OPEN = ["/healthz", "/readyz", "/", "/docs", "/static/app.js", "/static/docs.js",
        "/static/swagger/swagger-ui-bundle.js"]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_protected_routes_need_a_key(keyed, method, path):
    _assert_401(keyed.request(method, path))
    _assert_401(keyed.request(method, path, headers=_bearer("wrong")))
    _assert_401(keyed.request(method, path, headers={"Authorization": "Basic YWxwaGEta2V5"}))
    _assert_401(keyed.request(method, path, headers={"Authorization": "Bearer"}))


@pytest.mark.parametrize("path", OPEN)
def test_health_page_and_static_files_stay_open(keyed, path):
    assert keyed.get(path).status_code == 200


def test_any_of_the_keys_opens_the_api(keyed):
    jpeg = CHELSEA.read_bytes()
    for key in KEYS:
        r = keyed.post("/v1/predict", content=jpeg, headers=_bearer(key))
        assert r.status_code == 200, r.text
    assert keyed.get("/v1/model", headers={"authorization": "bearer beta-key"}).status_code == 200
    assert keyed.get("/metrics", headers=_bearer("alpha-key")).status_code == 200
    assert "imgrec_errors_total{code=\"unauthorized\"}" in keyed.get(
        "/metrics", headers=_bearer("alpha-key")).text
    assert keyed.get("/openapi.json", headers=_bearer("beta-key")).json()["paths"]


def test_without_keys_everything_is_open(tiny):
    with TestClient(create_app(ServeConfig(model=str(tiny)))) as c:
        assert c.get("/v1/model").status_code == 200
        assert c.get("/metrics").status_code == 200
        spec = c.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert all("401" not in op["responses"] for ops in spec["paths"].values()
               for op in ops.values())


def test_401_comes_before_the_body_is_read(tiny):
    app = create_app(ServeConfig(model=str(tiny), api_keys=KEYS))
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the body was read")

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "raw_path": b"/v1/predict",
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-length", b"5000000"), (b"content-type", b"image/jpeg")]}
    anyio.run(app, scope, receive, send)
    assert sent[0]["status"] == 401 and b"unauthorized" in sent[1]["body"]


def test_every_key_is_compared_in_constant_time(tiny, monkeypatch):
    import hmac

    import imgrec.serve.middleware as middleware

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    with TestClient(create_app(ServeConfig(model=str(tiny), api_keys=KEYS))) as c:
        calls.clear()
        assert c.get("/v1/model", headers=_bearer("alpha-key")).status_code == 200
    # the middleware and the route's dependency each compare against every key
    assert len(calls) == 2 * len(KEYS) and {b for _, b in calls} == {k.encode() for k in KEYS}


# -- CORS ---------------------------------------------------------------------------------------
def test_cors_is_off_by_default(tiny):
    with TestClient(create_app(ServeConfig(model=str(tiny)))) as c:
        r = c.get("/v1/model", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        pre = c.options("/v1/predict", headers={"Origin": "https://evil.example",
                                                "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers


def test_cors_origins_are_allowed_and_others_are_not(tiny):
    config = ServeConfig(model=str(tiny), api_keys=KEYS, cors_origins=["https://app.example"])
    with TestClient(create_app(config)) as c:
        pre = c.options("/v1/predict", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200  # the preflight carries no key, and needs none
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = c.get("/v1/model", headers={"Origin": "https://app.example", **_bearer("alpha-key")})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        denied = c.get("/v1/model", headers={"Origin": "https://app.example"})
        _assert_401(denied)  # the browser may read the 401, so the page can ask for a key
        assert denied.headers["access-control-allow-origin"] == "https://app.example"
        other = c.get("/v1/model", headers={"Origin": "https://evil.example",
                                            **_bearer("alpha-key")})
        assert "access-control-allow-origin" not in other.headers
        refused = c.options("/v1/predict", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 400  # in the API's error schema, not plain text
        assert refused.json()["error"]["code"] == "bad_input"
        assert "Disallowed CORS origin" in refused.json()["error"]["message"]


@pytest.mark.parametrize("origin", ["https://app.example/", "app.example", "ftp://x.example",
                                    "https://app.example/path"])
def test_a_cors_origin_that_no_browser_sends_is_refused(origin):
    """A trailing slash or a missing scheme was taken, and then refused every request of
    the page it was meant for."""
    from imgrec.errors import InputError

    with pytest.raises(InputError, match="is not a browser origin"):
        ServeConfig(cors_origins=[origin])
    assert ServeConfig(cors_origins=["http://localhost:3000", "*"]).cors_origins[1] == "*"


# -- the web page and /docs in a browser --------------------------------------------------------
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium"
                                        if Path("/usr/bin/chromium").exists() else None)


def _serving(config: ServeConfig):
    return serve_in_thread(config)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_the_page_and_docs_ask_for_the_key_once(tiny):
    sync_api = pytest.importorskip("playwright.sync_api")
    args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    with _serving(ServeConfig(model=str(tiny), api_keys=KEYS)) as base, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page()
            asked: list[str] = []

            def answer(dialog):
                asked.append(dialog.message)
                dialog.accept("beta-key")

            page.on("dialog", answer)
            page.goto(base + "/")
            page.locator("#model-info").filter(has_text="3 classes").wait_for(timeout=10_000)
            page.set_input_files("#file-input", str(CHELSEA))
            page.locator("#predictions li").first.wait_for(timeout=15_000)
            assert len(asked) == 1 and "API key" in asked[0]
            assert page.evaluate("sessionStorage.getItem('imgrec-api-key')") == "beta-key"
            page.goto(base + "/docs")  # the same tab's key opens the schema: no second question
            page.locator(".swagger-ui .opblock").first.wait_for(timeout=15_000)
            assert len(asked) == 1
        finally:
            browser.close()


def test_an_empty_api_key_is_refused_not_taken_as_none(capsys):
    """`--api-key "$KEY"` with KEY unset would otherwise serve with no authentication."""
    from imgrec.cli import main

    assert main(["serve", "--api-key", "", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--api-key is empty" in err


def test_an_empty_api_key_variable_is_refused_too(capsys, monkeypatch, tmp_path):
    """IMGREC_API_KEY= (a secret that came out empty): click reads it as unset, so the server
    ran open; it is refused like --api-key "". A key file that is not text is one line."""
    from imgrec.cli import main

    monkeypatch.setenv("IMGREC_API_KEY", "")
    assert main(["serve", "--port", "0"]) == 2
    assert "$IMGREC_API_KEY is set but empty" in capsys.readouterr().err
    monkeypatch.delenv("IMGREC_API_KEY")
    binary = tmp_path / "keys.bin"
    binary.write_bytes(bytes(range(128, 256)))
    assert main(["serve", "--port", "0", "--api-key-file", str(binary)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not text" in err


def test_health_probes_answer_head_without_a_key_or_a_body(tiny):
    """Load balancers and uptime checkers probe with HEAD (HAProxy's `option httpchk`,
    `curl -I`): /healthz and /readyz answer it with the GET's status and no body, open like
    the GET; HEAD on a protected route still needs the key (it answered 405 everywhere)."""
    import http.client

    with serve_in_thread(ServeConfig(model=str(tiny), api_keys=KEYS)) as base:
        host, port = base.removeprefix("http://").split(":")
        for path in ("/healthz", "/readyz"):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("HEAD", path)
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, b""), path
            assert r.getheader("content-type") == "application/json"
            conn.close()
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("HEAD", "/v1/model")
        assert conn.getresponse().status == 401
        conn.close()
