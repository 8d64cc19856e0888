"""The real host port: the proxy's slow preparation runs off the loop and leaks nothing."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from pathlib import Path

from support import TIMEOUT, free_port, wait_until

from cxrd.config import Config, ProxyConfig
from cxrd.system.host import SystemHost


def config(tmp_path: Path, port: int) -> Config:
    return Config(install_dir=str(tmp_path), proxy=ProxyConfig(host="127.0.0.1", port=port))


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_key_generation_leaves_the_event_loop_free(tmp_path: Path) -> None:
    port = free_port()

    async def scenario() -> float:
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        began = time.monotonic()
        tick = asyncio.create_task(ticker())
        launch = await SystemHost().prepare_proxy(config(tmp_path, port), keep=None)
        ended = time.monotonic()
        tick.cancel()
        launch.close()
        # From the call to its return: a key made before the ticker ran twice still counts.
        return max(b - a for a, b in itertools.pairwise([began, *ticks, ended]))

    longest_gap = asyncio.run(scenario())
    assert (tmp_path / "certs" / "server.key").exists()
    # RSA key generation takes far longer than this; the loop kept ticking through it.
    assert longest_gap < 0.2


def test_a_cancelled_preparation_leaks_no_listener(tmp_path: Path) -> None:
    port = free_port()

    async def scenario() -> None:
        task = asyncio.create_task(SystemHost().prepare_proxy(config(tmp_path, port), keep=None))
        await asyncio.sleep(0.01)  # inside the thread: generating the key
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the preparation finished before it could be cancelled")
        # The thread goes on and binds; what it bound is closed once it ends.
        deadline = time.monotonic() + TIMEOUT
        while not (tmp_path / "certs" / "server.crt").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    wait_until(lambda: bindable(port), f"port {port} to be free again")
