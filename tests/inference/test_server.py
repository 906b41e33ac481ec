"""The official ``openai`` client against the single-engine server (arm B of the benchmark).

The server runs in this process (uvicorn on a thread, on 127.0.0.1) around the session's
SmolLM2 engine, so no second model is loaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from hostgpu.inference.engines import Engine
from hostgpu.processes import free_port

openai = pytest.importorskip("openai")

from hostgpu.inference.server import create_app  # noqa: E402

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def base_url(smollm2: Engine) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app({"smollm2": smollm2}), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]


def test_streamed_chat_matches_the_whole_response(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="smollm2", messages=CHAT, temperature=0, max_tokens=16
    )
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=CHAT,
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    # The usage chunk comes last, with no choices.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_text_completion_and_its_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=6
    )
    streamed = client.completions.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.usage.completion_tokens <= 6


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": CHAT, "max_tokens": 10**6}, 400, "max_tokens"),
        ({"messages": CHAT, "n": 2}, 400, "n"),
        ({"messages": CHAT, "temperature": 5}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x" * (10 * 1024 * 1024)}]}, 400, "messages"),
        ({"messages": CHAT, "model": "gpt-9"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(
    base_url: str, kwargs: dict[str, object], status: int, param: str
) -> None:
    body = {"model": "smollm2", **kwargs}
    response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"] and error["type"]


def test_the_client_raises_on_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=10**6)


def test_client_disconnect_cancels_generation(base_url: str, smollm2: Engine) -> None:
    body = {
        "model": "smollm2",
        "messages": CHAT,
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert smollm2.stats().active_requests == 1
    deadline = time.monotonic() + 15
    while smollm2.stats().active_requests:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.05)


def test_a_finished_request_s_engine_figures_are_kept_by_its_id(base_url: str) -> None:
    """The benchmark's B arm tells the engine's time from the path's with these figures."""
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": 6, "stream": True}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
            request_id = response.headers["x-request-id"]
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        figures = http.get(f"{base_url}/requests/{request_id}").json()
        assert figures["id"] == request_id
        assert figures["usage"]["completion_tokens"] == 6
        assert 0 < figures["time_to_first_token"] <= figures["duration"]

        whole = http.post(f"{base_url}/chat/completions", json={**body, "stream": False})
        kept = http.get(f"{base_url}/requests/{whole.headers['x-request-id']}").json()
        assert kept["usage"] == {
            "prompt_tokens": whole.json()["usage"]["prompt_tokens"],
            "completion_tokens": whole.json()["usage"]["completion_tokens"],
        }

        unknown = http.get(f"{base_url}/requests/nope")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "not_found"
