"""The mlx_lm engine: Apple silicon's GPU through MLX (and MLX's CPU backend elsewhere).

On Linux ``pip install "mlx-lm[cpu]"`` brings MLX with its CPU backend only (plain ``mlx-lm``
installs no MLX there); that is what this project's tests run on.

mlx_lm reads Hugging Face folders, not GGUF files: a GGUF spec is converted once to a
safetensors folder in the model cache (:mod:`hostgpu.inference.convert`, which needs torch and
transformers, both in the ``llm`` extra).

Batching is mlx_lm's ``BatchGenerator`` (continuous batching: prompts are prefilled and join
the decoding batch between steps), driven by one engine thread that owns every MLX call.
Each request gets its own sampler: the shared greedy one for temperature 0 (so an all-greedy
batch samples in one call), else a seeded categorical draw after top-p.

Devices: ``cpu``; ``gpu``, ``mps`` or ``mlx`` mean MLX's GPU (Metal on a Mac), refused when
this MLX build has none.

Options: ``max_batch`` (most sequences decoded together, default 16), ``prefill_batch``
(default 8), ``prefill_step`` (prompt tokens per step, default 2048).
"""

from __future__ import annotations

import queue
import random
from collections.abc import Callable, Sequence
from typing import Any

from hostgpu.inference.engines.base import (
    ActiveRequest,
    Message,
    SamplingParams,
    render_chat,
)
from hostgpu.inference.engines.threaded import ThreadedEngine
from hostgpu.inference.errors import EngineError, EngineUnavailable

INSTALL = 'pip install mlx-lm (on Linux: pip install "mlx-lm[cpu]")'
GPU_NAMES = ("gpu", "mps", "mlx", "metal")
MAX_DEFAULT_CONTEXT = 8192


def _import() -> tuple[Any, Any]:
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError:
        raise EngineUnavailable(f"the mlx_lm engine needs mlx and mlx-lm: {INSTALL}") from None
    return mx, mlx_lm


def mlx_device(mx: Any, device: str) -> Any:
    """The MLX device for a hostgpu device string."""
    kind = device.partition(":")[0]
    if kind == "cpu":
        return mx.cpu
    if kind in GPU_NAMES:
        if not mx.is_available(mx.gpu):
            raise EngineUnavailable(
                f"MLX here has only its CPU backend, so {device!r} is not usable: on a Mac "
                "run natively (not in a container) with `pip install mlx-lm`; or load on 'cpu'"
            )
        return mx.gpu
    raise EngineUnavailable(f"unknown MLX device {device!r}: use cpu, or gpu/mps for Metal")


class MlxEngine(ThreadedEngine):
    """mlx_lm's continuous batching, driven by the engine thread (see the module's text)."""

    kind = "mlx_lm"
    #: ``mlx.core``, the loaded model, its tokenizer and the device (None while unloaded).
    _mx: Any = None
    _model: Any = None
    _tokenizer: Any = None
    _target: Any = None

    def _load(self, device: str) -> None:
        mx, mlx_lm = _import()
        target = mlx_device(mx, device)
        from hostgpu.inference.convert import hf_folder

        folder = hf_folder(self.spec)
        try:
            model, tokenizer, config = mlx_lm.load(str(folder), return_config=True)
        except (OSError, ValueError) as exc:
            raise EngineError(f"mlx_lm could not load {folder}: {exc}") from exc
        model_context = int(config.get("max_position_embeddings") or MAX_DEFAULT_CONTEXT)
        self._context = min(self.spec.context_length or model_context, model_context)
        self._eos = frozenset(int(i) for i in tokenizer.eos_token_ids)
        self._mx, self._model, self._tokenizer = mx, model, tokenizer
        self._target = target
        self._start_thread()

    def _unload(self) -> None:
        self._stop_thread()
        self._model = self._tokenizer = self._target = None
        if self._mx is not None:
            self._mx.clear_cache()

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        ids = render_chat(
            self.spec.name,
            messages,
            lambda turns: self._tokenizer.apply_chat_template(
                turns, add_generation_prompt=True, tokenize=True
            ),
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def encode_text(self, text: str) -> list[int]:
        return [int(i) for i in self._tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    # -- the engine thread ----------------------------------------------------------------
    def _sampler(self, params: SamplingParams) -> Callable[[Any], Any]:
        from mlx_lm.sample_utils import apply_top_p, greedy_sampler

        if params.greedy:
            return greedy_sampler
        mx = self._mx
        key = mx.random.key(params.seed if params.seed is not None else random.getrandbits(31))
        scale = 1.0 / params.temperature

        def sample(logprobs: Any) -> Any:
            nonlocal key
            key, draw = mx.random.split(key)
            if params.top_p < 1.0:
                logprobs = apply_top_p(logprobs, params.top_p)
            return mx.random.categorical(logprobs * scale, key=draw)

        return sample

    def _run(self) -> None:
        from mlx_lm.generate import BatchGenerator

        options = self.spec.options
        # MLX streams belong to the thread that made them: this one makes every MLX call.
        stream = self._mx.new_stream(self._target)
        generator = BatchGenerator(
            self._model,
            completion_batch_size=int(options.get("max_batch", 16)),
            prefill_batch_size=int(options.get("prefill_batch", 8)),
            prefill_step_size=int(options.get("prefill_step", 2048)),
            stream=stream,
        )
        by_uid: dict[int, ActiveRequest] = {}
        try:
            while True:
                # Block for work only when nothing is running.
                try:
                    incoming = [self._inbox.get(timeout=None if not by_uid else 0)]
                except queue.Empty:
                    incoming = []
                while True:
                    try:
                        incoming.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if None in incoming:
                    for left in incoming:
                        if left is not None:
                            left.fail(EngineError(f"{self.spec.name} was unloaded"))
                    return
                for request in filter(None, incoming):
                    if request.done:
                        self._forget(request)
                        continue
                    (uid,) = generator.insert(
                        [request.prompt_ids],
                        max_tokens=[request.max_tokens],
                        samplers=[self._sampler(request.params)],
                    )
                    by_uid[uid] = request
                # Drop what was cancelled (or stopped) since the last step.
                gone = [uid for uid, r in by_uid.items() if r.done]
                if gone:
                    generator.remove(gone)
                    for uid in gone:
                        self._forget(by_uid.pop(uid))
                if not by_uid:
                    continue
                for response in generator.next_generated():
                    running = by_uid.get(response.uid)
                    if running is None:
                        continue
                    go_on = running.emit(int(response.token))
                    if response.finish_reason is not None:
                        running.finish("stop")
                        self._forget(by_uid.pop(response.uid))
                    elif not go_on:
                        generator.remove([response.uid])
                        self._forget(by_uid.pop(response.uid))
        except Exception as exc:
            # Give up on this load: fail what runs and what waits; later requests are refused.
            self._failure = exc
            error = EngineError(f"mlx_lm failed: {exc}")
            for failed in by_uid.values():
                failed.fail(error)
                self._forget(failed)
            self._fail_waiting(error)
        finally:
            generator.close()
