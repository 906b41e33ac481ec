"""Fuzz the /v1 API from its own OpenAPI schema: no 5xx, responses match the schema."""

from __future__ import annotations

import os
import re
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, positive_data_acceptance
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection

from hostgpu.gateway import create_app
from hostgpu.gateway.bootstrap import ensure_admin_token
from hostgpu.settings import Settings
from hostgpu.tokens import TokenInfo, hash_token

#: Bounded for CI: examples per operation (FUZZ_EXAMPLES=500 for a deeper run).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))


#: Long-poll fields and the operations that have them.
LONG_POLLS = {
    "/v1/jobs/wait": "timeout",
    "/v1/jobs/results": "timeout",
    "/v1/workers/{worker_id}/lease": "wait",
}
#: Event streams: no input to fuzz, and each example would stream for a minute.
STREAMS = {"/v1/events"}
#: Content-addressed uploads: the path is the SHA-256 of the body, a rule no schema can state,
#: so a "schema-valid" random body is refused (with a 4xx and its reason, which is checked).
CONTENT_ADDRESSED = {("PUT", "/v1/blobs/{digest}")}
#: The inference API with no model server connected: a valid request gets the documented 503
#: (with Retry-After and what to start), and the OpenAI request models hold rules a schema
#: cannot state (n=1, no penalties). Checked by hand below: a 4xx with OpenAI's error shape,
#: or that 503, never another 5xx.
INFERENCE = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions")}


def _clamp_waits(case: schemathesis.Case) -> None:
    # Long polls would make every example wait up to their default; the rest of the request
    # is still fuzzed, only the wait is clamped to zero.
    field = LONG_POLLS.get(case.operation.path)
    if field and isinstance(case.body, dict):
        case.body[field] = 0
    if isinstance(case.query, dict) and "wait" in case.query:
        case.query["wait"] = 0


