"""The proxy process when things go wrong: a backend down, deaf or over its limits, a
client that stops answering, signals, a planted bug, a taken port, a bad pair; and
the proxy as the daemon runs it (an inherited listener, READY on a pipe, death with
its parent) with its own rotated log.

Each test starts its own ``python -m cxrd.proxy`` (tests/fixtures_proxy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest
from fixtures_proxy import (
    PY,
    UPGRADE,
    Backend,
    Proxy,
    client_tls,
    fetch,
    open_ws,
    run,
)
from support import TIMEOUT, free_port, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from cxrd.proxy.certs import ensure_certificate

# Failure and bounds, each with its own proxy ----------------------------------------------------


def test_backend_down_closes_that_client_with_1013_and_the_proxy_keeps_serving(
    certs: tuple[Path, Path],
) -> None:
    proxy = Proxy(certs, free_port())  # nothing listens on the backend port
    try:

        async def scenario() -> tuple[int | None, str | None]:
            async with open_ws(proxy, certs, "/signal") as ws:
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return ws.close_code, ws.close_reason

        assert run(scenario()) == (1013, "backend unavailable")
        line = proxy.wait_line(r"path='/signal'")
        assert "close=1013" in line and "unreachable" in line
        _, _, body = fetch(proxy, certs, "GET", "/healthz")
        assert json.loads(body)["backend_reachable"] is False
        status, _, page = fetch(proxy, certs, "GET", "/")
        assert status == 200 and b"Certificate accepted" in page
        assert proxy.proc.poll() is None
    finally:
        assert proxy.stop() == 0


def test_connections_over_the_limit_are_refused_with_503(
    certs: tuple[Path, Path], backend: Backend
) -> None:
    proxy = Proxy(certs, backend.port, "--max-connections", "2")
    try:

        async def scenario() -> int:
            async with open_ws(proxy, certs) as a, open_ws(proxy, certs) as b:
                for ws in (a, b):
                    await ws.send("up")
                    assert await ws.recv() == "up"
                with pytest.raises(InvalidStatus) as refused:
                    async with open_ws(proxy, certs):
                        pass
                return refused.value.response.status_code

        assert run(scenario()) == 503
        proxy.wait_line(r"status=503")
    finally:
        assert proxy.stop() == 0


def test_a_head_sent_a_byte_per_record_costs_the_proxy_no_more_cpu_for_being_all_cr(
    certs: tuple[Path, Path], backend: Backend
) -> None:
    # A head the proxy scanned whole at every record cost it ~0.45 s of CPU per 16 KiB
    # of one-byte records of CR (the search's worst case), 4x the same head of "a".
    proxy = Proxy(certs, backend.port, "--head-timeout", str(TIMEOUT * 3))
    context = client_tls(certs)

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{proxy.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def head_of(byte: bytes) -> float:
        """The proxy's CPU seconds for a head of ``byte`` sent a TLS record each, to its 431."""
        before = cpu_seconds()
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\n")
            for _ in range(16 * 1024 + 16):  # past the 16 KiB head bound
                tls.send(byte)
            assert tls.recv(64).startswith(b"HTTP/1.1 431 ")
        return cpu_seconds() - before

    try:
        head_of(b"a")  # warm-up
        plain, carriage_returns = head_of(b"a"), head_of(b"\r")
        assert carriage_returns < 2 * plain + 0.05, (plain, carriage_returns)
    finally:
        proxy.stop()


def test_a_client_that_stops_answering_pings_is_dropped(
    certs: tuple[Path, Path], backend: Backend
) -> None:
    proxy = Proxy(certs, backend.port, "--ping-interval", "0.2", "--ping-timeout", "0.3")
    try:
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
        tls = client_tls(certs).wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(UPGRADE.format(path="/mute").encode())
        received = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := tls.recv(4096):  # never answers: reads until the proxy hangs up
                received += chunk
        tls.close()
        head, _, frames = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert frames[:1] == b"\x89"  # the proxy pinged first
        assert "keepalive" in proxy.wait_line(r"path='/mute'")
        code, _ = backend.close_of("/mute")
        assert code == 1001
    finally:
        assert proxy.stop() == 0


