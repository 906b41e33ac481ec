"""The document pipeline as jobs: what `hostgpu ingest`, `search`, `demo` and uploads submit.

The pipeline functions are published where they are defined (``ingest_file`` in
:mod:`hostgpu.pipelines.ingest`, ``search`` in :mod:`hostgpu.pipelines.search`); their
options are the workers' declarations. This module has the client-side helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hostgpu.client import Client
from hostgpu.errors import PipelineError
from hostgpu.jobs import JobSpec, Payload, as_text, digest_key
from hostgpu.pipelines.ingest import SAMPLES, discover, ingest_file, ingest_upload
from hostgpu.pipelines.search import search


def ingest_spec(path: Path, *, source: str = "cli") -> JobSpec:
    """One file's ingest job; the idempotency key folds identical submissions together."""
    resolved = path.resolve()
    if (name := as_text(str(resolved))) != str(resolved):
        raise PipelineError(
            f"{name}: the name is not UTF-8, so it cannot travel as a path: rename the file, "
            "or ingest it without --by-path (its content is uploaded)"
        )
    stat = resolved.stat()
    return JobSpec(
        function=ingest_file.path,
        payload=Payload(args=[str(resolved)], kwargs={"display_path": str(resolved)}),
        idempotency_key=digest_key(f"ingest:{source}", resolved, stat.st_size, stat.st_mtime_ns),
    )


def upload_spec(client: Client, path: Path) -> JobSpec:
    """Upload a file to the gateway (once per content) and describe the job that ingests it:
    the worker needs no access to this machine's disk."""
    resolved = path.resolve()
    digest = client.put_blob(resolved)
    return JobSpec(
        function=ingest_upload.path,
        payload=Payload(args=[digest], kwargs={"display_path": as_text(str(resolved))}),
        inputs=[digest],
        idempotency_key=digest_key("ingest:upload", digest, resolved),
    )


def sample_paths() -> list[Path]:
    return discover([SAMPLES])


def ingest_paths(paths: Sequence[Path], *, progress: bool = True) -> list[Any]:
    """Ingest files as jobs, one per file; each result is a summary dict or the exception."""
    return ingest_file.map(
        [str(p.resolve()) for p in paths], progress=progress, return_exceptions=True, batch_size=100
    )


def run_search(query: str, k: int = 5) -> list[dict[str, Any]]:
    """Search on a worker, where the embedding model is already loaded."""
    return search.remote(query, k)


__all__ = ["ingest_paths", "ingest_spec", "run_search", "sample_paths", "upload_spec"]
