"""The trust boundary end to end: only published functions run, and a function's declared
options hold whoever submits it (SDK, CLI, or a plain HTTP client)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, Worker
from tests.unit.test_devices import mac

FUNCTION = "tests.e2efuncs:declared_mps"


def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")}
    env.update(HOSTGPU_HOME=str(gateway.home), HOSTGPU_GATEWAY=gateway.url, COLUMNS="300")
    env["HOSTGPU_TOKEN"] = gateway.token
    return subprocess.run(
        [sys.executable, "-m", "hostgpu", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def submit_token(gateway: Gateway) -> str:
    with gateway.client() as api:
        return api.create_token("outside client", "submit").token


def wait_state(http: httpx.Client, job_id: str, *states: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}", params={"wait": 1}).json()
        if job["state"] in states or time.monotonic() > deadline:
            return job


@pytest.mark.parametrize(
    "function",
    ["hostgpu.builtin:os.system", "tests.e2efuncs:os.system", "tests.e2efuncs:hostgpu.function"],
)
def test_a_submit_token_cannot_run_arbitrary_attributes(
    gateway: Gateway, worker: Worker, function: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    with gateway.http(submit_token(gateway)) as http:
        reply = http.post(
            "/v1/jobs", json={"function": function, "payload": {"args": [f"touch {marker}"]}}
        )
    assert reply.status_code == 422, reply.text
    assert f"{function} is not a hostgpu function" in reply.json()["detail"]
    time.sleep(1)
    assert not marker.exists()


def test_a_job_queued_before_any_worker_is_rejected_when_one_registers(
    gateway: Gateway, workers: list[Worker], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    with gateway.http(submit_token(gateway)) as http:
        body = {"function": "tests.e2efuncs:os.system", "payload": {"args": [f"touch {marker}"]}}
        job = http.post("/v1/jobs", json=body).json()
        assert job["state"] == "queued" and "--import tests.e2efuncs" in job["waiting"]
        workers.append(Worker(gateway).start())
        job = wait_state(http, job["id"], "failed")
    assert job["state"] == "failed"
    assert job["error"]["kind"] == "forbidden" and job["attempts"] == 0
    assert not marker.exists()


def test_declared_options_hold_for_the_cli_and_a_raw_post(gateway: Gateway, worker: Worker) -> None:
    """gpu="mps", retries=0, timeout=60: never `any` on a CPU fleet, whoever submits."""
    done = cli(gateway, "submit", FUNCTION, "--no-wait")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[0]
    with gateway.http(submit_token(gateway)) as http:
        raw = http.post("/v1/jobs", json={"function": FUNCTION}).json()
        for jid in (job_id, raw["id"]):
            job = http.get(f"/v1/jobs/{jid}").json()
            assert job["requirements"]["gpu"] == "mps"
            assert job["max_retries"] == 0 and job["timeout_s"] == 60
        time.sleep(2)  # a CPU worker is alive and imports the module: it must not take them
        for jid in (job_id, raw["id"]):
            job = http.get(f"/v1/jobs/{jid}").json()
            assert job["state"] == "queued" and job["attempts"] == 0
            assert "no worker with mps" in job["waiting"]
        # Widening is refused, naming both values; narrowing is fine.
        wide = http.post("/v1/jobs", json={"function": FUNCTION, "gpu": "cpu"})
        assert wide.status_code == 422
        assert "gpu='cpu'" in wide.json()["detail"] and "gpu='mps'" in wide.json()["detail"]
        longer = http.post("/v1/jobs", json={"function": FUNCTION, "timeout_s": 600})
        assert longer.status_code == 422 and "timeout" in longer.json()["detail"]
        shorter = http.post("/v1/jobs", json={"function": FUNCTION, "timeout_s": 5})
        assert shorter.status_code == 201 and shorter.json()["timeout_s"] == 5
    cpu = cli(gateway, "submit", FUNCTION, "--gpu", "cpu", "--no-wait")
    assert cpu.returncode != 0 and "conflicts" in cpu.stderr


def test_an_mps_function_runs_on_the_mac(
    gateway: Gateway, workers: list[Worker], tmp_path: Path
) -> None:
    """The same submission, with a (recorded) Mac in the fleet: it runs there, on mps."""
    facts = tmp_path / "mac.json"
    facts.write_text(mac().to_json())
    cpu_box = Worker(gateway).start()
    workers.append(cpu_box)
    workers.append(Worker(gateway, env_extra={"HOSTGPU_PROBE_FACTS": str(facts)}).start())
    done = cli(gateway, "submit", FUNCTION, "--arg", "from the cli", "--json")
    assert done.returncode == 0, done.stderr
    assert '"device": "mps"' in done.stdout
