"""The document pipeline as jobs: what `hostgpu ingest`, `search`, `demo` and uploads submit.

The pipeline functions stay plain functions in their modules (the worker imports them
by path); this module gives them their job options and the client-side helpers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hostgpu.errors import JobCancelled, JobFailed
from hostgpu.jobs import JobSpec, Requirements
from hostgpu.pipelines.ingest import discover, ingest_file
from hostgpu.pipelines.search import search
from hostgpu.sdk import Function, Options

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

#: Bad input is not retried (PipelineError is not retryable); a crash or timeout is, once.
ingest = Function(
    ingest_file, Options(gpu=os.environ.get("HOSTGPU_INGEST_GPU", "any"), timeout=3600, retries=1)
)
search_job = Function(
    search, Options(gpu=os.environ.get("HOSTGPU_INGEST_GPU", "any"), timeout=120, retries=1)
)


def ingest_spec(path: Path, *, source: str = "cli") -> JobSpec:
    """One file's ingest job; the idempotency key folds identical submissions together."""
    resolved = path.resolve()
    stat = resolved.stat()
    return JobSpec(
        function=ingest.path,
        payload={"args": [str(resolved)], "kwargs": {"display_path": str(resolved)}},
        requirements=Requirements(gpu=ingest.options.gpu),
        timeout_s=ingest.options.timeout,
        max_retries=ingest.options.retries,
        idempotency_key=f"ingest:{source}:{resolved}:{stat.st_size}:{stat.st_mtime_ns}",
    )


def sample_paths() -> list[Path]:
    return discover([SAMPLES])


def ingest_paths(paths: Sequence[Path], *, progress: bool = True) -> list[Any]:
    """Ingest files as jobs, one per file; each result is a summary dict or the exception."""
    return ingest.map(
        [str(p.resolve()) for p in paths], progress=progress, return_exceptions=True, batch_size=100
    )


def run_search(query: str, k: int = 5) -> list[dict[str, Any]]:
    """Search on a worker, where the embedding model is already loaded."""
    return search_job.remote(query, k)


__all__ = [
    "JobCancelled",
    "JobFailed",
    "ingest",
    "ingest_paths",
    "ingest_spec",
    "run_search",
    "sample_paths",
    "search_job",
]
