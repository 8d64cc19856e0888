"""The WSS proxy server: one listening socket, what holds a connection, and shutdown.

A peer is admitted or turned away at ``accept()`` (:mod:`cxrd.proxy.acceptor`,
by :mod:`cxrd.proxy.admission`'s tables), then TLS is terminated by
:mod:`cxrd.proxy.tls` under a :class:`~cxrd.proxy.connection.ClientConn`,
which answers its request or opens a relay :class:`~cxrd.proxy.relay.Session`.
:class:`ProxyServer` owns them all: their tasks, the sessions and headsets it
reports to the daemon, ``/healthz``'s figures, and the close with 1001.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrd.config_proxy import Network
from cxrd.constants import DEFAULT_BACKEND_PORT
from cxrd.core.model import Closed, Opened, SessionEvent
from cxrd.core.snapshot import Headset
from cxrd.proxy import events, http
from cxrd.proxy import frames as F
from cxrd.proxy.acceptor import Acceptor, AdmittedTls
from cxrd.proxy.admission import Admission, RefusalLog, Ticket, format_address
from cxrd.proxy.connection import ClientConn
from cxrd.proxy.relay import Session
from cxrd.proxy.tls import TLS12_CIPHERS

log = logging.getLogger("cxrd.proxy")


@dataclass(frozen=True)
class ProxyOptions:
    backend_host: str = "127.0.0.1"
    backend_port: int = DEFAULT_BACKEND_PORT
    max_message_size: int = 4 * 1024 * 1024
    max_connections: int = 64  # relay sessions
    max_pending: int = 64  # connections not yet a session (cxrd.proxy.admission)
    max_per_address: int = 16  # connections from one address, sessions included
    handshake_timeout: float = 5.0  # accept to TLS handshake done
    head_timeout: float = 5.0  # TLS done to the whole request head
    send_timeout: float = 10.0  # a client that takes none of an answer for this long is dropped
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    open_timeout: float = 10.0  # backend connect + handshake
    close_timeout: float = 5.0
    client_dir: Path | None = None  # serve the web client from here at /client/
    allow: tuple[Network, ...] = ()  # who may connect; () = everyone
    origins: tuple[str, ...] = ()  # proxy.origins, normalised: more web pages that may connect

    @property
    def backend_url(self) -> str:
        host = f"[{self.backend_host}]" if ":" in self.backend_host else self.backend_host
        return f"ws://{host}:{self.backend_port}"


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(TLS12_CIPHERS)  # AEAD only at TLS 1.2; TLS 1.3 keeps its own
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


class ProxyServer:
    """Serves one listening socket until :meth:`close`; ``stop()``/``wait_closed()`` twins."""

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLContext,
        options: ProxyOptions,
        report: Callable[[SessionEvent], None] | None = None,
    ) -> None:
        self.sock = sock
        self.tls = tls
        self.options = options
        self.sessions: set[Session] = set()
        self.connecting = 0
        self.started = time.monotonic()
        self.conns: set[ClientConn] = set()  # connections not (yet) a session
        self._report = report  # headset sessions, to the daemon
        self.headsets: dict[Session, Headset] = {}
        self.origins = http.Origins(frozenset(options.origins))
        self.refusals = RefusalLog()  # at accept, and of web pages by Origin (connection.py)
        self.admission = Admission(options.allow, options.max_pending, options.max_per_address)
        self._acceptor: Acceptor | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    async def serve(self, on_listening: Callable[[], None] | None = None) -> None:
        """Accept until :meth:`close`, then close every connection with 1001 and return."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            self._acceptor = Acceptor(
                self.sock, self.admission, self.refusals, self._protocol_for, tasks
            )
            self._acceptor.start()
            log.info(
                "listening on %s, relaying to %s (pid %d)",
                format_address(self.sock.getsockname()),
                self.options.backend_url,
                os.getpid(),
            )
            if on_listening is not None:
                on_listening()
            await self._stop.wait()
            await self._shut_down()

    def _protocol_for(self, ticket: Ticket) -> asyncio.BaseProtocol:
        """An admitted peer's protocol: TLS by :mod:`cxrd.proxy.tls` (bench/proxy_relay.py
        compares asyncio's own here), then a :class:`ClientConn`."""
        return AdmittedTls(
            ticket, self.tls, lambda: ClientConn(self, ticket), self.options.handshake_timeout
        )

    def close(self) -> None:
        """Stop serving; idempotent. :meth:`serve` returns once connections are closed."""
        self._stop.set()

    async def _shut_down(self) -> None:
        assert self._acceptor is not None
        self._acceptor.stop()
        for conn in list(self.conns):
            conn.abandon()
        for session in list(self.sessions):
            session.fail(F.CLOSE_GOING_AWAY, "proxy shutting down")
        try:
            async with asyncio.timeout(self.options.close_timeout + 1.0):
                await self._idle.wait()
        except TimeoutError:
            for session in list(self.sessions):
                for transport in (session.client, session.backend):
                    if transport is not None:
                        transport.abort()
        log.info("stopped")

    # Bookkeeping used by connections ------------------------------------------

    @property
    def busy(self) -> bool:
        return len(self.sessions) + self.connecting >= self.options.max_connections

    def spawn(self, conn: ClientConn, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        if self._tasks is None or self._stop.is_set():
            coro.close()
            return None
        return self._tasks.create_task(self._isolated(conn, coro))

    async def _isolated(self, conn: ClientConn, coro: Coroutine[Any, Any, None]) -> None:
        """Run one connection's task: a bug there ends that connection, never the server.

        The task group owns every connection's task so that shutdown waits for them;
        an exception reaching it would cancel the server and every session with it.
        """
        try:
            await coro
        except Exception as exc:
            log.exception(
                "client=%s: internal error (%r); dropping this connection", conn.peer, exc
            )
            conn.task = None  # this very task: it ends here, nothing to cancel
            conn.abandon()

    def add_session(self, session: Session) -> None:
        self.sessions.add(session)
        self._idle.clear()

    def headset_opened(self, session: Session, user_agent: str) -> None:
        """A session reached the runtime's signaling: a headset is there."""
        host = session.peer.rsplit(":", 1)[0].strip("[]")
        agent = http.terminal_safe(user_agent, events.MAX_USER_AGENT)
        path = http.terminal_safe(session.path, events.MAX_USER_AGENT)
        headset = Headset(uuid.uuid4().hex[:12], host, agent, path, time.time())
        self.headsets[session] = headset
        if self._report is not None:
            self._report(Opened(headset))

    def session_done(self, session: Session) -> None:
        self.sessions.discard(session)
        log.info("%s", session.summary())
        headset = self.headsets.pop(session, None)
        if headset is not None and self._report is not None:
            seconds = round(time.monotonic() - session.started, 3)
            code = session.code if session.code is not None else F.CLOSE_ABNORMAL
            self._report(Closed(headset.id, seconds, code))
        if not self.sessions:
            self._idle.set()

    def health(self, reachable: bool) -> dict[str, object]:
        return {
            "backend_reachable": reachable,
            "backend": self.options.backend_url,
            "connections": len(self.sessions),
            "headsets": len(self.headsets),
            "max_connections": self.options.max_connections,
            "pending": self.admission.pending,
            "max_pending": self.options.max_pending,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
        }
