"""Generate the sample documents bundled in ``src/hostgpu/samples/`` (used by ``hostgpu demo``).

Run: ``python scripts/make_samples.py``. Needs fpdf2 (dev extra). The output is deterministic
(fixed creation date), so re-running it changes nothing unless the text below changes.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "hostgpu" / "samples"

DOCS: dict[str, tuple[str, list[tuple[str, list[str]]]]] = {
    "metal-vs-containers.pdf": (
        "Running ML on Apple Metal versus inside containers",
        [
            (
                "Why the GPU disappears in Docker on a Mac",
                [
                    "Docker Desktop on macOS runs every container inside a small Linux virtual "
                    "machine. Apple's Metal framework only exists in macOS itself, so a Linux "
                    "guest has no way to reach the Apple GPU. Inside the container PyTorch "
                    "reports that the mps backend is not available, and a worker that asked "
                    "for device mps quietly falls back to the CPU.",
                    "The slowdown is large: embedding a page with a vision-language retriever "
                    "such as ColPali takes five to ten seconds on the Metal GPU of an M-series "
                    "laptop, and thirty to sixty seconds on its CPU cores inside the VM.",
                ],
            ),
            (
                "The hybrid architecture",
                [
                    "The practical answer is to split the stack. The accelerator worker runs "
                    "natively on the host, where torch.backends.mps.is_available() is true. "
                    "The supporting services, such as the vector database, the upload server "
                    "and the job gateway, keep running in containers.",
                    "Containers reach the host through host.docker.internal, and the native "
                    "worker reaches the containers through published ports. Nothing in the "
                    "application code needs to know which side it runs on.",
                ],
            ),
            (
                "Checking the device honestly",
                [
                    "A worker should refuse to start a job on the wrong device instead of "
                    "falling back silently. Probe the accelerators at start-up, report the "
                    "reason when Metal or CUDA is missing, and only lease jobs whose "
                    "requirements the machine really meets.",
                    "Precision matters too: half precision (fp16) is fast on Metal and CUDA, "
                    "but on a CPU it is slow or unsupported, so the worker should run in "
                    "fp32 there and say so in the job's result.",
                ],
            ),
        ],
    ),
    "vector-databases.pdf": (
        "Vector databases for document search",
        [
            (
                "What a vector database stores",
                [
                    "A vector database keeps embeddings, fixed-length lists of numbers that "
                    "a neural network computes from text or images, together with an id, the "
                    "original document text and metadata such as the file name and page.",
                    "Search turns the query into an embedding with the same model and asks "
                    "for the nearest neighbours by cosine distance. An HNSW graph index makes "
                    "that lookup fast even with millions of vectors.",
                ],
            ),
            (
                "ChromaDB in practice",
                [
                    "ChromaDB runs embedded in the Python process with a persistent folder, "
                    "or as a server that many clients share over HTTP. Collections hold "
                    "records of one dimension; the client limits how many records one call "
                    "may add, so large uploads are split into batches.",
                    "Always pass your own embeddings when the machine is offline: the default "
                    "embedding function downloads a model the first time it is used.",
                ],
            ),
            (
                "Keeping the index consistent",
                [
                    "Stable record ids make ingestion idempotent: re-indexing the same file "
                    "overwrites its records instead of adding duplicates. When a file changes, "
                    "its old pages must be removed, and a reader should never see half of the "
                    "new version mixed with half of the old one.",
                    "A simple way to get all-or-nothing behaviour without transactions is to "
                    "write the new generation first, then switch a single manifest record to "
                    "it, and only then delete the previous generation.",
                ],
            ),
        ],
    ),
    "job-queues-and-leases.pdf": (
        "Job queues, leases and retries",
        [
            (
                "Leases instead of locks",
                [
                    "A worker that takes a job from a queue receives a lease: a token with an "
                    "expiry time. While the job runs, the worker extends the lease with "
                    "heartbeats. When a worker crashes, its heartbeats stop, the lease "
                    "expires and another worker can take the job again.",
                    "Because a job may run twice, completions carry the lease token. The "
                    "queue refuses a completion with a stale token, so every job has exactly "
                    "one recorded result even under at-least-once execution.",
                ],
            ),
            (
                "Retries and backoff",
                [
                    "Transient failures are retried with exponential backoff: wait one "
                    "second, then two, then four, up to a limit. Permanent failures, such as "
                    "a corrupt input file, are not retried; the error message should say "
                    "what is wrong with the input and how to fix it.",
                    "Timeouts are enforced by the worker: a job that runs too long is killed "
                    "and the attempt counts as failed.",
                ],
            ),
            (
                "Warm workers",
                [
                    "Loading a model takes seconds, running it on one input takes "
                    "milliseconds. Workers therefore keep models loaded between jobs of the "
                    "same kind, so only the first job pays the loading time. The job's "
                    "timings should show the load time separately from the compute time.",
                ],
            ),
        ],
    ),
}

MARKDOWN = """# hostgpu sample notes

## Sharing a GPU

A teammate with an NVIDIA workstation can join your gateway with a worker token and serve
embedding jobs for an afternoon, then stop cleanly: running jobs finish, queued ones wait
for the next worker.

## Uploading documents

Files dropped into the upload folder are sent to the gateway by a webhook, which enqueues one
ingest job per file. Each job reports the device that ran it and how long each step took.

## Direct inference

For quick experiments, run a small language model directly on the best local device without
any gateway at all, streaming tokens to the terminal.
"""


def make_pdf(path: Path, title: str, sections: list[tuple[str, list[str]]]) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    pdf.set_title(title)
    pdf.set_author("hostgpu")
    pdf.set_auto_page_break(auto=True, margin=20)
    for number, (heading, paragraphs) in enumerate(sections, start=1):
        pdf.add_page()  # one section per page, so search results point at a page
        if number == 1:
            pdf.set_font("Helvetica", "B", 18)
            pdf.multi_cell(0, 10, title)
            pdf.ln(4)
        pdf.set_font("Helvetica", "B", 14)
        pdf.multi_cell(0, 8, f"{number}. {heading}")
        pdf.ln(2)
        pdf.set_font("Helvetica", size=11)
        for paragraph in paragraphs:
            pdf.multi_cell(0, 6, paragraph)
            pdf.ln(3)
    pdf.output(str(path))


def main(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, (title, sections) in DOCS.items():
        target = out / name
        make_pdf(target, title, sections)
        written.append(target)
    notes = out / "notes.md"
    notes.write_text(MARKDOWN, encoding="utf-8")
    written.append(notes)
    return written


if __name__ == "__main__":
    for written_path in main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(written_path)
