"""The document pipeline through a real gateway and worker: `hostgpu ingest` and `search`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Gateway, Worker

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "hostgpu" / "samples"
pytest.importorskip("sentence_transformers")


def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")}
    env.update(
        HOSTGPU_HOME=str(gateway.home),
        HOSTGPU_GATEWAY=gateway.url,
        HOSTGPU_TOKEN=gateway.token,
        COLUMNS="250",
        HF_HUB_OFFLINE="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "hostgpu", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def make_bad_files(folder: Path) -> dict[str, str]:
    """Bad inputs next to good ones; the value is what each one's error must say."""
    good = (SAMPLES / "vector-databases.pdf").read_bytes()
    (folder / "truncated.pdf").write_bytes(good[: len(good) // 3])
    (folder / "garbage.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(2000))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve".encode("latin-1"))
    # Named on the command line (a folder walk skips unsupported types silently).
    (folder.parent / "notes.docx").write_bytes(b"PK\x03\x04not really")
    return {
        "truncated.pdf": "PDF",
        "garbage.pdf": "PDF",
        "empty.txt": "empty",
        "latin1.txt": "UTF-8",
        "notes.docx": "unsupported",
    }


def test_ingest_batch_with_bad_files_then_search(
    gateway: Gateway, worker: Worker, tmp_path: Path
) -> None:
    """From a client folder the worker is told nothing about: the files travel as blobs."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("metal-vs-containers.pdf", "job-queues-and-leases.pdf", "notes.md"):
        (folder / name).write_bytes((SAMPLES / name).read_bytes())
    expected_errors = make_bad_files(folder)

    done = cli(gateway, "ingest", str(folder), str(folder.parent / "notes.docx"), "--wait")
    assert done.returncode == 1, done.stdout + done.stderr  # some files failed
    assert "3 file(s) ingested, 5 failed" in done.stdout, done.stdout

    with gateway.client() as api:
        jobs = api.list_jobs(limit=50).jobs
    by_file = {Path(j.payload.kwargs["display_path"]).name: j for j in jobs}  # type: ignore[union-attr]
    for name, needle in expected_errors.items():
        job = by_file[name]
        assert job.state.value == "failed", (name, job.state)
        assert job.attempts == 1, f"{name}: bad input must not be retried"
        assert job.error is not None and needle.lower() in job.error.message.lower(), name
        assert job.error.type == "PipelineError"
        # The file the user uploaded, not the blob the worker read (its digest).
        assert job.error.message.startswith(f"{name}: "), job.error.message
        assert job.payload.args[0] not in job.error.message  # type: ignore[union-attr]
    loads = sorted(
        by_file[n].result["timings"]["load_model_s"]
        for n in ("metal-vs-containers.pdf", "job-queues-and-leases.pdf", "notes.md")
    )
    assert loads[0] == 0.0 and loads[1] == 0.0, f"the model reloaded between jobs: {loads}"

    found = json.loads(
        cli(
            gateway, "search", "Docker Desktop hides Metal from containers", "-k", "3", "--json"
        ).stdout
    )
    assert Path(found[0]["file"]).name == "metal-vs-containers.pdf"
    assert {Path(hit["file"]).name for hit in found} <= {
        "metal-vs-containers.pdf",
        "job-queues-and-leases.pdf",
        "notes.md",
    }

    # Re-ingesting the same files replaces their pages instead of adding to them.
    before = json.loads(cli(gateway, "search", "lease token fencing", "-k", "50", "--json").stdout)
    again = cli(gateway, "ingest", str(folder / "job-queues-and-leases.pdf"), "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    after = json.loads(cli(gateway, "search", "lease token fencing", "-k", "50", "--json").stdout)
    assert len(after) == len(before)
