"""What goes through the supervisor's one queue: requests, and what its workers report.

Requests (Start, Stop, Restart, Reload, the idle timer) and reports (a child
spawned, got ready, exited; a backoff ended; an operation was prepared) are
plain records. One task takes them off the queue in order and handles each
to the end before the next, so two of them never interleave half-way.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from cxrd.config import Config
from cxrd.core.children import Child
from cxrd.core.choice import Choice
from cxrd.core.model import RuntimeLaunch, SessionEvent
from cxrd.core.ports import ChildHandle, ProxyLaunch
from cxrd.errors import CxrdError

Reply = asyncio.Future[str]


# ---- requests ----------------------------------------------------------------


@dataclass(frozen=True)
class StartRequest:
    choice: Choice  # what the client asks the runtime to run with; empty: anything
    reply: Reply
    by_client: bool  # a client's Start (claims the runtime), not the daemon's own
    by: str = ""  # who asks, for Status()'s requested_by


@dataclass(frozen=True)
class RestartRequest:
    choice: Choice  # the keys to change; the others stay as the runtime runs
    reply: Reply
    by: str = ""


@dataclass(frozen=True)
class ReloadRequest:
    read: Callable[[], Config]  # re-reads the files; raises InvalidConfig
    reply: Reply


@dataclass(frozen=True)
class StopRequest:
    reason: str
    error: CxrdError | None = None  # end with this error instead of a clean stop


@dataclass(frozen=True)
class IdleCheck:
    token: int


# ---- reports from the supervisor's own workers --------------------------------


@dataclass(frozen=True)
class Spawned:
    child: Child
    gen: int
    handle: ChildHandle


@dataclass(frozen=True)
class SpawnFailed:
    child: Child
    gen: int
    error: CxrdError | None  # None: cancelled before it spawned anything


@dataclass(frozen=True)
class Ready:
    child: Child
    gen: int


@dataclass(frozen=True)
class TimedOut:
    """Not ready within the startup timeout, or the readiness port failed (``error``)."""

    child: Child
    gen: int
    error: CxrdError | None = None


@dataclass(frozen=True)
class Exited:
    child: Child
    gen: int
    code: int | None  # None: its exit could not be watched (``lost`` says why)
    lost: str = ""


@dataclass(frozen=True)
class Deadline:
    """A stop or a failure did not finish in time: the daemon ends anyway."""


@dataclass(frozen=True)
class Session:
    """The proxy reported a headset session opening or closing."""

    child: Child
    gen: int
    event: SessionEvent


@dataclass(frozen=True)
class BackoffOver:
    child: Child
    gen: int


@dataclass(frozen=True)
class Prepared:
    op: Operation
    error: CxrdError | None = None


Message = (
    StartRequest
    | RestartRequest
    | ReloadRequest
    | StopRequest
    | IdleCheck
    | Deadline
    | Spawned
    | SpawnFailed
    | Ready
    | TimedOut
    | Exited
    | BackoffOver
    | Session
    | Prepared
)


# ---- operations: at most one in flight, the rest wait in order -----------------


class Kind(enum.Enum):
    LAUNCH = "launch"  # the daemon's first start
    RESTART = "restart"
    RELOAD = "reload"


@dataclass(eq=False)
class Operation:
    kind: Kind
    choice: Choice  # what the runtime runs with over the config once this is done
    replies: list[Reply] = field(default_factory=list)
    by: str = ""  # who made that choice ("" the config)
    read: Callable[[], Config] | None = None  # RELOAD: how to get the new config
    # Filled in by preparation, before anything running is touched:
    config: Config | None = None
    runtime: RuntimeLaunch | None = None
    proxy: ProxyLaunch | None = None
    restart_runtime: bool = False
    restart_proxy: bool = False
    summary: str = ""
    proxy_restarting: bool = False  # a proxy-only reload waits for the new proxy
    prep: asyncio.Task[None] | None = None

    @property
    def is_run(self) -> bool:
        """Stops and starts the runtime (or, a reload not read yet, may): Start waits."""
        return self.kind is not Kind.RELOAD or self.restart_runtime or self.config is None


def reload_changes(old: Config, new: Config) -> tuple[bool, bool, list[str]]:
    """(runtime must restart, proxy must restart, the changed keys, dotted)."""
    changed = _changed_keys(old, new)
    runtime = any(k.startswith("runtime.") for k in changed)
    # The proxy forwards to the runtime's signaling port.
    proxy = any(k.startswith("proxy.") for k in changed) or "runtime.signaling_port" in changed
    return runtime, proxy, changed


def _changed_keys(old: Config, new: Config) -> list[str]:
    keys: list[str] = []
    for section in ("runtime", "proxy", "restart"):
        a, b = getattr(old, section), getattr(new, section)
        for name in a.__dataclass_fields__:
            if getattr(a, name) != getattr(b, name):
                keys.append(f"{section}.{name}")
    for name in ("stop_when_idle", "idle_grace", "install_dir"):
        if getattr(old, name) != getattr(new, name):
            keys.append(name)
    return keys
