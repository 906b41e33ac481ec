"""The transformers engine: any causal LM on torch (CPU, CUDA, MPS); the one that always works.

Batching is transformers' own continuous batching (``model.init_continuous_batching``, a
paged KV cache and a scheduler thread): a request that arrives while others are decoding joins
the very next forward pass, and a cancelled one leaves it. On this project's two-core test
machine it gives the same greedy text as ``model.generate`` and about the same speed at one
stream, and serves concurrent streams in one batch.

Sampling is ours: continuous batching samples the whole batch with one global setting
(``do_sample``) and one global seed, while OpenAI requests each bring their own temperature,
top_p and seed, and temperature 0 must be exact argmax. So the engine puts one per-request
logits processor (:class:`_Sampler`) in the batch's processor list; for each row it picks the
token (argmax, or a draw from that request's own seeded generator) and returns logits that
are ``-inf`` everywhere but there, so the batch's own sampling step can only pick that token.

A GGUF model is loaded from the converted folder (:mod:`hostgpu.inference.convert`), which
takes 0.3 s instead of de-quantising for 15–25 s at every load.

Options (``[models.NAME.options]``):

- ``dtype``: ``float32`` (default), ``float16`` or ``bfloat16`` (not on the CPU);
- ``kv_cache_tokens``: KV cache shared by all running requests (default 16384: eight
  concurrent 2k-token requests; when it is full, requests wait or are evicted and re-prefilled);
- ``max_batch``: most requests decoded together (default 16);
- ``max_batch_tokens``: most tokens in one forward pass, prefill included (default 512);
- ``page_size``: KV cache page, in tokens (default 256);
- ``convert_gguf``: load GGUFs through the converted cache (default true);
- ``threads``: torch's CPU threads for this process (default: torch's choice, one per core).
  On a CPU shared with other busy processes, 1 is far faster than 2: torch's OpenMP threads
  wait for each other at every operation, and a descheduled one stalls the rest (measured on
  the two-core test machine under load: 8 tokens in 1.2–1.6 s with 1 thread, 13–28 s with 2).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

from hostgpu.errors import DeviceUnavailable
from hostgpu.inference.engines.base import (
    ActiveRequest,
    Engine,
    Message,
    SamplingParams,
    render_chat,
)
from hostgpu.inference.errors import EngineError, EngineUnavailable
from hostgpu.inference.models import DEFAULT_KV_CACHE_TOKENS

log = logging.getLogger("hostgpu.inference")

INSTALL = "pip install 'hostgpu[llm]'"
DTYPES = ("float32", "float16", "bfloat16")


def _import() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise EngineUnavailable(
            f"the transformers engine needs torch and transformers: {INSTALL} ({exc})"
        ) from None
    return torch, transformers


class TransformersEngine(Engine):
    kind = "transformers"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._model: Any = None
        self._tokenizer: Any = None
        self._manager: Any = None
        self._sampler: Any = None
        self._dispatcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._requests: dict[str, ActiveRequest] = {}
        self._seen: dict[str, int] = {}
        self._cancelled: dict[str, ActiveRequest] = {}
        self._lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------
    def _load(self, device: str) -> None:
        torch, transformers = _import()
        from hostgpu.pipelines.embed import check_device

        try:
            check_device(device)
        except DeviceUnavailable as exc:
            raise EngineUnavailable(exc.message) from None
        options = self.spec.options
        dtype_name = str(options.get("dtype", "float32"))
        if dtype_name not in DTYPES:
            raise EngineError(f"{self.spec.name}: dtype {dtype_name!r} is not one of {DTYPES}")
        if device == "cpu" and dtype_name != "float32":
            log.warning(
                "%s: %s on the CPU is slow or unsupported; using float32",
                self.spec.name,
                dtype_name,
            )
            dtype_name = "float32"
        dtype = getattr(torch, dtype_name)
        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))

        folder, gguf_kwargs = self._source()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **gguf_kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, **gguf_kwargs
            )
        except (OSError, ValueError) as exc:
            raise EngineError(f"could not load {self.spec.name} from {folder}: {exc}") from exc
        model = model.to(device).eval()

        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        page_size = int(options.get("page_size", 256))
        kv_tokens = int(options.get("kv_cache_tokens", DEFAULT_KV_CACHE_TOKENS))
        model_context = int(getattr(model.config, "max_position_embeddings", 0) or kv_tokens)
        self._context = min(self.spec.context_length or model_context, model_context, kv_tokens)
        self._eos = frozenset(int(e) for e in eos_ids)
        self._model, self._tokenizer = model, tokenizer
        self._start_batching(page_size, kv_tokens, options)

    def _source(self) -> tuple[str, dict[str, str]]:
        gguf = self.spec.weights_file()
        if gguf is None:
            return str(self.spec.folder()), {}
        if self.spec.options.get("convert_gguf", True):
            from hostgpu.inference.convert import hf_folder

            return str(hf_folder(self.spec)), {}
        return str(gguf.parent), {"gguf_file": gguf.name}

    def _start_batching(self, page_size: int, kv_tokens: int, options: dict[str, Any]) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching import cb_logits_processors as cbl

        # A non-default temperature makes transformers reserve one per-request processor slot
        # (ContinuousBatchingTemperatureLogitsWarper); _Sampler takes that slot below.
        generation_config = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_k=None,
            top_p=None,
            max_new_tokens=self._context,
            eos_token_id=sorted(self._eos) or None,
            pad_token_id=self._tokenizer.pad_token_id,
        )
        self.step_tokens = int(options.get("max_batch_tokens", 512))
        batching = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=max(1, math.ceil(kv_tokens / page_size)),
            max_batch_tokens=self.step_tokens,
            max_requests_per_batch=int(options.get("max_batch", 16)),
            per_request_processors=True,
            use_async_batching=False,
        )
        manager = self._model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=batching
        )
        processors = manager.logit_processor
        slots = [
            p
            for p in processors.logits_processor
            if isinstance(p, cbl.ContinuousBatchingLogitsProcessor)
        ]
        if (
            len(processors.logits_processor) != 1
            or len(slots) != 1
            or processors.tensors_required != 1
        ):
            raise EngineUnavailable(
                "this transformers version's continuous batching is not the one hostgpu was built "
                f"for (processors: {processors}); install transformers 5.24–5.x"
            )
        self._sampler = _make_sampler(cbl.ContinuousBatchingLogitsProcessor)
        processors.logits_processor[0] = self._sampler
        self._manager = manager
        manager.start()
        self._stop.clear()
        self._dispatcher = threading.Thread(
            target=self._dispatch, name=f"hostgpu-{self.spec.name}", daemon=True
        )
        self._dispatcher.start()

    def _unload(self) -> None:
        self._stop.set()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=10)
        if self._manager is not None:
            with contextlib.suppress(Exception):
                self._manager.stop(block=True, timeout=10)
                self._manager.destroy()
        for request in list(self._requests.values()):
            request.fail(EngineError(f"{self.spec.name} was unloaded"))
        self._requests.clear()
        self._cancelled.clear()
        self._model = self._tokenizer = self._manager = self._sampler = None
        self._dispatcher = None
        import gc

        gc.collect()

    # -- tokens ---------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        self._require_loaded()
        encoded = render_chat(
            self.spec.name,
            messages,
            lambda turns: self._tokenizer.apply_chat_template(
                turns, add_generation_prompt=True, tokenize=True, return_dict=True
            ),
        )
        return [int(i) for i in encoded["input_ids"]]

    def encode_text(self, text: str) -> list[int]:
        self._require_loaded()
        return [int(i) for i in self._tokenizer(text, add_special_tokens=True)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _require_loaded(self) -> None:
        if self._tokenizer is None:
            raise EngineError(f"{self.spec.name} is not loaded: call load(device) first")

    # -- generation -----------------------------------------------------------------------
    def _start(self, request: ActiveRequest) -> None:
        manager = self._manager
        with self._lock:
            self._requests[request.id] = request
            self._seen[request.id] = 0
        self._sampler.add(request.id, request.params)
        request.on_cancel = lambda: self._cancel(request)
        eos = sorted(request.eos_ids) or [-1]
        added = manager.add_request(
            request.prompt_ids,
            request_id=request.id,
            max_new_tokens=request.max_tokens,
            streaming=True,
            eos_token_id=eos,
        )
        if added is None:
            with self._lock:
                self._requests.pop(request.id, None)
            self._sampler.remove(request.id)
            raise EngineError(f"{self.spec.name} is not accepting requests (stopping)")

    def _cancel(self, request: ActiveRequest) -> None:
        """Ask the batching loop to drop ``request``; the dispatcher notices when it has."""
        with self._lock:
            if request.id not in self._requests:
                return
            self._cancelled[request.id] = request
        self._manager.cancel_request(request.id)

    def _dispatch(self) -> None:
        """Route the batching loop's outputs to their requests; notice dropped requests."""
        manager = self._manager
        while not self._stop.is_set():
            output = manager.get_result(timeout=0.05)
            if output is not None:
                self._route(output)
            elif not manager.is_running() and self._requests:
                error = EngineError(f"{self.spec.name}: the batching loop stopped unexpectedly")
                for request in list(self._requests.values()):
                    request.fail(error)
                    self._done(request)
            if self._cancelled:
                self._reap_cancelled()

    def _route(self, output: Any) -> None:
        with self._lock:
            request = self._requests.get(output.request_id)
            seen = self._seen.get(output.request_id, 0)
        if request is None:
            return
        if output.error is not None:
            request.fail(EngineError(f"generation failed: {output.error}"))
            self._done(request)
            return
        tokens = output.generated_tokens
        go_on = True
        for token in tokens[seen:]:
            go_on = request.emit(int(token))
            if not go_on:
                break
        with self._lock:
            self._seen[request.id] = len(tokens)
        if output.is_finished():
            request.finish("stop")
            self._done(request)
        elif not go_on:
            self._cancel(request)

    def _reap_cancelled(self) -> None:
        # A cancelled request is gone once the loop has drained the cancellation queue and
        # removed it from its scheduler (that happens before the next forward pass).
        manager = self._manager
        processor = manager.batch_processor
        if processor is None or not manager.cancel_queue.empty():
            return
        scheduler = processor.scheduler
        for request_id, request in list(self._cancelled.items()):
            if (
                request_id not in scheduler.active_requests
                and request_id not in scheduler.waiting_requests
            ):
                self._done(request)

    def _done(self, request: ActiveRequest) -> None:
        with self._lock:
            self._requests.pop(request.id, None)
            self._seen.pop(request.id, None)
            self._cancelled.pop(request.id, None)
        if self._sampler is not None:
            self._sampler.remove(request.id)
        self._forget(request)


