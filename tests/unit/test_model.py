"""The job model's rules, each in one place: the state machine, the option merge, the retry
rule, the token scopes, and the package's public face."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hostgpu
from hostgpu.errors import OptionsConflict
from hostgpu.functions import FunctionOptions, Requested, resolve
from hostgpu.jobs import TRANSITIONS, Event, JobState, next_state
from hostgpu.retry import RetryPolicy
from hostgpu.tokens import SCOPES, admits

Q, L, R = JobState.queued, JobState.leased, JobState.running
S, F, C = JobState.succeeded, JobState.failed, JobState.cancelled

#: Every (state, event) pair that may happen, and where it leads. Anything else is refused.
ALLOWED = {
    (Q, Event.lease): L,
    (L, Event.start): R,
    (R, Event.start): R,
    (L, Event.succeed): S,
    (R, Event.succeed): S,
    (L, Event.fail): F,
    (R, Event.fail): F,
    (L, Event.retry): Q,
    (R, Event.retry): Q,
    (L, Event.release): Q,
    (R, Event.release): Q,
    (L, Event.lose): Q,
    (R, Event.lose): Q,
    (L, Event.give_up): F,
    (R, Event.give_up): F,
    (Q, Event.cancel): C,
    (L, Event.cancel): C,
    (R, Event.cancel): C,
    (Q, Event.reject): F,
    (F, Event.rerun): Q,
    (C, Event.rerun): Q,
    (L, Event.requeue): Q,
    (R, Event.requeue): Q,
}


@pytest.mark.parametrize("state", list(JobState))
@pytest.mark.parametrize("event", list(Event))
def test_state_machine(state: JobState, event: Event) -> None:
    expected = ALLOWED.get((state, event))
    if expected is None:
        with pytest.raises(ValueError, match="cannot"):
            next_state(state, event)
    else:
        assert next_state(state, event) is expected


def test_every_event_has_a_transition_and_succeeded_is_final() -> None:
    assert set(TRANSITIONS) == set(Event)
    assert not any(S in sources for sources, _ in TRANSITIONS.values())


DECLARED = FunctionOptions(gpu="mps", timeout=60, retries=0, memory=8, labels={"zone": "a"})


@pytest.mark.parametrize(
    ("asked", "gpu"),
    [
        (Requested(), "mps"),
        (Requested(timeout_s=30, max_retries=0, min_memory_gb=16), "mps"),
        (Requested(labels={"zone": "a", "extra": "x"}), "mps"),
        (Requested(priority=99, fallback="none"), "mps"),
    ],
)
def test_a_submission_may_narrow_the_declaration(asked: Requested, gpu: str) -> None:
    resolved = resolve("m:f", DECLARED, asked)
    assert resolved.requirements.gpu == gpu
    assert resolved.timeout_s <= 60 and resolved.max_retries == 0
    assert resolved.requirements.labels["zone"] == "a"


@pytest.mark.parametrize(
    ("asked", "field"),
    [
        (Requested(gpu="any"), "gpu"),
        (Requested(gpu="cpu"), "gpu"),
        (Requested(gpu="cuda"), "gpu"),
        (Requested(timeout_s=600), "timeout"),
        (Requested(max_retries=2), "retries"),
        (Requested(min_memory_gb=1), "min_memory_gb"),
        (Requested(fallback="cpu"), "fallback"),
        (Requested(serializer="pickle"), "serializer"),
        (Requested(labels={"zone": "b"}), "labels[zone]"),
    ],
)
def test_a_submission_never_widens_the_declaration(asked: Requested, field: str) -> None:
    with pytest.raises(OptionsConflict, match=rf"{field.replace('[', '.').replace(']', '.')}"):
        resolve("m:f", DECLARED, asked)


def test_gpu_narrowing_rules() -> None:
    assert (
        resolve("m:f", FunctionOptions(gpu="gpu"), Requested(gpu="cuda:H100")).requirements.gpu
        == "cuda:h100"
    )
    assert (
        resolve("m:f", FunctionOptions(gpu="cuda"), Requested(gpu="cuda:a100")).requirements.gpu
        == "cuda:a100"
    )
    assert resolve(
        "m:f", FunctionOptions(gpu="cuda:h100"), Requested(gpu="cuda:h100 sxm")
    ).requirements.gpu
    with pytest.raises(OptionsConflict):
        resolve("m:f", FunctionOptions(gpu="cuda:h100"), Requested(gpu="cuda:a100"))
    with pytest.raises(OptionsConflict):
        resolve("m:f", FunctionOptions(gpu="gpu"), Requested(gpu="cpu"))
    # A declared CPU fallback is the only way from an accelerator to the CPU.
    lenient = FunctionOptions(gpu="mps", fallback="cpu")
    assert resolve("m:f", lenient, Requested(gpu="cpu")).requirements.gpu == "cpu"
    # Without a declaration there is nothing to widen: the submission's options (or defaults).
    assert resolve("m:f", None, Requested(gpu="cpu", max_retries=7)).max_retries == 7


def test_retry_rule() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=8.0, max_lost=2)
    assert policy.after_failure(1, 2, retryable=True).again
    assert not policy.after_failure(3, 2, retryable=True).again
    assert "retries=2" in policy.after_failure(3, 2, retryable=True).reason
    assert not policy.after_failure(1, 5, retryable=False).again
    delays = [policy.backoff(10) for _ in range(200)]
    assert 0 <= min(delays) < 2 and 6 < max(delays) <= 8  # full jitter up to the cap
    assert policy.after_lost_lease(2).again and policy.after_lost_lease(2).delay_s == 0
    assert "HOSTGPU_MAX_LOST_LEASES=2" in policy.after_lost_lease(3).reason


def test_token_scopes() -> None:
    assert admits("admin", ("worker",))
    assert admits("submit", ("read",)) and not admits("read", ("submit",))
    # A share token is not a worker token: the worker routes admit it on their own terms
    # (models only, its own machine only; tests/inference/test_gateway.py).
    assert not admits("share", ("worker",)) and not admits("worker", ("share",))
    assert admits("share", ("worker", "share")) and not admits("share", ("read",))
    assert not admits("infer", ("submit",)) and not admits("worker", ("read",))
    assert set(SCOPES) == {"admin", "submit", "worker", "read", "infer", "share"}


def test_public_api_is_pinned() -> None:
    """The package's face, like httpx's test_exported_members: a change here is deliberate."""
    assert hostgpu.__all__ == [
        "Client",
        "Function",
        "FunctionOptions",
        "HostGPUError",
        "JobCancelled",
        "JobFailed",
        "JobHandle",
        "JobTimeout",
        "__version__",
        "connect",
        "device",
        "errors",
        "function",
        "job_id",
        "register",
    ]
    for name in hostgpu.__all__:
        assert getattr(hostgpu, name) is not None


def test_a_worker_child_starts_without_the_client_stack() -> None:
    """`import hostgpu` and the worker child pull no httpx, rich or pydantic-settings: every
    spawned child pays for its imports."""
    code = (
        "import sys, hostgpu, hostgpu.worker.child, hostgpu.builtin\n"
        "heavy = [m for m in ('httpx', 'rich', 'pydantic_settings', 'torch') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"a child imports {out.stdout.strip()}"


def test_the_package_and_its_metadata_agree_on_the_version() -> None:
    import tomllib
    from pathlib import Path

    import hostgpu

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert hostgpu.__version__ == pyproject["project"]["version"]


def test_up_says_when_its_worker_cannot_run_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from hostgpu.cli.local import pipeline_note

    assert pipeline_note() is None  # the dev install has the ml extra
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sentence_transformers" else real(name, *a),
    )
    assert "pip install 'hostgpu[ml]'" in (pipeline_note() or "")
