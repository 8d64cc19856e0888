"""Model-based test of the supervisor: random interleavings through its fake ports.

Rules: start (no profile, a good one, a malformed one), stop, restart (good and
malformed profiles), reload (each kind of change, valid and invalid), runtime
and proxy crashes and readiness, a runtime that ignores SIGTERM (slow stop),
time passing (backoffs end, starts time out), lease acquire and release, and
any port of the host breaking (OSError of several errnos, a plain exception)
and mending again.
After every step: at most one live runtime and one live proxy, every live
process tracked by the supervisor, no child starting with neither a worker nor
a process, at most one open listener per proxy launch, restart counts only
grow, no internal error, and the public state agrees with the children.
At the end a stop is latched (the ports may still be broken) and must end in
``stopped``, or ``failed`` with the failure's code, with no process and no
listener, within stop_timeout plus a second, every caller answered.
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from fakes import STARTUP_TIMEOUT, STOP_TIMEOUT, Harness, base_config
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cxrd.config import Config
from cxrd.core import operations, supervisor
from cxrd.core.choice import Choice
from cxrd.core.states import ChildState, Phase, State
from cxrd.errors import CxrdError, InvalidConfig

PROFILES = st.sampled_from(["Quest3", "AppleVisionPro", "auto-webrtc"])
ENVS = st.sampled_from([{}, {"NV_CXR_ENABLE_PUSH_DEVICES": "0"}, {"NV_ENABLE_POSE_WAIT": "0"}])
GPUS = st.none() | st.sampled_from([0, 1])
CHOICES = st.builds(Choice, profile=st.none() | PROFILES, env=ENVS, gpu=GPUS)
BAD_PROFILES = st.sampled_from(["Quest 3", "", "a\tb"])
LIVE = (ChildState.STARTING, ChildState.RUNNING, ChildState.STOPPING)
PORTS = st.sampled_from(
    [
        "prepare_runtime", "prepare_proxy", "claim_run_dir", "publish_environment",
        "clear_run_files", "env_file_event", "record_failure", "clear_failure", "log_size",
        "runtime_diagnosis", "server_log", "proxy_diagnosis", "spawn", "file", "pipe",
    ]
)  # fmt: skip
ERRNOS = [errno.ENOSPC, errno.EROFS, errno.ENOENT, errno.EACCES, errno.ENOTDIR]


FAULTS = st.sampled_from(
    [
        *(partial(OSError, code, os.strerror(code), "/install/run/cloudxr.env") for code in ERRNOS),
        partial(RuntimeError, "a bug in a port"),
    ]
)


def reload_kinds(base: Config) -> dict[str, Config | CxrdError]:
    rt, px = base.runtime, base.proxy
    return {
        "nothing": base,
        "runtime_env": replace(base, runtime=replace(rt, env={"CHANGED": "1"})),
        "profile": replace(base, runtime=replace(rt, device_profile="auto-native")),
        "proxy_key": replace(base, proxy=replace(px, max_connections=9)),
        "proxy_port": replace(base, proxy=replace(px, port=50002)),
        "proxy_taken_port": replace(base, proxy=replace(px, port=50009)),
        "proxy_off": replace(base, proxy=replace(px, enabled=False)),
        "restart_limits": replace(base, restart=replace(base.restart, max_restarts=4)),
        "invalid_file": InvalidConfig("cxrd.toml: runtime.env.X: value contains a line break"),
    }


class SupervisorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.base = base_config(Path(self.tmp.name))
        self.h = Harness(self.base)
        self.h.world.taken_ports.add(50009)
        self.kinds = reload_kinds(self.base)
        self.calls: list[asyncio.Task[Any]] = []
        self.restarts = (0, 0)
        self.leases: list[str] = []
        self.violations: list[str] = []
        self.changes = 0  # Restarts and reloads asked for: they may change what a Start got
        self.calls.append(self.h.call(self.h.sup.launch))
        # Checked when a caller is answered, not when its task next runs (by then a
        # later Restart may already be stopping the runtime).
        self._answer = operations.answer
        operations.answer = supervisor.answer = self._checked_answer

    def _checked_answer(self, reply: Any, outcome: str | CxrdError) -> None:
        """A request answered "ready" is answered with a runtime there."""
        runtime = self.h.sup._runtime.state
        if outcome == "ready" and not reply.done() and runtime is not ChildState.RUNNING:
            self.violations.append(f"answered ready with the runtime {runtime}")
        self._answer(reply, outcome)

    # ---- requests ----

    def _ask(self, make: Any) -> None:
        task = self.h.call(make)
        task.add_done_callback(self._check_answer)
        self.calls.append(task)

    def _check_answer(self, task: asyncio.Task[Any]) -> None:
        """A Start answered with success runs what it asked for, unless changed since."""
        if task.cancelled() or task.exception() is not None:
            return
        sup = self.h.sup
        choice, changes = getattr(task, "asked", (None, 0))
        if choice is not None and changes == self.changes:
            differs = choice.differences(sup._running_config)
            if differs:
                self.violations.append(f"Start of {choice} answered, runtime differs: {differs}")

    @rule(choice=CHOICES)
    def restart_into(self, choice: Choice) -> None:
        self.changes += 1
        self._ask(lambda: self.h.sup.restart(choice=choice))

    @rule(choice=CHOICES)
    def start(self, choice: Choice) -> None:
        task = self.h.loop.create_task(self.h.sup.start(choice=choice))
        task.asked = (choice, self.changes)  # type: ignore[attr-defined]
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        task.add_done_callback(self._check_answer)
        self.calls.append(task)
        self.h.settle()

    @rule(profile=BAD_PROFILES)
    def start_malformed(self, profile: str) -> None:
        self._ask(lambda: self.h.sup.start(choice=Choice(profile=profile)))

    @rule(profile=st.none() | PROFILES | BAD_PROFILES)
    def restart(self, profile: str | None) -> None:
        self.changes += 1
        self._ask(lambda: self.h.sup.restart(choice=Choice(profile=profile)))

    @rule(kind=st.sampled_from(sorted(reload_kinds(base_config(Path("/"))))))
    def reload(self, kind: str) -> None:
        self.changes += 1
        self.calls.append(self.h.reload_with(self.kinds[kind]))

    @rule()
    def acquire(self) -> None:
        sup = self.h.sup
        ending = sup._stop_latched or sup._failure is not None
        try:
            self.leases.append(sup.acquire(":1.9", 9, "model"))
        except CxrdError as err:
            assert ending, f"Acquire refused ({err}) by a daemon that is not ending"
        else:
            assert not ending, "a lease granted by a daemon on its way out"

    @precondition(lambda self: bool(self.leases))
    @rule()
    def release(self) -> None:
        self.h.sup.release(self.leases.pop())

    @rule()
    def stop(self) -> None:
        self.h.sup.request_stop("model stop")
        self.h.settle()

    # ---- the children ----

    @rule(name=st.sampled_from(["runtime", "proxy"]))
    def ready(self, name: str) -> None:
        self.h.ready(name)

    @rule(name=st.sampled_from(["runtime", "proxy"]), code=st.sampled_from([1, -11, 0]))
    def crash(self, name: str, code: int) -> None:
        self.h.crash(name, code)

    @rule()
    def slow_stopper(self) -> None:
        child = self.h.world.latest("runtime")
        if child is not None:
            child.ignores_sigterm = True

    @rule(port=PORTS, fault=FAULTS)
    def port_breaks(self, port: str, fault: Any) -> None:
        self.h.world.broken[port] = fault

    @rule(port=PORTS)
    def port_mends(self, port: str) -> None:
        self.h.world.broken.pop(port, None)

    @rule()
    def every_port_mends(self) -> None:
        self.h.world.broken.clear()

    @rule(seconds=st.sampled_from([0.02, STOP_TIMEOUT + 0.02, STARTUP_TIMEOUT + 0.05]))
    def time_passes(self, seconds: float) -> None:
        self.h.settle(seconds)

    # ---- invariants ----

    @invariant()
    def one_of_each_and_all_tracked(self) -> None:
        sup, world = self.h.sup, self.h.world
        for name, child in (("runtime", sup._runtime), ("proxy", sup._proxy)):
            alive = world.alive(name)
            assert len(alive) <= 1, f"{len(alive)} live {name}s"
            if alive:
                assert child.handle is alive[0], f"a live {name} the supervisor does not track"
                assert child.state in LIVE, (name, child.state)

    @invariant()
    def no_child_waits_for_nothing(self) -> None:
        for child in (self.h.sup._runtime, self.h.sup._proxy):
            if child.state is ChildState.STARTING:
                assert child.worker is not None or child.handle is not None, child.name

    @invariant()
    def start_answers_only_with_a_runtime(self) -> None:
        assert self.violations == [], self.violations

    @invariant()
    def no_internal_error(self) -> None:
        failure = self.h.sup._failure
        assert failure is None or "internal error" not in str(failure), failure

    @invariant()
    def listeners_are_not_leaked(self) -> None:
        assert len(self.h.world.listeners) <= 2, self.h.world.listeners

    @invariant()
    def restart_counts_only_grow(self) -> None:
        snap = self.h.sup.snapshot()
        now = (snap.runtime.restarts, snap.proxy.restarts)
        assert now[0] >= self.restarts[0] and now[1] >= self.restarts[1]
        self.restarts = now

    @invariant()
    def public_state_agrees_with_the_children(self) -> None:
        sup = self.h.sup
        state, runtime = sup.state, sup._runtime.state
        if state is State.READY:
            assert runtime is ChildState.RUNNING and self.h.world.alive("runtime")
            assert sup.snapshot().runtime.pid == self.h.world.alive("runtime")[0].pid
        if state is State.RESTARTING and sup._phase is Phase.NONE:
            assert runtime is not ChildState.RUNNING
        if state is State.STOPPING:
            assert sup._stop_latched, "stopping is only the daemon going away"
        if state is State.STOPPED and sup._launched:
            assert self.h.world.live == []

    def teardown(self) -> None:
        try:
            began = time.monotonic()
            self.h.sup.request_stop("the model ends")
            code = self.h.run(self.h.sup.wait_stopped(), timeout=STOP_TIMEOUT + 1 + 1)
            took = time.monotonic() - began
            self.h.settle()
            world, sup = self.h.world, self.h.sup
            assert world.live == [], world.live
            assert world.listeners == [], world.listeners
            assert took < STOP_TIMEOUT + 1, took
            if sup._failure is None:
                assert code == 0 and sup.state is State.STOPPED, (code, sup.state)
            else:
                assert code == sup._failure.exit_code and sup.state is State.FAILED
            unanswered = [t for t in self.calls if not t.done()]
            assert unanswered == [], f"{len(unanswered)} callers never answered"
        finally:
            operations.answer = supervisor.answer = self._answer
            self.h.close()
            self.tmp.cleanup()


SupervisorMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_supervisor_model = SupervisorMachine.TestCase
