"""The exported object ``io.github.cxrd.Daemon1`` and the contract it is held to.

Translation only, no decisions: wire types to Python and back, exceptions to
error names, supervisor events to ``StateChanged`` and ``PropertiesChanged``.
The connection, the uid gate and the lease watcher are in
:mod:`cxrd.dbus.service`.

Who is calling: dbus-fast does not hand the message to a method, so the gate
puts the sender into :data:`CALLER`. A coroutine method runs as a task
created right after the gate, and a task copies the context it was created
in, so each call sees its own sender however many are in flight.
"""

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Annotated, Any

import psutil
from dbus_fast import DBusError, Variant
from dbus_fast import introspection as intr
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt32
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from cxrd.constants import ERROR_PREFIX, INTERFACE, INTROSPECTION_XML
from cxrd.core.choice import Choice
from cxrd.core.snapshot import Event, HeadsetConnected, HeadsetDisconnected
from cxrd.core.states import StateChanged
from cxrd.core.supervisor import Supervisor
from cxrd.dbus import wire
from cxrd.errors import AccessDenied, CxrdError

_log = logging.getLogger(__name__)

FAILED = ERROR_PREFIX + "Failed"

CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("cxrd_dbus_caller", default="")

_Options = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
_StrMap = Annotated[dict[str, str], DBusSignature("a{ss}")]
_Leases = Annotated[list[list[Any]], DBusSignature(wire.LEASES_SIGNATURE)]
_Headsets = Annotated[list[list[Any]], DBusSignature(wire.HEADSETS_SIGNATURE)]
_Strings = Annotated[list[str], DBusSignature("as")]


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


def _command_of(pid: int) -> str:
    """``: <its command line>`` where the system says (the same user's process), else ''."""
    try:
        words = psutil.Process(pid).cmdline()
    except psutil.Error:
        return ""
    text = "".join(ch if ch.isprintable() else "?" for ch in " ".join(words))
    return f": {text[:120]}" if text else ""


# --- the interface --------------------------------------------------------------


class Daemon1(ServiceInterface):
    """``io.github.cxrd.Daemon1``; each member calls the supervisor and nothing else.

    ``caller_pid`` asks the bus for a caller's pid: :class:`LookupError` when
    the caller has left, :class:`TimeoutError` when the bus does not say.
    """

    def __init__(self, supervisor: Supervisor, caller_pid: Callable[[str], Awaitable[int]]) -> None:
        super().__init__(INTERFACE)
        self._sup = supervisor
        self._caller_pid = caller_pid
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
            timeout, choice = wire.parse_start_options(options)
            await self._sup.start(timeout=timeout, choice=choice, by=await self._who(choice))

    @dbus_method()
    def Stop(self) -> None:
        with _translated("Stop"):
            self._sup.request_stop()

    @dbus_method()
    async def Restart(self, options: _Options) -> None:
        with _translated("Restart"):
            timeout, choice = wire.parse_start_options(options)
            await self._sup.restart(timeout=timeout, choice=choice, by=await self._who(choice))

    async def _who(self, choice: Choice) -> str:
        """The caller of a Start that chooses settings, for Status()'s requested_by."""
        if choice.empty:
            return ""
        sender = CALLER.get()
        try:
            pid = await self._caller_pid(sender)
        except (LookupError, TimeoutError):
            return sender
        return f"{sender} (pid {pid}{_command_of(pid)})"

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
            holder = CALLER.get()
            try:
                pid = await self._caller_pid(holder)
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

    @dbus_signal()
    def HeadsetConnected(
        self, id: str, address: str, user_agent: str
    ) -> Annotated[list[str], DBusSignature("sss")]:
        return [id, address, user_agent]

    @dbus_signal()
    def HeadsetDisconnected(
        self, id: str, address: str, seconds: float, close_code: int
    ) -> Annotated[list[Any], DBusSignature("ssdq")]:
        return [id, address, seconds, min(max(close_code, 0), 65535)]

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
    def Headsets(self) -> _Headsets:
        return list(self._prop("Headsets"))

    @dbus_property(access=PropertyAccess.READ)
    def HeadsetUrls(self) -> _Strings:
        return list(self._prop("HeadsetUrls"))

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
            elif isinstance(event, HeadsetConnected):
                self._flush()  # Headsets already lists it when the signal arrives
                h = event.headset
                self.HeadsetConnected(h.id, h.address, h.user_agent)
            elif isinstance(event, HeadsetDisconnected):
                self._flush()
                h = event.headset
                self.HeadsetDisconnected(h.id, h.address, event.seconds, event.code)
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
