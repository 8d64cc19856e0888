"""Network text reaches no terminal raw: a User-Agent with C0, C1 and bidi controls.

A real cxrd on a private bus with its proxy; the headset is a websockets client
whose User-Agent carries the 8-bit CSI (a 0x9B byte, and U+009B as UTF-8) and
U+202E (RIGHT-TO-LEFT OVERRIDE, as UTF-8).
"""

from __future__ import annotations

import asyncio
import socket
import unicodedata

from fixtures_dbus import BusDaemon
from support import TIMEOUT
from test_headsets import _next_headset_event, _start_with_client, _tls, cxrctl

from cxrd.client import AsyncCloudXRClient
from cxrd.proxy.http import terminal_safe

RLO_ON_THE_WIRE = "\u202e".encode().decode("latin-1")  # websockets sends headers as Latin-1
# C0 controls (ESC, BEL) never pass websockets' header parser: the request is refused.
HOSTILE_AGENT = f"Quest\x9b31mRED\xc2\x9b2J{RLO_ON_THE_WIRE}gpj.exe OculusBrowser/35.0"
CLEAN_AGENT = "Quest\ufffd31mRED2Jgpj.exe OculusBrowser/35.0"  # a lone 0x9B is not UTF-8


def unsafe(text: str) -> list[str]:
    return [
        f"U+{ord(c):04X}"
        for c in text
        if (unicodedata.category(c) == "Cc" and c != "\n") or c in "\u202e\u2066\u200f"
    ]


def test_terminal_safe_drops_c0_c1_bidi_and_separators() -> None:
    assert terminal_safe("a\x00b\x1b[0m\x7f\x85c\u009b\u2028d\u2067e\u202ef", 100) == "ab[0mcdef"
    assert terminal_safe("\xc2\x9b\xe2\x80\xae" + "caf\xc3\xa9", 100) == "café"  # UTF-8 bytes
    assert terminal_safe("x" * 300, 256) == "x" * 256


def test_a_hostile_user_agent_reaches_status_dbus_and_the_log_without_controls(
    bus_daemon: BusDaemon,
) -> None:
    _start_with_client(bus_daemon, None)
    port = bus_daemon.denv.proxy_port

    # A raw upgrade: websockets' client refuses to send such a header, a hostile one would not.
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    headset = _tls(bus_daemon).wrap_socket(raw, server_hostname="127.0.0.1")
    upgrade = (
        f"GET /sign_in HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: {HOSTILE_AGENT}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )

    async def scenario() -> None:
        async with AsyncCloudXRClient(bus_daemon.address) as client, client.watch() as events:
            headset.sendall(upgrade.encode("latin-1"))
            assert headset.recv(4096).startswith(b"HTTP/1.1 101 ")
            joined = await _next_headset_event(events)
            assert joined.user_agent == CLEAN_AGENT  # the D-Bus signal
            (listed,) = await client.headsets()  # the D-Bus property
            assert listed.user_agent == CLEAN_AGENT
            shown = await asyncio.to_thread(cxrctl, bus_daemon, "status")
            assert "Quest browser" in shown.stdout
            assert not unsafe(shown.stdout), unsafe(shown.stdout)
            waited = await asyncio.to_thread(cxrctl, bus_daemon, "wait", "--headset")
            assert waited.returncode == 0 and not unsafe(waited.stdout)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 6 * TIMEOUT))
    finally:
        headset.close()
    log = bus_daemon.denv.daemon_log()
    assert CLEAN_AGENT in log and not unsafe(log), unsafe(log)
