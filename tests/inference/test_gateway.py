"""The gateway's inference API end to end: real gateway, real model servers (`hostgpu serve`,
`hostgpu share`) running SmolLM2 on the CPU, the official `openai` client, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
import openai
import pytest

from hostgpu.jobs import JobSpec
from hostgpu.processes import hostgpu_command
from hostgpu.testing import Gateway, ModelServer, Worker, child_env
from tests.inference.conftest import _require_llm, builtin

pytestmark = pytest.mark.timeout(300)

GREEDY = {"temperature": 0, "max_tokens": 12}
HELLO = [{"role": "user", "content": "Say hello."}]


def server_env() -> dict[str, str]:
    spec = builtin("smollm2").model_dump(mode="json", exclude={"name"}, exclude_none=True)
    return {
        "HOSTGPU_MODEL_CACHE": os.environ["HOSTGPU_MODEL_CACHE"],
        "HOSTGPU_MODELS": json.dumps({"smollm2": spec}),
    }


def start_server(gateway: Gateway, workers: list[Worker], **kw: object) -> ModelServer:
    _require_llm()
    server = ModelServer(gateway, env_extra=server_env(), **kw)  # type: ignore[arg-type]
    workers.append(server)
    return server.start()


@pytest.fixture
def infer_token(gateway: Gateway) -> str:
    with gateway.client() as c:
        return c.create_token("tests", "infer").token


@pytest.fixture
def server(gateway: Gateway, workers: list[Worker]) -> ModelServer:
    return start_server(gateway, workers, concurrency=8)


def oai(gateway: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0)


def job_of(gateway: Gateway, state: str | None = None) -> list[dict[str, object]]:
    with gateway.http() as http:
        params = {"state": state} if state else {}
        jobs = http.get("/v1/jobs", params=params).json()["jobs"]
    return [j for j in jobs if j["function"] == "hostgpu.inference.serving:generate"]


def test_openai_client_streams_and_completes(
    gateway: Gateway, server: ModelServer, infer_token: str
) -> None:
    client = oai(gateway, infer_token)
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,  # type: ignore[arg-type]
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    # The same request without streaming gives the same (greedy) text; x-request-id names
    # its job, as `hostgpu job` knows it.
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=HELLO,
        **GREEDY,  # type: ignore[arg-type]
    )
    whole = raw.parse()
    assert whole.choices[0].message.content == text
    assert whole.usage is not None and whole.usage.prompt_tokens > 0
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={"model": "smollm2", "messages": HELLO, "stream": True, **GREEDY},
        headers={"Authorization": f"Bearer {infer_token}"},
    ) as streamed:
        streamed.read()
    ids = [raw.headers["x-request-id"], streamed.headers["x-request-id"]]
    with gateway.http() as http:
        named = [http.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
    assert ids[0] != ids[1]
    assert [(j["state"], j["result"]["completion_tokens"]) for j in named] == [
        ("succeeded", 12),
        ("succeeded", 12),
    ]

    completion = client.completions.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=4
    )
    assert "Paris" in completion.choices[0].text

    models = client.models.list().data
    [card] = [m for m in models if m.id == "smollm2"]
    loaded = card.model_extra["loaded_on"] if card.model_extra else []
    assert [e["device"] for e in loaded] == ["cpu"]
    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError, match="hostgpu models"):
        client.models.retrieve("nope")

    # The text came over the server's channel, not in requests of its own.
    assert gateway.requests_to("/v1/workers/{worker_id}/streams") == 0

    # The CLI: one JSON object, whatever the terminal.
    env = child_env(gateway.home, HOSTGPU_GATEWAY=gateway.url, HOSTGPU_TOKEN=infer_token)
    out = subprocess.run(
        hostgpu_command("generate", "smollm2", "Say hello.", "--max-tokens", "12", "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(out.stdout)
    assert answer["text"] == text and answer["usage"]["completion_tokens"] == 12


def test_without_its_channel_a_server_streams_over_http(
    gateway: Gateway, workers: list[Worker], infer_token: str
) -> None:
    start_server(gateway, workers, extra_args=("--no-channel",))
    chunks = oai(gateway, infer_token).chat.completions.create(
        model="smollm2",
        messages=HELLO,
        stream=True,
        **GREEDY,  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert gateway.requests_to("/v1/workers/{worker_id}/streams") > 0
    assert gateway.requests_to("/v1/workers/{worker_id}/lease") > 0


DEEP = b"[" * 150 + b"]" * 150


def test_bad_requests_get_4xx_in_openai_shape(
    gateway: Gateway, server: ModelServer, infer_token: str
) -> None:
    def post(body: object, path: str = "/v1/chat/completions", **kw: object) -> httpx.Response:
        with gateway.http(infer_token) as http:
            if isinstance(body, bytes):
                return http.post(path, content=body, headers={"content-type": "application/json"})
            return http.post(path, json=body)

    cases = {
        "unknown model": ({"model": "nope", "messages": HELLO}, 404),
        "empty messages": ({"model": "smollm2", "messages": []}, 400),
        "wrong role": ({"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}, 400),
        "huge max_tokens": ({"model": "smollm2", "messages": HELLO, "max_tokens": 10**9}, 400),
        "10 MB prompt": (
            {"model": "smollm2", "messages": [{"role": "user", "content": "x" * 10_000_000}]},
            400,
        ),
        "not JSON": (b"{nope", 400),
        # Refused by the gateway's body checks before any route: the same shape.
        "over the body limit": (
            {"model": "smollm2", "messages": [{"role": "user", "content": "x" * 17_000_000}]},
            413,
        ),
        "lone surrogate": (b'{"model": "smollm2", "messages": [{"content": "\\ud800"}]}', 422),
        "nested too deep": (b'{"model": "smollm2", "messages": %s}' % DEEP, 422),
        "n=2": ({"model": "smollm2", "messages": HELLO, "n": 2}, 400),
    }
    for name, (body, status) in cases.items():
        response = post(body)
        assert response.status_code == status, (name, response.text[:300])
        error = response.json().get("error")
        assert error is not None, (name, response.text[:300])
        assert error["message"] and error["type"], name
    unknown = post(cases["unknown model"][0])
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert "models.toml" in unknown.json()["error"]["message"]
    assert post({"model": "smollm2", "prompt": ""}, "/v1/completions").status_code == 400
    # Nothing bad was queued.
    assert job_of(gateway) == []


def test_a_request_that_fails_on_its_server_names_its_job(
    gateway: Gateway, server: ModelServer, infer_token: str
) -> None:
    # Longer than the model's context: only its engine can tell (it counts the tokens).
    long_prompt = [{"role": "user", "content": "word " * 12_000}]
    with gateway.http(infer_token) as http:
        response = http.post(
            "/v1/chat/completions", json={"model": "smollm2", "messages": long_prompt}
        )
    assert response.status_code == 400, response.text[:300]
    assert "reads at most" in response.json()["error"]["message"]
    [job] = job_of(gateway)
    assert response.headers["x-request-id"] == job["id"] and job["state"] == "failed"


def test_scopes_keep_inference_apart(
    gateway: Gateway, server: ModelServer, infer_token: str
) -> None:
    with gateway.client() as admin:
        submit = admin.create_token("submitter", "submit").token
        read = admin.create_token("reader", "read").token
    body = {"model": "smollm2", "messages": HELLO, **GREEDY}
    with gateway.http(submit) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 403
        # Nor can a submit token queue an inference job by hand.
        spec = {"function": "hostgpu.inference.serving:generate", "payload": {"kwargs": {}}}
        response = http.post("/v1/jobs", json=spec)
        assert response.status_code == 422 and "/v1/chat/completions" in response.text
    with gateway.http(read) as http:
        assert http.get("/v1/models").status_code == 200
        assert http.post("/v1/chat/completions", json=body).status_code == 403
    with gateway.http(infer_token) as http:
        assert http.get("/v1/jobs").status_code == 403
        assert http.post("/v1/jobs", json={"function": "tests.jobfuncs:noop"}).status_code == 403


def test_eight_at_once_on_one_replica_all_complete(
    gateway: Gateway, server: ModelServer, infer_token: str
) -> None:
    client = oai(gateway, infer_token)
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        reply = client.chat.completions.create(model="smollm2", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
        answers[i] = reply.choices[0].message.content or ""

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert len(answers) == 8
    assert len(set(answers.values())) == 1  # greedy, batched together: the same answer
    assert {j["state"] for j in job_of(gateway)} == {"succeeded"}


def test_a_busy_replica_queues_requests_in_arrival_order(
    gateway: Gateway, workers: list[Worker], infer_token: str
) -> None:
    start_server(gateway, workers, concurrency=1)
    client = oai(gateway, infer_token)
    client.chat.completions.create(model="smollm2", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    done: list[int] = []

    def ask(i: int) -> None:
        client.chat.completions.create(model="smollm2", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
        done.append(i)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.2)  # a defined arrival order
    for t in threads:
        t.join(timeout=240)
    assert sorted(done) == list(range(5))
    jobs = sorted(job_of(gateway), key=lambda j: str(j["created_at"]))[1:]
    finished = [str(j["finished_at"]) for j in jobs]
    assert finished == sorted(finished)  # one at a time, first come first served
    assert {j["state"] for j in jobs} == {"succeeded"}


def test_client_disconnect_cancels_generation(
    gateway: Gateway, server: ModelServer, infer_token: str
) -> None:
    body = {
        "model": "smollm2",
        "messages": HELLO,
        "max_tokens": 2000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    seen = 0
    with (
        gateway.http(infer_token) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                seen += 1
                if seen == 3:
                    break  # and hang up
    assert seen == 3
    closed = time.monotonic()
    deadline = closed + 10
    while time.monotonic() < deadline:
        [job] = job_of(gateway)
        if job["state"] == "cancelled":
            break
        time.sleep(0.1)
    assert job["state"] == "cancelled"
    # The server stopped generating: nothing active on its engine within a second or two.
    while time.monotonic() < deadline:
        with gateway.http(infer_token) as http:
            [card] = http.get("/v1/models").json()["data"]
        if card["loaded_on"] and card["loaded_on"][0]["active"] == 0:
            break
        time.sleep(0.1)
    assert card["loaded_on"][0]["active"] == 0
    assert time.monotonic() - closed < 5
    assert "generation cancelled" in server.log_text() or job["state"] == "cancelled"


def test_killed_lender_request_completes_on_another(
    gateway: Gateway, workers: list[Worker], infer_token: str, share_token: str
) -> None:
    """A lender SIGKILLed mid-request: its lease expires, another server runs the request
    again, and the client gets the whole answer once (the text already sent is skipped)."""
    lender = start_server(gateway, workers, share=True, token=share_token, name="lender")
    client = oai(gateway, infer_token)
    long = {"temperature": 0, "max_tokens": 150, "extra_body": {"ignore_eos": True}}
    reference = client.chat.completions.create(model="smollm2", messages=HELLO, **long)  # type: ignore[arg-type]
    answers: list[str] = []
    thread = threading.Thread(
        target=lambda: answers.append(
            client.chat.completions.create(
                model="smollm2",
                messages=HELLO,
                timeout=180,
                **long,  # type: ignore[arg-type]
            )
            .choices[0]
            .message.content
            or ""
        )
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not [j for j in job_of(gateway) if j["state"] == "running"]:
        assert time.monotonic() < deadline, "the request never started on the lender"
        time.sleep(0.05)
    # The other server joins while the lender generates (about 10 tokens/s: 15 s of work).
    start_server(gateway, workers, name="other")
    assert [j for j in job_of(gateway) if j["state"] == "running"], "finished before the kill"
    lender.kill()
    thread.join(timeout=240)
    assert answers == [reference.choices[0].message.content]
    [job] = [j for j in job_of(gateway) if j["lost"]]
    assert job["state"] == "succeeded"
    with gateway.http() as http:
        names = {
            w["id"]: w["capabilities"]["name"] for w in http.get("/v1/workers").json()["workers"]
        }
    assert names[str(job["worker_id"])] == "other"


def test_requests_go_to_the_server_with_the_model_warm(
    gateway: Gateway, workers: list[Worker], infer_token: str
) -> None:
    start_server(gateway, workers, name="warm")
    client = oai(gateway, infer_token)
    client.chat.completions.create(model="smollm2", messages=HELLO, **GREEDY)  # loads it
    start_server(gateway, workers, name="cold")
    for _ in range(4):
        client.chat.completions.create(model="smollm2", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    with gateway.http() as http:
        names = {
            w["id"]: w["capabilities"]["name"] for w in http.get("/v1/workers").json()["workers"]
        }
    served_by = [names[str(j["worker_id"])] for j in job_of(gateway)]
    assert served_by == ["warm"] * 5
    with gateway.http(infer_token) as http:
        [card] = http.get("/v1/models").json()["data"]
    assert [e["worker"] for e in card["loaded_on"]] == ["warm"]
    assert sorted(s["worker"] for s in card["servers"]) == ["cold", "warm"]


@pytest.fixture
def share_token(gateway: Gateway) -> Iterator[str]:
    with gateway.client() as c:
        yield c.create_token("alice's laptop", "share", expires_in_s=3600).token


def test_share_serves_models_and_never_runs_functions(
    gateway: Gateway, workers: list[Worker], infer_token: str, share_token: str
) -> None:
    lender = start_server(gateway, workers, share=True, token=share_token, name="lent")
    with gateway.http() as http:
        [info] = [
            w
            for w in http.get("/v1/workers").json()["workers"]
            if w["capabilities"]["name"] == "lent"
        ]
    caps = info["capabilities"]
    assert caps["serves"] == "models" and list(caps["functions"]) == [
        "hostgpu.inference.serving:generate"
    ]
    # A function job waits: the lent machine is never leased one.
    with gateway.client() as c:
        job = c.submit(JobSpec(function="hostgpu.builtin:whoami"))
    reply = oai(gateway, infer_token).chat.completions.create(
        model="smollm2",
        messages=HELLO,
        **GREEDY,  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content
    with gateway.client() as c:
        assert c.get(job.id).state.value == "queued"
    # The share token acts for its own machine only: it cannot lease as a function worker.
    other = Worker(gateway, imports=("tests.jobfuncs",), name="funcs").start()
    workers.append(other)
    with gateway.http(share_token) as http:
        listed = http.get("/v1/workers")
        assert listed.status_code == 403
        with gateway.http() as admin:
            ids = {
                w["capabilities"]["name"]: w["id"]
                for w in admin.get("/v1/workers", params={"alive": True}).json()["workers"]
            }
        stolen = http.post(f"/v1/workers/{ids['funcs']}/lease", json={"max_jobs": 1})
        assert stolen.status_code == 403
        # Registering with function claims publishes none of them.
        claims = {
            "name": "sneaky",
            "devices": [{"kind": "cpu", "name": "cpu"}],
            "modules": ["hostgpu.builtin"],
            "functions": {"hostgpu.builtin:whoami": {}},
        }
        registered = http.post("/v1/workers", json=claims).json()
        lease = http.post(
            f"/v1/workers/{registered['worker_id']}/lease", json={"max_jobs": 5, "wait": 0}
        )
        assert lease.status_code == 200 and lease.json()["leases"] == []
    # SIGTERM during a stream: the stream finishes, then a clean stop (exit 0), deregistered,
    # no longer listed.
    stream = oai(gateway, infer_token).chat.completions.create(
        model="smollm2",
        messages=HELLO,
        max_tokens=80,
        temperature=0,
        extra_body={"ignore_eos": True},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [next(stream), next(stream)]  # generating now
    lender.signal(signal.SIGTERM)
    chunks += list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 80
    assert lender.proc is not None and lender.proc.wait(timeout=60) == 0
    with gateway.http(infer_token) as http:
        assert http.get("/v1/models").json()["data"] == []


def test_share_time_limit_finishes_the_stream_in_flight(
    gateway: Gateway, workers: list[Worker], infer_token: str, share_token: str
) -> None:
    until = datetime.now() + timedelta(seconds=35)
    lender = start_server(
        gateway,
        workers,
        share=True,
        token=share_token,
        name="brief",
        extra_args=("--until", until.isoformat(timespec="seconds"), "--grace", "240"),
    )
    client = oai(gateway, infer_token)
    client.chat.completions.create(model="smollm2", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    # Long enough to run past the time limit, at this machine's speed (10-30 tokens/s).
    started = time.monotonic()
    timed = client.chat.completions.create(
        model="smollm2",
        messages=HELLO,
        max_tokens=32,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert timed.usage is not None
    rate = timed.usage.completion_tokens / (time.monotonic() - started)
    left = (until - datetime.now()).total_seconds()
    assert left > 2, "the warm-up took past the time limit: a slow machine"
    tokens = min(2000, max(100, int(rate * (left + 15))))
    stream = client.chat.completions.create(
        model="smollm2",
        messages=HELLO,
        max_tokens=tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    finished = datetime.now()
    assert finished > until, "the stream ended before the time limit: nothing was tested"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == tokens
    assert lender.proc is not None and lender.proc.wait(timeout=60) == 0
    assert "time limit reached" in lender.log_text()
    with gateway.http(infer_token) as http:
        assert http.get("/v1/models").json()["data"] == []
