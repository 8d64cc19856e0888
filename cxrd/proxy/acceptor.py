"""The proxy's accept loop: admission before any TLS byte, and no end on EMFILE.

asyncio's ``Server`` accepts, makes a transport and only then lets a protocol
see the peer; and on EMFILE it logs an error with a traceback every second
until fds come back. This loop accepts the socket itself
(``loop.add_reader`` on the listener), asks :class:`~cxrd.proxy.admission.Admission`,
closes a refused peer with a reset before reading a byte, and hands an
admitted socket to asyncio (``connect_accepted_socket``) under
:class:`AdmittedTls`: cxrd's own TLS layer (:mod:`cxrd.proxy.tls`, memory BIOs
on a plain TCP transport), so the handshake starts only once the peer is
admitted and its deadline runs from accept. Out of fds, it stops reading the
listener, logs once, and retries with a backoff: the queued clients wait in
the kernel's backlog meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
import struct
import time
from collections.abc import Callable

from cxrd.errors import StartFailed
from cxrd.proxy.admission import (
    Admission,
    Refusal,
    RefusalLog,
    Ticket,
    format_address,
    peer_address,
)
from cxrd.proxy.tls import TlsServer

log = logging.getLogger("cxrd.proxy")

ACCEPT_BATCH = 64  # sockets accepted per wakeup, like asyncio's backlog-sized batches
RETRY_FIRST = 0.05  # seconds before the first retry after EMFILE; doubles up to RETRY_MAX
RETRY_MAX = 1.0
FD_SPARE = 32  # the log, the ready pipe, the executor's files, a probe or two
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, no TIME_WAIT


class AdmittedTls(TlsServer):
    """cxrd's TLS server protocol holding the connection's ticket until the socket closes."""

    def __init__(
        self,
        ticket: Ticket,
        context: ssl.SSLContext,
        app_factory: Callable[[], asyncio.BaseProtocol],
        handshake_timeout: float,
    ) -> None:
        super().__init__(context, app_factory, handshake_timeout)
        self.ticket = ticket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        self.ticket.bind(transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ticket.release()
        super().connection_lost(exc)


class Acceptor:
    """Accepts on ``sock`` until :meth:`stop`; ``protocol_for`` makes a peer's protocol."""

    def __init__(
        self,
        sock: socket.socket,
        admission: Admission,
        refusals: RefusalLog,
        protocol_for: Callable[[Ticket], asyncio.BaseProtocol],
        tasks: asyncio.TaskGroup,
    ) -> None:
        self._sock = sock
        self._admission = admission
        self._refusals = refusals
        self._protocol_for = protocol_for
        self._tasks = tasks
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._delay = RETRY_FIRST
        self._starved_since: float | None = None
        self._stopped = False

    def start(self) -> None:
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def stop(self) -> None:
        """Stop accepting; idempotent. Queued clients stay in the (inherited) listener's backlog."""
        if self._stopped:
            return
        self._stopped = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._starve(exc)
                    return
                continue  # ECONNABORTED and kin: that peer left while queued
            if self._starved_since is not None:
                waited = time.monotonic() - self._starved_since
                log.info("accepting again after %.1f s without file descriptors", waited)
                self._starved_since = None
                self._delay = RETRY_FIRST
            self._admit(conn, address)

    def _admit(self, conn: socket.socket, address: object) -> None:
        ip = peer_address(address)
        decision = self._admission.admit(ip) if ip is not None else Refusal.NOT_ALLOWED
        if isinstance(decision, Refusal):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            conn.close()
            line = self._refusals.line(decision, format_address(address))
            if line is not None:
                log.warning("%s", line)
            return
        self._tasks.create_task(self._adopt(conn, decision))

    async def _adopt(self, conn: socket.socket, ticket: Ticket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: self._protocol_for(ticket), conn)
        except OSError as exc:  # the peer reset before its transport existed
            log.debug("an accepted connection was gone before use: %s", exc)
            ticket.release()
            conn.close()

    def _starve(self, exc: OSError) -> None:
        """Out of fds (or kernel memory): stop reading the listener, log once, retry later."""
        self._loop.remove_reader(self._sock.fileno())
        if self._starved_since is None:
            self._starved_since = time.monotonic()
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)  # no fd needed, unlike /proc
            log.warning(
                "accept() failed: %s (open-file limit %d); new clients wait in the backlog, "
                "retrying until some close",
                exc.strerror or exc,
                soft,
            )
        self._retry = self._loop.call_later(self._delay, self._resume)
        self._delay = min(self._delay * 2, RETRY_MAX)

    def _resume(self) -> None:
        self._retry = None
        if not self._stopped:
            self._loop.add_reader(self._sock.fileno(), self._accept)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raise_fd_limit(max_pending: int, max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one and check the proxy's tables fit in it.

    A pending connection may hold two fds (its socket, and a file it sends or
    the backend it opens), a session two (client and backend). StartFailed
    names the keys when the hard limit cannot hold them; returns the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else _nr_open()
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    needed = open_fds() + 2 * max_pending + 2 * max_connections + FD_SPARE
    if needed > soft:
        raise StartFailed(
            f"proxy.max_pending {max_pending} and proxy.max_connections {max_connections} "
            f"need about {needed} file descriptors, but the open-file limit is {soft}: "
            "lower them, or raise the limit (LimitNOFILE= in the unit, ulimit -n)"
        )
    return soft


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024
