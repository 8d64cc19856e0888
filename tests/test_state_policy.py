"""States, transitions and restart policy: pure, no processes."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from cxrd.core.policy import RestartPolicy
from cxrd.core.states import IllegalTransition, State, check_transition


def test_the_lifecycle_paths_are_legal() -> None:
    path = [
        State.STOPPED,
        State.STARTING,
        State.READY,
        State.RESTARTING,
        State.READY,
        State.RESTARTING,
        State.READY,
        State.STOPPING,
        State.STOPPED,
    ]
    for old, new in itertools.pairwise(path):
        check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.STOPPED, State.READY),
        (State.FAILED, State.STARTING),
        (State.READY, State.STARTING),
        (State.STOPPED, State.RESTARTING),
        (State.STOPPING, State.STARTING),
    ],
)
def test_illegal_transitions_are_rejected(old: State, new: State) -> None:
    with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
        check_transition(old, new)


def test_backoff_doubles_up_to_the_cap_then_gives_up() -> None:
    policy = RestartPolicy(max_restarts=4, window=60.0, backoff_initial=0.5, backoff_max=1.5)
    delays = [policy.record_crash(float(t)) for t in range(5)]
    assert delays == [0.5, 1.0, 1.5, 1.5, None]


def test_crashes_outside_the_window_are_forgotten() -> None:
    policy = RestartPolicy(max_restarts=2, window=10.0, backoff_initial=1.0, backoff_max=8.0)
    assert policy.record_crash(0.0) == 1.0
    assert policy.record_crash(5.0) == 2.0
    # The first crash has left the window: one old crash plus this one.
    assert policy.record_crash(10.5) == 2.0
    assert policy.record_crash(11.0) is None


def test_the_supervisor_imports_no_transport() -> None:
    code = (
        "import sys, cxrd.core.supervisor\n"
        "bad = [m for m in ('dbus_fast', 'sdnotify', 'cxrd.system.notify', 'cxrd.dbus.service',"
        " 'websockets') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
