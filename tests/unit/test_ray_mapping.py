"""The mapping between probed devices, function options and Ray resources (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostgpu.devices import probe
from hostgpu.errors import ConfigError
from hostgpu.ray.node import plan_start
from hostgpu.ray.resources import (
    NodeView,
    advertise,
    fits,
    name_fragments,
    parse_labels,
    ray_accelerator_type,
    request_for,
    waiting_reason,
)
from hostgpu.requirements import Requirements
from tests.unit.test_devices import FakeTorch, GiB, docker_desktop_mac, linux, mac

H100 = ("NVIDIA H100 80GB HBM3", 80 * GiB, 9, 0)


def node(advert_resources: dict[str, float], labels: dict[str, str] | None = None) -> NodeView:
    return NodeView("n1", "127.0.0.2:1", {"CPU": 4, **advert_resources}, labels or {})


def test_a_native_mac_advertises_mps_with_its_memory() -> None:
    advert = advertise(probe(facts=mac()), {"site": "desk"})
    assert advert.num_gpus == 0
    assert advert.resources == {"mps": 1, "mps_memory_gb": 21.0, "gpu": 1}
    assert advert.labels == {"site": "desk"}
    assert advert.in_mac_vm is None
    description = json.loads(advert.node_json())
    assert [d["kind"] for d in description["devices"]] == ["mps", "cpu"]
    assert "macOS has no CUDA" in description["unavailable"]["cuda"]


def test_a_mac_in_docker_desktop_advertises_nothing_and_says_why() -> None:
    advert = advertise(probe(facts=docker_desktop_mac()))
    assert advert.num_gpus == 0 and advert.resources == {}
    assert advert.in_mac_vm == "Docker Desktop's Linux VM on macOS"
    assert "Metal is unreachable" in advert.unavailable["mps"]
    assert "natively" in advert.fixes["mps"]


def test_cuda_devices_become_gpus_ray_types_and_name_words() -> None:
    advert = advertise(probe(facts=linux(torch=FakeTorch(gpus=[H100, H100]))))
    assert advert.num_gpus == 2
    assert advert.resources["accelerator_type:H100"] == 1
    assert advert.resources["cuda:h100"] == 1
    assert advert.resources["cuda:nvidia h100 80gb hbm3"] == 1
    assert advert.resources["cuda_memory_gb"] == 160.0
    assert "mps" not in advert.resources and "gpu" not in advert.resources


def test_name_fragments_are_runs_of_whole_words() -> None:
    assert name_fragments("Tesla V100-SXM2-16GB") == [
        "tesla",
        "tesla v100",
        "tesla v100-sxm2",
        "tesla v100-sxm2-16gb",
        "v100",
        "v100-sxm2",
        "v100-sxm2-16gb",
        "sxm2",
        "sxm2-16gb",
        "16gb",
    ]
    assert ray_accelerator_type("Tesla V100-SXM2-16GB") == "V100"
    assert ray_accelerator_type("NVIDIA GeForce RTX 4090") == "GeForce-RTX-4090"


def test_requests_follow_the_routing_rule() -> None:
    mps = request_for(Requirements(gpu="mps", min_memory_gb=8, labels={"site": "desk"}))
    assert mps.ray_options() == {
        "num_cpus": 1,
        "num_gpus": 0,
        "resources": {"mps": 0.001, "mps_memory_gb": 8},
        "label_selector": {"site": "desk"},
    }
    cuda = request_for(Requirements(gpu="cuda:H100"))
    assert cuda.num_gpus == 1 and dict(cuda.resources) == {"cuda:h100": 0.001}
    assert request_for(Requirements(gpu="cpu")).ray_options() == {"num_cpus": 1, "num_gpus": 0}
    assert request_for(Requirements(gpu="any", min_memory_gb=2)).memory_bytes == 2 * GiB
    # "gpu": CUDA when the cluster has a GPU (Ray assigns it), else a Mac's GPU.
    gpu_node = node({"GPU": 1})
    assert request_for(Requirements(gpu="gpu"), [gpu_node]).kind == "cuda"
    assert request_for(Requirements(gpu="gpu"), [node({"mps": 1})]).kind == "gpu"
    assert request_for(Requirements(gpu="gpu", min_memory_gb=4)).kind == "mps"
    # Warm actors take no CPU for their lifetime.
    assert request_for(Requirements(gpu="mps"), num_cpus=0).needs() == {"mps": 0.001}


def test_feasibility_and_the_waiting_reason() -> None:
    mac_node = node(advertise(probe(facts=mac())).resources, {"site": "desk"})
    head = node({})
    mps = request_for(Requirements(gpu="mps"))
    assert fits(mps, mac_node) and not fits(mps, head)
    assert waiting_reason(mps, [head, mac_node]) is None

    h100 = request_for(Requirements(gpu="cuda:h100"))
    reasons = {"n1": {"cuda": "macOS has no CUDA: Apple GPUs are reached through Metal (MPS)"}}
    reason = waiting_reason(h100, [mac_node], reasons)
    assert reason is not None
    assert reason.startswith("waiting: no Ray node with cuda:h100 (")
    assert "macOS has no CUDA" in reason

    big = request_for(Requirements(gpu="mps", min_memory_gb=64))
    assert "the largest has 21 GB" in (waiting_reason(big, [mac_node]) or "")
    elsewhere = request_for(Requirements(gpu="mps", labels={"site": "lab"}))
    assert "no node has the labels site=lab" in (waiting_reason(elsewhere, [mac_node]) or "")
    assert waiting_reason(mps, []) == "waiting: no Ray node is alive"
    assert (waiting_reason(h100, [mac_node], fallback="cpu") or "").endswith(
        "(may fall back to cpu after the grace period)"
    )
    named = node({"GPU": 1, "cuda:h100": 1, "cuda:nvidia h100": 1})
    partial = request_for(Requirements(gpu="cuda:h10"))
    assert "whole words" in (waiting_reason(partial, [named]) or "")


def test_labels_are_checked_for_ray() -> None:
    assert parse_labels("zone=a, team=ml") == {"zone": "a", "team": "ml"}
    assert parse_labels(["hostgpu.dev/site=desk"]) == {"hostgpu.dev/site": "desk"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_labels("zone")
    with pytest.raises(ConfigError, match="up to 63"):
        parse_labels("zone=a b")


def test_ray_start_merges_the_users_options() -> None:
    advert = advertise(probe(facts=mac()), {"zone": "a"})
    plan = plan_start(
        advert,
        head=True,
        address=None,
        extra=["--port", "0", '--resources={"ssd": 2, "mps": 4}', "--labels", "rack=3"],
        environ={"PATH": "/bin"},
    )
    argv = plan.argv[3:]
    assert argv[:2] == ["start", "--head"]
    resources = json.loads(argv[argv.index("--resources") + 1])
    assert resources == {"gpu": 1, "mps": 4, "mps_memory_gb": 21.0, "ssd": 2}
    assert argv[argv.index("--labels") + 1] == "rack=3,zone=a"
    assert argv[argv.index("--num-gpus") + 1] == "0"
    assert argv[-2:] == ["--port", "0"]
    assert any("mps=4" in note for note in plan.notes)
    assert json.loads(plan.env["HOSTGPU_RAY_NODE"])["devices"][0]["kind"] == "mps"
    with pytest.raises(ConfigError, match="--head"):
        plan_start(advert, head=False, address=None)
    with pytest.raises(ConfigError, match="one of them"):
        plan_start(advert, head=True, address="127.0.0.2:6379")


def test_a_joining_node_is_told_about_token_auth(tmp_path: Path) -> None:
    """`ray start --head` turns token auth on where a token exists; a joining node never
    does, and fails with Ray's "InvalidAuthToken": say what to set before that happens."""
    advert = advertise(probe(facts=mac()))
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    join = plan_start(advert, head=False, address="127.0.0.2:6379", environ=env)
    assert not any("RAY_AUTH_MODE" in note for note in join.notes)  # no token anywhere
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("t" * 64)
    join = plan_start(advert, head=False, address="127.0.0.2:6379", environ=env)
    assert any("set RAY_AUTH_MODE=token" in note for note in join.notes)
    assert "RAY_AUTH_MODE" not in join.env  # Ray's own rule: an explicit address never
    token = tmp_path / "token"
    token.write_text("t" * 64)
    elsewhere = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(token)}
    assert plan_start(advert, head=False, address="a:1", environ=elsewhere).notes
    chosen = {**env, "RAY_AUTH_MODE": "token"}  # the user has decided: nothing to say
    assert not plan_start(advert, head=False, address="a:1", environ=chosen).notes
    assert not plan_start(advert, head=True, address=None, environ=env).notes


def test_ray_start_in_a_macs_docker_vm_prints_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from hostgpu.cli.ray import app

    facts = tmp_path / "vm.json"
    facts.write_text(docker_desktop_mac().to_json())
    monkeypatch.setenv("HOSTGPU_PROBE_FACTS", str(facts))
    monkeypatch.setenv("HOSTGPU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOSTGPU_LABELS", "site=lab")
    result = CliRunner().invoke(app, ["start", "--head", "--dry-run", "--port", "6390"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps long lines
    assert "advertises no accelerator" in out and "Metal is unreachable" in out
    assert "ray start --head --num-gpus 0 --labels site=lab --port 6390" in out
