"""The daemon on the session bus: the name, the uid gate, the lease watcher (DESIGN §5).

The exported object and its contract are in :mod:`cxrd.dbus.interface`; this
module owns the connection it is served on: the bus name, the caller's bus
identity as an access check and a lease holder, and the holders that leave.

One gate for every call: a message handler, which dbus-fast runs for each
message before it dispatches it, checks the caller's uid. A connection's uid
is asked of the bus once; its calls wait for that answer in order, then are
dispatched as if they had just arrived. So the members themselves stay plain:
``Status`` and the properties answer synchronously (no task per call), and
only what waits on the supervisor is a coroutine.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus

from cxrd.constants import BUS_NAME, DBUS, DBUS_PATH, INTROSPECTABLE, OBJECT_PATH, PEER
from cxrd.core.supervisor import Supervisor
from cxrd.dbus.connection import CONNECT_ERRORS, connect, require_session_bus
from cxrd.dbus.interface import CALLER, Daemon1
from cxrd.errors import AccessDenied, AlreadyServing, StartFailed

_log = logging.getLogger(__name__)

# Open to any caller: what the object looks like, and ping. Everything else,
# on any path (ObjectManager answers on "/"), is for the daemon's uid only.
_OPEN_INTERFACES = frozenset({INTROSPECTABLE, PEER})
_NAME_LEFT_RULE = (
    f"type='signal',sender='{DBUS}',path='{DBUS_PATH}',interface='{DBUS}',"
    "member='NameOwnerChanged',arg2=''"
)
_BUS_TIMEOUT = 10.0  # seconds for one call to the bus driver or for connecting


async def _driver_call(bus: MessageBus, member: str, signature: str, body: list[Any]) -> list[Any]:
    """One call to the bus driver, bounded; an error reply is :class:`LookupError`."""
    request = Message(
        destination=DBUS,
        path=DBUS_PATH,
        interface=DBUS,
        member=member,
        signature=signature,
        body=body,
    )
    async with asyncio.timeout(_BUS_TIMEOUT):
        reply = await bus.call(request)
    if reply is None or reply.message_type is MessageType.ERROR:
        detail = f"{reply.error_name} {reply.body}" if reply is not None else "no reply"
        raise LookupError(f"{member}{tuple(body)}: {detail}")
    return list(reply.body)


# --- callers ------------------------------------------------------------------


class _Peers:
    """Uid and pid of each caller's connection, asked of the bus once per connection.

    Concurrent calls from a new connection share one question; answers are
    dropped when the connection leaves the bus (unique names are never reused).
    """

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._cache: dict[tuple[str, str], int] = {}
        self._asking: dict[tuple[str, str], asyncio.Task[int]] = {}

    def cached_uid(self, name: str) -> int | None:
        return self._cache.get(("GetConnectionUnixUser", name))

    async def uid(self, name: str) -> int:
        return await self._ask("GetConnectionUnixUser", name)

    async def pid(self, name: str) -> int:
        return await self._ask("GetConnectionUnixProcessID", name)

    async def _ask(self, member: str, name: str) -> int:
        key = (member, name)
        if (known := self._cache.get(key)) is not None:
            return known
        task = self._asking.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(member, name))
            self._asking[key] = task
            task.add_done_callback(lambda done: self._store(key, done))
        return await asyncio.shield(task)

    def _store(self, key: tuple[str, str], task: asyncio.Task[int]) -> None:
        if self._asking.get(key) is not task:
            return  # the connection left while we asked
        del self._asking[key]
        if not task.cancelled() and task.exception() is None:
            self._cache[key] = task.result()

    async def _query(self, member: str, name: str) -> int:
        (value,) = await _driver_call(self._bus, member, "s", [name])
        return int(value)

    def forget(self, name: str) -> None:
        for key in [k for k in self._cache if k[1] == name]:
            del self._cache[key]
        for key in [k for k in self._asking if k[1] == name]:
            del self._asking[key]

    def close(self) -> None:
        for task in self._asking.values():
            task.cancel()
        self._asking.clear()


# --- the service ----------------------------------------------------------------


class DBusService:
    """The daemon's bus connection: the exported object, the name, the lease watcher."""

    def __init__(self, bus: MessageBus, supervisor: Supervisor, name: str = BUS_NAME) -> None:
        self._bus = bus
        self._name = name  # the instance's bus name
        self._sup = supervisor
        self._uid = os.getuid()
        self._peers = _Peers(bus)
        self._interface = Daemon1(supervisor, self._peers.pid)
        self._held: dict[str, list[Message]] = {}  # calls waiting for their sender's uid
        self._identifying: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False

    async def _open(self) -> None:
        self._bus.add_message_handler(self._on_message)
        self._bus.export(OBJECT_PATH, self._interface)
        self._unsubscribe = self._sup.subscribe(self._interface.on_event)
        await _driver_call(self._bus, "AddMatch", "s", [_NAME_LEFT_RULE])
        async with asyncio.timeout(_BUS_TIMEOUT):
            reply = await self._bus.request_name(self._name, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise AlreadyServing(f"{self._name} is already served on this bus{await self._owner()}")
        _log.info("serving %s on the session bus as %s", self._name, self._bus.unique_name)

    async def _owner(self) -> str:
        try:
            (owner,) = await _driver_call(self._bus, "GetNameOwner", "s", [self._name])
            (pid,) = await _driver_call(self._bus, "GetConnectionUnixProcessID", "s", [owner])
        except (LookupError, TimeoutError):
            return ""
        return f" by pid {pid} ({owner})"

    def _on_message(self, msg: Message) -> Message | bool | None:
        """The gate: runs for every message, before dbus-fast dispatches it."""
        if msg.message_type is MessageType.METHOD_CALL:
            sender = msg.sender or ""
            # Set for every call so that no call ever sees another's sender.
            CALLER.set(sender)
            if msg.interface in _OPEN_INTERFACES:
                return None
            uid = self._peers.cached_uid(sender)
            if uid == self._uid:
                return None
            if uid is None:
                self._hold(sender, msg)
                return True  # dispatched later, once the bus says who this is
            return self._deny(msg)
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.sender == DBUS
            and msg.path == DBUS_PATH
        ):
            name, _old, new = msg.body
            if not new and name.startswith(":"):
                self._connection_left(name)
        return None

    def _deny(self, msg: Message) -> Message | bool:
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True
        return Message.new_error(
            msg, AccessDenied.dbus_name(), f"only uid {self._uid} may use {self._name}"
        )

    def _hold(self, sender: str, msg: Message) -> None:
        waiting = self._held.get(sender)
        if waiting is not None:
            waiting.append(msg)
            return
        self._held[sender] = [msg]
        task = asyncio.get_running_loop().create_task(self._identify(sender))
        self._identifying.add(task)
        task.add_done_callback(self._identifying.discard)

    async def _identify(self, sender: str) -> None:
        try:
            uid: int | None = await self._peers.uid(sender)
        except (LookupError, TimeoutError):
            uid = None  # gone already, or the bus did not say: nobody we know
        held = self._held.pop(sender, [])
        for msg in held:
            if uid == self._uid and not self._closed:
                # dbus-fast has no public way to hand back a message a handler
                # held; _process_message is what its reader calls for each one.
                self._bus._process_message(msg)
            else:
                denial = self._deny(msg)
                if isinstance(denial, Message):
                    self._bus.send(denial)

    def _connection_left(self, name: str) -> None:
        self._peers.forget(name)
        try:
            released = self._sup.release_holder(name)
        except Exception:
            _log.exception("could not release the leases of %s", name)
            return
        if released:
            _log.info("%s left the bus; released %d lease(s)", name, released)

    async def close(self) -> None:
        """Give up the name and disconnect; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._interface.cancel_pending()
        for task in self._identifying:
            task.cancel()
        self._held.clear()
        self._peers.close()
        self._bus.remove_message_handler(self._on_message)
        if self._bus.connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_BUS_TIMEOUT):
                    await self._bus.release_name(self._name)
            self._bus.unexport(OBJECT_PATH)
            self._bus.disconnect()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_BUS_TIMEOUT):
                    await self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    async def wait_disconnected(self) -> None:
        """Resolves when the bus connection ends (the session bus went away, or close())."""
        # dbus-fast hands out its own disconnect future: a cancelled waiter
        # must not cancel it for close() and everyone else.
        with contextlib.suppress(Exception):
            await asyncio.shield(self._bus.wait_for_disconnect())  # type: ignore[no-untyped-call]


async def serve_dbus(
    supervisor: Supervisor, *, bus_address: str | None = None, bus_name: str = BUS_NAME
) -> DBusService:
    """Connect, export the interface and take the (instance's) bus name (DESIGN §5).

    Taken name: :class:`AlreadyServing` naming the owner's pid. No reachable
    bus: :class:`StartFailed` saying which address failed.
    """
    address = bus_address or require_session_bus()
    try:
        bus = await connect(address, timeout=_BUS_TIMEOUT)
    except CONNECT_ERRORS as exc:
        raise StartFailed(f"cannot connect to the session bus at {address}: {exc}") from None
    service = DBusService(bus, supervisor, bus_name)
    try:
        await service._open()
    except BaseException:
        await service.close()
        raise
    return service
