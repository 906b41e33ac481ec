"""The worker's end of its channel to the gateway (``/v1/workers/{id}/channel``, a WebSocket;
see :mod:`hostgpu.gateway.routes.channel`): leases arrive on it, reports leave on it.

A thin, typed wrapper over ``websockets``' threaded client: one thread receives, any thread
may send (a lock keeps messages whole). Close codes come back as hostgpu's errors, so the
agent treats the channel like its HTTP calls: :class:`GatewayUnavailable` is retried,
:class:`NotFound` means register again, :class:`AuthError` stops the worker.
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)
from websockets.sync.client import ClientConnection, connect

from hostgpu.api import ChannelDown, ChannelUp
from hostgpu.errors import (
    AuthError,
    ChannelUnsupported,
    GatewayError,
    GatewayUnavailable,
    HostGPUError,
    NotFound,
)

#: The gateway's close codes (see ``hostgpu.gateway.routes.channel``).
_AUTH_CODES = {4401: 401, 4403: 403}
_UNKNOWN_WORKER = 4404
_INVALID = 1007


def channel_url(gateway: str, worker_id: str) -> str:
    parts = urlsplit(gateway)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = f"{parts.path.rstrip('/')}/v1/workers/{worker_id}/channel"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class Channel:
    def __init__(
        self, connection: ClientConnection, url: str, max_message: int | None = None
    ) -> None:
        self._ws = connection
        self.url = url
        #: The gateway's limit: it closes the channel on a larger message (1009).
        self.max_message = max_message
        self._send_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        gateway: str,
        token: str,
        worker_id: str,
        timeout: float = 10.0,
        *,
        max_message: int | None = None,
    ) -> Channel:
        url = channel_url(gateway, worker_id)
        try:
            connection = connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                # Messages are small and the link is usually loopback or a LAN: compressing
                # them would cost more CPU than it saves time.
                compression=None,
                open_timeout=timeout,
                # A push holds several leases, each with a payload of up to the gateway's
                # body limit: a cap here would close the channel on them, and the same push
                # would come again once their leases expired. The gateway is trusted: its
                # jobs run here.
                max_size=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthError(f"{url}: the gateway refused the token ({status})") from exc
            if status == 429 or status >= 500:  # a proxy whose gateway is restarting, say
                raise GatewayUnavailable(f"{url}: HTTP {status}") from exc
            # 404 (a gateway without channels), 400/426 (a proxy that does not upgrade)…
            raise ChannelUnsupported(f"{url}: HTTP {status} instead of a WebSocket") from exc
        except InvalidMessage as exc:
            # No HTTP answer at all: the gateway closed the connection (it is stopping, or
            # died) rather than refused the upgrade.
            if isinstance(exc.__cause__, EOFError | OSError):
                raise GatewayUnavailable(f"cannot open {url}: {exc.__cause__}") from exc
            raise ChannelUnsupported(f"{url}: {exc}") from exc
        except (InvalidHandshake, InvalidURI) as exc:
            raise ChannelUnsupported(f"{url}: {exc}") from exc
        except ConnectionClosed as exc:  # reset before the request went out: the same
            raise GatewayUnavailable(f"cannot open {url}: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise GatewayUnavailable(f"cannot open {url}: {exc}") from exc
        return cls(connection, url, max_message)

    def send(self, message: ChannelUp) -> None:
        # Without the fields left unset (None): a gateway older than one of them refuses it.
        data = message.model_dump_json(exclude_none=True)
        limit = self.max_message
        if limit is not None and len(data) * 4 > limit and len(data.encode()) > limit:
            # Refused here rather than by the gateway, which would close the channel: the
            # caller sends it over HTTP, in parts if need be.
            raise GatewayError(
                f"{self.url}: a message of {len(data.encode())} bytes is over the gateway's "
                f"limit of {limit}",
                status=413,
            )
        with self._send_lock:
            try:
                self._ws.send(data)
            except ConnectionClosed as exc:
                raise _closed(exc) from exc
            except OSError as exc:
                raise GatewayUnavailable(f"{self.url}: {exc}") from exc

    def receive(self, timeout: float | None = None) -> ChannelDown | None:
        """The gateway's next message; None when ``timeout`` passes first."""
        try:
            data = self._ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        except ConnectionClosed as exc:
            raise _closed(exc) from exc
        except OSError as exc:
            raise GatewayUnavailable(f"{self.url}: {exc}") from exc
        try:
            return ChannelDown.model_validate_json(data)
        except ValidationError as exc:  # not a gateway this worker can talk to
            raise ChannelUnsupported(f"{self.url}: unexpected message: {exc}") from exc

    def close(self) -> None:
        self._ws.close()


def _closed(exc: ConnectionClosed) -> HostGPUError:
    """The error a closed channel stands for."""
    close = exc.rcvd
    code = close.code if close is not None else None
    reason = f"the gateway closed the channel ({code}: {close.reason})" if close else str(exc)
    if code in _AUTH_CODES:
        return AuthError(reason, status=_AUTH_CODES[code])
    if code == _UNKNOWN_WORKER:
        return NotFound(reason)
    if code == _INVALID:  # a bug on one side: not worth retrying on this connection type
        return ChannelUnsupported(reason)
    return GatewayUnavailable(reason)
