"""Where the session bus is: shared by the daemon, the client and the CLI.

The order is the one libdbus and sd-bus use: ``$DBUS_SESSION_BUS_ADDRESS``,
then the per-user socket ``$XDG_RUNTIME_DIR/bus`` (``/run/user/<uid>/bus``
when the variable is unset), which is where systemd's user bus lives. And
what the bus's error replies mean, as cxrd's errors.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from dbus_fast import DBusError
from dbus_fast.aio import MessageBus

from cxrd.constants import DBUS
from cxrd.errors import (
    AccessDenied,
    CxrdError,
    NotRunning,
    StartFailed,
    Timeout,
    error_for_dbus_name,
)

_NOT_RUNNING = {
    f"{DBUS}.Error.ServiceUnknown",
    f"{DBUS}.Error.NameHasNoOwner",
    f"{DBUS}.Error.Disconnected",
}

# What connecting can raise: no socket or refused (OSError), a bad address or a
# failed authentication (ValueError), no answer (TimeoutError), Hello refused.
CONNECT_ERRORS: Final = (OSError, TimeoutError, ValueError, DBusError)


def session_bus_address(env: Mapping[str, str] | None = None) -> str | None:
    """The session bus address, or None when this user has no session bus."""
    env = os.environ if env is None else env
    address = env.get("DBUS_SESSION_BUS_ADDRESS", "").strip()
    if address:
        return address
    runtime_dir = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    socket_path = Path(runtime_dir) / "bus"
    try:
        if stat.S_ISSOCK(socket_path.stat().st_mode):
            return f"unix:path={socket_path}"
    except OSError:
        pass
    return None


def require_session_bus(env: Mapping[str, str] | None = None) -> str:
    """Like :func:`session_bus_address`, but no bus at all is :class:`NotRunning`."""
    address = session_bus_address(env)
    if address is None:
        raise NotRunning(
            "there is no session bus (DBUS_SESSION_BUS_ADDRESS is unset and there is "
            "no $XDG_RUNTIME_DIR/bus), so cxrd cannot be reached"
        )
    return address


async def connect(address: str, *, timeout: float) -> MessageBus:
    """A connection to ``address`` made within ``timeout``; raises one of CONNECT_ERRORS."""
    bus = MessageBus(bus_address=address)
    async with asyncio.timeout(timeout):
        await bus.connect()
    tolerate_full_socket(bus)
    return bus


class _SendWhenWritable:
    """A socket whose ``send`` answers 0 instead of raising when the buffer is full.

    dbus-fast's writer (through 5.2) treats EAGAIN from a non-blocking send as
    a fatal error and drops the connection (python-dbus-next issue 153). A
    burst of replies larger than the socket buffer (a client flooding the
    daemon) is enough. With 0 sent, the writer keeps the rest and waits for
    the socket to be writable, which is what it does for a partial send.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def send(self, data: Any, *flags: int) -> int:
        try:
            return int(self._sock.send(data, *flags))
        except (BlockingIOError, InterruptedError):
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def tolerate_full_socket(bus: MessageBus) -> None:
    """Make a connected dbus-fast bus survive a full send buffer (see above)."""
    writer = getattr(bus, "_writer", None)
    sock = getattr(writer, "sock", None)
    if sock is not None and not isinstance(sock, _SendWhenWritable):
        writer.sock = _SendWhenWritable(sock)  # type: ignore[union-attr]


def error_from_reply(name: str, text: str) -> CxrdError:
    """The exception for a D-Bus error reply."""
    cls = error_for_dbus_name(name)
    if cls is not None:
        return cls(text)
    if name in _NOT_RUNNING:
        return NotRunning(f"cxrd is not running ({text})")
    if name == f"{DBUS}.Error.AccessDenied":
        return AccessDenied(text)
    if name in (f"{DBUS}.Error.NoReply", f"{DBUS}.Error.Timeout", f"{DBUS}.Error.TimedOut"):
        return Timeout(f"cxrd did not answer in time ({text})")
    if name.startswith(f"{DBUS}.Error.Spawn.") or name.startswith("org.freedesktop.systemd1."):
        return StartFailed(f"the bus could not start cxrd: {text}")
    return CxrdError(f"{name}: {text}")
