"""Ingest throughput: the document pipeline through hostgpu versus a bare script.

    python benchmarks/ingest.py [--files 21] [--pages 10] [--batch-size 32] [--device cpu]
                                [--concurrency 1 2] [--stack]

Generates a corpus of text-bearing PDFs, then in one run:
- bare: the same pages read and embedded in this process, same model, batch and device
  (benchmarks/ingest_bare.py), model loaded before the clock starts; once more with a
  plain Chroma upsert per file, to show what the vector store itself costs;
- hostgpu: a real gateway and worker process (for each ``--concurrency``); one ingest job
  per file through ``.map``, after warm-up jobs (so the model is loaded, as in the bare
  run), Chroma writes with all-or-nothing bookkeeping included.
- with ``--stack``: the hybrid stack (gateway and Chroma server in Docker, worker native;
  benchmarks/ingest_stack.py), by path and uploaded as blobs, target ≥ 0.85 of the embedded
  run at concurrency 1; and the time of `hostgpu stack up`, first and warm.
Prints pages/s and the ratio to the bare read + embed run (target ≥ 0.9 at concurrency 1
on CPU), and the first (cold) job's latency against a later (warm) one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest_bare import bare_ingest
from ingest_stack import engine_problem, through_stack

import hostgpu
from hostgpu.testing import Gateway, Worker

TOPICS = [
    "containers on macOS run inside a Linux virtual machine that cannot reach Metal",
    "a native worker leases jobs from the gateway and reports the device it used",
    "vector databases store embeddings and answer nearest-neighbour queries",
    "lease fencing refuses a completion that carries a stale lease token",
    "sentence embeddings map text to vectors whose cosine similarity tracks meaning",
]


def make_corpus(folder: Path, files: int, pages: int) -> list[Path]:
    from fpdf import FPDF

    paths = []
    for f in range(files):
        pdf = FPDF()
        pdf.set_font("Helvetica", size=11)
        for p in range(pages):
            pdf.add_page()
            topic = TOPICS[(f + p) % len(TOPICS)]
            text = " ".join(
                f"Document {f} page {p} paragraph {k}: {topic}; detail {f * 97 + p * 13 + k}."
                for k in range(12)
            )
            pdf.multi_cell(0, 6, text)
        path = folder / f"doc-{f:03d}.pdf"
        pdf.output(str(path))
        paths.append(path)
    return paths


def through_hostgpu(
    paths: list[Path],
    warmups: list[Path],
    home: Path,
    batch: int,
    device: str,
    concurrency: int = 1,
) -> dict:
    roots = os.pathsep.join(sorted({str(p.parent) for p in [*paths, *warmups]}))
    env = {
        "BATCH_SIZE_TEXT": str(batch),
        "DEVICE": device,
        "HF_HUB_OFFLINE": "1",
        # The corpus is read by path: the worker may read only folders it is told about.
        "HOSTGPU_INGEST_ROOTS": roots,
    }
    gw = Gateway(home, f"sqlite:///{home / 'bench.db'}", env_extra=env).start()
    worker = Worker(gw, concurrency=concurrency, env_extra=env)
    try:
        worker.start()
        from hostgpu.pipelines.ingest import ingest_file as ingest

        hostgpu.connect(gw.url, gw.token)
        t = time.perf_counter()
        ingest.remote(str(warmups[0]))
        cold = time.perf_counter() - t
        # Every child loads the model on its first job: warm the others before the clock
        # (distinct files: one file is never ingested by two jobs at once).
        ingest.map([str(p) for p in warmups[1:concurrency]], progress=False)
        t = time.perf_counter()
        warm_result = ingest.remote(str(paths[0]))
        warm = time.perf_counter() - t
        started = time.perf_counter()
        results = ingest.map([str(p) for p in paths[1:]], progress=False)
        seconds = time.perf_counter() - started
        pages = sum(r["pages"] for r in results)
        return {
            "pages": pages,
            "seconds": seconds,
            "cold": cold,
            "warm": warm,
            "warm_load": warm_result["timings"]["load_model_s"],
        }
    finally:
        worker.stop()
        gw.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=21)
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1],
        help="worker concurrencies to run (1 is the like-for-like comparison)",
    )
    parser.add_argument(
        "--stack",
        action="store_true",
        help="add the hybrid stack (needs a Docker engine; BASE_IMAGE for the builds)",
    )
    args = parser.parse_args(argv)
    console = Console()
    if args.stack and (problem := engine_problem()) is not None:
        console.print(f"[red]--stack needs a Docker engine[/]:\n{problem}")
        return 2
    if args.stack and 1 not in args.concurrency:
        args.concurrency = [1, *args.concurrency]  # the stack's row is compared with ×1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_corpus(folder, args.files, args.pages)
        (folder / "warm").mkdir()
        warmups = make_corpus(folder / "warm", max(args.concurrency), 2)
        measured = paths[1:]
        console.print(f"corpus: {len(measured)} files × {args.pages} pages; bare run…")
        bare_pages, bare_1 = bare_ingest(measured, args.batch_size, args.device)
        _, bare_chroma = bare_ingest(
            measured, args.batch_size, args.device, store_dir=folder / "bare-chroma"
        )
        runs = []
        for n in args.concurrency:
            console.print(f"hostgpu run, worker concurrency {n}…")
            home = folder / f"home-{n}"
            home.mkdir()
            runs.append((n, through_hostgpu(paths, warmups, home, args.batch_size, args.device, n)))
        stack = None
        if args.stack:
            console.print("hybrid stack: stack up, ingest by path and by upload, stack down…")
            stack = through_stack(paths, warmups, folder, args.batch_size, args.device)
        console.print("bare run again…")
        _, bare_2 = bare_ingest(measured, args.batch_size, args.device)
    bare_seconds = (bare_1 + bare_2) / 2
    bare_rate = bare_pages / bare_seconds
    table = Table(title=f"ingest: {bare_pages} PDF pages, batch {args.batch_size}, {args.device}")
    for col in ("path", "pages", "seconds", "pages/s", "ratio to bare"):
        table.add_column(col, justify="right")
    table.add_row(
        "bare script: read + embed (mean of 2)",
        str(bare_pages),
        f"{bare_seconds:.2f}",
        f"{bare_rate:.1f}",
        "1.00",
    )
    table.add_row(
        "bare script: read + embed + Chroma upsert",
        str(bare_pages),
        f"{bare_chroma:.2f}",
        f"{bare_pages / bare_chroma:.1f}",
        f"{bare_seconds / bare_chroma:.2f}",
    )
    for n, hg in runs:
        hg_rate = hg["pages"] / hg["seconds"]
        target = " (target ≥ 0.90)" if n == 1 else ""
        table.add_row(
            f"hostgpu gateway + worker ×{n}, Chroma included",
            str(hg["pages"]),
            f"{hg['seconds']:.2f}",
            f"{hg_rate:.1f}",
            f"{hg_rate / bare_rate:.2f}{target}",
        )
    if stack is not None:
        embedded = next(hg["pages"] / hg["seconds"] for n, hg in runs if n == 1)
        for label, key in (("by path", "path"), ("uploaded as blobs", "blob")):
            pages, seconds = stack[key]
            rate = pages / seconds
            table.add_row(
                f"hybrid stack (gateway + Chroma in Docker, worker native ×1), {label}",
                str(pages),
                f"{seconds:.2f}",
                f"{rate:.1f}",
                f"{rate / bare_rate:.2f} ({rate / embedded:.2f} of embedded ×1; target ≥ 0.85)",
            )
    console.print(table)
    if stack is not None:
        images = "cached layers" if stack["images_cached"] else "images built"
        console.print(
            f"hostgpu stack up: first {stack['up_first']:.1f} s ({images}), "
            f"warm {stack['up_warm']:.1f} s (--no-build, images present)"
        )
    hg = next(hg for n, hg in runs if n == 1)
    latency = Table(title="one-file job latency (submit → result)")
    latency.add_column("job")
    latency.add_column("seconds", justify="right")
    latency.add_row("first job on a fresh worker (cold: model load)", f"{hg['cold']:.2f}")
    latency.add_row(
        f"later job, {args.pages} pages (warm, load_model_s={hg['warm_load']:.2f})",
        f"{hg['warm']:.2f}",
    )
    console.print(latency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