def _gateway(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[Any, str, TokenInfo]:
    """An in-process gateway on ``backend``, its admin secret and that token's record."""
    url = (
        f"sqlite:///{tmp_path / 'fuzz.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    app = create_app(Settings(home=tmp_path, database_url=url, max_body_bytes=64 * 1024))
    token_file = ensure_admin_token(app.state.store, app.state.settings)
    assert token_file is not None
    secret = Path(token_file).read_text().strip()
    own = app.state.store.verify_token(hash_token(secret))
    assert own is not None
    return app, secret, own


def _empty(app: Any, *, keep_token: str) -> None:
    """Delete every job, worker, blob and token but ``keep_token``, and the caches of them."""
    from hostgpu.store import schema as tables

    with app.state.store.engine.begin() as conn:
        for table in (
            tables.job_inputs,
            tables.attempts,
            tables.blob_chunks,
            tables.blobs,
            tables.jobs,
            tables.functions,
            tables.workers,
        ):
            conn.execute(table.delete())
        conn.execute(tables.tokens.delete().where(tables.tokens.c.id != keep_token))
    app.state.notifier.worker_caps.clear()
    app.state.touched.clear()
    app.state.tokens.clear()


def _other_route(case: schemathesis.Case, response: Any) -> bool:
    """Whether the request's URL path no longer matches its operation's template."""
    template = "^" + re.sub(r"\{[^}]+\}", "[^/]+", case.operation.path) + "$"
    return re.match(template, urlsplit(response.request.url).path) is None


def _negative(case: schemathesis.Case) -> bool:
    return bool(case.meta and case.meta.generation.mode is GenerationMode.NEGATIVE)


def _check_inference(response: Any) -> None:
    """No model server is connected: a 4xx in OpenAI's error shape, or the documented 503."""
    error = response.json()["error"]
    assert response.status_code != 200 and error["message"], response.text
    if response.status_code >= 500:
        assert response.status_code == 503, response.text
        assert "no worker can load" in error["message"]
        assert response.headers["retry-after"]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_api_never_fails_on_any_input(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    app, secret, own = _gateway(backend, tmp_path, request)
    headers = {"Authorization": f"Bearer {secret}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if op.path not in STREAMS]
    assert len(operations) >= 15
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            _clamp_waits(case)
            key = (case.operation.method.upper(), case.operation.path)
            if key == ("DELETE", "/v1/tokens/{token_id}") and own.id.startswith(
                str((case.path_parameters or {}).get("token_id", "-"))
            ):
                return  # its own token (ids match by prefix): revoking it would end the run
            if key in INFERENCE:
                checks = [positive_data_acceptance, not_a_server_error]
                _check_inference(case.call_and_validate(headers=headers, excluded_checks=checks))
                return
            excluded = [positive_data_acceptance] if key in CONTENT_ADDRESSED else []
            response = case.call_and_validate(headers=headers, excluded_checks=excluded)
            if excluded and response.status_code >= 400:
                assert response.status_code < 500 and response.json()["detail"], response.text

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report them all
            detail = "".join(traceback.format_exception(exc))[-4000:]
            failures.append(f"{operation.method.upper()} {operation.path}:\n{detail}")
    # The run ended with the token it started with: every operation was really exercised.
    assert app.state.store.verify_token(hash_token(secret)) is not None
    app.state.store.close()
    if failures:
        pytest.fail("\n\n".join(failures))


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_api_never_fails_on_sequences_of_calls(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The stateful phase: chains of calls that feed one response's ids into the next request
    (submit → get, cancel, rerun, requeue; register → lease, heartbeat, report, drain; upload
    → fetch), with the links schemathesis infers from the schema. Same rules as above."""
    app, secret, own = _gateway(backend, tmp_path, request)
    headers = {"Authorization": f"Bearer {secret}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    workflow = schema.as_state_machine()
    transitions = [name for name in dir(workflow) if "__" in name and name.count("_v1_") == 2]
    assert len(transitions) >= 30, "schemathesis found too few links between operations"

    answered: dict[tuple[str, str], set[int]] = {}

    class Calls(workflow):  # type: ignore[valid-type, misc]
        def setup(self) -> None:
            # Each scenario starts from an empty queue: the gateway's answers then depend on
            # the scenario alone, as hypothesis needs (it replays scenarios).
            _empty(app, keep_token=own.id)

        def before_call(self, case: schemathesis.Case) -> None:
            _clamp_waits(case)
            key = (case.operation.method.upper(), case.operation.path)
            token_id = str((case.path_parameters or {}).get("token_id", "-"))
            if key == ("DELETE", "/v1/tokens/{token_id}") and own.id.startswith(token_id):
                case.path_parameters = {"token_id": "f" * 16}  # never its own token

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": headers}

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            key = (case.operation.method.upper(), case.operation.path)
            answered.setdefault(key, set()).add(response.status_code)

        def validate_response(
            self,
            response: Any,
            case: schemathesis.Case,
            additional_checks: Any = None,
            **kwargs: Any,
        ) -> None:
            key = (case.operation.method.upper(), case.operation.path)
            if key in INFERENCE:
                _check_inference(response)
                return
            if key in CONTENT_ADDRESSED and response.status_code >= 400:
                assert response.status_code < 500 and response.json()["detail"], response.text
                return
            excluded = [positive_data_acceptance]
            if _negative(case):
                # The Authorization header is always sent (without it every call is a 401)
                # and long polls are clamped, so a case whose only flaw was one of those is
                # valid: still no 5xx.
                excluded.append(negative_data_rejection)
            if _other_route(case, response):
                # A mutated path parameter ("", an empty list), or one an inferred link read
                # from a response without that field, can make the URL name another route
                # (POST /v1/jobs//cancel is POST /v1/jobs/cancel: a 405 there; GET /v1/jobs/
                # is the list), whose answers this operation does not document. Still no 5xx.
                case.validate_response(response, checks=[not_a_server_error])
                return
            case.validate_response(response, excluded_checks=excluded)

    Calls.run(
        settings=settings(
            max_examples=max(EXAMPLES, 60),
            stateful_step_count=8,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
    )
    # The chains reached real resources: an id from one response found its job or worker in
    # the next call.
    chained = [key for key, statuses in answered.items() if "{" in key[1] and statuses & {200, 201}]
    assert chained, answered
    assert app.state.store.verify_token(hash_token(secret)) is not None
    app.state.store.close()
