"""A worker's channel: jobs pushed and outcomes reported over one WebSocket (scope: worker).

Over HTTP, each job costs a worker two requests besides the caller's: a long poll started
again right after each lease, and the report. Each is a full trip through the gateway's
middleware, routing and dependencies (most of a no-op job's gateway CPU). On the channel
both are messages on a connection that stays open: the gateway pushes leases as jobs become
runnable, and the worker's reports are answered on it.

Flow control is by credits: the worker *grants* job slots (``ChannelUp.grant``), each
pushed lease uses one up, so a lease in flight is never counted twice, whatever the timing
of grants, reports and pushes; a worker whose children turn out to be busy for long takes
back the slots it granted ahead (``ChannelUp.revoke``). A lease that cannot be delivered
(the connection closed) is handed back at once, not left to expire.

The HTTP routes (``/lease``, ``/report``) stay: a worker falls back to them when a proxy
between it and the gateway does not pass WebSockets, and lent machines may use either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import cast

from fastapi import APIRouter, FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from hostgpu.api import MAX_LEASE, WORKER_ID_PATTERN, ChannelDown, ChannelUp, StreamBatch
from hostgpu.errors import NotFound, StoreUnavailable
from hostgpu.gateway.auth import authorize, verify
from hostgpu.gateway.deps import Gateway, spawn
from hostgpu.gateway.protocol import (
    check_access,
    hand_back,
    lease_jobs,
    record_outcomes,
    relay_stream,
    worker_capabilities,
)

log = logging.getLogger("hostgpu.gateway")

router = APIRouter(prefix="/v1/workers", tags=["workers"])

#: Close codes the worker maps back to errors (4000–4999 are the application's own): 4000
#: plus the HTTP routes' status for a refused token (4401, 4403), an unknown worker (4404).
CLOSE_UNAUTHORIZED = 4401
CLOSE_UNKNOWN_WORKER = 4404
#: RFC 6455: the message was not what the protocol allows; and "try again later".
CLOSE_INVALID = 1007
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013
#: A newer channel of the same worker replaced this one (a reconnect over a dead link).
CLOSE_REPLACED = 4409


@router.websocket("/{worker_id}/channel")
async def channel(websocket: WebSocket, worker_id: str) -> None:
    """Leases pushed to the worker as ``ChannelDown`` messages, within the slots it grants;
    ``ChannelUp`` reports answered with their ``seq``. Send ``Authorization: Bearer`` with
    the handshake; a refusal closes the connection with a 44xx code and a reason."""
    gw = cast(Gateway, websocket.app.state)
    await websocket.accept()
    scheme, _, secret = websocket.headers.get("authorization", "").partition(" ")
    secret = secret.strip() if scheme.lower() == "bearer" else ""
    try:
        refusal = await _refusal(websocket, gw, worker_id, secret)
    except HTTPException as exc:  # the HTTP routes' 401 and 403, as 4401 and 4403
        refusal = 4000 + exc.status_code, str(exc.detail)
    except StoreUnavailable as exc:
        refusal = CLOSE_TRY_LATER, str(exc)
    except Exception:
        log.exception("worker %s: channel refused on an error", worker_id)
        refusal = CLOSE_INTERNAL, "the gateway failed; open the channel again"
    if refusal is not None:
        await websocket.close(refusal[0], _reason(refusal[1]))
        return
    await _Channel(gw, websocket, worker_id, secret).serve()


async def _refusal(
    websocket: WebSocket, gw: Gateway, worker_id: str, secret: str
) -> tuple[int, str] | None:
    """Why this connection may not be a channel for ``worker_id`` (None: it may); the
    token's refusals raise as they do for the HTTP routes."""
    token = await authorize(websocket, secret, ("worker", "share"))
    if not re.fullmatch(WORKER_ID_PATTERN, worker_id):
        return CLOSE_UNKNOWN_WORKER, "not a worker id"
    try:
        await worker_capabilities(websocket, gw.store, worker_id)
        await check_access(websocket, gw.store, token, worker_id)  # a share token's machine
    except NotFound:
        return CLOSE_UNKNOWN_WORKER, "unknown worker: register again"
    return None


def recheck_tokens(app: FastAPI) -> None:
    """Tokens were revoked (here or on another gateway): channels opened with a token that
    no longer verifies close now (4401), not when their connection next drops."""
    channels: dict[str, _Channel] = app.state.channels
    for channel in list(channels.values()):
        spawn(channel.recheck())


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes (RFC 6455)."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


