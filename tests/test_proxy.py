"""The WSS proxy as a real process: real TLS, real websockets clients, real openssl.

Each proxy runs as ``python -m cxrd.proxy`` in front of the recording echo
backend of tests/fixtures_proxy.py, which the test runs itself in a thread.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_proxy import (
    Backend,
    Proxy,
    client_tls,
    fetch,
    open_raw_ws,
    open_ws,
    run,
)
from support import TIMEOUT
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


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
