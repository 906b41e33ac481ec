"""Opening a worker's channel against a gateway that goes away during the handshake: the
worker retries (GatewayUnavailable), neither crashing nor giving up on the channel for good.
Found in CI: a gateway killed while a worker opened its channel made the worker exit 1."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from hostgpu.errors import GatewayUnavailable
from hostgpu.worker.channel import Channel, ChannelUnsupported


def _server(answer: bytes | None, *, read: bool, reset: bool) -> Iterator[str]:
    """A loopback socket that takes one connection and answers it with ``answer`` (None:
    nothing), after reading the request or not, then closes (with a reset, or not)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve() -> None:
        conn, _ = sock.accept()
        if read:
            conn.recv(65536)
        if answer is not None:
            conn.sendall(answer)
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread.join(5)
    sock.close()


@pytest.mark.parametrize(
    ("read", "reset"),
    [(False, True), (True, True), (True, False)],
    ids=["reset-before-the-request", "reset-after-it", "closed-after-it"],
)
def test_a_gateway_that_goes_away_mid_handshake_is_retried(read: bool, reset: bool) -> None:
    for gateway in _server(None, read=read, reset=reset):
        with pytest.raises(GatewayUnavailable):
            Channel.open(gateway, "hgw_token", "a" * 32, timeout=5)


def test_a_gateway_without_channels_is_not_retried() -> None:
    """An HTTP answer that is not an upgrade (a gateway without channels, a proxy): the
    worker long-polls over HTTP instead."""
    answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
    for gateway in _server(answer, read=True, reset=False):
        with pytest.raises(ChannelUnsupported):
            Channel.open(gateway, "hgw_token", "a" * 32, timeout=5)
