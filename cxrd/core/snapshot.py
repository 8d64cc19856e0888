"""The daemon's one status snapshot, as typed values. Pure: no I/O.

The supervisor produces a :class:`Snapshot`; the D-Bus adapter puts it on the
wire as ``a{sv}``; the client turns the wire form back into a ``Snapshot``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cxrd.core.states import State, StateChanged


@dataclass(frozen=True)
class RuntimeStatus:
    pid: int = 0  # 0: not running
    started_at: float = 0.0  # Unix time; 0: not running
    restarts: int = 0  # crashes restarted since the daemon started
    last_exit: str = ""  # "exited with code 1", "killed by SIGSEGV"; "" if none yet
    state: str = ""  # the child's own state (ChildState): running, backoff, fatal, ...


@dataclass(frozen=True)
class ProxyStatus:
    pid: int = 0
    port: int = 0
    url: str = ""  # the first client URL (https://<ip>:<port>/client/?...); "" when disabled
    headset_urls: tuple[str, ...] = ()  # every client URL, as `cxrctl url` prints them
    certificate: str = ""  # a notice: renewed at start (accept it again), or expiring soon
    restarts: int = 0
    last_exit: str = ""
    state: str = ""  # the proxy's own state: a proxy that gave up leaves the daemon ready


@dataclass(frozen=True)
class Lease:
    id: str
    holder: str  # the holder's unique bus name (":1.42"), or another owner token
    pid: int  # 0 when unknown
    reason: str
    since: float  # Unix time


@dataclass(frozen=True)
class Headset:
    """A WebSocket session through the proxy to the runtime's signaling."""

    id: str
    address: str  # the peer's IP address
    user_agent: str
    path: str  # without the query
    since: float  # Unix time


@dataclass(frozen=True)
class Snapshot:
    state: State
    backend: str  # "isaacteleop", "sim" or "command"
    runtime: RuntimeStatus
    proxy: ProxyStatus
    device_profile: str
    environment: Mapping[str, str]  # what run/cloudxr.env holds; {} when no runtime
    env_file: str
    logs: Mapping[str, str]  # "runtime", "server", "proxy" -> path
    install_dir: str
    uptime: float  # seconds since the daemon started
    last_error: str
    version: str
    interface_version: int
    leases: tuple[Lease, ...] = field(default=())
    instance: str = ""  # "" is the unnamed instance
    gpu: int = -1  # runtime.gpu, the CUDA device index; -1: not pinned
    signaling_port: int = 0  # runtime.signaling_port (TCP), where the proxy forwards
    media_port: int = 0  # runtime.media_port (UDP)
    ready_since: float = 0.0  # Unix time the daemon became ready; 0 while it is not
    last_start_seconds: float = 0.0  # starting/restarting -> ready, the latest; 0 before one
    headsets: tuple[Headset, ...] = field(default=())
    # What a client's Start chose over the config (device_profile, gpu, env keys), and who.
    requested: Mapping[str, str] = field(default_factory=dict)
    requested_by: str = ""  # "" while the runtime runs as the config says
    # The last time another program changed run/cloudxr.env and cxrd put it back; "" if never.
    env_file_event: str = ""


# What the supervisor tells its listeners (the D-Bus interface, the health server).
class Updated:
    """Something in the snapshot other than the state may have changed."""


@dataclass(frozen=True)
class HeadsetConnected:
    headset: Headset


@dataclass(frozen=True)
class HeadsetDisconnected:
    headset: Headset
    seconds: float
    code: int  # the WebSocket close code; 1006 when the proxy ended under it


Event = StateChanged | Updated | HeadsetConnected | HeadsetDisconnected