def test_sigterm_closes_clients_with_1001_and_exits_0(
    certs: tuple[Path, Path], backend: Backend
) -> None:
    proxy = Proxy(certs, backend.port)
    try:

        async def scenario() -> int | None:
            async with open_ws(proxy, certs, "/term") as ws:
                await ws.send("hi")
                await ws.recv()
                proxy.proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return ws.close_code

        assert run(scenario()) == 1001
        assert proxy.proc.wait(TIMEOUT) == 0
        assert backend.close_of("/term")[0] == 1001
    finally:
        proxy.stop()


# The proxy program with a bug planted in the backend leg's setup, for one path only.
BUGGY_PROXY = textwrap.dedent(
    """
    import sys
    from cxrd.proxy import connection
    from cxrd.proxy.__main__ import main
    real_init = connection.BackendConn.__init__
    def init(self, request, *args):
        if request.path == "/bug":
            raise RuntimeError("planted bug")
        real_init(self, request, *args)
    connection.BackendConn.__init__ = init
    sys.exit(main())
    """
)


def test_an_internal_error_in_one_connection_ends_only_that_connection(
    certs: tuple[Path, Path], backend: Backend
) -> None:
    proxy = Proxy(certs, backend.port, program=("-c", BUGGY_PROXY))
    try:

        async def scenario() -> None:
            async with open_ws(proxy, certs, "/steady") as steady:
                await steady.send("before")
                assert await steady.recv() == "before"
                with pytest.raises((InvalidMessage, ConnectionClosed, OSError)):
                    async with open_ws(proxy, certs, "/bug"):
                        pass
                await steady.send("after")  # the session open meanwhile is untouched
                assert await steady.recv() == "after"
                async with open_ws(proxy, certs, "/later") as later:  # and new ones are served
                    await later.send("new")
                    assert await later.recv() == "new"

        run(scenario())
        assert "planted bug" in proxy.wait_line(r"client=.*internal error")
        assert proxy.proc.poll() is None
    finally:
        assert proxy.stop() == 0


