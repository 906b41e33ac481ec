"""LLM inference: the engine in-process (A), behind HTTP + SSE (B), through hostgpu (C, D).

    python benchmarks/inference.py [--model smollm2] [--device cpu] [--tokens 128]
                                   [--concurrency 1,8] [--prompts short,long] [--rounds 2]

Protocol (issue 12): the same model, greedy, exactly ``--tokens`` output tokens per stream
(``ignore_eos``), a short and a long prompt, concurrency 1 and 8, arms interleaved round by
round so a busy machine hurts every arm alike. For each (prompt, concurrency, arm) the table
shows time to first token, inter-token gaps p50/p95 (between consecutive deltas as the reader
sees them), tokens/s per stream (decode: tokens after the first over the time after it) and in
total (all tokens over the run's wall time), and the ratio of total tokens/s to arm A.

Arms:

- A, :func:`arm_in_process`: ``engine.chat()`` streams read by threads in this process.
- B, :func:`arm_http`: ``python -m hostgpu.inference.server`` in its own process, read
  over HTTP as OpenAI SSE (``/v1/chat/completions``, ``stream: true``). Its CPU time per run
  is reported too.
- C: :func:`arm_http` pointed at a hostgpu gateway (SQLite, its own ``HOSTGPU_HOME``) with a
  model server (``hostgpu serve``) that has the model warm: each request is a durable job,
  leased by the server, its tokens relayed back through the gateway. The gateway's CPU time
  per run is its own column.
- D: C cold: a second gateway and server started with ``--keep-alive 0``; before each run the
  benchmark waits until the server has unloaded the model, so the first request loads it.

Targets (issue 12): C adds at most 15 ms to B's time to first token (p50), and C's total
tokens/s at concurrency 8 is at least 0.95 of B's. The table's "TTFT − B" and "vs B" columns
say it. On a CPU the prefill's noise hides 15 ms (a long prompt at 8 streams takes 18 s to
its median first token, give or take a second from run to run), so B, C and D also show
"TTFT − engine": the client's TTFT minus the server engine's own for the same request (from
the request reaching the engine to its first token; C and D read it from the result of the job
the response's x-request-id names, B from its server's ``/v1/requests/{id}``), the median
over streams: what the path adds. "path − B" is C's or D's minus B's: what the gateway, the
queue, the lease and the relay add over one HTTP hop, free of the prefill's noise. Each run's
streams leave together (a barrier), so with several streams the engine
sees them as close together as the path lets them arrive.

Every stream's prompt is unique: it starts with a tag of its own (``[000042] ``, the same
length for all). The engines cache prompt prefixes: transformers shares KV pages of 256 tokens
between requests whose prompts start alike, and keeps them after a request ends. With the same
long prompt in all eight streams of a run, and again in the next round, a stream's prefill
then depended on which pages other streams had finished a moment before: first tokens came in
pairs, in waves a second apart, and the order the streams arrived in decided which paired
(measured in-process, 8 streams of the long prompt: 14–18 s to the last first token with
shared prompts, 35–38 s with unique ones). A run's median then moved by whole waves from
round to round: it measured the cache's luck, not the path. ``--shared-prompts`` sends the
same prompt to every stream, as before.

Also measured: load time, and cancellation latency in-process (from ``stream.cancel()`` to
the engine having dropped the request: ``stream.wait_released()``, which for the
transformers engine means the batching loop removed it from its scheduler).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from hostgpu.inference.engines import Engine, SamplingParams, create_engine
from hostgpu.inference.models import load_registry, model_cache_dir
from hostgpu.processes import free_port

RESULTS = Path(__file__).resolve().parent / "results"

SHORT = "What is the capital of France?"
_PASSAGE = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. Books "
    "became cheaper, literacy spread, and ideas travelled faster than ever before. Printers "
    "set up shops in trading cities, scholars exchanged corrected editions, and pamphlets "
    "carried news and arguments across borders. "
)
# About 1,000 tokens for SmolLM2's tokenizer: a long prompt that makes prefill matter.
LONG = _PASSAGE * 14 + "\nSummarise the text above in a few sentences."
PROMPTS = {"short": SHORT, "long": LONG}
_tags = itertools.count()
_shared_prompts = False


def tagged(prompt: str) -> str:
    """``prompt`` behind a tag no other stream of this benchmark has: no prefix cache hits."""
    return prompt if _shared_prompts else f"[{next(_tags):06d}] {prompt}"


@dataclass
class StreamRecord:
    """What one reader saw: when it asked, when each delta arrived, and how many tokens."""

    started: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0
    #: B, C and D: the request behind the stream (the response's x-request-id: B's engine
    #: request, C's and D's job), and the engine's own time to first token for it.
    job_id: str | None = None
    engine_ttft: float | None = None

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.started

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]

    def decode_rate(self) -> float:
        span = self.arrivals[-1] - self.arrivals[0]
        return (self.tokens - 1) / span if span > 0 else float("nan")


@dataclass
class RunResult:
    arm: str
    prompt: str
    concurrency: int
    wall: float
    streams: list[StreamRecord]
    server_cpu: float | None = None
    gateway_cpu: float | None = None

    def path_overhead(self) -> float | None:
        """What the path adds to each stream's time to first token, its median: the client's
        TTFT minus the engine's own for the same request (from the request reaching the
        server's engine to its first token). For B that is one HTTP hop and the SSE framing;
        for C and D also the gateway's queue, the lease and the relay."""
        paired = [s.ttft - s.engine_ttft for s in self.streams if s.engine_ttft is not None]
        return statistics.median(paired) if paired else None

    def row(self) -> dict[str, float]:
        gaps = sorted(g for s in self.streams for g in s.gaps())
        total = sum(s.tokens for s in self.streams)
        return {
            "ttft_p50": statistics.median(s.ttft for s in self.streams),
            "itl_p50": percentile(gaps, 0.5),
            "itl_p95": percentile(gaps, 0.95),
            "stream_tok_s": statistics.median(s.decode_rate() for s in self.streams),
            "total_tok_s": total / self.wall,
        }


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _run_concurrently(
    concurrency: int, one: Callable[[Callable[[], object]], StreamRecord]
) -> tuple[float, list[StreamRecord]]:
    """Run ``one`` on ``concurrency`` threads; each calls the function it is given (a barrier)
    once it is ready to send, so the requests leave together: "8 at once" means the same
    instant in every arm, and a reader's own set-up (a client, a connection pool) is not timed.
    """
    records: list[StreamRecord] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency)

    def target() -> None:
        try:
            record = one(barrier.wait)
        except BaseException as exc:  # surfaced below: a benchmark must not hide failures
            barrier.abort()  # the others must not wait for this one
            with lock:
                errors.append(exc)
            return
        with lock:
            records.append(record)

    threads = [threading.Thread(target=target) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} stream(s) failed: {errors[0]!r}") from errors[0]
    return wall, records


