"""The WSS proxy as a real process: real TLS, real websockets clients, real openssl.

Each proxy runs as ``python -m cxrd.proxy`` in front of the recording echo
backend of tests/fixtures_proxy.py, which the test runs itself in a thread.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_proxy import (
    PY,
    UPGRADE,
    Backend,
    Proxy,
    client_tls,
    fetch,
    open_raw_ws,
    open_ws,
    run,
)
from support import TIMEOUT, free_port, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from cxrd.proxy.certs import ensure_certificate


@pytest.fixture(scope="module")
def proxy(certs: tuple[Path, Path], backend: Backend) -> Iterator[Proxy]:
    running = Proxy(
        certs,
        backend.port,
        *("--max-message-size", "65536", "--max-connections", "60"),
        *("--max-per-address", "60"),  # fifty clients, all from 127.0.0.1
    )
    yield running
    assert running.stop() == 0


# Relay ---------------------------------------------------------------


def test_text_and_binary_messages_echo_through_the_proxy(proxy: Proxy, certs: Any) -> None:
    async def scenario() -> None:
        async with open_ws(proxy, certs) as ws:
            await ws.send("héllo")
            assert await ws.recv() == "héllo"
            blob = bytes(range(256)) * 200  # several TLS records, one message
            await ws.send(blob)
            assert await ws.recv() == blob
            await ws.send([b"frag", b"mented"])  # a fragmented message
            assert await ws.recv() == b"fragmented"

    run(scenario())


def test_path_query_subprotocol_and_end_to_end_headers_reach_the_backend(
    proxy: Proxy, certs: Any
) -> None:
    async def scenario() -> dict[str, Any]:
        async with open_ws(
            proxy,
            certs,
            "/sign/in?session=42&x=y",
            subprotocols=["cxr-a", "cxr-b"],
            additional_headers={
                "X-Teleop": "quest-3",
                "Origin": f"https://127.0.0.1:{proxy.port}",  # a page this proxy served
                "X-Forwarded-For": "203.0.113.9",  # claims the proxy must not pass on
                "Forwarded": "for=203.0.113.9",
                "X-Real-IP": "203.0.113.9",
            },
            user_agent_header="HeadsetBrowser/1.0",
        ) as ws:
            assert ws.subprotocol == "cxr-b"  # the backend's choice comes back
            await ws.send("whoami")
            return json.loads(await ws.recv())  # type: ignore[no-any-return]

    seen = run(scenario())
    assert seen["path"] == "/sign/in?session=42&x=y"
    assert seen["subprotocol"] == "cxr-b"
    headers = dict(seen["headers"])
    assert headers["x-teleop"] == "quest-3"
    assert headers["origin"] == f"https://127.0.0.1:{proxy.port}"
    assert headers["user-agent"] == "HeadsetBrowser/1.0"
    assert [v for n, v in seen["headers"] if n == "x-forwarded-for"] == ["127.0.0.1"]
    assert "forwarded" not in headers and "x-real-ip" not in headers
    assert headers["host"] == f"127.0.0.1:{proxy_backend_port(proxy)}"
    names = [name for name, _ in seen["headers"]]
    assert names.count("sec-websocket-key") == 1  # the backend leg's own, not the client's
    assert "sec-websocket-extensions" not in names  # no compression on the backend leg


def proxy_backend_port(proxy: Proxy) -> int:
    argv = proxy.proc.args
    assert isinstance(argv, list)
    return int(argv[argv.index("--backend-port") + 1])


def test_client_close_code_and_reason_reach_the_backend(
    proxy: Proxy, backend: Backend, certs: Any
) -> None:
    async def scenario() -> None:
        async with open_ws(proxy, certs, "/bye") as ws:
            await ws.send("ping")
            await ws.recv()
            await ws.close(4001, "headset leaving")
            assert ws.close_code == 4001

    run(scenario())
    assert backend.close_of("/bye") == (4001, "headset leaving")
    line = proxy.wait_line(r"path='/bye'")
    assert "close=4001" in line and "bytes_in=" in line and "duration=" in line


def test_backend_close_code_and_reason_reach_the_client(proxy: Proxy, certs: Any) -> None:
    async def scenario() -> tuple[int | None, str | None]:
        async with open_ws(proxy, certs) as ws:
            await ws.send("close 4002 runtime restarting")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return ws.close_code, ws.close_reason

    assert run(scenario()) == (4002, "runtime restarting")


def test_message_over_the_limit_is_closed_with_1009(
    proxy: Proxy, backend: Backend, certs: Any
) -> None:
    async def scenario() -> int | None:
        async with open_ws(proxy, certs, "/big", max_size=None) as ws:
            await ws.send(b"x" * 65536)  # at the limit: passes
            assert len(await ws.recv()) == 65536
            await ws.send(b"x" * 65537)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return ws.close_code

    assert run(scenario()) == 1009
    code, _ = backend.close_of("/big")
    assert code == 1001  # the backend is told the client went away, not the oversize data
    assert "close=1009" in proxy.wait_line(r"path='/big'")


def test_fifty_concurrent_clients_each_get_their_own_echoes(proxy: Proxy, certs: Any) -> None:
    async def one(index: int) -> list[str]:
        async with open_ws(proxy, certs, f"/c{index}") as ws:
            got = []
            for n in range(10):
                await ws.send(f"{index}:{n}")
                got.append(await ws.recv())
            return got

    async def scenario() -> list[list[str]]:
        return await asyncio.gather(*(one(i) for i in range(50)))

    results = run(scenario())
    assert results == [[f"{i}:{n}" for n in range(10)] for i in range(50)]


def test_tls_1_2_clients_are_served(proxy: Proxy, certs: Any) -> None:
    context = client_tls(certs)
    context.maximum_version = ssl.TLSVersion.TLSv1_2

    async def scenario() -> str:
        async with connect(proxy.url + "/", ssl=context) as ws:
            await ws.send("tls12")
            return str(await ws.recv())

    assert run(scenario()) == "tls12"


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_a_client_close_notify_is_answered_and_ends_the_backend_leg(
    proxy: Proxy, backend: Backend, certs: tuple[Path, Path], version: ssl.TLSVersion
) -> None:
    path = f"/notify-{version.name}"
    context = client_tls(certs)
    context.minimum_version = context.maximum_version = version
    tls = open_raw_ws(proxy, context, path)
    # unwrap() sends our close_notify and returns only once the proxy's comes back
    # (a socket timeout, TIMEOUT, if it never does).
    plain = tls.unwrap()
    try:
        assert plain.recv(1) == b"", "after its close_notify the proxy ends TCP"
    finally:
        plain.close()
    assert backend.close_of(path) == (1001, "client went away")
    assert "close=1006" in proxy.wait_line(re.escape(f"path='{path}'"))


# HTTP side ---------------------------------------------------------------


def test_plain_get_answers_the_certificate_page_without_reflecting_input(
    proxy: Proxy, certs: Any
) -> None:
    status, headers, raw = fetch(
        proxy, certs, "GET", "/%3Cscript%3Ealert(1)%3C/script%3E?<b>x</b>", {"X-Evil": "<i>"}
    )
    body = raw.decode()
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "Certificate accepted" in body
    for needle in ("script", "alert", "<b>", "<i>", "X-Evil", "x</b>"):
        assert needle not in body


def test_healthz_says_the_backend_is_reachable(proxy: Proxy, certs: Any) -> None:
    status, headers, body = fetch(proxy, certs, "GET", "/healthz")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    report = json.loads(body)
    assert report["backend_reachable"] is True
    assert report["backend"].endswith(f":{proxy_backend_port(proxy)}")


def test_openssl_s_client_sees_tls_1_2_or_later_and_the_generated_certificate(
    proxy: Proxy, certs: tuple[Path, Path]
) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-servername", "localhost",
         "-CAfile", str(certs[0]), "-showcerts"],
        input="", capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert re.search(r"New, TLSv1\.[23], Cipher is", out.stdout), out.stdout
    assert "subject=CN = localhost" in out.stdout or "subject=CN=localhost" in out.stdout
    assert "Verify return code: 0 (ok)" in out.stdout  # it is exactly our certificate
    served = out.stdout.split("-----BEGIN CERTIFICATE-----")[1].split("-----END")[0]
    assert "".join(served.split()) in "".join(certs[0].read_text().split())


def test_tls_1_1_is_refused(proxy: Proxy) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-tls1_1",
         "-cipher", "DEFAULT@SECLEVEL=0"],
        input="", capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    if "no protocols available" in out.stderr or "unknown option" in out.stderr:
        pytest.skip("the local openssl cannot even offer TLS 1.1")
    assert out.returncode != 0
    assert "alert protocol version" in out.stderr or "no peer certificate" in out.stdout


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
