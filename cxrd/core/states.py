"""The daemon's states and the transitions between them. Pure: no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


_ALLOWED: dict[State, frozenset[State]] = {
    # STOPPED -> STARTING: the first start.
    State.STOPPED: frozenset({State.STARTING}),
    # STARTING -> READY | STOPPING (Stop during start) | FAILED (start failed)
    State.STARTING: frozenset({State.READY, State.STOPPING, State.FAILED}),
    # READY -> RESTARTING (a child crashed) | STOPPING | FAILED (crashed once too often)
    State.READY: frozenset({State.RESTARTING, State.STOPPING, State.FAILED}),
    # RESTARTING -> READY (back up) | STOPPING | FAILED (gave up)
    State.RESTARTING: frozenset({State.READY, State.STOPPING, State.FAILED}),
    # STOPPING -> STOPPED | STARTING (Restart(): the same daemon starts again)
    State.STOPPING: frozenset({State.STOPPED, State.STARTING}),
    # FAILED is final: the daemon exits with the error's code.
    State.FAILED: frozenset(),
}


@dataclass(frozen=True)
class StateChanged:
    """A change and why: the supervisor's event, the D-Bus signal, the client's view of it."""

    new: State
    old: State
    reason: str


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: State, new: State) -> None:
    if new not in _ALLOWED[old]:
        raise IllegalTransition(f"{old} -> {new} is not a legal transition")


DESCRIPTIONS: dict[State, str] = {
    State.STARTING: "Starting the CloudXR runtime and the WSS proxy",
    State.READY: "CloudXR runtime ready",
    State.RESTARTING: "Restarting after a crash",
    State.STOPPING: "Stopping the CloudXR runtime and the WSS proxy",
    State.STOPPED: "Stopped",
    State.FAILED: "Failed",
}
