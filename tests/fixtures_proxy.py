"""The proxy as the tests run it: ``python -m cxrd.proxy`` in front of a recording backend.

A :class:`Proxy` is a real proxy process on a free port (its stderr lines
kept for the test), in front of a :class:`Backend`, a websockets echo server
on its own loop in a thread that answers a few commands so that what it saw
can be checked through the proxy: ``whoami`` (path, subprotocol, headers),
``close CODE REASON``. The ``certs`` and ``backend`` fixtures give each test
module one of each; a module may override them (another pair, a backend per
test).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import queue
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import TIMEOUT, free_port
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cxrd.proxy.certs import ensure_certificate

PY = sys.executable


# The backend ---------------------------------------------------------------


class FrameLog(logging.Handler):
    """The frames a websockets server received: its debug lines ``< PING ...``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.received: list[str] = []
        self.logger = logging.getLogger(f"test.backend.{id(self)}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if line.startswith("< ") and not line.startswith("< GET"):
            self.received.append(line[2:])


class Backend:
    """A websockets echo server on its own loop in a thread; records the closes it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.frames = FrameLog()  # every frame the backend receives, as websockets logs it
        self._closes: dict[str, tuple[int | None, str | None]] = {}
        self._closed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Backend:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "backend did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        stop = self._stop
        assert stop is not None
        self._loop.call_soon_threadsafe(stop.set_result, None)
        self._thread.join(TIMEOUT)

    def close_of(self, path: str) -> tuple[int | None, str | None]:
        """The close code and reason the backend received on its connection for ``path``."""
        with self._closed:
            assert self._closed.wait_for(lambda: path in self._closes, TIMEOUT), path
            return self._closes[path]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.get_running_loop().create_future()

        def choose(conn: ServerConnection, offered: list[str]) -> str | None:
            return "cxr-b" if "cxr-b" in offered else None

        async with serve(
            self._handler,
            "127.0.0.1",
            self.port,
            select_subprotocol=choose,  # type: ignore[arg-type]
            compression=None,
            max_size=None,
            logger=self.frames.logger,
        ):
            self._ready.set()
            await self._stop

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        path = ws.request.path
        try:
            async for message in ws:
                if message == "whoami":
                    request = ws.request
                    assert request is not None
                    await ws.send(
                        json.dumps(
                            {
                                "path": request.path,
                                "subprotocol": ws.subprotocol,
                                "headers": [[k.lower(), v] for k, v in request.headers.raw_items()],
                            }
                        )
                    )
                elif isinstance(message, str) and message.startswith("close "):
                    _, code, reason = message.split(" ", 2)
                    await ws.close(int(code), reason)
                else:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            await ws.wait_closed()
            with self._closed:
                self._closes[path] = (ws.close_code, ws.close_reason)
                self._closed.notify_all()


# The proxy process ---------------------------------------------------------------


class Proxy:
    """``python -m cxrd.proxy`` on a free port; stderr lines collected for the test."""

    def __init__(
        self,
        certs: tuple[Path, Path],
        backend_port: int,
        *extra: str,
        program: tuple[str, ...] = ("-m", "cxrd.proxy"),
    ) -> None:
        self.port = free_port()
        self.url = f"wss://127.0.0.1:{self.port}"
        cert, key = certs
        ready_r, ready_w = os.pipe()
        self.proc = subprocess.Popen(
            [
                PY, *program, "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-port", str(backend_port), "--cert", str(cert), "--key", str(key),
                "--ready-fd", str(ready_w), *extra,
            ],
            pass_fds=(ready_w,),
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        os.close(ready_w)
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        try:
            assert read_with_timeout(ready_r) == b"READY\n", "proxy did not report READY"
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(ready_r)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_line(self, pattern: str) -> str:
        """The next stderr line matching ``pattern`` (a regex)."""
        while True:
            line = self.lines.get(timeout=TIMEOUT)
            if re.search(pattern, line):
                return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(TIMEOUT)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


def read_with_timeout(fd: int) -> bytes:
    readable, _, _ = select.select([fd], [], [], TIMEOUT)
    return os.read(fd, 64) if readable else b""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_certificate(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with Backend() as server:
        yield server


def client_tls(certs: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs[0]))


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT * 3):
            return await coro

    return asyncio.run(bounded())


def open_ws(proxy: Proxy, certs: tuple[Path, Path], path: str = "/", **kwargs: Any) -> Any:
    return connect(proxy.url + path, ssl=client_tls(certs), compression=None, **kwargs)


def fetch(
    proxy: Proxy,
    certs: tuple[Path, Path],
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTPS request through a fresh connection: status, headers, body."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", proxy.port, context=client_tls(certs), timeout=TIMEOUT
    )
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


# Raw requests ---------------------------------------------------------------

UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)


def open_raw_ws(proxy: Proxy, context: ssl.SSLContext, path: str) -> ssl.SSLSocket:
    """A TLS socket on which the proxy answered a WebSocket upgrade to ``path`` with 101."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(UPGRADE.format(path=path).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = tls.recv(4096)
        assert chunk, "the proxy closed before answering the upgrade"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return tls
