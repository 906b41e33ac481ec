"""LLM inference: model registry, engines behind one interface, OpenAI wire models.

- :mod:`.models`: which models exist (name → engine, files, options, memory estimate);
- :mod:`.engines`: load a model on a device and serve concurrent streaming requests;
- :mod:`.openai_schema`: OpenAI's request/response/stream/error shapes, with validation;
- :mod:`.server`: one engine behind a minimal OpenAI-compatible HTTP server (SSE).

Nothing here imports torch, mlx or llama_cpp until an engine is loaded.
"""

from __future__ import annotations
