"""One contract, every engine: the real SmolLM2 on the CPU through each installed engine.

transformers always runs (CI installs it); mlx_lm runs where ``mlx-lm[cpu]`` installs;
llama.cpp runs where the optional llama-cpp-python is installed, else its cases skip.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hostgpu.inference.engines import Engine, SamplingParams
from hostgpu.inference.engines.base import Completion
from hostgpu.inference.errors import InvalidRequest

from .conftest import CHAT, run_threads

pytestmark = pytest.mark.llm

# MLX's CPU backend runs SmolLM2 at a few tokens a second here: ask it for fewer.
TOKENS = {"transformers": 16, "mlx_lm": 8, "llama.cpp": 16}
GREEDY = SamplingParams(max_tokens=24, temperature=0)

_reference: dict[str, Completion] = {}


@pytest.fixture(params=["smollm2", "smollm2_mlx", "smollm2_llamacpp"])
def engine(request: pytest.FixtureRequest) -> Engine:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def tokens(engine: Engine) -> int:
    return TOKENS[engine.kind]


def reference(engine: Engine) -> Completion:
    """The engine's greedy answer to CHAT (computed once)."""
    if engine.kind not in _reference:
        params = SamplingParams(max_tokens=tokens(engine), temperature=0)
        _reference[engine.kind] = engine.chat(CHAT, params).completion()
    return _reference[engine.kind]


def settled(engine: Engine, timeout: float = 10.0) -> bool:
    """Whether the engine drops to no active request within ``timeout``: a stream read to its
    end is released by the engine's own loop a moment later, not by the reader."""
    deadline = time.monotonic() + timeout
    while engine.stats().active_requests:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_greedy_stream_equals_the_whole_completion(engine: Engine) -> None:
    ref = reference(engine)
    stream = engine.chat(CHAT, SamplingParams(max_tokens=tokens(engine), temperature=0))
    deltas = list(stream)
    completion = stream.completion()
    assert "".join(d.text for d in deltas) == completion.text == ref.text
    assert "Paris" in ref.text or engine.kind == "llama.cpp"  # llama.cpp's Q4 maths answers oddly
    assert sum(d.tokens for d in deltas) <= completion.usage.completion_tokens
    assert completion.usage.prompt_tokens == stream.prompt_tokens > 10
    assert completion.time_to_first_token is not None


def test_stop_sequence_cuts_the_text_before_it(engine: Engine) -> None:
    ref = reference(engine).text
    words = ref.split()
    assert len(words) >= 3, ref
    stop = " " + words[2]
    cut = ref.index(stop)
    completion = engine.chat(
        CHAT, SamplingParams(max_tokens=tokens(engine), temperature=0, stop=(stop, "\u2603"))
    ).completion()
    assert completion.text == ref[:cut]
    assert completion.finish_reason == "stop"


def test_max_tokens_is_exact(engine: Engine) -> None:
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    completion = engine.complete("Once upon a time", params).completion()
    assert completion.usage.completion_tokens == 5
    assert completion.finish_reason == "length"


def test_seeded_sampling_repeats(engine: Engine) -> None:
    params = SamplingParams(max_tokens=tokens(engine) // 2, temperature=0.9, top_p=0.9, seed=7)
    first = engine.chat(CHAT, params).completion()
    second = engine.chat(CHAT, params).completion()
    assert first.text == second.text


def test_cancel_stops_generation(engine: Engine) -> None:
    stream = engine.complete(
        "Count: 1, 2, 3,", SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0)
    )
    first = stream.next(timeout=120)
    assert first is not None
    cancelled_at = time.perf_counter()
    assert stream.cancel()
    # The engine drops the request at its next step; a generous bound keeps this robust under
    # load (benchmarks/inference.py measures the latency itself).
    assert stream.wait_released(timeout=10)
    released_after = time.perf_counter() - cancelled_at
    generated = engine.stats().generated_tokens_total
    time.sleep(0.3)
    assert engine.stats().generated_tokens_total == generated, "tokens still produced"
    assert stream.completion().finish_reason == "cancelled"
    assert released_after < 10
    assert settled(engine)


def test_concurrent_requests_all_complete(engine: Engine) -> None:
    count = {"transformers": 8, "llama.cpp": 3, "mlx_lm": 2}[engine.kind]
    results: dict[int, Completion] = {}

    def ask(i: int) -> None:
        messages = [{"role": "user", "content": f"Give me one word that rhymes with number {i}."}]
        params = SamplingParams(max_tokens=tokens(engine) // 2, temperature=0, ignore_eos=True)
        results[i] = engine.chat(messages, params).completion()

    run_threads([threading.Thread(target=ask, args=(i,)) for i in range(count)])
    assert sorted(results) == list(range(count))
    assert all(r.usage.completion_tokens == tokens(engine) // 2 for r in results.values())
    assert settled(engine)


def test_async_iteration(smollm2: Engine) -> None:
    async def collect() -> str:
        stream = smollm2.chat(CHAT, SamplingParams(max_tokens=tokens(smollm2), temperature=0))
        return "".join([d.text async for d in stream])

    assert asyncio.run(collect()) == reference(smollm2).text


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda e: e.chat([], GREEDY), "messages"),
        (lambda e: e.chat([{"role": "wizard", "content": "hi"}], GREEDY), "messages[0].role"),
        (lambda e: e.chat([{"role": "user", "content": 3}], GREEDY), "messages[0].content"),
        (lambda e: e.complete("", GREEDY), "prompt"),
        (lambda e: e.chat(CHAT, SamplingParams(max_tokens=10**7)), "max_tokens"),
        (lambda e: e.submit([1] * (e.context_length + 5), GREEDY), "messages"),
        (lambda e: e.chat(CHAT, SamplingParams(temperature=3)), "temperature"),
        (lambda e: e.chat(CHAT, SamplingParams(stop=("a", "b", "c", "d", "e"))), "stop"),
    ],
)
def test_bad_requests_are_refused(engine: Engine, call: object, param: str) -> None:
    assert settled(engine)  # the previous test's last stream may still be leaving
    with pytest.raises(InvalidRequest) as info:
        call(engine)  # type: ignore[operator]
    assert info.value.param == param
    assert info.value.status_code == 400
    assert engine.stats().active_requests == 0


def test_context_overflow_has_openai_code(smollm2: Engine) -> None:
    with pytest.raises(InvalidRequest) as info:
        smollm2.chat(CHAT, SamplingParams(max_tokens=smollm2.context_length))
    assert info.value.code == "context_length_exceeded"