def test_port_taken_fails_naming_the_holder(certs: tuple[Path, Path]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run(
            [PY, "-m", "cxrd.proxy", "--host", "127.0.0.1", "--port", str(port),
             "--cert", str(certs[0]), "--key", str(certs[1])],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
    assert out.returncode == 10  # StartFailed
    assert f"port {port} on 127.0.0.1 is taken by pid {os.getpid()}" in out.stderr


# Supervision: an inherited listener, READY on a pipe, death with the parent --------------------

PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from pathlib import Path
    from cxrd.config import Config, ProxyConfig, RuntimeConfig
    from cxrd.proxy.launch import prepare_proxy

    config = Config(
        install_dir=sys.argv[1],
        runtime=RuntimeConfig(signaling_port=int(sys.argv[3])),
        proxy=ProxyConfig(host="127.0.0.1", port=int(sys.argv[2])),
    )
    launch = prepare_proxy(config)
    read_end, write_end = os.pipe()
    spec = launch.spec(write_end)
    with open(spec.stderr, "ab") as err:
        child = subprocess.Popen(
            spec.argv, env=dict(spec.env), pass_fds=spec.pass_fds, stderr=err,
            stdout=subprocess.DEVNULL, start_new_session=True,
        )
    os.close(write_end)
    print(child.pid, os.read(read_end, 64).decode().strip(), flush=True)
    time.sleep(3600)
    """
)


def test_inherited_listener_ready_pipe_and_death_with_the_parent(
    tmp_path: Path, backend: Backend
) -> None:
    port = free_port()
    child = 0
    parent = subprocess.Popen(
        [PY, "-c", PARENT, str(tmp_path), str(port), str(backend.port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        ready, _, _ = select.select([parent.stdout], [], [], TIMEOUT)
        assert ready, "the parent did not report the proxy's READY"
        pid_text, word = parent.stdout.readline().split()
        child = int(pid_text)
        assert word == "READY"
        certs = (tmp_path / "certs" / "server.crt", tmp_path / "certs" / "server.key")
        assert oct(certs[1].stat().st_mode & 0o777) == "0o600"

        async def scenario() -> str:
            url = f"wss://127.0.0.1:{port}/x"
            async with connect(url, ssl=ssl.create_default_context(cafile=str(certs[0]))) as ws:
                await ws.send("through an inherited socket")
                return str(await ws.recv())

        assert run(scenario()) == "through an inherited socket"
        pidfd = os.pidfd_open(child)
        try:
            parent.kill()
            parent.wait(TIMEOUT)
            gone, _, _ = select.select([pidfd], [], [], TIMEOUT)
            assert gone, "the proxy outlived its SIGKILLed parent"
        finally:
            os.close(pidfd)
        log = (tmp_path / "logs" / "wss.log").read_text()
        assert "path='/x'" in log and "close=1000" in log
        assert "listening on 127.0.0.1:" in log and "stopped" in log  # SIGTERM: a clean exit
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)  # only if the test failed with the proxy alive


class DeafBackend:
    """Accepts one WebSocket handshake, then never reads again (a stuck runtime)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        from websockets.server import ServerProtocol

        conn, _ = self.listener.accept()
        self.conn = conn
        protocol = ServerProtocol()
        while not (events := protocol.events_received()):
            protocol.receive_data(conn.recv(4096))
        protocol.send_response(protocol.accept(events[0]))  # type: ignore[arg-type]
        conn.sendall(b"".join(protocol.data_to_send()))

    def close(self) -> None:
        self._thread.join(TIMEOUT)
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_backend_that_stops_reading_stops_the_client_instead_of_filling_memory(
    certs: tuple[Path, Path],
) -> None:
    deaf = DeafBackend()
    proxy = Proxy(certs, deaf.port, "--max-message-size", str(1 << 20))
    try:
        before = rss_bytes(proxy.proc.pid)
        chunk = b"z" * (1 << 20)

        async def scenario() -> int:
            sent = 0
            async with open_ws(proxy, certs, "/deaf") as ws:
                with contextlib.suppress(TimeoutError):
                    for _ in range(96):
                        async with asyncio.timeout(1.0):
                            await ws.send(chunk)
                        sent += len(chunk)
                ws.transport.abort()
            return sent

        sent = run(scenario())
        assert sent < 32 << 20  # the client was held back: only socket buffers filled (~8 MiB)
        assert rss_bytes(proxy.proc.pid) - before < 16 << 20
    finally:
        assert proxy.stop() == 0
        deaf.close()


def test_a_mismatched_pair_stops_the_proxy_with_a_named_error(
    certs: tuple[Path, Path], tmp_path: Path
) -> None:
    _, other_key = ensure_certificate(tmp_path / "other")
    log = tmp_path / "wss.log"
    out = subprocess.run(
        [PY, "-m", "cxrd.proxy", "--host", "127.0.0.1", "--port", str(free_port()),
         "--cert", str(certs[0]), "--key", str(other_key), "--log", str(log)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 10
    assert f"{certs[0]}, {other_key}: cannot load the TLS pair" in out.stderr
    assert "mismatch" in out.stderr and "Traceback" not in out.stderr
    assert "cannot load the TLS pair" in log.read_text()


def test_the_proxy_rotates_its_own_log_and_keeps_only_the_newest(
    certs: tuple[Path, Path], backend: Backend, tmp_path: Path
) -> None:
    log = tmp_path / "wss.log"
    max_bytes, keep = 2000, 2
    limits = ("--log", str(log), "--log-max-bytes", str(max_bytes), "--log-keep", str(keep))
    proxy = Proxy(certs, backend.port, *limits)
    try:

        async def sessions() -> None:
            for n in range(60):  # each session writes one summary line when it ends
                async with open_ws(proxy, certs, f"/session-{n}") as ws:
                    await ws.send("x")
                    assert await ws.recv() == "x"

        run(sessions())
        wait_until(lambda: "/session-59" in log.read_text(), "the last session's line")
    finally:
        proxy.stop()
    files = sorted(p.name for p in tmp_path.glob("wss.log*"))
    assert files == ["wss.log", "wss.log.1", "wss.log.2"], files
    assert all((tmp_path / name).stat().st_size <= max_bytes for name in files)
    # Nothing lost inside what is kept: the newest sessions, each once, in order.
    kept = "".join((tmp_path / name).read_text() for name in reversed(files))
    numbers = [int(m) for m in re.findall(r"/session-(\d+)", kept)]
    assert numbers == list(range(numbers[0], 60)), numbers
