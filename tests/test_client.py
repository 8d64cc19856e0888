"""cxrd.client against a real cxrd on a real private bus (activation where the case needs it)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import pytest
from dbus_helpers import connect, ok, run
from fixtures_dbus import BusDaemon
from support import TIMEOUT

from cxrd.client import (
    AsyncCloudXRClient,
    CloudXRClient,
    StateEvent,
    error_from_reply,
)
from cxrd.core.states import State
from cxrd.errors import (
    ALL_ERRORS,
    AccessDenied,
    NoSuchLease,
    NotRunning,
    ProfileMismatch,
    StartFailed,
    Timeout,
)


def test_every_named_error_comes_back_as_its_class() -> None:
    for cls in ALL_ERRORS:
        err = error_from_reply(cls.dbus_name(), "words")
        assert type(err) is cls and str(err) == "words"
    for name in (
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
    ):
        assert isinstance(error_from_reply(name, "gone"), NotRunning)
    assert isinstance(
        error_from_reply("org.freedesktop.DBus.Error.AccessDenied", "no"), AccessDenied
    )
    assert isinstance(
        error_from_reply("org.freedesktop.DBus.Error.Spawn.ChildExited", "x"), StartFailed
    )
    assert isinstance(error_from_reply("org.freedesktop.DBus.Error.NoReply", "x"), Timeout)


def test_status_never_starts_the_daemon(bus_daemon: BusDaemon) -> None:
    bus_daemon.enable_activation()
    with CloudXRClient(bus_daemon.address) as client:
        with pytest.raises(NotRunning):
            client.status()
        assert not client.is_running()
    assert bus_daemon.daemon_pids() == []


def test_start_activates_the_daemon_and_returns_when_ready(bus_daemon: BusDaemon) -> None:
    bus_daemon.enable_activation()
    with CloudXRClient(bus_daemon.address) as client:
        snap = client.start(timeout=TIMEOUT)
        assert snap.state is State.READY
        assert snap.runtime.pid > 0 and snap.proxy.port == bus_daemon.denv.proxy_port
        assert snap.environment["NV_DEVICE_PROFILE"] == "Quest3"
        assert client.environment() == dict(snap.environment)
        with pytest.raises(ProfileMismatch) as caught:
            client.start(device_profile="AppleVisionPro")
        assert "AppleVisionPro" in str(caught.value) and caught.value.hint
    assert len(bus_daemon.daemon_pids()) == 1


def test_lease_applies_the_environment_and_releases_on_exit(ready_daemon: BusDaemon) -> None:
    saved = {k: os.environ.get(k) for k in ("XR_RUNTIME_JSON", "NV_CXR_RUNTIME_DIR")}
    os.environ["XR_RUNTIME_JSON"] = "/before/openxr.json"
    try:
        with CloudXRClient(ready_daemon.address) as client:
            with client.lease("teleop", timeout=TIMEOUT) as lease:
                assert os.environ["XR_RUNTIME_JSON"] == lease.environment["XR_RUNTIME_JSON"]
                assert os.environ["NV_CXR_RUNTIME_DIR"] == str(ready_daemon.denv.run_dir)
                held = client.status().leases
                assert [(x.id, x.holder, x.pid, x.reason) for x in held] == [
                    (lease.id, client.unique_name, os.getpid(), "teleop")
                ]
            assert client.status().leases == ()
            assert os.environ["XR_RUNTIME_JSON"] == "/before/openxr.json"
            assert "NV_CXR_RUNTIME_DIR" not in os.environ or saved["NV_CXR_RUNTIME_DIR"]
            with pytest.raises(NoSuchLease):
                client.release(lease.id)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_blocking_client_works_inside_a_running_event_loop(ready_daemon: BusDaemon) -> None:
    async def kit_like_app() -> tuple[State, str]:
        # Isaac Sim/Kit calls plain functions from inside its running loop.
        assert asyncio.get_running_loop().is_running()
        with CloudXRClient(ready_daemon.address) as client:
            snap = client.status()
            lease_id = client.acquire("from a running loop")
            client.release(lease_id)
            return snap.state, lease_id

    state, lease_id = asyncio.run(kit_like_app())
    assert state is State.READY and lease_id


def test_one_blocking_client_serves_many_threads(ready_daemon: BusDaemon) -> None:
    results: list[State] = []
    errors: list[BaseException] = []
    with CloudXRClient(ready_daemon.address) as client:

        def worker() -> None:
            try:
                for _ in range(20):
                    results.append(client.status().state)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=TIMEOUT)
    assert not errors and results == [State.READY] * 160


def test_wait_ready_follows_a_start_it_did_not_make(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(startup_delay=1.0)
    bus_daemon.enable_activation()
    with CloudXRClient(bus_daemon.address) as client:
        client.start_no_block()
        snap = client.wait_ready(TIMEOUT)
        assert snap.state is State.READY


def test_wait_ready_reports_a_failed_start(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(startup_delay=0.5, exit_before_ready=5)
    bus_daemon.spawn()
    with (
        CloudXRClient(bus_daemon.address) as client,
        pytest.raises((StartFailed, NotRunning)) as caught,
    ):
        client.wait_ready(TIMEOUT)
    assert "5" in str(caught.value)


def test_wait_ready_times_out_when_nothing_starts(bus_daemon: BusDaemon) -> None:
    with CloudXRClient(bus_daemon.address) as client, pytest.raises(Timeout):
        client.wait_ready(0.5)


def test_start_while_stopping_waits_and_gets_a_fresh_daemon(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(ignore_sigterm=True, stop_timeout=1.0)
    bus_daemon.enable_activation()

    async def scenario() -> None:
        async with AsyncCloudXRClient(bus_daemon.address) as client:
            first = await client.start(timeout=TIMEOUT)
            old_daemons = bus_daemon.daemon_pids()
            other = await connect(bus_daemon.address)
            async with client.watch() as events:
                await ok(other, "Stop")
                async for event in events:
                    if isinstance(event, StateEvent) and event.new is State.STOPPING:
                        break
                second = await client.start(timeout=TIMEOUT)
            assert second.state is State.READY
            assert second.runtime.pid != first.runtime.pid
            assert set(bus_daemon.daemon_pids()).isdisjoint(old_daemons)

    run(scenario())


class _BlockFailed(Exception):
    """What the code inside a lease raised."""


@pytest.mark.parametrize("face", ["async", "blocking"])
def test_a_lease_taken_during_a_stop_is_held_by_the_fresh_daemon_and_ends_with_the_block(
    bus_daemon: BusDaemon, face: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Asked of a daemon that is stopping: the lease is taken again on the fresh
    # daemon that serves the block, and the block's own error is what the caller sees.
    bus_daemon.configure(ignore_sigterm=True, stop_timeout=1.0)
    bus_daemon.enable_activation()
    held: list[tuple[str, tuple[str, ...]]] = []

    def blocking_lease() -> None:
        with CloudXRClient(bus_daemon.address) as client, client.lease(timeout=TIMEOUT) as lease:
            held.append((lease.id, tuple(x.id for x in client.status().leases)))
            raise _BlockFailed

    async def scenario() -> None:
        async with AsyncCloudXRClient(bus_daemon.address) as client:
            await client.start(timeout=TIMEOUT)
            other = await connect(bus_daemon.address)
            async with client.watch() as events:
                await ok(other, "Stop")
                async for event in events:
                    if isinstance(event, StateEvent) and event.new is State.STOPPING:
                        break
            if face == "async":
                async with client.lease(timeout=TIMEOUT) as lease:
                    held.append((lease.id, tuple(x.id for x in (await client.status()).leases)))
                    raise _BlockFailed
            else:
                await asyncio.to_thread(blocking_lease)

    with (
        caplog.at_level(logging.WARNING, logger="cxrd.dbus.client"),
        pytest.raises(_BlockFailed),
    ):
        run(scenario())
    ((lease_id, leases),) = held
    assert leases == (lease_id,), "the daemon serving the block holds the lease"
    assert caplog.records == [], "the lease ended without a word"
    with CloudXRClient(bus_daemon.address) as client:
        assert client.status().leases == ()


def test_async_client_watch_sees_restart_states(ready_daemon: BusDaemon) -> None:
    async def scenario() -> list[State]:
        async with AsyncCloudXRClient(ready_daemon.address) as client:
            seen: list[State] = []
            async with client.watch() as events:
                restart = asyncio.ensure_future(client.restart(timeout=TIMEOUT))
                async for event in events:
                    if isinstance(event, StateEvent):
                        seen.append(event.new)
                        if event.new is State.READY:
                            break
                await restart
            return seen

    seen = run(scenario())
    assert seen[-1] is State.READY and len(seen) >= 2


def test_stop_waits_until_the_daemon_left_the_bus(ready_daemon: BusDaemon) -> None:
    async def scenario() -> None:
        async with AsyncCloudXRClient(ready_daemon.address) as client:
            assert await client.stop(timeout=TIMEOUT)
            assert not await client.is_running()
            assert not await client.stop(timeout=TIMEOUT)  # already stopped: False, no error

    run(scenario())
    assert ready_daemon.proc.wait(timeout=TIMEOUT) == 0


def test_no_session_bus_is_not_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(NotRunning):
        CloudXRClient()
