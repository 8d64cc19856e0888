"""States: one machine per child, and the daemon's public state derived from them. Pure.

Each child (the runtime, the proxy) has supervisord's lifecycle. The daemon's
six public states, the ones on the wire, are never set directly: the
supervisor computes them with :func:`public_state` after every event and
announces a change, so the public state always agrees with the children.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.StrEnum):
    """The daemon's public state (D-Bus ``State``, ``cxrctl status``)."""

    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class ChildState(enum.StrEnum):
    """One child's lifecycle (supervisord's process states)."""

    STOPPED = "stopped"  # no process, none wanted
    STARTING = "starting"  # spawning, or spawned and not yet ready
    RUNNING = "running"  # ready: the sentinel exists / the proxy said READY
    BACKOFF = "backoff"  # died; waiting out the backoff before the next start
    STOPPING = "stopping"  # we asked it to end (SIGTERM, then SIGKILL)
    EXITED = "exited"  # died by itself; the policy decides what comes next
    FATAL = "fatal"  # crashed too often: left down


class IllegalTransition(RuntimeError):
    pass


_CHILD: dict[ChildState, frozenset[ChildState]] = {
    ChildState.STOPPED: frozenset({ChildState.STARTING}),
    # STARTING -> RUNNING (ready) | STOPPING (asked) | EXITED (died, spawn or start failed)
    ChildState.STARTING: frozenset({ChildState.RUNNING, ChildState.STOPPING, ChildState.EXITED}),
    ChildState.RUNNING: frozenset({ChildState.STOPPING, ChildState.EXITED}),
    # EXITED -> BACKOFF (retry later) | FATAL (gave up) | STOPPED (a stop, a failed start)
    ChildState.EXITED: frozenset({ChildState.BACKOFF, ChildState.FATAL, ChildState.STOPPED}),
    # BACKOFF -> STARTING (the delay is over) | STOPPED (asked during the delay)
    ChildState.BACKOFF: frozenset({ChildState.STARTING, ChildState.STOPPED}),
    # STOPPING -> STOPPED (gone) | EXITED (a start that timed out: counted as a crash)
    ChildState.STOPPING: frozenset({ChildState.STOPPED, ChildState.EXITED}),
    # FATAL -> STOPPED (the daemon stops, or a Restart/Reload revives it)
    ChildState.FATAL: frozenset({ChildState.STOPPED}),
}

_DAEMON: dict[State, frozenset[State]] = {
    # STOPPED -> STARTING (the first start) | FAILED (it could not even begin: no EULA, ...)
    State.STOPPED: frozenset({State.STARTING, State.FAILED}),
    # STARTING -> READY | STOPPING (a Stop) | FAILED
    #   | STOPPED (a Stop before anything was spawned)
    State.STARTING: frozenset({State.READY, State.STOPPING, State.FAILED, State.STOPPED}),
    # READY -> RESTARTING (a crash, a Restart, a Reload that restarts the runtime)
    #   | STOPPING (a Stop) | FAILED
    State.READY: frozenset({State.RESTARTING, State.STOPPING, State.FAILED}),
    # RESTARTING -> READY | STOPPING (a Stop) | FAILED (gave up)
    #   | STOPPED (a Stop during a backoff, with nothing else running)
    State.RESTARTING: frozenset({State.READY, State.STOPPING, State.FAILED, State.STOPPED}),
    # STOPPING -> STOPPED: the daemon is going away; nothing starts after a Stop.
    State.STOPPING: frozenset({State.STOPPED}),
    # STOPPED after a stop and FAILED are the end: the daemon exits.
    State.FAILED: frozenset(),
}


def check_child_transition(old: ChildState, new: ChildState) -> None:
    if new not in _CHILD[old]:
        raise IllegalTransition(f"child {old} -> {new} is not a legal transition")


def check_transition(old: State, new: State) -> None:
    if new not in _DAEMON[old]:
        raise IllegalTransition(f"{old} -> {new} is not a legal transition")


class Phase(enum.Enum):
    """Where a run (the first start, a Restart, a Reload that restarts the runtime) is."""

    NONE = "none"  # no run in flight
    STOPPING = "stopping"  # stopping what runs before starting again
    STARTING = "starting"  # started; not every enabled child is ready yet


def public_state(
    *,
    failed: bool,
    stop_latched: bool,
    everything_stopped: bool,
    phase: Phase,
    launched: bool,
    was_ready: bool,
    runtime: ChildState,
) -> State:
    """The daemon's state from the children and the supervisor's latches.

    Only the runtime decides ``ready`` against ``restarting``: a proxy that
    restarts or gives up leaves the daemon ``ready`` (the daemon keeps its
    port open throughout, and native clients do not use the proxy); the
    proxy's own state is in ``Status()``. ``stopping`` means only that the
    daemon is going away: a run after the first ready one (a Restart, a
    Reload that restarts the runtime) is ``restarting`` from its stop to ready.
    """
    if failed:
        return State.FAILED
    if stop_latched:
        return State.STOPPED if everything_stopped else State.STOPPING
    if phase is not Phase.NONE:
        return State.RESTARTING if was_ready else State.STARTING
    if not launched:
        return State.STOPPED
    return State.READY if runtime is ChildState.RUNNING else State.RESTARTING


@dataclass(frozen=True)
class StateChanged:
    """A change and why: the supervisor's event, the D-Bus signal, the client's view of it."""

    new: State
    old: State
    reason: str


DESCRIPTIONS: dict[State, str] = {
    State.STARTING: "Starting the CloudXR runtime and the WSS proxy",
    State.READY: "CloudXR runtime ready",
    State.RESTARTING: "Restarting the CloudXR runtime",
    State.STOPPING: "Stopping the CloudXR runtime and the WSS proxy",
    State.STOPPED: "Stopped",
    State.FAILED: "Failed",
}
