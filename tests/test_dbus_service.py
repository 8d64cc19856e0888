"""io.github.cxrd.Daemon1 on a real private bus, served by a real cxrd (sim runtime)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from dbus_helpers import Signals, call, connect, error, get_all, get_property, ok, run
from fixtures_dbus import BusDaemon
from support import TIMEOUT, free_port

import cxrd
from cxrd.constants import BUS_NAME, INTERFACE, INTERFACE_VERSION, INTROSPECTION_XML
from cxrd.dbus.interface import contract_interface, interface_shape
from cxrd.errors import (
    AlreadyServing,
    Busy,
    InvalidArgs,
    NoSuchLease,
    ProfileMismatch,
    StartFailed,
    Timeout,
)

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO / "dbus" / INTROSPECTION_XML


def test_packaged_xml_is_the_contract_in_dbus_dir() -> None:
    packaged = REPO / "cxrd" / "data" / INTROSPECTION_XML
    assert packaged.read_bytes() == CONTRACT.read_bytes()


def test_live_daemon_introspects_to_exactly_the_contract(ready_daemon: BusDaemon) -> None:
    async def scenario() -> None:
        bus = await connect(ready_daemon.address)
        node = await bus.introspect("io.github.cxrd.Daemon1", "/io/github/cxrd/Daemon1")
        live = [i for i in node.interfaces if i.name == INTERFACE]
        assert len(live) == 1
        contract = contract_interface(CONTRACT.read_text())
        assert interface_shape(live[0], names=True) == interface_shape(contract, names=True)
        # Only standard interfaces besides ours.
        others = {i.name for i in node.interfaces} - {INTERFACE}
        assert all(name.startswith("org.freedesktop.DBus.") for name in others), others

    run(scenario())


def test_status_and_properties_describe_the_ready_runtime(ready_daemon: BusDaemon) -> None:
    async def scenario() -> None:
        bus = await connect(ready_daemon.address)
        (status,) = await ok(bus, "Status")
        values = {k: v.value for k, v in status.items()}
        props = await get_all(bus)

        assert values["state"] == props["State"] == "ready"
        runtime = {k: v.value for k, v in values["runtime"].items()}
        proxy = {k: v.value for k, v in values["proxy"].items()}
        assert runtime["pid"] == props["RuntimePid"] > 0
        os.kill(runtime["pid"], 0)  # a live process, not a number
        assert proxy["pid"] == props["ProxyPid"] > 0
        assert proxy["port"] == ready_daemon.denv.proxy_port
        assert proxy["url"] == props["ProxyUrl"]
        port = proxy["port"]
        client_url = f"https://127.0.0.1:{port}/client/?serverIP=127.0.0.1&port={port}"
        assert props["ProxyUrl"] == client_url == props["HeadsetUrls"][0]
        assert proxy["headset_urls"] == props["HeadsetUrls"] and props["Headsets"] == []
        assert values["device_profile"] == props["DeviceProfile"] == "Quest3"
        assert values["environment"] == props["Environment"]
        assert props["Environment"]["NV_DEVICE_PROFILE"] == "Quest3"
        assert Path(props["EnvFile"]).is_file()
        assert values["env_file"] == props["EnvFile"]
        assert props["Version"] == values["version"] == cxrd.__version__
        assert props["InterfaceVersion"] == values["interface_version"] == INTERFACE_VERSION
        assert props["Restarts"] == runtime["restarts"] == 0
        assert props["LastError"] == values["last_error"] == ""
        assert props["Leases"] == values["leases"] == []
        assert values["backend"] == "sim"
        assert values["install_dir"] == str(ready_daemon.denv.install_dir)
        assert Path(values["logs"]["runtime"]).is_file()
        assert values["uptime"] > 0
        assert abs(runtime["started_at"] - time.time()) < 3 * TIMEOUT
        # Get agrees with GetAll one by one.
        for name, value in props.items():
            assert await get_property(bus, name) == value

    run(scenario())


def test_start_when_ready_returns_at_once_and_profile_conflict_names_both(
    ready_daemon: BusDaemon,
) -> None:
    async def scenario() -> None:
        bus = await connect(ready_daemon.address)
        pid = await get_property(bus, "RuntimePid")
        began = time.monotonic()
        await ok(bus, "Start", "a{sv}", [{}])
        await ok(bus, "Start", "a{sv}", [{"device_profile": Variant("s", "Quest3")}])
        assert time.monotonic() - began < TIMEOUT / 4
        name, text = await error(
            bus, "Start", "a{sv}", [{"device_profile": Variant("s", "AppleVisionPro")}]
        )
        assert name == ProfileMismatch.dbus_name()
        assert "Quest3" in text and "AppleVisionPro" in text
        assert await get_property(bus, "RuntimePid") == pid

    run(scenario())


def test_wrong_option_keys_and_types_are_invalid_args_naming_them(ready_daemon: BusDaemon) -> None:
    async def scenario() -> None:
        bus = await connect(ready_daemon.address)
        options = {
            "timeout": Variant("s", "soon"),
            "colour": Variant("s", "red"),
        }
        for member in ("Start", "Restart"):
            name, text = await error(bus, member, "a{sv}", [options])
            assert name == InvalidArgs.dbus_name()
            assert "colour" in text and "timeout" in text and "'d'" in text
        name, text = await error(bus, "Start", "a{sv}", [{"timeout": Variant("d", -1.0)}])
        assert name == InvalidArgs.dbus_name() and "timeout" in text
        # Nothing was restarted by the refused calls.
        assert await get_property(bus, "State") == "ready"
        assert await get_property(bus, "Restarts") == 0

    run(scenario())


def test_restart_replaces_the_runtime_and_announces_each_state(ready_daemon: BusDaemon) -> None:
    async def scenario() -> None:
        bus = await connect(ready_daemon.address)
        watcher = await connect(ready_daemon.address)
        signals = await Signals.watch(watcher)
        old_pid = await get_property(bus, "RuntimePid")
        await ok(bus, "Restart", "a{sv}", [{"device_profile": Variant("s", "AppleVisionPro")}])
        new_pid = await get_property(bus, "RuntimePid")
        assert new_pid != old_pid and new_pid > 0
        assert await get_property(bus, "DeviceProfile") == "AppleVisionPro"
        assert (await get_property(bus, "Environment"))["NV_DEVICE_PROFILE"] == "AppleVisionPro"
        ready = await signals.state("ready")
        states = [m.body for m in signals.seen if m.member == "StateChanged"]
        assert states[0][1] == "ready", states  # left ready first
        assert all(reason for _, _, reason in states)
        assert ready.body[1] != "ready"
        changed = [m.body[1] for m in signals.seen if m.member == "PropertiesChanged"]
        assert any("RuntimePid" in c and c["RuntimePid"].value == new_pid for c in changed)
        assert any("State" in c for c in changed)

    run(scenario())


def test_stop_replies_then_the_daemon_stops_everything_and_exits_0(ready_daemon: BusDaemon) -> None:
    async def scenario() -> tuple[int, int]:
        bus = await connect(ready_daemon.address)
        signals = await Signals.watch(bus)
        runtime = await get_property(bus, "RuntimePid")
        proxy = await get_property(bus, "ProxyPid")
        await ok(bus, "Stop")
        await signals.state("stopping")
        await signals.owner_gone()
        states = [m.body[0] for m in signals.seen if m.member == "StateChanged"]
        assert states[-1] == "stopped" or "stopped" in states
        return runtime, proxy

    runtime, proxy = run(scenario())
    assert ready_daemon.proc.wait(timeout=TIMEOUT) == 0
    for pid in (runtime, proxy):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_leases_are_listed_announced_and_released(ready_daemon: BusDaemon) -> None:
    async def scenario() -> None:
        bus = await connect(ready_daemon.address)
        watcher = await connect(ready_daemon.address)
        signals = await Signals.watch(watcher)
        (lease_id,) = await ok(bus, "Acquire", "s", ["teleop session"])
        leases = await signals.changed("Leases")
        assert len(leases) == 1
        listed_id, holder, pid, reason, since = leases[0]
        assert listed_id == lease_id
        assert holder == bus.unique_name
        assert pid == os.getpid()
        assert reason == "teleop session"
        assert abs(since - time.time()) < TIMEOUT
        assert await get_property(bus, "Leases") == leases
        await ok(bus, "Release", "s", [lease_id])
        assert await signals.changed("Leases") == []
        name, text = await error(bus, "Release", "s", [lease_id])
        assert name == NoSuchLease.dbus_name() and lease_id in text

    run(scenario())


_HOLDER = """
import asyncio, sys
from dbus_fast import Message
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    reply = await bus.call(Message(destination="io.github.cxrd.Daemon1",
        path="/io/github/cxrd/Daemon1", interface="io.github.cxrd.Daemon1",
        member="Acquire", signature="s", body=["doomed holder"]))
    print(reply.body[0], flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_lease_ends_when_its_holder_is_sigkilled(ready_daemon: BusDaemon) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, ready_daemon.address],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        lease_id = holder.stdout.readline().strip()
        assert lease_id

        async def scenario() -> None:
            bus = await connect(ready_daemon.address)
            signals = await Signals.watch(bus)
            leases = await get_property(bus, "Leases")
            assert [(lease[0], lease[2]) for lease in leases] == [(lease_id, holder.pid)]
            holder.send_signal(signal.SIGKILL)
            assert await signals.changed("Leases") == []
            assert await get_property(bus, "State") == "ready"  # no stop_when_idle here

        run(scenario())
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_second_daemon_on_the_bus_is_refused_naming_the_first(
    ready_daemon: BusDaemon, tmp_path: Path
) -> None:
    first_pid = ready_daemon.proc.pid
    other = tmp_path / "other.toml"
    text = ready_daemon.denv.config_path.read_text()
    text = text.replace(str(ready_daemon.denv.install_dir), str(tmp_path / "other-install"))
    # Ports of its own: its runtime starts before it joins the bus, and only the
    # bus name may be what the two daemons dispute.
    d = ready_daemon.denv
    text = text.replace(f"port = {d.proxy_port}\n", f"port = {free_port()}\n")
    text = text.replace(f"backend_port = {d.backend_port}\n", f"backend_port = {free_port()}\n")
    other.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "cxrd", "--config", str(other)],
        env=ready_daemon.env,
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
    )
    assert result.returncode == AlreadyServing.exit_code, result.stderr
    assert str(first_pid) in result.stderr


