"""Webhooks: an upload server tells the gateway a file arrived (scope: submit)."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from hostgpu.gateway.deps import GatewayDep, SubmitToken
from hostgpu.gateway.intake import announce, store_jobs
from hostgpu.jobs import JobSpec, Payload, digest_key

router = APIRouter(prefix="/v1/hooks", tags=["hooks"])

#: The ingest job, by name: the gateway never imports the pipeline (nor torch with it).
INGEST_FUNCTION = "hostgpu.pipelines.ingest:ingest_file"


class UploadEvent(BaseModel):
    model_config = {"extra": "ignore"}  # copyparty sends more fields than we need
    ap: str = Field(min_length=1, max_length=4096, description="Absolute path of the uploaded file")
    sz: int | None = Field(default=None, ge=0)


class Queued(BaseModel):
    job_id: str
    path: str


def _inside(root: Path, path: str) -> tuple[Path, os.stat_result]:
    """The real path of an upload, refused unless it is a file inside the upload root."""
    try:
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = root / candidate
        real = candidate.resolve()  # follows symlinks: a link out of the root is refused too
        inside = real.is_relative_to(root.resolve())
        stat = real.stat() if inside else None
    except ValueError as exc:  # an embedded NUL byte
        raise HTTPException(422, f"invalid path {path!r}: {exc}") from None
    except FileNotFoundError:
        raise HTTPException(404, f"no uploaded file at {path!r}") from None
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES…
        raise HTTPException(422, f"invalid path {path!r}: {exc.strerror}") from None
    if not inside or stat is None:
        raise HTTPException(403, f"{path!r} is outside the upload root")
    if not real.is_file():
        raise HTTPException(404, f"no uploaded file at {path!r}")
    return real, stat


@router.post("/upload", status_code=202, response_model=Queued)
async def upload(
    event: UploadEvent,
    gw: GatewayDep,
    _: SubmitToken,
) -> Queued:
    """Queue an ingest job for a file that landed in the upload folder."""
    if gw.settings.upload_root is None:
        raise HTTPException(409, "uploads are not enabled on this gateway (HOSTGPU_UPLOAD_ROOT)")
    real, stat = _inside(gw.settings.upload_root, event.ap)
    spec = JobSpec(
        function=INGEST_FUNCTION,
        payload=Payload(args=[str(real)], kwargs={"display_path": str(real)}),
        idempotency_key=digest_key("ingest:hook", real, stat.st_size, stat.st_mtime_ns),
    )
    [job] = await store_jobs(gw, [spec])
    announce(gw.notifier, gw.settings, [job])
    return Queued(job_id=job.id, path=str(real))
