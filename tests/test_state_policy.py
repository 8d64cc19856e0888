"""States, transitions and restart policy: pure, no processes."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import cxrd.core
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


ADAPTERS = ("cxrd.proxy", "cxrd.runtimes", "cxrd.system", "cxrd.dbus", "cxrd.health", "cxrd.host")


def test_the_core_imports_none_of_its_adapters() -> None:
    core = Path(cxrd.core.__file__).parent
    found = []
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [
                f"{path.name}: {n}" for n in names if n.startswith((*ADAPTERS, "cxrd.daemon"))
            ]
    assert found == []


def test_the_core_loads_no_adapter_transport_or_notifier() -> None:
    code = (
        "import pkgutil, sys, importlib, cxrd.core\n"
        "for m in pkgutil.iter_modules(cxrd.core.__path__):\n"
        "    importlib.import_module('cxrd.core.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dbus_fast', 'sdnotify',"
        " 'websockets') or m.startswith(('cxrd.proxy', 'cxrd.runtimes', 'cxrd.system',"
        " 'cxrd.dbus', 'cxrd.health', 'cxrd.host')))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
