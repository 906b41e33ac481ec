"""copyparty's after-upload hook inside the copyparty container: queue an ingest job.

Standard library only (the copyparty image has no httpx). copyparty runs it once per
finished upload (``--xau f,j,t60,,python3,/opt/hostgpu/upload_hook.py``: forked, the event
as one JSON argument, killed after 60 s) and it posts the event to the gateway's
``/v1/hooks/upload`` with a ``submit`` token:

- ``HOSTGPU_GATEWAY``: the gateway's URL as this container sees it (``http://gateway:8000``
  on the compose network);
- ``HOSTGPU_TOKEN_FILE``: a file holding the token (mode 0600, mounted read-only), read at
  every upload, so `hostgpu stack up` can write it after copyparty is already running;
  ``HOSTGPU_TOKEN`` is used when no file is given.

The upload folder is mounted at the same absolute path here, in the gateway container and
on the host, so ``ap`` (the absolute path copyparty reports) is valid for the native worker.
Connection errors and 502/503/504 are retried a few times. Exit status: 0 queued (or a
dot-file skipped), 1 not queued (the reason goes to stderr, copyparty's log), 2 bad event.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

ENDPOINT = "/v1/hooks/upload"
ATTEMPTS = 4
TIMEOUT_S = 10.0
RETRY_STATUS = frozenset({502, 503, 504})


def log(message: str) -> None:
    print(f"hostgpu upload hook: {message}", file=sys.stderr, flush=True)


def read_event(argv: list[str]) -> dict[str, Any]:
    raw = argv[0] if argv else sys.stdin.read()
    event = json.loads(raw)
    if not isinstance(event, dict) or not isinstance(event.get("ap"), str):
        raise ValueError("expected a JSON object with an 'ap' (absolute path) string")
    return event


def hidden(event: dict[str, Any]) -> bool:
    """A dot-file or a file under a dot-folder: copyparty's own state, never ingested."""
    vp = str(event.get("vp") or "")
    return any(part.startswith(".") for part in vp.replace("\\", "/").split("/") if part)


def token() -> str:
    path = os.environ.get("HOSTGPU_TOKEN_FILE", "").strip()
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as exc:
            log(f"cannot read the token file {path}: {exc}")
            return ""
    return os.environ.get("HOSTGPU_TOKEN", "").strip()


def post(gateway: str, secret: str, event: dict[str, Any]) -> tuple[int, str]:
    """POST the event; (status, body). Retries connection errors and 502/503/504."""
    request = urllib.request.Request(
        gateway.rstrip("/") + ENDPOINT,
        data=json.dumps(event).encode(),
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        method="POST",
    )
    delay = 0.5
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            if exc.code not in RETRY_STATUS or attempt == ATTEMPTS:
                return exc.code, body
        except (urllib.error.URLError, OSError) as exc:
            if attempt == ATTEMPTS:
                raise ConnectionError(f"{exc}") from exc
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        event = read_event(args)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        log(f"bad event: {exc}")
        return 2
    if hidden(event):
        return 0
    where = repr(event["ap"])
    gateway = os.environ.get("HOSTGPU_GATEWAY", "").strip()
    secret = token()
    if not gateway or not secret:
        log(f"HOSTGPU_GATEWAY and a token (HOSTGPU_TOKEN_FILE) must be set: {where} not queued")
        return 1
    try:
        status, body = post(gateway, secret, event)
    except ConnectionError as exc:
        log(f"gateway {gateway} unreachable after {ATTEMPTS} tries ({exc}): {where} not queued")
        return 1
    if status != 202:
        log(f"gateway refused {event['ap']!r}: HTTP {status} {body[:300]}")
        return 1
    try:
        job = json.loads(body)
    except ValueError:
        job = {}
    log(f"queued ingest job {job.get('job_id')} for {job.get('path')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
