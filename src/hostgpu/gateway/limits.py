"""Request bodies: a size limit, enforced before the body is read into memory, text that is
valid Unicode, and JSON nested no deeper than a program can carry it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hostgpu.jsontext import MAX_JSON_DEPTH, json_depth, lone_surrogate, too_deep


class BodyTooLarge(HTTPException):
    """Raised from inside ``receive``: FastAPI re-raises HTTP exceptions met while it
    reads the body (anything else it turns into a 400), so the client sees the 413."""


class Unacceptable(HTTPException):
    """Raised from inside ``receive``, like :class:`BodyTooLarge`: the client sees the 422."""


class BodyLimitMiddleware:
    """Answer 413 for bodies over ``max_bytes``, whether or not Content-Length says so, and
    422 for a JSON body with a lone surrogate in it (see :func:`lone_surrogate`) or nested
    deeper than :data:`MAX_JSON_DEPTH`."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        exempt: tuple[str, ...] = (),
        error_body: Callable[[str, str], dict[str, Any]] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        #: Path prefixes with a limit of their own (blob uploads stream to disk).
        self.exempt = exempt
        #: The error body for a path and a reason (default ``{"detail": reason}``): the
        #: inference routes answer in OpenAI's shape, which their clients read.
        self.error_body = error_body or (lambda _path, detail: {"detail": detail})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reply(scope, send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await self._reply(scope, send, 413, self._message(declared))
                    return
        received = 0
        started = False
        chunks: list[bytes] = []

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_bytes:
                    raise BodyTooLarge(413, self._message(received))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    self._check(b"".join(chunks))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reply(scope, send, 413, self._message(received))
        except Unacceptable as exc:
            if not started:
                await self._reply(scope, send, 422, exc.detail)

    @staticmethod
    def _check(body: bytes) -> None:
        if lone_surrogate(body):
            raise Unacceptable(
                422,
                "the JSON body holds a lone UTF-16 surrogate (\\ud800–\\udfff without its "
                "pair), which is not text: send valid Unicode (for undecodable file names, "
                "os.fsencode them, or name them another way)",
            )
        if too_deep(body):
            raise Unacceptable(
                422,
                f"the JSON body nests arrays or objects {json_depth(body)} levels deep; the "
                f"limit is {MAX_JSON_DEPTH}: flatten the data, or send it as a file (an input "
                "blob) the function reads",
            )

    def _message(self, size: int) -> str:
        return (
            f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes "
            "(HOSTGPU_MAX_BODY_BYTES); send large inputs by reference (a path or URL)"
        )

    async def _reply(self, scope: Scope, send: Send, status: int, detail: str) -> None:
        body = json.dumps(self.error_body(scope.get("path", ""), detail)).encode()
        headers: list[Any] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
