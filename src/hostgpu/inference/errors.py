"""Errors of the inference layer, each with the HTTP status an API should answer with.

They sit under :class:`hostgpu.errors.HostGPUError`::

    HostGPUError
    └── InferenceError         inference failed (500)
        ├── ModelNotFound      no model of that name is registered (404)
        ├── InvalidRequest     the request itself is wrong: bad roles, too long… (400)
        ├── EngineUnavailable  the model's engine cannot run here: not installed, no device (503)
        ├── EngineError        the engine failed while loading or generating (500)
        ├── NoServer           no live model server serves the model (503, Retry-After)
        └── RateLimited        the token is over its rate or concurrency limit (429)

``InvalidRequest`` carries OpenAI's ``param`` and ``code`` (``context_length_exceeded``…) so a
route can answer in OpenAI's error shape without re-deriving them.
"""

from __future__ import annotations

from typing import Any

from hostgpu.errors import HostGPUError


class InferenceError(HostGPUError):
    """Inference failed."""

    status_code = 500
    #: OpenAI's error ``type`` for this class.
    error_type = "server_error"
    #: The job the request ran as, once it was queued (the gateway's ``x-request-id``).
    request_id: str | None = None

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.param = param
        self.code = code


class ModelNotFound(InferenceError):
    """No model of that name is registered: `hostgpu models` lists them."""

    status_code = 404
    error_type = "invalid_request_error"
    retryable = False

    def __init__(self, message: str | None = None, **kw: Any) -> None:
        kw.setdefault("param", "model")
        kw.setdefault("code", "model_not_found")
        super().__init__(message, **kw)


class InvalidRequest(InferenceError):
    """The request is not valid for this model."""

    status_code = 400
    error_type = "invalid_request_error"
    retryable = False


class EngineUnavailable(InferenceError):
    """The model's engine cannot run in this process (not installed, or no such device)."""

    status_code = 503
    retryable = False


class EngineError(InferenceError):
    """The engine failed."""


class NoServer(InferenceError):
    """No live model server can serve the model: start one, or try again later."""

    status_code = 503
    error_type = "server_error"
    #: Seconds a client should wait before it tries again (the ``Retry-After`` header).
    retry_after = 10


class RateLimited(InferenceError):
    """The token is over its request rate or its concurrent-request limit."""

    status_code = 429
    error_type = "rate_limit_error"
    retry_after = 1
