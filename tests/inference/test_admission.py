"""The model server starts the jobs one lease hands over on their engine together.

Real SmolLM2 on the transformers engine, a real :class:`EnginePool`; the gateway is replaced
by a recorder of the stream events the server would post (the seam is the client's
``stream`` call). Started from their own threads, eight jobs raced the engine's batching loop:
often one made the first step and seven waited a whole prefill.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hostgpu.api import StreamBatch
from hostgpu.capabilities import Device
from hostgpu.inference.engines import Engine
from hostgpu.inference.jobs import INFERENCE_FUNCTION
from hostgpu.jobs import Lease, Outcome, Payload
from hostgpu.worker.serving import EnginePool, Streamer

from .conftest import _require_llm, builtin

pytestmark = [pytest.mark.llm, pytest.mark.slow]

JOBS = 8  # the jobs of one lease


class Recorder:
    """What the streamer would post to the gateway: when each job's first text came."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}

    def stream(self, worker_id: str, batch: StreamBatch) -> list[str]:
        events = batch.events
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


class Served:
    """A running pool with SmolLM2 warm, and what its jobs did."""

    def __init__(self, models: tuple[str, ...] = ("smollm2",)) -> None:
        self.recorder = Recorder()
        self.outcomes: list[Outcome] = []
        self.finished = threading.Condition()
        #: (what, thread name, when, model): the engines' tokenizing and submitting calls.
        self.calls: list[tuple[str, str, float, str]] = []
        streamer = Streamer(lambda: self.recorder, on_cancel=lambda _: None)  # type: ignore[arg-type,return-value]
        streamer.worker_id = "w"
        specs = {m: builtin("smollm2").model_copy(update={"name": m}) for m in models}
        self.pool = EnginePool(specs, "cpu", self.on_result, streamer, concurrency=JOBS)

    def on_result(self, outcome: Outcome) -> None:
        with self.finished:
            self.outcomes.append(outcome)
            self.finished.notify_all()

    def wait_for(self, count: int) -> None:
        with self.finished:
            assert self.finished.wait_for(lambda: len(self.outcomes) == count, 300)

    def warm(self, model: str = "smollm2", n: int = 0) -> Engine:
        """Load the model (on the warm-up job's own thread), then record the engine's calls."""
        self.pool.submit(lease(n, "Warm up.", model=model))
        self.wait_for(n + 1)
        engine: Engine = self.pool._engines[model]
        for name in ("chat_ids", "submit"):
            original = getattr(engine, name)

            def recording(*args: Any, _name: str = name, _call: Any = original) -> Any:
                thread = threading.current_thread().name
                self.calls.append((_name, thread, time.monotonic(), model))
                return _call(*args)

            setattr(engine, name, recording)
        return engine

    def submitted(self) -> list[tuple[str, float]]:
        return [(thread, at) for what, thread, at, _ in self.calls if what == "submit"]

    def admitted(self) -> list[str]:
        """The admission thread's calls, in order: ``chat_ids`` or ``submit``, and the model."""
        return [f"{w} {m}" for w, thread, _, m in self.calls if thread == "hostgpu-admit"]


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    _require_llm()
    served = Served(getattr(request, "param", ("smollm2",)))
    served.pool.start()
    try:
        yield served
    finally:
        served.pool.stop(grace=0)


def test_the_jobs_of_one_lease_share_the_engines_first_step(served: Served) -> None:
    served.warm()
    # As the lease loop hands over one lease's jobs; two of them bad, which fail alone.
    burst = [lease(n, f"Question {n}: what is {n} plus {n}?") for n in range(1, JOBS + 1)]
    served.pool.submit_all([*burst, lease(90, ""), lease(91, "Hi", model="not-served")])
    served.wait_for(JOBS + 3)

    status = {o.job_id: (o.status, o.error.message if o.error else "") for o in served.outcomes}
    assert all(status[f"{n:032x}"][0] == "succeeded" for n in range(JOBS + 1)), status
    assert status[f"{90:032x}"][0] == "failed" and "messages" in status[f"{90:032x}"][1]
    assert status[f"{91:032x}"] == ("failed", "model 'not-served' is not served here")
    submitted = served.submitted()
    assert {name for name, _ in submitted} == {"hostgpu-admit"}, "each job started itself"
    assert len(submitted) == JOBS
    # Eight short prompts fill no step (512 tokens): all were tokenized (and the empty one
    # refused) before any went.
    order = served.admitted()
    assert order == ["chat_ids smollm2"] * (JOBS + 1) + ["submit smollm2"] * JOBS
    firsts = sorted(served.recorder.first[f"{n:032x}"] for n in range(1, JOBS + 1))
    step = firsts[0] - max(at for _, at in submitted)  # the first step: all eight prompts
    # A job that missed the first step gets its first token a whole step later.
    assert firsts[-1] - firsts[0] < step / 2, (firsts, step)


def test_prompts_that_fill_a_step_go_before_the_rest_is_tokenized(served: Served) -> None:
    """The step is full either way: those jobs need not wait for the tokenizer."""
    engine = served.warm()
    one = len(engine.chat_ids([{"role": "user", "content": "Question 1: what is 1 plus 1?"}]))
    served.calls.clear()
    engine.step_tokens = 2 * one  # two of these prompts fill a step
    served.pool.submit_all([lease(n, f"Question {n}: what is {n} plus {n}?") for n in range(1, 6)])
    served.wait_for(6)
    assert all(o.status == "succeeded" for o in served.outcomes), served.outcomes
    # Two tokenized, two submitted; again; the fifth alone at the end.
    pair = ["chat_ids smollm2"] * 2 + ["submit smollm2"] * 2
    assert served.admitted() == pair * 2 + ["chat_ids smollm2", "submit smollm2"]


@pytest.mark.parametrize("served", [("a", "b")], indirect=True)
def test_a_step_filled_on_one_engine_sends_only_that_engines_jobs(served: Served) -> None:
    """The other engine's jobs still go together: one of them alone would take its engine's
    first step by itself."""
    engine = served.warm("a", 0)
    served.warm("b", 1)
    one = len(engine.chat_ids([{"role": "user", "content": "Question 1: what is 1 plus 1?"}]))
    served.calls.clear()
    engine.step_tokens = 2 * one
    served.pool.submit_all(
        [
            lease(n, f"Question {n}: what is {n} plus {n}?", model=model)
            for n, model in ((2, "b"), (3, "a"), (4, "b"), (5, "a"), (6, "b"))
        ]
    )
    served.wait_for(7)
    assert all(o.status == "succeeded" for o in served.outcomes), served.outcomes
    assert served.admitted() == [
        "chat_ids b",
        "chat_ids a",
        "chat_ids b",
        "chat_ids a",
        "submit a",  # a's step is full: a's two go, b's wait for the rest of b
        "submit a",
        "chat_ids b",
        "submit b",
        "submit b",
        "submit b",
    ]
