"""What a client's watchers see: the daemon's signals and its bus name's owner, decoded.

Pure: a signal message in, a typed event out (or None for one not ours).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message

from cxrd.constants import DBUS, INTERFACE, OBJECT_PATH, PROPERTIES
from cxrd.core.states import StateChanged
from cxrd.dbus import wire


@dataclass(frozen=True)
class PropertiesEvent:
    """``PropertiesChanged``: property name -> new value (plain Python)."""

    changed: Mapping[str, Any]


@dataclass(frozen=True)
class OwnerEvent:
    """The bus name got an owner (``owner`` a unique name) or lost it (``owner`` empty)."""

    owner: str


@dataclass(frozen=True)
class HeadsetEvent:
    """``HeadsetConnected`` (``connected``) or ``HeadsetDisconnected`` (seconds, close code)."""

    connected: bool
    id: str
    address: str
    user_agent: str = ""
    seconds: float = 0.0
    close_code: int = 0


# The daemon's StateChanged signal, as the client sees it.
StateEvent = StateChanged
ClientEvent = StateEvent | PropertiesEvent | OwnerEvent | HeadsetEvent


def event_from_signal(msg: Message, name: str) -> ClientEvent | None:
    """The event a signal carries about the daemon owning ``name``; None if none."""
    if msg.member == "NameOwnerChanged" and msg.interface == DBUS and msg.sender == DBUS:
        if msg.body and msg.body[0] == name:
            return OwnerEvent(owner=str(msg.body[2]))
        return None
    if msg.path != OBJECT_PATH:
        return None
    if msg.interface == INTERFACE and msg.member == "StateChanged":
        new, old, reason = msg.body
        return StateEvent(
            new=wire.state_from_wire(new), old=wire.state_from_wire(old), reason=reason
        )
    if msg.interface == INTERFACE and msg.member == "HeadsetConnected":
        return HeadsetEvent(True, *msg.body)
    if msg.interface == INTERFACE and msg.member == "HeadsetDisconnected":
        hid, address, seconds, code = msg.body
        return HeadsetEvent(False, hid, address, seconds=seconds, close_code=code)
    if (
        msg.interface == PROPERTIES
        and msg.member == "PropertiesChanged"
        and msg.body[0] == INTERFACE
    ):
        return PropertiesEvent(changed={k: v.value for k, v in msg.body[1].items()})
    return None
