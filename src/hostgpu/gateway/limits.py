"""Request bodies: a size limit, enforced before the body is read into memory, and text that
is valid Unicode."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from inside ``receive``: FastAPI re-raises HTTP exceptions met while it
    reads the body (anything else it turns into a 400), so the client sees the 413."""


class NotUnicode(HTTPException):
    """Raised from inside ``receive``, like :class:`BodyTooLarge`: the client sees the 422."""


#: A ``\\uD800``–``\\uDFFF`` escape.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: A surrogate written as (invalid) UTF-8 bytes.
_SURROGATE_BYTES = re.compile(rb"\xed[\xa0-\xbf]")


def lone_surrogate(body: bytes) -> bool:
    """Whether this JSON body holds a string with a lone UTF-16 surrogate: JSON allows the
    escape, Python decodes it, but it is not text; stored, it would fail every response that
    shows it (and every worker lease that carries it). Pairs, as ``ensure_ascii`` encoders
    write emoji, are fine. Looked at closely only when a surrogate may be there at all."""
    # Python's JSON decoder also takes a surrogate as raw UTF-8 bytes (ED A0–BF …), and
    # bodies in UTF-16 or UTF-32 (NUL bytes in the first four).
    if not (_SURROGATE_ESCAPE.search(body) or _SURROGATE_BYTES.search(body) or b"\x00" in body[:4]):
        return False
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except ValueError:  # not JSON: the route says so
        return False
    return False


class BodyLimitMiddleware:
    """Answer 413 for bodies over ``max_bytes``, whether or not Content-Length says so, and
    422 for a JSON body with a lone surrogate in it (see :func:`lone_surrogate`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        #: Path prefixes with a limit of their own (blob uploads stream to disk).
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reply(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await self._reply(send, 413, self._message(declared))
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
                if not message.get("more_body", False) and lone_surrogate(b"".join(chunks)):
                    raise NotUnicode(
                        422,
                        "the JSON body holds a lone UTF-16 surrogate (\\ud800–\\udfff "
                        "without its pair), which is not text: send valid Unicode (for "
                        "undecodable file names, os.fsencode them, or name them another way)",
                    )
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
                await self._reply(send, 413, self._message(received))
        except NotUnicode as exc:
            if not started:
                await self._reply(send, 422, exc.detail)

    def _message(self, size: int) -> str:
        return (
            f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes "
            "(HOSTGPU_MAX_BODY_BYTES); send large inputs by reference (a path or URL)"
        )

    @staticmethod
    async def _reply(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers: list[Any] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
