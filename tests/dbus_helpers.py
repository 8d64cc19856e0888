"""Raw D-Bus calls for the tests: dbus-fast messages, no cxrd client in between."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from support import TIMEOUT

from cxrd.constants import BUS_NAME, INTERFACE, OBJECT_PATH
from cxrd.dbus.connection import tolerate_full_socket

T = TypeVar("T")
PROPS = "org.freedesktop.DBus.Properties"


_OPEN: list[MessageBus] = []


def run(coro: Awaitable[T], timeout: float = 3 * TIMEOUT) -> T:
    """Run one test coroutine on a fresh loop, bounded; close the buses it opened."""

    async def bounded() -> T:
        try:
            async with asyncio.timeout(timeout):
                return await coro
        finally:
            while _OPEN:
                bus = _OPEN.pop()
                if bus.connected:
                    bus.disconnect()
                    async with asyncio.timeout(TIMEOUT):
                        await bus.wait_for_disconnect()

    return asyncio.run(bounded())


async def connect(address: str) -> MessageBus:
    """A bus connection that ``run`` closes at the end."""
    bus = await MessageBus(bus_address=address).connect()
    tolerate_full_socket(bus)
    _OPEN.append(bus)
    return bus


def call_message(
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    *,
    interface: str = INTERFACE,
    auto_start: bool = False,
    path: str = OBJECT_PATH,
    destination: str = BUS_NAME,
) -> Message:
    return Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=list(body),
        flags=MessageFlag.NONE if auto_start else MessageFlag.NO_AUTOSTART,
    )


async def call(
    bus: MessageBus, member: str, signature: str = "", body: Sequence[Any] = (), **kw: Any
) -> Message:
    """Send one call; return the reply (a method return or an error)."""
    reply = await bus.call(call_message(member, signature, body, **kw))
    assert reply is not None
    return reply


async def ok(
    bus: MessageBus, member: str, signature: str = "", body: Sequence[Any] = (), **kw: Any
) -> list[Any]:
    reply = await call(bus, member, signature, body, **kw)
    assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return list(reply.body)


async def error(
    bus: MessageBus, member: str, signature: str = "", body: Sequence[Any] = (), **kw: Any
) -> tuple[str, str]:
    reply = await call(bus, member, signature, body, **kw)
    assert reply.message_type is MessageType.ERROR, f"{member} succeeded: {reply.body}"
    return str(reply.error_name), str(reply.body[0]) if reply.body else ""


async def get_property(bus: MessageBus, name: str) -> Any:
    (value,) = await ok(bus, "Get", "ss", [INTERFACE, name], interface=PROPS)
    assert isinstance(value, Variant)
    return value.value


async def get_all(bus: MessageBus) -> dict[str, Any]:
    (values,) = await ok(bus, "GetAll", "s", [INTERFACE], interface=PROPS)
    return {k: v.value for k, v in values.items()}


class Signals:
    """Every signal from cxrd's object (and the name's owner changes) into a queue."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.seen: list[Message] = []
        bus.add_message_handler(self._on)

    @classmethod
    async def watch(cls, bus: MessageBus) -> Signals:
        for rule in (
            f"type='signal',path='{OBJECT_PATH}'",
            "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
            f"arg0='{BUS_NAME}'",
        ):
            await ok(
                bus,
                "AddMatch",
                "s",
                [rule],
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
            )
        return cls(bus)

    def _on(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL:
            self.queue.put_nowait(msg)

    async def wait_for(
        self, predicate: Callable[[Message], bool], timeout: float = TIMEOUT
    ) -> Message:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.queue.get()
                self.seen.append(msg)
                if predicate(msg):
                    return msg

    async def state(self, new: str, timeout: float = TIMEOUT) -> Message:
        return await self.wait_for(
            lambda m: m.member == "StateChanged" and m.body[0] == new, timeout
        )

    async def changed(self, prop: str, timeout: float = TIMEOUT) -> Any:
        msg = await self.wait_for(
            lambda m: m.member == "PropertiesChanged" and prop in m.body[1], timeout
        )
        return msg.body[1][prop].value

    async def owner_gone(self, timeout: float = TIMEOUT) -> None:
        await self.wait_for(
            lambda m: m.member == "NameOwnerChanged" and m.body[0] == BUS_NAME and not m.body[2],
            timeout,
        )