# -- arms -------------------------------------------------------------------------------------
def arm_in_process(engine: Engine, prompt: str, concurrency: int, tokens: int) -> RunResult:
    """A: the engine in this process."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    def one(ready: Callable[[], object]) -> StreamRecord:
        messages = [{"role": "user", "content": tagged(prompt)}]
        ready()
        record = StreamRecord(started=time.perf_counter())
        stream = engine.chat(messages, params)
        for _ in stream:
            record.arrivals.append(time.perf_counter())
        record.tokens = stream.completion().usage.completion_tokens
        if record.tokens != tokens:
            raise RuntimeError(f"got {record.tokens} tokens, wanted exactly {tokens}")
        return record

    wall, records = _run_concurrently(concurrency, one)
    return RunResult("A in-process", "", concurrency, wall, records)


def arm_http(
    base_url: str,
    model: str,
    prompt: str,
    concurrency: int,
    tokens: int,
    *,
    token: str | None = None,
    label: str = "B http+sse",
    server_pid: int | None = None,
    gateway_pid: int | None = None,
) -> RunResult:
    """An OpenAI-compatible server at ``base_url`` (``…/v1``), read as SSE: arms B, C, D."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {
        "model": model,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    def one(ready: Callable[[], object]) -> StreamRecord:
        own = {**body, "messages": [{"role": "user", "content": tagged(prompt)}]}
        with httpx.Client(timeout=600, headers=headers) as client:
            ready()
            record = StreamRecord(started=time.perf_counter())
            read(client, own, record)
        if record.tokens != tokens:
            raise RuntimeError(f"got {record.tokens} tokens, wanted exactly {tokens}")
        return record

    def read(client: httpx.Client, own: dict[str, object], record: StreamRecord) -> None:
        with client.stream("POST", f"{base_url}/chat/completions", json=own) as response:
            record.job_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.read().decode()[:300]}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    record.tokens = chunk["usage"]["completion_tokens"]
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                choices = chunk.get("choices") or []
                if choices and choices[0]["delta"].get("content"):
                    record.arrivals.append(time.perf_counter())

    def cpu_seconds(pid: int | None) -> float | None:
        return sum(psutil.Process(pid).cpu_times()[:2]) if pid else None

    server_before, gateway_before = cpu_seconds(server_pid), cpu_seconds(gateway_pid)
    wall, records = _run_concurrently(concurrency, one)
    server_after, gateway_after = cpu_seconds(server_pid), cpu_seconds(gateway_pid)
    return RunResult(
        label,
        "",
        concurrency,
        wall,
        records,
        server_cpu=None if server_after is None else server_after - (server_before or 0),
        gateway_cpu=None if gateway_after is None else gateway_after - (gateway_before or 0),
    )


