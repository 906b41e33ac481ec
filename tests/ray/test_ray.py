"""hostgpu on a real two-node Ray cluster on loopback: a head (this machine's real probe) and
a node that advertises a recorded Mac (``HOSTGPU_PROBE_FACTS``, the probe's one test seam).

One cluster for the whole module (starting Ray nodes costs seconds of both cores); the test
that kills a node runs last and brings its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import hostgpu
from hostgpu import sdk
from hostgpu.errors import JobCancelled, JobFailed, JobTimeout
from hostgpu.functions import FunctionOptions
from tests import rayfuncs
from tests.unit.test_devices import mac

try:
    import ray
except ImportError:  # pragma: no cover - the ray extra is part of the dev install
    if os.environ.get("CI"):
        raise
    pytest.skip("needs the ray extra: pip install 'hostgpu[ray]'", allow_module_level=True)

from hostgpu.ray.backend import RayBackend, RayHandle
from hostgpu.ray.local import RayNode

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
NODE_ENV = {"HOSTGPU_RETRY_BASE_SECONDS": "0.05"}


@dataclass
class Cluster:
    base: Path
    head: RayNode
    mac: RayNode
    backend: RayBackend
    mac_facts: Path
    docs: Path

    def node_id(self, node: RayNode) -> str:
        for n in ray.nodes():
            if n["Alive"] and n["NodeManagerPort"] == node.node_manager_port:
                return str(n["NodeID"])
        raise AssertionError(f"node on port {node.node_manager_port} is not alive")


def _wait_nodes(backend: RayBackend, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len([n for n in ray.nodes() if n["Alive"]]) < count:
        assert time.monotonic() < deadline, f"fewer than {count} Ray nodes joined"
        time.sleep(0.2)
    backend._nodes_at = 0.0  # see them now, not after the cache's second


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("ray")
    facts = base / "mac.json"
    facts.write_text(mac().to_json())
    docs = base / "docs"
    docs.mkdir()
    env = {**NODE_ENV, "HOSTGPU_INGEST_ROOTS": str(docs)}
    head = RayNode(base / "head", pythonpath=str(ROOT), env_extra=env).launch()
    mac_node = RayNode(
        base / "mac",
        head=False,
        address=head.gcs_address,
        facts=facts,
        labels="site=desk",
        pythonpath=str(ROOT),
        env_extra=env,
    )
    patch = pytest.MonkeyPatch()
    try:
        mac_node.launch()  # at once: `ray start --address` waits for the head
        head.wait()
        mac_node.wait()
        patch.setenv("RAY_ADDRESS", head.gcs_address)
        patch.setenv("HOSTGPU_FALLBACK_GRACE_SECONDS", "1")
        backend = hostgpu.connect("ray")
        assert isinstance(backend, RayBackend)
        _wait_nodes(backend, 2)
        yield Cluster(base, head, mac_node, backend, facts, docs)
        backend.close()
    finally:
        patch.undo()
        sdk._backend = None  # later tests connect to their own backend
        mac_node.stop()
        head.stop()


def _run(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hostgpu", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_status_shows_each_node_with_its_hostgpu_devices(cluster: Cluster) -> None:
    out = _run("ray", "status", "--address", cluster.head.gcs_address, "--json", env={})
    assert out.returncode == 0, out.stderr
    nodes = {n["address"].rsplit(":", 1)[1]: n for n in json.loads(out.stdout)}
    mac_node = nodes[str(cluster.mac.node_manager_port)]
    assert [d["kind"] for d in mac_node["devices"]] == ["mps", "cpu"]
    assert mac_node["devices"][0]["name"] == "Apple M2 Pro GPU (Metal)"
    assert mac_node["resources"]["mps"] == 1 and mac_node["resources"]["mps_memory_gb"] == 21
    assert mac_node["labels"] == {"site": "desk"}
    head = nodes[str(cluster.head.node_manager_port)]
    assert head["head"] and "mps" not in head["resources"]
    assert "mps" in head["unavailable"]  # this Linux box says why it has no Metal


def test_mps_function_runs_only_on_the_mps_node_and_sees_mps(cluster: Cluster) -> None:
    mac_id = cluster.node_id(cluster.mac)
    handles = [rayfuncs.on_mps.spawn() for _ in range(3)]
    for handle in handles:
        out = handle.result(timeout=120)
        assert out["device"] == "mps" and out["node"] == mac_id
        assert out["job"] == handle.id  # hostgpu.job_id() is the Ray task id
        assert isinstance(handle, RayHandle) and handle.device == "mps"
        assert handle.status() == "succeeded" and not handle.fallback_used
    handles[0].cancel()  # too late: a finished call keeps its outcome
    assert handles[0].status() == "succeeded"


def test_cpu_function_runs_anywhere(cluster: Cluster) -> None:
    ids = {cluster.node_id(cluster.head), cluster.node_id(cluster.mac)}
    outs = rayfuncs.on_cpu.map(range(6), progress=False)
    assert [o["x"] for o in outs] == list(range(6))
    assert {o["device"] for o in outs} == {"cpu"}
    assert {o["node"] for o in outs} <= ids


def test_a_gpu_no_node_has_says_why_within_seconds(cluster: Cluster) -> None:
    handle = rayfuncs.on_h100.spawn()
    started = time.monotonic()
    with pytest.raises(JobTimeout, match=r"waiting: no Ray node with cuda:h100"):
        handle.result(timeout=2)
    assert time.monotonic() - started < 30
    assert handle.status() == "queued"
    # The Mac node's probe says why it has no CUDA (fetched from the node in the background).
    deadline = time.monotonic() + 60
    while "macOS has no CUDA" not in (handle.waiting or ""):
        assert time.monotonic() < deadline, handle.waiting
        time.sleep(0.5)
    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.result(timeout=10)
    assert handle.status() == "cancelled"


def test_declared_cpu_fallback_runs_after_the_grace_period_and_says_so(cluster: Cluster) -> None:
    handle = rayfuncs.h100_or_cpu.spawn()
    assert handle.result(timeout=120) == "cpu"
    assert isinstance(handle, RayHandle) and handle.fallback_used and handle.device == "cpu"


def test_map_of_a_thousand_returns_in_order(cluster: Cluster) -> None:
    assert rayfuncs.square.map(range(1000), progress=False) == [x * x for x in range(1000)]


def test_failures_timeouts_retries_and_serializers(cluster: Cluster) -> None:
    with pytest.raises(JobFailed) as failed:
        rayfuncs.boom.remote("no good")
    assert failed.value.error_type == "ValueError"
    assert "no good" in str(failed.value) and "Traceback" in (failed.value.remote_traceback or "")

    started = time.monotonic()
    with pytest.raises(JobFailed, match="Timeout: timed out after 1 s"):
        rayfuncs.hang.remote(60)
    assert time.monotonic() - started < 30

    assert rayfuncs.flaky.remote(str(cluster.base / "flaky"), 2) == 3  # retries=2
    with pytest.raises(JobFailed, match="after 1 attempt"):
        rayfuncs.flaky.with_options(retries=0).remote(str(cluster.base / "flaky0"), 1)

    assert rayfuncs.union.remote({1, 2}, {3}) == {1, 2, 3}  # pickle, declared
    with pytest.raises(TypeError, match="JSON"):
        rayfuncs.on_cpu.spawn({1, 2})  # type: ignore[arg-type]


def test_only_published_functions_run(cluster: Cluster) -> None:
    plain = sdk.Function(rayfuncs.not_published, FunctionOptions(gpu="cpu", retries=0))
    with pytest.raises(JobFailed) as refused:
        plain.remote(1)
    assert refused.value.error_type == "NotPublished"
    assert "not a hostgpu function" in str(refused.value)
    system = sdk.Function(os.system, FunctionOptions(gpu="cpu", retries=0))
    with pytest.raises(JobFailed, match="not a hostgpu function"):
        system.remote("true")


def test_widening_the_declaration_is_refused_on_the_node(cluster: Cluster) -> None:
    # A driver whose copy of a function says cpu cannot run the cluster's mps function there.
    widened = sdk.Function(
        rayfuncs.on_mps.fn, rayfuncs.on_mps.options.model_copy(update={"gpu": "cpu"})
    )
    with pytest.raises(JobFailed, match=r"conflicts with .*declared gpu='mps'"):
        widened.remote()


def test_cancel_stops_a_running_call(cluster: Cluster) -> None:
    marker = cluster.base / "running"
    handle = rayfuncs.survive.spawn(str(marker), 120)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, "the call never started"
        time.sleep(0.2)
    assert handle.status() == "submitted"
    pid = int(marker.read_text().split()[1])
    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.result(timeout=30)
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the cancelled call's worker still runs"
        time.sleep(0.2)


def test_a_warm_function_loads_its_model_once(cluster: Cluster) -> None:
    first = [rayfuncs.warm_model.remote(f"t{i}") for i in range(10)]
    more = rayfuncs.warm_model.map([f"m{i}" for i in range(20)], progress=False)
    outs = first + more
    assert [o["out"] for o in outs[:3]] == ["T0", "T1", "T2"]
    assert {o["loads"] for o in outs} == {1}
    assert len({o["pid"] for o in outs}) == 1  # one actor on the one mps node
    assert {o["device"] for o in outs} == {"mps"}


def test_ingest_runs_on_the_cluster_through_ray_client(cluster: Cluster) -> None:
    pytest.importorskip("sentence_transformers")
    for name, text in (("a.txt", "Ray nodes advertise Metal."), ("b.md", "# Two\n\nMore text.")):
        (cluster.docs / name).write_text(text)
    out = _run(
        "ingest",
        str(cluster.docs / "a.txt"),
        str(cluster.docs / "b.md"),
        "--backend",
        cluster.head.client_address,
        env={"HOSTGPU_INGEST_GPU": "cpu", "HOSTGPU_HOME": str(cluster.base / "cli")},
        timeout=280,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 file(s) ingested, 0 failed" in out.stdout, out.stdout


def test_a_node_killed_mid_call_is_retried_by_ray(cluster: Cluster) -> None:
    spare = RayNode(
        cluster.base / "spare",
        head=False,
        address=cluster.head.gcs_address,
        facts=cluster.mac_facts,
        pythonpath=str(ROOT),
        env_extra=NODE_ENV,
    ).start()
    try:
        _wait_nodes(cluster.backend, 3)
        marker = cluster.base / "survive"
        handle: Any = rayfuncs.survive.spawn(str(marker), 6)
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline, "the call never started"
            time.sleep(0.1)
        first = marker.read_text().split()[0]
        victim = spare if first == cluster.node_id(spare) else cluster.mac
        victim.kill()
        out = handle.result(timeout=240)
        assert out["node"] != first and out["device"] == "mps"
    finally:
        spare.stop()
