"""A typed httpx client for the gateway's /v1 API (used by the SDK, the CLI and workers).

Every method returns the models of :mod:`hostgpu.api` and the domain records, the same ones
the gateway's routes declare, so both ends of the wire agree by construction.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import connect_sse
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from hostgpu.api import (
    HeartbeatResponse,
    JobIds,
    JobList,
    JobResults,
    LeaseResponse,
    Pruned,
    QueueStats,
    Registered,
    ReportResponse,
    StreamBatch,
    StreamReply,
    Summary,
    Throughput,
    TokenCreated,
    TokenList,
    TokenRequest,
    WorkerActivityList,
    WorkerList,
)
from hostgpu.capabilities import Capabilities, WorkerInfo
from hostgpu.errors import (
    AuthError,
    ConfigError,
    GatewayError,
    GatewayUnavailable,
    InvalidInput,
    InvalidTransition,
    NotFound,
)
from hostgpu.inference.openai_schema import ModelList
from hostgpu.jobs import Job, JobResult, JobSpec, JobState, Lease, Outcome
from hostgpu.settings import Settings, get_settings
from hostgpu.tokens import Scope, TokenInfo


def file_digest(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


class Client:
    def __init__(
        self,
        gateway: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        settings: Settings | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        settings = settings or get_settings()
        self.gateway = _gateway_url(gateway or settings.resolved_gateway())
        token = token or settings.resolved_token()
        if token and not (token.isascii() and token.isprintable() and " " not in token):
            raise ConfigError(
                "the API token holds characters no token has (a space or a line break?): "
                "check HOSTGPU_TOKEN or the token file"
            )
        if not token:
            raise ConfigError(
                "no API token: set HOSTGPU_TOKEN or HOSTGPU_TOKEN_FILE (a 0600 file), pass "
                "--token-file, or start a local gateway with `hostgpu up` (it writes an admin "
                "token to HOSTGPU_HOME)"
            )
        #: For the worker's channel, a WebSocket (httpx speaks only HTTP).
        self.token = token
        self._http = httpx.Client(
            base_url=self.gateway,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )
        #: The gateway predates ``POST /v1/jobs/results``: ask ``/v1/jobs/wait`` instead.
        self._results_unknown = False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------
    def _send(
        self, method: str, path: str, *, timeout: float | None = None, **kw: Any
    ) -> httpx.Response:
        if timeout is not None:
            kw["timeout"] = timeout
        try:
            return self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise GatewayUnavailable(
                f"cannot reach the gateway at {self.gateway} ({exc.__class__.__name__}: {exc}); "
                "is `hostgpu up` or `hostgpu gateway` running?"
            ) from exc

    def request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> Any:
        response = self._send(method, path, timeout=timeout, **kw)
        self._raise_for(response, method, path)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def _raise_for(self, response: httpx.Response, method: str, path: str) -> None:
        if response.status_code >= 400:
            error = None
            try:
                body = response.json()
                # The inference routes answer in OpenAI's error shape.
                error = body.get("error") if isinstance(body, dict) else None
                detail = (
                    error.get("message", response.text)
                    if isinstance(error, dict)
                    else body.get("detail", response.text)
                )
            except (ValueError, AttributeError):
                detail = response.text
            status = response.status_code
            message = f"{method} {path}: {status} {detail}"
            if status in (401, 403):
                raise AuthError(message, status=status)
            if status == 404:
                raise NotFound(message)
            if status == 409:
                raise InvalidTransition(message)
            if status == 422:
                raise InvalidInput(message)
            if status in (502, 504) or (status == 503 and error is None):
                # The gateway is up but its database is not, or a proxy cannot reach the
                # gateway (an inference 503, in OpenAI's shape, is about model servers
                # instead): retried like an unreachable gateway.
                raise GatewayUnavailable(message, status=status)
            raise GatewayError(message, status=status)

    # -- jobs --------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, *, wait: float = 0) -> Job:
        """Submit one job; with ``wait``, return it once finished (or when the wait ends)."""
        body = spec.model_dump(mode="json", exclude_none=True)
        params = {"wait": wait} if wait else None
        data = self.request("POST", "/v1/jobs", json=body, params=params, timeout=wait + 30)
        return Job.model_validate(data)

    def submit_batch(self, specs: Sequence[JobSpec]) -> list[str]:
        body = {"jobs": [s.model_dump(mode="json", exclude_none=True) for s in specs]}
        return JobIds.model_validate(self.request("POST", "/v1/jobs/batch", json=body)).ids

    def get(self, job_id: str, *, wait: float = 0) -> Job:
        params = {"wait": wait} if wait else None
        data = self.request("GET", f"/v1/jobs/{_segment(job_id)}", params=params, timeout=wait + 30)
        return Job.model_validate(data)

    def wait(self, job_ids: Sequence[str], *, timeout: float = 10.0) -> list[Job]:
        return JobList.model_validate(self._first_finished("wait", job_ids, timeout)).jobs

    def results(self, job_ids: Sequence[str], *, timeout: float = 10.0) -> list[JobResult]:
        """As :meth:`wait`, with only each finished job's result or error."""
        if not self._results_unknown:
            try:
                data = self._first_finished("results", job_ids, timeout)
                return JobResults.model_validate(data).results
            except NotFound as exc:
                if not str(exc).endswith(": 404 Not Found"):  # an id that names no job
                    raise
                # No such route: a gateway older than this client.
                self._results_unknown = True
        return [
            JobResult.model_validate(job.model_dump(include=set(JobResult.model_fields)))
            for job in self.wait(job_ids, timeout=timeout)
        ]

    def _first_finished(self, route: str, job_ids: Sequence[str], timeout: float) -> Any:
        body = {"ids": list(job_ids), "timeout": timeout}
        return self.request("POST", f"/v1/jobs/{route}", json=body, timeout=timeout + 30)

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self.request("POST", f"/v1/jobs/{_segment(job_id)}/cancel"))

    def rerun(self, job_id: str) -> Job:
        return Job.model_validate(self.request("POST", f"/v1/jobs/{_segment(job_id)}/rerun"))

    def requeue(self, job_id: str) -> Job:
        """Take a leased or running job back from its worker and queue it again (admin)."""
        return Job.model_validate(self.request("POST", f"/v1/jobs/{_segment(job_id)}/requeue"))

    def list_jobs(
        self,
        *,
        state: JobState | None = None,
        function: str | None = None,
        worker: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobList:
        params: dict[str, Any] = {"limit": limit}
        for name, value in (
            ("state", state.value if state else None),
            ("function", function),
            ("worker", worker),
            ("cursor", cursor),
        ):
            if value is not None:
                params[name] = value
        return JobList.model_validate(self.request("GET", "/v1/jobs", params=params))

    def summary(self) -> Summary:
        return Summary.model_validate(self.request("GET", "/v1/jobs/summary"))

    def workers(self, *, alive: bool = False) -> list[WorkerInfo]:
        data = self.request("GET", "/v1/workers", params={"alive": alive})
        return WorkerList.model_validate(data).workers

    # -- figures -----------------------------------------------------------------------------
    def queue_stats(self) -> QueueStats:
        return QueueStats.model_validate(self.request("GET", "/v1/stats/queues"))

    def throughput(self, *, window: float = 3600, bucket: float = 60) -> Throughput:
        data = self.request(
            "GET", "/v1/stats/throughput", params={"window": window, "bucket": bucket}
        )
        return Throughput.model_validate(data)

    def worker_activity(self, *, window: float = 300) -> WorkerActivityList:
        data = self.request("GET", "/v1/stats/workers", params={"window": window})
        return WorkerActivityList.model_validate(data)

    def whoami(self) -> TokenInfo:
        """The record of this client's own token (any scope)."""
        return TokenInfo.model_validate(self.request("GET", "/v1/tokens/self"))

    # -- blobs --------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        response = self._send("HEAD", f"/v1/blobs/{digest}")
        if response.status_code == 404:
            return False
        self._raise_for(response, "HEAD", f"/v1/blobs/{digest}")
        return True

    def put_blob(self, path: Path) -> str:
        """Upload a file (once: its content address is its SHA-256) and return its digest.

        Streamed from disk; retried a few times when the connection drops (the same bytes
        under the same name: an upload is idempotent)."""
        digest = file_digest(path)
        if self.has_blob(digest):
            return digest
        for attempt in Retrying(
            retry=retry_if_exception_type(GatewayUnavailable),
            stop=stop_after_attempt(4),
            wait=wait_exponential(multiplier=0.5, max=5),
            reraise=True,
        ):
            with attempt, path.open("rb") as handle:
                self.request(
                    "PUT",
                    f"/v1/blobs/{digest}",
                    content=handle,
                    headers={"content-type": "application/octet-stream"},
                    timeout=max(60.0, path.stat().st_size / 1e6),
                )
        return digest

    def fetch_blob(self, digest: str, target: Path) -> Path:
        """Download a blob to ``target`` (through a temporary file), checking its digest."""
        target.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: two jobs may fetch the same blob at once.
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        sha = hashlib.sha256()
        try:
            with self._http.stream("GET", f"/v1/blobs/{digest}", timeout=300) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response, "GET", f"/v1/blobs/{digest}")
                with tmp.open("wb") as out:
                    for chunk in response.iter_bytes(1024 * 1024):
                        sha.update(chunk)
                        out.write(chunk)
            if sha.hexdigest() != digest:
                raise GatewayError(f"blob {digest} arrived as {sha.hexdigest()}: refetch it")
            tmp.replace(target)
        except BaseException as exc:  # a lost connection, a bad digest, a full disk
            tmp.unlink(missing_ok=True)  # no half file stays behind
            if isinstance(exc, httpx.TransportError):
                raise GatewayUnavailable(f"cannot fetch blob {digest}: {exc}") from exc
            raise
        return target

    # -- tokens and housekeeping ---------------------------------------------------------------
    def create_token(
        self, name: str, scope: Scope, *, expires_in_s: float | None = None
    ) -> TokenCreated:
        body = TokenRequest(name=name, scope=scope, expires_in_s=expires_in_s)
        data = self.request("POST", "/v1/tokens", json=body.model_dump(exclude_none=True))
        return TokenCreated.model_validate(data)

    def list_tokens(self) -> list[TokenInfo]:
        return TokenList.model_validate(self.request("GET", "/v1/tokens")).tokens

    def revoke_token(self, token_id: str, *, force: bool = False) -> TokenInfo:
        params = {"force": True} if force else None
        return TokenInfo.model_validate(
            self.request("DELETE", f"/v1/tokens/{_segment(token_id)}", params=params)
        )

    def prune(self, older_than_s: float) -> int:
        data = self.request("POST", "/v1/admin/prune", json={"older_than_s": older_than_s})
        return Pruned.model_validate(data).deleted

    # -- worker side -------------------------------------------------------------------------------
    def register(self, caps: Capabilities, worker_id: str | None = None) -> Registered:
        params = {"worker_id": worker_id} if worker_id else None
        data = self.request("POST", "/v1/workers", json=caps.model_dump(mode="json"), params=params)
        return Registered.model_validate(data)

    def lease(self, worker_id: str, *, max_jobs: int, wait: float) -> list[Lease]:
        data = self.request(
            "POST",
            f"/v1/workers/{worker_id}/lease",
            json={"max_jobs": max_jobs, "wait": wait},
            timeout=wait + 30,
        )
        return LeaseResponse.model_validate(data).leases

    def heartbeat(self, worker_id: str, leases: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Extend the leases held; returns the (job id, lease token) pairs to stop."""
        body = {"leases": [{"job_id": j, "lease_token": t} for j, t in leases]}
        data = self.request("POST", f"/v1/workers/{worker_id}/heartbeat", json=body)
        reply = HeartbeatResponse.model_validate(data)
        return [(held.job_id, held.lease_token) for held in reply.lost_leases]

    def report(
        self,
        worker_id: str,
        outcomes: Sequence[Outcome],
        *,
        lease: int = 0,
        wait: float = 0,
    ) -> ReportResponse:
        """Record outcomes and, with ``lease`` > 0, lease up to that many jobs in the same
        round trip (long-polling ``wait`` seconds when none is runnable)."""
        body: dict[str, Any] = {"outcomes": [o.model_dump(mode="json") for o in outcomes]}
        if lease > 0:
            body["lease"] = {"max_jobs": lease, "wait": wait}
        data = self.request("POST", f"/v1/workers/{worker_id}/report", json=body, timeout=wait + 30)
        return ReportResponse.model_validate(data)

    def stream(self, worker_id: str, batch: StreamBatch) -> list[str]:
        """Send a model server's stream events (and engine states); returns the ids of the
        jobs to stop generating."""
        body = batch.model_dump(mode="json", exclude_none=True)
        data = self.request("POST", f"/v1/workers/{worker_id}/streams", json=body)
        return StreamReply.model_validate(data).cancelled

    # -- inference -----------------------------------------------------------------------------
    def models(self) -> ModelList:
        """The models the fleet's model servers serve, and where each is loaded."""
        return ModelList.model_validate(self.request("GET", "/v1/models"))

    def stream_completion(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST an OpenAI request to ``path`` with ``stream: true``; yields its chunks (the
        last one carries the usage). An error sent in the stream raises GatewayError."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        # No read timeout: a request may wait in the queue (the gateway sends keep-alives).
        timeout = httpx.Timeout(30.0, read=None)
        try:
            with connect_sse(self._http, "POST", path, json=body, timeout=timeout) as source:
                response = source.response
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response, "POST", path)
                for event in source.iter_sse():
                    if event.data == "[DONE]":
                        return
                    chunk = json.loads(event.data)
                    if isinstance(chunk.get("error"), dict):
                        raise GatewayError(f"POST {path}: {chunk['error'].get('message')}")
                    yield chunk
        except httpx.TransportError as exc:
            raise GatewayUnavailable(f"lost the stream from {self.gateway}: {exc}") from exc

    def drain(self, worker_id: str) -> None:
        """Say this worker is stopping: its long polls end, it is leased nothing more."""
        self.request("POST", f"/v1/workers/{worker_id}/drain")

    def deregister(self, worker_id: str) -> None:
        self.request("DELETE", f"/v1/workers/{worker_id}")


def _gateway_url(text: str) -> str:
    """The gateway's base URL, checked: an http(s) URL with a host."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        url, reason = None, str(exc)
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"{text!r} is not a gateway URL: give one like http://127.0.0.1:8000 "
            "(--gateway or HOSTGPU_GATEWAY)" + (f" ({reason})" if url is None else "")
        )
    return text.rstrip("/")


def _segment(value: str) -> str:
    """An id as one path segment: what a person typed (``../tokens``) never names another
    route."""
    return quote(value, safe="")
