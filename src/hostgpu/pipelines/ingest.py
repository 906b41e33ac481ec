"""The ``ingest`` pipeline: one file → pages → embeddings → ChromaDB (one job per file).

:func:`ingest_file` is a plain function; the worker runs it as a job. It returns a JSON-able
summary with the device, precision and timings (``load_model_s`` is 0.0 when the model was
already warm in this process). Bad input raises :class:`~hostgpu.errors.PipelineError` with a
readable message, before anything is written: a file lands whole or not at all (see
:mod:`hostgpu.pipelines.chroma`).

Limits (settings): ``HOSTGPU_MAX_PAGES`` (PDF pages per file, default 500),
``HOSTGPU_MAX_PIXELS`` (image pixels, default 50 million), ``HOSTGPU_MAX_TEXT_BYTES`` (text
file size, default 20 MB). See :mod:`hostgpu.pipelines.documents` for what each does.

A job names a file by path, so the worker reads only inside the folders it was told to
(``HOSTGPU_INGEST_ROOTS``, the upload root, the bundled samples): a ``submit`` token must not
be able to index ``/etc/passwd`` or the worker's own token file and search it back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostgpu.errors import PipelineError
from hostgpu.pipelines.documents import (
    SUPPORTED_SUFFIXES,
    InputLimits,
    Page,
    chunk_text,
    iter_rendered,
    load_pages,
)
from hostgpu.sdk import function
from hostgpu.settings import Settings, get_settings

CHUNKER_VERSION = "chunk-v1"
#: Documents shipped with hostgpu (the demo's); always readable.
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def limits() -> InputLimits:
    """The input limits in force (from the settings)."""
    settings = get_settings()
    return InputLimits(settings.max_pages, settings.max_pixels, settings.max_text_bytes)


def readable_roots() -> list[Path]:
    """The folders an ingest job may read on this worker: HOSTGPU_INGEST_ROOTS, the upload
    root, the folder of fetched job inputs, and the bundled samples (always last)."""
    from hostgpu.context import inputs_dir

    fetched = [found.resolve()] if (found := inputs_dir()) else []
    return [*get_settings().allowed_ingest_roots, *fetched, SAMPLES]


def checked_source(path: str) -> Path:
    """``path`` resolved (symlinks followed), refused unless it lies in a readable root."""
    try:
        real = Path(path).expanduser().resolve()
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path!r}: not a usable path ({exc})") from None
    roots = readable_roots()
    if not any(real.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots[:-1]) or "none configured"
        raise PipelineError(
            f"{path} is outside the folders this worker may read ({shown}; and the bundled "
            "samples): `hostgpu ingest` uploads files to the gateway instead, or add the folder "
            "to HOSTGPU_INGEST_ROOTS on the worker"
        )
    return real


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def discover(paths: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """The supported files named by ``paths``, in a stable order.

    A folder expands to its supported files (all levels below with ``recursive``); hidden
    files and folders (a name starting with ".") are skipped inside folders. A file named
    directly is kept whatever its type, so that its job says why it is refused. A path that
    does not exist raises PipelineError.
    """
    found: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            found.append(path)

    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for child in sorted(path.glob(pattern)):
                relative = child.relative_to(path)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if child.is_file() and child.suffix.lower() in SUPPORTED_SUFFIXES:
                    add(child)
        elif path.is_file():
            add(path)
        elif path.exists():  # reading a pipe would wait for a writer, for ever
            raise PipelineError(f"{raw}: not a regular file (a pipe, socket or device)")
        else:
            raise PipelineError(f"{raw}: no such file or folder")
    return found


@dataclass
class _Timings:
    """Seconds each stage took (``load_model_s`` is 0.0 when the models were warm)."""

    load_model_s: float = 0.0
    read_s: float = 0.0
    embed_s: float = 0.0
    store_s: float = 0.0

    def summary(self, started: float) -> dict[str, float]:
        stages = {name: round(value, 4) for name, value in dataclasses.asdict(self).items()}
        return {**stages, "total_s": round(time.perf_counter() - started, 4)}


@dataclass
class _Document:
    """What reading a file gave: its pages, their text in chunks, its digest."""

    source: Path
    kind: str
    pages: list[Page]
    content_sha: str
    chunks: list[tuple[int, int, str]]  # (page, chunk index, text)
    notes: list[str]


@function(gpu=get_settings().ingest_gpu, timeout=3600, retries=1, warm=True)
def ingest_file(path: str, *, display_path: str | None = None) -> dict[str, Any]:
    """Ingest one file (inside the worker's readable roots); return a JSON-able summary.

    Bad input is not retried (PipelineError is not retryable); a crash or timeout is, once.

    ``display_path`` is the name stored and shown by search (and the file's identity for
    replacement); by default the absolute path. Re-ingesting the same path replaces its
    records: unchanged content rewrites identical records, changed content replaces them.
    """
    from hostgpu.pipelines import embed

    started = time.perf_counter()
    settings = get_settings()
    source = checked_source(path)
    shown = display_path or str(source.resolve())
    device = embed.resolve_device()
    precision, note = embed.resolve_precision(device, settings.model_precision)
    text_label = embed.text_model_label(settings.text_model)
    timings = _Timings()

    document = _read(source, settings, timings)  # bad input is refused here, before models
    text_vectors = _embed_text(document, settings, device, precision, timings)
    visual = _embed_page_images(document, settings, device, precision, timings)
    key, generation = _store(
        document, shown, text_label, text_vectors, visual, settings, device, timings
    )
    return {
        "file": shown,
        "file_id": key,
        "content_sha256": document.content_sha,
        "generation": generation,
        "kind": document.kind,
        "pages": len(document.pages),
        "chunks": len(document.chunks),
        "visual_pages": len(visual),
        "model": text_label,
        "visual_model": settings.model_name,
        "device": device,
        "precision": precision,
        "timings": timings.summary(started),
        "notes": [
            *([note] if note else []),
            *document.notes,
            *_unindexed(document, visual, settings.model_name),
        ],
    }


def _read(source: Path, settings: Settings, timings: _Timings) -> _Document:
    """The file's pages (text only: pages are rendered later, a few at a time), their text
    in chunks and the file's digest."""
    t0 = time.perf_counter()
    pages = load_pages(source, dpi=settings.render_dpi, render=False, limits=limits())
    document = _Document(
        source=source,
        kind=pages[0].kind,
        pages=pages,
        content_sha=_sha256_file(source),
        chunks=[
            (page.number, index, text)
            for page in pages
            for index, text in enumerate(chunk_text(page.text) if page.text else [])
        ],
        notes=[note for page in pages for note in page.notes],
    )
    timings.read_s += time.perf_counter() - t0
    return document


def _embed_text(
    document: _Document, settings: Settings, device: str, precision: str, timings: _Timings
) -> list[list[float]]:
    """The chunks' vectors (a file without text loads no model)."""
    from hostgpu.pipelines import embed

    if not document.chunks:
        return []
    model, loaded = embed.get_text_model(settings.text_model, device, precision)
    timings.load_model_s += loaded
    t0 = time.perf_counter()
    vectors = embed.embed_texts(
        [text for _, _, text in document.chunks], model=model, batch_size=settings.batch_size_text
    )
    timings.embed_s += time.perf_counter() - t0
    return vectors


def _embed_page_images(
    document: _Document, settings: Settings, device: str, precision: str, timings: _Timings
) -> list[tuple[int, list[float]]]:
    """(page number, vector) for each page image of a PDF or an image, with a visual model
    (MODEL_NAME); none without one."""
    from hostgpu.pipelines import embed

    if not settings.model_name or document.kind not in {"pdf", "image"}:
        return []
    model, loaded = embed.get_visual_model(settings.model_name, device, precision)
    timings.load_model_s += loaded
    batch_size = settings.batch_size_visual
    rendered = iter_rendered(
        document.source, dpi=settings.render_dpi, batch=batch_size, limits=limits()
    )
    visual: list[tuple[int, list[float]]] = []
    t_render = time.perf_counter()
    for batch in rendered:  # at most BATCH_SIZE_VISUAL rendered pages in memory
        timings.read_s += time.perf_counter() - t_render
        t0 = time.perf_counter()
        vectors = embed.embed_images(
            [image for _, image in batch], model=model, batch_size=batch_size
        )
        timings.embed_s += time.perf_counter() - t0
        visual.extend((number, vec) for (number, _), vec in zip(batch, vectors, strict=True))
        for _, image in batch:
            image.close()
        t_render = time.perf_counter()
    return visual


def _unindexed(
    document: _Document, visual: list[tuple[int, list[float]]], visual_name: str | None
) -> list[str]:
    """Notes on what of the file no search will find."""
    name = document.source.name
    if not document.chunks and not visual:
        if document.kind == "image":
            return [
                f"{name}: an image has no text and no visual model is configured "
                "(MODEL_NAME): nothing was indexed for it"
            ]
        return [f"{name}: no extractable text (scanned?): nothing was indexed"]
    empty = [p.number for p in document.pages if not p.text]
    if visual_name is None and document.kind == "pdf" and empty:
        return [
            f"{name}: {len(empty)} page(s) without text were not indexed "
            "(set MODEL_NAME to a CLIP model to index page images)"
        ]
    return []


def _store(
    document: _Document,
    shown: str,
    text_label: str,
    text_vectors: list[list[float]],
    visual: list[tuple[int, list[float]]],
    settings: Settings,
    device: str,
    timings: _Timings,
) -> tuple[str, str]:
    """Replace the file's records in Chroma, text and page images in one generation (an
    earlier run's visual records go when no visual model is set now); returns the file's
    key and that generation."""
    from hostgpu.pipelines import chroma

    t0 = time.perf_counter()
    visual_name = settings.model_name
    key = chroma.file_key(shown)
    generation = chroma.generation_of(
        document.content_sha,
        text_label,
        visual_name or "",
        settings.render_dpi if visual_name else "",
        CHUNKER_VERSION,
    )
    base = {
        "path": shown,
        "kind": document.kind,
        "device": device,
        "content_sha256": document.content_sha,
    }
    chunks = document.chunks
    ids = [chroma.record_id(key, generation, p, c, "text") for p, c, _ in chunks]
    metadatas = [
        {**base, "page": p, "chunk": c, "embedding": "text", "model": text_label}
        for p, c, _ in chunks
    ]
    collection = chroma.get_collection(settings.chroma_collection, model=text_label)
    extra: list[Any] = []
    visual_collection = None
    visual_collection_name = settings.chroma_collection + chroma.VISUAL_SUFFIX
    if visual_name:
        visual_collection = chroma.get_collection(visual_collection_name, model=visual_name)
        extra.append(
            (
                visual_collection,
                [chroma.record_id(key, generation, n, 0, "visual") for n, _ in visual],
                [vec for _, vec in visual],
                [
                    {**base, "page": n, "chunk": 0, "embedding": "visual", "model": visual_name}
                    for n, _ in visual
                ],
            )
        )
    chroma.replace_file(
        collection,
        key,
        ids,
        text_vectors,
        [text for _, _, text in chunks],
        metadatas,
        generation=generation,
        info={"path": shown, "pages": len(document.pages), "chunks": len(chunks)},
        extra=extra,
    )
    if visual_collection is None:
        # Records of an earlier run with a visual model: invisible now, remove them.
        old = chroma.get_collection(visual_collection_name, create=False)
        if old is not None:
            chroma.delete_stale(old, key, generation)
    timings.store_s += time.perf_counter() - t0
    return key, generation


@function(gpu=get_settings().ingest_gpu, timeout=3600, retries=1)
def ingest_upload(digest: str, *, display_path: str) -> dict[str, Any]:
    """Ingest a file the client uploaded to the gateway (the job's input blob ``digest``);
    ``display_path`` is its name on the client, and its identity for replacement."""
    from hostgpu.context import input_path

    named = _named_blob(input_path(digest), display_path)
    return ingest_file(str(named), display_path=display_path)


def _named_blob(blob: Path, display_path: str) -> Path:
    """The blob under its owner's file name: a hard link in a folder of its own beside it
    (``<digest>.named/latin1.txt``). The file's type is its suffix, and what the job says
    about the file (errors, notes, the iconv command that converts it) names the file that
    was uploaded, not the digest. A name no file system takes gets the digest and the suffix."""
    name = Path(display_path).name
    choices = [blob.with_name(blob.name + ".named") / name] if name not in ("", ".", "..") else []
    choices.append(blob.with_name(blob.name + Path(display_path).suffix.lower()))
    for named in choices:
        if named == blob:
            break
        try:
            named.parent.mkdir(exist_ok=True)
            os.link(blob, named)
        except FileExistsError:  # another child (or an earlier job) linked it first
            pass
        except (OSError, ValueError):  # too long, a NUL, a file system without hard links
            continue
        if named.is_file():
            return named
    return blob
