"""Blobs: files a job needs, for workers that do not share the client's disk (scope: submit to
upload and check, worker to download).

``PUT /v1/blobs/{digest}`` streams the request body to a spool file while hashing it (memory
stays flat whatever the size), then hands it to the store, which keeps it only if its bytes
hash to the digest. Uploading the same bytes twice is free: ``HEAD`` says whether a blob is
there, and a repeated ``PUT`` answers at once.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from hostgpu.gateway.deps import GatewayDep, ReaderOrWorker, SubmitToken, run
from hostgpu.requirements import DIGEST_PATTERN
from hostgpu.store.interface import BlobInfo

router = APIRouter(prefix="/v1/blobs", tags=["blobs"])
Digest = Annotated[str, Path(pattern=DIGEST_PATTERN, description="hex SHA-256 of the bytes")]
SPOOL_IN_MEMORY = 8 * 1024 * 1024


class Blob(BaseModel):
    digest: str
    size: int = Field(description="bytes")
    created_at: float = Field(description="UNIX time it arrived")

    @classmethod
    def of(cls, info: BlobInfo) -> Blob:
        return cls(digest=info.digest, size=info.size, created_at=info.created_at)


@router.put("/{digest}", status_code=201, response_model=Blob)
async def upload(
    digest: Digest,
    request: Request,
    response: Response,
    gw: GatewayDep,
    _: SubmitToken,
) -> Blob:
    """Upload a blob (the raw bytes as the body); 200 when it was already there."""
    known = await run(gw.store.blob_info, digest)
    if known is not None:
        response.status_code = 200
        return Blob.of(known)
    limit = gw.settings.max_blob_bytes
    sha = hashlib.sha256()
    size = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(
                    413,
                    f"blob over the limit of {limit} bytes (HOSTGPU_MAX_BLOB_BYTES)",
                )
            sha.update(chunk)
            await run(spool.write, chunk)
        if sha.hexdigest() != digest:
            raise HTTPException(
                422,
                f"the body hashes to {sha.hexdigest()}, not {digest}: the upload was cut short "
                "or the digest is wrong; upload again",
            )
        spool.seek(0)
        info = await run(gw.store.put_blob, digest, spool)
    return Blob.of(info)


@router.head("/{digest}", responses={404: {"description": "No such blob: upload it"}})
async def exists(digest: Digest, gw: GatewayDep, _: SubmitToken) -> Response:
    """Whether the blob is there (its size in Content-Length)."""
    info = await run(gw.store.blob_info, digest)
    if info is None:
        return Response(status_code=404)
    return Response(headers={"content-length": str(info.size)})


@router.get("/{digest}", response_class=StreamingResponse)
async def download(digest: Digest, gw: GatewayDep, _: ReaderOrWorker) -> StreamingResponse:
    """The blob's bytes (workers fetch a job's inputs here)."""
    info = await run(gw.store.blob_info, digest)
    if info is None:
        raise HTTPException(404, f"no blob {digest}")
    chunks = gw.store.read_blob(digest)

    async def body() -> AsyncIterator[bytes]:
        while True:
            chunk = await run(next, chunks, None)
            if chunk is None:
                return
            yield chunk

    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"content-length": str(info.size), "etag": f'"{digest}"'},
    )
