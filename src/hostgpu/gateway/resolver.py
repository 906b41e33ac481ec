"""A job's effective options: the function's published declaration, narrowed by the submission.

At submit time the declaration usually is known (workers publish their functions when they
register) and the job is stored resolved. A job submitted before any worker published its
function is stored pending; it is settled when a declaration arrives — right after a
worker registers, and once a second by every gateway, so a registration seen by one gateway
settles jobs submitted through another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from hostgpu.capabilities import Capabilities
from hostgpu.errors import InputNotUploaded, InvalidInput, NotPublished, OptionsConflict
from hostgpu.functions import FunctionOptions, Requested, Resolved, not_published_message, resolve
from hostgpu.inference.jobs import INFERENCE_FUNCTION
from hostgpu.jobs import JobError, JobSpec
from hostgpu.store import NewJob, Store

log = logging.getLogger("hostgpu.gateway")


def _publishers(workers: Sequence[Capabilities], module: str) -> list[Capabilities]:
    """Workers that import ``module`` and have published their functions (a worker that
    just registered publishes them a moment later, once its first child has imported them)."""
    return [w for w in workers if module in w.modules and w.functions]


def requested(spec: JobSpec) -> Requested:
    """The options a submission states: its fields of the same names."""
    return Requested.model_validate(spec, from_attributes=True)


class Resolver:
    """Turns submissions into storable jobs; settles pending ones. Caches declarations for
    ``ttl`` seconds (a re-registered worker's new options apply within that time)."""

    def __init__(self, store: Store, ttl: float = 1.0) -> None:
        self.store = store
        self.ttl = ttl
        self._cache: dict[str, tuple[float, FunctionOptions | None]] = {}
        #: Whether this gateway stored a job waiting for its declaration: housekeeping then
        #: looks for pending jobs every second instead of twice a minute.
        self.pending_hint = False

    def declarations(self, names: Sequence[str]) -> dict[str, FunctionOptions]:
        now = time.monotonic()
        missing = [n for n in set(names) if self._stale(n, now)]
        found: dict[str, FunctionOptions] = {}
        if missing:
            found = self.store.declarations(missing)
            for name in missing:
                self._cache[name] = (now, found.get(name))
        out: dict[str, FunctionOptions] = {}
        for name in names:
            entry = self._cache.get(name)  # (another thread may forget a name meanwhile)
            declared = entry[1] if entry is not None else found.get(name)
            if declared is not None:
                out[name] = declared
        return out

    def fresh(self, names: Sequence[str]) -> dict[str, FunctionOptions] | None:
        """The declarations of ``names`` from the cache when every one is fresh, else None:
        with them, :meth:`new_jobs` for specs without inputs reads nothing from the store
        (the event loop may call it)."""
        now = time.monotonic()
        if any(self._stale(name, now) for name in names):
            return None
        # (.get: another thread may forget a name meanwhile)
        return {n: d for n in names if (d := self._cache.get(n, (0.0, None))[1]) is not None}

    def _stale(self, name: str, now: float) -> bool:
        return now - self._cache.get(name, (-1e9, None))[0] > self.ttl

    def forget(self, names: Sequence[str]) -> None:
        for name in names:
            self._cache.pop(name, None)

    def new_jobs(
        self,
        specs: Sequence[JobSpec],
        workers: Sequence[Capabilities],
        *,
        inference: bool = False,
        declared: Mapping[str, FunctionOptions] | None = None,
    ) -> list[NewJob]:
        """Storable jobs for ``specs`` (OptionsConflict or NotPublished: a 422 for the caller).

        Inference jobs come only from the inference routes (``inference``), which hold them to
        the ``infer`` scope and its limits; a ``submit`` token cannot queue one."""
        if not inference and any(s.function == INFERENCE_FUNCTION for s in specs):
            raise InvalidInput(
                f"{INFERENCE_FUNCTION} runs only through POST /v1/chat/completions and "
                "/v1/completions (a token of scope infer)"
            )
        if declared is None:  # (given: from the cache, by a caller that must not wait)
            declared = self.declarations([s.function for s in specs])
        jobs = []
        for spec in specs:
            asked = requested(spec)
            declaration = declared.get(spec.function)
            if declaration is None:
                importers = _publishers(workers, spec.module)
                if importers:
                    prefix = f"{spec.module}:"
                    others = sorted(
                        {f for w in importers for f in w.functions if f.startswith(prefix)}
                    )
                    raise NotPublished(
                        not_published_message(spec.function)
                        + f" (the workers that import {spec.module} publish: "
                        + (", ".join(others) or "nothing")
                        + "; restart them if the function is new)"
                    )
            options = resolve(spec.function, declaration, asked)
            for digest in spec.inputs or []:
                if self.store.blob_info(digest) is None:
                    raise InputNotUploaded(
                        f"input {digest} is not uploaded: PUT /v1/blobs/{digest} first "
                        "(`hostgpu ingest` does this for you; from Python, Client.put_blob)"
                    )
            self.pending_hint |= declaration is None
            jobs.append(
                NewJob(
                    function=spec.function,
                    payload=spec.payload,
                    options=options,
                    requested=asked,
                    resolved=declaration is not None,
                    idempotency_key=spec.idempotency_key,
                    inputs=tuple(spec.inputs or ()),
                )
            )
        return jobs

    def settle_pending(self, workers: Sequence[Capabilities] = ()) -> int:
        """Resolve (or reject) pending jobs whose function now has a declaration."""
        pending = self.store.pending()
        if not pending:
            self.pending_hint = False
            return 0
        self.forget([p.function for p in pending])
        declared = self.declarations([p.function for p in pending])
        settled: list[tuple[str, Resolved | JobError]] = []
        for job in pending:
            declaration = declared.get(job.function)
            module = job.function.partition(":")[0]
            if declaration is None:
                if _publishers(workers, module):
                    error = JobError(
                        type="NotPublished",
                        message=not_published_message(job.function),
                        kind="forbidden",
                    )
                    settled.append((job.job_id, error))
                continue
            try:
                settled.append((job.job_id, resolve(job.function, declaration, job.requested)))
            except OptionsConflict as exc:
                error = JobError(type="OptionsConflict", message=str(exc), kind="conflict")
                settled.append((job.job_id, error))
        if not settled:
            return 0
        count = self.store.resolve(settled)
        if count:
            log.info("settled %d pending job(s) from published declarations", count)
        return count
