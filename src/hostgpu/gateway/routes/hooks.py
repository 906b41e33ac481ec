"""Webhooks: an upload server tells the gateway a file arrived (scope: submit)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from hostgpu.gateway.deps import NotifierDep, SettingsDep, StoreDep, SubmitToken, run

router = APIRouter(prefix="/v1/hooks", tags=["hooks"])


class UploadEvent(BaseModel):
    model_config = {"extra": "ignore"}  # copyparty sends more fields than we need
    ap: str = Field(max_length=4096, description="Absolute path of the uploaded file")
    sz: int | None = Field(default=None, ge=0)


class Queued(BaseModel):
    job_id: str
    path: str


def _inside(root: Path, path: str) -> Path:
    """The real path of an upload, refused unless it lies inside the upload root."""
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = candidate.resolve()  # follows symlinks: a link out of the root is refused too
    if not real.is_relative_to(root.resolve()):
        raise HTTPException(403, f"{path!r} is outside the upload root")
    if not real.is_file():
        raise HTTPException(404, f"no uploaded file at {path!r}")
    return real


@router.post("/upload", status_code=202, response_model=Queued)
async def upload(
    event: UploadEvent,
    store: StoreDep,
    settings: SettingsDep,
    notifier: NotifierDep,
    _: SubmitToken,
) -> Queued:
    """Queue an ingest job for a file that landed in the upload folder."""
    if settings.upload_root is None:
        raise HTTPException(409, "uploads are not enabled on this gateway (HOSTGPU_UPLOAD_ROOT)")
    real = _inside(settings.upload_root, event.ap)
    try:
        from hostgpu.pipelines.jobs import ingest_spec
    except ImportError:
        raise HTTPException(
            409, "this gateway lacks the ml extra needed to describe ingest jobs"
        ) from None
    [job] = await run(store.enqueue, [ingest_spec(real, source="upload")])
    notifier.notify("enqueued")
    return Queued(job_id=job.id, path=str(real))
