"""A worker written in another language, as far as the tests need one: it registers over
plain HTTP, publishing one function that no Python module defines."""

from __future__ import annotations

import httpx

FUNCTION = "foreign:double"


def register(api: httpx.Client) -> str:
    reply = api.post(
        "/v1/workers",
        json={
            "name": "raw",
            "devices": [{"kind": "cpu", "name": "cpu"}],
            "modules": ["foreign"],
            "functions": {FUNCTION: {"gpu": "cpu", "timeout": 30, "retries": 0}},
        },
    )
    assert reply.status_code == 201, reply.text
    return str(reply.json()["worker_id"])
