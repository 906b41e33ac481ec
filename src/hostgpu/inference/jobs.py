"""An inference request as a job of the durable queue, and the stream events that carry its
tokens from the model server back to the gateway.

The gateway turns ``POST /v1/chat/completions`` into a job of :data:`INFERENCE_FUNCTION` whose
payload is a :class:`GenerateRequest` and whose labels name the model
(:func:`model_label`). Only model servers (``hostgpu serve``, ``hostgpu share``) publish that
function, and each carries one such label per model it may load, so the queue's ordinary
routing (function, device, labels, priority) sends the request to a machine that can serve
it, and lease expiry re-runs it elsewhere when that machine dies. The job's result is a
:class:`GenerateResult`; while it runs, the server sends :class:`StreamEvent` batches on its
worker channel (``ChannelUp.stream``; over HTTP, ``POST /v1/workers/{id}/streams``) and the
gateway relays them to the waiting client.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hostgpu.functions import FunctionOptions
from hostgpu.inference.engines.base import SamplingParams
from hostgpu.requirements import NO_NUL, NOT_BOOL

#: The one function model servers publish; no @hostgpu.function code is behind it, so a
#: function worker can never run it and a model server can never run anything else.
INFERENCE_FUNCTION = "hostgpu.inference.serving:generate"
#: Label key prefix: a model server has ``hostgpu.model/<name>: serve`` for each model it serves.
MODEL_LABEL_PREFIX = "hostgpu.model/"
MODEL_LABEL_VALUE = "serve"
#: Set by the gateway on a machine registered with a ``share`` token (the token's id), and
#: only then: the gateway strips it from other registrations.
LENDER_LABEL = "hostgpu.lender"
#: At most this many models per server (worker labels are matched as subsets of at most 8).
MAX_MODELS_PER_SERVER = 6
#: Interactive requests go ahead of batch jobs (whose default priority is 0).
INTERACTIVE_PRIORITY = 100


def model_label(model: str) -> str:
    return f"{MODEL_LABEL_PREFIX}{model}"


def served_models(labels: dict[str, str]) -> list[str]:
    """The models a worker with ``labels`` serves."""
    return sorted(
        key[len(MODEL_LABEL_PREFIX) :]
        for key, value in labels.items()
        if key.startswith(MODEL_LABEL_PREFIX) and value == MODEL_LABEL_VALUE
    )


def function_options(timeout: float) -> FunctionOptions:
    # A lost lease (the server died) re-runs the request elsewhere; an engine failure does
    # not (it would fail the same way), so retries stay 0.
    return FunctionOptions(gpu="any", timeout=timeout, retries=0, priority=INTERACTIVE_PRIORITY)


class GenerateRequest(BaseModel):
    """The payload of an inference job (``payload.kwargs.request``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    kind: Literal["chat", "completion"]
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    sampling: SamplingParams  # a dataclass: pydantic validates it field by field


class GenerateResult(BaseModel):
    """An inference job's result."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None = None
    duration: float = 0.0
    device: str | None = None


class StreamEvent(BaseModel):
    """New text of one running inference job, or its end."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    lease_token: str = Field(pattern=r"^[0-9a-f]{1,64}$")
    text: str = Field(default="", max_length=1_000_000, pattern=NO_NUL)
    #: Characters of this attempt's text before ``text``: a reader tells a missing or repeated
    #: event by it (events forwarded between gateways can be lost). None: not given (older
    #: servers), the events are taken in order as they come.
    offset: Annotated[int, Field(ge=0, le=100_000_000), NOT_BOOL] | None = None
    tokens: Annotated[int, Field(ge=0, le=1_000_000), NOT_BOOL] = 0
    device: str | None = Field(default=None, max_length=100)
    #: Set on the last event: how the generation ended (the job's report follows).
    result: GenerateResult | None = None
    #: Set on the last event of a failed generation: what went wrong (OpenAI's error body).
    error: dict[str, Any] | None = None


class EngineState(BaseModel):
    """One model on one server, for ``GET /v1/models`` and least-pressure routing."""

    model: str
    loaded: bool
    device: str | None = None
    active: Annotated[int, Field(ge=0), NOT_BOOL] = 0
