"""Talk to cxrd over the session bus: an asyncio client and a blocking one.

The public import path (``from cxrd.client import CloudXRClient``); the code
lives in :mod:`cxrd.dbus.client` (asyncio; its events in :mod:`cxrd.dbus.events`)
and :mod:`cxrd.dbus.blocking` (blocking, safe from any thread, including one
running an asyncio loop).
"""

from cxrd.core.snapshot import Headset
from cxrd.dbus.blocking import CloudXRClient, call_blocking
from cxrd.dbus.client import CALL_TIMEOUT as CALL_TIMEOUT
from cxrd.dbus.client import START_TIMEOUT as START_TIMEOUT
from cxrd.dbus.client import TIMEOUT_SLACK as TIMEOUT_SLACK
from cxrd.dbus.client import AsyncCloudXRClient
from cxrd.dbus.connection import error_from_reply
from cxrd.dbus.events import (
    ClientEvent,
    HeadsetEvent,
    OwnerEvent,
    PropertiesEvent,
    StateEvent,
)
from cxrd.dbus.leasing import LeaseInfo

# The timeouts, imported `as` themselves, stay public too, outside __all__ as before.
__all__ = [
    "AsyncCloudXRClient",
    "ClientEvent",
    "CloudXRClient",
    "Headset",
    "HeadsetEvent",
    "LeaseInfo",
    "OwnerEvent",
    "PropertiesEvent",
    "StateEvent",
    "call_blocking",
    "error_from_reply",
]