class _Channel:
    def __init__(self, gw: Gateway, websocket: WebSocket, worker_id: str, secret: str) -> None:
        self.gw = gw
        self.ws = websocket
        self.worker_id = worker_id
        self._secret = secret
        #: Slots the worker granted that no pushed lease has used yet.
        self.credit = 0
        self.granted = asyncio.Event()
        self.closed = False
        # Pushes and report answers come from two tasks; a message is sent whole.
        self._send_lock = asyncio.Lock()

    async def serve(self) -> None:
        # One channel per worker on this gateway: a worker that opens a new one has lost the
        # old one (a link that died without a close); leases pushed there would wait for
        # their lease to expire, so the old one stops leasing now.
        channels: dict[str, _Channel] = self.ws.app.state.channels
        old = channels.get(self.worker_id)
        channels[self.worker_id] = self
        if old is not None:  # stopped now; its close handshake may wait on a dead link
            old._stop()
            spawn(old._close(CLOSE_REPLACED, "replaced by a newer channel of this worker"))
        pusher = asyncio.create_task(self._push())
        try:
            await self._receive()
        finally:
            if channels.get(self.worker_id) is self:
                del channels[self.worker_id]
            self._stop()
            # Not cancelled: the pusher may be inside a store call that leases jobs, and
            # must hand them back. It ends within a store call.
            with contextlib.suppress(Exception):
                await pusher

    async def _send(self, message: ChannelDown) -> None:
        async with self._send_lock:
            await self.ws.send_text(message.model_dump_json())

    async def recheck(self) -> None:
        try:
            valid = await verify(self.ws, self._secret) is not None
        except StoreUnavailable:
            return  # checked again at the next revocation, or when the worker reconnects
        if not valid and not self.closed:
            await self._close(CLOSE_UNAUTHORIZED, "the token was revoked")

    def _stop(self) -> None:
        # Its pusher stops at once: its waiter must not take wake-ups meant for live ones.
        self.closed = True
        self.granted.set()
        self.gw.notifier.wake(self.worker_id)

    async def _close(self, code: int, reason: str) -> None:
        self._stop()
        if self.ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code, _reason(reason))

    async def _receive(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self._close(CLOSE_INVALID, "send ChannelUp messages as JSON text frames")
                return
            try:
                up = ChannelUp.model_validate_json(text)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"]) or "message"
                await self._close(CLOSE_INVALID, f"invalid ChannelUp: {where}: {error['msg']}")
                return
            if up.stream is not None and not await self._relay(up.stream):
                return
            if up.outcomes:
                try:
                    results = await record_outcomes(self.gw, up.outcomes)
                except StoreUnavailable as exc:  # the worker sends the report again
                    await self._close(CLOSE_TRY_LATER, str(exc))
                    return
                except Exception:
                    log.exception("worker %s: a report failed", self.worker_id)
                    await self._close(CLOSE_INTERNAL, "the gateway failed on this report")
                    return
                try:
                    await self._send(ChannelDown(seq=up.seq, results=results))
                except Exception:
                    return
            if up.revoke:  # its children are busy for longer than it leased ahead for
                self.credit = 0
            if up.grant:
                self.credit += up.grant
                self.granted.set()

    async def _relay(self, batch: StreamBatch) -> bool:
        """Relay a model server's stream batch, and tell it the jobs to stop; False when the
        channel is gone. A batch that fails is lost to live readers, not to its jobs (their
        results come in the report), as over HTTP: the channel stays."""
        try:
            cancelled = await relay_stream(self.ws, self.gw, self.worker_id, batch)
        except StoreUnavailable as exc:
            log.warning("worker %s: a stream batch was not relayed: %s", self.worker_id, exc)
            return True
        except Exception:
            log.exception("worker %s: relaying a stream batch failed", self.worker_id)
            return True
        if cancelled:
            try:
                await self._send(ChannelDown(cancelled=cancelled))
            except Exception:
                return False
        return True

    async def _push(self) -> None:
        try:
            await self._push_leases()
        except Exception:  # a bug: say so, and let the worker open a new channel
            log.exception("worker %s: channel pusher failed", self.worker_id)
            await self._close(CLOSE_INTERNAL, "the gateway failed; open the channel again")

    async def _push_leases(self) -> None:
        period = self.gw.settings.lease_seconds / 3
        while not self.closed:
            if self.credit <= 0:
                self.granted.clear()
                await self.granted.wait()
                continue
            if self.worker_id in self.gw.notifier.draining:
                await asyncio.sleep(1.0)  # stopping: it is leased nothing more
                continue
            if self.gw.notifier.closing:  # the gateway is stopping: the server closes this
                return
            try:
                # As long as an HTTP worker's poll: the first lease call of each touches the
                # worker's last contact when it is stale, so an idle channel keeps it alive.
                leases = await lease_jobs(
                    self.gw,
                    self.ws,
                    self.worker_id,
                    min(self.credit, MAX_LEASE),
                    2.5 * period,
                    self._gone,
                )
            except StoreUnavailable as exc:
                await self._close(CLOSE_TRY_LATER, str(exc))
                return
            except NotFound:  # the worker was removed meanwhile
                await self._close(CLOSE_UNKNOWN_WORKER, "unknown worker: register again")
                return
            if not leases:
                continue
            # Never below zero: a revoke that came while this lease was read took back the
            # slots it used, as the worker counts them.
            self.credit = max(0, self.credit - len(leases))
            try:
                if self.closed:
                    raise ConnectionError("the channel closed")
                await self._send(ChannelDown(leases=leases))
            except Exception:
                handing_back = hand_back(self.gw, leases)
                if handing_back is not None:
                    await handing_back
                return

    async def _gone(self) -> bool:
        return self.closed
