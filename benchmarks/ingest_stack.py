"""`benchmarks/ingest.py --stack`: the same pages through the hybrid stack.

The gateway and the Chroma server run in Docker (`hostgpu stack up`, the real compose file),
the worker natively on this host, exactly as a user runs it. Two ways in:
- by path (`ingest_file.map`, as the embedded run does): what the containers cost;
- uploaded as blobs (what `hostgpu ingest` does, for a worker that does not share the
  client's disk): the upload included in the time.

Needs a Docker engine (here: ``../shared/docker/engine up`` and its env file sourced, which
sets BASE_IMAGE to the local Python image). Also times `stack up`: the first one (images
built, or cached layers when an earlier run built them) and a second, warm one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import hostgpu
from hostgpu.client import Client
from hostgpu.jobs import JobState
from hostgpu.pipelines.jobs import upload_spec
from hostgpu.processes import free_port, hostgpu_command
from hostgpu.stack.docker import check_docker, explain

IMAGES = ("hostgpu/gateway:local", "hostgpu/chroma:local", "hostgpu/copyparty:local")


def engine_problem() -> str | None:
    """Why the stack cannot run here (None when a usable engine answers)."""
    report = check_docker()
    return None if report.ok else explain(report)


def _images_present() -> bool:
    done = subprocess.run(["docker", "image", "inspect", *IMAGES], capture_output=True, check=False)
    return done.returncode == 0


class _Stack:
    def __init__(self, folder: Path, env_extra: dict[str, str]) -> None:
        self.home = folder / "stack-home"
        self.ports = {"gateway": free_port(), "chroma": free_port(), "uploads": free_port()}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")}
        self.env.update(
            HOSTGPU_HOME=str(self.home),
            HOSTGPU_STACK_GATEWAY_PORT=str(self.ports["gateway"]),
            HOSTGPU_STACK_CHROMA_PORT=str(self.ports["chroma"]),
            HOSTGPU_STACK_UPLOADS_PORT=str(self.ports["uploads"]),
            **env_extra,
        )
        self.inbox = folder / "stack-inbox"

    def run(self, *args: str, timeout: float = 1800) -> float:
        started = time.perf_counter()
        done = subprocess.run(
            hostgpu_command("stack", *args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"hostgpu stack {' '.join(args)}:\n{done.stdout}\n{done.stderr}")
        return time.perf_counter() - started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def admin(self) -> str:
        return (self.home / "stack/gateway/admin-token").read_text().strip()


def _wait_all(client: Client, ids: list[str]) -> list[Any]:
    pending, results = set(ids), []
    while pending:
        for job in client.wait(sorted(pending)[:1000], timeout=10):
            if job.state.terminal:
                if job.state != JobState.succeeded:
                    raise RuntimeError(f"ingest job {job.id} {job.state.value}: {job.error}")
                pending.discard(job.id)
                results.append(job.result)
    return results


def through_stack(
    paths: list[Path], warmups: list[Path], folder: Path, batch: int, device: str
) -> dict[str, Any]:
    """Times of the stack: `up` cold and warm, and both ingest paths (pages, seconds)."""
    roots = os.pathsep.join(sorted({str(p.parent) for p in [*paths, *warmups]}))
    stack = _Stack(
        folder,
        {
            "BATCH_SIZE_TEXT": str(batch),
            "DEVICE": device,
            "HF_HUB_OFFLINE": "1",
            "HOSTGPU_INGEST_ROOTS": roots,  # the by-path row: the worker may read the corpus
        },
    )
    cached = _images_present()
    out: dict[str, Any] = {"images_cached": cached}
    try:
        out["up_first"] = stack.run("up", "--uploads", str(stack.inbox))
        stack.run("down", "--grace", "5")
        out["up_warm"] = stack.run("up", "--no-build", "--uploads", str(stack.inbox))

        from hostgpu.pipelines.ingest import ingest_file as ingest

        hostgpu.connect(stack.url, stack.admin)
        ingest.remote(str(warmups[0]))  # the worker loads the model before the clock
        started = time.perf_counter()
        results = ingest.map([str(p) for p in paths[1:]], progress=False)
        out["path"] = (sum(r["pages"] for r in results), time.perf_counter() - started)

        # Another copy of the corpus: new documents, not a re-ingest of the ones above.
        copies = folder / "stack-uploads"
        copies.mkdir()
        for path in paths[1:]:
            shutil.copy(path, copies / path.name)
        with Client(stack.url, stack.admin) as client:
            started = time.perf_counter()
            specs = [upload_spec(client, p) for p in sorted(copies.iterdir())]
            ids = client.submit_batch(specs)
            results = _wait_all(client, ids)
            out["blob"] = (sum(r["pages"] for r in results), time.perf_counter() - started)
        return out
    finally:
        if (stack.home / "stack/state.json").exists():
            stack.run("down", "--volumes", "--grace", "5")
