"""A typed httpx client for the gateway's /v1 API (used by the SDK, the CLI and workers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from hostgpu.capabilities import Capabilities
from hostgpu.errors import (
    AuthError,
    ConfigError,
    GatewayError,
    GatewayUnavailable,
    InvalidTransition,
    NotFound,
)
from hostgpu.jobs import Job, JobSpec, JobState, Lease, Outcome
from hostgpu.settings import Settings, get_settings


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
        self.gateway = (gateway or settings.resolved_gateway()).rstrip("/")
        token = token or settings.resolved_token()
        if not token:
            raise ConfigError(
                "no API token: set HOSTGPU_TOKEN, pass --token, or start a local gateway "
                "with `hostgpu up` (it writes an admin token to HOSTGPU_HOME)"
            )
        self._http = httpx.Client(
            base_url=self.gateway,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------
    def request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> Any:
        if timeout is not None:
            kw["timeout"] = timeout
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise GatewayUnavailable(
                f"cannot reach the gateway at {self.gateway} ({exc.__class__.__name__}: {exc}); "
                "is `hostgpu up` or `hostgpu gateway` running?"
            ) from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            status = response.status_code
            message = f"{method} {path}: {status} {detail}"
            if status in (401, 403):
                raise AuthError(message, status=status)
            if status == 404:
                raise NotFound(message)
            if status == 409:
                raise InvalidTransition(message)
            raise GatewayError(message, status=status)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # -- jobs --------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> Job:
        return Job.model_validate(
            self.request("POST", "/v1/jobs", json=spec.model_dump(mode="json"))
        )

    def submit_batch(self, specs: Sequence[JobSpec]) -> list[str]:
        body = {"jobs": [s.model_dump(mode="json", exclude_defaults=True) for s in specs]}
        return list(self.request("POST", "/v1/jobs/batch", json=body)["ids"])

    def get(self, job_id: str, *, wait: float = 0) -> Job:
        params = {"wait": wait} if wait else None
        data = self.request("GET", f"/v1/jobs/{job_id}", params=params, timeout=wait + 30)
        return Job.model_validate(data)

    def wait(self, job_ids: Sequence[str], *, timeout: float = 10.0) -> list[Job]:
        data = self.request(
            "POST",
            "/v1/jobs/wait",
            json={"ids": list(job_ids), "timeout": timeout},
            timeout=timeout + 30,
        )
        return [Job.model_validate(j) for j in data["jobs"]]

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self.request("POST", f"/v1/jobs/{job_id}/cancel"))

    def list_jobs(self, *, state: JobState | None = None, limit: int = 50) -> list[Job]:
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = state.value
        return [
            Job.model_validate(j) for j in self.request("GET", "/v1/jobs", params=params)["jobs"]
        ]

    def summary(self) -> dict[str, int]:
        return dict(self.request("GET", "/v1/jobs/summary")["counts"])

    def workers(self, *, alive: bool = False) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/workers", params={"alive": alive})["workers"])

    # -- tokens and housekeeping ---------------------------------------------------------------
    def create_token(self, name: str, scope: str) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/tokens", json={"name": name, "scope": scope}))

    def list_tokens(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/tokens")["tokens"])

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/v1/tokens/{token_id}"))

    def prune(self, older_than_s: float) -> int:
        data = self.request("POST", "/v1/admin/prune", json={"older_than_s": older_than_s})
        return int(data["deleted"])

    # -- worker side -------------------------------------------------------------------------------
    def register(self, caps: Capabilities, worker_id: str | None = None) -> dict[str, Any]:
        params = {"worker_id": worker_id} if worker_id else None
        return dict(
            self.request("POST", "/v1/workers", json=caps.model_dump(mode="json"), params=params)
        )

    def lease(self, worker_id: str, *, max_jobs: int, wait: float) -> list[Lease]:
        data = self.request(
            "POST",
            f"/v1/workers/{worker_id}/lease",
            json={"max_jobs": max_jobs, "wait": wait},
            timeout=wait + 30,
        )
        return [Lease.model_validate(x) for x in data["leases"]]

    def heartbeat(self, worker_id: str, leases: Sequence[tuple[str, str]]) -> list[str]:
        body = {"leases": [{"job_id": j, "lease_token": t} for j, t in leases]}
        return list(self.request("POST", f"/v1/workers/{worker_id}/heartbeat", json=body)["lost"])

    def report(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
        body = {"outcomes": [o.model_dump(mode="json") for o in outcomes]}
        return list(self.request("POST", f"/v1/workers/{worker_id}/report", json=body)["results"])

    def deregister(self, worker_id: str) -> None:
        self.request("DELETE", f"/v1/workers/{worker_id}")
