"""The protocol without the Python SDK: what a client in another language does with httpx-like
calls and the OpenAPI document. Nothing from ``hostgpu`` is imported but the test harness that
starts a real gateway; every body below is plain JSON, every path is read from /openapi.json.

It covers a client (submit, wait, cancel) and a whole worker (register with the functions it
publishes, long-poll lease, heartbeat, report, fencing of stale and unknown leases).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from hostgpu.testing import Gateway


def _operation(schema: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The operation as the document states it, with the bearer scheme it needs."""
    assert path in schema["paths"], f"{path} is not in /openapi.json"
    op = schema["paths"][path][method]
    assert op.get("security") == [{"bearer": []}], (method, path, op.get("security"))
    return dict(op)


@pytest.fixture
def api(gateway: Gateway) -> httpx.Client:
    client = httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.token}"}, timeout=30
    )
    return client


def test_a_foreign_client_and_worker_speak_the_protocol(api: httpx.Client) -> None:
    schema = api.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for method, path in [
        ("post", "/v1/workers"),
        ("post", "/v1/jobs"),
        ("post", "/v1/workers/{worker_id}/lease"),
        ("post", "/v1/workers/{worker_id}/heartbeat"),
        ("post", "/v1/workers/{worker_id}/report"),
        ("post", "/v1/jobs/wait"),
        ("post", "/v1/jobs/results"),
        ("get", "/v1/jobs/{job_id}"),
        ("post", "/v1/jobs/{job_id}/cancel"),
        ("delete", "/v1/workers/{worker_id}"),
    ]:
        _operation(schema, method, path)

    # A worker (say, in Go) registers what it can run: its devices and published functions.
    registered = api.post(
        "/v1/workers",
        json={
            "name": "go-worker",
            "devices": [{"kind": "cpu", "name": "cpu"}],
            "modules": ["foreign"],
            "functions": {"foreign:double": {"gpu": "cpu", "timeout": 30, "retries": 0}},
        },
    )
    assert registered.status_code == 201, registered.text
    worker = registered.json()
    wid = worker["worker_id"]
    assert worker["lease_seconds"] > worker["heartbeat_seconds"] > 0
    # Its limits: a report (or channel message) over the first is refused whole (413); a
    # result over the second fails its job, so a worker can fail it before sending it.
    assert worker["max_body_bytes"] > worker["max_result_bytes"] > 0

    # A client (say, curl) submits with no options: the declared ones hold.
    submitted = api.post("/v1/jobs", json={"function": "foreign:double", "payload": {"args": [21]}})
    assert submitted.status_code == 201, submitted.text
    job = submitted.json()
    assert job["timeout_s"] == 30 and job["max_retries"] == 0
    assert job["requirements"]["gpu"] == "cpu"

    leased = api.post(f"/v1/workers/{wid}/lease", json={"max_jobs": 1, "wait": 10}).json()
    [lease] = leased["leases"]
    assert lease["job_id"] == job["id"] and lease["payload"]["args"] == [21]
    assert lease["device"]["kind"] == "cpu"
    held = {"job_id": lease["job_id"], "lease_token": lease["lease_token"]}

    beat = api.post(f"/v1/workers/{wid}/heartbeat", json={"leases": [held]}).json()
    assert beat["lost"] == [] and beat["lost_leases"] == []

    # Fencing: a token the job never had is refused, and says so.
    forged = {**held, "lease_token": "0" * 32, "status": "succeeded", "result": 0}
    refused = api.post(f"/v1/workers/{wid}/report", json={"outcomes": [forged]}).json()
    assert refused["results"][0]["accepted"] is False
    assert "unknown lease" in refused["results"][0]["reason"]

    done = {**held, "status": "succeeded", "result": 42, "device": "cpu"}
    accepted = api.post(f"/v1/workers/{wid}/report", json={"outcomes": [done]}).json()
    assert accepted["results"][0]["accepted"] is True
    again = api.post(f"/v1/workers/{wid}/report", json={"outcomes": [done]}).json()
    assert again["results"][0]["accepted"] is False  # one recorded result per job

    waited = api.post("/v1/jobs/wait", json={"ids": [job["id"]], "timeout": 5}).json()
    [finished] = waited["jobs"]
    assert finished["state"] == "succeeded" and finished["result"] == 42
    # Only the results (what `.map()` waits on): the same long poll, a smaller answer.
    results = api.post("/v1/jobs/results", json={"ids": [job["id"]], "timeout": 5}).json()
    assert results == {
        "results": [
            {
                "id": job["id"],
                "function": "foreign:double",
                "state": "succeeded",
                "attempts": 1,
                "result": 42,
                "error": None,
            }
        ]
    }

    # Cancel, by the short id the CLI and dashboard show.
    other = api.post("/v1/jobs", json={"function": "foreign:double", "payload": {"args": [1]}})
    short = other.json()["id"][:8]
    cancelled = api.post(f"/v1/jobs/{short}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert api.get(f"/v1/jobs/{short}").json()["state"] == "cancelled"

    # Errors are JSON with a reason, for any client.
    bad = api.post("/v1/jobs", json={"function": "foreign:double", "gpu": "mps"})
    assert bad.status_code == 422 and "cpu" in bad.json()["detail"]
    assert api.delete(f"/v1/workers/{wid}").status_code == 204
