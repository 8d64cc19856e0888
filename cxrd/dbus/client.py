"""Talk to cxrd over the session bus: the asyncio client (public as :mod:`cxrd.client`).

``status()`` never starts the daemon (the call carries NO_AUTO_START);
``start()`` does (D-Bus activation starts ``cloudxr.service``). Errors are the
classes of :mod:`cxrd.errors`, one per D-Bus error name; a daemon that is not
on the bus is :class:`~cxrd.errors.NotRunning`. The blocking face, built on
this one, is :mod:`cxrd.dbus.blocking`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from cxrd.constants import DBUS, DBUS_PATH, INTERFACE, OBJECT_PATH, PROPERTIES
from cxrd.core.choice import Choice
from cxrd.core.snapshot import Headset, Snapshot
from cxrd.core.states import State
from cxrd.dbus import wire
from cxrd.dbus.connection import (
    CONNECT_ERRORS,
    connect,
    error_from_reply,
    require_session_bus,
)
from cxrd.dbus.events import (
    ClientEvent,
    OwnerEvent,
    PropertiesEvent,
    StateEvent,
    event_from_signal,
)
from cxrd.dbus.leasing import Held, LeaseInfo, environment_applied, release_failure_logged
from cxrd.errors import (
    Busy,
    CxrdError,
    NoSuchLease,
    NotRunning,
    StartFailed,
    Timeout,
)
from cxrd.instances import Instance, from_bus_name

CALL_TIMEOUT = 25.0  # seconds for a call that does not wait on the runtime (libdbus's default)
START_TIMEOUT = 300.0  # a Start without a timeout of its own still ends some day
TIMEOUT_SLACK = 5.0  # on top of a Start's own timeout, so the daemon's Timeout error wins

_log = logging.getLogger(__name__)


# --- asyncio --------------------------------------------------------------------


class AsyncCloudXRClient:
    """One bus connection to cxrd. Use ``async with`` or :meth:`close`."""

    def __init__(self, bus_address: str | None = None, *, instance: str | None = None) -> None:
        """``instance``: a named one; None reads ``$CXRD_INSTANCE`` (unset: the unnamed one)."""
        self.instance = Instance.selected(instance)
        self._name = self.instance.bus_name
        self._address = bus_address
        self._bus: MessageBus | None = None
        self._watchers: list[asyncio.Queue[ClientEvent]] = []
        self._matching = False

    @classmethod
    async def connect(
        cls, bus_address: str | None = None, *, instance: str | None = None
    ) -> AsyncCloudXRClient:
        client = cls(bus_address, instance=instance)
        await client.open()
        return client

    async def open(self) -> None:
        if self._bus is not None:
            return
        address = self._address or require_session_bus()
        try:
            bus = await connect(address, timeout=CALL_TIMEOUT)
        except CONNECT_ERRORS as exc:
            raise NotRunning(f"cannot connect to the session bus at {address}: {exc}") from None
        bus.add_message_handler(self._on_message)
        self._bus = bus

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None and bus.connected:
            bus.disconnect()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CALL_TIMEOUT):
                    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    def abandon(self) -> None:
        """In the child of a fork, drop the parent's connection: close only this descriptor
        (:meth:`close` would shut the socket down for both), so it ends with the parent."""
        bus, self._bus = self._bus, None
        self._matching = False
        self._watchers.clear()
        fd = bus._sock.detach() if bus is not None and bus._sock is not None else -1
        if fd >= 0:
            os.close(fd)

    async def __aenter__(self) -> AsyncCloudXRClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def unique_name(self) -> str:
        """This connection's unique bus name: the holder of its leases."""
        return str(self._connected().unique_name)

    def _connected(self) -> MessageBus:
        if self._bus is None:
            raise RuntimeError("the client is not open (use `async with` or open())")
        return self._bus

    # calls

    async def _call(self, member: str, *args: Any, **kwargs: Any) -> list[Any]:
        """The reply's body; arguments as :meth:`_call_message`."""
        return list((await self._call_message(member, *args, **kwargs)).body)

    async def _call_message(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        auto_start: bool = False,
        timeout: float = CALL_TIMEOUT,
        destination: str | None = None,
        path: str = OBJECT_PATH,
        interface: str = INTERFACE,
    ) -> Message:
        """The reply itself: its sender is the unique name of the daemon that answered."""
        bus = self._connected()
        message = Message(
            destination=destination or self._name,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            flags=MessageFlag.NONE if auto_start else MessageFlag.NO_AUTOSTART,
        )
        try:
            async with asyncio.timeout(timeout):
                reply = await bus.call(message)
        except TimeoutError:
            raise Timeout(f"{member}: no answer from cxrd within {timeout:g} s") from None
        except (OSError, EOFError) as exc:
            raise NotRunning(f"the bus connection broke during {member}: {exc}") from None
        if reply is None:
            raise CxrdError(f"{member}: no reply")
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            err = error_from_reply(reply.error_name or "", text or str(reply.error_name))
            if auto_start and reply.error_name == f"{DBUS}.Error.ServiceUnknown":
                err = NotRunning(
                    f"{err}, and the bus cannot start it on demand: `cxrctl install` "
                    "sets up D-Bus activation (or run `cxrd` yourself)"
                )
            raise err
        return reply

    async def _driver(self, member: str, *args: str) -> list[Any]:
        return await self._call(
            member,
            "s" * len(args),
            args,
            destination=DBUS,
            path=DBUS_PATH,
            interface=DBUS,
        )

    async def status(self) -> Snapshot:
        """The daemon's snapshot; :class:`NotRunning` when it is not on the bus."""
        (data,) = await self._call("Status")
        return wire.snapshot_from_wire(data)

    async def is_running(self) -> bool:
        try:
            await self._driver("GetNameOwner", self._name)
        except NotRunning:
            return False
        return True

    async def running_instances(self) -> list[Instance]:
        """Every cxrd instance on this bus now (any instance, not only this client's)."""
        (names,) = await self._driver("ListNames")
        found = {from_bus_name(str(name)) for name in names}
        return sorted(instance for instance in found if instance is not None)

    async def get_property(self, name: str) -> Any:
        (value,) = await self._call("Get", "ss", [INTERFACE, name], interface=PROPERTIES)
        return value.value if isinstance(value, Variant) else value

    async def start(
        self,
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
    ) -> Snapshot:
        """Start (activating the daemon if needed); return once ready.

        ``device_profile``, ``env`` (keys of an isaacteleop env file) and
        ``gpu`` (CUDA index) start the runtime with them while nobody uses it;
        once in use, asking otherwise raises ProfileMismatch or ConfigMismatch.
        A daemon that is on its way out answers Busy: wait for it to leave the
        bus, then ask once more, which activates a fresh one.
        """
        choice = Choice(profile=device_profile, env=dict(env or {}), gpu=gpu)
        try:
            return await self._start("Start", timeout, choice)
        except Busy:
            await self.wait_gone(timeout if timeout is not None else START_TIMEOUT)
            return await self._start("Start", timeout, choice)

    async def restart(
        self,
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
    ) -> Snapshot:
        """Stop and start the runtime, switching to the settings given (the rest kept)."""
        choice = Choice(profile=device_profile, env=dict(env or {}), gpu=gpu)
        return await self._start("Restart", timeout, choice)

    async def _start(
        self, member: str, timeout: float | None, choice: Choice, destination: str | None = None
    ) -> Snapshot:
        options = wire.start_options(timeout, choice)
        limit = START_TIMEOUT if timeout is None else timeout + TIMEOUT_SLACK
        await self._call(
            member,
            "a{sv}",
            [options],
            auto_start=destination is None,
            timeout=limit,
            destination=destination,
        )
        (data,) = await self._call("Status", destination=destination)
        return wire.snapshot_from_wire(data)

    def start_no_block(self, *, device_profile: str | None = None) -> None:
        """Ask for a start (activating the daemon) without waiting for any answer."""
        message = Message(
            destination=self._name,
            path=OBJECT_PATH,
            interface=INTERFACE,
            member="Start",
            signature="a{sv}",
            body=[wire.start_options(None, Choice(profile=device_profile))],
            flags=MessageFlag.NO_REPLY_EXPECTED,
        )
        self._connected().send(message)

    async def stop(self, *, timeout: float = CALL_TIMEOUT) -> bool:
        """Stop the daemon and wait until it has left the bus. False if it was not running."""
        async with self.watch() as events:
            try:
                (owner,) = await self._driver("GetNameOwner", self._name)
                await self._call("Stop")
            except NotRunning:
                return False
            await self._wait_owner_gone(owner, events, timeout)
        return True

    async def wait_gone(self, timeout: float, owner: str | None = None) -> None:
        """Return once nobody owns the bus name (``owner`` given: once it no longer does)."""
        async with self.watch() as events:
            try:
                (now,) = await self._driver("GetNameOwner", self._name)
            except NotRunning:
                return
            if owner is not None and now != owner:
                return
            await self._wait_owner_gone(now, events, timeout)

    async def _wait_owner_gone(
        self, owner: str, events: AsyncIterator[ClientEvent], timeout: float
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                async for event in events:
                    if isinstance(event, OwnerEvent) and event.owner != owner:
                        return
        except TimeoutError:
            raise Timeout(f"cxrd did not leave the bus within {timeout:g} s") from None

    async def wait_ready(self, timeout: float | None = None) -> Snapshot:
        """Wait until the daemon is ready, without starting it.

        A daemon not yet on the bus is waited for (it may be being activated).
        A start that fails raises :class:`StartFailed` with the daemon's reason;
        a daemon that leaves the bus first raises :class:`NotRunning`.
        """
        limit = START_TIMEOUT if timeout is None else timeout
        failure = ""
        try:
            async with asyncio.timeout(limit), self.watch() as events:
                present = True
                try:
                    snap = await self.status()
                except NotRunning:
                    present = False
                else:
                    if snap.state is State.READY:
                        return snap
                    if snap.state is State.FAILED:
                        raise StartFailed(snap.last_error or "cxrd failed")
                async for event in events:
                    if isinstance(event, OwnerEvent):
                        if event.owner:
                            present = True
                            snap = await self.status()
                            if snap.state is State.READY:
                                return snap
                        elif present:
                            raise NotRunning(
                                "cxrd left the bus before it was ready"
                                + (f": {failure}" if failure else "")
                            )
                    elif isinstance(event, StateEvent):
                        if event.new is State.READY:
                            return await self.status()
                        if event.new is State.FAILED:
                            raise StartFailed(event.reason or "cxrd failed")
                        if event.new in (State.STOPPING, State.STOPPED):
                            failure = event.reason
        except TimeoutError:
            raise Timeout(f"cxrd was not ready within {limit:g} s") from None
        raise NotRunning("the bus connection closed")  # the event stream only ends with it

    async def headsets(self) -> tuple[Headset, ...]:
        """The headset sessions open through the proxy now (web clients only)."""
        return (await self.status()).headsets

    async def wait_for_headset(self, timeout: float | None = None) -> Headset:
        """A connected headset: one already there, else the next one; never starts cxrd.

        A daemon not on the bus yet is waited for. :class:`Timeout` after
        ``timeout`` seconds (None: no limit).
        """
        try:
            async with asyncio.timeout(timeout), self.watch() as events:
                with contextlib.suppress(NotRunning):
                    if there := await self.headsets():
                        return there[0]
                async for event in events:
                    if isinstance(event, PropertiesEvent) and event.changed.get("Headsets"):
                        return wire.headset_from_wire(event.changed["Headsets"][0])
        except TimeoutError:
            raise Timeout(f"no headset connected within {timeout:g} s") from None
        raise NotRunning("the bus connection closed")

    async def environment(self) -> dict[str, str]:
        """The runtime's environment (what ``run/cloudxr.env`` holds)."""
        return dict((await self.status()).environment)

    async def acquire(self, reason: str = "") -> str:
        """Hold the runtime for this connection; activates the daemon if needed."""
        (lease_id,) = await self._call("Acquire", "s", [reason], auto_start=True)
        return str(lease_id)

    async def release(self, lease_id: str) -> None:
        await self._call("Release", "s", [lease_id])

    async def hold(
        self,
        reason: str = "",
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
    ) -> Held:
        """A lease on a ready runtime: Acquire (activating), then Start on that same daemon.

        The Start goes to the unique name that granted the lease, so the lease
        is always held by the daemon that serves the caller. One on its way
        out (an idle stop, a Stop) answers Busy or leaves the bus: wait until
        it has gone and take the lease again on the fresh one. The lease ends
        with this connection; :meth:`let_go` ends it sooner.
        """
        choice = Choice(profile=device_profile, env=dict(env or {}), gpu=gpu)
        limit = START_TIMEOUT if timeout is None else timeout
        try:
            async with asyncio.timeout(limit + TIMEOUT_SLACK):
                while True:
                    try:
                        reply = await self._call_message("Acquire", "s", [reason], auto_start=True)
                    except Busy:
                        await self.wait_gone(limit)
                        continue
                    lease_id, owner = str(reply.body[0]), str(reply.sender)
                    try:
                        snap = await self._start("Start", timeout, choice, destination=owner)
                    except (Busy, NotRunning):
                        _log.info("cxrd %s is going away; taking the lease on the next one", owner)
                        await self.let_go(Held(lease_id, owner, None))
                        await self.wait_gone(limit, owner)
                        continue
                    except BaseException:
                        await self.let_go(Held(lease_id, owner, None))
                        raise
                    return Held(lease_id, owner, snap)
        except TimeoutError:
            raise Timeout(f"no lease on a ready cxrd within {limit:g} s") from None

    async def let_go(self, held: Held) -> None:
        """End a lease of :meth:`hold`. A daemon gone meanwhile took the lease with it."""
        try:
            await self._call("Release", "s", [held.id], destination=held.owner)
        except NotRunning:
            pass
        except NoSuchLease:
            _log.warning("lease %s had already ended (cxrd %s)", held.id, held.owner)

    @contextlib.asynccontextmanager
    async def lease(
        self,
        reason: str = "",
        *,
        timeout: float | None = None,
        device_profile: str | None = None,
        env: Mapping[str, str] | None = None,
        gpu: int | None = None,
        apply_environment: bool = True,
    ) -> AsyncIterator[LeaseInfo]:
        """Hold a ready runtime (:meth:`hold`) for the block, with its environment in
        ``os.environ``; on exit restore ``os.environ`` and release."""
        held = await self.hold(
            reason, timeout=timeout, device_profile=device_profile, env=env, gpu=gpu
        )
        assert held.snapshot is not None
        try:
            with environment_applied(held.snapshot.environment if apply_environment else {}):
                yield LeaseInfo(id=held.id, snapshot=held.snapshot)
        except BaseException:
            with release_failure_logged(held.id):
                await self.let_go(held)
            raise
        await self.let_go(held)

    # signals

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[ClientEvent]]:
        """Events from the daemon and its bus name, from now until the block ends."""
        await self._add_matches()
        queue: asyncio.Queue[ClientEvent] = asyncio.Queue()
        self._watchers.append(queue)

        async def events() -> AsyncIterator[ClientEvent]:
            while True:
                yield await queue.get()

        try:
            yield events()
        finally:
            self._watchers.remove(queue)

    async def _add_matches(self) -> None:
        if self._matching:
            return
        name = self._name
        rules = (
            f"type='signal',sender='{DBUS}',path='{DBUS_PATH}',interface='{DBUS}',"
            f"member='NameOwnerChanged',arg0='{name}'",
            f"type='signal',sender='{name}',path='{OBJECT_PATH}',interface='{INTERFACE}'",
            f"type='signal',sender='{name}',path='{OBJECT_PATH}',interface='{PROPERTIES}',"
            f"member='PropertiesChanged',arg0='{INTERFACE}'",
        )
        for rule in rules:
            await self._driver("AddMatch", rule)
        self._matching = True

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL or not self._watchers:
            return
        event = event_from_signal(msg, self._name)
        if event is not None:
            for queue in self._watchers:
                queue.put_nowait(event)
