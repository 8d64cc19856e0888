"""The supervisor on the session bus: ``io.github.cxrd.Daemon1`` (DESIGN §5).

Translation only, no decisions: wire types to Python and back, exceptions to
error names, supervisor events to ``StateChanged`` and ``PropertiesChanged``,
and the caller's bus identity to an access check and a lease holder.

One gate for every call: a message handler, which dbus-fast runs for each
message before it dispatches it, checks the caller's uid. A connection's uid
is asked of the bus once; its calls wait for that answer in order, then are
dispatched as if they had just arrived. So the members themselves stay plain:
``Status`` and the properties answer synchronously (no task per call), and
only what waits on the supervisor is a coroutine.

Who is calling: dbus-fast does not hand the message to a method, so the gate
puts the sender into a context variable. A coroutine method runs as a task
created right after the gate, and a task copies the context it was created
in, so each call sees its own sender however many are in flight.
"""

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Annotated, Any

from dbus_fast import (
    DBusError,
    Message,
    MessageFlag,
    MessageType,
    NameFlag,
    RequestNameReply,
    Variant,
)
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt32
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from cxrd.constants import (
    BUS_NAME,
    DBUS,
    DBUS_PATH,
    ERROR_PREFIX,
    INTERFACE,
    INTROSPECTABLE,
    INTROSPECTION_XML,
    OBJECT_PATH,
    PEER,
)
from cxrd.core.states import StateChanged
from cxrd.core.supervisor import Event, Supervisor
from cxrd.dbus import wire
from cxrd.dbus.connection import CONNECT_ERRORS, connect, require_session_bus
from cxrd.errors import AccessDenied, AlreadyServing, CxrdError, StartFailed

_log = logging.getLogger(__name__)

FAILED = ERROR_PREFIX + "Failed"
# Open to any caller: what the object looks like, and ping. Everything else,
# on any path (ObjectManager answers on "/"), is for the daemon's uid only.
_OPEN_INTERFACES = frozenset({INTROSPECTABLE, PEER})
_NAME_LEFT_RULE = (
    f"type='signal',sender='{DBUS}',path='{DBUS_PATH}',interface='{DBUS}',"
    "member='NameOwnerChanged',arg2=''"
)
_BUS_TIMEOUT = 10.0  # seconds for one call to the bus driver or for connecting

_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("cxrd_dbus_caller", default="")

_Options = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
_StrMap = Annotated[dict[str, str], DBusSignature("a{ss}")]
_Leases = Annotated[list[list[Any]], DBusSignature(wire.LEASES_SIGNATURE)]


# --- the contract -----------------------------------------------------------


def contract_xml() -> str:
    """The introspection XML shipped with the package (a copy of ``dbus/``)."""
    return resources.files("cxrd").joinpath("data", INTROSPECTION_XML).read_text(encoding="utf-8")


def contract_interface(xml: str | None = None) -> intr.Interface:
    node = intr.Node.parse(xml if xml is not None else contract_xml())
    for interface in node.interfaces:
        if interface.name == INTERFACE:
            return interface
    raise ValueError(f"the introspection XML has no interface {INTERFACE}")


def interface_shape(interface: intr.Interface, *, names: bool) -> dict[str, Any]:
    """A comparable summary of an interface: types always, names and annotations if asked."""

    def args(items: list[intr.Arg]) -> list[tuple[Any, ...]]:
        return [
            (a.signature, getattr(a.direction, "value", a.direction), a.name if names else None)
            for a in items
        ]

    return {
        "methods": {m.name: (args(m.in_args), args(m.out_args)) for m in interface.methods},
        "signals": {s.name: args(s.args) for s in interface.signals},
        "properties": {
            p.name: (
                p.signature,
                getattr(p.access, "value", p.access),
                dict(p.annotations) if names else None,
            )
            for p in interface.properties
        },
    }


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


@contextlib.contextmanager
def _translated(member: str) -> Iterator[None]:
    """Named errors cross the bus by name; anything else as Failed, traceback kept here."""
    try:
        yield
    except DBusError:
        raise
    except CxrdError as err:
        raise DBusError(type(err).dbus_name(), str(err)) from None
    except Exception:
        _log.exception("D-Bus %s failed unexpectedly", member)
        text = f"{member} failed inside cxrd; the daemon's log has details"
        raise DBusError(FAILED, text) from None


