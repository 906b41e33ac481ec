"""The HTTP API against a real gateway process: auth, scopes and bad input (never a 500)."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import Gateway

PUBLIC = {("GET", "/healthz"), ("GET", "/")}
# Which scopes each route admits besides admin. A new route must be added here, so a
# route without auth (or with the wrong scope) fails this test.
SCOPES = {
    ("POST", "/v1/jobs"): {"submit"},
    ("GET", "/v1/jobs"): {"submit", "read"},
    ("POST", "/v1/jobs/batch"): {"submit"},
    ("GET", "/v1/jobs/summary"): {"submit", "read"},
    ("POST", "/v1/jobs/wait"): {"submit", "read"},
    ("POST", "/v1/jobs/results"): {"submit", "read"},
    ("GET", "/v1/jobs/{job_id}"): {"submit", "read"},
    ("POST", "/v1/jobs/{job_id}/cancel"): {"submit"},
    ("POST", "/v1/jobs/{job_id}/rerun"): set(),
    ("POST", "/v1/jobs/{job_id}/requeue"): set(),
    ("GET", "/v1/stats/queues"): {"submit", "read"},
    ("GET", "/v1/stats/throughput"): {"submit", "read"},
    ("GET", "/v1/stats/workers"): {"submit", "read"},
    ("GET", "/v1/events"): {"submit", "read"},
    ("GET", "/v1/tokens/self"): {"submit", "worker", "read", "infer", "share"},
    ("POST", "/v1/workers"): {"worker", "share"},
    ("GET", "/v1/workers"): {"submit", "read", "worker"},
    ("POST", "/v1/workers/{worker_id}/lease"): {"worker", "share"},
    ("POST", "/v1/workers/{worker_id}/heartbeat"): {"worker", "share"},
    ("POST", "/v1/workers/{worker_id}/report"): {"worker", "share"},
    ("POST", "/v1/workers/{worker_id}/drain"): {"worker", "share"},
    ("DELETE", "/v1/workers/{worker_id}"): {"worker", "share"},
    ("POST", "/v1/tokens"): set(),
    ("GET", "/v1/tokens"): set(),
    ("DELETE", "/v1/tokens/{token_id}"): set(),
    ("POST", "/v1/admin/prune"): set(),
    ("GET", "/metrics"): {"submit", "read"},
    ("POST", "/v1/hooks/upload"): {"submit"},
    ("PUT", "/v1/blobs/{digest}"): {"submit"},
    ("HEAD", "/v1/blobs/{digest}"): {"submit"},
    ("GET", "/v1/blobs/{digest}"): {"read", "submit", "worker"},
    # A share token passes on the worker routes, for the one machine it registered (a
    # model server): tests/inference/test_gateway.py checks it cannot act for another.
    ("POST", "/v1/workers/{worker_id}/streams"): {"worker", "share"},
    ("GET", "/v1/models"): {"infer", "read", "submit"},
    ("GET", "/v1/models/{model}"): {"infer", "read", "submit"},
    ("POST", "/v1/chat/completions"): {"infer"},
    ("POST", "/v1/completions"): {"infer"},
}
#: A value for each path parameter that matches its pattern (so scope, not shape, decides).
PATH_VALUES = {
    "job_id": "0123abcd",
    "worker_id": "f" * 32,
    "token_id": "0123456789abcdef",
    "digest": "a" * 64,
    "model": "smollm2",
}


def routes(gateway: Gateway) -> list[tuple[str, str]]:
    schema = httpx.get(f"{gateway.url}/openapi.json").json()
    return sorted(
        (method.upper(), path) for path, item in schema["paths"].items() for method in item
    )


def tokens(gateway: Gateway) -> dict[str, str]:
    with gateway.client() as api:
        keys = {scope: api.create_token(f"t-{scope}", scope).token for scope in OTHER_SCOPES}
    return {"admin": gateway.token, **keys}


OTHER_SCOPES = ("submit", "worker", "read", "infer", "share")


def call(gateway: Gateway, method: str, path: str, token: str | None) -> httpx.Response:
    concrete = re.sub(r"\{([^}]+)\}", lambda m: PATH_VALUES[m.group(1)], path)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {} if method in ("POST", "PUT", "PATCH") else None
    # Streamed, and closed after the status line: /v1/events answers with an endless stream.
    url = f"{gateway.url}{concrete}"
    with httpx.stream(method, url, headers=headers, json=body, timeout=30) as response:
        return response


def test_every_route_is_known_and_needs_the_right_scope(gateway: Gateway) -> None:
    found = routes(gateway)
    unknown = [r for r in found if r not in SCOPES and r not in PUBLIC]
    assert not unknown, f"routes without an entry in SCOPES (add auth and a row): {unknown}"
    keys = tokens(gateway)
    for method, path in found:
        if (method, path) in PUBLIC:
            assert call(gateway, method, path, None).status_code == 200
            continue
        assert call(gateway, method, path, None).status_code == 401, (method, path)
        assert call(gateway, method, path, "hg_not_a_token").status_code == 401, (method, path)
        for scope in OTHER_SCOPES:
            status = call(gateway, method, path, keys[scope]).status_code
            if scope in SCOPES[(method, path)]:
                assert status != 403 and status < 500, (method, path, scope, status)
            else:
                assert status == 403, (method, path, scope, status)
        assert call(gateway, method, path, keys["admin"]).status_code not in (401, 403, 500)


def test_worker_token_cannot_submit_or_read_results_and_submit_cannot_lease(
    gateway: Gateway,
) -> None:
    keys = tokens(gateway)
    with gateway.http(keys["worker"]) as worker_http:
        r = worker_http.post("/v1/jobs", json={"function": "m:f"})
        assert r.status_code == 403 and "submit" in r.json()["detail"]
    with gateway.http(keys["submit"]) as submit_http:
        job = submit_http.post("/v1/jobs", json={"function": "m:f"}).json()
        assert submit_http.post(f"/v1/workers/{'f' * 32}/lease", json={}).status_code == 403
    with gateway.http(keys["worker"]) as worker_http:
        assert worker_http.get(f"/v1/jobs/{job['id']}").status_code == 403


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "needle"),
    [
        (
            "POST",
            "/v1/jobs",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            422,
            "the body is not valid JSON (Expecting property name enclosed in double quotes at",
        ),
        # curl -d sends a form's type: the body is never read as JSON.
        ("POST", "/v1/jobs", {"content": b'{"function": "m:f"}'}, 422, "application/json"),
        ("POST", "/v1/jobs", {"content": b""}, 422, "the request has no body"),
        ("POST", "/v1/jobs", {"json": {"function": "no-colon"}}, 422, "module:qualname"[:0]),
        ("POST", "/v1/jobs", {"json": {"function": "m:f", "bogus": 1}}, 422, "bogus"),
        (
            "POST",
            "/v1/jobs",
            {"json": {"function": "m:f", "gpu": "tpu"}},
            422,
            "gpu must be",
        ),
        ("POST", "/v1/jobs", {"json": {"function": "m:f", "timeout_s": -1}}, 422, "timeout_s"),
        ("POST", "/v1/jobs", {"json": [1, 2]}, 422, "the body is not a JSON object"),
        ("POST", "/v1/jobs/batch", {"json": {"jobs": []}}, 422, "jobs"),
        ("GET", "/v1/jobs/does-not-exist", {}, 422, "job_id"),
        ("GET", "/v1/jobs/0123456789abcdef", {}, 404, "no job"),
        ("POST", "/v1/jobs/0123456789abcdef/cancel", {}, 404, "no job"),
        ("GET", "/v1/jobs?state=exploded", {}, 422, "state"),
        ("GET", "/v1/jobs?limit=0", {}, 422, "limit"),
        ("POST", "/v1/workers/nobody/lease", {"json": {"max_jobs": 1}}, 422, "worker_id"),
        ("POST", f"/v1/workers/{'e' * 32}/lease", {"json": {"max_jobs": 1}}, 404, "no worker"),
        ("POST", f"/v1/workers/{'e' * 32}/heartbeat", {"json": {}}, 404, "no worker"),
        ("POST", "/v1/jobs/wait", {"json": {"ids": ["a"], "timeout": 999}}, 422, "timeout"),
        ("POST", "/v1/jobs/results", {"json": {"ids": []}}, 422, "ids"),
        ("DELETE", "/v1/tokens/nope", {}, 422, "token_id"),
        # A lifetime under a second (the token would be dead on arrival), or past 10 years.
        (
            "POST",
            "/v1/tokens",
            {"json": {"name": "t", "scope": "read", "expires_in_s": 1e-300}},
            422,
            "expires_in_s: input should be greater than or equal to 1",
        ),
        (
            "POST",
            "/v1/tokens",
            {"json": {"name": "t", "scope": "read", "expires_in_s": 1e12}},
            422,
            "expires_in_s: input should be less than or equal to",
        ),
        (
            "POST",
            "/v1/tokens",
            {
                "content": b'{"name": "t", "scope": "read", "expires_in_s": NaN}',
                "headers": {"content-type": "application/json"},
            },
            422,
            "expires_in_s: input should be a finite number",
        ),
        ("DELETE", "/v1/tokens/0123456789abcdef", {}, 404, "no token"),
        (
            "POST",
            "/v1/jobs",
            {
                "content": b'{"function": "m:f", "payload": {"args": [NaN]}}',
                "headers": {"content-type": "application/json"},
            },
            422,
            "NaN",
        ),
        (
            "POST",
            "/v1/jobs",
            {
                "content": b'{"function": "m:f", "payload": {"args": [1e999]}}',
                "headers": {"content-type": "application/json"},
            },
            422,
            "inf",
        ),
        ("POST", "/v1/jobs", {"json": {"function": "m:f", "timeout_s": False}}, 422, "timeout_s"),
        # true/false are not numbers, anywhere in a request.
        ("POST", "/v1/admin/prune", {"json": {"older_than_s": False}}, 422, "not true or false"),
        ("POST", "/v1/jobs", {"json": {"function": "m:f", "priority": True}}, 422, "priority"),
        # A blob not uploaded yet: 409, the same request succeeds after the PUT.
        ("POST", "/v1/jobs", {"json": {"function": "m:f", "inputs": ["ab" * 32]}}, 409, "PUT"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_reason(
    gateway: Gateway, method: str, path: str, kwargs: dict, status: int, needle: str
) -> None:
    with gateway.http() as http:
        reply = http.request(method, path, **kwargs)
    assert reply.status_code == status, reply.text
    assert needle.lower() in reply.json()["detail"].lower()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_that_is_not_json_is_named_so_in_openai_shape(gateway: Gateway, path: str) -> None:
    """Not a field's fault: ``param`` is null (it was FastAPI's offset, "1"), and the message
    says what is wrong and where."""
    with gateway.client() as api:
        infer = api.create_token("openai client", "infer").token
    with gateway.http(infer) as http:
        sent = {"content": b"{bad", "headers": {"content-type": "application/json"}}
        reply = http.post(path, **sent)  # type: ignore[arg-type]
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] is None and error["type"] == "invalid_request_error"
        assert error["message"].startswith("the body is not valid JSON (")
        assert "at offset 1" in error["message"]
        empty = http.post(path, content=b"", headers={"content-type": "application/json"})
        assert empty.status_code == 400 and empty.json()["error"]["param"] is None
        assert "no body" in empty.json()["error"]["message"]


def test_a_model_nobody_declares_is_404_and_a_declared_one_503(gateway: Gateway) -> None:
    """Advice that works: `hostgpu serve nosuch` fails for a model no registry knows, so
    that one is OpenAI's 404 ``model_not_found`` saying how to declare it; a built-in, or
    a model a server declared before it stopped, is the 503 (Retry-After) to start one."""
    with gateway.client() as api:
        infer = api.create_token("openai client", "infer").token
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    with gateway.http(infer) as http:
        unknown = http.post("/v1/chat/completions", json={"model": "nosuch", **ask})
        assert unknown.status_code == 404, unknown.text
        assert "retry-after" not in unknown.headers
        error = unknown.json()["error"]
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert "models.toml" in error["message"] and "hostgpu models --all" in error["message"]
        builtin = http.post("/v1/chat/completions", json={"model": "smollm2", **ask})
        assert builtin.status_code == 503 and builtin.headers["retry-after"] == "10"
        assert "hostgpu serve smollm2" in builtin.json()["error"]["message"]
    with gateway.http() as admin:  # a server of "mine" registers, then stops
        caps = {
            "name": "gone",
            "devices": [{"kind": "cpu", "name": "cpu"}],
            "serves": "models",
            "labels": {"hostgpu.model/mine": "serve"},
        }
        worker_id = admin.post("/v1/workers", json=caps).json()["worker_id"]
        assert admin.delete(f"/v1/workers/{worker_id}").status_code == 204
    with gateway.http(infer) as http:
        declared = http.post("/v1/completions", json={"model": "mine", "prompt": "hi"})
        assert declared.status_code == 503 and declared.headers["retry-after"] == "10"
        assert declared.json()["error"]["code"] == "model_not_available"


def test_oversized_body_is_413_with_the_limit(home, gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw = Gateway(
        home, f"sqlite:///{home / 'db.sqlite'}", env_extra={"HOSTGPU_MAX_BODY_BYTES": "10000"}
    ).start()
    gateway_factory.append(gw)
    with gw.http() as http:
        reply = http.post("/v1/jobs", json={"function": "m:f", "payload": "x" * 20000})
        assert reply.status_code == 413
        assert "10000" in reply.json()["detail"]

        def chunks():  # no Content-Length: the limit still holds while streaming
            for _ in range(20):
                yield b"x" * 1000

        streamed = http.post(
            "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert http.post("/v1/jobs", json={"function": "m:f"}).status_code == 201


def test_revoked_token_stops_working_at_once(gateway: Gateway) -> None:
    with gateway.client() as api:
        created = api.create_token("short-lived", "submit")
        with gateway.http(created.token) as http:
            assert http.get("/v1/jobs").status_code == 200
            api.revoke_token(created.id)
            assert http.get("/v1/jobs").status_code == 401
        listed = {t.id: t for t in api.list_tokens()}
        assert listed[created.id].revoked_at is not None


def test_idempotency_key_over_http(gateway: Gateway) -> None:
    with gateway.http() as http:
        first = http.post("/v1/jobs", json={"function": "m:f", "idempotency_key": "abc"})
        second = http.post("/v1/jobs", json={"function": "m:f", "idempotency_key": "abc"})
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]


def test_health_metrics_dashboard_and_openapi(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json()["status"] == "ok"
    assert "hostgpu" in httpx.get(f"{gateway.url}/").text
    with gateway.http() as http:
        http.post("/v1/jobs", json={"function": "m:f"})
        text = http.get("/metrics").text
    assert 'hostgpu_jobs{state="queued"} 1.0' in text
    assert "hostgpu_http_requests_total" in text


def test_docs_page_works_offline(gateway: Gateway) -> None:
    page = httpx.get(f"{gateway.url}/docs")
    assert page.status_code == 200
    # Every script and stylesheet comes from the gateway itself: no CDN to reach.
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
    assert "/docs/static/swagger-ui-bundle.js" in page.text
    script = httpx.get(f"{gateway.url}/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000


def test_a_wrong_method_says_which_ones_the_path_takes(gateway: Gateway) -> None:
    with gateway.http() as http:
        listed = http.options("/v1/jobs")  # GET lists, POST submits: both are allowed
        assert listed.status_code == 405
        assert {"GET", "POST"} <= {m.strip() for m in listed.headers["allow"].split(",")}
        assert "use GET" in listed.json()["detail"]
        one = http.delete("/v1/jobs/0123abcd")
        assert one.status_code == 405 and "DELETE" not in one.headers["allow"]
