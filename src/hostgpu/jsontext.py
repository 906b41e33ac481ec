"""What JSON text hostgpu takes: valid Unicode, and nesting a program can carry.

Checked on request bodies by the gateway and on results by the worker's child, which
imports this module, so it stays as light as the standard library."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from itertools import accumulate
from typing import Any

#: How deep a JSON body may nest arrays and objects. Deeper values fail far from where they
#: were sent: Python's JSON decoder and pickle (which carries arguments to a worker's child)
#: stop near 500 to 1,000 levels with a RecursionError. Real data rarely passes 20.
MAX_JSON_DEPTH = 100

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
#: Every byte but the brackets, to delete; and the brackets as steps up (2) and down (0).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def json_depth(body: bytes) -> int:
    """How deep ``body`` nests arrays and objects (brackets inside strings do not count)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS).translate(_STEPS)
    return max(accumulate(step - 1 for step in brackets), default=0)


def too_deep(body: bytes) -> bool:
    """Whether ``body`` nests deeper than :data:`MAX_JSON_DEPTH`; counted only when it has
    that many brackets at all, which almost no body has."""
    return (
        body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH
    )


#: A ``\\uD800``–``\\uDFFF`` escape.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: A surrogate written as (invalid) UTF-8 bytes.
_SURROGATE_BYTES = re.compile(rb"\xed[\xa0-\xbf]")


#: A surrogate escape that is not half of a pair (emoji are stored as pairs: ensure_ascii).
_LONE_ESCAPE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def lone_escape(text: str) -> bool:
    """Whether JSON ``text`` has a surrogate escape that is not half of a pair, read as text
    (no parse): an escaped backslash before ``u`` can pass for one or hide one, so this
    finds stored rows worth a look, while :func:`lone_surrogate` decides for a request."""
    return _LONE_ESCAPE.search(text) is not None


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


def body_problem(error: Mapping[str, Any]) -> str | None:
    """What is wrong with a request body as a whole, from one of FastAPI's validation errors:
    not JSON (``json_invalid``, whose ``loc`` is ``("body", offset)``: an offset, not a
    field, so it must not be reported as one), missing, or not an object. None for an error
    about a field, which the caller reports with its place."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error")
        where = f" at offset {loc[1]}" if len(loc) == 2 and isinstance(loc[1], int) else ""
        return f"the body is not valid JSON ({reason or 'cannot be decoded'}{where})"
    if loc == ("body",) and error.get("type") == "missing":
        return "the request has no body: send a JSON object"
    if loc == ("body",) and error.get("type") in ("model_attributes_type", "dict_type"):
        if isinstance(error.get("input"), bytes):  # left undecoded: not declared JSON
            return (
                "the body was not sent as JSON: send a JSON object with "
                "Content-Type: application/json"
            )
        return "the body is not a JSON object"
    return None
