"""A client's connection before its relay: the request head, its answer, or both handshakes.

:class:`ClientConn` is the protocol under cxrd's TLS layer once admission let
the peer in (:mod:`cxrd.proxy.acceptor`). It reads one request head under the
head deadline and routes it: the certificate page, ``/healthz``, ``/client/``
files (:mod:`cxrd.proxy.static`), or a WebSocket upgrade. WebSocket handshakes
use websockets' sans-I/O protocols (``ServerProtocol`` toward the client,
``ClientProtocol`` toward the backend, :mod:`cxrd.proxy.backend`) so that they
are validated the way the library does it; the backend handshake happens
*before* the client is answered, so the backend's chosen subprotocol goes
back to the client. Once both legs are open, :mod:`cxrd.proxy.relay` splices
them frame by frame: the relay never decodes, copies or re-encodes a message,
which is what makes it fast on a small machine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from websockets.headers import parse_subprotocol
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from cxrd.proxy import frames as F
from cxrd.proxy import http, static
from cxrd.proxy.admission import Phase, Ticket, format_address
from cxrd.proxy.backend import MAX_HEAD, BackendConn, BackendRejected
from cxrd.proxy.relay import Session

if TYPE_CHECKING:
    from cxrd.proxy.server import ProxyServer

log = logging.getLogger("cxrd.proxy")

HEALTH_PROBE_TIMEOUT = 1.0
FOREIGN_ORIGIN = "Origin"  # a kind of refusal in the server's RefusalLog, beside admission's


class ClientConn(asyncio.Protocol):
    """A client's connection until its request is answered or its relay starts."""

    def __init__(self, server: ProxyServer, ticket: Ticket) -> None:
        self.server = server
        self.ticket = ticket  # its place in the admission tables (cxrd.proxy.admission)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.head = bytearray()
        self.extra = bytearray()  # bytes a client sent before the 101 (it should not)
        self.request: Request | None = None
        self.response: Response | None = None
        self.task: asyncio.Task[None] | None = None
        self.answered = False
        self.flow = static.Flow()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = format_address(transport.get_extra_info("peername"))
        self.server.conns.add(self)
        self.ticket.enter(Phase.HEAD)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.options.head_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.request is not None:
            self.extra += data
            if len(self.extra) > self.server.options.max_message_size + 65536:
                self.abandon()
            return
        if self.answered:
            return
        # Only the new bytes (and the 3 before them) can complete the blank line: a head
        # sent a byte per TLS record must not cost a scan of all it holds per record.
        start = max(0, len(self.head) - 3)
        self.head += data
        end = self.head.find(b"\r\n\r\n", start)
        if end < 0:
            if len(self.head) > MAX_HEAD:
                self.ticket.enter(Phase.ANSWER)
                too_large = "Request Header Fields Too Large"
                self._answer(http.error(431, too_large, "Request head too large."))
            return
        self.extra = self.head[end + 4 :]
        self.ticket.enter(Phase.ANSWER)  # no longer evictable: it is being answered
        self._dispatch(bytes(self.head[: end + 4]))

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def abandon(self) -> None:
        """Drop this connection (shutdown, or a client misbehaving before its relay)."""
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.request is None and not self.answered and self.transport is not None:
            self.transport.abort()

    # Requests ------------------------------------------------------------------

    def _dispatch(self, head: bytes) -> None:
        protocol = ServerProtocol(max_size=None)
        protocol.receive_data(head)
        received = protocol.events_received()
        if not received or not isinstance(received[0], Request):
            # Not HTTP: websockets wrote its own 4xx (or nothing) into data_to_send.
            self._answer(b"".join(protocol.data_to_send()), note="malformed request")
            return
        request = received[0]
        path = http.route_path(request)
        client_file = self.server.options.client_dir is not None and static.is_client_path(path)
        # Only a page's WebSocket and /healthz need its Origin checked (others are no
        # secret); CORS headers only where a page may read the answer.
        preflight = http.is_preflight(request) and not client_file
        checked = http.is_upgrade(request) or path == http.HEALTH_PATH or preflight
        if checked and not self.server.origins.allows(request):
            if (more := self.server.refusals.more(FOREIGN_ORIGIN)) is not None:
                origin = http.terminal_safe(", ".join(request.headers.get_all("Origin")), 200)
                log.warning("client=%s refused: Origin %r not allowed%s", self.peer, origin, more)
            self._answer(http.foreign_origin(), request, 403)
        elif http.is_preflight(request):
            if client_file or "Origin" not in request.headers:
                self._answer(http.method_not_allowed(), request, 405)
            else:
                self._answer(http.preflight(request), request, 200)
        elif http.is_upgrade(request):
            self._upgrade(protocol, request)
        elif request.method in ("GET", "HEAD"):
            head_only = request.method == "HEAD"
            if path == http.HEALTH_PATH:
                self._work(self._health(request, head_only))
            elif client_file:
                self._work(self._static(request, head_only))
            else:
                cors = http.cors(request) if self.server.origins.allows(request) else {}
                self._answer(http.cert_page(head_only=head_only, extra=cors), request, 200)
        else:
            self._answer(http.method_not_allowed(), request, 405)

    def _answer(
        self, data: bytes, request: Request | None = None, status: int = 0, note: str = ""
    ) -> None:
        self.answered = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():
            if data:
                transport.write(data)
            transport.close()
            # A client that never reads would hold the rest of the answer: bounded.
            send_timeout = self.server.options.send_timeout
            self._timer = asyncio.get_running_loop().call_later(send_timeout, transport.abort)
        if request is not None:
            log.info(
                "client=%s http %s path=%r status=%d",
                self.peer,
                request.method,
                http.route_path(request),
                status,
            )
        elif note:
            log.info("client=%s %s", self.peer, note)

    def _work(self, coro: Coroutine[Any, Any, None]) -> None:
        """Answer from a task (a probe, a file read): off the protocol callbacks."""
        self.answered = True
        self.task = self.server.spawn(self, coro)
        if self.task is None:
            self.abandon()

    async def _static(self, request: Request, head_only: bool) -> None:
        options = self.server.options
        assert options.client_dir is not None and self.transport is not None
        try:
            answer = await static.respond(
                self.transport, self.flow, options.client_dir, request.path, head_only=head_only,
                timeout=options.send_timeout,
            )  # fmt: skip
        except (TimeoutError, OSError) as exc:
            why = str(exc) or f"took nothing for {options.send_timeout:g} s"
            log.info("client=%s %r: dropped: %s", self.peer, http.route_path(request), why)
            self.transport.abort()
            return
        if answer.note:
            log.info("client=%s %r: %s", self.peer, http.route_path(request), answer.note)
        self._answer(answer.data, request, answer.status)

    async def _health(self, request: Request, head_only: bool) -> None:
        options = self.server.options
        loop = asyncio.get_running_loop()
        reachable = False
        try:
            async with asyncio.timeout(HEALTH_PROBE_TIMEOUT):
                probe, _ = await loop.create_connection(
                    asyncio.Protocol, options.backend_host, options.backend_port
                )
            probe.close()
            reachable = True
        except (OSError, TimeoutError):
            pass
        cors = http.cors(request)  # an Origin here was allowed (else 403)
        report = self.server.health(reachable)
        self._answer(http.health(report, head_only=head_only, extra=cors), request, 200)

    def _upgrade(self, protocol: ServerProtocol, request: Request) -> None:
        response = protocol.accept(request)
        if response.status_code != 101:
            self._answer(response.serialize(), request, response.status_code)
            return
        if self.server.busy:
            self._answer(http.busy(), request, 503)
            return
        if not request.path.startswith("/"):
            self._answer(http.error(400, "Bad Request", "Bad request target."), request, 400)
            return
        self.request = request
        self.response = response
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.connecting += 1
        self.task = self.server.spawn(self, self._open_backend(request))
        if self.task is None:
            self.server.connecting -= 1
            self.abandon()

    async def _open_backend(self, request: Request) -> None:
        options = self.server.options
        loop = asyncio.get_running_loop()
        backend: BackendConn | None = None
        try:
            try:
                offered = [
                    subprotocol
                    for value in request.headers.get_all("Sec-WebSocket-Protocol")
                    for subprotocol in parse_subprotocol(value)
                ]
                client_ip = self.peer.rsplit(":", 1)[0].strip("[]")
                leg = backend = BackendConn(request, offered, options, client_ip)
                async with asyncio.timeout(options.open_timeout):
                    await loop.create_connection(
                        lambda: leg, options.backend_host, options.backend_port
                    )
                    subprotocol = await leg.handshake
            except TimeoutError:
                wait = options.open_timeout
                self._refuse(F.CLOSE_TRY_AGAIN_LATER, f"backend did not answer within {wait:g} s")
            except BackendRejected as exc:
                self._refuse(F.CLOSE_INTERNAL_ERROR, f"backend rejected the handshake: {exc}")
            except OSError as exc:
                why = exc.strerror or str(exc) or type(exc).__name__
                self._refuse(
                    F.CLOSE_TRY_AGAIN_LATER, f"backend {options.backend_url} unreachable: {why}"
                )
            else:
                if self._relay(backend, subprotocol, 0, ""):
                    backend = None
        finally:
            self.server.connecting -= 1
            if backend is not None:
                backend.discard()

    def _refuse(self, code: int, error: str) -> None:
        self._relay(None, None, code, error)

    def _relay(
        self, backend: BackendConn | None, subprotocol: str | None, code: int, error: str
    ) -> bool:
        """Answer 101 and hand both transports to a relay Session (closing at once on ``code``).

        False when the client is already gone (the backend leg is then not used).
        """
        client = self.transport
        assert client is not None and self.request is not None and self.response is not None
        if client.is_closing():
            return False
        options = self.server.options
        response = self.response
        if subprotocol:
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        session = Session(
            client=client,
            peer=self.peer,
            path=http.route_path(self.request),
            max_size=options.max_message_size,
            close_timeout=options.close_timeout,
            on_done=self.server.session_done,
        )
        self.server.conns.discard(self)
        self.server.add_session(session)
        self.ticket.enter(Phase.SESSION)
        self.task = None
        client.write(response.serialize())
        client.set_protocol(session.c2b)
        if backend is None or backend.transport is None:
            session.error = error
            reason = "backend unavailable" if code == F.CLOSE_TRY_AGAIN_LATER else "backend error"
            session.fail(code, reason)
        else:
            session.attach_backend(backend.transport)
            self.server.headset_opened(session, self.request.headers.get("User-Agent", ""))
            backend.transport.set_protocol(session.b2c)
            if backend.extra:
                session.b2c.data_received(bytes(backend.extra))
            if backend.lost is not None:
                session.b2c.connection_lost(backend.lost[0])
            if not session.done:
                session.start_keepalive(options.ping_interval, options.ping_timeout)
        if self.extra and not session.done:
            session.c2b.data_received(bytes(self.extra))
        return True
