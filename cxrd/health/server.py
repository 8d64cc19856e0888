"""The health endpoints' HTTP server, on the daemon's loop (``health.listen``).

GET or HEAD only (anything else is 405), one request per connection, no
keep-alive. A request is bounded: its head must fit ``MAX_HEAD`` bytes (else
431) and arrive within ``HEAD_TIMEOUT`` (else the connection is dropped).
At most ``MAX_CONNECTIONS`` are held at once, a small pool of its own: when
it is full, a new connection takes the place of the oldest one still waiting
for its request head, so a flood of idle connections cannot starve the
liveness probe (whose request comes at once) and a kubelet never restarts a
healthy cxrd for it. Only when every place is busy answering is the newcomer
closed.
Nothing a request carries is written into a response: bodies are built from
the snapshot or are fixed texts, and only the request line is read (the
headers are read to their end and ignored; none change an answer).

The request line is split by hand: it is the only part read, and the HTTP
libraries on hand either parse on a thread (``http.server``) or answer other
methods than GET with their own 400 (websockets' handshake parser).

``/livez``   200 ``{"alive": true, "state": ..., "version": ...}``
``/readyz``  200 when ready, else 503; body from :func:`cxrd.health.report.ready_body`
``/metrics`` 200, the Prometheus text format (:mod:`cxrd.health.metrics`)
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Final

from cxrd.core.snapshot import Event
from cxrd.core.states import State, StateChanged
from cxrd.core.supervisor import Supervisor
from cxrd.health import metrics
from cxrd.health.report import live_body, ready_body

log = logging.getLogger(__name__)

MAX_HEAD: Final = 8192
HEAD_TIMEOUT: Final = 2.0  # a probe sends its request at once
WRITE_TIMEOUT: Final = 2.0
MAX_CONNECTIONS: Final = 16

_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"
_NOT_FOUND: Final = "Not found; try /livez, /readyz or /metrics."


class HealthServer:
    """Serves ``/livez``, ``/readyz`` and ``/metrics`` for one supervisor."""

    def __init__(self, supervisor: Supervisor, *, reaped: Callable[[], int] | None = None) -> None:
        self._sup = supervisor
        self._last_reason = ""
        self._changes: collections.Counter[State] = collections.Counter()
        self._unsubscribe = supervisor.subscribe(self._on_event)
        collector = metrics.DaemonCollector(
            supervisor.snapshot, lambda: self._last_reason, self._changes, reaped
        )
        self._registry = metrics.registry_for(collector)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pool: set[asyncio.StreamWriter] = set()  # connections holding a place
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # no head yet; oldest first

    def _on_event(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            self._last_reason = event.reason
            self._changes[event.new] += 1

    async def serve(self, sock: socket.socket) -> None:
        """Answer on ``sock``, a listening socket (``bind_listener``); it is ours from now on."""
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_HEAD)
        where = _address(sock.getsockname())
        log.info("health endpoints on http://%s (/livez, /readyz, /metrics)", where)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening and drop open connections; idempotent."""
        self._unsubscribe()
        self._unsubscribe = _nothing
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _make_room(self) -> bool:
        """A place in the pool for a new connection: the oldest waiting one's if it is full."""
        if len(self._pool) < MAX_CONNECTIONS:
            return True
        oldest = next(iter(self._waiting), None)
        if oldest is None:
            return False  # every place is answering, each for at most WRITE_TIMEOUT
        del self._waiting[oldest]
        self._pool.discard(oldest)
        oldest.transport.abort()  # its read ends (EOF); its task finishes on its own
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or not self._make_room():
            writer.transport.abort()
            return
        self._tasks.add(task)
        self._pool.add(writer)
        self._waiting[writer] = None
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                answer = _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Head too large.")
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            else:
                answer = self._route(head)
            finally:
                self._waiting.pop(writer, None)  # answering now: not evicted
            writer.write(answer)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            self._pool.discard(writer)
            self._waiting.pop(writer, None)
            writer.close()

    def _route(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _text(HTTPStatus.BAD_REQUEST, "Bad request.")
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            allow = {"Allow": "GET, HEAD"}
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, "Only GET and HEAD.", allow)
        head_only = method == b"HEAD"
        path = target.split(b"?", 1)[0]
        snap = self._sup.snapshot()
        if path == b"/livez":
            return _json(HTTPStatus.OK, live_body(snap), head_only)
        if path == b"/readyz":
            body = ready_body(snap, self._last_reason)
            status = HTTPStatus.OK if body["ready"] else HTTPStatus.SERVICE_UNAVAILABLE
            return _json(status, body, head_only)
        if path == b"/metrics":
            text = metrics.exposition(self._registry)
            return _response(HTTPStatus.OK, text, metrics.CONTENT_TYPE, head_only=head_only)
        return _text(HTTPStatus.NOT_FOUND, _NOT_FOUND, head_only=head_only)


def _nothing() -> None:
    pass


def _address(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _json(status: HTTPStatus, body: Mapping[str, Any], head_only: bool) -> bytes:
    data = json.dumps(dict(body), sort_keys=True).encode() + b"\n"
    return _response(status, data, _JSON, head_only=head_only)


def _text(
    status: HTTPStatus,
    text: str,
    extra: Mapping[str, str] | None = None,
    *,
    head_only: bool = False,
) -> bytes:
    return _response(status, text.encode() + b"\n", _TEXT, extra, head_only=head_only)


def _response(
    status: HTTPStatus,
    body: bytes,
    content_type: str,
    extra: Mapping[str, str] | None = None,
    *,
    head_only: bool = False,
) -> bytes:
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Connection": "close",
        **(extra or {}),
    }
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body
