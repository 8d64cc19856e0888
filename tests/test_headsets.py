"""Headset sessions, end to end: through cxrd's proxy to the sim's signaling, seen on D-Bus.

A real cxrd on a private bus; a websockets client and a real headless
Chromium (Debian's ``chromium``) as the headsets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_dbus import BusDaemon
from support import TIMEOUT
from websockets.asyncio.client import ClientConnection, connect

from cxrd.client import AsyncCloudXRClient, HeadsetEvent
from cxrd.errors import Timeout

# The test's own web client: it opens the signaling WebSocket through the
# proxy that served it, sends a line, and shows what comes back.
TEST_INDEX = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>cxrd test client</title></head>
<body><h1>cxrd test client</h1><p id=status>connecting</p><script src="app.js"></script>
</body></html>
"""
TEST_APP = """const q = new URLSearchParams(location.search);
const out = document.getElementById("status");
const ws = new WebSocket(`wss://${q.get("serverIP")}:${q.get("port")}/sign_in?peer=browser`);
ws.onopen = () => { out.textContent = "open"; ws.send("hello through the proxy"); };
ws.onmessage = (e) => { if (!String(e.data).startsWith("{")) out.textContent = "echo: " + e.data; };
ws.onclose = (e) => { out.textContent += " (closed " + e.code + ")"; };
"""


def _start_with_client(daemon: BusDaemon, client_dir: Path | None) -> None:
    daemon.configure()
    if client_dir is not None:
        config = daemon.denv.config_path
        text = config.read_text()
        proxy_line = f"port = {daemon.denv.proxy_port}\n"
        config.write_text(text.replace(proxy_line, f'{proxy_line}client_dir = "{client_dir}"\n'))
    daemon.start()


def _tls(daemon: BusDaemon) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(daemon.denv.install_dir / "certs/server.crt"))


async def _next_headset_event(events: AsyncIterator[Any]) -> HeadsetEvent:
    async for event in events:
        if isinstance(event, HeadsetEvent):
            return event
    raise AssertionError("the event stream ended")