def test_stop_while_starting_fails_the_waiting_start(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(startup_delay=3 * TIMEOUT)
    proc = bus_daemon.spawn()

    async def scenario() -> None:
        starter = await connect(bus_daemon.address)
        stopper = await connect(bus_daemon.address)
        signals = await Signals.watch(stopper)
        await _wait_owner(stopper)
        # The starter's uid is known before its Start: nothing holds the call back.
        assert await get_property(starter, "State") == "starting"
        start = _task(call(starter, "Start", "a{sv}", [{}]))
        assert await get_property(starter, "State") == "starting"  # after Start, in order
        await ok(stopper, "Stop")
        reply = await start
        assert reply.error_name == StartFailed.dbus_name(), reply.body
        assert "stop" in reply.body[0]
        await signals.owner_gone()

    run(scenario())
    assert proc.wait(timeout=TIMEOUT) == 0


def test_start_while_stopping_is_busy(bus_daemon: BusDaemon) -> None:
    # A runtime that ignores SIGTERM keeps the daemon in `stopping` for stop_timeout.
    bus_daemon.configure(ignore_sigterm=True, stop_timeout=TIMEOUT / 2)
    bus_daemon.start()

    async def scenario() -> None:
        bus = await connect(bus_daemon.address)
        signals = await Signals.watch(bus)
        await ok(bus, "Stop")
        await signals.state("stopping")
        name, text = await error(bus, "Start", "a{sv}", [{}])
        assert name == Busy.dbus_name() and "stopping" in text
        await signals.owner_gone(timeout=2 * TIMEOUT)

    run(scenario())


def test_start_timeout_is_this_callers_only(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(startup_delay=1.5)
    bus_daemon.spawn()

    async def scenario() -> None:
        bus = await connect(bus_daemon.address)
        await _wait_owner(bus)
        name, _ = await error(bus, "Start", "a{sv}", [{"timeout": Variant("d", 0.2)}])
        assert name == Timeout.dbus_name()
        await ok(bus, "Start", "a{sv}", [{}])  # the start went on
        assert await get_property(bus, "State") == "ready"

    run(scenario())


def test_a_failed_start_answers_every_waiting_caller(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(startup_delay=1.0, exit_before_ready=7)
    proc = bus_daemon.spawn()

    async def scenario() -> None:
        buses = [await connect(bus_daemon.address) for _ in range(5)]
        await _wait_owner(buses[0])
        replies = [_task(call(b, "Start", "a{sv}", [{}])) for b in buses]
        for reply in replies:
            msg = await reply
            assert msg.error_name == StartFailed.dbus_name(), msg.body
            assert "7" in msg.body[0]

    run(scenario())
    assert proc.wait(timeout=TIMEOUT) == StartFailed.exit_code


def test_twenty_concurrent_starts_activate_one_daemon_and_one_runtime(
    bus_daemon: BusDaemon,
) -> None:
    bus_daemon.configure(startup_delay=0.5)
    bus_daemon.enable_activation()

    async def scenario() -> set[int]:
        buses = [await connect(bus_daemon.address) for _ in range(20)]
        replies = [_task(call(b, "Start", "a{sv}", [{}], auto_start=True)) for b in buses]
        for reply in replies:
            msg = await reply
            assert msg.error_name is None, msg.body
        return {await get_property(b, "RuntimePid") for b in buses}

    pids = run(scenario())
    assert len(pids) == 1 and 0 not in pids
    assert len(bus_daemon.daemon_pids()) == 1
    logs = list((bus_daemon.denv.install_dir / "logs").glob("cxr_server.*.log"))
    assert len(logs) == 1, logs


def test_a_flood_from_one_client_does_not_starve_another(ready_daemon: BusDaemon) -> None:
    async def scenario() -> None:
        flooder = await connect(ready_daemon.address)
        other = await connect(ready_daemon.address)
        await ok(flooder, "Status")  # the flooder is known; its calls go straight in
        flood = [
            _task(call(flooder, member, sig, body))
            for _ in range(1000)
            for member, sig, body in (
                ("Status", "", []),
                ("Start", "a{sv}", [{}]),
                ("Acquire", "s", ["flood"]),
            )
        ]
        latencies = []
        while not all(t.done() for t in flood[: len(flood) // 2]):
            began = time.monotonic()
            await ok(other, "Status")
            latencies.append(time.monotonic() - began)
        assert latencies, "the other client never got in while the flood was on"
        assert max(latencies) < TIMEOUT / 2, max(latencies)
        results = [await t for t in flood]
        assert all(r.error_name is None for r in results)
        assert len(await get_property(other, "Leases")) == 1000
        # All of the flooder's leases go with its connection.
        signals = await Signals.watch(other)
        flooder.disconnect()
        deadline = time.monotonic() + TIMEOUT
        while await get_property(other, "Leases") and time.monotonic() < deadline:
            await signals.changed("Leases")
        assert await get_property(other, "Leases") == []

    run(scenario())


def _task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    return asyncio.ensure_future(coro)


async def _wait_owner(bus: MessageBus, timeout: float = TIMEOUT) -> None:
    """Until cxrd has taken its name (it was spawned, not activated)."""
    signals = await Signals.watch(bus)
    reply = await call(
        bus,
        "NameHasOwner",
        "s",
        [BUS_NAME],
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
    )
    if not reply.body[0]:
        await signals.wait_for(
            lambda m: m.member == "NameOwnerChanged" and bool(m.body[2]), timeout
        )


def test_a_crash_is_counted_and_announced_in_restarts_and_last_error(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(crash_after=0.5)
    bus_daemon.start()

    async def scenario() -> None:
        bus = await connect(bus_daemon.address)
        signals = await Signals.watch(bus)
        first = await get_property(bus, "RuntimePid")
        await signals.state("restarting")
        restarts = await signals.changed("Restarts")
        assert restarts >= 1
        await signals.state("ready")
        assert await get_property(bus, "RuntimePid") != first
        assert await get_property(bus, "LastError")

    run(scenario())


def test_stop_when_idle_stops_after_the_last_lease_and_its_grace(bus_daemon: BusDaemon) -> None:
    bus_daemon.configure(top="stop_when_idle = true\nidle_grace = 0.5")
    proc = bus_daemon.start()

    async def scenario() -> None:
        bus = await connect(bus_daemon.address)
        signals = await Signals.watch(bus)
        (lease_id,) = await ok(bus, "Acquire", "s", ["short job"])
        await ok(bus, "Release", "s", [lease_id])
        began = time.monotonic()
        await signals.owner_gone()
        assert time.monotonic() - began >= 0.4

    run(scenario())
    assert proc.wait(timeout=TIMEOUT) == 0
