"""One child's record: its own state machine, restart policy and tasks.

The supervisor owns two of these (the runtime, the proxy) and is the only
code that changes them; every change of state goes through :meth:`Child.set`.
``gen`` counts spawns, so an event about an earlier process of the same child
(a late exit, a late readiness) is recognised and dropped.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field

from cxrd.core.policy import RestartPolicy
from cxrd.core.ports import ChildHandle
from cxrd.core.states import ChildState, check_child_transition

log = logging.getLogger(__name__)


class After(enum.Enum):
    """What follows a stop the supervisor asked for."""

    STAY = "stay"  # stay stopped (Stop, a failure, the proxy disabled by a reload)
    START = "start"  # start again (Restart, a reload that changed its settings)
    CRASH = "crash"  # count it as a crash (a restart that did not get ready in time)


@dataclass(eq=False)
class Child:
    name: str  # "runtime" or "proxy"
    policy: RestartPolicy
    state: ChildState = ChildState.STOPPED
    handle: ChildHandle | None = None
    gen: int = 0
    restarts: int = 0
    last_exit: str = ""
    then: After = After.STAY
    crash_cause: str = ""  # why a stop with After.CRASH was asked, when not a timeout
    # Part of a run (the first start, a Restart): failing to start fails the daemon.
    in_run: bool = False
    # The start worker is inside Launcher.spawn(): not to be cancelled there,
    # or a process could exist that nobody tracks.
    spawning: bool = False
    # The last gen whose worker reported Spawned or SpawnFailed: exactly one each.
    reported: int = 0
    worker: asyncio.Task[None] | None = None
    backoff: asyncio.TimerHandle | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def set(self, new: ChildState, why: str) -> None:
        check_child_transition(self.state, new)
        log.info("%s: %s -> %s: %s", self.name, self.state, new, why)
        self.state = new

    @property
    def pid(self) -> int:
        h = self.handle
        return h.pid if h is not None and h.returncode is None else 0

    @property
    def started_at(self) -> float:
        h = self.handle
        return h.started_at if h is not None and h.returncode is None else 0.0

    def own(self, task: asyncio.Task[None]) -> None:
        """Keep a task of this child alive until it ends; cancelled at shutdown."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel_backoff(self) -> None:
        if self.backoff is not None:
            self.backoff.cancel()
            self.backoff = None

    def cancel_worker(self) -> None:
        """Stop waiting for readiness (or preparing); never while spawning."""
        if self.worker is not None and not self.spawning:
            self.worker.cancel()
