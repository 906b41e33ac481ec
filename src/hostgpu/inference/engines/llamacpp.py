"""The llama.cpp engine, through the optional ``llama-cpp-python`` package.

``llama-cpp-python`` has no Linux wheel: ``pip install llama-cpp-python`` compiles llama.cpp
(about 8 CPU-minutes), so it is never a required dependency; a spec naming this engine says
how to install it when it is missing.

Its high-level ``Llama`` object holds one sequence, so this engine serves requests one after
another on its own thread, in arrival order; llama.cpp's speed at one stream (70–84 tok/s for
SmolLM2 Q4_1 on two cores, against 10–19 for transformers fp32) makes up for it at low
concurrency. A cancelled or stopped request leaves the loop before its next token; one that
waits in the queue never starts. Consecutive requests that share a prompt prefix reuse the KV
cache (``generate(reset=True)`` keeps the longest common prefix).

Options:

- ``n_ctx``: context length (default: the model's, at most 8192);
- ``n_threads``: CPU threads (default: llama.cpp's choice);
- ``n_batch``: prompt tokens per forward pass (default 512);
- ``extra_bufts``: let llama.cpp repack weights into extra buffer types (default false: on
  some x86 CPUs decoding segfaults with it, see FACTS.md).
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from hostgpu.inference.engines.base import (
    ActiveRequest,
    Message,
    render_chat,
)
from hostgpu.inference.engines.threaded import ThreadedEngine
from hostgpu.inference.errors import EngineError, EngineUnavailable, InvalidRequest

INSTALL = "pip install llama-cpp-python (it compiles llama.cpp: a few minutes)"
MAX_DEFAULT_CONTEXT = 8192
_load_lock = threading.Lock()


def _import() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise EngineUnavailable(f"the llama.cpp engine needs llama-cpp-python: {INSTALL}") from None
    return llama_cpp


@contextlib.contextmanager
def _model_params(llama_cpp: Any, extra_bufts: bool) -> Iterator[None]:
    """Load with ``use_extra_bufts`` set: ``Llama()`` has no argument for it.

    ``Llama.__init__`` starts from ``llama_model_default_params()``; for the length of the
    load, that function hands out defaults with the flag changed (loads are serialised).
    """
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params

    def patched() -> Any:
        params = original()
        params.use_extra_bufts = extra_bufts
        return params

    with _load_lock:
        low.llama_model_default_params = patched
        try:
            yield
        finally:
            low.llama_model_default_params = original


class LlamaCppEngine(ThreadedEngine):
    """llama-cpp-python's high-level API: one sequence at a time, the others waiting."""

    kind = "llama.cpp"
    #: The loaded ``Llama`` and its chat formatter (None while unloaded).
    _llm: Any = None
    _formatter: Any = None

    def _load(self, device: str) -> None:
        llama_cpp = _import()
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        kind = device.partition(":")[0]
        if kind not in {"cpu", "cuda", "mps"}:
            raise EngineUnavailable(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
        gpu = kind != "cpu"
        if gpu and not llama_cpp.llama_supports_gpu_offload():
            raise EngineUnavailable(
                f"this llama-cpp-python build cannot offload to {device}: rebuild it with "
                "CMAKE_ARGS=-DGGML_CUDA=on (NVIDIA) or -DGGML_METAL=on (Mac)"
            )
        path = self.spec.weights_file()
        if path is None:
            raise EngineError(f"{self.spec.name}: the llama.cpp engine needs a GGUF file")
        options = self.spec.options
        n_ctx = int(options.get("n_ctx", self.spec.context_length or 0))
        if not n_ctx:
            # The model's training context, from the GGUF's metadata (no weights read).
            from hostgpu.inference.models import architecture

            n_ctx = min(architecture(self.spec).context_length, MAX_DEFAULT_CONTEXT)
        kwargs: dict[str, Any] = {
            "model_path": str(path),
            "n_gpu_layers": -1 if gpu else 0,
            "main_gpu": int(device.partition(":")[2] or 0),
            "n_batch": int(options.get("n_batch", 512)),
            "verbose": False,
        }
        if options.get("n_threads"):
            kwargs["n_threads"] = int(options["n_threads"])
        try:
            with _model_params(llama_cpp, bool(options.get("extra_bufts", False))):
                llm = llama_cpp.Llama(n_ctx=n_ctx, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {path}: {exc}") from exc
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            vocab = llm.tokenizer()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=vocab.decode([llm.token_eos()]),
                bos_token=vocab.decode([llm.token_bos()]),
            )
        self._llm = llm
        self._context = llm.n_ctx()
        self._eos = frozenset({int(llm.token_eos())})
        self._start_thread()

    def _unload(self) -> None:
        self._stop_thread()
        if self._llm is not None:
            self._llm.close()
        self._llm = self._formatter = None

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        if self._formatter is None:
            raise InvalidRequest(
                f"{self.spec.name} has no chat template: use a plain completion", param="messages"
            )
        formatter = self._formatter
        response = render_chat(self.spec.name, messages, lambda turns: formatter(messages=turns))
        return list(
            self._llm.tokenize(
                response.prompt.encode("utf-8"), add_bos=not response.added_special, special=True
            )
        )

    def encode_text(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def decode(self, ids: list[int]) -> str:
        return bytes(self._llm.detokenize(ids)).decode("utf-8", errors="replace")

    def _run(self) -> None:
        while (request := self._inbox.get()) is not None:
            if request.done:  # cancelled while it waited
                self._forget(request)
                continue
            try:
                self._generate(request)
            except Exception as exc:
                request.fail(EngineError(f"llama.cpp failed: {exc}"))
            finally:
                self._forget(request)

    def _generate(self, request: ActiveRequest) -> None:
        llm = self._llm
        params = request.params
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        tokens = llm.generate(
            request.prompt_ids,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=0,
            min_p=0.0,
            typical_p=1.0,
            repeat_penalty=1.0,
            reset=True,
        )
        try:
            for token in tokens:
                if not request.emit(int(token)):
                    break
            else:
                request.finish("stop")
        finally:
            tokens.close()
