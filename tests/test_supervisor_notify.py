"""What systemd hears (sd_notify) and when the idle timer runs, through the fake ports.

READY=1 only after a start that succeeded, or at the end of a reload that
told RELOADING=1 while ready; RELOADING=1 only when the reload begins; nothing
of either after a failure or STOPPING=1. The idle timer runs only once a
lease has been held and none is left.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fakes import Harness, base_config

from cxrd.core.states import State
from cxrd.errors import Busy, InvalidConfig, StartFailed

GRACE = 0.05


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(base_config(tmp_path))
    yield harness
    harness.close()


def after(lines: list[str], marker: str) -> list[str]:
    return lines[lines.index(marker) + 1 :] if marker in lines else []


def test_a_reload_queued_behind_a_failing_first_start_never_says_ready(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.call(h.sup.launch)
    reload = h.reload_with(h.config)
    assert "RELOADING=1" not in h.world.notified, "the reload has not begun"
    h.crash("runtime", 3)  # before it was ready: the first start fails
    assert h.run(h.sup.wait_stopped()) == StartFailed.exit_code
    assert isinstance(reload.exception(), StartFailed)
    assert "READY=1" not in h.world.notified and "RELOADING=1" not in h.world.notified
    # Overtaken by the failure, not refused: no line says the reload was refused.
    assert not any("reload refused" in line for line in h.world.notified)
    assert "reload refused" not in caplog.text and "reload not done" in caplog.text


def test_a_reload_queued_behind_the_first_start_says_reloading_once_it_begins(
    h: Harness,
) -> None:
    h.call(h.sup.launch)
    reload = h.reload_with(h.config)
    h.ready("runtime")
    h.ready("proxy")
    assert reload.result() == "no setting changed"
    told = [line for line in h.world.notified if line in ("READY=1", "RELOADING=1")]
    assert told == ["READY=1", "RELOADING=1", "READY=1"]


def test_a_reload_after_stopping_1_says_neither_reloading_nor_ready(h: Harness) -> None:
    h.bring_up()
    h.world.ignore_sigterm = True
    h.world.latest("runtime").ignores_sigterm = True  # type: ignore[union-attr]
    h.sup.request_stop("SIGTERM received")
    h.settle()
    reload = h.reload_with(h.config)
    assert isinstance(reload.exception(), Busy)
    assert h.stop_and_wait() == 0
    late = after(h.world.notified, "STOPPING=1")
    assert "READY=1" not in late and "RELOADING=1" not in late, late


def test_a_stop_during_a_begun_reload_ends_it_without_ready(h: Harness) -> None:
    h.bring_up()
    changed = replace(h.config, runtime=replace(h.config.runtime, env={"A": "1"}))
    reload = h.reload_with(changed)  # restarts the runtime: in flight until it is ready
    assert "RELOADING=1" in h.world.notified and h.sup.state is State.RESTARTING
    h.sup.request_stop("SIGTERM received")
    assert h.stop_and_wait() == 0
    assert isinstance(reload.exception(), Busy)
    assert "READY=1" not in after(h.world.notified, "RELOADING=1")


def test_a_refused_reload_while_ready_says_reloading_then_ready(h: Harness) -> None:
    h.bring_up()
    reload = h.reload_with(InvalidConfig("cxrd.toml: runtime.bogus: unknown key"))
    assert isinstance(reload.exception(), InvalidConfig)
    assert after(h.world.notified, "RELOADING=1")[1:3] == [
        "READY=1",
        "STATUS=CloudXR runtime ready; reload refused: cxrd.toml: runtime.bogus: unknown key",
    ]


def release(h: Harness, lease: str) -> None:
    """Release in the loop, as the D-Bus adapter does."""

    async def inside() -> None:
        h.sup.release(lease)

    h.run(inside())


def idle(h: Harness, **top: object) -> Harness:
    h.sup._config = replace(h.config, stop_when_idle=True, idle_grace=GRACE, **top)
    return h


def test_a_never_leased_daemon_is_not_stopped_by_a_reload_that_changes_nothing(
    h: Harness,
) -> None:
    same = replace(h.config, stop_when_idle=True, idle_grace=GRACE)
    idle(h).bring_up()
    assert h.reload_with(same).result() == "no setting changed"
    h.settle(GRACE * 4)
    assert h.sup.state is State.READY, "nobody ever leased it: it is not idle"


def test_the_idle_stop_follows_the_last_lease_and_says_so(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    idle(h).bring_up()
    lease = h.sup.acquire(":1.7", 7, "test")
    h.settle(GRACE * 2)
    assert h.sup.state is State.READY, "a lease is held"
    with caplog.at_level(logging.INFO, logger="cxrd.core"):
        release(h, lease)
        assert h.run(h.sup.wait_stopped()) == 0
    assert f"idle for {GRACE:g} s: the last lease ended" in caplog.text


def test_a_reload_turning_idle_stop_on_after_the_last_lease_says_why(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.bring_up()
    release(h, h.sup.acquire(":1.7", 7, "test"))
    h.settle(GRACE * 2)
    assert h.sup.state is State.READY, "stop_when_idle is off"
    with caplog.at_level(logging.INFO, logger="cxrd.core"):
        h.reload_with(replace(h.config, stop_when_idle=True, idle_grace=GRACE)).result()
        assert h.run(h.sup.wait_stopped()) == 0
    assert "the last lease ended before stop_when_idle was reloaded" in caplog.text