def _make_sampler(base: type) -> Any:
    """A per-request sampling processor for transformers' continuous batching."""
    import torch

    class Sampler(base):
        supported_kwargs: dict[str, type] = {}
        ignored_kwargs: tuple[str, ...] = ()

        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._slots: dict[str, int] = {}
            self._params: dict[int, SamplingParams] = {}
            self._generators: dict[int, Any] = {}
            self._next = 1  # slot 0: a row nobody claimed, decoded greedily

        def add(self, request_id: str, params: SamplingParams) -> None:
            with self._lock:
                slot = self._next
                self._next = self._next % 2_000_000_000 + 1
                self._slots[request_id] = slot
                self._params[slot] = params

        def remove(self, request_id: str) -> None:
            with self._lock:
                slot = self._slots.pop(request_id, None)
                self._params.pop(slot, None)  # type: ignore[arg-type]
                self._generators.pop(slot, None)  # type: ignore[arg-type]

        def fill_defaults(self, int32_tensor: Any) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> Any:
            with self._lock:
                slots = [self._slots.get(r.state.request_id, 0) for r in requests_with_new_token]
            return torch.tensor(slots, dtype=torch.int32, device="cpu")

        def __call__(self, scores: Any, tensor_arg: Any) -> Any:
            rows = scores.size(0)
            chosen = scores.argmax(dim=-1)
            slots = tensor_arg[:rows].tolist()
            with self._lock:
                params = [self._params.get(slot) for slot in slots]
            for row, (slot, p) in enumerate(zip(slots, params, strict=True)):
                if p is None or p.greedy:
                    continue
                chosen[row] = self._draw(slot, p, scores[row])
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, chosen.unsqueeze(1), 0.0)
            return out

        def _draw(self, slot: int, p: SamplingParams, logits: Any) -> Any:
            generator = self._generators.get(slot)
            if generator is None:
                generator = torch.Generator(device=logits.device)
                if p.seed is not None:
                    generator.manual_seed(p.seed)
                else:
                    generator.seed()
                self._generators[slot] = generator
            probs = torch.softmax(logits.float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # Keep the smallest set whose mass reaches top_p (the top token always stays).
                outside = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            return torch.multinomial(probs, 1, generator=generator)[0]

    return Sampler()
