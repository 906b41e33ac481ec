"""The hostgpu exception tree.

Every exception hostgpu raises on purpose derives from :class:`HostGPUError`::

    HostGPUError
    ├── ConfigError            settings or local state are missing or wrong
    ├── InvalidInput           a request the gateway will not carry out as asked (422)
    │   ├── OptionsConflict    a submission widens a function's declared options
    │   └── NotPublished       the function is not published with @hostgpu.function
    ├── StoreError             the job store refused or failed an operation
    │   ├── NotFound           no such job / worker / token
    │   ├── AmbiguousId        an id prefix that names more than one object
    │   ├── InvalidTransition  the job is not in a state that allows this
    │   ├── DuplicateKey       an idempotency key or name already exists
    │   ├── LastAdminToken     revoking it would lock every admin out
    │   └── StoreUnavailable   the database connection was lost (503: try again)
    ├── GatewayError           the gateway answered with an error
    │   ├── AuthError          missing, bad or revoked token; wrong scope
    │   └── GatewayUnavailable the gateway cannot be reached
    ├── JobError               a job ended without a result
    │   ├── JobFailed          the function raised, crashed or timed out remotely
    │   ├── JobCancelled       somebody cancelled it
    │   └── JobTimeout         the caller stopped waiting for it
    ├── DeviceUnavailable      the requested accelerator is not usable here
    └── PipelineError          a pipeline input was refused (bad file, unsupported type)

Each class's docstring is its default message.
"""

from __future__ import annotations

from typing import Any


class HostGPUError(Exception):
    """hostgpu failed."""

    #: Whether a job that raised this may succeed if tried again (the worker reads it).
    retryable = True

    def __init__(self, message: str | None = None, **context: Any) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.context = context
        super().__init__(self.message)


class ConfigError(HostGPUError):
    """hostgpu is not configured for this."""

    retryable = False


class InvalidInput(HostGPUError):
    """The request cannot be carried out as asked."""

    retryable = False


class OptionsConflict(InvalidInput):
    """The submission's options widen what the function declares."""


class NotPublished(InvalidInput):
    """The function is not published with @hostgpu.function in a module its workers import."""


class InputNotUploaded(InvalidInput):
    """A job names an input blob the gateway does not have yet: upload it, then submit again
    (409: the same request succeeds once the blob is there)."""


class StoreError(HostGPUError):
    """The job store failed."""


class NotFound(StoreError):
    """No such object."""


class AmbiguousId(StoreError):
    """The id prefix names more than one object: give more characters."""


class LastAdminToken(StoreError):
    """This is the last admin token: revoking it would lock every admin out."""


class StoreUnavailable(StoreError):
    """The job store's database cannot be reached right now: try again in a moment."""


class InvalidTransition(StoreError):
    """The job's state does not allow this."""


class DuplicateKey(StoreError):
    """An object with this key already exists."""


class GatewayError(HostGPUError):
    """The gateway answered with an error."""

    def __init__(self, message: str | None = None, *, status: int | None = None, **context: Any):
        super().__init__(message, **context)
        self.status = status


class AuthError(GatewayError):
    """The gateway refused the token: check HOSTGPU_TOKEN, or `hostgpu token create` one."""


class GatewayUnavailable(GatewayError):
    """The gateway cannot be reached: is `hostgpu up` or `hostgpu gateway` running?"""


class ChannelUnsupported(GatewayError):
    """The gateway (or a proxy in front of it) offers no worker channel: use HTTP long polls."""


class JobError(HostGPUError):
    """The job ended without a result."""

    def __init__(self, message: str | None = None, *, job_id: str | None = None, **context: Any):
        super().__init__(message, **context)
        self.job_id = job_id


class JobFailed(JobError):
    """The job failed on the worker."""

    def __init__(
        self,
        message: str | None = None,
        *,
        job_id: str | None = None,
        error_type: str | None = None,
        remote_traceback: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, job_id=job_id, **context)
        self.error_type = error_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        if self.remote_traceback:
            return f"{self.message}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return self.message


class JobCancelled(JobError):
    """The job was cancelled."""


class JobTimeout(JobError):
    """Gave up waiting for the job's result; the job itself may still finish."""


class DeviceUnavailable(HostGPUError):
    """The requested accelerator is not usable in this process: run `hostgpu doctor`."""

    retryable = False


class PipelineError(HostGPUError):
    """The pipeline refused its input."""

    retryable = False
