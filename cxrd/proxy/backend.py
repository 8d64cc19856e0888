"""The backend leg of a relayed session: the WebSocket handshake toward the runtime.

websockets' sans-I/O ``ClientProtocol`` writes and checks the handshake; the
backend's chosen subprotocol goes back to the client. Once the handshake is
done the leg's transport is handed to a relay :class:`~cxrd.proxy.relay.Session`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from websockets.client import ClientProtocol
from websockets.http11 import Request
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from cxrd.proxy import http

if TYPE_CHECKING:
    from cxrd.proxy.server import ProxyOptions

MAX_HEAD = 16 * 1024  # request/response head, like common HTTP servers


class BackendRejected(Exception):
    """The backend answered the WebSocket handshake with something other than 101."""


class BackendConn(asyncio.Protocol):
    """The backend leg until its handshake completes."""

    def __init__(
        self,
        request: Request,
        offered: Sequence[Subprotocol],
        options: ProxyOptions,
        client_ip: str,
    ) -> None:
        self.protocol = ClientProtocol(
            parse_uri(f"{options.backend_url}/"), subprotocols=offered or None, max_size=None
        )
        ours = self.protocol.connect()
        headers = ours.headers
        for name, value in http.end_to_end_headers(request, client_ip):
            headers[name] = value
        self.protocol.send_request(Request(request.path, headers))
        self.request_bytes = b"".join(self.protocol.data_to_send())
        self.handshake: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.extra = bytearray()
        self.lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request_bytes)

    def data_received(self, data: bytes) -> None:
        if self.handshake.done():
            self.extra += data
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._reject("response head too large")
            return
        head = bytes(self.buffer[: end + 4])
        self.extra = self.buffer[end + 4 :]
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if not head.startswith(b"HTTP/1.1 101 "):
            self._reject(status)
            return
        self.protocol.receive_data(head)
        self.protocol.events_received()
        if self.protocol.handshake_exc is not None:
            self._reject(str(self.protocol.handshake_exc))
            return
        self.handshake.set_result(self.protocol.subprotocol)

    def discard(self) -> None:
        """Abort this leg (unused); consumes a failed handshake so nothing warns about it."""
        if self.transport is not None:
            self.transport.abort()
        if self.handshake.done() and not self.handshake.cancelled():
            self.handshake.exception()
        else:
            self.handshake.cancel()

    def _reject(self, why: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(BackendRejected(why))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)
        if not self.handshake.done():
            closed = ConnectionResetError("backend closed the connection")
            self.handshake.set_exception(exc or closed)