# --- the interface --------------------------------------------------------------


class Daemon1(ServiceInterface):
    """``io.github.cxrd.Daemon1``; each member calls the supervisor and nothing else."""

    def __init__(self, supervisor: Supervisor, peers: _Peers) -> None:
        super().__init__(INTERFACE)
        self._sup = supervisor
        self._peers = peers
        self._contract = contract_interface()
        served = interface_shape(super().introspect(), names=False)
        promised = interface_shape(self._contract, names=False)
        if served != promised:
            raise RuntimeError(
                f"the D-Bus handlers disagree with {INTROSPECTION_XML}: {served} != {promised}"
            )
        self._props = wire.property_values(supervisor.snapshot())
        self._flush_pending: asyncio.Handle | None = None
        self._status: tuple[dict[str, Variant], float] | None = None  # (wire, uptime - monotonic)

    def introspect(self) -> intr.Interface:
        # The XML, with argument names and annotations dbus-fast cannot express;
        # __init__ proved the handlers have exactly its types.
        return self._contract

    # methods

    @dbus_method()
    async def Start(self, options: _Options) -> None:
        with _translated("Start"):
            timeout, profile = wire.parse_start_options(options)
            await self._sup.start(timeout=timeout, device_profile=profile)

    @dbus_method()
    def Stop(self) -> None:
        with _translated("Stop"):
            self._sup.request_stop()

    @dbus_method()
    async def Restart(self, options: _Options) -> None:
        with _translated("Restart"):
            timeout, profile = wire.parse_start_options(options)
            await self._sup.restart(timeout=timeout, device_profile=profile)

    @dbus_method()
    def Status(self) -> _Options:
        with _translated("Status"):
            # The wire form is kept until the supervisor says something changed
            # (it emits an event for every change but uptime's), so a poller
            # costs a dict copy, not a snapshot and its conversion.
            now = time.monotonic()
            if self._status is None:
                snap = self._sup.snapshot()
                self._status = (wire.snapshot_to_wire(snap), snap.uptime - now)
            status, born = self._status
            return {**status, "uptime": Variant("d", born + now)}

    @dbus_method()
    async def Acquire(self, reason: DBusStr) -> DBusStr:
        with _translated("Acquire"):
            holder = _CALLER.get()
            try:
                pid = await self._peers.pid(holder)
            except LookupError:
                # Gone before we could ask: a lease for it would never end.
                raise AccessDenied(f"{holder} left the bus before its lease began") from None
            except TimeoutError:
                pid = 0
            # No await between asking the bus and acquiring: the bus sends the
            # holder's NameOwnerChanged after its pid reply, so release_holder
            # always comes after this lease exists.
            return self._sup.acquire(holder, pid, reason)

    @dbus_method()
    def Release(self, lease_id: DBusStr) -> None:
        with _translated("Release"):
            self._sup.release(lease_id)

    # signal

    @dbus_signal()
    def StateChanged(
        self, new: str, old: str, reason: str
    ) -> Annotated[list[str], DBusSignature("sss")]:
        return [new, old, reason]

    # properties: read from a fresh snapshot, so a Get never lags an event

    def _prop(self, name: str) -> Any:
        with _translated(f"Get {name}"):
            return wire.property_values(self._sup.snapshot())[name]

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return str(self._prop("State"))

    @dbus_property(access=PropertyAccess.READ)
    def RuntimePid(self) -> DBusUInt32:
        return int(self._prop("RuntimePid"))

    @dbus_property(access=PropertyAccess.READ)
    def ProxyPid(self) -> DBusUInt32:
        return int(self._prop("ProxyPid"))

    @dbus_property(access=PropertyAccess.READ)
    def ProxyUrl(self) -> DBusStr:
        return str(self._prop("ProxyUrl"))

    @dbus_property(access=PropertyAccess.READ)
    def DeviceProfile(self) -> DBusStr:
        return str(self._prop("DeviceProfile"))

    @dbus_property(access=PropertyAccess.READ)
    def Environment(self) -> _StrMap:
        return dict(self._prop("Environment"))

    @dbus_property(access=PropertyAccess.READ)
    def EnvFile(self) -> DBusStr:
        return str(self._prop("EnvFile"))

    @dbus_property(access=PropertyAccess.READ)
    def LastError(self) -> DBusStr:
        return str(self._prop("LastError"))

    @dbus_property(access=PropertyAccess.READ)
    def Restarts(self) -> DBusUInt32:
        return int(self._prop("Restarts"))

    @dbus_property(access=PropertyAccess.READ)
    def Leases(self) -> _Leases:
        return list(self._prop("Leases"))

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return str(self._prop("Version"))

    @dbus_property(access=PropertyAccess.READ)
    def InterfaceVersion(self) -> DBusUInt32:
        return int(self._prop("InterfaceVersion"))

    # supervisor events

    def on_event(self, event: Event) -> None:
        """Supervisor listener: must not raise or block."""
        self._status = None
        try:
            if isinstance(event, StateChanged):
                # Never coalesced: every state is announced, properties first so
                # a client reacting to the signal reads values that match it.
                self._flush()
                self.StateChanged(str(event.new), str(event.old), event.reason)
            elif self._flush_pending is None:
                # Updates come in bursts (a lease flood); one signal per loop turn.
                self._flush_pending = asyncio.get_running_loop().call_soon(self._flush)
        except Exception:
            _log.exception("could not announce a supervisor event on D-Bus")

    def _flush(self) -> None:
        if self._flush_pending is not None:
            self._flush_pending.cancel()
            self._flush_pending = None
        try:
            current = wire.property_values(self._sup.snapshot())
            changed = {k: v for k, v in current.items() if self._props.get(k) != v}
            self._props = current
            if changed:
                self.emit_properties_changed(changed)
        except Exception:
            _log.exception("could not emit PropertiesChanged")

    def cancel_pending(self) -> None:
        if self._flush_pending is not None:
            self._flush_pending.cancel()
            self._flush_pending = None


