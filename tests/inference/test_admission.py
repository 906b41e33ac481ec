"""The model server starts the jobs one lease hands over on their engine together.

Real SmolLM2 on the transformers engine, a real :class:`EnginePool`; the gateway is replaced
by a recorder of the stream events the server would post (the seam is the client's
``stream`` call). Started from their own threads, eight jobs raced the engine's batching loop:
often one made the first step and seven waited a whole prefill.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hostgpu.capabilities import Device
from hostgpu.inference.engines import Engine
from hostgpu.inference.jobs import INFERENCE_FUNCTION, StreamEvent
from hostgpu.jobs import Lease, Outcome, Payload
from hostgpu.worker.serving import EnginePool, Streamer

from .conftest import _require_llm, builtin

pytestmark = [pytest.mark.llm, pytest.mark.slow]

JOBS = 8  # the jobs of one lease


class Recorder:
    """What the streamer would post to the gateway: when each job's first text came."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}

    def stream(self, worker_id: str, events: list[StreamEvent], states: Any) -> list[str]:
        now = time.monotonic()
        for event in events:
            if event.text:
                self.first.setdefault(event.job_id, now)
        return []

    def close(self) -> None:
        pass


def lease(n: int, content: str, model: str = "smollm2") -> Lease:
    request = {
        "model": model,
        "kind": "chat",
        "messages": [{"role": "user", "content": content}] if content else [],
        "sampling": {"max_tokens": 4, "temperature": 0},
    }
    return Lease(
        job_id=f"{n:032x}",
        lease_token="1",
        attempt=1,
        function=INFERENCE_FUNCTION,
        payload=Payload(kwargs={"request": request}),
        timeout_s=300,
        device=Device(kind="cpu", name="cpu"),
        lease_expires_at=datetime.now(UTC) + timedelta(minutes=5),
    )


def test_the_jobs_of_one_lease_share_the_engines_first_step() -> None:
    _require_llm()
    recorder = Recorder()
    outcomes: list[Outcome] = []
    finished = threading.Condition()

    def on_result(outcome: Outcome) -> None:
        with finished:
            outcomes.append(outcome)
            finished.notify_all()

    streamer = Streamer(lambda: recorder, on_cancel=lambda _: None)  # type: ignore[arg-type,return-value]
    streamer.worker_id = "w"
    pool = EnginePool({"smollm2": builtin("smollm2")}, "cpu", on_result, streamer, concurrency=JOBS)
    pool.start()
    try:
        pool.submit(lease(0, "Warm up."))  # loads the model on this job's own thread
        with finished:
            assert finished.wait_for(lambda: len(outcomes) == 1, 300)
        engine: Engine = pool._engines["smollm2"]
        submitted: list[tuple[str, float]] = []
        submit = engine.submit

        def recording_submit(*args: Any, **kwargs: Any) -> Any:
            submitted.append((threading.current_thread().name, time.monotonic()))
            return submit(*args, **kwargs)

        engine.submit = recording_submit  # type: ignore[method-assign]
        # As the lease loop hands over one lease's jobs; two of them bad, which fail alone.
        burst = [lease(n, f"Question {n}: what is {n} plus {n}?") for n in range(1, JOBS + 1)]
        pool.submit_all([*burst, lease(90, ""), lease(91, "Hi", model="not-served")])
        with finished:
            assert finished.wait_for(lambda: len(outcomes) == JOBS + 3, 300)
    finally:
        pool.stop(grace=0)

    status = {o.job_id: (o.status, o.error.message if o.error else "") for o in outcomes}
    assert all(status[f"{n:032x}"][0] == "succeeded" for n in range(JOBS + 1)), status
    assert status[f"{90:032x}"][0] == "failed" and "messages" in status[f"{90:032x}"][1]
    assert status[f"{91:032x}"] == ("failed", "model 'not-served' is not served here")
    assert {name for name, _ in submitted} == {"hostgpu-admit"}, "each job started itself"
    assert len(submitted) == JOBS
    firsts = sorted(recorder.first[f"{n:032x}"] for n in range(1, JOBS + 1))
    step = firsts[0] - max(at for _, at in submitted)  # the first step: all eight prompts
    # A job that missed the first step gets its first token a whole step later.
    assert firsts[-1] - firsts[0] < step / 2, (firsts, step)
