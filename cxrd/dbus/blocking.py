"""The blocking client: :class:`~cxrd.dbus.client.AsyncCloudXRClient` on a loop of its own.

:class:`CloudXRClient` is safe from any thread, including one whose asyncio
loop is running (Isaac Sim/Kit): it runs its own loop in a helper thread and
waits on that, never on the caller's loop. Public as :mod:`cxrd.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
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

_log = logging.getLogger("cxrd.dbus.client")
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

    Fork-safe: in the child of ``fork()`` the connection and the helper
    thread are the parent's (the thread does not even exist there). The child
    lets go of them without a word on the connection, and the first call
    there connects afresh. Leases taken before the fork stay the parent's:
    the child's ``let_go`` leaves them alone.
    """

    def __init__(self, bus_address: str | None = None, *, instance: str | None = None) -> None:
        """``instance``: a named one; None reads ``$CXRD_INSTANCE`` (unset: the unnamed one)."""
        self._address = bus_address
        self._instance = instance
        self._closed = False
        self._taken: set[str] = set()  # leases held through this process's connection
        self._parents: set[str] = set()  # leases of the process this one was forked from
        self._client = AsyncCloudXRClient(bus_address, instance=instance)
        self._thread: _LoopThread | None = None
        self._connect()
        _clients.add(self)

    def _connect(self) -> _LoopThread:
        thread = _LoopThread()
        try:
            thread.run(self._client.open())
        except BaseException:
            thread.close()
            raise
        self._thread = thread
        return thread

    def _run(self, call: Callable[[AsyncCloudXRClient], Awaitable[_T]]) -> _T:
        if self._closed:
            raise RuntimeError("the CloudXRClient is closed")
        thread = self._thread
        if thread is None:  # forked since the last call
            self._client = AsyncCloudXRClient(self._address, instance=self._instance)
            thread = self._connect()
        return thread.run(call(self._client))

    def _forked(self) -> None:
        """In the child of a fork: drop the parent's connection and loop, touching neither."""
        self._client.abandon()
        if self._thread is not None:
            # Its loop shares the parent's epoll instance: closing it here would
            # unregister the parent's descriptors. Kept, never run or closed.
            _abandoned.append(self._thread)
            self._thread = None
        self._parents |= self._taken
        self._taken = set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _clients.discard(self)
        if self._thread is not None:
            with contextlib.suppress(Exception):
                self._thread.run(self._client.close())
            self._thread.close()

    def __enter__(self) -> CloudXRClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def unique_name(self) -> str:
        return self._run(_unique_name)

    def status(self) -> Snapshot:
        return self._run(lambda c: c.status())

    def is_running(self) -> bool:
        return self._run(lambda c: c.is_running())

    def get_property(self, name: str) -> Any:
        return self._run(lambda c: c.get_property(name))

    def start(
        self,
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
    ) -> Snapshot:
        return self._run(
            lambda c: c.start(timeout=timeout, device_profile=device_profile, env=env, gpu=gpu)
        )

    def start_no_block(self, *, device_profile: str | None = None) -> None:
        async def send(client: AsyncCloudXRClient) -> None:
            client.start_no_block(device_profile=device_profile)

        self._run(send)

    def restart(
        self,
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
    ) -> Snapshot:
        return self._run(
            lambda c: c.restart(timeout=timeout, device_profile=device_profile, env=env, gpu=gpu)
        )

    def stop(self, *, timeout: float = CALL_TIMEOUT) -> bool:
        return self._run(lambda c: c.stop(timeout=timeout))

    def wait_ready(self, timeout: float | None = None) -> Snapshot:
        return self._run(lambda c: c.wait_ready(timeout))

    def wait_gone(self, timeout: float) -> None:
        self._run(lambda c: c.wait_gone(timeout))

    def headsets(self) -> tuple[Headset, ...]:
        return self._run(lambda c: c.headsets())

    def wait_for_headset(self, timeout: float | None = None) -> Headset:
        return self._run(lambda c: c.wait_for_headset(timeout))

    def environment(self) -> dict[str, str]:
        return self._run(lambda c: c.environment())

    def acquire(self, reason: str = "") -> str:
        lease_id = self._run(lambda c: c.acquire(reason))
        self._taken.add(lease_id)
        return lease_id

    def release(self, lease_id: str) -> None:
        if self._parents_own(lease_id):
            return
        self._run(lambda c: c.release(lease_id))
        self._taken.discard(lease_id)

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
        held = self._run(
            lambda c: c.hold(
                reason, timeout=timeout, device_profile=device_profile, env=env, gpu=gpu
            )
        )
        self._taken.add(held.id)
        return held

    def let_go(self, held: Held) -> None:
        if self._parents_own(held.id):
            return
        self._run(lambda c: c.let_go(held))
        self._taken.discard(held.id)

    def _parents_own(self, lease_id: str) -> bool:
        if lease_id not in self._parents:
            return False
        _log.info("lease %s was taken before fork(): left to the parent process", lease_id)
        return True

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


async def _unique_name(client: AsyncCloudXRClient) -> str:
    return client.unique_name


# Every open client, so that the child of a fork can let go of the parent's connections.
_clients: weakref.WeakSet[CloudXRClient] = weakref.WeakSet()
_abandoned: list[_LoopThread] = []


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