class HostgpuArm:
    """A gateway and a model server in a scratch ``HOSTGPU_HOME``: arm C, or D when ``cold``."""

    def __init__(self, model: str, threads: int | None, home: Path, *, cold: bool) -> None:
        from hostgpu.inference.models import load_registry
        from hostgpu.testing import Gateway, ModelServer

        self.model = model
        self.cold = cold
        home.mkdir(parents=True, exist_ok=True)
        self.gateway = Gateway(home, f"sqlite:///{home / 'hostgpu.db'}").start()
        env = {"HOSTGPU_MODEL_CACHE": str(model_cache_dir())}
        if threads:
            spec = load_registry().get(model)
            key = "n_threads" if spec.engine == "llama.cpp" else "threads"
            options = {**spec.options, key: threads}
            body = spec.model_dump(mode="json", exclude={"name"}, exclude_none=True)
            env["HOSTGPU_MODELS"] = json.dumps({model: {**body, "options": options}})
        extra = ("--keep-alive", "0") if cold else ()
        self.server = ModelServer(
            self.gateway, models=(model,), concurrency=8, env_extra=env, extra_args=extra
        ).start()
        with self.gateway.client() as admin:
            self.token = admin.create_token("benchmark", "infer").token
        self.url = f"{self.gateway.url}/v1"

    def loaded(self) -> bool:
        headers = {"Authorization": f"Bearer {self.token}"}
        cards = httpx.get(f"{self.url}/models", headers=headers, timeout=10).json()["data"]
        return any(card["loaded_on"] for card in cards if card["id"] == self.model)

    def prepare(self) -> None:
        """Warm (C): one request loads the model. Cold (D): wait until it is unloaded."""
        if not self.cold:
            if not self.loaded():
                arm_http(self.url, self.model, SHORT, 1, 4, token=self.token)
            return
        deadline = time.monotonic() + 60
        while self.loaded():
            if time.monotonic() > deadline:
                raise RuntimeError("the cold arm's server kept the model loaded for 60 s")
            time.sleep(0.2)

    def run(self, prompt: str, concurrency: int, tokens: int) -> RunResult:
        self.prepare()
        assert self.server.proc is not None and self.gateway.proc is not None
        result = arm_http(
            self.url,
            self.model,
            prompt,
            concurrency,
            tokens,
            token=self.token,
            label="D hostgpu cold" if self.cold else "C hostgpu warm",
            server_pid=self.server.proc.pid,
            gateway_pid=self.gateway.proc.pid,
        )
        with self.gateway.http() as http:
            for stream in result.streams:
                job = http.get(f"/v1/jobs/{stream.job_id}").json()
                stream.engine_ttft = (job.get("result") or {}).get("time_to_first_token")
        return result

    def stop(self) -> None:
        self.server.stop()
        self.gateway.stop()