def cxrctl(daemon: BusDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrd.cli", *args],
        env={**daemon.env, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=4 * TIMEOUT,
    )


def test_a_websocket_session_is_a_headset_on_the_bus_until_it_closes(
    bus_daemon: BusDaemon,
) -> None:
    _start_with_client(bus_daemon, None)
    port = bus_daemon.denv.proxy_port
    agent = "Mozilla/5.0 (X11; Linux x86_64; Quest 3) OculusBrowser/35.0 Chrome/126.0"

    async def scenario() -> None:
        async with AsyncCloudXRClient(bus_daemon.address) as client, client.watch() as events:
            assert await client.headsets() == ()
            with pytest.raises(Timeout):
                await client.wait_for_headset(0.3)
            ws: ClientConnection
            async with connect(
                f"wss://127.0.0.1:{port}/sign_in?token=secret",
                ssl=_tls(bus_daemon),
                user_agent_header=agent,
            ) as ws:
                hello = json.loads(await ws.recv())
                assert hello["server"] == "cxrd-sim"
                joined = await _next_headset_event(events)
                assert joined.connected and joined.address == "127.0.0.1"
                assert joined.user_agent == agent
                (listed,) = await client.headsets()
                assert (listed.id, listed.path) == (joined.id, "/sign_in")  # no query
                assert (await client.wait_for_headset(TIMEOUT)).id == joined.id
                shown = await asyncio.to_thread(cxrctl, bus_daemon, "status")
                assert re.search(r"Headsets: 1 — 127\.0\.0\.1 Quest browser, \d+s", shown.stdout)
                health = await asyncio.to_thread(_health, bus_daemon)
                assert health["headsets"] == 1
                waited = await asyncio.to_thread(cxrctl, bus_daemon, "wait", "--headset")
                assert waited.returncode == 0 and "Quest browser" in waited.stdout
                await ws.close(1000, "done")
            left = await _next_headset_event(events)
            assert (left.connected, left.id, left.close_code) == (False, joined.id, 1000)
            assert 0 < left.seconds < 4 * TIMEOUT
            assert await client.headsets() == ()

    asyncio.run(asyncio.wait_for(scenario(), 6 * TIMEOUT))
    none = cxrctl(bus_daemon, "wait", "--headset", "--timeout", "0.5")
    assert none.returncode == 3 and "no headset connected within 0.5 s" in none.stderr


def test_a_proxy_crash_disconnects_its_headsets(bus_daemon: BusDaemon) -> None:
    _start_with_client(bus_daemon, None)
    port = bus_daemon.denv.proxy_port

    async def scenario() -> None:
        async with (
            AsyncCloudXRClient(bus_daemon.address) as client,
            client.watch() as events,
            connect(f"wss://127.0.0.1:{port}/", ssl=_tls(bus_daemon)) as ws,
        ):
            await ws.recv()
            joined = await _next_headset_event(events)
            proxy_pid = (await client.status()).proxy.pid
            os.kill(proxy_pid, signal.SIGKILL)
            left = await _next_headset_event(events)
            assert (left.connected, left.id, left.close_code) == (False, joined.id, 1006)
            assert await client.headsets() == ()

    asyncio.run(asyncio.wait_for(scenario(), 6 * TIMEOUT))


def _health(daemon: BusDaemon) -> dict[str, Any]:
    url = f"https://127.0.0.1:{daemon.denv.proxy_port}/healthz"
    with urllib.request.urlopen(url, context=_tls(daemon), timeout=TIMEOUT) as reply:
        data: dict[str, Any] = json.load(reply)
        return data


# A real browser -----------------------------------------------------------------

CHROMIUM = shutil.which("chromium")


class DevTools:
    """One page of a headless Chromium, driven over its DevTools protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                result: dict[str, Any] = reply["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        return (await self.call("Runtime.evaluate", expression=expression))["result"].get("value")

    async def open_and_wait(self, url: str, text: str) -> str:
        await self.call("Page.navigate", url=url)
        dom = ""
        async with asyncio.timeout(TIMEOUT):
            while text not in dom:
                await asyncio.sleep(0.05)  # the page is Chromium's: polled, bounded
                dom = await self.evaluate("document.documentElement.outerHTML") or ""
        return dom

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


def _chromium_argv(profile: Path, *args: str) -> list[str]:
    assert CHROMIUM is not None
    return [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--ignore-certificate-errors", f"--user-data-dir={profile}", "--window-size=800,500",
        *args,
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def headless_chromium(
    profile: Path,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A headless Chromium on about:blank: its process and its page's DevTools WebSocket
    URL (for :class:`DevTools`); killed, if still running, and reaped at the end."""
    browser = await asyncio.create_subprocess_exec(
        *_chromium_argv(profile, "--remote-debugging-port=0", "about:blank"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert browser.stderr is not None
        devtools = ""
        while not devtools:
            line = (await browser.stderr.readline()).decode()
            assert line, "chromium exited before it listened for DevTools"
            if found := re.search(r"DevTools listening on (ws://\S+)", line):
                devtools = found.group(1)
        http_base = devtools.split("/devtools/")[0].replace("ws://", "http://")
        pages = await asyncio.to_thread(_json, f"{http_base}/json/list")
        yield browser, next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"]
    finally:
        if browser.returncode is None:
            browser.kill()
        assert browser.stderr is not None
        async with asyncio.timeout(TIMEOUT):
            await browser.stderr.read()  # to its end, so the pipe is closed with the loop
            await browser.wait()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (setup.sh)")
def test_headless_chromium_accepts_the_certificate_opens_the_client_and_is_seen(
    bus_daemon: BusDaemon, tmp_path: Path
) -> None:
    client_dir = tmp_path / "static-client"
    client_dir.mkdir()
    (client_dir / "index.html").write_text(TEST_INDEX)
    (client_dir / "app.js").write_text(TEST_APP)
    _start_with_client(bus_daemon, client_dir)
    port = bus_daemon.denv.proxy_port
    cert_page = f"https://127.0.0.1:{port}/"
    client_page = f"https://127.0.0.1:{port}/client/?serverIP=127.0.0.1&port={port}"

    dumped = subprocess.run(
        _chromium_argv(tmp_path / "dump-profile", "--dump-dom", cert_page),
        capture_output=True,
        text=True,
        timeout=4 * TIMEOUT,
    )
    assert "Certificate accepted" in dumped.stdout, dumped.stderr[-2000:]

    async def scenario() -> None:
        async with (
            headless_chromium(tmp_path / "profile") as (browser, page),
            AsyncCloudXRClient(bus_daemon.address) as client,
            client.watch() as events,
        ):
            async with connect(page, max_size=None) as ws:
                tab = DevTools(ws)
                dom = await tab.open_and_wait(cert_page, "Certificate accepted")
                assert "This browser now trusts the CloudXR proxy" in dom
                await tab.screenshot(tmp_path / "certificate-page.png")
                dom = await tab.open_and_wait(client_page, "echo: hello through the proxy")
                assert "cxrd test client" in dom
                await tab.screenshot(tmp_path / "client-page.png")
                agent = await tab.evaluate("navigator.userAgent")
                joined = await _next_headset_event(events)
                assert joined.connected and joined.user_agent == agent
                assert "HeadlessChrome" in agent and joined.address == "127.0.0.1"
                shown = await asyncio.to_thread(cxrctl, bus_daemon, "status")
                assert "Headsets: 1 — 127.0.0.1 headless Chrome" in shown.stdout
                assert client_page in shown.stdout
            browser.send_signal(signal.SIGTERM)
            left = await _next_headset_event(events)
            assert (left.connected, left.id) == (False, joined.id)
            assert await client.headsets() == ()

    asyncio.run(asyncio.wait_for(scenario(), 8 * TIMEOUT))
    assert (tmp_path / "client-page.png").stat().st_size > 1000
    print(f"screenshots: {tmp_path}/certificate-page.png, {tmp_path}/client-page.png")


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
        return json.load(reply)
