"""copyparty's after-upload hook: tell the gateway a file arrived, so it queues an ingest job.

copyparty runs this once per finished upload (``--xau f,j,t60,,PYTHON,-m,hostgpu.pipelines.
upload_hook``, see :mod:`hostgpu.pipelines.uploads`): the ``j`` flag passes one argument, a
JSON object with ``ap`` (absolute path), ``vp`` (path inside the volume), ``sz``, ``ip``,
``user``, …; copyparty passes its own environment on, which carries

- ``HOSTGPU_GATEWAY``: the gateway's base URL, and
- ``HOSTGPU_TOKEN``: a token with the ``submit`` scope.

The event is posted as is to ``{gateway}/v1/hooks/upload``; the gateway checks that the path
lies inside its upload root and queues the job. Connection errors and 502/503/504 are retried
a few times. The hook runs forked (``f``), so copyparty neither waits for it nor looks at its
exit status: a failure never rejects an upload that has already landed. It is written to
stderr (which is copyparty's log) and the exit status is 1; the file stays in the folder and
``hostgpu ingest FOLDER`` queues it later.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

ENDPOINT = "/v1/hooks/upload"
ATTEMPTS = 4
TIMEOUT_S = 10.0
_RETRY_STATUS = frozenset({502, 503, 504})


class _Retryable(Exception):
    """The gateway answered with a status worth another try (it may be restarting)."""


def _log(message: str) -> None:
    print(f"hostgpu upload hook: {message}", file=sys.stderr, flush=True)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | _Retryable)


def _read_event(argv: Sequence[str]) -> dict[str, Any]:
    raw = argv[0] if argv else sys.stdin.read()  # j: first argument; s,j: stdin
    event = json.loads(raw)
    if not isinstance(event, dict) or not isinstance(event.get("ap"), str):
        raise ValueError("expected a JSON object with an 'ap' (absolute path) string")
    return event


def _hidden(event: dict[str, Any]) -> bool:
    """A file under a dot-folder (or a dotfile): copyparty's own state, never ingested."""
    vp = str(event.get("vp") or "")
    return any(part.startswith(".") for part in vp.replace("\\", "/").split("/") if part)


@retry(
    retry=retry_if_exception(_retryable),
    stop=stop_after_attempt(ATTEMPTS),
    wait=wait_exponential(multiplier=0.5, max=5),
    reraise=True,
)
def post_event(gateway: str, token: str, event: dict[str, Any]) -> httpx.Response:
    """POST one upload event to the gateway; retried on connection errors and 502/503/504."""
    response = httpx.post(
        gateway.rstrip("/") + ENDPOINT,
        json=event,
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT_S,
    )
    if response.status_code in _RETRY_STATUS:
        raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
    return response


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        event = _read_event(args)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        _log(f"bad event: {exc}")
        return 2
    if _hidden(event):
        return 0
    gateway = os.environ.get("HOSTGPU_GATEWAY", "").strip()
    token = os.environ.get("HOSTGPU_TOKEN", "").strip()
    if not gateway or not token:
        _log(f"HOSTGPU_GATEWAY and HOSTGPU_TOKEN must be set; {event['ap']!r} not queued")
        return 1
    try:
        response = post_event(gateway, token, event)
    except (httpx.HTTPError, _Retryable) as exc:
        _log(
            f"gateway {gateway} unreachable after {ATTEMPTS} tries ({exc}); "
            f"{event['ap']!r} not queued"
        )
        return 1
    if response.status_code != 202:
        _log(f"gateway refused {event['ap']!r}: HTTP {response.status_code} {response.text[:300]}")
        return 1
    body = response.json()
    _log(f"queued ingest job {body.get('job_id')} for {body.get('path')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
