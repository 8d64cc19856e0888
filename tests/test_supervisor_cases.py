"""Each overlap case of issue 8, deterministic, through the supervisor's fake ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fakes import STARTUP_TIMEOUT, STOP_TIMEOUT, Harness, base_config

from cxrd.config import Config
from cxrd.core.choice import Choice
from cxrd.core.states import ChildState, State
from cxrd.errors import (
    AlreadyServing,
    Busy,
    GaveUp,
    InvalidArgs,
    InvalidConfig,
    ProfileMismatch,
    StartFailed,
)
from cxrd.runtimes import RuntimeLaunch


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(base_config(tmp_path))
    yield harness
    harness.close()


def pids(h: Harness) -> tuple[int, int]:
    snap = h.sup.snapshot()
    return snap.runtime.pid, snap.proxy.pid


def test_a_stop_during_a_restart_wins_and_nothing_comes_back(h: Harness) -> None:
    h.bring_up()
    h.world.ignore_sigterm = False
    slow = h.world.latest("runtime")
    assert slow is not None
    slow.ignores_sigterm = True  # keeps the restart in its stopping phase for stop_timeout
    restart = h.call(lambda: h.sup.restart())
    assert h.sup.state is State.RESTARTING, "a Restart is not the daemon going away"
    began = time.monotonic()
    h.sup.request_stop("systemctl stop")
    assert h.stop_and_wait() == 0
    assert time.monotonic() - began < STOP_TIMEOUT + 1
    assert h.world.live == []
    assert len(h.world.spawned) == 2, "nothing was started after the stop"
    assert isinstance(restart.exception(), Busy)
    assert h.sup.state is State.STOPPED


def test_a_reload_of_proxy_keys_restarts_the_proxy_alone_without_a_crash(h: Harness) -> None:
    h.bring_up()
    runtime, proxy = pids(h)
    changed = replace(h.config, proxy=replace(h.config.proxy, max_connections=7))
    reload = h.reload_with(changed)
    h.ready("proxy")
    assert reload.result().startswith("changed proxy.max_connections")
    snap = h.sup.snapshot()
    assert snap.runtime.pid == runtime and snap.proxy.pid not in (0, proxy)
    assert snap.state is State.READY and snap.runtime.restarts == snap.proxy.restarts == 0
    assert snap.last_error == ""
    assert len(h.world.alive("proxy")) == 1 and len(h.world.listeners) == 1
    assert h.world.notified[-2:][0] == "READY=1" or "READY=1" in h.world.notified[-3:]


def test_a_reload_disabling_then_enabling_the_proxy_stops_and_supervises_it(h: Harness) -> None:
    h.bring_up()
    runtime, _ = pids(h)
    off = replace(h.config, proxy=replace(h.config.proxy, enabled=False))
    h.reload_with(off).result()
    assert h.world.alive("proxy") == [] and h.world.listeners == []
    assert h.sup.state is State.READY and pids(h)[0] == runtime
    on = h.reload_with(h.config)
    h.ready("proxy")
    assert on.result().startswith("changed proxy.enabled")
    assert h.crash("proxy")
    assert h.sup.snapshot().proxy.state == ChildState.BACKOFF
    h.settle(0.05)
    assert h.ready("proxy"), "the proxy the reload enabled is supervised: restarted"
    assert h.sup.snapshot().proxy.restarts == 1 and pids(h)[0] == runtime


def test_a_reload_to_a_taken_port_is_refused_and_touches_nothing(h: Harness) -> None:
    h.bring_up()
    before = pids(h)
    h.world.taken_ports.add(50001)
    moved = replace(h.config, proxy=replace(h.config.proxy, port=50001))
    reload = h.reload_with(moved)
    with pytest.raises(StartFailed, match=r"port 50001 .* taken by pid 4242"):
        reload.result()
    assert pids(h) == before and h.sup.state is State.READY
    assert "READY=1" in h.world.notified[-2:]
    assert any("reload refused" in line for line in h.world.notified[-2:])


@pytest.mark.parametrize(
    "bad",
    [
        InvalidConfig("cxrd.toml: runtime.env.X: value contains a line break"),
        InvalidConfig("cxrd.toml: runtime.sim.startup_delay: must be 0 or more, got -1"),
    ],
)
def test_an_invalid_reload_is_refused_with_ready_1_and_touches_nothing(
    h: Harness, bad: InvalidConfig
) -> None:
    h.bring_up()
    before = pids(h)
    reload = h.reload_with(bad)
    with pytest.raises(InvalidConfig):
        reload.result()
    assert pids(h) == before and h.sup.state is State.READY
    assert h.world.notified.index("RELOADING=1") < len(h.world.notified) - 1
    assert h.world.notified[-2] == "READY=1"


def test_a_reload_that_moves_install_dir_is_refused(h: Harness, tmp_path: Path) -> None:
    h.bring_up()
    before = pids(h)
    with pytest.raises(InvalidConfig, match="install_dir: cannot change"):
        h.reload_with(replace(h.config, install_dir=str(tmp_path / "elsewhere"))).result()
    assert pids(h) == before


def test_a_reload_whose_proxy_never_gets_ready_still_answers_and_says_ready_1(
    h: Harness,
) -> None:
    h.bring_up()
    runtime, _ = pids(h)
    changed = replace(h.config, proxy=replace(h.config.proxy, ping_interval=5.0))
    reload = h.reload_with(changed)
    h.settle(STARTUP_TIMEOUT + STOP_TIMEOUT + 0.1)  # the new proxy never says READY
    assert "the proxy did not come up" in reload.result()
    assert h.world.notified[-2] == "READY=1" or "READY=1" in h.world.notified[-4:]
    assert h.sup.state is State.READY and pids(h)[0] == runtime


def test_two_quick_reloads_run_one_after_the_other(h: Harness) -> None:
    h.bring_up()
    first = replace(h.config, runtime=replace(h.config.runtime, env={"A": "1"}))
    second = replace(h.config, runtime=replace(h.config.runtime, env={"A": "2"}))
    one = h.reload_with(first)
    two = h.reload_with(second)
    assert not one.done() and not two.done()
    for _ in range(4):
        h.ready("runtime")
        h.ready("proxy")
    assert one.done() and two.done()
    assert h.world.env_published[-1]["A"] == "2"
    assert len(h.world.alive("runtime")) == 1 and h.sup.state is State.READY


def test_a_reload_during_the_first_start_is_applied_when_it_ends(h: Harness) -> None:
    h.call(h.sup.launch)
    reload = h.reload_with(replace(h.config, runtime=replace(h.config.runtime, env={"B": "x"})))
    h.ready("runtime")
    h.ready("proxy")
    assert not reload.done(), "the reload waits for the start, then restarts the runtime"
    h.ready("runtime")
    assert reload.result().startswith("changed runtime.env")
    assert h.world.env_published[-1]["B"] == "x"


def test_reloads_do_not_reset_the_crash_history(h: Harness) -> None:
    h.bring_up()
    for crash in range(4):
        same = replace(h.config, idle_grace=10.0 + crash)
        h.reload_with(same).result()
        h.crash("runtime")
        h.settle(0.1)
        h.ready("runtime")
    assert h.sup.state is State.FAILED
    assert isinstance(h.sup._failure, GaveUp)
    assert h.run(h.sup.wait_stopped()) == GaveUp.exit_code


def test_start_with_a_profile_that_activates_the_daemon_is_honoured(h: Harness) -> None:
    h.call(h.sup.launch)  # the daemon's own start, racing the activating call
    start = h.call(lambda: h.sup.start(choice=Choice(profile="AppleVisionPro")))
    for _ in range(3):
        h.ready("runtime")
        h.ready("proxy")
    assert start.done() and start.exception() is None
    assert h.sup.snapshot().device_profile == "AppleVisionPro"
    assert h.world.env_published[-1]["NV_DEVICE_PROFILE"] == "AppleVisionPro"


def test_a_claimed_runtime_answers_profile_mismatch(h: Harness) -> None:
    h.bring_up()
    h.call(lambda: h.sup.start()).result()  # a client now uses it
    start = h.call(lambda: h.sup.start(choice=Choice(profile="AppleVisionPro")))
    with pytest.raises(ProfileMismatch):
        start.result()


def test_start_while_restarting_waits_for_the_runtime_to_be_back(h: Harness) -> None:
    h.bring_up()
    h.crash("runtime")
    assert h.sup.state is State.RESTARTING
    start = h.call(lambda: h.sup.start())
    h.settle(0.05)
    assert not start.done(), "no answer while no runtime is there"
    h.ready("runtime")
    assert start.done() and start.exception() is None
    assert h.sup.snapshot().runtime.pid == h.world.alive("runtime")[0].pid


def test_a_restart_with_a_malformed_profile_touches_nothing(h: Harness) -> None:
    h.bring_up()
    before = pids(h)
    restart = h.call(lambda: h.sup.restart(choice=Choice(profile="Quest 3")))
    with pytest.raises(InvalidArgs):
        restart.result()
    assert pids(h) == before and h.sup.state is State.READY
    assert not h.sup._exit_future().done()


def test_a_proxy_crash_leaves_the_daemon_ready_and_its_give_up_leaves_the_runtime(
    h: Harness,
) -> None:
    h.bring_up()
    runtime, _ = pids(h)
    for _ in range(4):  # max_restarts = 3: the fourth crash gives up
        h.crash("proxy")
        assert h.sup.state is State.READY
        h.settle(0.1)
        h.ready("proxy")
    snap = h.sup.snapshot()
    assert snap.proxy.state == ChildState.FATAL and snap.proxy.pid == 0
    assert snap.runtime.pid == runtime and snap.state is State.READY
    assert "giving up" in snap.last_error and "runtime keeps running" in snap.last_error


def test_a_runtime_crash_is_noticed_while_the_proxy_recovers(h: Harness) -> None:
    h.bring_up()
    h.crash("proxy")
    h.crash("runtime")
    assert h.states() == (ChildState.BACKOFF, ChildState.BACKOFF)
    assert h.sup.state is State.RESTARTING
    h.settle(0.05)
    h.ready("runtime")
    h.ready("proxy")
    assert h.states() == (ChildState.RUNNING, ChildState.RUNNING)
    assert h.sup.state is State.READY


def test_a_start_after_a_stop_is_busy_and_stop_is_idempotent(h: Harness) -> None:
    h.bring_up()
    h.sup.request_stop()
    h.sup.request_stop()
    start = h.call(lambda: h.sup.start())
    with pytest.raises(Busy):
        start.result()
    assert h.stop_and_wait() == 0 and h.world.live == []


def test_a_failure_queued_right_behind_the_first_start_ends_it_cleanly(h: Harness) -> None:
    # The daemon finds its bus name taken just as the first start is prepared: the
    # start's workers exist but have not run once when the failure is handled.
    prepare = h.sup._host.prepare_runtime

    def prepare_then_fail(config: Config, profile: str) -> RuntimeLaunch:
        launch = prepare(config, profile)
        taken = AlreadyServing("io.github.cxrd.Daemon1 is already served on this bus")
        asyncio.get_running_loop().call_soon(h.sup.fail, taken)  # right behind Prepared
        return launch

    h.sup._host.prepare_runtime = prepare_then_fail  # type: ignore[method-assign]
    launch = h.call(h.sup.launch)
    code = h.run(h.sup.wait_stopped(), timeout=STOP_TIMEOUT + 1)
    assert code == AlreadyServing.exit_code
    assert h.sup.state is State.FAILED and h.world.live == []
    assert isinstance(launch.exception(), AlreadyServing)


def test_a_runtime_that_dies_after_ready_during_the_first_start_is_a_crash(h: Harness) -> None:
    h.call(h.sup.launch)
    h.ready("runtime")  # the sentinel is there; the proxy is still coming up
    h.crash("runtime")
    assert h.sup.state is State.STARTING and h.sup._failure is None
    assert h.states()[0] is ChildState.BACKOFF
    h.settle(0.05)
    h.ready("runtime")
    h.ready("proxy")
    assert h.sup.state is State.READY and h.sup.snapshot().runtime.restarts == 1


def test_a_start_waits_for_a_reload_queued_before_it_that_restarts_the_runtime(
    h: Harness,
) -> None:
    # Found by the model: the reload waits behind the first start; the Start that
    # came after it must not be told ready just before that reload restarts the runtime.
    h.call(h.sup.launch)
    h.ready("proxy")
    reload = h.reload_with(
        replace(h.config, runtime=replace(h.config.runtime, device_profile="auto-native"))
    )
    start = h.call(lambda: h.sup.start())
    h.ready("runtime")  # the first start is done; the reload now restarts the runtime
    assert not start.done(), "answered ready while a queued reload was about to stop it"
    h.ready("runtime")
    assert reload.done() and start.done() and start.exception() is None
    assert h.sup.snapshot().device_profile == "auto-native"
