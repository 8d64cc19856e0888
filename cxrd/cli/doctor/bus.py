"""The session bus and D-Bus activation, asked once for the checks that need them."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass, field

from dbus_fast import Message, MessageFlag, MessageType

from cxrd import constants as C
from cxrd.cli.doctor.check import TIMEOUT, Check
from cxrd.core.snapshot import Snapshot
from cxrd.dbus.connection import CONNECT_ERRORS, connect, session_bus_address
from cxrd.dbus.wire import snapshot_from_wire
from cxrd.instances import from_bus_name


@dataclass
class BusFacts:
    """What the session bus says, gathered once for several checks."""

    address: str | None = None
    bus_name: str = C.BUS_NAME
    error: str | None = None
    activatable: bool = False
    daemon_pid: int = 0  # 0: the bus name has no owner
    child_pids: set[int] = field(default_factory=set)  # RuntimePid, ProxyPid
    status: Snapshot | None = None  # the daemon's Status(), when it is on the bus


def probe_bus(bus_name: str = C.BUS_NAME) -> BusFacts:
    """What the session bus says about ``bus_name`` (an instance's)."""
    address = session_bus_address()
    if address is None:
        return BusFacts(error="DBUS_SESSION_BUS_ADDRESS is unset and $XDG_RUNTIME_DIR/bus absent")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(asyncio.run, _ask_bus(address, bus_name))
        try:
            return future.result(timeout=TIMEOUT * 2)
        except concurrent.futures.TimeoutError:
            return BusFacts(address=address, error="the bus did not answer in time")


async def _ask_bus(address: str, bus_name: str) -> BusFacts:
    facts = BusFacts(address=address, bus_name=bus_name)
    try:
        bus = await connect(address, timeout=TIMEOUT)
    except CONNECT_ERRORS as exc:
        facts.error = f"cannot connect to {address}: {exc}"
        return facts

    async def call(
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[object] = (),
    ) -> list[object] | None:
        reply = await bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
                flags=MessageFlag.NO_AUTOSTART,
            )
        )
        if reply is None or reply.message_type == MessageType.ERROR:
            return None
        return list(reply.body)

    dbus = (C.DBUS, C.DBUS_PATH, C.DBUS)
    try:
        async with asyncio.timeout(TIMEOUT):
            names = await call(*dbus, "ListActivatableNames")
            facts.activatable = bool(names) and bus_name in names[0]  # type: ignore[index,operator]
            pid = await call(*dbus, "GetConnectionUnixProcessID", "s", [bus_name])
            facts.daemon_pid = int(pid[0]) if pid else 0  # type: ignore[call-overload]
            if facts.daemon_pid:
                for prop in ("RuntimePid", "ProxyPid"):
                    value = await call(
                        bus_name,
                        C.OBJECT_PATH,
                        C.PROPERTIES,
                        "Get",
                        "ss",
                        [C.INTERFACE, prop],
                    )
                    if value:
                        facts.child_pids.add(int(value[0].value))  # type: ignore[attr-defined]
                status = await call(bus_name, C.OBJECT_PATH, C.INTERFACE, "Status")
                if status:
                    facts.status = snapshot_from_wire(status[0])  # type: ignore[arg-type]
    except TimeoutError:
        facts.error = "the bus did not answer in time"
    finally:
        bus.disconnect()
    facts.child_pids.discard(0)
    return facts


def install_command(bus_name: str) -> str:
    instance = from_bus_name(bus_name)
    return (
        f"cxrctl install --instance {instance.name}"
        if instance and instance.name
        else ("cxrctl install")
    )


def check_session_bus(bus: BusFacts) -> Check:
    fix = (
        "log in through a session with a user bus (apt install dbus-user-session), or "
        "export DBUS_SESSION_BUS_ADDRESS=unix:path=$XDG_RUNTIME_DIR/bus"
    )
    if bus.error is not None:
        return Check("session bus", "fail", bus.error, fix)
    running = f"cxrd is running (pid {bus.daemon_pid})" if bus.daemon_pid else "cxrd not running"
    return Check("session bus", "ok", f"{bus.address}; {running}")


def check_activation(bus: BusFacts) -> Check:
    if bus.error is not None:
        return Check(
            "D-Bus activation", "warn", "no session bus to ask", "see the session bus check"
        )
    if bus.activatable:
        return Check("D-Bus activation", "ok", f"{bus.bus_name} starts on demand")
    return Check(
        "D-Bus activation",
        "warn",
        f"the bus has no activation file for {bus.bus_name}: clients cannot start cxrd on demand",
        install_command(bus.bus_name),
    )
