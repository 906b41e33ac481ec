"""The ``search`` pipeline: embed a query with the ingest model and return the best pages.

Only records of a file's committed generation are returned (see
:mod:`hostgpu.pipelines.chroma`), so a file being re-ingested, or one whose ingest crashed,
never shows half its pages or two versions of a page. A file's several chunks on one page
count once (the best chunk).
"""

from __future__ import annotations

import time
from typing import Any

from hostgpu.sdk import function
from hostgpu.settings import get_settings

SNIPPET_CHARS = 200


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """``text`` on one line, cut at a word boundary near ``limit`` characters."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0]
    return cut + "…"


def _query(collection: Any, vector: list[float], k: int, label: str) -> list[dict[str, Any]]:
    from hostgpu.pipelines import chroma

    total = collection.count()
    if total == 0:
        return []
    n = min(total, k * 3 + 10)
    while True:
        result = collection.query(
            query_embeddings=[vector],
            n_results=n,
            include=["metadatas", "documents", "distances"],
        )
        ids = result["ids"][0]
        metadatas = (result.get("metadatas") or [[]])[0] or []
        documents = (result.get("documents") or [[]])[0] or [None] * len(ids)
        distances = (result.get("distances") or [[]])[0] or []
        keys = [str((m or {}).get("file_key", "")) for m in metadatas]
        committed = chroma.committed_generations([k_ for k_ in keys if k_])
        hits: list[dict[str, Any]] = []
        seen: set[tuple[str, int]] = set()
        for meta, doc, dist in zip(metadatas, documents, distances, strict=False):
            meta = meta or {}
            fkey = str(meta.get("file_key", ""))
            if committed.get(fkey) != meta.get("generation"):
                continue  # an uncommitted or stale generation
            page = int(meta.get("page", 0))
            if (fkey, page) in seen:
                continue
            seen.add((fkey, page))
            hits.append(
                {
                    "file": meta.get("path"),
                    "page": page,
                    "score": round(1.0 - float(dist), 4),
                    "snippet": snippet(doc or ""),
                    "kind": meta.get("kind"),
                    "embedding": label,
                    "model": meta.get("model"),
                    "device": meta.get("device"),
                }
            )
        if len(hits) >= k or n >= total:
            return hits[:k]
        n = min(total, n * 4)


# A person waits on a search: it runs before queued ingest jobs (priority 0), not after a
# backlog of thousands of them.
@function(gpu=get_settings().ingest_gpu, timeout=120, retries=1, warm=True, priority=10)
def search(query: str, k: int = 5, *, visual: bool | None = None) -> list[dict[str, Any]]:
    """The ``k`` best pages for ``query``, best first.

    Each hit: file, page, score (1 - cosine distance), snippet (~200 characters), kind
    (pdf/image/text), embedding (text/visual), model and device (that embedded the page).
    With a visual model configured (``MODEL_NAME``) and ``visual`` not False, page-image
    hits are searched too and listed after the text hits (CLIP and text-model scores are
    not on one scale, so they are not interleaved).
    """
    from hostgpu.errors import PipelineError
    from hostgpu.pipelines import chroma, embed

    if not query.strip():
        return []
    settings = get_settings()
    k = max(1, int(k))
    device = embed.resolve_device()
    precision, _ = embed.resolve_precision(device, settings.model_precision)
    hits: list[dict[str, Any]] = []
    text_label = embed.text_model_label(settings.text_model)
    collection = chroma.get_collection(settings.chroma_collection, create=False)
    if collection is not None:
        existing = (collection.metadata or {}).get("hostgpu_model")
        if existing and existing != text_label:
            raise PipelineError(
                f"collection {settings.chroma_collection!r} was built with {existing!r}, "
                f"but the configured text model is {text_label!r}: search with the model "
                "that ingested it, or set HOSTGPU_CHROMA_COLLECTION"
            )
        model, _ = embed.get_text_model(settings.text_model, device, precision)
        vector = embed.embed_texts([query], model=model, batch_size=1)[0]
        hits.extend(_query(collection, vector, k, "text"))
    if settings.model_name and visual is not False:
        vcol = chroma.get_collection(
            settings.chroma_collection + chroma.VISUAL_SUFFIX, create=False
        )
        if vcol is not None:
            vmodel, _ = embed.get_visual_model(settings.model_name, device, precision)
            vvector = embed.embed_texts([query], model=vmodel, batch_size=1)[0]
            hits.extend(_query(vcol, vvector, k, "visual"))
    return hits


def timed_search(query: str, k: int = 5) -> dict[str, Any]:
    """:func:`search` with its duration, JSON-able (for the CLI's ``--json`` and jobs)."""
    started = time.perf_counter()
    hits = search(query, k)
    return {"query": query, "hits": hits, "seconds": round(time.perf_counter() - started, 4)}