# --- the service ----------------------------------------------------------------


class DBusService:
    """The daemon's bus connection: the exported object, the name, the lease watcher."""

    def __init__(self, bus: MessageBus, supervisor: Supervisor) -> None:
        self._bus = bus
        self._sup = supervisor
        self._uid = os.getuid()
        self._peers = _Peers(bus)
        self._interface = Daemon1(supervisor, self._peers)
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
            reply = await self._bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise AlreadyServing(f"{BUS_NAME} is already served on this bus{await self._owner()}")
        _log.info("serving %s on the session bus as %s", BUS_NAME, self._bus.unique_name)

    async def _owner(self) -> str:
        try:
            (owner,) = await _driver_call(self._bus, "GetNameOwner", "s", [BUS_NAME])
            (pid,) = await _driver_call(self._bus, "GetConnectionUnixProcessID", "s", [owner])
        except (LookupError, TimeoutError):
            return ""
        return f" by pid {pid} ({owner})"

    def _on_message(self, msg: Message) -> Message | bool | None:
        """The gate: runs for every message, before dbus-fast dispatches it."""
        if msg.message_type is MessageType.METHOD_CALL:
            sender = msg.sender or ""
            # Set for every call so that no call ever sees another's sender.
            _CALLER.set(sender)
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
            msg, AccessDenied.dbus_name(), f"only uid {self._uid} may use {BUS_NAME}"
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
                    await self._bus.release_name(BUS_NAME)
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


async def serve_dbus(supervisor: Supervisor, *, bus_address: str | None = None) -> DBusService:
    """Connect, export the interface and take the bus name (DESIGN §5).

    Taken name: :class:`AlreadyServing` naming the owner's pid. No reachable
    bus: :class:`StartFailed` saying which address failed.
    """
    address = bus_address or require_session_bus()
    try:
        bus = await connect(address, timeout=_BUS_TIMEOUT)
    except CONNECT_ERRORS as exc:
        raise StartFailed(f"cannot connect to the session bus at {address}: {exc}") from None
    service = DBusService(bus, supervisor)
    try:
        await service._open()
    except BaseException:
        await service.close()
        raise
    return service