def start_server(
    model: str, device: str, threads: int | None
) -> tuple[subprocess.Popen[bytes], str, float]:
    """Arm B's server in its own process; returns it, its base URL and its start seconds."""
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hostgpu.inference.server",
            "--model",
            model,
            "--device",
            device,
            "--port",
            str(port),
            *(["--threads", str(threads)] if threads else []),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start within 300 s")
        time.sleep(0.2)
    return proc, f"{url}/v1", time.perf_counter() - started


def cancellation_latency(engine: Engine, samples: int) -> list[float]:
    """Seconds from cancel() to the engine having dropped the request, mid-generation."""
    latencies = []
    params = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
    for _ in range(samples):
        stream = engine.chat([{"role": "user", "content": SHORT}], params)
        for _ in range(3):  # a few tokens in: the request is decoding, not queued
            stream.next(timeout=120)
        cancelled = time.perf_counter()
        stream.cancel()
        if not stream.wait_released(timeout=30):
            raise RuntimeError("a cancelled request was still running after 30 s")
        latencies.append(time.perf_counter() - cancelled)
    return latencies


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--prompts", default="short,long")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cancel-samples", type=int, default=5)
    parser.add_argument("--arms", default="A,B,C,D")
    parser.add_argument(
        "--shared-prompts",
        action="store_true",
        help="the same prompt in every stream (prefix caches then hit; see the docstring)",
    )
    parser.add_argument(
        "--threads", type=int, help="engine CPU threads in both arms (1 is steadier on a busy CPU)"
    )
    args = parser.parse_args(argv)
    global _shared_prompts
    _shared_prompts = args.shared_prompts
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A wide table even when the output is a file or a pipe (rich assumes 80 columns there).
    console = Console(width=max(140, Console().width))
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    prompts = args.prompts.split(",")
    arms = args.arms.split(",")
    load_before = os.getloadavg()

    spec = load_registry().get(args.model)
    if args.threads:
        key = "n_threads" if spec.engine == "llama.cpp" else "threads"
        spec = spec.model_copy(update={"options": {**spec.options, key: args.threads}})
    engine = create_engine(spec)
    engine.load(args.device)
    console.print(
        f"A: loaded {args.model} ({spec.engine}) on {args.device} in {engine.load_seconds:.1f} s"
    )
    server = base_url = None
    if "B" in arms:
        server, base_url, server_start = start_server(args.model, args.device, args.threads)
        console.print(f"B: server up (load included) in {server_start:.1f} s")
    scratch = Path(tempfile.mkdtemp(prefix="hostgpu-inference-bench-"))
    hostgpu_arms = {
        arm: HostgpuArm(args.model, args.threads, scratch / arm, cold=arm == "D")
        for arm in ("C", "D")
        if arm in arms
    }

    results: list[RunResult] = []
    try:
        for round_ in range(args.rounds):
            for prompt in prompts:
                for concurrency in concurrencies:
                    for arm in arms:
                        if arm == "A":
                            result = arm_in_process(
                                engine, PROMPTS[prompt], concurrency, args.tokens
                            )
                        elif arm in hostgpu_arms:
                            result = hostgpu_arms[arm].run(
                                PROMPTS[prompt], concurrency, args.tokens
                            )
                        else:
                            assert base_url is not None and server is not None
                            result = arm_http(
                                base_url,
                                args.model,
                                PROMPTS[prompt],
                                concurrency,
                                args.tokens,
                                server_pid=server.pid,
                            )
                            with httpx.Client(base_url=base_url, timeout=30) as http:
                                for stream in result.streams:
                                    figures = http.get(f"/requests/{stream.job_id}").json()
                                    stream.engine_ttft = figures.get("time_to_first_token")
                        result.prompt = prompt
                        results.append(result)
                        row = result.row()
                        console.print(
                            f"round {round_ + 1} {prompt:5} c={concurrency} {result.arm}: "
                            f"{row['total_tok_s']:.1f} tok/s total, "
                            f"ttft {row['ttft_p50'] * 1000:.0f} ms"
                        )
        cancel = cancellation_latency(engine, args.cancel_samples) if args.cancel_samples else []
    finally:
        engine.unload()
        if server is not None:
            server.terminate()
            server.wait(30)
        for hostgpu_arm in hostgpu_arms.values():
            hostgpu_arm.stop()

    table = Table(
        title=f"{args.model} on {args.device}: {args.tokens} tokens/stream, greedy, "
        f"{args.rounds} round(s)"
    )
    for column in (
        "prompt",
        "conc",
        "arm",
        "TTFT p50 ms",
        "ITL p50 ms",
        "ITL p95 ms",
        "tok/s/stream",
        "tok/s total",
        "vs A",
        "vs B",
        "TTFT − B ms",
        "TTFT − engine ms",
        "path − B ms",
        "server CPU s",
        "gateway CPU s",
    ):
        table.add_column(column, justify="right" if column not in ("prompt", "arm") else "left")
    summary = []
    for prompt in prompts:
        for concurrency in concurrencies:
            base_total = b_total = b_ttft = b_path = None
            for arm_name in dict.fromkeys(r.arm for r in results):
                runs = [
                    r
                    for r in results
                    if r.arm == arm_name and r.prompt == prompt and r.concurrency == concurrency
                ]
                merged = RunResult(
                    arm_name,
                    prompt,
                    concurrency,
                    sum(r.wall for r in runs),
                    [s for r in runs for s in r.streams],
                )
                row = merged.row()
                cpu = [r.server_cpu for r in runs if r.server_cpu is not None]
                gw_cpu = [r.gateway_cpu for r in runs if r.gateway_cpu is not None]
                # Each stream paired with its own job, over every run of the row.
                overhead = merged.path_overhead()
                added = [] if overhead is None else [overhead]
                if base_total is None:
                    base_total = row["total_tok_s"]
                if arm_name.startswith("B"):
                    b_total, b_ttft, b_path = row["total_tok_s"], row["ttft_p50"], overhead
                summary.append(
                    {
                        "prompt": prompt,
                        "concurrency": concurrency,
                        "arm": arm_name,
                        **row,
                        "server_cpu_s": statistics.mean(cpu) if cpu else None,
                        "gateway_cpu_s": statistics.mean(gw_cpu) if gw_cpu else None,
                        "added_ttft_s": statistics.median(added) if added else None,
                    }
                )
                table.add_row(
                    prompt,
                    str(concurrency),
                    arm_name,
                    f"{row['ttft_p50'] * 1000:.0f}",
                    f"{row['itl_p50'] * 1000:.1f}",
                    f"{row['itl_p95'] * 1000:.1f}",
                    f"{row['stream_tok_s']:.1f}",
                    f"{row['total_tok_s']:.1f}",
                    f"{row['total_tok_s'] / base_total:.2f}",
                    f"{row['total_tok_s'] / b_total:.2f}" if b_total else "",
                    f"{(row['ttft_p50'] - b_ttft) * 1000:+.0f}" if b_ttft is not None else "",
                    f"{statistics.median(added) * 1000:+.1f}" if added else "",
                    f"{(overhead - b_path) * 1000:+.1f}"
                    if overhead is not None and b_path is not None
                    else "",
                    f"{statistics.mean(cpu):.1f}" if cpu else "",
                    f"{statistics.mean(gw_cpu):.2f}" if gw_cpu else "",
                )
    console.print(table)
    if cancel:
        console.print(
            f"cancellation (A, {len(cancel)} samples, cancel() → engine dropped the request): "
            f"p50 {statistics.median(cancel) * 1000:.0f} ms, max {max(cancel) * 1000:.0f} ms"
        )
    load_after = os.getloadavg()
    console.print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores shared)"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"inference-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "load_seconds": engine.load_seconds,
                "summary": summary,
                "cancel_seconds": cancel,
                "loadavg": [load_before, load_after],
                "runs": [{**asdict(r), "streams": [asdict(s) for s in r.streams]} for r in results],
            },
            indent=1,
        )
    )
    console.print(f"raw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
