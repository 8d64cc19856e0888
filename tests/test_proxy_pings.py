"""A client's pings are the proxy's to answer: never passed to the runtime, pongs rate-bound.

A real ``python -m cxrd.proxy`` in front of the recording websockets backend of
tests/fixtures_proxy.py (its log of every frame it receives).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fixtures_proxy import Backend, Proxy, client_tls, open_raw_ws, open_ws, run
from support import TIMEOUT

from cxrd.proxy import frames as F
from cxrd.proxy.relay import PONG_INTERVAL


@pytest.fixture
def backend() -> Iterator[Backend]:
    with Backend() as server:
        yield server


@pytest.fixture
def proxy(certs: Any, backend: Backend) -> Iterator[Proxy]:
    running = Proxy(certs, backend.port)
    yield running
    assert running.stop() == 0


def test_a_client_ping_is_answered_by_the_proxy_and_never_reaches_the_runtime(
    proxy: Proxy, backend: Backend, certs: Any
) -> None:
    async def scenario() -> None:
        async with open_ws(proxy, certs, "/pinging", ping_interval=None) as ws:
            pong = await ws.ping(b"are you there")
            await pong  # answered (websockets matches the payload)
            await ws.send("after the ping")
            assert await ws.recv() == "after the ping"  # the relay goes on

    run(scenario())
    received = backend.frames.received
    assert any("after the ping" in frame for frame in received), received  # it records
    assert not [frame for frame in received if frame.startswith("PING")], received


def test_a_ping_flood_gets_few_pongs_the_latest_answered_and_the_session_lives(
    proxy: Proxy, backend: Backend, certs: Any
) -> None:
    tls = open_raw_ws(proxy, client_tls(certs), "/flood")
    try:
        flood = b"".join(F.encode_frame(F.OP_PING, b"%d" % i, mask=True) for i in range(200))
        started = time.monotonic()
        tls.sendall(flood)
        tls.settimeout(3 * PONG_INTERVAL)
        stream, pongs = b"", list[bytes]()
        deadline = started + TIMEOUT
        while time.monotonic() < deadline and (not pongs or pongs[-1] != b"199"):
            try:
                stream += tls.recv(4096)
            except TimeoutError:
                continue
            while len(stream) >= 2 and len(stream) >= 2 + (stream[1] & 0x7F):
                size = stream[1] & 0x7F
                assert stream[0] == 0x80 | F.OP_PONG, stream[:2]
                pongs.append(stream[2 : 2 + size])
                stream = stream[2 + size :]
        took = time.monotonic() - started
        assert pongs and pongs[-1] == b"199", pongs  # the latest ping is answered
        assert len(pongs) <= 2 + took / PONG_INTERVAL, (len(pongs), took)  # not 200 pongs
        tls.sendall(F.encode_frame(F.OP_TEXT, b"still here", mask=True))
        tls.settimeout(TIMEOUT)
        echo = tls.recv(4096)
        assert echo[0] == 0x80 | F.OP_TEXT and echo[2:] == b"still here", echo
    finally:
        tls.close()
    assert not [frame for frame in backend.frames.received if frame.startswith("PING")]
