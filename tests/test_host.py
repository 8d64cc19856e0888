"""The real host port: the proxy's slow preparation runs off the loop and leaks nothing."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest
from support import TIMEOUT, free_port, wait_until

from cxrd.config import Config, ProxyConfig
from cxrd.host import SystemHost
from cxrd.proxy import certs


def config(tmp_path: Path, port: int) -> Config:
    return Config(install_dir=str(tmp_path), proxy=ProxyConfig(host="127.0.0.1", port=port))


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_key_generation_leaves_the_event_loop_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop runs while the key is made, however fast the machine makes it.

    The real generation, followed by a wait (in the generating thread) for a
    tick of the loop: made on the loop's thread, no tick could come.
    """
    port = free_port()
    ticked = threading.Event()
    made: dict[str, object] = {}
    real = certs.generate_pair

    def generate_pair(cert: Path, key: Path, **kwargs: int) -> None:
        ticked.clear()
        real(cert, key, **kwargs)
        made["ticked while making it"] = ticked.wait(timeout=TIMEOUT)
        made["thread"] = threading.current_thread()

    monkeypatch.setattr(certs, "generate_pair", generate_pair)

    async def scenario() -> threading.Thread:
        async def ticker() -> None:
            while True:
                ticked.set()
                await asyncio.sleep(0.005)

        tick = asyncio.create_task(ticker())
        try:
            launch = await SystemHost().prepare_proxy(config(tmp_path, port), keep=None)
        finally:
            tick.cancel()
        launch.close()
        return threading.current_thread()

    loop_thread = asyncio.run(scenario())
    assert (tmp_path / "certs" / "server.key").exists()
    assert made["thread"] is not loop_thread, "the key was made on the event loop's thread"
    assert made["ticked while making it"] is True, "the loop did not run while the key was made"


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
