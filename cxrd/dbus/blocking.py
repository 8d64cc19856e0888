"""The blocking client: :class:`~cxrd.dbus.client.AsyncCloudXRClient` on a loop of its own.

:class:`CloudXRClient` is safe from any thread, including one whose asyncio
loop is running (Isaac Sim/Kit): it runs its own loop in a helper thread and
waits on that, never on the caller's loop. Public as :mod:`cxrd.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

from cxrd.core.snapshot import Headset, Snapshot
from cxrd.dbus.client import (
    CALL_TIMEOUT,
    START_TIMEOUT,
    AsyncCloudXRClient,
)
from cxrd.dbus.leasing import Held, LeaseInfo, environment_applied, release_failure_logged
from cxrd.errors import Timeout

_BLOCKING_LIMIT = 2 * START_TIMEOUT
_T = TypeVar("_T")


class _LoopThread:
    """A private event loop in a daemon thread; callers block on its futures."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="cxrd-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Awaitable[_T]) -> _T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("CloudXRClient cannot be called from its own helper thread")

        async def wrapped() -> _T:
            return await coro

        future = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        try:
            # Every coroutine here bounds itself; this bound only guards a dead loop.
            return future.result(timeout=_BLOCKING_LIMIT)
        except TimeoutError:
            future.cancel()
            raise Timeout("cxrd client: no result (is the interpreter shutting down?)") from None

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=CALL_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()


class CloudXRClient:
    """Blocking client; every method mirrors :class:`AsyncCloudXRClient`.

    Works from any thread, including one running an asyncio loop: calls run
    on a private loop in a helper thread. Close it (or use ``with``) to end
    the connection, which also ends any lease it holds.
    """

    def __init__(self, bus_address: str | None = None, *, instance: str | None = None) -> None:
        """``instance``: a named one; None reads ``$CXRD_INSTANCE`` (unset: the unnamed one)."""
        self._thread = _LoopThread()
        self._client = AsyncCloudXRClient(bus_address, instance=instance)
        try:
            self._thread.run(self._client.open())
        except BaseException:
            self._thread.close()
            raise

    def close(self) -> None:
        if not self._thread.loop.is_closed():
            with contextlib.suppress(Exception):
                self._thread.run(self._client.close())
            self._thread.close()

    def __enter__(self) -> CloudXRClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def unique_name(self) -> str:
        return self._client.unique_name

    def status(self) -> Snapshot:
        return self._thread.run(self._client.status())

    def is_running(self) -> bool:
        return self._thread.run(self._client.is_running())

    def get_property(self, name: str) -> Any:
        return self._thread.run(self._client.get_property(name))

    def start(
        self,
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
    ) -> Snapshot:
        return self._thread.run(
            self._client.start(timeout=timeout, device_profile=device_profile, env=env, gpu=gpu)
        )

    def start_no_block(self, *, device_profile: str | None = None) -> None:
        async def send() -> None:
            self._client.start_no_block(device_profile=device_profile)

        self._thread.run(send())

    def restart(
        self,
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
    ) -> Snapshot:
        return self._thread.run(
            self._client.restart(timeout=timeout, device_profile=device_profile, env=env, gpu=gpu)
        )

    def stop(self, *, timeout: float = CALL_TIMEOUT) -> bool:
        return self._thread.run(self._client.stop(timeout=timeout))

    def wait_ready(self, timeout: float | None = None) -> Snapshot:
        return self._thread.run(self._client.wait_ready(timeout))

    def wait_gone(self, timeout: float) -> None:
        self._thread.run(self._client.wait_gone(timeout))

    def headsets(self) -> tuple[Headset, ...]:
        return self._thread.run(self._client.headsets())

    def wait_for_headset(self, timeout: float | None = None) -> Headset:
        return self._thread.run(self._client.wait_for_headset(timeout))

    def environment(self) -> dict[str, str]:
        return self._thread.run(self._client.environment())

    def acquire(self, reason: str = "") -> str:
        return self._thread.run(self._client.acquire(reason))

    def release(self, lease_id: str) -> None:
        self._thread.run(self._client.release(lease_id))

    def hold(
        self,
        reason: str = "",
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
    ) -> Held:
        """A lease on a ready runtime, held by the daemon that serves it (the asyncio ``hold``)."""
        return self._thread.run(
            self._client.hold(
                reason, timeout=timeout, device_profile=device_profile, env=env, gpu=gpu
            )
        )

    def let_go(self, held: Held) -> None:
        self._thread.run(self._client.let_go(held))

    @contextlib.contextmanager
    def lease(
        self,
        reason: str = "",
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
        apply_environment: bool = True,
    ) -> Iterator[LeaseInfo]:
        """Hold a ready runtime for the block (see the asyncio client's ``hold``), with
        its environment in ``os.environ``; undo on exit."""
        held = self.hold(reason, timeout=timeout, device_profile=device_profile, env=env, gpu=gpu)
        assert held.snapshot is not None
        try:
            with environment_applied(held.snapshot.environment if apply_environment else {}):
                yield LeaseInfo(id=held.id, snapshot=held.snapshot)
        except BaseException:
            with release_failure_logged(held.id):
                self.let_go(held)
            raise
        self.let_go(held)


def call_blocking(
    fn: Callable[[AsyncCloudXRClient], Awaitable[_T]], bus_address: str | None = None
) -> _T:
    """Run one coroutine against a short-lived client; for scripts and the CLI."""

    async def once() -> _T:
        async with AsyncCloudXRClient(bus_address) as client:
            return await fn(client)

    thread = _LoopThread()
    try:
        return thread.run(once())
    finally:
        thread.close()
